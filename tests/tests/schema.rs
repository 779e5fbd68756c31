//! The JSON Schemas of natscope's `--json` documents (docs/schema/) are generated from the report
//! types (`#[derive(JsonSchema)]` next to their `Serialize`), and the committed files are what the
//! types generate: a change to a report type that is not re-blessed fails here.
//!
//! Regenerate every file with one command:
//!
//! ```text
//! NATSCOPE_BLESS=1 cargo test -p natscope-tests --test schema
//! ```
//!
//! The generator is this test rather than an example binary: the code that writes the files and
//! the code that checks them are the same function, it runs with the rest of the suite in CI, and
//! blessing follows the convention of the docs' other generated parts (`NATSCOPE_BLESS_DOCS`).
//!
//! The schemas describe what natscope *writes* (schemars' serialize contract): every field the
//! writer always emits is required, fields it may leave out (the probe's `mapping_comparison`) are
//! not, and no schema forbids unknown fields, so a v1 reader keeps working when a field is added.
//!
//! The rest of this file makes the kinds no other test produces (demo, bench reflect, bench lab, a
//! small matrix and grid) and shows that validation rejects wrong documents.

use std::path::Path;
use std::process::Command;

use natscope_lab::bench::BenchLabDocument;
use natscope_lab::control::{NatTableDocument, NAT_TABLE_SCHEMA};
use natscope_lab::grid::GridDocument;
use natscope_lab::matrix::MatrixDocument;
use natscope_lab::StatusDocument;
use natscope_probes::bench::BenchDocument;
use natscope_probes::probe::ProbeDocument;
use natscope_probes::punch::driver::{ConnectReport, ListenLine, LISTEN_SCHEMA};
use natscope_probes::selfcheck::DemoDocument;
use natscope_tests::lab::require_root;
use natscope_tests::schema::{self, assert_valid, assert_valid_text, file_name, validate};
use natscope_tests::{natscope_bin, TestReflector};
use schemars::generate::SchemaSettings;
use schemars::JsonSchema;
use serde_json::{json, Value};

/// One `--json` document kind: its tag and its schema, generated from its type.
struct Kind {
    tag: &'static str,
    generate: fn() -> Value,
}

/// The schema of `T` as natscope writes it: JSON Schema 2020-12, serialize contract, titled with
/// the document's tag.
fn generate<T: JsonSchema>(tag: &str) -> Value {
    let schema = SchemaSettings::draft2020_12()
        .for_serialize()
        .into_generator()
        .into_root_schema_for::<T>();
    let mut v = serde_json::to_value(schema).expect("a schema is JSON");
    plain_descriptions(&mut v);
    if let Some(o) = v.as_object_mut() {
        o.insert("title".into(), Value::from(tag));
    }
    v
}

