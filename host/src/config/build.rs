//! What a configuration builds: the backends' spawners and limits, the
//! supervisor's and the worker's settings, the tables a plugin is given,
//! and the identities an index records.
//!
//! # Invariants
//! - Built from a parsed (so valid) [`Config`]; nothing here fails on a
//!   value, only on what the machine lacks (an executable, model files, the
//!   ONNX Runtime library), and says which.
//! - Both backends are given the same model id for the same configuration,
//!   so an index stays valid across a backend swap.
//! - Defaults come from [`crate::limits`] and [`SupervisorConfig::default`];
//!   a configured value replaces them, never adds to them.

use std::path::Path;
use std::time::Duration;

use embedhost_text::Pooling;

use super::{Backend, Config, DEFAULT_PLUGIN, NativeSetupError, Precision};
use crate::limits;
use crate::supervisor::SupervisorConfig;
use crate::wasm::{InstanceLimits, PluginSource};

impl super::PluginSection {
    /// Runs the plugin file `path` instead of the configured plugin (`embed
    /// --plugin`, `plugin test`): a stored plugin's pin goes with it.
    pub fn replace_path(&mut self, path: std::path::PathBuf) {
        if self.name.take().is_some() {
            self.sha256 = None;
        }
        self.path = Some(path);
    }
}

impl Config {
    /// The plugin to load.
    pub fn plugin_source(&self) -> PluginSource {
        match &self.plugin.path {
            Some(path) => match (PluginSource::from_path(path), &self.plugin.sha256) {
                (PluginSource::File(path), Some(sha256)) => PluginSource::Pinned {
                    path,
                    sha256: sha256.clone(),
                },
                (source, _) => source,
            },
            None => {
                PluginSource::builtin(DEFAULT_PLUGIN).unwrap_or_else(PluginSource::builtin_stub)
            }
        }
    }

    /// The native backend's spawner.
    ///
    /// # Errors
    /// [`NativeSetupError`]: the path of this executable cannot be found and
    /// none is configured, or (onnx engine) no model directory, or a file
    /// it needs is missing.
    pub fn native_spawner(
        &self,
        model_dir: Option<&Path>,
    ) -> Result<crate::native::NativeSpawner, NativeSetupError> {
        let executable = match &self.native.executable {
            Some(exe) => exe.clone(),
            None => std::env::current_exe().map_err(NativeSetupError::Executable)?,
        };
        let mut settings = self.plugin_config();
        if self.native.engine == "onnx" {
            let dir = model_dir.ok_or(NativeSetupError::NoModelDir)?;
            settings.extend(self.onnx_settings(dir)?);
        }
        Ok(crate::native::NativeSpawner {
            executable,
            engine: self.native.engine.clone(),
            settings,
            init_deadline: Duration::from_millis(self.limits.init_deadline_ms),
            call_deadline: Duration::from_millis(self.limits.call_deadline_ms),
            call_deadline_per_kib: Duration::from_millis(self.limits.call_deadline_per_kib_ms),
            grace: Duration::from_millis(self.native.grace_ms),
            memory_ceiling: match self.native.memory_ceiling_mb {
                None => Some(limits::DEFAULT_CHILD_MEMORY_CEILING),
                Some(0) => None,
                Some(mb) => Some(mb.saturating_mul(1024 * 1024)),
            },
        })
    }

    /// The onnx engine's settings for the model in `dir`, its files
    /// checked.
    fn onnx_settings(&self, dir: &Path) -> Result<Vec<(String, String)>, NativeSetupError> {
        // Checked here, once, rather than by every child the supervisor
        // would start and restart before giving up.
        let model_file = self.onnx_model_file();
        let library = self.check_onnx_files(dir, model_file)?;
        let (pooling, normalize) = self.model_pooling();
        let onnx = crate::native::onnx::OnnxSettings {
            model_dir: dir.to_path_buf(),
            library,
            threads: self.native_threads(),
            max_tokens: None,
            // The id the model store knows, whichever backend serves it,
            // so an index built on one backend stays valid on the other.
            model_id: (!self.plugin.config.contains_key("model_id"))
                .then(|| self.model_id().to_string()),
            model_file: (model_file != crate::native::onnx::DEFAULT_MODEL_FILE)
                .then(|| model_file.to_string()),
            // The model's, unless `[plugin] config` sets them (its pairs
            // come first in the settings).
            pooling,
            normalize,
        };
        Ok(onnx.to_pairs())
    }

