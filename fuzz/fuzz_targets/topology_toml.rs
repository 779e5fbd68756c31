//! The lab's TOML topology loader: any text is either refused with an error that renders, or
//! accepted as a topology whose address plan exists.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match natscope_lab::config::from_toml(text, "fuzz.toml") {
        Ok(topology) => {
            if let Err(e) = topology.plan() {
                panic!("from_toml accepted a topology with no plan: {e}");
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
