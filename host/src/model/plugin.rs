//! Plugins kept in the model store: `embedhost plugin add`, `plugin list`
//! and `plugin remove`, and the file `[plugin] name` loads.
//!
//! A stored plugin is a directory `<store>/plugins/<name>/` holding
//! [`PLUGIN_FILE`] and its manifest, [`ADDED_MANIFEST`], in the format of an
//! added model's: `id` (the plugin's name), `name` (where it came from),
//! and one `[[files]]` entry pinning the file by sha256 and size with its
//! source (a `path` or an `https` URL); `contract` is the version of the
//! contract it was built for.
//!
//! # Invariants
//! - What is stored is what was checked: `add` reads the plugin once,
//!   within [`MAX_PLUGIN_FILE_BYTES`](crate::limits::MAX_PLUGIN_FILE_BYTES), hashes those bytes, verifies them
//!   against the sha256 it was given (if any) before anything else, has the
//!   caller check them (the host's own load: a component of the contract),
//!   and writes those bytes.
//! - `add` builds the plugin's directory under a temporary name in the
//!   store and renames it at the end: a failed add leaves nothing behind
//!   but a partial download a later add of the same URL resumes.
//! - [`resolve`] gives a stored plugin's file with its manifest's sha256,
//!   and the host loads it pinned (`PluginSource::Pinned`): a file changed
//!   in the store after `add` is refused at every load, naming both hashes.
//! - A name is a plain lowercase name ([`valid_id`]); `remove` removes only
//!   a directory with a plugin's manifest.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::add::{ADDED_MANIFEST, Staging, valid_id};
use super::fetch::FetchError;
use super::manifest::{check_file, file_entry, plain_name};
pub use super::plugin_source::{AddPlugin, PluginFrom};
use super::plugin_source::{download, download_path, read_bounded};
use super::{FetchOptions, FileSpec, FileState, ManifestError, ModelStore};
use crate::limits::MAX_ADDED_MODEL_ID_BYTES;

/// The store's directory of plugins (a model id `model add` refuses).
pub const PLUGINS_DIR: &str = "plugins";

/// A stored plugin's file, in its directory.
pub const PLUGIN_FILE: &str = "plugin.wasm";

/// Why a plugin cannot be added, found, or removed.
#[derive(Debug, thiserror::Error)]
pub enum PluginStoreError {
    #[error("`{source_text}`: {why}")]
    Source { source_text: String, why: String },
    #[error(
        "plugin name `{0}` is not a plain lowercase name (a-z, 0-9, `.`, `_`, `-`, starting with a letter or digit, at most {MAX_ADDED_MODEL_ID_BYTES} bytes); choose one with --name"
    )]
    BadName(String),
    #[error(
        "a plugin `{name}` is already in the store ({dir:?}); `embedhost plugin remove {name}` removes it"
    )]
    Exists { name: String, dir: PathBuf },
    #[error(
        "no plugin `{name}` in the store {dir:?} (stored: {known}); `embedhost plugin add` adds one"
    )]
    NotStored {
        name: String,
        dir: PathBuf,
        known: String,
    },
    #[error(
        "`{from}` is larger than a plugin may be: at most {limit} bytes (limits::MAX_PLUGIN_FILE_BYTES)"
    )]
    TooLarge { from: String, limit: u64 },
    #[error("`{from}` has sha256 {actual}, but it was given as {expected}: refused")]
    Mismatch {
        from: String,
        expected: String,
        actual: String,
    },
    #[error(transparent)]
    Fetch(FetchError),
    #[error("{0}: offline, and a URL is fetched online only")]
    Offline(String),
    #[error("not added: {0}")]
    NotAPlugin(#[source] CheckError),
    #[error("{path:?}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Store(#[from] super::ModelError),
}

pub(super) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PluginStoreError + '_ {
    move |source| PluginStoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A stored plugin's manifest: the format of an added model's, with the
/// plugin's one file.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginManifest {
    /// The plugin's name: its directory's in the store.
    pub id: String,
    /// Where it came from (for people).
    pub name: String,
    /// The version of the contract it was built for, as its load found it.
    pub contract: Option<String>,
    /// Its one file, [`PLUGIN_FILE`].
    files: Vec<FileSpec>,
}