    /// What identifies the configured embedder beyond its model id: the
    /// backend, the plugin (its path with size and modification time, or
    /// the built-in one of this embedhost version), the native engine and
    /// precision, and the plugin's settings. An index records it, and
    /// retries the files an embedder failed on when it changes.
    pub fn embedder_id(&self) -> String {
        let plugin = match self.plugin_source() {
            PluginSource::File(path) => {
                let stamp = std::fs::metadata(&path)
                    .ok()
                    .map(|m| {
                        let mtime = m
                            .modified()
                            .ok()
                            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                            .map_or(0, |d| d.as_nanos());
                        format!("{}:{mtime}", m.len())
                    })
                    .unwrap_or_default();
                format!("{}@{stamp}", path.display())
            }
            PluginSource::Pinned { path, sha256 } => format!("{}@sha256:{sha256}", path.display()),
            PluginSource::Bytes { name, .. } => {
                format!("{name}@embedhost-{}", env!("CARGO_PKG_VERSION"))
            }
        };
        let engine = match self.backend {
            Backend::Wasm => plugin,
            Backend::Native => format!("{}:{:?}", self.native.engine, self.native.precision),
        };
        format!(
            "{}|{engine}|{}|{:?}",
            self.backend.name(),
            self.model_id(),
            self.plugin_config()
        )
    }

    /// Whether the WASM plugin is given the model's directory (read-only):
    /// for the built-in BERT plugin, and for any plugin when the config
    /// names a model (`[model] id` or `dir`).
    pub fn wasm_needs_model(&self) -> bool {
        self.model.id.is_some()
            || self.model.dir.is_some()
            || matches!(self.plugin_source(), PluginSource::Bytes { ref name, .. } if name == "builtin:bert")
    }

