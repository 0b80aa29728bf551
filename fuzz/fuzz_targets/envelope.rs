#![no_main]
//! See `embedhost::fuzzing::envelope`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| embedhost::fuzzing::envelope(data));
