//! The places on disk a configuration names, and the checks of what must
//! be there: the model's directory (fetched when missing), the index
//! directory, the artifact cache, and the onnx engine's files.
//!
//! # Invariants
//! - An explicit setting wins over the environment, which wins over the
//!   platform's directories (the order each function's doc gives; the cache
//!   directory's environment variable comes first).
//! - Only [`Config::ensure_model_dir`] fetches; the others only compute a
//!   path or check one, and a missing file is reported with the setting
//!   that names it.

use std::path::{Path, PathBuf};

use super::{CACHE_DIR_ENV, Config, INDEX_DIR_ENV, project_dirs};

impl Config {
    /// The model's directory: `[model] dir`, else the model store's
    /// directory for `[model] id`, fetching the files if any is missing.
    ///
    /// # Errors
    /// An unknown model id, or a fetch that failed.
    pub fn ensure_model_dir(
        &self,
        options: &crate::model::FetchOptions,
    ) -> Result<PathBuf, String> {
        if let Some(dir) = &self.model.dir {
            return Ok(dir.clone());
        }
        let (manifest, store) = self.model_store()?;
        store
            .ensure(&manifest, Some(self.model_use()), options)
            .map_err(|e| e.to_string())
    }

    /// Where the model's files are: `[model] dir`, else the model store's
    /// directory for `[model] id`. Nothing is checked or fetched.
    ///
    /// # Errors
    /// An unknown model id, or no place for the model store.
    pub fn model_dir(&self) -> Result<PathBuf, String> {
        match &self.model.dir {
            Some(dir) => Ok(dir.clone()),
            None => self
                .model_store()
                .map(|(manifest, store)| store.dir(&manifest)),
        }
    }

    fn model_store(&self) -> Result<(crate::model::Manifest, crate::model::ModelStore), String> {
        let manifest = crate::model::builtin(self.model_id()).map_err(|e| e.to_string())?;
        let store = crate::model::ModelStore::from_env().map_err(|e| e.to_string())?;
        Ok((manifest, store))
    }

    /// The index directory: `db` (the `--db` option), else `[index] dir`,
    /// else `$EMBEDHOST_INDEX_DIR`, else the platform's data directory.
    ///
    /// # Errors
    /// No data directory on this platform and none configured.
    pub fn index_dir(&self, db: Option<&Path>) -> Result<PathBuf, String> {
        if let Some(dir) = db.or(self.index.dir.as_deref()) {
            return Ok(dir.to_path_buf());
        }
        if let Some(dir) = std::env::var_os(INDEX_DIR_ENV) {
            return Ok(PathBuf::from(dir));
        }
        directories::ProjectDirs::from("", "", "embedhost")
            .map(|d| d.data_dir().join("index"))
            .ok_or_else(|| {
                format!(
                    "no data directory on this platform: set `[index] dir`, {INDEX_DIR_ENV} or --db"
                )
            })
    }

    /// The artifact cache directory: `$EMBEDHOST_CACHE_DIR`, else the
    /// config's `[cache] dir`, else the user's cache directory.
    pub fn cache_dir(&self) -> Option<PathBuf> {
        std::env::var_os(CACHE_DIR_ENV)
            .map(PathBuf::from)
            .or_else(|| self.cache.dir.clone())
            .or_else(|| project_dirs().map(|d| d.cache_dir().join("artifacts")))
    }

    /// Checks that the onnx engine's files are there: `model_file` and the
    /// tokenizer in `dir`, and the ONNX Runtime library, whose path it
    /// returns.
    pub(super) fn check_onnx_files(&self, dir: &Path, model_file: &str) -> Result<PathBuf, String> {
        for file in [model_file, crate::native::onnx::TOKENIZER_FILE] {
            if !dir.join(file).is_file() {
                return Err(format!(
                    "the model directory `{}` has no `{file}` (`[model] dir` in the config)",
                    dir.display()
                ));
            }
        }
        let library = crate::native::onnx::resolve_library(self.native.onnxruntime.as_deref())?;
        if !library.exists() {
            return Err(format!(
                "the ONNX Runtime library `{}` does not exist; run `./x setup` or set `[native] onnxruntime`",
                library.display()
            ));
        }
        Ok(library)
    }
}
