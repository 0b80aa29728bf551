#![no_main]
//! See `embedhost::fuzzing::config`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| embedhost::fuzzing::config(data));
