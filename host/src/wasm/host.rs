//! What a plugin instance's `Store` holds: its WASI context (the sandbox),
//! its memory limiter, and its log routing.

use std::sync::Arc;

use bytes::Bytes;
use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::bindings::embedhost::embedder::host_log::{self, Level};
use super::bindings::embedhost::embedder::types;
use crate::limits;

/// Largest number of table elements a plugin may grow a table to: tables
/// hold function references, and no legitimate plugin needs millions.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// The per-instance state of a plugin's `Store`.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limiter: MemoryCap,
    plugin: Arc<str>,
}

impl HostState {
    /// A sandboxed state: no environment, no arguments, no network (WASI
    /// denies every socket address and name lookup unless told otherwise,
    /// and we never tell it), stdin closed, stdout and stderr routed to the
    /// log, and no directory but the model's, read-only, if one is given.
    ///
    /// # Errors
    /// The model directory cannot be opened.
    pub fn new(
        plugin: Arc<str>,
        memory_limit: u64,
        model_dir: Option<&std::path::Path>,
    ) -> Result<Self, String> {
        let mut builder = WasiCtxBuilder::new();
        if let Some(dir) = model_dir {
            builder
                .preopened_dir(
                    dir,
                    super::MODEL_DIR_IN_GUEST,
                    wasmtime_wasi::FsPerms::ReadOnly,
                )
                .map_err(|e| format!("cannot open the model directory `{}`: {e}", dir.display()))?;
        }
        let wasi = builder
            .stdout(LogStream {
                plugin: plugin.clone(),
                stream: "stdout",
            })
            .stderr(LogStream {
                plugin: plugin.clone(),
                stream: "stderr",
            })
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        Ok(HostState {
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryCap {
                limit: usize::try_from(memory_limit).unwrap_or(usize::MAX),
                hit: None,
            },
            plugin,
        })
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl types::Host for HostState {}

impl host_log::Host for HostState {
    fn log(&mut self, level: Level, mut message: String) {
        truncate(&mut message, limits::MAX_PLUGIN_LOG_MESSAGE);
        let plugin = &*self.plugin;
        match level {
            Level::Trace => tracing::trace!(target: "embedhost::plugin", plugin, "{message}"),
            Level::Debug => tracing::debug!(target: "embedhost::plugin", plugin, "{message}"),
            Level::Info => tracing::info!(target: "embedhost::plugin", plugin, "{message}"),
            Level::Warn => tracing::warn!(target: "embedhost::plugin", plugin, "{message}"),
            Level::Error => tracing::error!(target: "embedhost::plugin", plugin, "{message}"),
        }
    }
}

fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str(" [truncated]");
    }
}

/// Caps a plugin's linear memory, and remembers that the cap was hit so a
/// trap that follows is reported as what it is.
pub(crate) struct MemoryCap {
    pub(crate) limit: usize,
    /// The size a refused growth asked for.
    pub(crate) hit: Option<usize>,
}

/// The error a refused memory growth traps with.
#[derive(Debug, thiserror::Error)]
#[error("memory limit of {limit} bytes reached (the plugin asked for {desired} bytes)")]
pub struct MemoryCapHit {
    /// The cap, in bytes.
    pub limit: usize,
    /// The size the plugin asked to grow to.
    pub desired: usize,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.hit = Some(desired);
            // An error (not `Ok(false)`) traps at the growth itself, so the
            // plugin cannot swallow the failure and limp on.
            return Err(MemoryCapHit {
                limit: self.limit,
                desired,
            }
            .into());
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// A plugin's stdout or stderr, forwarded to the log line by line.
#[derive(Clone)]
struct LogStream {
    plugin: Arc<str>,
    stream: &'static str,
}

impl IsTerminal for LogStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogStream {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(LogOutput {
            target: self.clone(),
            line: Vec::new(),
        })
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        // Only WASIp3 asks for this; the host links WASIp2 alone.
        Box::new(tokio::io::sink())
    }
}

struct LogOutput {
    target: LogStream,
    line: Vec<u8>,
}

impl LogOutput {
    fn emit(&mut self) {
        let text = String::from_utf8_lossy(&self.line);
        tracing::info!(target: "embedhost::plugin", plugin = &*self.target.plugin, stream = self.target.stream, "{}", text.trim_end());
        self.line.clear();
    }
}

impl OutputStream for LogOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        for &b in bytes.iter() {
            if b == b'\n' {
                self.emit();
            } else if self.line.len() < limits::MAX_PLUGIN_LOG_LINE {
                self.line.push(b);
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LogOutput {
    async fn ready(&mut self) {}
}

impl Drop for LogOutput {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            self.emit();
        }
    }
}
