//! `embedhost.toml`: which backend, which plugin, with which settings.
//!
//! Lookup order: `--config FILE`, else `./embedhost.toml`, else
//! `embedhost.toml` in the user's config directory, else built-in defaults
//! (the built-in BERT plugin with all-MiniLM-L6-v2, fetched on first use),
//! so `embedhost embed "hello"` runs with no file at all.
//!
//! # Invariants
//! - Unknown keys are errors naming the key and the file: a typo never
//!   silently falls back to a default.
//! - Relative paths in a file are relative to that file's directory, so a
//!   config works from any working directory.
//!
//! # Layout
//! - this file: the file's shape (the sections and their defaults) and
//!   the configured model;
//! - `parse`: reading, path resolution and validation;
//! - `build`: what the configuration builds (spawners, supervisor and
//!   worker settings, plugin tables, identities);
//! - `files`: the places on disk it names (model, index and cache
//!   directories) and the checks of the files there.
//!
//! `parse` and `files` use only this file; `build` uses `files` too.
//!
//! ```toml
//! backend = "wasm"
//!
//! [plugin]
//! path = "plugins/my-embedder.wasm"   # omit for the built-in stub
//! # name = "my-embedder"              # or a plugin of the store (`plugin add`)
//! config = { dimension = 384 }        # passed to the plugin's `init`
//!
//! [limits]
//! memory_mb = 1024
//! call_deadline_ms = 30000
//! init_deadline_ms = 60000
//!
//! [cache]
//! dir = "/var/cache/embedhost"        # precompiled plugins and snapshots
//! max_mb = 2048                       # least recently used evicted past it
//!
//! [supervisor]
//! pool_size = 2
//! max_restarts = 3                    # OTP's MaxR ...
//! restart_window_ms = 5000            # ... within MaxT
//! ```

mod build;
mod files;
mod models;
mod parse;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::limits;
use crate::supervisor::RestartType;

/// The config file's name.
pub const FILE_NAME: &str = "embedhost.toml";

/// The built-in plugin used when `plugin.path` is not set: the real model.
pub const DEFAULT_PLUGIN: &str = "bert";

/// Environment variable that overrides the artifact cache directory.
pub const CACHE_DIR_ENV: &str = "EMBEDHOST_CACHE_DIR";

/// Errors reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file `{path}`: {source}")]
    /// The file exists but cannot be read.
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file `{path}`: {message}")]
    /// The file is not a valid config; the message names the key.
    Invalid { path: PathBuf, message: String },
    // --- sandbox, second round (issue 26) ---
    #[error(
        "invalid config file `{path}`: `{key}` = {value} is past its ceiling of {max} ({constant})"
    )]
    /// A value past its ceiling (see [`crate::ceilings`]).
    PastCeiling {
        path: PathBuf,
        key: &'static str,
        value: u64,
        max: u64,
        constant: &'static str,
    },
    #[error("invalid config file `{path}`: {problem}")]
    /// A value the file sets that is out of range or names nothing; the
    /// problem names the key.
    Check {
        path: PathBuf,
        problem: ConfigProblem,
    },
    #[error("invalid config file `{path}`: [plugin] name: {source}")]
    /// `[plugin] name` names no plugin of the store, or its manifest is
    /// unusable.
    StoredPlugin {
        path: PathBuf,
        source: crate::model::plugin::PluginStoreError,
    },
    #[error("no data directory on this platform: set `[index] dir`, {INDEX_DIR_ENV} or --db")]
    /// No index directory is configured and the platform has no data
    /// directory to put one in.
    NoIndexDir,
}

