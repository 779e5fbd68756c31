//! The cooperating link's verifier, on raw datagrams and on correctly signed ones (so the parsing
//! behind the HMAC is reached): see `natscope_core::fuzzing::exercise_link`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    natscope_core::fuzzing::exercise_link(data);
});
