//! Reading `embedhost.toml`: the lookup order, path resolution and
//! validation.
//!
//! # Invariants
//! - A parsed [`Config`] is valid: every value past a ceiling
//!   ([`crate::ceilings`]) or out of range is refused here, naming the file
//!   and the key, so what builds on it need not check again.
//! - Every path it holds is absolute or relative to the working directory:
//!   relative paths in a file are resolved against that file's directory
//!   (`builtin:` plugin names are left as they are).
//! - The checks run in a fixed order, so the same file always gets the same
//!   error.

use std::path::{Path, PathBuf};

use super::files::project_dirs;
use super::{Config, ConfigError, ConfigProblem, FILE_NAME};

impl Config {
    /// Parses `text`, read from `path`; relative paths are resolved against
    /// `path`'s directory. Each `[[models]]` entry becomes a config of its
    /// own in [`Config::models`] (see `models.rs`).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the file and the offending key.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut config = Config::parse_one(text, path)?;
        let entries = std::mem::take(&mut config.model_entries);
        if !entries.is_empty() {
            let main: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Invalid {
                path: path.to_path_buf(),
                message: e.to_string().trim().to_string(),
            })?;
            config.add_models(&main, entries, path)?;
        }
        Ok(config)
    }

    /// [`Config::parse`] of one model's config, `[[models]]` left as
    /// written.
    pub(super) fn parse_one(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Invalid {
            path: path.to_path_buf(),
            message: e.to_string().trim().to_string(),
        })?;
        // --- sandbox, second round (issue 26) ---
        if let Some((ceiling, value)) = crate::ceilings::first_past(&config) {
            return Err(ConfigError::PastCeiling {
                path: path.to_path_buf(),
                key: ceiling.key,
                value,
                max: ceiling.max,
                constant: ceiling.constant,
            });
        }
        let invalid = |problem: ConfigProblem| ConfigError::Check {
            path: path.to_path_buf(),
            problem,
        };
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base).map_err(invalid)?;
        config.stored_plugin(path)?;
        config.check_ranges().map_err(invalid)?;
        for root in &mut config.serve.index_roots {
            if root.is_relative() {
                *root = base.join(&*root);
            }
        }
        config.check_serving().map_err(invalid)?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Resolves the file's relative paths against `base`, its directory; a
    /// `builtin:` plugin must be one this build has.
    fn resolve_paths(&mut self, base: &Path) -> Result<(), ConfigProblem> {
        let builtin = self
            .plugin
            .path
            .as_ref()
            .and_then(|p| p.to_str())
            .and_then(|p| p.strip_prefix("builtin:"))
            .map(str::to_string);
        if let Some(name) = &builtin
            && crate::wasm::PluginSource::builtin(name).is_none()
        {
            return Err(ConfigProblem::UnknownBuiltin { name: name.clone() });
        }
        let plugin_path = if builtin.is_some() {
            &mut None
        } else {
            &mut self.plugin.path
        };
        for relative in [
            plugin_path,
            &mut self.cache.dir,
            &mut self.native.executable,
            &mut self.native.onnxruntime,
            &mut self.model.dir,
            &mut self.index.dir,
            &mut self.serve.api_key_file,
            &mut self.nats.creds,
            &mut self.nats.tls_ca,
            &mut self.nats.tls_cert,
            &mut self.nats.tls_key,
        ] {
            if let Some(p) = relative.as_mut()
                && p.is_relative()
            {
                *p = base.join(&*p);
            }
        }
        Ok(())
    }

    /// `[plugin] name`: the stored plugin's file, pinned to its manifest's
    /// sha256 (which a `[plugin] sha256` beside it must equal).
    fn stored_plugin(&mut self, file: &Path) -> Result<(), ConfigError> {
        let Some(name) = &self.plugin.name else {
            return Ok(());
        };
        let problem = |problem| ConfigError::Check {
            path: file.to_path_buf(),
            problem,
        };
        if self.plugin.path.is_some() {
            return Err(problem(ConfigProblem::PluginPathAndName));
        }
        let stored = |source| ConfigError::StoredPlugin {
            path: file.to_path_buf(),
            source,
        };
        let store = crate::model::ModelStore::from_env().map_err(|e| stored(e.into()))?;
        let (plugin, sha256) = crate::model::plugin::resolve(&store, name).map_err(stored)?;
        if let Some(pinned) = &self.plugin.sha256
            && !pinned.eq_ignore_ascii_case(&sha256)
        {
            return Err(problem(ConfigProblem::StoredPluginPin {
                name: name.clone(),
                pinned: pinned.clone(),
                stored: sha256,
            }));
        }
        self.plugin.path = Some(plugin);
        self.plugin.sha256 = Some(sha256);
        Ok(())
    }

    /// `[limits]`, `[supervisor]`, `[native] threads` and `[index]`: sizes,
    /// counts and times greater than zero.
    fn check_ranges(&self) -> Result<(), ConfigProblem> {
        let limits = &self.limits;
        if [
            limits.memory_mb,
            limits.call_deadline_ms,
            limits.init_deadline_ms,
        ]
        .contains(&0)
        {
            return Err(ConfigProblem::LimitsZero);
        }
        let supervisor = &self.supervisor;
        let intervals = [
            supervisor.health_interval_ms,
            supervisor.health_timeout_ms,
            supervisor.restart_window_ms,
        ];
        if intervals.contains(&Some(0)) {
            return Err(ConfigProblem::SupervisorZero);
        }
        if self.native.threads == Some(0) {
            return Err(ConfigProblem::NativeThreadsZero);
        }
        if self.index.chunk_tokens == 0
            || self.index.batch_chunks == 0
            || self.index.log_interval_ms == 0
            || self.index.max_file_chunks == 0
        {
            return Err(ConfigProblem::IndexZero);
        }
        if self.index.chunk_overlap >= self.index.chunk_tokens {
            return Err(ConfigProblem::ChunkOverlap);
        }
        Ok(())
    }

    /// `[serve]`, `[nats]` and `[native] grace_ms`.
    fn check_serving(&self) -> Result<(), ConfigProblem> {
        let serve = &self.serve;
        if [
            serve.max_body_kb,
            serve.max_inputs,
            serve.max_concurrent_requests,
            serve.max_batch_tokens,
        ]
        .contains(&0)
            || serve.request_deadline_ms == 0
            || serve.shutdown_grace_ms == 0
        {
            return Err(ConfigProblem::ServeZero);
        }
        self.serve.check_service_limits()?;
        if self.nats.tls_cert.is_some() != self.nats.tls_key.is_some() {
            return Err(ConfigProblem::TlsPair);
        }
        if self.native.grace_ms == 0 {
            return Err(ConfigProblem::GraceZero);
        }
        if let Some(sha256) = &self.plugin.sha256 {
            let file = self
                .plugin
                .path
                .as_ref()
                .is_some_and(|p| !p.to_string_lossy().starts_with("builtin:"));
            let hex = sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit());
            if !(file && hex) {
                return Err(ConfigProblem::PluginSha256);
            }
        }
        Ok(())
    }

    /// Reads the config file at `path`.
    ///
    /// # Errors
    /// [`ConfigError::Read`] or [`ConfigError::Invalid`], naming the file.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// The configuration by the lookup order in the module docs.
    ///
    /// # Errors
    /// As [`Config::read`], for the file found.
    pub fn discover(explicit: Option<&Path>) -> Result<Self, ConfigError> {
        if let Some(path) = explicit {
            return Self::read(path);
        }
        let local = PathBuf::from(FILE_NAME);
        if local.is_file() {
            return Self::read(&local);
        }
        if let Some(dirs) = project_dirs() {
            let user = dirs.config_dir().join(FILE_NAME);
            if user.is_file() {
                return Self::read(&user);
            }
        }
        Ok(Config::default())
    }
}