    /// The graph the onnx engine loads from the model's directory.
    pub fn onnx_model_file(&self) -> &'static str {
        match (self.native.precision, &self.model.dir) {
            (Precision::Int8, None) => crate::native::onnx::INT8_MODEL_FILE,
            _ => crate::native::onnx::DEFAULT_MODEL_FILE,
        }
    }

    /// Whether WASM instances start from a pre-initialized snapshot: for a
    /// plugin given a model, unless `[plugin] snapshot = false`.
    pub fn wasm_snapshot(&self) -> bool {
        self.wasm_needs_model() && self.plugin.snapshot != Some(false)
    }

    /// Whether the backend loads model files (the native onnx engine).
    pub fn needs_model_files(&self) -> bool {
        self.backend == Backend::Native && self.native.engine == "onnx"
    }

    /// Whether the backend that runs loads the model's files: the WASM
    /// plugin given them ([`Config::wasm_needs_model`]) on the WASM backend,
    /// the onnx engine on the native one (a native `stub` engine needs none,
    /// whatever the plugin line says).
    pub fn uses_model_files(&self) -> bool {
        match self.backend {
            Backend::Wasm => self.wasm_needs_model(),
            Backend::Native => self.needs_model_files(),
        }
    }

    /// Intra-op threads of each native child.
    pub fn native_threads(&self) -> usize {
        self.native.threads.unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores / self.supervisor_config().pool_size.max(1)).max(1)
        })
    }

    /// The table passed to the plugin's `init` (or the native engine).
    pub fn plugin_config(&self) -> Vec<(String, String)> {
        self.plugin
            .config
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect()
    }

    /// The table the engine behind a `model-plugin`'s encoder gets: the
    /// configured model's id and its own pooling and normalization (never
    /// `[plugin.config]`'s, which are the plugin's), then `[plugin.encoder]`,
    /// whose keys override them.
    pub fn encoder_config(&self) -> Vec<(String, String)> {
        let mut config = vec![("model_id".to_string(), self.model_id().to_string())];
        let (pooling, normalize) = self.own_pooling().unwrap_or((Pooling::default(), true));
        if pooling != Pooling::default() {
            config.push(("pooling".into(), pooling.name().into()));
        }
        if !normalize {
            config.push(("normalize".into(), "false".into()));
        }
        let set: Vec<(String, String)> = self
            .plugin
            .encoder
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect();
        config.retain(|(k, _)| !set.iter().any(|(s, _)| s == k));
        config.extend(set);
        config
    }

    /// The table a WASM plugin's `init` gets: `[plugin] config`, plus the
    /// configured model's id for a plugin given a model (unless the table
    /// sets `model_id`), so both backends report the same model and an
    /// index stays valid across a backend swap.
    pub fn wasm_plugin_config(&self) -> Vec<(String, String)> {
        let mut config = self.plugin_config();
        if self.wasm_needs_model() && !self.plugin.config.contains_key("model_id") {
            config.push(("model_id".into(), self.model_id().to_string()));
        }
        if self.wasm_needs_model() {
            let (pooling, normalize) = self.model_pooling();
            if pooling != Pooling::default() {
                config.push(("pooling".into(), pooling.name().into()));
            }
            if !normalize {
                config.push(("normalize".into(), "false".into()));
            }
        }
        config
    }

    /// How the configured model's token states become its vectors, and
    /// whether they are normalized: as its manifest (built in or added) or
    /// its directory's sentence-transformers description says (the
    /// defaults, mean and normalized, for a directory without one), each unless
    /// `[plugin] config` sets it, so the user's setting wins (it reaches
    /// the backend through [`Config::plugin_config`], and this gives the
    /// default for it).
    /// How the configured model pools, all told: `[plugin] config`'s
    /// `pooling` if it names a mode, else what the model itself says (see
    /// [`Config::model_pooling`]).
    pub fn pooling(&self) -> Pooling {
        match self.plugin.config.get("pooling") {
            Some(super::Value::String(mode)) => Pooling::from_name(mode).unwrap_or_default(),
            _ => self.model_pooling().0,
        }
    }

    fn model_pooling(&self) -> (Pooling, bool) {
        let Some((pooling, normalize)) = self.own_pooling() else {
            return (Pooling::default(), true);
        };
        let unset = |key: &str| !self.plugin.config.contains_key(key);
        (
            if unset("pooling") {
                pooling
            } else {
                Pooling::default()
            },
            !unset("normalize") || normalize,
        )
    }

    /// The model's own pooling and normalization, if its description or
    /// manifest says.
    fn own_pooling(&self) -> Option<(Pooling, bool)> {
        // A description that cannot be read fails the start (see
        // `Config::model_form`), so its defaults here are never served.
        match self.model.dir {
            Some(_) => self
                .model_description()
                .ok()
                .flatten()
                .map(|d| (d.pooling(), d.normalize())),
            None => crate::model::manifest(self.model_id())
                .ok()
                .map(|m| (m.pooling_mode(), m.normalize)),
        }
    }

    /// The NATS client's credentials and TLS.
    pub fn nats_options(&self) -> crate::bus::transport::nats::NatsOptions {
        crate::bus::transport::nats::NatsOptions {
            creds: self.nats.creds.clone(),
            tls_ca: self.nats.tls_ca.clone(),
            tls_cert: self.nats.tls_cert.clone().zip(self.nats.tls_key.clone()),
            require_tls: self.nats.require_tls,
        }
    }

    /// Per-instance limits.
    pub fn instance_limits(&self) -> InstanceLimits {
        InstanceLimits {
            memory_bytes: self.limits.memory_mb.saturating_mul(1024 * 1024),
            call_deadline: Duration::from_millis(self.limits.call_deadline_ms),
            call_deadline_per_kib: Duration::from_millis(self.limits.call_deadline_per_kib_ms),
            init_deadline: Duration::from_millis(self.limits.init_deadline_ms),
        }
    }

    /// The supervisor's settings.
    pub fn supervisor_config(&self) -> SupervisorConfig {
        let s = &self.supervisor;
        let mut c = SupervisorConfig::default();
        let ms = Duration::from_millis;
        c.pool_size = s.pool_size.unwrap_or(c.pool_size).max(1);
        c.restart = s.restart.unwrap_or(c.restart);
        c.intensity.max_restarts = s.max_restarts.unwrap_or(c.intensity.max_restarts);
        c.intensity.window = s.restart_window_ms.map_or(c.intensity.window, ms);
        c.intensity.backoff_min = s.restart_backoff_min_ms.map_or(c.intensity.backoff_min, ms);
        c.intensity.backoff_max = s
            .restart_backoff_max_ms
            .map_or(c.intensity.backoff_max, ms)
            .max(c.intensity.backoff_min);
        c.health_interval = s.health_interval_ms.map_or(c.health_interval, ms);
        c.health_timeout = s.health_timeout_ms.map_or(c.health_timeout, ms);
        c.max_memory_bytes = s.recycle_memory_bytes.unwrap_or(c.max_memory_bytes);
        c.max_processed = s.recycle_processed.unwrap_or(c.max_processed);
        c.poison_after = s.poison_after.unwrap_or(c.poison_after).max(1);
        c
    }

    /// The artifact cache: [`Config::cache_dir`] within `[cache] max_mb`.
    pub fn artifact_cache(&self) -> Option<crate::wasm::ArtifactCache> {
        let budget = self
            .cache
            .max_mb
            .map_or(limits::DEFAULT_CACHE_MAX_BYTES, |mb| {
                mb.saturating_mul(1024 * 1024)
            });
        self.cache_dir()
            .map(|dir| crate::wasm::ArtifactCache::new(dir).with_max_bytes(budget))
    }
}
