//! What a plugin instance's `Store` holds: its WASI context (the sandbox),
//! its resource limiter, and its log routing.
//!
//! # Invariants
//! - The memory cap bounds the instance's total: every linear memory (a
//!   component may have many) and every table, counted from their creation.
//!   The same total is the memory figure the supervisor recycles on: it is
//!   measured here, never taken from the plugin's `health` report.
//! - Counts the cap cannot see are bounded too: core instances, memories,
//!   tables, resource handles, and bytes copied out per host call: never
//!   more than [`limits::MAX_HOSTCALL_BYTES`] for a host import, plus twice
//!   the bytes of the texts the host gave the export being called (see
//!   [`allow`]), in any store; only an export's result gets more
//!   ([`bound_hostcalls`]).
//! - Nothing a plugin logs reaches the host's log unescaped or unthrottled:
//!   control characters are escaped (no forged lines), lines are cut at a
//!   named length, and a per-instance token bucket of lines and a
//!   per-plugin one of bytes ([`super::log_budget`], shared by all its
//!   instances and restarts) drop (and count) what exceeds the rate.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::bindings::embedhost::embedder::host_log::{self, Level};
use super::bindings::embedhost::embedder::types;
use super::error::SandboxError;
use crate::limits;

/// Metric: plugin log lines dropped by the rate limit, by plugin.
pub const METRIC_LOG_DROPPED: &str = "plugin_log_dropped_total";

/// The per-instance state of a plugin's `Store`.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limiter: MemoryCap,
    log: Arc<Mutex<LogGate>>,
    /// Bytes the result of the export being called may copy out (see
    /// [`bound_hostcalls`]).
    pub(crate) export_allowance: usize,
    /// Bytes each host import call may copy in (see [`allow`]).
    pub(crate) import_allowance: usize,
    /// The engine the plugin's encoder import forwards to, once started
    /// (see [`super::encoder`]).
    pub(crate) encoder: Option<super::encoder::Linked>,
}

impl HostState {
    /// A sandboxed state: no environment, no arguments, no network (WASI
    /// denies every socket address and name lookup unless told otherwise,
    /// and we never tell it), stdin closed, stdout and stderr routed to the
    /// log, and no directory but the model's, read-only, if one is given.
    ///
    /// # Errors
    /// [`SandboxError`]: the model directory cannot be opened, or holds
    /// what an instance must not see.
    pub fn new(
        plugin: Arc<str>,
        memory_limit: u64,
        model_dir: Option<&std::path::Path>,
    ) -> Result<Self, SandboxError> {
        let log = Arc::new(Mutex::new(LogGate::new(plugin)));
        let mut builder = WasiCtxBuilder::new();
        if let Some(dir) = model_dir {
            refuse_special_files(dir)?;
            builder
                .preopened_dir(
                    dir,
                    super::MODEL_DIR_IN_GUEST,
                    wasmtime_wasi::FsPerms::ReadOnly,
                )
                .map_err(|source| SandboxError::Open {
                    dir: dir.to_path_buf(),
                    source,
                })?;
        }
        let wasi = builder
            .stdout(LogStream {
                log: log.clone(),
                stream: "stdout",
            })
            .stderr(LogStream {
                log: log.clone(),
                stream: "stderr",
            })
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let mut table = ResourceTable::new();
        table.set_max_capacity(limits::MAX_RESOURCE_HANDLES);
        Ok(HostState {
            wasi,
            table,
            limiter: MemoryCap {
                limit: memory_limit,
                used: 0,
                table_elements: 0,
                hit: None,
            },
            log,
            export_allowance: limits::MAX_HOSTCALL_BYTES,
            import_allowance: limits::MAX_HOSTCALL_BYTES,
            encoder: None,
        })
    }

    /// Bytes of linear memory and tables the instance holds, as the host
    /// counts them (never as the plugin reports them).
    pub(crate) fn memory_bytes(&self) -> u64 {
        self.limiter.used
    }

    /// Plugin log lines dropped by the rate limit so far.
    pub(crate) fn dropped_log_lines(&self) -> u64 {
        lock(&self.log).dropped_total
    }
}

impl Drop for HostState {
    fn drop(&mut self) {
        lock(&self.log).report_dropped();
    }
}

/// Refuses a model directory holding, at any depth, anything but files,
/// directories and symbolic links: opening a FIFO (or a device) blocks in
/// the host, on a thread that a cancelled call cannot take back (17
/// cancelled reads of a FIFO under `/model` left 19 threads). Walked at
/// every instance's start (a model has a handful of files), within
/// [`limits::MAX_SNAPSHOT_MODEL_FILES`] entries.
fn refuse_special_files(dir: &std::path::Path) -> Result<(), SandboxError> {
    let mut pending = vec![dir.to_path_buf()];
    let mut seen = 0usize;
    while let Some(current) = pending.pop() {
        let list = |source| SandboxError::List {
            dir: current.clone(),
            source,
        };
        for entry in std::fs::read_dir(&current).map_err(list)? {
            let entry = entry.map_err(list)?;
            seen += 1;
            if seen > limits::MAX_SNAPSHOT_MODEL_FILES {
                return Err(SandboxError::TooManyEntries {
                    dir: dir.to_path_buf(),
                    limit: limits::MAX_SNAPSHOT_MODEL_FILES,
                });
            }
            let kind = entry.file_type().map_err(|source| SandboxError::Kind {
                path: entry.path(),
                source,
            })?;
            if kind.is_dir() {
                pending.push(entry.path());
            } else if !(kind.is_file() || kind.is_symlink()) {
                return Err(SandboxError::Special { path: entry.path() });
            }
        }
    }
    Ok(())
}

