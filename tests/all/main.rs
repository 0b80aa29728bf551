//! embedhost's integration tests: one binary, as wasmtime does.

mod bus;
mod chaos;
mod child;
mod cli;
mod fuzz;
mod generated;
mod kernels;
mod layering;
mod model;
mod native;
mod nats;
mod onnx;
mod plugins;
mod real_model;
mod sandbox;
mod sandbox2;
mod serve;
mod supervisor;
mod wasm;
mod worker;

use std::path::PathBuf;

/// An artifact cache shared by the tests of this build, so each plugin is
/// compiled once per test run rather than once per test.
pub fn test_cache_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("artifact-cache")
}

/// Sets its flag when dropped: a handler holding one shows whether the peer
/// dropped (cancelled) the handler's future.
pub struct DropFlag(pub std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}
