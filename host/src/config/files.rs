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

use super::{CACHE_DIR_ENV, Config, ConfigError, INDEX_DIR_ENV, NativeSetupError};
use crate::model::ModelError;
use crate::model::describe::DescribeError;

impl Config {
    /// The model's directory: `[model] dir`, else the model store's
    /// directory for `[model] id`, fetching the files if any is missing.
    ///
    /// # Errors
    /// [`ModelError`]: an unknown model id, no model store, or a fetch
    /// that failed.
    pub fn ensure_model_dir(
        &self,
        options: &crate::model::FetchOptions,
    ) -> Result<PathBuf, ModelError> {
        if let Some(dir) = &self.model.dir {
            return Ok(dir.clone());
        }
        let (manifest, store) = self.model_store()?;
        store.ensure(&manifest, Some(self.model_use()), options)
    }

    /// Where the model's files are: `[model] dir`, else the model store's
    /// directory for `[model] id`. Nothing is checked or fetched.
    ///
    /// # Errors
    /// [`ModelError`]: an unknown model id, or no place for the model store.
    pub fn model_dir(&self) -> Result<PathBuf, ModelError> {
        match &self.model.dir {
            Some(dir) => Ok(dir.clone()),
            None => self
                .model_store()
                .map(|(manifest, store)| store.dir(&manifest)),
        }
    }

    /// The sentence-transformers description of `[model] dir`, if the
    /// directory has one (`modules.json`); a built-in or stored model's
    /// manifest carries what it says instead.
    ///
    /// # Errors
    /// [`DescribeError`] naming the file of the description at fault.
    pub fn model_description(
        &self,
    ) -> Result<Option<crate::model::describe::Description>, DescribeError> {
        match &self.model.dir {
            Some(dir) if dir.join("modules.json").is_file() => {
                crate::model::describe::describe(dir).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// The prompts and lowercasing the configured model's texts get before
    /// it sees them: as its description (`[model] dir`) or its manifest
    /// says; none for a model without either.
    ///
    /// # Errors
    /// [`DescribeError`]: `[model] dir`'s description cannot be read.
    pub fn model_form(&self) -> Result<crate::model::form::TextForm, DescribeError> {
        if self.model.dir.is_some() {
            return Ok(self
                .model_description()?
                .map(|d| d.form())
                .unwrap_or_default());
        }
        Ok(crate::model::manifest(self.model_id())
            .map(|m| m.form())
            .unwrap_or_default())
    }

    fn model_store(
        &self,
    ) -> Result<(crate::model::Manifest, crate::model::ModelStore), ModelError> {
        let store = crate::model::ModelStore::from_env()?;
        let manifest = crate::model::manifest_for(self.model_id(), &store)?;
        Ok((manifest, store))
    }

    /// The index directory: `db` (the `--db` option), else `[index] dir`,
    /// else `$EMBEDHOST_INDEX_DIR`, else the platform's data directory.
    ///
    /// # Errors
    /// [`ConfigError::NoIndexDir`]: no data directory on this platform and
    /// none configured.
    pub fn index_dir(&self, db: Option<&Path>) -> Result<PathBuf, ConfigError> {
        if let Some(dir) = db.or(self.index.dir.as_deref()) {
            return Ok(dir.to_path_buf());
        }
        if let Some(dir) = std::env::var_os(INDEX_DIR_ENV) {
            return Ok(PathBuf::from(dir));
        }
        directories::ProjectDirs::from("", "", "embedhost")
            .map(|d| d.data_dir().join("index"))
            .ok_or(ConfigError::NoIndexDir)
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
    pub(super) fn check_onnx_files(
        &self,
        dir: &Path,
        model_file: &str,
    ) -> Result<PathBuf, NativeSetupError> {
        for file in [model_file, crate::native::onnx::TOKENIZER_FILE] {
            if !dir.join(file).is_file() {
                return Err(NativeSetupError::MissingFile {
                    dir: dir.to_path_buf(),
                    file: file.to_string(),
                });
            }
        }
        let library = crate::native::onnx::resolve_library(self.native.onnxruntime.as_deref())?;
        if !library.exists() {
            return Err(NativeSetupError::LibraryMissing(library));
        }
        Ok(library)
    }
}

impl Config {
    /// The configured model's id: `[model] id`, else the name of
    /// `[model] dir` (a directory's model is not the default one), else the
    /// default model's.
    pub fn model_id(&self) -> &str {
        if let Some(id) = &self.model.id {
            return id;
        }
        self.model
            .dir
            .as_deref()
            .and_then(|d| d.file_name())
            .and_then(|n| n.to_str())
            .unwrap_or(crate::model::DEFAULT_MODEL)
    }

    /// What the configured embedder needs from a model manifest (its files'
    /// `needed_by`): `wasm`, `native` or `native-int8`.
    pub fn model_use(&self) -> &'static str {
        match (self.backend, self.native.precision) {
            (super::Backend::Wasm, _) => "wasm",
            (super::Backend::Native, super::Precision::Fp32) => "native",
            (super::Backend::Native, super::Precision::Int8) => "native-int8",
        }
    }
}

/// The user's directories for embedhost (config, cache, data).
pub(super) fn project_dirs() -> Option<directories::ProjectDirs> {
    directories::ProjectDirs::from("", "", "embedhost")
}