/// Bounds what `store` copies out of its plugin: every host import call
/// (`host-log`, a stdout write, a path) gets [`limits::MAX_HOSTCALL_BYTES`],
/// whatever the call being made, and only the result of an export (read
/// when the guest returns to the host) gets the store's
/// [`HostState::export_allowance`] (an `embed`'s vectors, a snapshot's
/// memory).
///
/// wasmtime's hostcall fuel is one value per store, read when a lift
/// starts; a call hook sets it at each crossing: on return from guest code
/// (an export's result is lifted next) to the allowance, on every other
/// crossing (into the guest, into a host function, back) to the bound. So
/// a host call never sees the allowance, however large the declared
/// dimension or the batch. (Before, `embed` set one fuel for its whole
/// call, and one 200 MiB `host-log` call went through with a huge
/// dimension.)
pub(crate) fn bound_hostcalls(store: &mut wasmtime::Store<HostState>) {
    store.set_hostcall_fuel(limits::MAX_HOSTCALL_BYTES);
    store.call_hook(|mut cx, hook| {
        let fuel = match hook {
            wasmtime::CallHook::ReturningFromWasm => cx.data().export_allowance,
            _ => cx.data().import_allowance,
        };
        cx.set_hostcall_fuel(fuel);
        Ok(())
    });
}

/// Sets what the next export call (`embed` of `texts` at `dimension`, or
/// another with no texts) may copy: its result exactly the vectors asked
/// for plus [`limits::MAX_HOSTCALL_BYTES`] (room for an error text; more is
/// refused while still in the plugin's memory), and each host import call
/// [`limits::MAX_HOSTCALL_BYTES`] plus twice the texts' bytes: a
/// `model-plugin` hands the texts the host gave it on to its encoder
/// (twice: with room for what it adds), so an import lifts at most what the
/// host gave plus the bound, never a text the front door let through.
pub(crate) fn allow(state: &mut HostState, texts: &[String], dimension: u32) {
    let expected = (texts.len() as u64).saturating_mul(u64::from(dimension) * 4);
    state.export_allowance = usize::try_from(expected)
        .unwrap_or(usize::MAX)
        .saturating_add(limits::MAX_HOSTCALL_BYTES);
    let given: usize = texts.iter().map(String::len).sum();
    state.import_allowance = given
        .saturating_mul(2)
        .saturating_add(limits::MAX_HOSTCALL_BYTES);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
    fn log(&mut self, level: Level, message: String) {
        let level = match level {
            Level::Trace => tracing::Level::TRACE,
            Level::Debug => tracing::Level::DEBUG,
            Level::Info => tracing::Level::INFO,
            Level::Warn => tracing::Level::WARN,
            Level::Error => tracing::Level::ERROR,
        };
        lock(&self.log).emit(level, "host-log", &message);
    }
}

/// One instance's log: a token bucket of [`limits::PLUGIN_LOG_BURST`]
/// lines refilled at [`limits::PLUGIN_LOG_LINES_PER_SECOND`], shared by
/// `host-log` and the plugin's stdout and stderr.
pub(crate) struct LogGate {
    plugin: Arc<str>,
    /// The plugin's byte budget, shared with its other instances.
    budget: Arc<Mutex<super::log_budget::LogBudget>>,
    tokens: f64,
    refilled: Instant,
    /// Dropped since the last line that got through (reported with it).
    dropped: u64,
    /// Dropped over the instance's life.
    dropped_total: u64,
    /// When dropped lines were last reported.
    reported: Instant,
}

impl LogGate {
    fn new(plugin: Arc<str>) -> Self {
        LogGate {
            budget: super::log_budget::for_plugin(&plugin),
            plugin,
            tokens: f64::from(limits::PLUGIN_LOG_BURST),
            refilled: Instant::now(),
            dropped: 0,
            dropped_total: 0,
            reported: Instant::now(),
        }
    }

