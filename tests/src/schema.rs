//! Validation of natscope's `--json` documents against their committed JSON Schemas
//! (docs/schema/, generated from the report types by tests/tests/schema.rs). Every test that reads
//! a document the binary printed passes it through [`assert_valid`], so a field the code writes but
//! the schema does not describe (or the other way round) fails the test that saw it.
//!
//! The schema is picked by the document's own `schema` tag: `natscope.<kind>/v<N>` is
//! `docs/schema/<kind>.v<N>.json`. This file needs only std, serde_json and jsonschema, so
//! `natscope`'s own tests (cli/tests), which cannot depend on this Linux-only crate, include it
//! with `#[path]` and use the same function.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::Value;

/// docs/schema/ of this checkout (every crate of the workspace is one level below its root).
pub fn schema_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/schema"))
}

/// The file name a schema tag names: `natscope.probe/v1` → `probe.v1.json`; `None` for anything
/// that is not `natscope.<kind>/v<N>` with a kebab-case kind.
pub fn file_name(tag: &str) -> Option<String> {
    let (kind, version) = tag.strip_prefix("natscope.")?.split_once("/v")?;
    let kind_ok = !kind.is_empty()
        && kind
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let version_ok = !version.is_empty() && version.bytes().all(|b| b.is_ascii_digit());
    (kind_ok && version_ok).then(|| format!("{kind}.v{version}.json"))
}

/// Compiled validators by tag: each schema file is read and compiled once per test process.
fn validator(tag: &str) -> Result<Arc<jsonschema::Validator>, String> {
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<jsonschema::Validator>>>> = OnceLock::new();
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(v) = cache.get(tag) {
        return Ok(v.clone());
    }
    let name = file_name(tag).ok_or_else(|| format!("`{tag}` is no natscope schema tag"))?;
    let path = schema_dir().join(&name);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("no schema for `{tag}`: {}: {e}", path.display()))?;
    let schema: Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let compiled = jsonschema::validator_for(&schema)
        .map_err(|e| format!("{} is no valid JSON Schema: {e}", path.display()))?;
    let compiled = Arc::new(compiled);
    cache.insert(tag.to_string(), compiled.clone());
    Ok(compiled)
}

/// Checks `doc` against the schema its `schema` tag names. The error lists every violation
/// (instance path and reason), or says why no schema applies (no tag, unknown tag).
pub fn validate(doc: &Value) -> Result<(), String> {
    let tag = doc
        .get("schema")
        .and_then(Value::as_str)
        .ok_or("the document has no `schema` tag")?;
    let v = validator(tag)?;
    let errors: Vec<String> = v
        .iter_errors(doc)
        .map(|e| format!("  at `{}`: {e}", e.instance_path()))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the document does not match docs/schema/{}:\n{}",
            file_name(tag).unwrap_or_default(),
            errors.join("\n")
        ))
    }
}

/// [`validate`], panicking with the violations and the document.
pub fn assert_valid(doc: &Value) {
    if let Err(e) = validate(doc) {
        let text = serde_json::to_string_pretty(doc).unwrap_or_default();
        panic!("{e}\n--- document:\n{text}");
    }
}

/// Parses `text` as one JSON document and [`assert_valid`]s it; returns it for the caller's own
/// checks.
pub fn assert_valid_text(text: &str) -> Value {
    let doc: Value = serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("not one JSON document ({e}):\n{text}"));
    assert_valid(&doc);
    doc
}
