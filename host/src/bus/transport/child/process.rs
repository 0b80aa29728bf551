//! A child process serving the bus on its stdin/stdout: spawning it,
//! forwarding its stderr, and signalling, killing and reaping it.
//!
//! # Invariants
//! - The child is killed when its [`ChildProcess`] is dropped
//!   (`kill_on_drop`), so no child outlives its owner.
//! - Its stderr is untrusted: each line is cut at
//!   [`limits::MAX_PLUGIN_LOG_LINE`] and escaped before it is logged.
//! - A signal is sent only to an unreaped child, so never to a reused pid.

use std::io;
use std::process::Stdio;
use std::time::Duration;

use futures::StreamExt;
use tokio_util::codec::FramedRead;

use super::Connection;
use crate::limits;

/// A child process serving the bus on its stdin/stdout. Its stderr lines are
/// forwarded to `tracing` with the child's pid, each cut at
/// [`limits::MAX_PLUGIN_LOG_LINE`] and escaped. The child is killed when this
/// value is dropped.
pub struct ChildProcess {
    connection: Connection,
    child: tokio::process::Child,
    pid: u32,
    stderr: tokio::sync::watch::Receiver<StderrState>,
}

/// What the child's stderr has shown so far.
#[derive(Clone, Copy, Debug, Default)]
struct StderrState {
    /// A line equal to the marker given at spawn was seen.
    marker: bool,
    /// Stderr reached its end (the child exited or closed it).
    closed: bool,
}

/// Watches a child's stderr for the marker line given at spawn.
#[derive(Clone, Debug)]
pub struct MarkerWatch(tokio::sync::watch::Receiver<StderrState>);

impl MarkerWatch {
    /// Whether the marker was seen, waiting up to `within` for stderr to
    /// reach its end first (a dying child's last line may arrive after its
    /// stdout closed).
    pub async fn seen(&mut self, within: Duration) -> bool {
        let _ = tokio::time::timeout(within, self.0.wait_for(|s| s.closed || s.marker)).await;
        self.0.borrow().marker
    }
}

impl ChildProcess {
    /// Spawns `command` with piped stdio and connects to it.
    ///
    /// # Errors
    /// The spawn error, if the program cannot be started.
    pub fn spawn(command: tokio::process::Command, name: &str) -> io::Result<Self> {
        Self::spawn_watching(command, name, None)
    }

    /// As [`ChildProcess::spawn`], also watching stderr for a line equal to
    /// `marker` (see [`ChildProcess::marker`]).
    ///
    /// # Errors
    /// The spawn error, if the program cannot be started.
    pub fn spawn_watching(
        mut command: tokio::process::Command,
        name: &str,
        marker: Option<&'static str>,
    ) -> io::Result<Self> {
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn()?;
        let pid = child.id().unwrap_or_default();
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| io::Error::other("child has no stdin"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("child has no stdout"))?;
        let (state, stderr_state) = tokio::sync::watch::channel(StderrState::default());
        if let Some(stderr) = child.stderr.take() {
            let name = name.to_string();
            tokio::spawn(async move {
                let codec =
                    tokio_util::codec::LinesCodec::new_with_max_length(limits::MAX_PLUGIN_LOG_LINE);
                let mut lines = FramedRead::new(stderr, codec);
                while let Some(line) = lines.next().await {
                    let line = match line {
                        Ok(line) => line,
                        // Too long: the codec drops the rest of the line.
                        Err(tokio_util::codec::LinesCodecError::MaxLineLengthExceeded) => {
                            "[a line past limits::MAX_PLUGIN_LOG_LINE was dropped]".into()
                        }
                        Err(tokio_util::codec::LinesCodecError::Io(_)) => break,
                    };
                    if marker.is_some_and(|m| line.trim() == m) {
                        state.send_modify(|s| s.marker = true);
                    }
                    let line = crate::untrusted::sanitize(&line, limits::MAX_PLUGIN_LOG_LINE);
                    tracing::info!(target: "embedhost::child", child = %name, pid, "{line}");
                }
                state.send_modify(|s| s.closed = true);
            });
        } else {
            state.send_modify(|s| s.closed = true);
        }
        let connection = Connection::new(
            &format!("{name} (pid {pid})"),
            stdout,
            stdin,
            limits::MAX_FRAME_BYTES,
        );
        Ok(ChildProcess {
            connection,
            child,
            pid,
            stderr: stderr_state,
        })
    }

    /// Watches for the marker line given to [`ChildProcess::spawn_watching`].
    pub fn marker(&self) -> MarkerWatch {
        MarkerWatch(self.stderr.clone())
    }

    /// The bus connection to the child.
    pub fn connection(&self) -> Connection {
        self.connection.clone()
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Kills the child (SIGKILL) and waits up to
    /// [`crate::limits::CHILD_KILL_REAP_WAIT`] for it to exit (a child in
    /// uninterruptible I/O is left to tokio's orphan reaper).
    ///
    /// # Errors
    /// The error of the kill system call, or `TimedOut` if the child was
    /// not reaped in time.
    pub async fn kill(&mut self) -> io::Result<()> {
        self.child.start_kill()?;
        match self
            .wait_for_exit(crate::limits::CHILD_KILL_REAP_WAIT)
            .await
        {
            Some(_) => Ok(()),
            None => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("child {} was not reaped after SIGKILL", self.pid),
            )),
        }
    }

    /// Sends `signal` to the child, unless it has already been reaped.
    pub fn signal(&mut self, signal: i32) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: `kill` has no memory effects; the pid is our unreaped
            // child, so it cannot have been reused.
            unsafe {
                libc::kill(self.pid as libc::pid_t, signal);
            }
        }
    }

    /// Waits up to `within` for the child to exit; its status if it did.
    pub async fn wait_for_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        tokio::time::timeout(within, self.child.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }
}
