//! The UPnP IGD client codec: SSDP answers, HTTP responses, device descriptions, SOAP answers and
//! URLs from the gateway must never panic (see `natscope_core::portmap::igd::fuzz`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    natscope_core::portmap::igd::fuzz(data);
});