/// The descriptions come from doc comments; their rustdoc links (`` [`SCHEMA`] ``) mean nothing
/// to a schema's reader, so they become plain code spans.
fn plain_descriptions(v: &mut Value) {
    match v {
        Value::Object(o) => {
            for (k, x) in o.iter_mut() {
                match x {
                    Value::String(s) if k == "description" => {
                        *s = s.replace("[`", "`").replace("`]", "`");
                    }
                    _ => plain_descriptions(x),
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(plain_descriptions),
        _ => {}
    }
}

macro_rules! kind {
    ($tag:expr, $ty:ty) => {
        Kind {
            tag: $tag,
            generate: || generate::<$ty>($tag),
        }
    };
}

/// Every document natscope prints with `--json`. A new document kind is one line here.
fn kinds() -> Vec<Kind> {
    vec![
        kind!(
            natscope_probes::probe::report::SCHEMA,
            ProbeDocument<'static>
        ),
        kind!(natscope_lab::matrix::SCHEMA, MatrixDocument),
        kind!(natscope_lab::grid::SCHEMA, GridDocument),
        kind!(
            natscope_lab::app_run::SCHEMA,
            natscope_lab::app_run::AppGridDocument
        ),
        kind!(natscope_lab::STATUS_SCHEMA, StatusDocument),
        kind!(NAT_TABLE_SCHEMA, NatTableDocument),
        kind!(natscope_probes::punch::connector::SCHEMA, ConnectReport),
        kind!(LISTEN_SCHEMA, ListenLine),
        kind!(natscope_probes::bench::SCHEMA, BenchDocument<'static>),
        kind!(natscope_lab::bench::SCHEMA, BenchLabDocument),
        kind!(natscope_probes::selfcheck::SCHEMA, DemoDocument<'static>),
    ]
}

const BLESS: &str = "NATSCOPE_BLESS=1 cargo test -p natscope-tests --test schema";

/// The first line where `a` and `b` differ, for the failure message.
fn first_difference(a: &str, b: &str) -> String {
    for (i, (x, y)) in a.lines().zip(b.lines()).enumerate() {
        if x != y {
            return format!("line {}: committed `{x}`, generated `{y}`", i + 1);
        }
    }
    format!(
        "committed {} lines, generated {}",
        a.lines().count(),
        b.lines().count()
    )
}

#[test]
fn committed_schemas_are_the_ones_the_report_types_generate() {
    let dir = schema::schema_dir();
    let bless = std::env::var_os("NATSCOPE_BLESS").is_some();
    if bless {
        std::fs::create_dir_all(&dir).expect("create docs/schema");
    }
    let mut drift = Vec::new();
    let mut names = Vec::new();
    for k in kinds() {
        let name = file_name(k.tag).unwrap_or_else(|| panic!("`{}` is no schema tag", k.tag));
        let path = dir.join(&name);
        let text = serde_json::to_string_pretty(&(k.generate)()).expect("json") + "\n";
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        if committed != text {
            if bless {
                std::fs::write(&path, &text).expect("write the schema");
            } else {
                drift.push(format!("{name}: {}", first_difference(&committed, &text)));
            }
        }
        names.push(name);
    }
    assert!(
        drift.is_empty(),
        "docs/schema/ differs from the report types (regenerate with `{BLESS}`):\n{}",
        drift.join("\n")
    );
    // No schema file is left behind for a document that no longer exists.
    let mut stale: Vec<String> = std::fs::read_dir(&dir)
        .expect("docs/schema")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".json") && !names.contains(n))
        .collect();
    stale.sort();
    assert!(
        stale.is_empty(),
        "docs/schema/ has files no document kind generates: {stale:?}"
    );
}

#[test]
fn every_schema_pins_its_tag_and_requires_the_version() {
    for k in kinds() {
        let s = (k.generate)();
        assert_eq!(s["$schema"], "https://json-schema.org/draft/2020-12/schema");
        assert_eq!(s["properties"]["schema"]["const"], k.tag, "{}", k.tag);
        assert_eq!(
            s["properties"]["natscope_version"]["type"], "string",
            "{}",
            k.tag
        );
        let required = s["required"].as_array().expect("required");
        for field in ["schema", "natscope_version"] {
            assert!(required.contains(&Value::from(field)), "{}: {field}", k.tag);
        }
        assert_eq!(
            s.get("additionalProperties"),
            None,
            "{}: open to new fields",
            k.tag
        );
    }
}

/// Every JSON example in docs/*.md that carries a schema tag is a valid document of it.
#[test]
fn the_documented_examples_validate() {
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    let mut seen = Vec::new();
    for page in ["probe.md", "lab.md", "punch.md"] {
        let text = std::fs::read_to_string(docs.join(page)).expect("docs page");
        for block in text.split("```json\n").skip(1) {
            let block = block.split("\n```").next().unwrap_or_default();
            // One document, or one event line of `punch listen --json` per line.
            let docs: Vec<Value> = match serde_json::from_str::<Value>(block) {
                Ok(v) => vec![v],
                Err(_) => block
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{page}: {e}\n{l}")))
                    .collect(),
            };
            for d in docs.iter().filter(|d| d.get("schema").is_some()) {
                if let Err(e) = validate(d) {
                    panic!("docs/{page}: {e}\n{block}");
                }
                seen.push(d["schema"].as_str().unwrap_or_default().to_string());
            }
        }
    }
    seen.sort();
    seen.dedup();
    for tag in [
        "natscope.probe/v1",
        "natscope.lab/v1",
        "natscope.nat-table/v1",
        "natscope.punch/v1",
        "natscope.punch-listen/v1",
    ] {
        assert!(seen.iter().any(|s| s == tag), "no documented {tag} example");
    }
}

/// A document natscope really wrote (the bench report of a fixed run) passes, and each kind of
/// wrong document is rejected with the place it is wrong.
#[test]
fn validation_rejects_wrong_types_missing_fields_and_unknown_tags() {
    let report = natscope_probes::bench::LoadReport {
        target: "127.0.0.1:3478".parse().expect("addr"),
        seconds: 1.0,
        sockets: 1,
        window: 8,
        requests_sent: 10,
        responses: 10,
        lost: 0,
        late: 0,
        invalid: 0,
        errors: 0,
        requests_per_second: 10.0,
        p50_us: 50,
        p99_us: 90,
        max_us: 100,
    };
    let good = serde_json::to_value(report.document()).expect("json");
    assert_valid(&good);
    let with = |f: &dyn Fn(&mut serde_json::Map<String, Value>)| {
        let mut d = good.clone();
        f(d.as_object_mut().expect("object"));
        validate(&d)
    };
    let err = with(&|d| {
        d.insert("responses".into(), json!("ten"));
    })
    .expect_err("a string where a count belongs");
    assert!(err.contains("/responses"), "{err}");
    let err = with(&|d| {
        d.insert("sockets".into(), json!(-1));
    })
    .expect_err("a negative count");
    assert!(err.contains("/sockets"), "{err}");
    let err = with(&|d| {
        d.remove("p99_us");
    })
    .expect_err("a missing field");
    assert!(err.contains("p99_us"), "{err}");
    let err = with(&|d| {
        d.remove("natscope_version");
    })
    .expect_err("no version");
    assert!(err.contains("natscope_version"), "{err}");
    // The bench document under another kind's tag is no document of that kind.
    assert!(with(&|d| {
        d.insert("schema".into(), json!("natscope.demo/v1"));
    })
    .is_err());
    let err = with(&|d| {
        d.insert("schema".into(), json!("natscope.bench/v9"));
    })
    .expect_err("a version with no schema");
    assert!(err.contains("no schema for `natscope.bench/v9`"), "{err}");
    assert!(validate(&json!({"pass": true})).is_err(), "no tag");
    assert!(with(&|d| {
        d.insert("schema".into(), json!("../../etc/passwd"));
    })
    .is_err());
    // A new field is no error: v1 readers ignore it.
    assert!(with(&|d| {
        d.insert("added_later".into(), json!(1));
    })
    .is_ok());
}

/// A closed set nested deep in a document (a probe verdict inside a matrix row) is checked too.
#[test]
fn validation_reaches_into_nested_documents() {
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/probe.md");
    let text = std::fs::read_to_string(docs).expect("docs/probe.md");
    let probe = text
        .split("```json\n")
        .filter_map(|b| b.split("\n```").next())
        .find(|b| b.contains("\"natscope.probe/v1\""))
        .expect("the probe example");
    let probe: Value = serde_json::from_str(probe).expect("json");
    let mut row = json!({
        "preset": "full-cone",
        "expected": null,
        "observed": null,
        "pass": false,
        "checks": [],
        "error": null,
        "probe": probe,
        "duration_ms": 1.0
    });
    let verdicts = json!({
        "udp_blocked": false, "nat_detected": true, "mapping": "endpoint-independent",
        "filtering": "endpoint-independent", "port_preservation": true,
        "port_allocation": "preserving", "allocation_delta": null, "hairpinning": true,
        "address_pooling": "paired", "classic": "full-cone"
    });
    row["expected"] = verdicts;
    let mut doc = json!({
        "schema": "natscope.matrix/v1",
        "natscope_version": "0.1.0",
        "rows": [row],
        "pass": false,
        "duration_ms": 2.0
    });
    assert_valid(&doc);
    doc["rows"][0]["probe"]["mapping"] = json!("sideways");
    let err = validate(&doc).expect_err("an unknown mapping");
    assert!(err.contains("at `/rows/0/probe`"), "{err}");
}

fn natscope(args: &[&str]) -> std::process::Output {
    Command::new(natscope_bin())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run natscope {args:?}: {e}"))
}

fn stdout_document(args: &[&str], out: &std::process::Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        panic!(
            "natscope {args:?} printed nothing ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_valid_text(&text)
}

#[test]
fn demo_json_validates() {
    let args = ["demo", "--json"];
    let out = natscope(&args);
    let doc = stdout_document(&args, &out);
    assert_eq!(doc["schema"], "natscope.demo/v1");
    assert_eq!(doc["natscope_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(out.status.code(), Some(0), "{doc:#}");
}

#[test]
fn bench_reflect_json_validates() {
    let r = TestReflector::start_with(false, |_| {});
    let target = r.primary.to_string();
    let args = [
        "bench",
        "reflect",
        target.as_str(),
        "--seconds",
        "0.3",
        "--sockets",
        "1",
        "--window",
        "4",
        "--json",
    ];
    let out = natscope(&args);
    let doc = stdout_document(&args, &out);
    assert_eq!(doc["schema"], "natscope.bench/v1");
    assert!(doc["responses"].as_u64().is_some_and(|n| n > 0), "{doc:#}");
}

/// A matrix of one preset and a grid of one pair: the lab documents the long lab tests also
/// validate, small enough to run with the other schema tests.
#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn one_preset_matrix_and_one_cell_grid_validate() {
    require_root();
    let args = ["lab", "matrix", "--presets", "full-cone", "--json"];
    let out = natscope(&args);
    let doc = stdout_document(&args, &out);
    assert_eq!(doc["rows"].as_array().map(Vec::len), Some(1), "{doc:#}");
    let args = [
        "lab",
        "grid",
        "--presets",
        "full-cone",
        "--transport",
        "udp",
        "--json",
    ];
    let out = natscope(&args);
    let doc = stdout_document(&args, &out);
    assert_eq!(doc["cells"].as_array().map(Vec::len), Some(1), "{doc:#}");
}

#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn bench_lab_json_validates() {
    require_root();
    let args = [
        "bench",
        "lab",
        "--runs",
        "1",
        "--big-runs",
        "0",
        "--seconds",
        "0.2",
        "--rate",
        "1000",
        "--json",
    ];
    let out = natscope(&args);
    let doc = stdout_document(&args, &out);
    assert_eq!(doc["udp_rtt"].as_array().map(Vec::len), Some(3), "{doc:#}");
    assert_eq!(out.status.code(), Some(0), "{doc:#}");
}

/// The binary's version is the one every library writes into documents (one workspace version).
#[test]
fn documents_carry_the_binarys_version() {
    let out = natscope(&["--version"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.trim(),
        format!("natscope {}", natscope_probes::document::VERSION)
    );
}
