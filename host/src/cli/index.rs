//! `embedhost index` and `search`: the worker's commands that embed.
//!
//! `index` and `search` go through the running service for the index if
//! one runs the same embedder; else they start the configured embedder and
//! a worker over the bus, exactly as an embedding application would, and
//! stop its pool in order at the end. `stats` and `forget`, which only
//! read or change the store, are in `stats.rs`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;

use crate::bus::transport::InProcess;
use crate::bus::{Bus, Empty, SendOptions};
use crate::config::Config;
use crate::embedder::{Embedder, Generation};
use crate::messages::{
    IndexRequest, InitRequest, SearchRequest, SearchResult, StatsResponse, WorkerIndex, WorkerInit,
    WorkerSearch, WorkerStats,
};
use crate::worker::{Worker, router};

use crate::limits::{INDEX_PROGRESS_INTERVAL as PROGRESS_INTERVAL, INDEX_WALK_TIMEOUT};

/// Characters of a result's text `search` prints.
const SNIPPET_CHARS: usize = 200;

#[derive(Debug, Args)]
pub struct IndexArgs {
    /// The index directory (default: `[index] dir`, else the data directory).
    #[arg(long, value_name = "DIR")]
    pub db: Option<PathBuf>,
    /// Files and folders to index (folders recursively, following
    /// .gitignore and skipping hidden files, as ripgrep does).
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// After indexing, keep watching the paths and index what changes (one
    /// line per batch of changes) until Ctrl-C.
    #[arg(long)]
    pub watch: bool,
}

#[derive(Debug, Args)]
pub struct SearchArgs {
    /// The index directory (default: `[index] dir`, else the data directory).
    #[arg(long, value_name = "DIR")]
    pub db: Option<PathBuf>,
    /// Results to show.
    #[arg(long, short = 'n', default_value_t = 10)]
    pub limit: u32,
    /// Print a JSON array of results (`path`, `start_line`, `end_line`,
    /// `score`, `text`).
    #[arg(long)]
    pub json: bool,
    /// How to find results: `hybrid` (meaning and keywords, fused),
    /// `semantic` (meaning only) or `keyword` (words only, BM25).
    #[arg(long, default_value = "hybrid")]
    pub mode: crate::messages::SearchMode,
    /// Print one JSON object per result, a line each.
    #[arg(long, conflicts_with = "json")]
    pub jsonl: bool,
    /// Only results scoring at least this (a cosine in semantic mode, a
    /// fused or BM25 score otherwise).
    #[arg(long, value_name = "SCORE")]
    pub threshold: Option<f32>,
    /// Print only the files, best first, each once (as `rg -l`).
    #[arg(long, conflicts_with_all = ["json", "jsonl"])]
    pub files: bool,
    /// Show the chunk's best-matching line and N lines either side (within
    /// the chunk), numbered, instead of a snippet; JSON gets `context`.
    #[arg(long, short = 'C', value_name = "N", conflicts_with = "files")]
    pub context: Option<usize>,
    /// What to look for, in words.
    #[arg(required = true)]
    pub query: Vec<String>,
}

/// The configured embedder and a worker on it, initialized on `db`, behind a
/// bus, and the embedder's supervisor. `max_pool` bounds the embedder's pool
/// (one query needs one instance).
async fn start_worker(
    config: &Config,
    db: &std::path::Path,
    max_pool: Option<usize>,
) -> Result<(Bus, Arc<Embedder>, Worker), String> {
    // A remote pool (over NATS) if the config names one, else our own:
    // either way through the front door.
    let embedder = Arc::new(
        Embedder::start(config.clone(), max_pool)
            .await
            .map_err(|e| e.to_string())?,
    );
    let generation = embedder.generation().map_err(|e| e.to_string())?;
    let model = generation.info.clone();
    // Files are cut by the tokenizer the front door counts with (for a
    // remote pool, see `launch::remote_tokens`).
    let tokens = generation.tokens.clone();
    drop(generation);
    let mut settings = crate::worker::WorkerSettings::from_config(config);
    if let Some(max) = max_pool {
        settings.in_flight = settings.in_flight.min(max + 1);
    }
    let id = match &config.embedder.remote {
        Some(url) => format!("remote|{url}|{}", model.model_id),
        None => config.embedder_id(),
    };
    let worker = Worker::new(embedder.clone(), model, tokens, settings).with_embedder_id(id);
    let bus = Bus::new(InProcess::named("worker", router(worker.clone())));
    bus.send::<WorkerInit>(
        InitRequest {
            db_dir: db.to_path_buf(),
            user_data_path: db.to_path_buf(),
        },
        SendOptions::default(),
    )
    .await
    .map_err(|e| e.to_string())?;
    Ok((bus, embedder, worker))
}

