//! Model manifests: which files a model has, their sha256 and size, and
//! where each can be fetched from.
//!
//! # Invariants
//! - A file name is a plain name (no `/`, no `..`): a manifest can never make
//!   `model fetch` write outside the model's directory.
//! - A derived file comes after the files it is made from, so fetching in
//!   manifest order always has its inputs ready.
//! - Every file has at least one source; a `path` source is absolute.
//! - `pooling` names a mode of sentence-transformers' Pooling module.

use embedhost_text::Pooling;
use serde::Deserialize;

/// A model manifest (`models/<id>.toml`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The model's id: its directory's name in the model store.
    pub id: String,
    /// Where the model comes from (for people).
    pub name: String,
    /// Length of its vectors.
    pub dimension: u32,
    /// Its truncation length, in tokens.
    pub max_tokens: u32,
    /// How token states become its vector (`mean`, `cls`, `max`,
    /// `lasttoken`, `weightedmean`), as its sentence-transformers Pooling
    /// module says; default mean.
    #[serde(default = "mean")]
    pub pooling: String,
    /// Whether its vectors are L2-normalized (sentence-transformers'
    /// Normalize module); default true.
    #[serde(default = "yes")]
    pub normalize: bool,
    /// The prompt put before a query (its sentence-transformers `prompts`
    /// entry `query`), if any.
    #[serde(default)]
    pub query_prompt: Option<String>,
    /// The prompt put before a document (`document`, `passage` or `corpus`),
    /// if any.
    #[serde(default)]
    pub document_prompt: Option<String>,
    /// Whether a text is lowercased before the tokenizer sees it
    /// (`sentence_bert_config.json`'s `do_lower_case`); default false.
    #[serde(default)]
    pub do_lower_case: bool,
    /// The model's files.
    pub files: Vec<FileSpec>,
}

/// One file of a model.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// File name in the model directory.
    pub name: String,
    /// Lower-case hex.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// The file's content, written by the manifest itself (a small
    /// configuration file no source publishes as this model needs it);
    /// tried first, and verified like any source.
    pub text: Option<String>,
    /// An absolute path of a local file it is a copy of (a model added from
    /// a directory, `embedhost model add DIR`): copied and verified like any
    /// source, tried after `text`.
    pub path: Option<String>,
    /// An HTTPS URL serving the file (tried first, unless offline).
    pub https: Option<String>,
    /// A PyPI package holding the file.
    pub pip: Option<PipSource>,
    /// A recipe making the file from other files of the model.
    pub derive: Option<Derive>,
    /// The backends that load the file at run time (`wasm`, `native`);
    /// absent: both. A backend's first use fetches only its files (and what
    /// they are derived from).
    pub needed_by: Option<Vec<String>>,
}

fn mean() -> String {
    Pooling::Mean.name().to_string()
}

fn yes() -> bool {
    true
}

/// What a file can be needed by: a backend, or the native backend at int8
/// precision (`[native] precision = "int8"`).
pub const BACKENDS: &[&str] = &["wasm", "native", "native-int8"];

/// A file inside a PyPI package.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipSource {
    /// The PyPI package.
    pub package: String,
    /// Its exact version.
    pub version: String,
    /// The file's path in the wheel.
    pub member: String,
    /// When `member` is itself a zip: the file's path inside it.
    pub inner: Option<String>,
}

/// A file made by a script built into embedhost.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Derive {
    /// The script (see [`super::fetch::SCRIPTS`]).
    pub script: String,
    /// The files of this model it reads.
    pub from: Vec<String>,
}

/// A manifest that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid model manifest `{origin}`: {message}")]
pub struct ManifestError {
    /// Which manifest.
    pub origin: String,
    /// What is wrong.
    pub message: String,
}

impl FileSpec {
    /// A file known only by its name and (expected) size, with no sha256
    /// and no source: what a download's progress bar reads.
    pub(super) fn named(name: &str, size: u64) -> Self {
        FileSpec {
            name: name.to_string(),
            sha256: String::new(),
            size,
            text: None,
            path: None,
            https: None,
            pip: None,
            derive: None,
            needed_by: None,
        }
    }
}

