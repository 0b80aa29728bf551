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
//! ```toml
//! backend = "wasm"
//!
//! [plugin]
//! path = "plugins/my-embedder.wasm"   # omit for the built-in stub
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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::limits;
use crate::supervisor::{RestartType, SupervisorConfig};
use crate::wasm::{InstanceLimits, PluginSource};

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
        let w = crate::worker::WorkerSettings::default();
        IndexSection {
            dir: None,
            max_file_bytes: w.max_file_bytes,
            chunk_tokens: w.chunk.tokens,
            chunk_overlap: w.chunk.overlap,
            batch_chunks: w.batch_chunks,
            include_generated: w.include_generated,
            log_interval_ms: limits::INDEX_LOG_INTERVAL.as_millis() as u64,
            max_file_chunks: w.max_file_chunks,
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
    /// The file this came from, if any.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

impl Config {
    /// Parses `text`, read from `path`; relative paths are resolved against
    /// `path`'s directory.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the file and the offending key.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Invalid {
            path: path.to_path_buf(),
            message: e.to_string().trim().to_string(),
        })?;
        // --- sandbox, second round (issue 26) ---
        if let Some((ceiling, value)) = crate::ceilings::first_past(&config) {
            return Err(ConfigError::PastCeiling {
                path: path.to_path_buf(),
                key: ceiling.key,
                value,
                max: ceiling.max,
                constant: ceiling.constant,
            });
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let builtin = config
            .plugin
            .path
            .as_ref()
            .and_then(|p| p.to_str())
            .and_then(|p| p.strip_prefix("builtin:"))
            .map(str::to_string);
        if let Some(name) = &builtin
            && crate::wasm::PluginSource::builtin(name).is_none()
        {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                message: format!(
                    "plugin.path: there is no built-in plugin `{name}` (built in: {})",
                    crate::wasm::BUILTIN_PLUGINS.join(", ")
                ),
            });
        }
        let plugin_path = if builtin.is_some() {
            &mut None
        } else {
            &mut config.plugin.path
        };
        for relative in [
            plugin_path,
            &mut config.cache.dir,
            &mut config.native.executable,
            &mut config.native.onnxruntime,
            &mut config.model.dir,
            &mut config.index.dir,
            &mut config.serve.api_key_file,
            &mut config.nats.creds,
            &mut config.nats.tls_ca,
            &mut config.nats.tls_cert,
            &mut config.nats.tls_key,
        ] {
            if let Some(p) = relative.as_mut()
                && p.is_relative()
            {
                *p = base.join(&*p);
            }
        }
        let invalid = |message: &str| ConfigError::Invalid {
            path: path.to_path_buf(),
            message: message.into(),
        };
        let limits = &config.limits;
        if [
            limits.memory_mb,
            limits.call_deadline_ms,
            limits.init_deadline_ms,
        ]
        .contains(&0)
        {
            return Err(invalid("every value in [limits] must be greater than zero"));
        }
        let supervisor = &config.supervisor;
        let intervals = [
            supervisor.health_interval_ms,
            supervisor.health_timeout_ms,
            supervisor.restart_window_ms,
        ];
        if intervals.contains(&Some(0)) {
            return Err(invalid(
                "[supervisor] intervals and windows must be greater than zero",
            ));
        }
        if config.native.threads == Some(0) {
            return Err(invalid("[native] threads must be greater than zero"));
        }
        if config.index.chunk_tokens == 0
            || config.index.batch_chunks == 0
            || config.index.log_interval_ms == 0
            || config.index.max_file_chunks == 0
        {
            return Err(invalid(
                "[index] chunk_tokens, batch_chunks, log_interval_ms and max_file_chunks must be greater than zero",
            ));
        }
        if config.index.chunk_overlap >= config.index.chunk_tokens {
            return Err(invalid(
                "[index] chunk_overlap must be smaller than chunk_tokens",
            ));
        }
        for root in &mut config.serve.index_roots {
            if root.is_relative() {
                *root = base.join(&*root);
            }
        }
        let serve = &config.serve;
        if [
            serve.max_body_kb,
            serve.max_inputs,
            serve.max_concurrent_requests,
            serve.max_batch_tokens,
        ]
        .contains(&0)
            || serve.request_deadline_ms == 0
            || serve.shutdown_grace_ms == 0
        {
            return Err(invalid(
                "[serve] sizes, counts and times must be greater than zero (batch_wait_us may be 0)",
            ));
        }
        config
            .serve
            .check_service_limits()
            .map_err(|m| invalid(&m))?;
        if config.nats.tls_cert.is_some() != config.nats.tls_key.is_some() {
            return Err(invalid("[nats] tls_cert and tls_key go together"));
        }
        if config.native.grace_ms == 0 {
            return Err(invalid("[native] grace_ms must be greater than zero"));
        }
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Reads the config file at `path`.
    ///
    /// # Errors
    /// [`ConfigError::Read`] or [`ConfigError::Invalid`], naming the file.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// The configuration by the lookup order in the module docs.
    ///
    /// # Errors
    /// As [`Config::read`], for the file found.
    pub fn discover(explicit: Option<&Path>) -> Result<Self, ConfigError> {
        if let Some(path) = explicit {
            return Self::read(path);
        }
        let local = PathBuf::from(FILE_NAME);
        if local.is_file() {
            return Self::read(&local);
        }
        if let Some(dirs) = project_dirs() {
            let user = dirs.config_dir().join(FILE_NAME);
            if user.is_file() {
                return Self::read(&user);
            }
        }
        Ok(Config::default())
    }

    /// The plugin to load.
    pub fn plugin_source(&self) -> PluginSource {
        match &self.plugin.path {
            Some(path) => PluginSource::from_path(path),
            None => {
                PluginSource::builtin(DEFAULT_PLUGIN).unwrap_or_else(PluginSource::builtin_stub)
            }
        }
    }

    /// The native backend's spawner.
    ///
    /// # Errors
    /// When the path of this executable cannot be found and none is configured.
    pub fn native_spawner(
        &self,
        model_dir: Option<&Path>,
    ) -> Result<crate::native::NativeSpawner, String> {
        let executable = match &self.native.executable {
            Some(exe) => exe.clone(),
            None => std::env::current_exe()
                .map_err(|e| format!("cannot find the embedhost executable: {e}"))?,
        };
        let mut settings = self.plugin_config();
        if self.native.engine == "onnx" {
            let dir = model_dir.ok_or("the onnx engine needs the model's directory")?;
            // Checked here, once, rather than by every child the supervisor
            // would start and restart before giving up.
            let model_file = self.onnx_model_file();
            for file in [model_file, crate::native::onnx::TOKENIZER_FILE] {
                if !dir.join(file).is_file() {
                    return Err(format!(
                        "the model directory `{}` has no `{file}` (`[model] dir` in the config)",
                        dir.display()
                    ));
                }
            }
            let library = crate::native::onnx::resolve_library(self.native.onnxruntime.as_deref())?;
            if !library.exists() {
                return Err(format!(
                    "the ONNX Runtime library `{}` does not exist; run `./x setup` or set `[native] onnxruntime`",
                    library.display()
                ));
            }
            let onnx = crate::native::onnx::OnnxSettings {
                model_dir: dir.to_path_buf(),
                library,
                threads: self.native_threads(),
                max_tokens: None,
                // The id the model store knows, whichever backend serves it,
                // so an index built on one backend stays valid on the other.
                model_id: (!self.plugin.config.contains_key("model_id"))
                    .then(|| self.model_id().to_string()),
                model_file: (model_file != crate::native::onnx::DEFAULT_MODEL_FILE)
                    .then(|| model_file.to_string()),
            };
            settings.extend(onnx.to_pairs());
        }
        Ok(crate::native::NativeSpawner {
            executable,
            engine: self.native.engine.clone(),
            settings,
            init_deadline: Duration::from_millis(self.limits.init_deadline_ms),
            call_deadline: Duration::from_millis(self.limits.call_deadline_ms),
            call_deadline_per_kib: Duration::from_millis(self.limits.call_deadline_per_kib_ms),
            grace: Duration::from_millis(self.native.grace_ms),
            memory_ceiling: match self.native.memory_ceiling_mb {
                None => Some(limits::DEFAULT_CHILD_MEMORY_CEILING),
                Some(0) => None,
                Some(mb) => Some(mb.saturating_mul(1024 * 1024)),
            },
        })
    }

    /// What identifies the configured embedder beyond its model id: the
    /// backend, the plugin (its path with size and modification time, or
    /// the built-in one of this embedhost version), the native engine and
    /// precision, and the plugin's settings. An index records it, and
    /// retries the files an embedder failed on when it changes.
    pub fn embedder_id(&self) -> String {
        let plugin = match self.plugin_source() {
            PluginSource::File(path) => {
                let stamp = std::fs::metadata(&path)
                    .ok()
                    .map(|m| {
                        let mtime = m
                            .modified()
                            .ok()
                            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                            .map_or(0, |d| d.as_nanos());
                        format!("{}:{mtime}", m.len())
                    })
                    .unwrap_or_default();
                format!("{}@{stamp}", path.display())
            }
            PluginSource::Bytes { name, .. } => {
                format!("{name}@embedhost-{}", env!("CARGO_PKG_VERSION"))
            }
        };
        let engine = match self.backend {
            Backend::Wasm => plugin,
            Backend::Native => format!("{}:{:?}", self.native.engine, self.native.precision),
        };
        format!(
            "{}|{engine}|{}|{:?}",
            self.backend.name(),
            self.model_id(),
            self.plugin_config()
        )
    }

    /// The configured model's id.
    pub fn model_id(&self) -> &str {
        self.model
            .id
            .as_deref()
            .unwrap_or(crate::model::DEFAULT_MODEL)
    }

    /// Whether the WASM plugin is given the model's directory (read-only):
    /// for the built-in BERT plugin, and for any plugin when the config
    /// names a model (`[model] id` or `dir`).
    pub fn wasm_needs_model(&self) -> bool {
        self.model.id.is_some()
            || self.model.dir.is_some()
            || matches!(self.plugin_source(), PluginSource::Bytes { ref name, .. } if name == "builtin:bert")
    }

    /// The graph the onnx engine loads from the model's directory.
    pub fn onnx_model_file(&self) -> &'static str {
        match (self.native.precision, &self.model.dir) {
            (Precision::Int8, None) => crate::native::onnx::INT8_MODEL_FILE,
            _ => crate::native::onnx::DEFAULT_MODEL_FILE,
        }
    }

    /// What the configured embedder needs from a model manifest (its files'
    /// `needed_by`): `wasm`, `native` or `native-int8`.
    pub fn model_use(&self) -> &'static str {
        match (self.backend, self.native.precision) {
            (Backend::Wasm, _) => "wasm",
            (Backend::Native, Precision::Fp32) => "native",
            (Backend::Native, Precision::Int8) => "native-int8",
        }
    }

    /// Whether WASM instances start from a pre-initialized snapshot: for a
    /// plugin given a model, unless `[plugin] snapshot = false`.
    pub fn wasm_snapshot(&self) -> bool {
        self.wasm_needs_model() && self.plugin.snapshot != Some(false)
    }

    /// Whether the backend loads model files (the native onnx engine).
    pub fn needs_model_files(&self) -> bool {
        self.backend == Backend::Native && self.native.engine == "onnx"
    }

    /// The model's directory: `[model] dir`, else the model store's
    /// directory for `[model] id`, fetching the files if any is missing.
    ///
    /// # Errors
    /// An unknown model id, or a fetch that failed.
    pub fn ensure_model_dir(
        &self,
        options: &crate::model::FetchOptions,
    ) -> Result<PathBuf, String> {
        if let Some(dir) = &self.model.dir {
            return Ok(dir.clone());
        }
        let (manifest, store) = self.model_store()?;
        store
            .ensure(&manifest, Some(self.model_use()), options)
            .map_err(|e| e.to_string())
    }

    /// Where the model's files are: `[model] dir`, else the model store's
    /// directory for `[model] id`. Nothing is checked or fetched.
    ///
    /// # Errors
    /// An unknown model id, or no place for the model store.
    pub fn model_dir(&self) -> Result<PathBuf, String> {
        match &self.model.dir {
            Some(dir) => Ok(dir.clone()),
            None => self
                .model_store()
                .map(|(manifest, store)| store.dir(&manifest)),
        }
    }

    fn model_store(&self) -> Result<(crate::model::Manifest, crate::model::ModelStore), String> {
        let manifest = crate::model::builtin(self.model_id()).map_err(|e| e.to_string())?;
        let store = crate::model::ModelStore::from_env().map_err(|e| e.to_string())?;
        Ok((manifest, store))
    }

    /// The index directory: `db` (the `--db` option), else `[index] dir`,
    /// else `$EMBEDHOST_INDEX_DIR`, else the platform's data directory.
    ///
    /// # Errors
    /// No data directory on this platform and none configured.
    pub fn index_dir(&self, db: Option<&Path>) -> Result<PathBuf, String> {
        if let Some(dir) = db.or(self.index.dir.as_deref()) {
            return Ok(dir.to_path_buf());
        }
        if let Some(dir) = std::env::var_os(INDEX_DIR_ENV) {
            return Ok(PathBuf::from(dir));
        }
        directories::ProjectDirs::from("", "", "embedhost")
            .map(|d| d.data_dir().join("index"))
            .ok_or_else(|| {
                format!(
                    "no data directory on this platform: set `[index] dir`, {INDEX_DIR_ENV} or --db"
                )
            })
    }

    /// The worker's settings.
    pub fn worker_settings(&self) -> crate::worker::WorkerSettings {
        crate::worker::WorkerSettings {
            chunk: crate::worker::chunk::ChunkSettings {
                tokens: self.index.chunk_tokens,
                overlap: self.index.chunk_overlap,
            },
            max_file_bytes: self.index.max_file_bytes,
            batch_chunks: self.index.batch_chunks,
            in_flight: self.supervisor_config().pool_size + 1,
            include_generated: self.index.include_generated,
            max_file_chunks: self.index.max_file_chunks,
        }
    }

    /// Intra-op threads of each native child.
    pub fn native_threads(&self) -> usize {
        self.native.threads.unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores / self.supervisor_config().pool_size.max(1)).max(1)
        })
    }

    /// The table passed to the plugin's `init` (or the native engine).
    pub fn plugin_config(&self) -> Vec<(String, String)> {
        self.plugin
            .config
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect()
    }

    /// The table a WASM plugin's `init` gets: `[plugin] config`, plus the
    /// configured model's id for a plugin given a model (unless the table
    /// sets `model_id`), so both backends report the same model and an
    /// index stays valid across a backend swap.
    pub fn wasm_plugin_config(&self) -> Vec<(String, String)> {
        let mut config = self.plugin_config();
        if self.wasm_needs_model() && !self.plugin.config.contains_key("model_id") {
            config.push(("model_id".into(), self.model_id().to_string()));
        }
        config
    }

    /// The NATS client's credentials and TLS.
    pub fn nats_options(&self) -> crate::bus::transport::nats::NatsOptions {
        crate::bus::transport::nats::NatsOptions {
            creds: self.nats.creds.clone(),
            tls_ca: self.nats.tls_ca.clone(),
            tls_cert: self.nats.tls_cert.clone().zip(self.nats.tls_key.clone()),
            require_tls: self.nats.require_tls,
        }
    }

    /// Per-instance limits.
    pub fn instance_limits(&self) -> InstanceLimits {
        InstanceLimits {
            memory_bytes: self.limits.memory_mb.saturating_mul(1024 * 1024),
            call_deadline: Duration::from_millis(self.limits.call_deadline_ms),
            call_deadline_per_kib: Duration::from_millis(self.limits.call_deadline_per_kib_ms),
            init_deadline: Duration::from_millis(self.limits.init_deadline_ms),
        }
    }

    /// The supervisor's settings.
    pub fn supervisor_config(&self) -> SupervisorConfig {
        let s = &self.supervisor;
        let mut c = SupervisorConfig::default();
        let ms = Duration::from_millis;
        c.pool_size = s.pool_size.unwrap_or(c.pool_size).max(1);
        c.restart = s.restart.unwrap_or(c.restart);
        c.intensity.max_restarts = s.max_restarts.unwrap_or(c.intensity.max_restarts);
        c.intensity.window = s.restart_window_ms.map_or(c.intensity.window, ms);
        c.intensity.backoff_min = s.restart_backoff_min_ms.map_or(c.intensity.backoff_min, ms);
        c.intensity.backoff_max = s
            .restart_backoff_max_ms
            .map_or(c.intensity.backoff_max, ms)
            .max(c.intensity.backoff_min);
        c.health_interval = s.health_interval_ms.map_or(c.health_interval, ms);
        c.health_timeout = s.health_timeout_ms.map_or(c.health_timeout, ms);
        c.max_memory_bytes = s.recycle_memory_bytes.unwrap_or(c.max_memory_bytes);
        c.max_processed = s.recycle_processed.unwrap_or(c.max_processed);
        c.poison_after = s.poison_after.unwrap_or(c.poison_after).max(1);
        c
    }

    /// The artifact cache directory: `$EMBEDHOST_CACHE_DIR`, else the
    /// config's `[cache] dir`, else the user's cache directory.
    pub fn cache_dir(&self) -> Option<PathBuf> {
        std::env::var_os(CACHE_DIR_ENV)
            .map(PathBuf::from)
            .or_else(|| self.cache.dir.clone())
            .or_else(|| project_dirs().map(|d| d.cache_dir().join("artifacts")))
    }

    /// The artifact cache: [`Config::cache_dir`] within `[cache] max_mb`.
    pub fn artifact_cache(&self) -> Option<crate::wasm::ArtifactCache> {
        let budget = self
            .cache
            .max_mb
            .map_or(limits::DEFAULT_CACHE_MAX_BYTES, |mb| {
                mb.saturating_mul(1024 * 1024)
            });
        self.cache_dir()
            .map(|dir| crate::wasm::ArtifactCache::new(dir).with_max_bytes(budget))
    }
}