impl PluginManifest {
    /// Parses and validates a plugin's manifest; `origin` names it in
    /// errors.
    ///
    /// # Errors
    /// [`ManifestError`] naming the manifest and what is wrong.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ManifestError> {
        let error = |message: String| ManifestError {
            origin: origin.to_string(),
            message,
        };
        let manifest: PluginManifest =
            toml::from_str(text).map_err(|e| error(e.to_string().trim().to_string()))?;
        if !plain_name(&manifest.id) {
            return Err(error(format!("id `{}` is not a plain name", manifest.id)));
        }
        match manifest.files.as_slice() {
            [file] if file.name == PLUGIN_FILE => check_file(file, &[]).map_err(error)?,
            _ => {
                return Err(error(format!(
                    "a plugin's manifest lists one file, `{PLUGIN_FILE}`"
                )));
            }
        }
        Ok(manifest)
    }

    /// The plugin's file: its sha256, size and source.
    pub fn file(&self) -> &FileSpec {
        // `parse` made sure there is exactly one.
        &self.files[0]
    }

    /// Where its file can be had again: a path or a URL.
    pub fn source(&self) -> &str {
        let file = self.file();
        file.path
            .as_deref()
            .or(file.https.as_deref())
            .unwrap_or_default()
    }
}

/// The directory of the store's plugins.
pub fn plugins_dir(store: &ModelStore) -> PathBuf {
    store.root().join(PLUGINS_DIR)
}

/// The manifest of the stored plugin `name`, if there is one.
pub fn manifest(
    store: &ModelStore,
    name: &str,
) -> Option<Result<PluginManifest, PluginStoreError>> {
    if !valid_id(name) {
        return None;
    }
    let path = plugins_dir(store).join(name).join(ADDED_MANIFEST);
    let text = std::fs::read_to_string(&path).ok()?;
    let origin = path.display().to_string();
    Some(match PluginManifest::parse(&text, &origin) {
        Ok(manifest) if manifest.id == name => Ok(manifest),
        Ok(manifest) => Err(ManifestError {
            origin,
            message: format!("its id is `{}`, not its directory's", manifest.id),
        }
        .into()),
        Err(e) => Err(e.into()),
    })
}

/// The names of the stored plugins, sorted.
pub fn names(store: &ModelStore) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(plugins_dir(store))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.path().join(ADDED_MANIFEST).is_file())
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|name| valid_id(name))
        .collect();
    names.sort();
    names
}

/// The file and sha256 of the stored plugin `name`: what `[plugin] name`
/// loads, pinned.
///
/// # Errors
/// [`PluginStoreError::NotStored`] listing the stored plugins, or a
/// manifest that does not parse.
pub fn resolve(store: &ModelStore, name: &str) -> Result<(PathBuf, String), PluginStoreError> {
    let manifest = manifest(store, name).unwrap_or_else(|| Err(not_stored(store, name)))?;
    let path = plugins_dir(store).join(name).join(PLUGIN_FILE);
    Ok((path, manifest.file().sha256.clone()))
}

/// [`PluginStoreError::NotStored`] for `name`, listing the stored plugins.
fn not_stored(store: &ModelStore, name: &str) -> PluginStoreError {
    let known = names(store);
    PluginStoreError::NotStored {
        name: name.to_string(),
        dir: plugins_dir(store),
        known: if known.is_empty() {
            "none".into()
        } else {
            known.join(", ")
        },
    }
}

/// The stored file's state against its manifest: its size and sha256
/// (hashed whole).
pub fn state(store: &ModelStore, manifest: &PluginManifest) -> FileState {
    super::check_file(
        &plugins_dir(store).join(&manifest.id),
        manifest.file(),
        true,
    )
}

/// What [`add`] did: the manifest written, and whether the bytes were
/// verified against a sha256 given with them.
#[derive(Debug)]
pub struct Added {
    /// The new plugin's manifest.
    pub manifest: PluginManifest,
    /// Its directory in the store.
    pub dir: PathBuf,
    /// Whether its sha256 was given (and matched); else it is the hash of
    /// what was read, recorded as it was.
    pub verified: bool,
}

/// Why a plugin's check refused it (the host's load error).
pub type CheckError = Box<dyn std::error::Error + Send + Sync>;