/// What is wrong with a value of a config file, naming its key (the file is
/// named by [`ConfigError::Check`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigProblem {
    #[error("plugin.path: there is no built-in plugin `{name}` (built in: {})", crate::wasm::BUILTIN_PLUGINS.join(", "))]
    /// `plugin.path = "builtin:NAME"` names no plugin of this build.
    UnknownBuiltin { name: String },
    #[error("every value in [limits] must be greater than zero")]
    /// A `[limits]` value is zero.
    LimitsZero,
    #[error("[supervisor] intervals and windows must be greater than zero")]
    /// A `[supervisor]` interval or window is zero.
    SupervisorZero,
    #[error("[native] threads must be greater than zero")]
    /// `[native] threads = 0`.
    NativeThreadsZero,
    #[error(
        "[index] chunk_tokens, batch_chunks, log_interval_ms and max_file_chunks must be greater than zero"
    )]
    /// An `[index]` size or interval is zero.
    IndexZero,
    #[error("[index] chunk_overlap must be smaller than chunk_tokens")]
    /// `[index] chunk_overlap` is not smaller than `chunk_tokens`.
    ChunkOverlap,
    #[error("[serve] sizes, counts and times must be greater than zero (batch_wait_us may be 0)")]
    /// A `[serve]` size, count or time is zero.
    ServeZero,
    #[error("[serve] {key} = {value} is out of range: it must be between {min} and {max}")]
    /// A `[serve]` connection limit out of its range (see
    /// `ServeSection::check_service_limits`).
    ServiceLimits {
        key: &'static str,
        value: u64,
        min: u64,
        max: u64,
    },
    #[error("[nats] tls_cert and tls_key go together")]
    /// Only one of `[nats] tls_cert` and `tls_key` is set.
    TlsPair,
    #[error("[[models]] entry {entry} may not set `{key}` (it may set: {keys})", keys = models::MODEL_KEYS.join(", "))]
    /// A `[[models]]` entry sets what only the main config may.
    ModelKey { entry: usize, key: String },
    #[error("[[models]] entry {entry}: `name` must be a string that is not blank")]
    /// A `[[models]]` entry's `name` is not a name.
    ModelName { entry: usize },
    #[error(
        "the model `{name}` is served twice: give one of its [[models]] entries another `name`"
    )]
    /// Two models served under one name.
    ServedTwice { name: String },
    #[error("[plugin] sha256 must be 64 hex digits, and pins a plugin file (not a built-in one)")]
    /// `[plugin] sha256` is not a sha256, or names no file to pin.
    PluginSha256,
    #[error("[plugin] path and [plugin] name both name the plugin to run: keep one")]
    /// Both `[plugin] path` and `[plugin] name`.
    PluginPathAndName,
    #[error(
        "[plugin] sha256 pins {pinned}, but the stored plugin `{name}` has sha256 {stored} in its manifest: refused"
    )]
    /// `[plugin] sha256` beside `[plugin] name` is not the stored one's.
    StoredPluginPin {
        name: String,
        pinned: String,
        stored: String,
    },
    #[error("[native] grace_ms must be greater than zero")]
    /// `[native] grace_ms = 0`.
    GraceZero,
}

/// Why the native backend cannot be set up from a config: what the machine
/// lacks (this executable's path, the model's files, the ONNX Runtime
/// library), naming it.
#[derive(Debug, thiserror::Error)]
pub enum NativeSetupError {
    #[error("cannot find the embedhost executable: {0}")]
    /// This executable's path is unknown and `[native] executable` is not set.
    Executable(std::io::Error),
    #[error("the onnx engine needs the model's directory")]
    /// The onnx engine was given no model directory.
    NoModelDir,
    #[error("the model directory `{dir}` has no `{file}` (`[model] dir` in the config)")]
    /// A file the onnx engine loads is not in the model's directory.
    MissingFile { dir: PathBuf, file: String },
    #[error(transparent)]
    /// No ONNX Runtime library was found.
    NoLibrary(#[from] crate::native::onnx::LibraryNotFound),
    #[error(
        "the ONNX Runtime library `{0}` does not exist; run `./x setup` or set `[native] onnxruntime`"
    )]
    /// The ONNX Runtime library the config or environment names is not there.
    LibraryMissing(PathBuf),
}

/// Which embedder implementation serves `embedder.*`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// A WebAssembly component run by wasmtime.
    #[default]
    Wasm,
    /// An engine in a supervised child process.
    Native,
}

impl Backend {
    /// The name the config uses.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Wasm => "wasm",
            Backend::Native => "native",
        }
    }
}

/// The native onnx engine's numeric precision (`[native] precision`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// The fp32 graph: the reference's vectors to cosine >= 0.9999.
    #[default]
    Fp32,
    /// The int8 graph (MatMul weights quantized per channel): faster on a
    /// CPU, at cosine >= 0.985 to the reference. An index built with one
    /// precision still searches with the other, a little less exactly.
    Int8,
}

