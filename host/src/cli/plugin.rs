//! `embedhost plugin check|test|add|list|remove`: a plugin loaded and
//! checked against the contract, the conformance suite run against it, and
//! the plugins of the store ([`crate::model::plugin`]).
//!
//! # Invariants
//! - `plugin test` exits with 1 if any check fails.
//! - `plugin add` stores only bytes the host's own load accepted (the
//!   header and size bounds, compiled, linked against the contract), and
//!   needs no model to do so: the plugin is not instantiated.
//! - What the store or a server says is escaped before a terminal sees it.

use std::path::PathBuf;

use super::{PluginCommand, PluginTestArgs, key_values};
use crate::config::Config;
use crate::model::plugin::{self as plugin_store, AddPlugin};
use crate::model::{FileState, ModelStore};
use crate::wasm::{PluginSource, WasmEmbedder, WasmPlugin};

pub(super) async fn check(config_path: Option<PathBuf>, path: PathBuf) -> Result<(), String> {
    let config = Config::discover(config_path.as_deref()).map_err(|e| e.to_string())?;
    let engine = crate::launch::engine_for(&config).map_err(|e| e.to_string())?;
    let plugin =
        WasmPlugin::load(&engine, &PluginSource::File(path.clone())).map_err(|e| e.to_string())?;
    let plugin_contract = plugin.contract_version();
    let plugin = crate::launch::with_encoder(&config, &engine, plugin)
        .await
        .map_err(|e| e.to_string())?;
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
    if let Some(built_for) = plugin_contract {
        outln!(
            "contract:         built for embedhost:embedder@{built_for}; this host speaks {} and runs it",
            crate::wasm::contract::HOST_CONTRACT
        );
    }
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

pub(super) async fn plugin_test(
    config_path: Option<PathBuf>,
    args: PluginTestArgs,
) -> Result<(), String> {
    let mut config = Config::discover(config_path.as_deref()).map_err(|e| e.to_string())?;
    // The plugin under test takes the configured one's place, as `embed
    // --plugin` does: a model plugin (or a config naming a model) gets the
    // model's directory.
    config.plugin.replace_path(args.path.clone());
    let engine = crate::launch::engine_for(&config).map_err(|e| e.to_string())?;
    let source = config.plugin_source();
    let loading = std::time::Instant::now();
    let plugin = WasmPlugin::load(&engine, &source).map_err(|e| e.to_string())?;
    let loaded = loading.elapsed();
    if plugin.imports_encoder() {
        config.model.dir = args.model_dir.clone().or(config.model.dir.take());
    }
    let model_dir = match args.model_dir {
        _ if plugin.imports_encoder() => None,
        Some(dir) => Some(dir),
        None if config.wasm_needs_model() => Some(
            crate::launch::fetch_model(&config)
                .await
                .map_err(|e| e.to_string())?,
        ),
        None => None,
    };
    let mut plugin = crate::launch::with_encoder(&config, &engine, plugin)
        .await
        .map_err(|e| e.to_string())?;
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
    let starts = match options.throughput_time.is_zero() {
        true => None,
        false => start_times(&engine, &source, &plugin, &options, loaded).await,
    };
    let mut report = crate::conformance::run(plugin, options).await;
    report.starts = starts;
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

/// How long `plugin` (loaded from `source` in `loaded`) takes to be ready:
/// cold, with `init` in full, and from a snapshot as `embedhost` would
/// make one (a `model-plugin` with its encoder linked; a plugin given a
/// model over its directory), or `None` if it does not start.
async fn start_times(
    engine: &crate::wasm::WasmEngine,
    source: &crate::wasm::PluginSource,
    plugin: &WasmPlugin,
    options: &crate::conformance::Options,
    loaded: std::time::Duration,
) -> Option<crate::conformance::Starts> {
    let at = std::time::Instant::now();
    drop(
        WasmEmbedder::start(plugin.clone(), options.limits, options.config.clone())
            .await
            .ok()?,
    );
    let cold_ms = (loaded + at.elapsed()).as_secs_f64() * 1e3;
    let plain_ms = crate::conformance::median_start(plugin, options).await?;
    let (engine, source, limits, table) = (
        engine.clone(),
        source.clone(),
        options.limits,
        options.config.clone(),
    );
    let encoder = plugin.encoder().cloned();
    let dir = plugin.model_dir().map(std::path::Path::to_path_buf);
    let snapshot = tokio::task::spawn_blocking(move || match (encoder, dir) {
        (Some(encoder), _) => {
            WasmPlugin::load_encoded_snapshot(&engine, &source, encoder, limits, &table).ok()
        }
        (None, Some(dir)) => WasmPlugin::load_snapshot(&engine, &source, &dir, limits, &table).ok(),
        (None, None) => None,
    })
    .await
    .ok()
    .flatten()
    .filter(|p| matches!(p.snapshot(), crate::wasm::SnapshotStatus::Used(_)));
    let snapshot_ms = match snapshot {
        Some(p) => crate::conformance::median_start(&p, options).await,
        None => None,
    };
    Some(crate::conformance::Starts {
        cold_ms,
        plain_ms,
        snapshot_ms,
    })
}

/// Text from the store or the network, escaped and bounded for a terminal.
fn shown(text: &dyn std::fmt::Display) -> String {
    crate::untrusted::sanitize(&text.to_string(), crate::limits::MAX_SHOWN_STORE_TEXT)
}

/// `plugin add`, `plugin list` and `plugin remove`: the store's plugins.
pub(super) async fn store(
    config_path: Option<PathBuf>,
    command: PluginCommand,
) -> Result<(), String> {
    let store = ModelStore::from_env().map_err(|e| e.to_string())?;
    match command {
        PluginCommand::Add {
            source,
            name,
            sha256,
            offline,
        } => {
            let request = AddPlugin::parse(&source, name, sha256).map_err(|e| shown(&e))?;
            // A config naming the plugin about to be added does not parse
            // yet: the check then runs with the default artifact cache.
            let config = Config::discover(config_path.as_deref()).unwrap_or_else(|e| {
                eprintln!("warning: {}; checking without its [cache]", shown(&e));
                Config::default()
            });
            let engine = crate::launch::engine_for(&config).map_err(|e| e.to_string())?;
            let options = crate::launch::fetch_options(offline);
            let added = tokio::task::spawn_blocking(move || {
                plugin_store::add(&store, &request, &options, |name, bytes| {
                    let plugin = WasmPlugin::load_bytes(&engine, name, bytes)?;
                    Ok(plugin
                        .contract_version()
                        .unwrap_or_else(|| crate::wasm::contract::host_version().to_string()))
                })
            })
            .await
            .map_err(|e| format!("plugin add: {e}"))?
            .map_err(|e| shown(&e))?;
            print_added(&added);
            Ok(())
        }
        PluginCommand::List { json } => {
            print_list(&store, json);
            Ok(())
        }
        PluginCommand::Remove { name } => {
            let dir = plugin_store::remove(&store, &name).map_err(|e| shown(&e))?;
            outln!("removed {} ({})", shown(&name), dir.display());
            Ok(())
        }
        PluginCommand::Check { .. } | PluginCommand::Test(_) | PluginCommand::New(_) => {
            unreachable!("not a store command")
        }
    }
}

fn print_added(added: &plugin_store::Added) {
    let manifest = &added.manifest;
    let file = manifest.file();
    outln!(
        "pinned     {} ({} bytes, sha256 {})",
        file.name,
        file.size,
        file.sha256
    );
    if added.verified {
        outln!("verified   against the sha256 it was given");
    } else {
        outln!(
            "unverified no sha256 was given: {} is the hash of what was read; compare it with the publisher's",
            file.sha256
        );
    }
    outln!(
        "added {} in {} (contract {}); `[plugin] name = \"{}\"` runs it",
        manifest.id,
        added.dir.display(),
        shown(&manifest.contract.as_deref().unwrap_or("unknown")),
        manifest.id
    );
}

/// One JSON object per stored plugin, its file hashed against its
/// manifest.
fn list(store: &ModelStore) -> Vec<serde_json::Value> {
    plugin_store::names(store)
        .into_iter()
        .filter_map(|name| Some((plugin_store::manifest(store, &name)?, name)))
        .map(|(manifest, name)| match manifest {
            Err(e) => serde_json::json!({ "name": name, "error": shown(&e) }),
            Ok(m) => {
                let state = match plugin_store::state(store, &m) {
                    FileState::Present => "verified".to_string(),
                    FileState::Missing => "missing".to_string(),
                    FileState::Corrupt { reason } => format!("changed: {}", shown(&reason)),
                };
                serde_json::json!({
                    "name": m.id,
                    "sha256": m.file().sha256,
                    "size": m.file().size,
                    "source": shown(&m.source()),
                    "contract": m.contract.as_deref().map(|c| shown(&c)),
                    "state": state,
                    "dir": plugin_store::plugins_dir(store).join(&m.id).display().to_string(),
                })
            }
        })
        .collect()
}

/// `plugin list`'s table, or its JSON (`json`).
fn print_list(store: &ModelStore, json: bool) {
    let rows = list(store);
    if json {
        outln!("{:#}", serde_json::Value::Array(rows));
        return;
    }
    outln!(
        "{:<24} {:<12} {:>10} {:<9} {:<10} SOURCE",
        "NAME",
        "SHA256",
        "SIZE",
        "CONTRACT",
        "STATE"
    );
    for row in rows {
        let text = |key: &str| row[key].as_str().unwrap_or("-").to_string();
        if let Some(error) = row["error"].as_str() {
            outln!("{:<24} unusable: {error}", text("name"));
            continue;
        }
        let sha256 = text("sha256");
        outln!(
            "{:<24} {:<12} {:>10} {:<9} {:<10} {}",
            text("name"),
            sha256.get(..12).unwrap_or(&sha256),
            row["size"].as_u64().unwrap_or(0),
            text("contract"),
            text("state"),
            text("source"),
        );
    }
}
