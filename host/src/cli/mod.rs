//! The `embedhost` command line.
//!
//! Every command that embeds goes through the bus: the command is a bus
//! client, the embedder a bus peer (in-process for WASM), exactly as the
//! worker will use it.
//!
//! The clap definitions are in `args.rs`; each command in its own file:
//! `embed.rs`, `status.rs`, `model.rs`, `plugin.rs`, `plugin_new.rs` (`plugin new`), `index.rs` (`index`,
//! `search`), `stats.rs` (`stats`, `forget`), and how a result is shown in `show.rs`.
//! Here: the entry point, the runtime, finding a running service, and
//! stdout that tolerates a closed pipe.

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

mod args;
mod embed;
mod index;
mod model;
mod plugin;
mod plugin_new;
pub mod show;
mod stats;
mod status;

use std::process::ExitCode;

use clap::Parser;

use crate::config::Config;
pub use args::{
    ChildArgs, Cli, Command, EmbedArgs, ModelCommand, PluginCommand, PluginLang, PluginNewArgs,
    PluginTestArgs, ServeArgs, StatusArgs,
};

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
            // Escaped at this one edge: any part of a message may quote
            // what came from outside (limits::MAX_SHOWN_ERROR_LINE a line).
            let shown =
                crate::untrusted::sanitize_lines(&message, crate::limits::MAX_SHOWN_ERROR_LINE);
            eprintln!("error: {shown}");
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
        Command::Embed(args) => embed::embed(cli.config, args).await,
        Command::Plugin(PluginCommand::Check { path }) => plugin::check(cli.config, path).await,
        Command::Plugin(PluginCommand::Test(args)) => plugin::plugin_test(cli.config, args).await,
        Command::Plugin(PluginCommand::New(args)) => plugin_new::plugin_new(args),
        Command::Plugin(command) => plugin::store(cli.config, command).await,
        Command::Status(args) => status::status(cli.config, args).await,
        Command::Model(command) => model::model(cli.config, command).await,
        Command::Index(args) => index::index(cli.config, args).await,
        Command::Search(args) => index::search(cli.config, args).await,
        Command::Stats(args) => stats::stats(cli.config, args).await,
        Command::Forget(args) => stats::forget(cli.config, args).await,
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
    crate::native::run_child(&args.engine, key_values(&args.settings)?)
        .await
        .map_err(|e| e.to_string())
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