/// `[native]`: the native backend's child processes.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NativeSection {
    /// The engine the child serves: `onnx` (ONNX Runtime) or `stub`.
    pub engine: String,
    /// The ONNX Runtime library (default: see
    /// [`crate::native::onnx::resolve_library`]).
    pub onnxruntime: Option<PathBuf>,
    /// ONNX Runtime's intra-op threads per child (default: the cores divided
    /// among the pool's children, at least one, so a full pool does not
    /// oversubscribe the machine).
    pub threads: Option<usize>,
    /// The executable to run as the child (default: this `embedhost`).
    pub executable: Option<PathBuf>,
    /// Grace period of each stop step (`shutdown`, then SIGTERM), in ms.
    pub grace_ms: u64,
    /// The onnx engine's graph from the model store: `fp32` (default) or
    /// `int8`. Ignored with `[model] dir`, whose `model.onnx` is loaded.
    pub precision: Precision,
    /// Each child's memory ceiling in MiB, enforced by the kernel (default:
    /// [`limits::DEFAULT_CHILD_MEMORY_CEILING`]; 0 for none).
    pub memory_ceiling_mb: Option<u64>,
}

impl Default for NativeSection {
    fn default() -> Self {
        NativeSection {
            engine: "onnx".into(),
            onnxruntime: None,
            threads: None,
            executable: None,
            grace_ms: limits::DEFAULT_CHILD_GRACE.as_millis() as u64,
            precision: Precision::Fp32,
            memory_ceiling_mb: None,
        }
    }
}

/// A plugin config value: TOML strings, numbers and booleans are all passed
/// to the plugin as strings (the contract's table is `string -> string`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Value {
    /// A string.
    String(String),
    /// An integer.
    Integer(i64),
    /// A float.
    Float(f64),
    /// A boolean.
    Bool(bool),
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::String(s) => f.write_str(s),
            Value::Integer(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Bool(b) => write!(f, "{b}"),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
/// `[plugin]`: which WASM plugin, with which table for its `init`.
pub struct PluginSection {
    /// The plugin file; `None` for the built-in stub.
    pub path: Option<PathBuf>,
    /// Passed to the plugin's `init`.
    #[serde(default)]
    pub config: BTreeMap<String, Value>,
    /// Whether a plugin given a model starts its instances from a
    /// pre-initialized snapshot (default: true; see `wasm::snapshot`).
    /// `false` makes every instance load its model in `init`.
    pub snapshot: Option<bool>,
    /// The plugin file's sha256 (64 hex digits): a file that differs is
    /// refused at every load, naming both hashes.
    pub sha256: Option<String>,
    /// Passed to the `init` of the engine behind a `model-plugin`'s encoder
    /// (`builtin:bert`'s keys: `precision`, `pass_tokens`, `max_tokens`).
    #[serde(default)]
    pub encoder: BTreeMap<String, Value>,
    /// A plugin of the store (`embedhost plugin add`), by its name: parsing
    /// sets `path` to its file and `sha256` to its manifest's, so it is
    /// always loaded pinned.
    pub name: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
/// `[limits]`: each WASM instance's memory cap and deadlines.
pub struct LimitsSection {
    /// Cap on each instance's linear memory, in MiB.
    pub memory_mb: u64,
    /// Deadline of one `health` call, or of an `embed` call with no work,
    /// in milliseconds.
    pub call_deadline_ms: u64,
    /// What each KiB of text adds to an `embed` call's deadline, in
    /// milliseconds (see [`limits::CALL_DEADLINE_PER_KIB`]).
    pub call_deadline_per_kib_ms: u64,
    /// Deadline of `init`, in milliseconds.
    pub init_deadline_ms: u64,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            memory_mb: limits::DEFAULT_MEMORY_LIMIT_BYTES / (1024 * 1024),
            call_deadline_ms: limits::DEFAULT_CALL_DEADLINE.as_millis() as u64,
            call_deadline_per_kib_ms: limits::CALL_DEADLINE_PER_KIB.as_millis() as u64,
            init_deadline_ms: limits::DEFAULT_INIT_DEADLINE.as_millis() as u64,
        }
    }
}

