//! Compiling plugin code in a child process, bounded in memory, CPU time
//! and wall time.
//!
//! Why a child: what compiling costs is not bounded by a file's structure.
//! Within every pre-compile bound ([`super::structure`]), a component of
//! many empty functions cost 2.68 GB at 1.9 MiB, one function of
//! straight-line code 49 s and 3.7 GB, nested loops past 4 GiB; compile
//! memory grows about 1.4 KB per byte of file, so the 64 MiB file bound
//! allowed about 80 GB. The kernel bounds a child where no count of the
//! file's parts can.
//!
//! # Invariants
//! - With a compiler executable set ([`super::WasmEngine::with_compiler`];
//!   the CLI sets its own binary), all plugin code the host compiles (a
//!   plugin, a plugin instrumented for a snapshot, a snapshot) is compiled
//!   by `embedhost compile-plugin` ([`serve_compile`]) under
//!   `RLIMIT_DATA` = [`limits::MAX_COMPILE_MEMORY_BYTES`] and `RLIMIT_CPU`
//!   = [`limits::MAX_COMPILE_CPU`], and killed at
//!   [`limits::MAX_COMPILE_TIME`]: the host's own memory does not grow with
//!   what compiling costs, and a compile past a limit is one line
//!   ([`CompileError`]) naming it.
//! - The child's answer is read up to [`limits::MAX_COMPILE_OUTPUT_BYTES`].
//! - Without a compiler executable (a library user, a unit test), code is
//!   compiled in the process, bounded only by the pre-compile checks.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use crate::limits;

/// The hidden subcommand that compiles what it reads on stdin.
pub const COMPILE_SUBCOMMAND: &str = "compile-plugin";

/// Why compiling in the child failed.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// Past [`limits::MAX_COMPILE_MEMORY_BYTES`].
    #[error(
        "compiling it needs more than {limit} bytes of memory (limits::MAX_COMPILE_MEMORY_BYTES)"
    )]
    Memory {
        /// The bound.
        limit: u64,
    },
    /// Past [`limits::MAX_COMPILE_CPU`] or [`limits::MAX_COMPILE_TIME`].
    #[error(
        "compiling it takes longer than {cpu:?} of CPU or {wall:?} in all (limits::MAX_COMPILE_CPU, limits::MAX_COMPILE_TIME)"
    )]
    Time {
        /// The CPU bound.
        cpu: std::time::Duration,
        /// The wall-clock bound.
        wall: std::time::Duration,
    },
    /// The compiler refused the code (the child's message).
    #[error("{0}")]
    Refused(String),
    /// The child could not be run, or answered past its bound.
    #[error("the compiler process failed: {0}")]
    Child(String),
}

