//! Feeds arbitrary bytes to every STUN entry point a peer can reach, via the same
//! `exercise` function the property tests call (probes/core/tests/codec_props.rs).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    natscope_core::fuzzing::exercise(data);
});
