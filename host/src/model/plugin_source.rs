//! Where `embedhost plugin add` takes a plugin from, and getting its bytes:
//! a file, read once within [`MAX_PLUGIN_FILE_BYTES`], or an `http(s)://`
//! URL, downloaded within the same bound and the model files' timeouts
//! ([`super::fetch`]), resumable when a sha256 will verify the result.
//!
//! # Invariants
//! - Nothing here writes outside the store's `plugins/.downloads/`, and
//!   nothing here decides what is stored: the caller verifies and checks
//!   the bytes returned.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::fetch::{self, FetchError};
use super::plugin::{PluginStoreError, io};
use super::{FetchOptions, FileSpec};
use crate::limits::MAX_PLUGIN_FILE_BYTES;

/// Where partial downloads wait to be resumed, in the store's plugins.
const DOWNLOADS: &str = ".downloads";

/// Where a plugin is added from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PluginFrom {
    /// A `.wasm` file.
    File(PathBuf),
    /// An `http://` or `https://` URL.
    Url(String),
}

impl PluginFrom {
    /// How the manifest and messages name it (a file by its absolute path).
    pub fn describe(&self) -> String {
        match self {
            PluginFrom::File(path) => std::fs::canonicalize(path)
                .unwrap_or_else(|_| path.clone())
                .display()
                .to_string(),
            PluginFrom::Url(url) => url.clone(),
        }
    }

    /// The name a plugin from here gets unless `--name` says otherwise: the
    /// file's name without `.wasm`, lowercased.
    pub fn default_name(&self) -> String {
        let last = match self {
            PluginFrom::File(path) => path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            PluginFrom::Url(url) => {
                let path = url.split('?').next().unwrap_or(url);
                path.rsplit('/').next().unwrap_or_default().to_string()
            }
        };
        last.strip_suffix(".wasm").unwrap_or(&last).to_lowercase()
    }
}

/// What `plugin add` is asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddPlugin {
    /// Where the plugin is.
    pub from: PluginFrom,
    /// Its name in the store (default: [`PluginFrom::default_name`]).
    pub name: Option<String>,
    /// The sha256 its bytes must have, lower-case, if one was given.
    pub sha256: Option<String>,
}

