//! `embedhost plugin check|test`: a plugin loaded and checked against the
//! contract, and the conformance suite run against it.
//!
//! # Invariants
//! - `plugin test` exits with 1 if any check fails.

use std::path::PathBuf;

use super::{PluginTestArgs, key_values};
use crate::config::Config;
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
    config.plugin.path = Some(args.path.clone());
    let engine = crate::launch::engine_for(&config).map_err(|e| e.to_string())?;
    let source = config.plugin_source();
    let plugin = WasmPlugin::load(&engine, &source).map_err(|e| e.to_string())?;
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