pub(super) async fn index(config_path: Option<PathBuf>, args: IndexArgs) -> Result<(), String> {
    let config = Config::discover(config_path.as_deref()).map_err(|e| e.to_string())?;
    let db = config
        .index_dir(args.db.as_deref())
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    if !args.watch
        && let Some(client) = super::running_service(&config, Some(&db), super::Embeds::Yes).await
    {
        return index_through(&client, args.paths, started, &db).await;
    }
    let (bus, embedder, worker) = start_worker(&config, &db, None).await?;
    let mut result = run_index(
        &bus,
        embedder.current().as_deref(),
        args.paths.clone(),
        started,
        &db,
        config.index.log_interval_ms,
    )
    .await;
    if result.is_ok() && args.watch {
        result = watch(&worker, &args.paths).await;
    }
    // A normal exit stops the pool in order: native children get
    // `shutdown` and exit 0, never SIGKILL.
    if let Some(generation) = embedder.take() {
        generation.shutdown().await;
    }
    result
}

/// Walks `paths` through the worker on `bus`, follows the indexing to its
/// end, and prints what it did.
async fn run_index(
    bus: &Bus,
    generation: Option<&Generation>,
    paths: Vec<PathBuf>,
    started: Instant,
    db: &std::path::Path,
    log_interval_ms: u64,
) -> Result<(), String> {
    let queued = bus
        .send::<WorkerIndex>(
            IndexRequest { paths },
            SendOptions::default().timeout(INDEX_WALK_TIMEOUT),
        )
        .await
        .map_err(|e| e.to_string())?
        .queued;
    let last = follow(bus, started, log_interval_ms).await?;
    if let Some(reason) = &last.stalled {
        return Err(format!(
            "indexing stopped, {} files stay queued for the next run: {reason}",
            last.queued + last.processing
        ));
    }
    outln!(
        "{} queued, {} files indexed ({} chunks) in {:.1} s into {}",
        queued,
        last.indexed,
        last.chunks,
        started.elapsed().as_secs_f64(),
        db.display()
    );
    if !last.failures.is_empty() {
        let reasons: Vec<String> = last
            .failures
            .iter()
            .map(|(reason, n)| format!("{reason} {n}"))
            .collect();
        outln!(
            "not indexed: {} (embedhost stats lists them)",
            reasons.join(", ")
        );
    }
    if let Some(line) = generation.and_then(restarts_line) {
        outln!("{line}");
    }
    Ok(())
}

/// Follows the worker's stats until nothing is left or it stalled: a bar
/// on a terminal, else a line every `log_interval_ms`. The last stats.
async fn follow(
    bus: &Bus,
    started: Instant,
    log_interval_ms: u64,
) -> Result<StatsResponse, String> {
    let stats = || async {
        bus.send::<WorkerStats>(Empty {}, SendOptions::default())
            .await
            .map_err(|e| e.to_string())
    };
    let first = stats().await?;
    let total = first.queued + first.processing;
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} files  {msg}  [{elapsed_precise}, {eta} left]",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let chunks_before = first.chunks;
    let indexing = Instant::now();
    // Without a terminal the bar draws nothing: a line at a steady interval
    // shows a log that the work is moving.
    let plain = !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let log_interval = std::time::Duration::from_millis(log_interval_ms);
    let mut logged = Instant::now();
    let last = loop {
        let s = stats().await?;
        let left = s.queued + s.processing;
        bar.set_position(total.saturating_sub(left));
        let chunks = s.chunks.saturating_sub(chunks_before);
        let rate = chunks as f64 / indexing.elapsed().as_secs_f64().max(1e-3);
        bar.set_message(format!("{chunks} chunks, {rate:.0} chunks/s"));
        if left == 0 || s.stalled.is_some() {
            break s;
        }
        if plain && logged.elapsed() >= log_interval {
            logged = Instant::now();
            eprintln!(
                "indexing: {}/{total} files, {chunks} chunks, {rate:.0} chunks/s, {:.0} s",
                total.saturating_sub(left),
                started.elapsed().as_secs_f64()
            );
        }
        tokio::time::sleep(PROGRESS_INTERVAL).await;
    };
    bar.finish_and_clear();
    Ok(last)
}