fn project_dirs() -> Option<directories::ProjectDirs> {
    directories::ProjectDirs::from("", "", "embedhost")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("", Path::new("/etc/x/embedhost.toml")).unwrap();
        assert_eq!(c.backend, Backend::Wasm);
        assert!(c.plugin.path.is_none());
        assert_eq!(c.instance_limits(), InstanceLimits::default());
    }

    #[test]
    fn relative_paths_follow_the_file_and_values_become_strings() {
        let text = "backend = \"wasm\"\n[plugin]\npath = \"p.wasm\"\nconfig = { dimension = 8, name = \"x\", on = true }\n";
        let c = Config::parse(text, Path::new("/etc/x/embedhost.toml")).unwrap();
        assert_eq!(c.plugin.path.as_deref(), Some(Path::new("/etc/x/p.wasm")));
        assert_eq!(
            c.plugin_config(),
            vec![
                ("dimension".into(), "8".into()),
                ("name".into(), "x".into()),
                ("on".into(), "true".into())
            ]
        );
    }

    #[test]
    fn unknown_keys_name_the_key_and_the_file() {
        let err = Config::parse(
            "[limits]\nmemory_mbs = 5\n",
            Path::new("conf/embedhost.toml"),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("memory_mbs"), "{msg}");
        assert!(msg.contains("conf/embedhost.toml"), "{msg}");
        let err = Config::parse("backnd = \"wasm\"\n", Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("backnd") && err.contains("a.toml"), "{err}");
    }

    #[test]
    fn zero_intervals_are_refused_and_the_native_executable_follows_the_file() {
        let err = Config::parse(
            "[supervisor]\nhealth_interval_ms = 0\n",
            Path::new("a.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("[supervisor]") && err.contains("a.toml"),
            "{err}"
        );
        let c = Config::parse(
            "backend = \"native\"\n[native]\nexecutable = \"bin/eh\"\n",
            Path::new("/etc/x/e.toml"),
        )
        .unwrap();
        assert_eq!(
            c.native.executable.as_deref(),
            Some(Path::new("/etc/x/bin/eh"))
        );
    }

    #[test]
    fn unknown_backend_and_zero_limits_are_refused() {
        let err = Config::parse("backend = \"gpu\"\n", Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("gpu"), "{err}");
        let err = Config::parse("[limits]\nmemory_mb = 0\n", Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("greater than zero"), "{err}");
    }
}
