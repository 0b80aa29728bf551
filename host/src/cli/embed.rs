//! `embedhost embed`: embeds texts through a running service for the
//! configured index when one runs the same embedder, else through a pool
//! started here; prints one JSON line per text.
//!
//! # Invariants
//! - A text that fails is printed with its reason, and the command fails
//!   after printing every other text's vector.

use std::path::PathBuf;

use super::{EmbedArgs, Embeds, running_service};
use crate::config::{Backend, Config};
use crate::embedder::{Embedder, Job};
use crate::wasm::PluginSource;

pub(super) async fn embed(config_path: Option<PathBuf>, args: EmbedArgs) -> Result<(), String> {
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
        config.plugin.replace_path(path);
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
