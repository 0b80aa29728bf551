//! Building what serves from a [`Config`]: the supervised pool of the
//! configured backend (fetching the model and loading the plugin or its
//! snapshot first) and the tokenizer the worker and the service count with.
//!
//! The CLI's one-shot commands and `embedhost serve` start pools the same
//! way through here, so a backend behaves alike under both.

use std::path::PathBuf;

use crate::config::{Backend, Config};
use crate::supervisor::SupervisorError;
use crate::supervisor::{ModelInfo, Supervisor};
use crate::tokens::Tokens;
use crate::wasm::WasmError;
use crate::wasm::{PluginSource, SnapshotStatus, WasmEngine, WasmPlugin, WasmSpawner};

/// Why the configured backend could not start, by the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// wasmtime refused its configuration.
    #[error("cannot start wasmtime: {0:#}")]
    Wasmtime(#[source] wasmtime::Error),
    /// This executable's path (for the compiler child) is unknown.
    #[error("cannot find the embedhost executable: {0}")]
    Executable(std::io::Error),
    /// The plugin could not be loaded (read, checked, compiled, linked).
    #[error(transparent)]
    Plugin(#[from] WasmError),
    /// The model's files could not be found or fetched.
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    /// The native backend's settings name files that are not there.
    #[error(transparent)]
    Native(#[from] crate::config::NativeSetupError),
    /// The pool's memory caps do not fit the machine.
    #[error(transparent)]
    Machine(#[from] crate::ceilings::PoolMemoryError),
    /// The pool could not start within its restart intensity.
    #[error(transparent)]
    Pool(#[from] SupervisorError),
    /// The model's tokenizer could not be read.
    #[error(transparent)]
    Tokenizer(#[from] embedhost_text::TextError),
    /// `[model] dir`'s sentence-transformers description cannot be read,
    /// or asks for what the engines cannot run.
    #[error(transparent)]
    Describe(#[from] crate::model::describe::DescribeError),
    /// `[embedder] remote`: the NATS server could not be reached.
    #[error(transparent)]
    Nats(#[from] crate::bus::transport::nats::NatsError),
    /// `[embedder] remote`: no member of the pool answered the handshake.
    #[error("no NATS member serves `{model}` at {url}: {source}")]
    NoMember {
        /// The model asked for.
        model: String,
        /// The server, without credentials.
        url: String,
        /// The handshake's error.
        #[source]
        source: Box<crate::bus::BusError>,
    },
    /// A `model-plugin` needs the built-in engine, which this build lacks.
    #[error("the plugin imports the encoder, but this build has no {BERT} to run it")]
    NoEngine,
    /// A blocking step (loading, fetching) panicked.
    #[error("{step}: {source}")]
    Task {
        /// What was being done.
        step: &'static str,
        /// The panic.
        source: tokio::task::JoinError,
    },
}

/// The wasmtime engine, with the configured artifact cache.
///
/// # Errors
/// Why wasmtime could not start.
pub fn engine_for(config: &Config) -> Result<WasmEngine, LaunchError> {
    let engine = WasmEngine::new(config.artifact_cache()).map_err(LaunchError::Wasmtime)?;
    // Plugin code is compiled in a child of this binary, bounded in memory
    // and time (`wasm::compile`).
    let exe = std::env::current_exe().map_err(LaunchError::Executable)?;
    Ok(engine.with_compiler(exe))
}

/// Starts the configured backend's supervised pool, of at most `max_pool`
/// instances, with the WASM plugin's snapshot status.
pub async fn start_backend(
    config: &Config,
    source: &PluginSource,
    max_pool: Option<usize>,
) -> Result<(Supervisor, Option<SnapshotStatus>), LaunchError> {
    let mut supervision = config.supervisor_config();
    // The configured pool is checked, whatever this command starts of it.
    supervision.pool_size = fit_machine(config, supervision.pool_size)?;
    if let Some(max) = max_pool {
        supervision.pool_size = supervision.pool_size.min(max);
    }
    match config.backend {
        Backend::Wasm => {
            let engine = engine_for(config)?;
            let plugin = load_wasm(config, &engine, source).await?;
            // A model-plugin's own snapshot (its engine has its own).
            let snapshot = plugin.snapshot().clone();
            let spawner = WasmSpawner {
                config: wasm_init_table(config, &plugin),
                plugin,
                limits: config.instance_limits(),
            };
            Ok(Supervisor::start(spawner, supervision)
                .await
                .map(|s| (s, Some(snapshot)))?)
        }
        Backend::Native => {
            let model_dir = if config.needs_model_files() {
                Some(fetch_model(config).await?)
            } else {
                None
            };
            let spawner = config.native_spawner(model_dir.as_deref())?;
            Ok(Supervisor::start(spawner, supervision)
                .await
                .map(|s| (s, None))?)
        }
    }
}

/// Loads the WASM plugin of `source` as `config` asks: a `model-plugin`
/// linked to the built-in engine over the configured model (see
/// [`crate::wasm::encoder`]); another plugin given a model as a snapshot
/// (or with the model directory); any other plain.
///
/// # Errors
/// The model cannot be fetched, or the plugin (or the engine) cannot be
/// loaded.
pub async fn load_wasm(
    config: &Config,
    engine: &WasmEngine,
    source: &PluginSource,
) -> Result<WasmPlugin, LaunchError> {
    let is_engine = matches!(source, PluginSource::Bytes { name, .. } if name == BERT);
    if !is_engine && crate::wasm::encoder::wants_encoder(source)? {
        let encoder = encoder_for(config, engine).await?;
        if config.plugin.snapshot == Some(false) {
            return Ok(load_blocking(engine, source).await??.with_encoder(encoder));
        }
        let (engine, source, limits) = (engine.clone(), source.clone(), config.instance_limits());
        let table = config.plugin_config();
        return Ok(tokio::task::spawn_blocking(move || {
            WasmPlugin::load_encoded_snapshot(&engine, &source, encoder, limits, &table)
        })
        .await
        .map_err(|source| LaunchError::Task {
            step: "plugin load",
            source,
        })??);
    }
    if config.wasm_needs_model() {
        return load_model_plugin(config, engine, source, &config.wasm_plugin_config()).await;
    }
    Ok(load_blocking(engine, source).await??)
}

/// `plugin`, its encoder import linked to the built-in engine over the
/// configured model if it has one (else `plugin` as it is).
///
/// # Errors
/// The model cannot be fetched, or the engine cannot be loaded.
pub async fn with_encoder(
    config: &Config,
    engine: &WasmEngine,
    plugin: WasmPlugin,
) -> Result<WasmPlugin, LaunchError> {
    if !plugin.imports_encoder() {
        return Ok(plugin);
    }
    Ok(plugin.with_encoder(encoder_for(config, engine).await?))
}

/// The built-in engine over the configured model (its snapshot unless
/// `[plugin] snapshot = false`), as an encoder.
async fn encoder_for(
    config: &Config,
    engine: &WasmEngine,
) -> Result<crate::wasm::Encoder, LaunchError> {
    let bert =
        PluginSource::builtin(BERT.trim_start_matches("builtin:")).ok_or(LaunchError::NoEngine)?;
    let settings = config.encoder_config();
    let model = load_model_plugin(config, engine, &bert, &settings).await?;
    crate::wasm::Encoder::new(model, settings).map_err(|reason| {
        LaunchError::Plugin(WasmError::WrongWorld {
            name: BERT.to_string(),
            reason,
        })
    })
}

/// The built-in engine, which the encoder import runs.
const BERT: &str = "builtin:bert";

/// Loads `source` over the configured model with `settings`: as a
/// snapshot (`init` already run) unless `[plugin] snapshot = false`.
async fn load_model_plugin(
    config: &Config,
    engine: &WasmEngine,
    source: &PluginSource,
    settings: &[(String, String)],
) -> Result<WasmPlugin, LaunchError> {
    let dir = fetch_model(config).await?;
    if config.plugin.snapshot == Some(false) {
        return Ok(load_blocking(engine, source).await??.with_model_dir(dir));
    }
    let (engine, source, limits) = (engine.clone(), source.clone(), config.instance_limits());
    let settings = settings.to_vec();
    Ok(tokio::task::spawn_blocking(move || {
        WasmPlugin::load_snapshot(&engine, &source, &dir, limits, &settings)
    })
    .await
    .map_err(|source| LaunchError::Task {
        step: "plugin load",
        source,
    })??)
}

/// The table `plugin`'s `init` gets: `[plugin] config` alone for a
/// `model-plugin` (its encoder gets the model's settings), else
/// [`Config::wasm_plugin_config`].
pub fn wasm_init_table(config: &Config, plugin: &WasmPlugin) -> Vec<(String, String)> {
    match plugin.imports_encoder() {
        true => config.plugin_config(),
        false => config.wasm_plugin_config(),
    }
}

/// The pool size whose memory caps fit the machine (see
/// [`crate::ceilings::fit_pool`]): each WASM instance's `memory_mb`, or each
/// native child's memory ceiling.
fn fit_machine(config: &Config, pool: usize) -> Result<usize, crate::ceilings::PoolMemoryError> {
    match (
        instance_memory(config),
        crate::ceilings::machine_memory_bytes(),
    ) {
        (Some(per_instance), Some(machine)) => crate::ceilings::fit_pool(
            pool,
            config.supervisor.pool_size.is_some(),
            per_instance,
            machine,
        ),
        _ => Ok(pool),
    }
}

/// The memory cap of each instance of `config`'s pool: a WASM instance's
/// `memory_mb`, or a native child's memory ceiling (none if unbounded).
pub fn instance_memory(config: &Config) -> Option<u64> {
    match config.backend {
        Backend::Wasm => Some(config.instance_limits().memory_bytes),
        Backend::Native => match config.native.memory_ceiling_mb {
            None => Some(crate::limits::DEFAULT_CHILD_MEMORY_CEILING),
            Some(0) => None,
            Some(mb) => Some(mb.saturating_mul(1024 * 1024)),
        },
    }
}

/// A fetch from the command line: progress bars, offline if asked or if
/// `EMBEDHOST_OFFLINE` says so.
pub fn fetch_options(offline: bool) -> crate::model::FetchOptions {
    crate::model::FetchOptions {
        offline: offline || crate::model::offline_from_env(),
        progress: true,
        python: None,
        http: crate::model::fetch::HttpTimeouts::default(),
    }
}

/// The configured model's directory, fetched and verified first if a file
/// is missing (the main job's check on first use).
pub async fn fetch_model(config: &Config) -> Result<PathBuf, LaunchError> {
    let config = config.clone();
    tokio::task::spawn_blocking(move || config.ensure_model_dir(&fetch_options(false)))
        .await
        .map_err(|source| LaunchError::Task {
            step: "model fetch",
            source,
        })?
        .map_err(LaunchError::Model)
}

/// How files are cut: by the model's tokenizer when the config names a
/// model (its `tokenizer.json`), else by words.
pub fn tokens(config: &Config, max_input_tokens: usize) -> Result<Tokens, LaunchError> {
    if !counts_with_model(config) {
        return Ok(Tokens::Words);
    }
    let dir = config.model_dir()?;
    Ok(Tokens::from_model_dir(&dir, max_input_tokens)?)
}

/// Whether the front door counts with the configured model's tokenizer:
/// the backend reads the model's files, or the plugin is a `model-plugin`
/// (its encoder runs the model, with or without a `[model]` section).
fn counts_with_model(config: &Config) -> bool {
    config.uses_model_files()
        || (config.backend == Backend::Wasm
            && crate::wasm::encoder::wants_encoder(&config.plugin_source()).unwrap_or(false))
}

/// How a caller of a remote pool serving `info`'s model counts tokens: by
/// the model the config names, if it names one; else by the tokenizer of
/// the built-in model of that id when the store holds it (counted nothing
/// is fetched for it); else by words (a model whose tokenizer this
/// machine does not have, such as the stub).
///
/// # Errors
/// The named model's tokenizer cannot be read.
pub fn remote_tokens(config: &Config, info: &ModelInfo) -> Result<Tokens, LaunchError> {
    let window = info.max_input_tokens as usize;
    if config.model.id.is_some() || config.model.dir.is_some() {
        return tokens(config, window);
    }
    let stored = crate::model::manifest(info.model_id.as_ref())
        .ok()
        .zip(crate::model::ModelStore::from_env().ok())
        .map(|(manifest, store)| store.dir(&manifest))
        .filter(|dir| dir.join(crate::tokens::TOKENIZER_FILE).is_file());
    Ok(match stored {
        Some(dir) => Tokens::from_model_dir(&dir, window)?,
        None => Tokens::Words,
    })
}

/// The pool on the NATS server `[embedder] remote` names, if the config
/// names one: a bus to it, and the model its members serve (asked with
/// `embedder.handshake`, retried while the pool has no member yet).
///
/// # Errors
/// Why the server or the pool could not be reached.
pub async fn remote_embedder(
    config: &Config,
) -> Result<Option<(crate::bus::Bus, crate::backend::ModelInfo)>, LaunchError> {
    use crate::bus::transport::nats;
    let Some(url) = &config.embedder.remote else {
        return Ok(None);
    };
    let client = nats::connect(url, &config.nats_options(), "embedhost").await?;
    let transport = nats::Nats::new(client, config.model_id()).await?;
    let bus = crate::bus::Bus::new(transport);
    let options = crate::bus::SendOptions::default()
        .retries(crate::limits::NATS_HANDSHAKE_RETRIES)
        .deadline(crate::limits::NATS_HANDSHAKE_PATIENCE);
    let shown = nats::split_credentials(url).0;
    let hello = bus
        .send::<crate::messages::EmbedderHandshake>(crate::bus::Empty {}, options)
        .await
        .map_err(|source| LaunchError::NoMember {
            model: config.model_id().to_string(),
            url: shown.clone(),
            source: Box::new(source),
        })?;
    tracing::info!(url = %shown, model = %hello.model.model_id, "using the pool over NATS");
    Ok(Some((bus, hello.model)))
}

/// [`WasmPlugin::load`] on a blocking thread: a compile (in its bounded
/// child, up to `limits::MAX_COMPILE_TIME`) never holds an async worker, so
/// the service still sees SIGTERM while a plugin compiles.
async fn load_blocking(
    engine: &crate::wasm::WasmEngine,
    source: &crate::wasm::PluginSource,
) -> Result<Result<WasmPlugin, crate::wasm::WasmError>, LaunchError> {
    let (engine, source) = (engine.clone(), source.clone());
    tokio::task::spawn_blocking(move || WasmPlugin::load(&engine, &source))
        .await
        .map_err(|source| LaunchError::Task {
            step: "plugin load",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `model-plugin` with no `[model]` section counts with the default
    /// model's tokenizer (its encoder's), not by words as a plain plugin
    /// without a model does.
    #[test]
    fn a_model_plugin_counts_with_its_encoders_model() {
        let config = |plugin: &str| {
            let text = format!("[plugin]\npath = {plugin:?}\n");
            Config::parse(&text, std::path::Path::new("/nonexistent/embedhost.toml")).unwrap()
        };
        assert!(counts_with_model(&config(crate::plugins::ENCODER_PROBE)));
        assert!(!counts_with_model(&config(crate::plugins::STUB)));
    }

    #[test]
    fn a_native_pool_is_fitted_to_its_childrens_ceiling_and_unbounded_children_are_not() {
        let mut config = Config {
            backend: Backend::Native,
            ..Config::default()
        };
        config.native.memory_ceiling_mb = Some(0);
        // No ceiling (0): nothing to fit, whatever the pool.
        assert_eq!(fit_machine(&config, 100_000), Ok(100_000));
        let Some(machine) = crate::ceilings::machine_memory_bytes() else {
            return;
        };
        // Two explicit children of a whole machine each: refused, saying so.
        config.native.memory_ceiling_mb = Some(machine / (1024 * 1024));
        config.supervisor.pool_size = Some(2);
        let err = fit_machine(&config, 2).unwrap_err().to_string();
        assert!(
            err.starts_with("2 instances of") && err.contains("pool_size"),
            "{err}"
        );
        config.native.memory_ceiling_mb = Some(1);
        assert_eq!(fit_machine(&config, 2), Ok(2));
    }
}
