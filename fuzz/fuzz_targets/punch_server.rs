//! Punch (issue 14): see `natscope_core::fuzzing::punch_server`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    natscope_core::fuzzing::punch_server(data);
});
