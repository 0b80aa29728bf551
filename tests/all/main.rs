//! embedhost's integration tests: one binary, as wasmtime does.

mod bus;
mod child;
mod cli;
mod supervisor;
mod wasm;

use std::path::PathBuf;

/// An artifact cache shared by the tests of this build, so each plugin is
/// compiled once per test run rather than once per test.
pub fn test_cache_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("artifact-cache")
}
