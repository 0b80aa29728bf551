//! `embedhost stats` and `forget`: the index's store read or changed by
//! path, with no embedder started.
//!
//! # Invariants
//! - `stats` opens an existing index only, and shows every path, reason
//!   and model id escaped ([`super::show`], [`crate::untrusted`]).
//! - `forget` goes through the running service if there is one (its
//!   in-memory index must drop the chunks too), whatever embedder it runs;
//!   the path is resolved here, since the service has its own working
//!   directory.

use std::path::{Path, PathBuf};

use clap::Args;

use crate::config::Config;
use crate::messages::StatsResponse;
use crate::worker::store::{RootStats, SkippedFile, Store, StoreError, StoreStats};

#[derive(Debug, Args)]
pub struct ForgetArgs {
    /// The index directory (default: `[index] dir`, else the data directory).
    #[arg(long, value_name = "DIR")]
    pub db: Option<PathBuf>,
    /// The folder or file to forget (as given to `index`, or any folder or
    /// file inside one; it need not exist any more).
    pub path: PathBuf,
}

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// The index directory (default: `[index] dir`, else the data directory).
    #[arg(long, value_name = "DIR")]
    pub db: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `embedhost stats`: the index's counts, roots, cut files and skipped
/// files, read from the store (no embedder starts).
pub(super) async fn stats(config_path: Option<PathBuf>, args: StatsArgs) -> Result<(), String> {
    let config = Config::discover(config_path.as_deref()).map_err(|e| e.to_string())?;
    let db = config
        .index_dir(args.db.as_deref())
        .map_err(|e| e.to_string())?;
    let cap = config.index.max_file_chunks;
    let stored = tokio::task::spawn_blocking(move || read(&db))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let response = StatsResponse {
        indexed: stored.stats.indexed,
        queued: stored.stats.queued,
        processing: 0,
        chunks: stored.stats.chunks,
        failures: stored.stats.skipped.clone(),
        stalled: None,
    };
    if args.json {
        return print_json(&response, &stored, cap);
    }
    print_text(&response, &stored, cap);
    Ok(())
}

/// What `stats` reads from the store.
struct Stored {
    stats: StoreStats,
    /// The model's id (escaped) and dimension.
    model: (String, String),
    skipped: Vec<SkippedFile>,
    roots: Vec<RootStats>,
    /// The files cut at `[index] max_file_chunks`: path, kept, made.
    cut: Vec<(PathBuf, u64, u64)>,
}

/// Reads what `stats` shows from the index in `db`, opened as it is.
fn read(db: &Path) -> Result<Stored, StoreError> {
    let store = Store::open_existing(db)?;
    let stats = store.stats()?;
    let model = (
        // Escaped: an index written before model ids were checked
        // may hold one that acts on a terminal.
        crate::untrusted::sanitize(
            &store.meta("model_id")?.unwrap_or_default(),
            crate::limits::MAX_MODEL_ID_BYTES,
        ),
        store.meta("dimension")?.unwrap_or_default(),
    );
    Ok(Stored {
        stats,
        model,
        skipped: store.skipped()?,
        roots: store.roots()?,
        cut: store.cut()?,
    })
}

/// `stats --json`.
fn print_json(response: &StatsResponse, stored: &Stored, cap: usize) -> Result<(), String> {
    let mut json = serde_json::to_value(response).map_err(|e| e.to_string())?;
    json["model_id"] = stored.model.0.clone().into();
    json["roots"] = serde_json::to_value(&stored.roots).map_err(|e| e.to_string())?;
    json["max_file_chunks"] = cap.into();
    json["cut"] = stored
        .cut
        .iter()
        .map(|(path, kept, made)| serde_json::json!({ "path": path, "kept": kept, "made": made }))
        .collect();
    json["skipped"] = serde_json::to_value(&stored.skipped).map_err(|e| e.to_string())?;
    outln!("{json:#}");
    Ok(())
}

/// `stats` for a person: every path and reason escaped.
fn print_text(response: &StatsResponse, stored: &Stored, cap: usize) {
    outln!(
        "model:    {} ({} dimensions)",
        stored.model.0,
        stored.model.1
    );
    outln!(
        "indexed:  {} files, {} chunks",
        response.indexed,
        response.chunks
    );
    outln!("queued:   {} files", response.queued);
    for root in &stored.roots {
        let path = if root.path.as_os_str().is_empty() {
            "(under no recorded root: indexed before roots were kept; `index` them again)"
                .to_string()
        } else {
            super::show::safe_path(&root.path)
        };
        outln!(
            "root:     {path}: {} files, {} chunks{}",
            root.files,
            root.chunks,
            if root.skipped > 0 {
                format!(", {} skipped", root.skipped)
            } else {
                String::new()
            }
        );
    }
    for (path, kept, made) in &stored.cut {
        outln!(
            "cut:      {} (its first {kept} of {made} chunks; [index] max_file_chunks = {cap})",
            super::show::safe_path(path)
        );
    }
    for file in &stored.skipped {
        let tries = if file.reason == "embed_failed" {
            let max = crate::limits::MAX_EMBED_ATTEMPTS;
            if file.attempts < max {
                format!(
                    "; failed {} of {max} runs, tried again by the next `index`",
                    file.attempts
                )
            } else {
                format!("; failed {max} runs in a row, tried again when it or the embedder changes")
            }
        } else {
            String::new()
        };
        outln!(
            "skipped:  {} ({}{tries})",
            super::show::safe_path(&file.path),
            super::show::safe(&file.detail)
        );
    }
}

/// `embedhost forget PATH`: through the running service if there is one
/// (its in-memory index must drop the chunks too), else on the store.
pub(super) async fn forget(config_path: Option<PathBuf>, args: ForgetArgs) -> Result<(), String> {
    let config = Config::discover(config_path.as_deref()).map_err(|e| e.to_string())?;
    let db = config
        .index_dir(args.db.as_deref())
        .map_err(|e| e.to_string())?;
    // Resolved here: the service has its own working directory.
    let path = crate::worker::forget_path(&args.path)
        .map_err(|e| format!("`{}`: {e}", args.path.display()))?;
    let chunks =
        if let Some(client) = super::running_service(&config, Some(&db), super::Embeds::No).await {
            let answer = client
                .post("/forget", &serde_json::json!({ "path": path }), None)
                .await
                .map_err(|e| e.to_string())?;
            answer["chunks"].as_u64().unwrap_or(0)
        } else {
            let (asked, db2) = (args.path.clone(), db.clone());
            tokio::task::spawn_blocking(move || {
                let mut store = Store::open_existing(&db2).map_err(|e| e.to_string())?;
                crate::worker::forget_in(&mut store, &path, asked)
                    .map(|ids| ids.len() as u64)
                    .map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| e.to_string())??
        };
    outln!(
        "forgot `{}`: {chunks} chunks removed from {}",
        args.path.display(),
        db.display()
    );
    Ok(())
}
