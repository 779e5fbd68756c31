//! Random frames through the lab's NAT router on both ports, with clock steps and timers; every
//! frame it emits must re-parse with correct checksums: see `natscope_lab::engine::fuzzing`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    natscope_lab::engine::fuzzing::exercise(data);
});
