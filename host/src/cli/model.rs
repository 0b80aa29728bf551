//! `embedhost model check|fetch|add|list|remove`: a model's files against
//! its manifest, and the models added to the store.
//!
//! # Invariants
//! - `model check` fails unless every file is present (its sha256 as the
//!   manifest says); checking and fetching are the model store's
//!   ([`crate::model`]), which verifies a file before keeping it.

use std::path::PathBuf;

use super::ModelCommand;
use crate::config::Config;
use crate::model::ModelStore;
use crate::model::source::Source;

pub(super) async fn model(
    config_path: Option<PathBuf>,
    command: ModelCommand,
) -> Result<(), String> {
    let store = crate::model::ModelStore::from_env().map_err(|e| e.to_string())?;
    let id = match &command {
        ModelCommand::Check { id, .. } | ModelCommand::Fetch { id, .. } => match id {
            Some(id) => id.clone(),
            None => Config::discover(config_path.as_deref())
                .map_err(|e| e.to_string())?
                .model_id()
                .to_string(),
        },
        ModelCommand::Add { .. } | ModelCommand::List { .. } | ModelCommand::Remove { .. } => {
            return tokio::task::spawn_blocking(move || store_command(&store, command))
                .await
                .map_err(|e| format!("model: {e}"))?;
        }
    };
    let manifest = crate::model::manifest_for(&id, &store).map_err(|e| e.to_string())?;
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
        ModelCommand::Add { .. } | ModelCommand::List { .. } | ModelCommand::Remove { .. } => {
            unreachable!("handled above")
        }
    })
    .await
    .map_err(|e| format!("model: {e}"))?
}

/// `model add`, `model list` and `model remove`.
fn store_command(store: &ModelStore, command: ModelCommand) -> Result<(), String> {
    match command {
        ModelCommand::Add {
            source,
            id,
            offline,
        } => {
            let source = Source::parse(&source).map_err(|e| e.to_string())?;
            let options = crate::launch::fetch_options(offline);
            let manifest = crate::model::add::add(store, &source, id.as_deref(), &options)
                .map_err(|e| e.to_string())?;
            for file in &manifest.files {
                outln!("pinned     {} ({} bytes)", file.name, file.size);
            }
            outln!(
                "added {} in {}; `[model] id = \"{}\"` uses it",
                manifest.id,
                store.dir(&manifest).display(),
                manifest.id
            );
            Ok(())
        }
        ModelCommand::Remove { id } => {
            let dir = crate::model::add::remove(store, &id).map_err(|e| e.to_string())?;
            outln!("removed {id} ({})", dir.display());
            Ok(())
        }
        ModelCommand::List { json } => {
            print_list(list(store), json);
            Ok(())
        }
        ModelCommand::Check { .. } | ModelCommand::Fetch { .. } => {
            unreachable!("not a store command")
        }
    }
}

/// `model list`'s table, or its JSON (`json`).
fn print_list(rows: Vec<serde_json::Value>, json: bool) {
    if json {
        outln!("{:#}", serde_json::Value::Array(rows));
        return;
    }
    outln!(
        "{:<28} {:<9} {:>5} {:<12} {:<10} {:>6} {:<12} {:<8} prompts",
        "ID",
        "KIND",
        "DIM",
        "POOLING",
        "NORMALIZED",
        "TOKENS",
        "BACKENDS",
        "FILES"
    );
    for row in rows {
        let text = |key: &str| row[key].as_str().unwrap_or("-").to_string();
        if let Some(error) = row["error"].as_str() {
            outln!("{:<28} {:<9} unusable: {error}", text("id"), text("kind"));
            continue;
        }
        let number = |key: &str| row[key].as_u64().unwrap_or(0);
        let backends: Vec<&str> = row["backends"]
            .as_array()
            .map(|b| b.iter().filter_map(|b| b.as_str()).collect())
            .unwrap_or_default();
        let prompts = match (
            row["query_prompt"].as_str(),
            row["document_prompt"].as_str(),
        ) {
            (None, None) => "-".to_string(),
            (q, d) => format!(
                "query {:?}, document {:?}",
                q.unwrap_or(""),
                d.unwrap_or("")
            ),
        };
        outln!(
            "{:<28} {:<9} {:>5} {:<12} {:<10} {:>6} {:<12} {:<8} {prompts}",
            text("id"),
            text("kind"),
            number("dimension"),
            text("pooling"),
            if row["normalize"] == true {
                "yes"
            } else {
                "no"
            },
            number("max_tokens"),
            backends.join(","),
            if row["present"] == true {
                "present"
            } else {
                "missing"
            },
        );
    }
}

/// One JSON object per model: the built-ins, then the added ones.
fn list(store: &ModelStore) -> Vec<serde_json::Value> {
    let builtins = crate::model::BUILTIN
        .iter()
        .map(|(id, _)| (id.to_string(), crate::model::builtin(id), "built-in"));
    let added = store
        .added_ids()
        .into_iter()
        .filter_map(|id| store.added(&id).map(|m| (id, m, "added")));
    builtins
        .chain(added)
        .map(|(id, manifest, kind)| match manifest {
            Err(e) => serde_json::json!({ "id": id, "kind": kind, "error": e.to_string() }),
            Ok(m) => {
                let mut backends = Vec::new();
                if m.file("config.json").is_some() && m.file("model.safetensors").is_some() {
                    backends.push("wasm");
                }
                if m.file("model.onnx").is_some() {
                    backends.push("native");
                }
                let present = store
                    .check(&m, false)
                    .iter()
                    .all(|(_, state)| *state == crate::model::FileState::Present);
                serde_json::json!({
                    "id": m.id,
                    "kind": kind,
                    "name": m.name,
                    "dimension": m.dimension,
                    "max_tokens": m.max_tokens,
                    "pooling": m.pooling_mode().name(),
                    "normalize": m.normalize,
                    "query_prompt": m.query_prompt,
                    "document_prompt": m.document_prompt,
                    "do_lower_case": m.do_lower_case,
                    "backends": backends,
                    "present": present,
                    "dir": store.dir(&m).display().to_string(),
                })
            }
        })
        .collect()
}