/// `[supervisor]`: every key optional; defaults in [`crate::limits`].
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupervisorSection {
    /// Instances in the pool (default: the number of cores).
    pub pool_size: Option<usize>,
    /// `permanent`, `transient` or `temporary`.
    pub restart: Option<RestartType>,
    /// Restarts of one instance allowed within the window (OTP's MaxR).
    pub max_restarts: Option<u32>,
    /// The window, in milliseconds (OTP's MaxT).
    pub restart_window_ms: Option<u64>,
    /// Delay before the second restart within a window; doubles after.
    pub restart_backoff_min_ms: Option<u64>,
    /// Cap on the restart delay.
    pub restart_backoff_max_ms: Option<u64>,
    /// Interval of the health check, in milliseconds.
    pub health_interval_ms: Option<u64>,
    /// Deadline of one health check, in milliseconds.
    pub health_timeout_ms: Option<u64>,
    /// Planned recycle above this memory, in bytes.
    pub recycle_memory_bytes: Option<u64>,
    /// Planned recycle after this many texts.
    pub recycle_processed: Option<u64>,
    /// A text that crashes this many instances alone is poison.
    pub poison_after: Option<u32>,
}

/// `[model]`: the model files an engine loads.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// The model, by the id of its manifest (default: all-minilm-l6-v2). Its
    /// files are fetched into the model store on first use.
    pub id: Option<String>,
    /// A directory with the model's files instead of the store's (for the
    /// onnx engine: `model.onnx` and `tokenizer.json`); nothing is fetched.
    pub dir: Option<PathBuf>,
}

/// `[index]`: the worker's file index.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IndexSection {
    /// Where the index lives (default: `$EMBEDHOST_INDEX_DIR`, else the
    /// platform's data directory, `index/`). `--db` overrides.
    pub dir: Option<PathBuf>,
    /// Files larger than this are skipped (`too_large`).
    pub max_file_bytes: u64,
    /// Tokens per chunk, special tokens excluded (fitted to the model).
    pub chunk_tokens: usize,
    /// Tokens each chunk repeats from the one before.
    pub chunk_overlap: usize,
    /// Chunks per embedder request.
    pub batch_chunks: usize,
    /// Index generated, minified and lock files too (skipped as
    /// `generated` by default, judged by their shape).
    pub include_generated: bool,
    /// How often `index` prints a progress line when stderr is not a
    /// terminal, ms.
    pub log_interval_ms: u64,
    /// Chunks one file may add; the rest of a longer file is not indexed
    /// and `stats` lists the file as cut.
    pub max_file_chunks: usize,
}

impl Default for IndexSection {
    fn default() -> Self {
        IndexSection {
            dir: None,
            max_file_bytes: limits::DEFAULT_MAX_FILE_BYTES,
            chunk_tokens: limits::DEFAULT_CHUNK_TOKENS,
            chunk_overlap: limits::DEFAULT_CHUNK_OVERLAP,
            batch_chunks: limits::DEFAULT_BATCH_CHUNKS,
            include_generated: false,
            log_interval_ms: limits::INDEX_LOG_INTERVAL.as_millis() as u64,
            max_file_chunks: limits::DEFAULT_MAX_FILE_CHUNKS,
        }
    }
}

/// Environment variable naming the index directory.
pub const INDEX_DIR_ENV: &str = "EMBEDHOST_INDEX_DIR";

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
/// `[cache]`: where compiled plugins and snapshots are kept.
pub struct CacheSection {
    /// Where precompiled plugins are kept.
    pub dir: Option<PathBuf>,
    /// The cache's budget in MiB (default:
    /// [`limits::DEFAULT_CACHE_MAX_BYTES`]); least recently used entries
    /// are evicted past it.
    pub max_mb: Option<u64>,
}

/// `[serve]`: the long-running service (`embedhost serve`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeSection {
    /// Address to listen on (default: loopback, port 8080). Any address
    /// other than loopback needs an API key.
    pub listen: Option<String>,
    /// A file holding the API key (first line); `--api-key` and
    /// `EMBEDHOST_API_KEY` override it.
    pub api_key_file: Option<PathBuf>,
    /// Folders an HTTP client may index (`POST /index`); nothing outside
    /// them, after symlinks are resolved (default: none).
    pub index_roots: Vec<PathBuf>,
    /// Largest request body, KiB (413 past it).
    pub max_body_kb: usize,
    /// Inputs per request (400 past it).
    pub max_inputs: usize,
    /// Requests held at once (429 past it).
    pub max_concurrent_requests: usize,
    /// Deadline of a request that sets none, ms.
    pub request_deadline_ms: u64,
    /// Tokens in one merged batch.
    pub max_batch_tokens: usize,
    /// How long a batch waits for more requests, µs.
    pub batch_wait_us: u64,
    /// How long SIGTERM waits for requests in flight, ms.
    pub shutdown_grace_ms: u64,
    /// Keep the index fresh: watch every indexed root (as `index --watch`
    /// does) while serving.
    pub watch: bool,
    /// How long a connection may take to send a request's headers, and how
    /// long an idle keep-alive connection is kept, ms.
    pub header_timeout_ms: u64,
    /// How long a request's body may take to arrive, ms (408 past it).
    pub body_timeout_ms: u64,
    /// Connections open at once, at most (lowered to fit the file
    /// descriptor limit).
    pub max_connections: usize,
}