impl Manifest {
    /// Parses and validates a manifest; `origin` names it in errors.
    ///
    /// # Errors
    /// [`ManifestError`] naming the manifest and what is wrong.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ManifestError> {
        let error = |message: String| ManifestError {
            origin: origin.to_string(),
            message,
        };
        let manifest: Manifest =
            toml::from_str(text).map_err(|e| error(e.to_string().trim().to_string()))?;
        if !plain_name(&manifest.id) {
            return Err(error(format!("id `{}` is not a plain name", manifest.id)));
        }
        if Pooling::from_name(&manifest.pooling).is_none() {
            return Err(error(format!(
                "pooling `{}` is not one of {}",
                manifest.pooling,
                Pooling::names()
            )));
        }
        let mut seen: Vec<&str> = Vec::new();
        for file in &manifest.files {
            check_file(file, &seen).map_err(error)?;
            seen.push(file.name.as_str());
        }
        if manifest.files.is_empty() {
            return Err(error("the manifest lists no file".into()));
        }
        Ok(manifest)
    }

    /// The files `backend` needs (all files for `None`), with every file
    /// they are derived from, in manifest order.
    pub fn files_for(&self, backend: Option<&str>) -> Vec<&FileSpec> {
        let mut wanted: Vec<&str> = self
            .files
            .iter()
            .filter(|f| match (backend, &f.needed_by) {
                (Some(b), Some(users)) => users.iter().any(|u| u == b),
                _ => true,
            })
            .map(|f| f.name.as_str())
            .collect();
        // Inputs come before the files derived from them: one pass from the
        // end collects the whole closure.
        for file in self.files.iter().rev() {
            if wanted.contains(&file.name.as_str())
                && let Some(derive) = &file.derive
            {
                wanted.extend(derive.from.iter().map(String::as_str));
            }
        }
        self.files
            .iter()
            .filter(|f| wanted.contains(&f.name.as_str()))
            .collect()
    }

    /// How token states become the model's vector (checked by
    /// [`Manifest::parse`]).
    pub fn pooling_mode(&self) -> Pooling {
        Pooling::from_name(&self.pooling).unwrap_or_default()
    }

    /// The prompts and lowercasing its texts get (applied by the front
    /// door, see [`super::form`]).
    pub fn form(&self) -> super::form::TextForm {
        super::form::TextForm::new(
            self.query_prompt.clone(),
            self.document_prompt.clone(),
            self.do_lower_case,
        )
    }

    /// The file called `name`.
    pub fn file(&self, name: &str) -> Option<&FileSpec> {
        self.files.iter().find(|f| f.name == name)
    }
}

/// What is wrong with `file`, if anything, given the names listed before it.
pub(super) fn check_file(file: &FileSpec, seen: &[&str]) -> Result<(), String> {
    let name = file.name.as_str();
    if !plain_name(name) {
        return Err(format!("file name `{name}` is not a plain name"));
    }
    if seen.contains(&name) {
        return Err(format!("file `{name}` is listed twice"));
    }
    if file.sha256.len() != 64
        || !file
            .sha256
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(format!(
            "file `{name}`: sha256 must be 64 lower-case hex digits"
        ));
    }
    if file.text.is_none()
        && file.path.is_none()
        && file.https.is_none()
        && file.pip.is_none()
        && file.derive.is_none()
    {
        return Err(format!("file `{name}` has no source"));
    }
    if let Some(path) = &file.path
        && !std::path::Path::new(path).is_absolute()
    {
        return Err(format!("file `{name}`: path `{path}` is not absolute"));
    }
    if let Some(url) = &file.https
        && !url.starts_with("https://")
        && !url.starts_with("http://")
    {
        return Err(format!("file `{name}`: `{url}` is not an HTTP(S) URL"));
    }
    if let Some(unknown) = file
        .needed_by
        .iter()
        .flatten()
        .find(|b| !BACKENDS.contains(&b.as_str()))
    {
        return Err(format!(
            "file `{name}`: needed_by names `{unknown}` (known: wasm, native, native-int8)"
        ));
    }
    if let Some(derive) = &file.derive {
        for input in &derive.from {
            if !seen.contains(&input.as_str()) {
                return Err(format!(
                    "file `{name}` is derived from `{input}`, which is not listed before it"
                ));
            }
        }
    }
    Ok(())
}

pub(super) fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.starts_with('.')
        && !name.contains(['/', '\\', '\0'])
}