/// Compiles `bytes` with `exe compile-plugin` under the limits of the
/// module docs; the answer is what `Engine::precompile_component` would
/// return.
///
/// # Errors
/// [`CompileError`].
pub(crate) fn precompile_in_child(exe: &Path, bytes: &[u8]) -> Result<Vec<u8>, CompileError> {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(exe);
    command
        .arg(COMPILE_SUBCOMMAND)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("RUST_LOG");
    let memory = limits::MAX_COMPILE_MEMORY_BYTES;
    let cpu = limits::MAX_COMPILE_CPU.as_secs();
    // SAFETY: only setrlimit (async-signal-safe) between fork and exec.
    unsafe {
        command.pre_exec(move || {
            set_limit(libc::RLIMIT_DATA, memory)?;
            set_limit(libc::RLIMIT_CPU, cpu)
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| CompileError::Child(format!("cannot run `{}`: {e}", exe.display())))?;
    let pid = child.id() as libc::pid_t;
    let (Some(mut stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err(CompileError::Child("no pipes".into()));
    };
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || stdin.write_all(bytes));
        let reader = scope.spawn(move || read_bounded(stdout, limits::MAX_COMPILE_OUTPUT_BYTES));
        let errors = scope.spawn(move || read_bounded(stderr, 64 * 1024));
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = scope.spawn(move || {
            let _ = tx.send(child.wait());
        });
        let status = match rx.recv_timeout(limits::MAX_COMPILE_TIME) {
            Ok(status) => status.map_err(|e| CompileError::Child(e.to_string()))?,
            Err(_) => {
                // SAFETY: our child, not yet reaped (its waiter has not
                // returned).
                unsafe { libc::kill(pid, libc::SIGKILL) };
                let _ = waiter.join();
                return Err(CompileError::Time {
                    cpu: limits::MAX_COMPILE_CPU,
                    wall: limits::MAX_COMPILE_TIME,
                });
            }
        };
        let _ = writer.join();
        let output = reader.join().unwrap_or(Ok(None));
        let message = errors
            .join()
            .ok()
            .and_then(Result::ok)
            .flatten()
            .map(|e| String::from_utf8_lossy(&e).trim().to_string())
            .unwrap_or_default();
        if status.success() {
            return match output {
                Ok(Some(serialized)) => Ok(serialized),
                Ok(None) => Err(CompileError::Child(format!(
                    "its answer is past {} bytes (limits::MAX_COMPILE_OUTPUT_BYTES)",
                    limits::MAX_COMPILE_OUTPUT_BYTES
                ))),
                Err(e) => Err(CompileError::Child(e.to_string())),
            };
        }
        Err(failure(status, &message))
    })
}

/// What a compiler child that did not succeed ran into.
fn failure(status: std::process::ExitStatus, message: &str) -> CompileError {
    use std::os::unix::process::ExitStatusExt;
    let memory = limits::MAX_COMPILE_MEMORY_BYTES;
    match status.signal() {
        Some(libc::SIGXCPU | libc::SIGKILL) => CompileError::Time {
            cpu: limits::MAX_COMPILE_CPU,
            wall: limits::MAX_COMPILE_TIME,
        },
        // An allocation refused by RLIMIT_DATA aborts the child
        // ("memory allocation of N bytes failed").
        Some(libc::SIGABRT) | Some(libc::SIGSEGV) => CompileError::Memory { limit: memory },
        _ if message.contains("memory allocation") || message.contains("out of memory") => {
            CompileError::Memory { limit: memory }
        }
        _ if status.code() == Some(1) && !message.is_empty() => CompileError::Refused(
            crate::untrusted::sanitize(message.lines().last().unwrap_or_default(), 2048),
        ),
        _ => CompileError::Child(format!(
            "{status}: {}",
            crate::untrusted::sanitize(message, 2048)
        )),
    }
}

/// Reads `from` to its end, or `None` past `limit` bytes.
fn read_bounded(from: impl Read, limit: u64) -> std::io::Result<Option<Vec<u8>>> {
    let mut out = Vec::new();
    from.take(limit + 1).read_to_end(&mut out)?;
    Ok((out.len() as u64 <= limit).then_some(out))
}