    fn admit(&mut self) -> bool {
        let now = Instant::now();
        let rate = f64::from(limits::PLUGIN_LOG_LINES_PER_SECOND);
        self.tokens = (self.tokens + now.duration_since(self.refilled).as_secs_f64() * rate)
            .min(f64::from(limits::PLUGIN_LOG_BURST));
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.dropped += 1;
            self.dropped_total += 1;
            metrics::counter!(METRIC_LOG_DROPPED, "plugin" => self.plugin.to_string()).increment(1);
            false
        }
    }

    fn report_dropped(&mut self) {
        if self.dropped > 0 {
            self.reported = Instant::now();
            tracing::warn!(
                target: "embedhost::plugin",
                plugin = &*self.plugin,
                dropped = self.dropped,
                "plugin log lines dropped: more than {} lines/s per instance, or {} bytes/s (burst {}) or {} bytes/h per plugin",
                limits::PLUGIN_LOG_LINES_PER_SECOND,
                limits::PLUGIN_LOG_BYTES_PER_SECOND,
                limits::PLUGIN_LOG_BYTES_BURST,
                limits::PLUGIN_LOG_BYTES_PER_HOUR
            );
            self.dropped = 0;
        }
    }

    /// Logs one line of the plugin's, sanitized, if the rate allows.
    fn emit(&mut self, level: tracing::Level, stream: &'static str, text: &str) {
        if !self.admit() {
            return;
        }
        if self.reported.elapsed() >= limits::PLUGIN_LOG_DROP_REPORT_INTERVAL {
            self.report_dropped();
        }
        let message = crate::untrusted::sanitize(text, limits::MAX_PLUGIN_LOG_MESSAGE);
        // Charged what the line costs the log: the message, the plugin's
        // name and the line's own fields.
        let cost = message.len() + self.plugin.len() + super::log_budget::LINE_OVERHEAD;
        if !lock(&self.budget).admit(cost, Instant::now()) {
            self.dropped += 1;
            self.dropped_total += 1;
            metrics::counter!(METRIC_LOG_DROPPED, "plugin" => self.plugin.to_string()).increment(1);
            metrics::counter!(super::log_budget::METRIC_LOG_DROPPED_BYTES, "plugin" => self.plugin.to_string())
                .increment(cost as u64);
            return;
        }
        let plugin = &*self.plugin;
        match level {
            tracing::Level::TRACE => {
                tracing::trace!(target: "embedhost::plugin", plugin, stream, "{message}")
            }
            tracing::Level::DEBUG => {
                tracing::debug!(target: "embedhost::plugin", plugin, stream, "{message}")
            }
            tracing::Level::INFO => {
                tracing::info!(target: "embedhost::plugin", plugin, stream, "{message}")
            }
            tracing::Level::WARN => {
                tracing::warn!(target: "embedhost::plugin", plugin, stream, "{message}")
            }
            tracing::Level::ERROR => {
                tracing::error!(target: "embedhost::plugin", plugin, stream, "{message}")
            }
        }
    }
}

/// Caps what a plugin instance may hold: the total of its linear memories
/// and tables, and how many instances, memories and tables it may create.
/// Remembers that the cap was hit, so a trap that follows is reported as
/// what it is.
pub(crate) struct MemoryCap {
    /// The cap on the total, in bytes.
    pub(crate) limit: u64,
    /// Bytes granted so far: every memory's size and every table element
    /// (at [`limits::TABLE_ELEMENT_BYTES`] each), summed over the instance.
    pub(crate) used: u64,
    table_elements: usize,
    /// The total a refused growth asked for.
    pub(crate) hit: Option<u64>,
}

/// The error a refused memory growth traps with.
#[derive(Debug, thiserror::Error)]
#[error("memory limit of {limit} bytes reached (the instance asked for {desired} bytes in all)")]
pub struct MemoryCapHit {
    /// The cap, in bytes.
    pub limit: u64,
    /// The instance's total that the growth would have reached.
    pub desired: u64,
}

impl MemoryCap {
    fn grow(&mut self, bytes: u64) -> wasmtime::Result<bool> {
        let total = self.used.saturating_add(bytes);
        if total > self.limit {
            self.hit = Some(total);
            // An error (not `Ok(false)`) traps at the growth itself, so the
            // plugin cannot swallow the failure and limp on.
            return Err(MemoryCapHit {
                limit: self.limit,
                desired: total,
            }
            .into());
        }
        self.used = total;
        Ok(true)
    }
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Called at each memory's creation (from 0) and at each growth, so
        // the increments sum to the instance's total.
        self.grow(desired.saturating_sub(current) as u64)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let added = desired.saturating_sub(current);
        if self.table_elements.saturating_add(added) > limits::MAX_TABLE_ELEMENTS {
            return Ok(false);
        }
        let granted = self.grow((added as u64).saturating_mul(limits::TABLE_ELEMENT_BYTES))?;
        self.table_elements += added;
        Ok(granted)
    }

    fn instances(&self) -> usize {
        limits::MAX_CORE_INSTANCES
    }

    fn tables(&self) -> usize {
        limits::MAX_TABLES
    }

    fn memories(&self) -> usize {
        limits::MAX_MEMORIES
    }
}

/// A plugin's stdout or stderr, forwarded to the log line by line.
#[derive(Clone)]
struct LogStream {
    log: Arc<Mutex<LogGate>>,
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
        lock(&self.target.log).emit(tracing::Level::INFO, self.target.stream, text.trim_end());
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

#[cfg(test)]
#[path = "host_tests.rs"]
mod tests;
