//! `natscope demo`: the README's first command until the lab matrix exists. Starts a reflector on
//! 127.0.0.1 + 127.0.0.2, runs one Binding exchange per RFC 5780 feature against it, and checks
//! each answer's real source and attributes ([`natscope_probes::selfcheck`]). Loopback only:
//! nothing leaves the machine.

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use natscope_probes::selfcheck::{self, SelfCheck};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Print one JSON document instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: DemoArgs) -> Result<ExitCode> {
    let check = selfcheck::run()?;
    let SelfCheck {
        primary: a1p1,
        alternate: a2p2,
        ref rows,
        pass,
        elapsed,
        ..
    } = check;
    if args.json {
        crate::emit(&serde_json::to_string_pretty(&check.document())?);
    } else {
        let mut t = Table::new();
        t.load_preset(UTF8_FULL_CONDENSED).set_header([
            "test",
            "sent to",
            "answered from",
            "mapped",
            "RESPONSE-ORIGIN",
            "OTHER-ADDRESS",
            "result",
        ]);
        let show = |a: Option<SocketAddr>| a.map_or("-".to_string(), |a| a.to_string());
        for r in rows {
            t.add_row([
                r.test.to_string(),
                r.sent_to.to_string(),
                show(r.answered_from),
                show(r.mapped),
                show(r.response_origin),
                show(r.other_address),
                if r.pass {
                    "ok".into()
                } else {
                    format!("FAIL: {}", r.detail)
                },
            ]);
        }
        crate::emit(&format!(
            "natscope reflect on {a1p1} + {a2p2} (loopback), {} exchanges in {} ms\n{t}",
            rows.len(),
            elapsed.as_millis()
        ));
        crate::emit(if pass {
            "every answer came from the address RFC 5780 §6 prescribes, with the right attributes"
        } else {
            "some answers were wrong: see FAIL rows"
        });
    }
    Ok(if pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
