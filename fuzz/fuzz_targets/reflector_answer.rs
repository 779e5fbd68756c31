//! One request through `Reflector::answer` as a whole (every deployment, both transports), and any
//! forward it makes through the partner: see `natscope_core::fuzzing::exercise_reflector`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    natscope_core::fuzzing::exercise_reflector(data);
});