/// Adds the plugin `request` names to `store`, its bytes checked by
/// `check` first: given the plugin's name for messages and its bytes, it
/// gives the contract version the plugin was built for, or why it is
/// refused (the host's own load).
///
/// # Errors
/// [`PluginStoreError`]: the name is refused or taken, the file cannot be
/// read or fetched, is past the size bound, differs from the sha256 given,
/// or `check` refuses it. Nothing is added then.
pub fn add(
    store: &ModelStore,
    request: &AddPlugin,
    options: &FetchOptions,
    check: impl FnOnce(&str, &[u8]) -> Result<String, CheckError>,
) -> Result<Added, PluginStoreError> {
    let name = request
        .name
        .clone()
        .unwrap_or_else(|| request.from.default_name());
    if !valid_id(&name) {
        return Err(PluginStoreError::BadName(name));
    }
    let root = plugins_dir(store);
    let target = root.join(&name);
    let exists = || PluginStoreError::Exists {
        name: name.clone(),
        dir: target.clone(),
    };
    if target.exists() {
        return Err(exists());
    }
    std::fs::create_dir_all(&root).map_err(io(&root))?;
    let from = request.from.describe();
    let (bytes, part) = match &request.from {
        PluginFrom::File(path) => (read_bounded(path, &from)?, None),
        PluginFrom::Url(url) if options.offline => {
            return Err(PluginStoreError::Offline(url.clone()));
        }
        PluginFrom::Url(url) => {
            let part = download_path(&root, url).map_err(io(&root))?;
            let resume = request.sha256.is_some();
            (download(url, &part, resume, options)?, Some(part))
        }
    };
    let actual = crate::files::sha256_hex(&bytes);
    if let Some(expected) = &request.sha256
        && *expected != actual
    {
        if let Some(part) = &part {
            let _ = std::fs::remove_file(part);
        }
        return Err(PluginStoreError::Mismatch {
            from,
            expected: expected.clone(),
            actual,
        });
    }
    let contract = check(&from, &bytes).map_err(PluginStoreError::NotAPlugin)?;
    let staging = Staging(crate::files::temporary(&root.join(format!("add-{name}"))));
    std::fs::create_dir(&staging.0).map_err(io(&staging.0))?;
    let file = staging.0.join(PLUGIN_FILE);
    crate::files::write_atomic(&file, &bytes).map_err(io(&file))?;
    let text = manifest_text(&name, &request.from, &contract, &actual, bytes.len());
    let manifest = PluginManifest::parse(&text, &format!("the manifest of plugin {name}"))?;
    let path = staging.0.join(ADDED_MANIFEST);
    crate::files::write_atomic(&path, text.as_bytes()).map_err(io(&path))?;
    if target.exists() {
        return Err(exists());
    }
    std::fs::rename(&staging.0, &target).map_err(io(&target))?;
    if let Some(part) = part {
        let _ = std::fs::remove_file(part);
    }
    Ok(Added {
        manifest,
        dir: target,
        verified: request.sha256.is_some(),
    })
}

/// The manifest of the plugin being added.
fn manifest_text(
    name: &str,
    from: &PluginFrom,
    contract: &str,
    sha256: &str,
    size: usize,
) -> String {
    let quote = |s: &str| toml::Value::String(s.to_string()).to_string();
    let described = from.describe();
    let source = match from {
        PluginFrom::File(_) => format!("path = {}", quote(&described)),
        PluginFrom::Url(url) => format!("https = {}", quote(url)),
    };
    let mut text = format!(
        "# Added by `embedhost plugin add {described}`: the plugin as it was then,\n\
         # pinned by sha256 and size, with where it can be had again.\n\n\
         id = {}\nname = {}\ncontract = {}\n",
        quote(name),
        quote(&described),
        quote(contract),
    );
    text.push_str(&file_entry(PLUGIN_FILE, None, sha256, size as u64, &source));
    text
}

/// Removes the stored plugin `name`: its directory, file and manifest.
///
/// # Errors
/// [`PluginStoreError::NotStored`] for a name with no stored plugin, or the
/// removal's error.
pub fn remove(store: &ModelStore, name: &str) -> Result<PathBuf, PluginStoreError> {
    let root = plugins_dir(store);
    let dir = root.join(name);
    if !valid_id(name) || !dir.join(ADDED_MANIFEST).is_file() {
        return Err(not_stored(store, name));
    }
    // Out of sight at once, then deleted.
    let gone = crate::files::temporary(&root.join(format!("remove-{name}")));
    std::fs::rename(&dir, &gone).map_err(io(&dir))?;
    std::fs::remove_dir_all(&gone).map_err(io(&gone))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "ab00000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn a_plugin_manifest_lists_its_one_file() {
        let text = manifest_text(
            "e",
            &PluginFrom::Url("https://h/e.wasm".into()),
            "0.1.1",
            SHA,
            12,
        );
        let manifest = PluginManifest::parse(&text, "m.toml").unwrap();
        assert_eq!(
            (manifest.id.as_str(), manifest.contract.as_deref()),
            ("e", Some("0.1.1"))
        );
        assert_eq!(
            (manifest.file().size, manifest.source()),
            (12, "https://h/e.wasm")
        );
        let two = format!(
            "{text}{}",
            file_entry("x.bin", None, SHA, 1, "path = \"/x\"")
        );
        let renamed = text.replace("\"plugin.wasm\"", "\"other.wasm\"");
        for bad in [two, renamed, text.replace("id = ", "idd = ")] {
            let err = PluginManifest::parse(&bad, "m.toml")
                .unwrap_err()
                .to_string();
            assert!(err.contains("m.toml"), "{err}");
        }
    }
}