/// `index --watch`: one line per batch of changes until Ctrl-C.
async fn watch(worker: &Worker, paths: &[PathBuf]) -> Result<(), String> {
    let stop = tokio_util::sync::CancellationToken::new();
    let ctrl_c = {
        let stop = stop.clone();
        tokio::spawn(async move {
            // Ctrl-C, or nobody left to read the lines (`| head`).
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                () = super::output_gone().cancelled() => {}
            }
            stop.cancel();
        })
    };
    eprintln!("watching {} path(s); Ctrl-C stops", paths.len());
    let mut last: Option<crate::messages::StatsResponse> = None;
    let result = crate::worker::watch::watch(worker, paths, stop, |batch| {
        if batch.events > 0 {
            let before = last.as_ref().map_or((0, 0), |s| (s.indexed, s.chunks));
            let clock = clock();
            outln!(
                "{clock} {} change(s) in {} folder(s): {} files ({:+}), {} chunks ({:+}){}",
                batch.events,
                batch.folders.len(),
                batch.stats.indexed,
                batch.stats.indexed as i64 - before.0 as i64,
                batch.stats.chunks,
                batch.stats.chunks as i64 - before.1 as i64,
                batch
                    .stats
                    .stalled
                    .as_ref()
                    .map(|s| format!(" (stalled: {s})"))
                    .unwrap_or_default()
            );
        }
        last = Some(batch.stats.clone());
    })
    .await
    .map_err(|e| e.to_string());
    ctrl_c.abort();
    result
}

/// The time of day (UTC), `HH:MM:SS`, for watch lines.
fn clock() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "{:02}:{:02}:{:02}",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60
    )
}

/// `embedder restarts: trap 3, deadline 1`, summed over the pool, or
/// `None` if no instance was restarted.
fn restarts_line(generation: &Generation) -> Option<String> {
    let by_reason = generation.restarts();
    (!by_reason.is_empty()).then(|| {
        let parts: Vec<String> = by_reason.iter().map(|(r, n)| format!("{r} {n}")).collect();
        format!("embedder restarts: {}", parts.join(", "))
    })
}

pub(super) async fn search(config_path: Option<PathBuf>, args: SearchArgs) -> Result<(), String> {
    let config = Config::discover(config_path.as_deref()).map_err(|e| e.to_string())?;
    let db = config
        .index_dir(args.db.as_deref())
        .map_err(|e| e.to_string())?;
    if !db.join(crate::worker::store::DB_FILE).is_file() {
        return Err(format!(
            "no index at `{}` (run `embedhost index PATH` first)",
            db.display()
        ));
    }
    if let Some(client) = super::running_service(&config, Some(&db), super::Embeds::Yes).await {
        let body = serde_json::json!({ "query": args.query.join(" "), "limit": args.limit, "mode": args.mode });
        let answer = client
            .post("/search", &body, None)
            .await
            .map_err(|e| e.to_string())?;
        let results: Vec<SearchResult> =
            serde_json::from_value(answer).map_err(|e| format!("the service's answer: {e}"))?;
        return show_results(results, &args);
    }
    let (bus, embedder, _) = start_worker(&config, &db, Some(1)).await?;
    let results = bus
        .send::<WorkerSearch>(
            SearchRequest {
                query: args.query.join(" "),
                limit: args.limit,
                mode: args.mode,
            },
            SendOptions::default().timeout(crate::limits::SEARCH_EMBED_TIMEOUT * 2),
        )
        .await
        .map_err(|e| e.to_string());
    if let Some(generation) = embedder.take() {
        generation.shutdown().await;
    }
    show_results(results?.results, &args)
}

