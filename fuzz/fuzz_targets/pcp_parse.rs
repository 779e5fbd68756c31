//! The PCP (RFC 6887) codec, both directions: whatever parses must re-encode to bytes that parse to the
//! same message (see `natscope_core::fuzzing::pcp_parse`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    natscope_core::fuzzing::pcp_parse(data);
});
