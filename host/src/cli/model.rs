//! `embedhost model check|fetch`: a model's files against its manifest.
//!
//! # Invariants
//! - `model check` fails unless every file is present (its sha256 as the
//!   manifest says); checking and fetching are the model store's
//!   ([`crate::model`]), which verifies a file before keeping it.

use std::path::PathBuf;

use super::ModelCommand;
use crate::config::Config;

pub(super) async fn model(
    config_path: Option<PathBuf>,
    command: ModelCommand,
) -> Result<(), String> {
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