fn is_sha256(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

impl AddPlugin {
    /// Reads `source` (a file, or an `http(s)://` URL with an optional
    /// `#sha256=HEX`), `--name` and `--sha256`.
    ///
    /// # Errors
    /// [`PluginStoreError::Source`]: a fragment other than `sha256=HEX`, a
    /// sha256 that is not 64 hex digits, or two that differ.
    pub fn parse(
        source: &str,
        name: Option<String>,
        sha256: Option<String>,
    ) -> Result<Self, PluginStoreError> {
        let bad = |why: String| PluginStoreError::Source {
            source_text: source.to_string(),
            why,
        };
        let url = source.starts_with("https://") || source.starts_with("http://");
        let (from, fragment) = match source.split_once('#') {
            Some((url_part, fragment)) if url => (PluginFrom::Url(url_part.into()), Some(fragment)),
            _ if url => (PluginFrom::Url(source.into()), None),
            _ => (PluginFrom::File(source.into()), None),
        };
        let pinned = fragment
            .map(|f| {
                f.strip_prefix("sha256=")
                    .map(str::to_string)
                    .ok_or_else(|| bad("expected URL#sha256=HEX (64 hex digits)".into()))
            })
            .transpose()?;
        for given in pinned.iter().chain(&sha256) {
            if !is_sha256(given) {
                return Err(bad(format!("`{given}` is not a sha256 (64 hex digits)")));
            }
        }
        let sha256 = match (pinned, sha256) {
            (Some(a), Some(b)) if !a.eq_ignore_ascii_case(&b) => {
                return Err(bad(format!("its #sha256={a} and --sha256 {b} differ")));
            }
            (a, b) => a.or(b).map(|s| s.to_ascii_lowercase()),
        };
        Ok(AddPlugin { from, name, sha256 })
    }
}

/// The file at `path`, at most [`MAX_PLUGIN_FILE_BYTES`] of it (checked
/// before it is read, and again as it is: a file that grows is refused).
pub(super) fn read_bounded(path: &Path, from: &str) -> Result<Vec<u8>, PluginStoreError> {
    let too_large = || PluginStoreError::TooLarge {
        from: from.to_string(),
        limit: MAX_PLUGIN_FILE_BYTES,
    };
    let file = std::fs::File::open(path).map_err(io(path))?;
    if file.metadata().map_err(io(path))?.len() > MAX_PLUGIN_FILE_BYTES {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    file.take(MAX_PLUGIN_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io(path))?;
    if bytes.len() as u64 > MAX_PLUGIN_FILE_BYTES {
        return Err(too_large());
    }
    Ok(bytes)
}

/// Where a download of `url` waits to be resumed: one file per URL.
pub(super) fn download_path(root: &Path, url: &str) -> std::io::Result<PathBuf> {
    let dir = root.join(DOWNLOADS);
    std::fs::create_dir_all(&dir)?;
    let key = crate::files::sha256_hex(url.as_bytes());
    Ok(dir.join(format!("{}.part", &key[..32])))
}

/// Downloads `url` into `part`, at most [`MAX_PLUGIN_FILE_BYTES`], and
/// returns its bytes. With `resume` (the bytes will be verified against a
/// sha256), a partial file from an interrupted download is kept and only
/// the rest asked for; without, it starts over, since nothing could tell a
/// splice of two versions.
pub(super) fn download(
    url: &str,
    part: &Path,
    resume: bool,
    options: &FetchOptions,
) -> Result<Vec<u8>, PluginStoreError> {
    let limit = MAX_PLUGIN_FILE_BYTES;
    let name = PluginFrom::Url(url.to_string()).default_name();
    let fail = |e: FetchError| {
        PluginStoreError::Fetch(FetchError::Url {
            name: name.clone(),
            url: url.to_string(),
            source: Box::new(e),
        })
    };
    let have = match std::fs::metadata(part).map(|m| m.len()) {
        Ok(have) if resume && have <= limit => have,
        _ => {
            let _ = std::fs::remove_file(part);
            0
        }
    };
    let timeouts = &options.http;
    let response = fetch::get(url, have, timeouts.total(limit), timeouts).map_err(fail)?;
    let (file, start) = match response.status().as_u16() {
        206 if have > 0 => {
            let file = std::fs::OpenOptions::new().append(true).open(part);
            (file.map_err(|e| fail(fetch::file_error(part)(e)))?, have)
        }
        200 => {
            let file = std::fs::File::create(part);
            (file.map_err(|e| fail(fetch::file_error(part)(e)))?, 0)
        }
        // Everything was already there (the sha256 will tell).
        416 if have > 0 => return std::fs::read(part).map_err(io(part)),
        other => return Err(fail(FetchError::Status(other))),
    };
    // The announced length, if any: the bar's end, and what a body that
    // ends early falls short of (the limit holds whatever it says).
    let announced = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .map(|n| n.saturating_add(start));
    let body = response
        .into_body()
        .into_with_config()
        .limit(limit.saturating_sub(start).saturating_add(1))
        .reader();
    let spec = FileSpec::named(&name, announced.filter(|&n| n <= limit).unwrap_or(limit));
    let written = fetch::receive(
        body,
        file,
        part,
        &spec,
        start,
        options.progress,
        timeouts.read,
    )
    .map_err(fail)?;
    if written > limit {
        let _ = std::fs::remove_file(part);
        return Err(PluginStoreError::TooLarge {
            from: url.to_string(),
            limit,
        });
    }
    if let Some(size) = announced.filter(|&size| written < size) {
        return Err(fail(FetchError::Short { written, size }));
    }
    std::fs::read(part).map_err(io(part))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "ab00000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn a_source_is_a_file_or_a_url_with_its_sha256() {
        let add = AddPlugin::parse("plugins/My_Embedder.wasm", None, None).unwrap();
        assert_eq!(
            add.from,
            PluginFrom::File("plugins/My_Embedder.wasm".into())
        );
        assert_eq!(add.from.default_name(), "my_embedder");
        let upper = SHA.to_uppercase();
        let add = AddPlugin::parse(
            &format!("https://h/p/e.wasm?x=1#sha256={upper}"),
            None,
            None,
        )
        .unwrap();
        assert_eq!(add.from, PluginFrom::Url("https://h/p/e.wasm?x=1".into()));
        assert_eq!(
            (add.from.default_name(), add.sha256.as_deref()),
            ("e".into(), Some(SHA))
        );
        let same = AddPlugin::parse(&format!("http://h/e.wasm#sha256={SHA}"), None, Some(upper));
        assert_eq!(same.unwrap().sha256.as_deref(), Some(SHA));
        let other = SHA.replace("ab", "cd");
        for (source, sha256, expected) in [
            ("https://h/e.wasm#md5=00", None, "expected URL#sha256=HEX"),
            ("https://h/e.wasm#sha256=abc", None, "`abc` is not a sha256"),
            ("e.wasm", Some("xyz".to_string()), "`xyz` is not a sha256"),
            (
                &format!("https://h/e.wasm#sha256={SHA}")[..],
                Some(other),
                "differ",
            ),
        ] {
            let err = AddPlugin::parse(source, None, sha256)
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{source}: {err}");
        }
    }
}
