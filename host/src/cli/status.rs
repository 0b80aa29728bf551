//! `embedhost status`: the configuration in effect, the backend started,
//! its model and instances, as text or JSON.
//!
//! # Invariants
//! - In text, every value is printed escaped ([`crate::untrusted`]): some
//!   come from the plugin or the index, and none may act on the terminal.

use std::path::PathBuf;

use super::StatusArgs;
use crate::config::{Backend, Config};
use crate::wasm::{PluginSource, SnapshotStatus};

pub(super) async fn status(config_path: Option<PathBuf>, args: StatusArgs) -> Result<(), String> {
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
                PluginSource::Pinned { path, sha256 } => {
                    format!("{} (sha256 {sha256})", path.display()).into()
                }
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
                        serde_json::json!({ "used": false, "error": reason.to_string() })
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