/// Lowers `resource` to `value` (never above a hard limit the host was
/// itself given).
fn set_limit(resource: libc::__rlimit_resource_t, value: u64) -> std::io::Result<()> {
    let mut current = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid resource and a valid pointer.
    if unsafe { libc::getrlimit(resource, &mut current) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let value = value.min(current.rlim_max);
    let limit = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: a valid rlimit for a valid resource.
    if unsafe { libc::setrlimit(resource, &limit) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `embedhost compile-plugin`: compiles the component on stdin with the
/// host's engine settings and writes the artifact to stdout. Exits 1 with
/// the compiler's message on stderr if it is refused.
pub fn serve_compile() -> std::process::ExitCode {
    let mut bytes = Vec::new();
    let limit = limits::MAX_COMPILE_OUTPUT_BYTES;
    if let Err(e) = std::io::stdin().take(limit).read_to_end(&mut bytes) {
        eprintln!("cannot read the component: {e}");
        return std::process::ExitCode::FAILURE;
    }
    let compiled = super::WasmEngine::new(None)
        .and_then(|engine| engine.engine().precompile_component(&bytes));
    match compiled {
        Ok(serialized) => match std::io::stdout().lock().write_all(&serialized) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cannot write the artifact: {e}");
                std::process::ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A compiler executable that runs `body` (shell) after reading the
    /// component on its stdin.
    fn compiler(dir: &Path, body: &str) -> std::path::PathBuf {
        // The executable is made by `install`, which exits before it runs:
        // a file this process held open for writing could be inherited by a
        // child another test forks meanwhile, and running it would then fail
        // with ETXTBSY ("Text file busy").
        let (source, path) = (dir.join("compiler.sh"), dir.join("compiler"));
        std::fs::write(&source, format!("#!/bin/sh\ncat >/dev/null\n{body}\n")).unwrap();
        let made = std::process::Command::new("install")
            .args(["-m", "755"])
            .arg(&source)
            .arg(&path)
            .status()
            .unwrap();
        assert!(made.success());
        path
    }

    fn compile_with(body: &str) -> CompileError {
        let dir = tempfile::tempdir().unwrap();
        let exe = compiler(dir.path(), body);
        precompile_in_child(&exe, b"\0asm not really").unwrap_err()
    }

    #[test]
    fn a_child_that_says_it_ran_out_of_memory_is_named_the_memory_limit() {
        for said in ["memory allocation of 1048576 bytes failed", "out of memory"] {
            let err = compile_with(&format!("echo '{said}' >&2; exit 3"));
            assert!(
                matches!(err, CompileError::Memory { limit } if limit == limits::MAX_COMPILE_MEMORY_BYTES),
                "{said}: {err:?}"
            );
            assert!(
                err.to_string().contains("MAX_COMPILE_MEMORY_BYTES"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_refusal_is_the_compilers_last_line_made_safe_to_print() {
        let err = compile_with(
            "printf 'warning: ignored\\nerror: not a \\033[31mcomponent\\n' >&2; exit 1",
        );
        let CompileError::Refused(message) = &err else {
            panic!("not a refusal: {err:?}");
        };
        assert!(message.starts_with("error: not a "), "{message}");
        assert!(message.ends_with("component"), "{message}");
        assert!(
            !message.contains('\u{1b}') && !message.contains("warning"),
            "{message}"
        );
    }

    #[test]
    fn any_other_failure_names_the_exit_status_and_what_the_child_said() {
        let err = compile_with("echo 'it broke' >&2; exit 2");
        let CompileError::Child(message) = &err else {
            panic!("not a child failure: {err:?}");
        };
        assert!(
            message.contains("exit status: 2") && message.contains("it broke"),
            "{message}"
        );
        // Exit 1 without a message is no refusal: there is nothing to show.
        let err = compile_with("exit 1");
        assert!(
            matches!(&err, CompileError::Child(m) if m.contains("exit status: 1")),
            "{err:?}"
        );
    }

    #[test]
    fn a_limit_is_clamped_to_the_hard_limit_and_a_bad_resource_is_an_error() {
        // RLIMIT_MSGQUEUE: nothing in a test process uses POSIX message
        // queues. Its soft limit is set back below.
        let resource = libc::RLIMIT_MSGQUEUE;
        let read = || {
            let mut limit = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: a valid resource and pointer.
            assert_eq!(unsafe { libc::getrlimit(resource, &mut limit) }, 0);
            limit
        };
        let before = read();
        // Asked for more than the hard limit: set to the hard limit (an
        // unprivileged process could not raise it), not refused.
        set_limit(resource, u64::MAX).unwrap();
        let after = read();
        // SAFETY: as above; lowering a soft limit is always allowed.
        unsafe { libc::setrlimit(resource, &before) };
        assert_eq!(
            (after.rlim_cur, after.rlim_max),
            (before.rlim_max, before.rlim_max)
        );
        let err = set_limit(0x7fff, 1).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
    }
}