/// A `[[files]]` entry of a manifest as `model add` and `plugin add`
/// write it: `source` is its source line(s) (`path = ...`, `https = ...`,
/// `text = ...`, `derive = ...`).
pub(super) fn file_entry(
    name: &str,
    needed_by: Option<&str>,
    sha256: &str,
    size: u64,
    source: &str,
) -> String {
    let quote = |s: &str| toml::Value::String(s.to_string()).to_string();
    let mut text = format!("\n[[files]]\nname = {}\n", quote(name));
    if let Some(backend) = needed_by {
        text.push_str(&format!("needed_by = [{}]\n", quote(backend)));
    }
    text.push_str(&format!("sha256 = \"{sha256}\"\nsize = {size}\n{source}\n"));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
id = "m"
name = "a model"
dimension = 4
max_tokens = 8
[[files]]
name = "a.bin"
sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
size = 1
https = "https://example.invalid/a.bin"
[[files]]
name = "b.bin"
sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
size = 1
derive = { script = "bert_to_onnx", from = ["a.bin"] }
"#;

    #[test]
    fn the_builtin_manifest_parses() {
        let m = Manifest::parse(super::super::BUILTIN[0].1, "builtin").unwrap();
        assert_eq!(m.id, "all-minilm-l6-v2");
        assert_eq!(m.dimension, 384);
        assert!(m.file("model.onnx").unwrap().derive.is_some());
        let names = |b| {
            m.files_for(b)
                .iter()
                .map(|f| f.name.as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(Some("wasm")),
            [
                "config.json",
                "tokenizer.json",
                "sentence_bert_config.json",
                "model.safetensors"
            ]
        );
        // The ONNX graph, and what it is derived from.
        assert_eq!(names(Some("native")).len(), 5);
        // The int8 graph, and everything the fp32 graph needs.
        let int8 = names(Some("native-int8"));
        assert_eq!(int8.len(), 6);
        assert!(int8.contains(&"model.onnx") && int8.contains(&"model.int8.onnx"));
        assert!(!names(Some("native")).contains(&"model.int8.onnx"));
        assert_eq!(names(None).len(), 6);
    }

    #[test]
    fn a_good_manifest_parses() {
        let m = Manifest::parse(GOOD, "good.toml").unwrap();
        assert_eq!(m.files.len(), 2);
        // Mean pooling and normalized unless the manifest says otherwise.
        assert_eq!((m.pooling_mode(), m.normalize), (Pooling::Mean, true));
        let text = GOOD.replace(
            "https = \"https://example.invalid/a.bin\"",
            "text = '''\n{}\n'''",
        );
        let text = text.replace("max_tokens = 8", "max_tokens = 8\npooling = \"cls\"");
        let m = Manifest::parse(&text, "text.toml").unwrap();
        assert_eq!(m.files[0].text.as_deref(), Some("{}\n"));
        assert_eq!(m.pooling_mode(), Pooling::Cls);
    }

    #[test]
    fn the_second_builtin_manifest_assembles_its_model_from_several_sources() {
        let m = Manifest::parse(super::super::BUILTIN[1].1, "builtin").unwrap();
        assert_eq!(m.id, "paraphrase-minilm-l3-v2");
        assert_eq!((m.dimension, m.max_tokens), (384, 128));
        assert_eq!((m.pooling_mode(), m.normalize), (Pooling::Mean, false));
        let texts: Vec<_> = m.files.iter().filter(|f| f.text.is_some()).collect();
        assert_eq!(texts.len(), 2);
        for file in texts {
            let text = file.text.as_deref().unwrap();
            assert_eq!(text.len() as u64, file.size, "{}", file.name);
            let sha: String = <sha2::Sha256 as sha2::Digest>::digest(text.as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(sha, file.sha256, "{}", file.name);
        }
        let names = |b| {
            m.files_for(Some(b))
                .iter()
                .map(|f| f.name.as_str())
                .collect::<Vec<_>>()
        };
        // The plugin's weights are derived from the graph, which comes along.
        assert_eq!(names("wasm").len(), 5);
        assert_eq!(
            names("native"),
            ["sentence_bert_config.json", "tokenizer.json", "model.onnx"]
        );
        let int8 = names("native-int8");
        assert!(int8.contains(&"model.onnx") && int8.contains(&"model.int8.onnx"));
    }

    #[test]
    fn bad_manifests_are_refused_with_the_reason_and_origin() {
        let cases = [
            (
                GOOD.replace("a.bin\"\nsha", "../a.bin\"\nsha"),
                "plain name",
            ),
            (
                GOOD.replace("from = [\"a.bin\"]", "from = [\"c.bin\"]"),
                "not listed before",
            ),
            (
                GOOD.replacen(
                    "0000000000000000000000000000000000000000000000000000000000000000",
                    "abc",
                    1,
                ),
                "64 lower-case hex",
            ),
            (
                GOOD.replace("https = \"https://example.invalid/a.bin\"", ""),
                "no source",
            ),
            (GOOD.replace("max_tokens", "max_tokenz"), "max_tokenz"),
            (GOOD.replace("b.bin", "a.bin"), "listed twice"),
            (
                GOOD.replace("max_tokens = 8", "max_tokens = 8\npooling = \"avg\""),
                "pooling `avg` is not one of mean, cls",
            ),
        ];
        for (text, expected) in cases {
            let err = Manifest::parse(&text, "m.toml").unwrap_err().to_string();
            assert!(
                err.contains(expected) && err.contains("m.toml"),
                "{expected}: {err}"
            );
        }
    }
}