impl Default for ServeSection {
    fn default() -> Self {
        ServeSection {
            listen: None,
            api_key_file: None,
            index_roots: Vec::new(),
            max_body_kb: limits::DEFAULT_SERVE_MAX_BODY_BYTES / 1024,
            max_inputs: limits::DEFAULT_SERVE_MAX_INPUTS,
            max_concurrent_requests: limits::DEFAULT_SERVE_MAX_CONCURRENT,
            request_deadline_ms: limits::DEFAULT_SERVE_REQUEST_DEADLINE.as_millis() as u64,
            max_batch_tokens: limits::DEFAULT_SERVE_MAX_BATCH_TOKENS,
            batch_wait_us: limits::DEFAULT_SERVE_BATCH_WAIT.as_micros() as u64,
            shutdown_grace_ms: limits::DEFAULT_SERVE_SHUTDOWN_GRACE.as_millis() as u64,
            watch: true,
            header_timeout_ms: limits::DEFAULT_SERVE_HEADER_TIMEOUT.as_millis() as u64,
            body_timeout_ms: limits::DEFAULT_SERVE_BODY_TIMEOUT.as_millis() as u64,
            max_connections: limits::DEFAULT_SERVE_MAX_CONNECTIONS,
        }
    }
}

/// `[nats]`: the NATS server the pool's members and callers share.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsSection {
    /// `serve` joins the pool of its model on this server (`--nats`
    /// overrides).
    pub url: Option<String>,
    /// A `.creds` file (JWT and NKey).
    pub creds: Option<PathBuf>,
    /// CA certificates to trust (PEM).
    pub tls_ca: Option<PathBuf>,
    /// A client certificate (PEM), with `tls_key`, for mutual TLS.
    pub tls_cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    pub tls_key: Option<PathBuf>,
    /// Refuse a connection without TLS.
    pub require_tls: bool,
}

/// `[embedder]`: where embeddings come from.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbedderSection {
    /// A NATS server (`nats://host:4222`) whose pool serves the configured
    /// model: `index`, `search` and `embed` send `embedder.embed` there
    /// instead of starting a pool here.
    pub remote: Option<String>,
}

/// The whole configuration.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    /// `wasm` (default) or `native`: the one line that swaps backends.
    pub backend: Backend,
    #[serde(default)]
    /// `[plugin]`.
    pub plugin: PluginSection,
    #[serde(default)]
    /// `[limits]`.
    pub limits: LimitsSection,
    #[serde(default)]
    /// `[cache]`.
    pub cache: CacheSection,
    #[serde(default)]
    /// `[supervisor]`.
    pub supervisor: SupervisorSection,
    #[serde(default)]
    /// `[native]`.
    pub native: NativeSection,
    #[serde(default)]
    /// `[model]`.
    pub model: ModelSection,
    #[serde(default)]
    /// `[index]`.
    pub index: IndexSection,
    #[serde(default)]
    /// `[serve]`.
    pub serve: ServeSection,
    #[serde(default)]
    /// `[nats]`.
    pub nats: NatsSection,
    #[serde(default)]
    /// `[embedder]`.
    pub embedder: EmbedderSection,
    /// `[[models]]` as written (see [`models`]); made into [`Config::models`].
    #[serde(default, rename = "models")]
    pub model_entries: Vec<toml::Table>,
    /// The models served beside this one, each a whole config
    /// (`[[models]]`).
    #[serde(skip)]
    pub models: Vec<Config>,
    /// The name a `[[models]]` entry gave its model, if any.
    #[serde(skip)]
    pub name: Option<String>,
    /// The file this came from, if any.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

#[cfg(test)]
mod tests;
