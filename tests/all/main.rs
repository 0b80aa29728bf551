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

/// Runs `command` to its end, with its output captured; past `guard` it is
/// killed and the test fails with what it printed (a hang fails its test
/// instead of holding the suite).
pub fn run_bounded(
    mut command: std::process::Command,
    guard: std::time::Duration,
) -> (std::process::Output, std::time::Duration) {
    use std::process::Stdio;
    let started = std::time::Instant::now();
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id() as libc::pid_t;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(guard) {
        Ok(out) => (out.expect("wait"), started.elapsed()),
        Err(_) => {
            // SAFETY: our own child, not reaped yet (its waiter has not
            // returned), so the pid is still its.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let out = rx.recv().expect("waiter").expect("wait");
            panic!(
                "{command:?} ran past {guard:?}:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
