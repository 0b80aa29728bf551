//! The `embedhost` command line.
//!
//! Every command that embeds goes through the bus: the command is a bus
//! client, the embedder a bus peer (in-process for WASM), exactly as the
//! worker will use it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::bus::transport::InProcess;
use crate::bus::{Bus, SendOptions};
use crate::config::{Backend, Config};
use crate::messages::{EmbedRequest, EmbedderEmbed};
use crate::supervisor::Supervisor;
use crate::wasm::{ArtifactCache, PluginSource, WasmEmbedder, WasmEngine, WasmPlugin, WasmSpawner};

/// Run text-embedding plugins under supervision.
#[derive(Debug, Parser)]
#[command(name = "embedhost", version, about)]
pub struct Cli {
    /// The config file (default: ./embedhost.toml, then the user's config
    /// directory, then built-in defaults).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Log more (-v: info, -vv: debug, -vvv: trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Embed texts; prints one JSON object per text.
    Embed(EmbedArgs),
    /// Work with plugin files.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Serve the bus on stdin/stdout (started by the host; not for people).
    #[command(hide = true)]
    Child(ChildArgs),
}

#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// The plugin to use instead of the configured one.
    #[arg(long, value_name = "PATH.wasm")]
    pub plugin: Option<PathBuf>,
    /// Embed the texts as search queries rather than documents.
    #[arg(long)]
    pub query: bool,
    /// Print the instances' status (incarnation, uptime, requests served,
    /// memory, restarts by reason) as JSON on stderr afterwards.
    #[arg(long)]
    pub stats: bool,
    /// The texts.
    #[arg(required = true)]
    pub texts: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Load a plugin, check it against the contract, call `init`, print its
    /// model info.
    Check {
        /// The plugin file.
        path: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct ChildArgs {
    /// The engine to serve.
    #[arg(long, default_value = "stub")]
    pub engine: String,
    /// An engine setting, `key=value` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub settings: Vec<String>,
}

/// Runs the command line and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.verbose);
    // A child serves frames on one thread: its handlers hand CPU-bound work
    // to blocking threads, and one thread saves a cross-thread wake-up per
    // frame, the largest cost of a round trip through a child.
    let builder = match cli.command {
        Command::Child(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    };
    let runtime = match builder {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Logs go to stderr: stdout carries results (and, for `child`, frames).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Embed(args) => embed(cli.config, args).await,
        Command::Plugin(PluginCommand::Check { path }) => check(cli.config, path).await,
        Command::Child(args) => child(args).await,
    }
}

fn engine_for(config: &Config) -> Result<WasmEngine, String> {
    WasmEngine::new(config.cache_dir().map(ArtifactCache::new))
        .map_err(|e| format!("cannot start wasmtime: {e:#}"))
}

async fn embed(config_path: Option<PathBuf>, args: EmbedArgs) -> Result<(), String> {
    let config = Config::discover(config_path.as_deref()).map_err(|e| e.to_string())?;
    let source = match args.plugin {
        Some(path) => PluginSource::File(path),
        None => config.plugin_source(),
    };
    if config.backend == Backend::Native && matches!(source, PluginSource::File(_)) {
        return Err("`--plugin` and `plugin.path` name a WASM plugin, but the config selects backend = \"native\"".into());
    }
    let limits = config.instance_limits();
    let mut supervision = config.supervisor_config();
    // One command, one batch: more instances than texts would only start idle.
    supervision.pool_size = supervision.pool_size.min(args.texts.len().max(1));
    let supervisor = match config.backend {
        Backend::Wasm => {
            let engine = engine_for(&config)?;
            let plugin = WasmPlugin::load(&engine, &source).map_err(|e| e.to_string())?;
            let spawner = WasmSpawner {
                plugin,
                limits,
                config: config.plugin_config(),
            };
            Supervisor::start(spawner, supervision).await
        }
        Backend::Native => Supervisor::start(config.native_spawner()?, supervision).await,
    }
    .map_err(|e| e.to_string())?;
    let bus = Bus::new(InProcess::named(
        "embedder",
        crate::embedder::supervised_router(supervisor.clone()),
    ));
    let texts = args.texts;
    let options = SendOptions::default()
        .timeout(crate::limits::DEFAULT_REQUEST_TIMEOUT.max(limits.call_deadline));
    let response = bus
        .send::<EmbedderEmbed>(
            EmbedRequest {
                texts: texts.clone(),
                is_query: args.query,
            },
            options,
        )
        .await;
    if args.stats {
        let status = serde_json::to_string(&supervisor.status()).unwrap_or_default();
        eprintln!("{status}");
    }
    let response = response.map_err(|e| e.to_string())?;
    let rows = response
        .per_text(texts.len())
        .ok_or("the embedder's answer does not match the request")?;
    let mut out = String::new();
    let mut failures = 0;
    for (text, row) in texts.iter().zip(rows) {
        let line = match row {
            Ok(vector) => {
                serde_json::json!({ "text": text, "dimension": vector.len(), "vector": vector })
            }
            Err(failed) => {
                failures += 1;
                serde_json::json!({ "text": text, "error": failed.reason })
            }
        };
        out.push_str(&line.to_string());
        out.push('\n');
    }
    print!("{out}");
    match failures {
        0 => Ok(()),
        n => Err(format!(
            "{n} of {} texts could not be embedded",
            texts.len()
        )),
    }
}

async fn check(config_path: Option<PathBuf>, path: PathBuf) -> Result<(), String> {
    let config = Config::discover(config_path.as_deref()).map_err(|e| e.to_string())?;
    let engine = engine_for(&config)?;
    let plugin =
        WasmPlugin::load(&engine, &PluginSource::File(path.clone())).map_err(|e| e.to_string())?;
    let embedder = WasmEmbedder::start(plugin, config.instance_limits(), config.plugin_config())
        .await
        .map_err(|e| format!("`{}` failed to initialise: {e}", path.display()))?;
    let info = embedder.model_info();
    let probe = embedder
        .embed(vec!["embedhost plugin check".into()], false, None)
        .await
        .map_err(|e| {
            format!(
                "`{}` initialised but failed a test embedding: {e}",
                path.display()
            )
        })?;
    println!(
        "ok: {} implements {}",
        path.display(),
        crate::wasm::EXPORTED_INTERFACE
    );
    println!("model id:         {}", info.model_id);
    println!("dimension:        {}", info.dimension);
    println!("max input tokens: {}", info.max_input_tokens);
    println!("normalized:       {}", info.normalized);
    println!(
        "test embedding:   {} vector(s) of dimension {}",
        probe.len(),
        probe.dimension()
    );
    Ok(())
}

async fn child(args: ChildArgs) -> Result<(), String> {
    if args.engine != "stub" {
        return Err(format!(
            "unknown child engine `{}`; this build serves `stub`",
            args.engine
        ));
    }
    let mut pairs = Vec::new();
    for setting in &args.settings {
        let (key, value) = setting
            .split_once('=')
            .ok_or_else(|| format!("`--set {setting}` is not of the form KEY=VALUE"))?;
        pairs.push((key, value));
    }
    let config = embedhost_stub_engine::StubConfig::from_pairs(pairs).map_err(|e| e.to_string())?;
    let stop = tokio_util::sync::CancellationToken::new();
    let router = crate::embedder::native_stub_router(config, stop.clone());
    tokio::select! {
        served = crate::bus::transport::child::serve_stdio(router, crate::limits::MAX_FRAME_BYTES) => {
            served.map_err(|e| format!("child transport: {e}"))
        }
        () = stop.cancelled() => {
            // Let the reply to `shutdown` reach the pipe before exiting.
            tokio::time::sleep(crate::limits::CHILD_SHUTDOWN_FLUSH).await;
            Ok(())
        }
    }
}
