#![no_main]
//! See `embedhost::fuzzing::manifest`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| embedhost::fuzzing::manifest(data));
