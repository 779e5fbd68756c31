//! The UPnP IGD server (issue 12), server direction: see `natscope_core::fuzzing::igd_ssdp`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    natscope_core::fuzzing::igd_ssdp(data);
});
