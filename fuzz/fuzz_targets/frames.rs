#![no_main]
//! See `embedhost::fuzzing::frames`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| embedhost::fuzzing::frames(data));
