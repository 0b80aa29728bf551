//! embedhost's integration tests: one binary, as wasmtime does.

mod bus;
mod chaos;
mod child;
mod cli;
mod described;
mod encoder;
mod front;
mod fuzz;
mod generated;
mod kernels;
mod kits;
mod layering;
mod model;
mod model_add;
mod native;
mod nats;
mod onnx;
mod pinned;
mod plugin_add;
mod plugins;
mod privacy;
mod real_model;
mod sandbox;
mod sandbox2;
mod second_model;
mod serve;
mod sizes;
mod supervisor;
mod tiny;
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

/// How long any process a test runs may take before it is killed and the
/// test fails with what it printed: generous (a busy 2-core machine runs
/// the slowest command, a first model load, in well under a minute), so
/// only a hang reaches it, and then it fails one test instead of stalling
/// the suite.
pub const PROCESS_LIMIT: std::time::Duration = std::time::Duration::from_secs(300);

/// [`std::process::Command::output`] with a bound: past `limit` the process
/// is killed and the test panics with its output so far.
pub trait OutputWithin {
    /// Runs the command to its end, within `limit`.
    ///
    /// # Errors
    /// The spawn's error, as `output` gives it.
    fn output_within(
        &mut self,
        limit: std::time::Duration,
    ) -> std::io::Result<std::process::Output>;
}

impl OutputWithin for std::process::Command {
    fn output_within(
        &mut self,
        limit: std::time::Duration,
    ) -> std::io::Result<std::process::Output> {
        use std::process::Stdio;
        let child = self
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let pid = child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        match rx.recv_timeout(limit) {
            Ok(output) => output,
            Err(_) => {
                // SAFETY: kill(2) of our own child, reaped by the thread.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                // Bounded too: a grandchild holding the pipes open would
                // keep the reader from ever seeing their end.
                let out = rx
                    .recv_timeout(std::time::Duration::from_secs(10))
                    .ok()
                    .and_then(Result::ok);
                panic!(
                    "{self:?} ran past {limit:?} and was killed; stdout: {}; stderr: {}",
                    out.as_ref()
                        .map_or(String::new(), |o| String::from_utf8_lossy(&o.stdout)
                            .into_owned()),
                    out.as_ref()
                        .map_or(String::new(), |o| String::from_utf8_lossy(&o.stderr)
                            .into_owned()),
                );
            }
        }
    }
}

/// Runs `command` to its end, with its output captured, and how long it
/// took; past `guard` it is killed and the test fails with what it printed
/// (a hang fails its test instead of holding the suite).
pub fn run_bounded(
    mut command: std::process::Command,
    guard: std::time::Duration,
) -> (std::process::Output, std::time::Duration) {
    let started = std::time::Instant::now();
    let out = command.output_within(guard).expect("spawn");
    (out, started.elapsed())
}
