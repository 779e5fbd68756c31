//! The NAT-PMP (RFC 6886) codec, both directions: whatever parses must re-encode to bytes that parse to the
//! same message (see `natscope_core::fuzzing::natpmp_parse`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    natscope_core::fuzzing::natpmp_parse(data);
});