fn show_results(mut results: Vec<SearchResult>, args: &SearchArgs) -> Result<(), String> {
    if let Some(min) = args.threshold {
        results.retain(|r| r.score >= min);
    }
    if args.files {
        let mut seen = std::collections::HashSet::new();
        for r in &results {
            if seen.insert(r.path.clone()) {
                outln!("{}", super::show::safe_path(&r.path));
            }
        }
    } else if args.jsonl || args.json {
        let terms = super::show::terms(&args.query.join(" "));
        let mut values = Vec::with_capacity(results.len());
        for r in &results {
            let mut value = serde_json::to_value(r).map_err(|e| e.to_string())?;
            if let Some(n) = args.context {
                value["context"] = super::show::context(&r.text, r.start_line, &terms, n)
                    .into_iter()
                    .map(|(line, text)| serde_json::json!({ "line": line, "text": text }))
                    .collect();
            }
            values.push(value);
        }
        if args.jsonl {
            for v in &values {
                outln!("{v}");
            }
        } else {
            let json = serde_json::to_string_pretty(&values).map_err(|e| e.to_string())?;
            outln!("{json}");
        }
    } else {
        print_results(&results, &args.query.join(" "), args.context);
    }
    Ok(())
}

/// `index` through a running service: the paths, resolved here (the
/// service has its own working directory), go to `POST /index`; progress
/// is read from `GET /index` until the queue is empty.
async fn index_through(
    client: &crate::serve::client::Client,
    paths: Vec<PathBuf>,
    started: Instant,
    db: &std::path::Path,
) -> Result<(), String> {
    let paths = paths
        .iter()
        .map(|p| {
            std::fs::canonicalize(p)
                .map(|p| p.display().to_string())
                .map_err(|e| format!("`{}`: {e}", p.display()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let answer = client
        .post("/index", &serde_json::json!({ "paths": paths }), None)
        .await
        .map_err(|e| e.to_string())?;
    let job = answer["job"]
        .as_u64()
        .ok_or("the service's answer has no job")?;
    let last = loop {
        tokio::time::sleep(PROGRESS_INTERVAL).await;
        let progress = client.get("/index").await.map_err(|e| e.to_string())?;
        let state = progress["jobs"]
            .as_array()
            .and_then(|jobs| jobs.iter().find(|j| j["job"] == job || j["id"] == job))
            .map(|j| {
                (
                    j["state"].as_str().unwrap_or("").to_string(),
                    j["error"].clone(),
                )
            });
        match state {
            Some((s, error)) if s == "failed" => {
                return Err(format!(
                    "indexing failed: {}",
                    error.as_str().unwrap_or("?")
                ));
            }
            Some((s, _)) if s == "walking" => continue,
            _ => {}
        }
        let left =
            progress["queued"].as_u64().unwrap_or(0) + progress["processing"].as_u64().unwrap_or(0);
        if left == 0 || !progress["stalled"].is_null() {
            break progress;
        }
    };
    if let Some(reason) = last["stalled"].as_str() {
        return Err(format!("indexing stopped, files stay queued: {reason}"));
    }
    outln!(
        "{} files indexed ({} chunks) in {:.1} s into {} (by the running service)",
        last["indexed"],
        last["chunks"],
        started.elapsed().as_secs_f64(),
        db.display()
    );
    Ok(())
}

/// Results for a person: score, `path:lines`, then a snippet, or with
/// `context` the best-matching lines, numbered; the query's words marked
/// on a terminal.
fn print_results(results: &[SearchResult], query: &str, context: Option<usize>) {
    if results.is_empty() {
        outln!("no results");
    }
    let terms = super::show::terms(query);
    let color = super::show::color_wanted();
    for r in results {
        let lines = if r.start_line == r.end_line {
            r.start_line.to_string()
        } else {
            format!("{}-{}", r.start_line, r.end_line)
        };
        outln!(
            "{:.3}  {}:{lines}",
            r.score,
            super::show::safe_path(&r.path)
        );
        if let Some(n) = context {
            for (line, text) in super::show::context(&r.text, r.start_line, &terms, n) {
                let text = super::show::safe(text.trim_end());
                let text = super::show::highlight(&text, &terms, color);
                outln!("{line:>7}: {text}");
            }
            continue;
        }
        let flat: String = r.text.split_whitespace().collect::<Vec<_>>().join(" ");
        let flat = super::show::safe(&flat);
        let mut snippet: String = flat.chars().take(SNIPPET_CHARS).collect();
        if flat.chars().count() > SNIPPET_CHARS {
            snippet.push('…');
        }
        outln!("       {}", super::show::highlight(&snippet, &terms, color));
    }
}
