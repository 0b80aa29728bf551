//! A model's own description, read from its directory as
//! sentence-transformers (v3 to v5) reads it, into a typed [`Description`];
//! what embedhost cannot run is refused.
//!
//! Read: `modules.json` (the pipeline), the Pooling module's `config.json`,
//! whether a Normalize module is there, the Transformer module's
//! `sentence_bert_config.json`, `config.json` (Hugging Face) and
//! `tokenizer_config.json`, and `config_sentence_transformers.json` (the
//! prompts). `tokenizer.json` must exist; it is not read here.
//!
//! # Invariants
//! - A [`Description`] exists only from [`describe`], and then embedhost's
//!   BERT engine can run the model as sentence-transformers would: the
//!   pipeline is one Transformer, one Pooling, then at most one Normalize,
//!   in that order; the transformer is `bert` with exact GELU and absolute
//!   positions; the pooling is exactly one of cls, mean, max, lasttoken and
//!   weightedmean, over vectors of the transformer's `hidden_size`; and
//!   `max_seq_length` is at least 1 and at most `max_position_embeddings`.
//! - Everything else is refused by one [`DescribeError`] that names the
//!   file (or, for a missing `tokenizer.json`, the directory) and what it
//!   asked for. Text from the files is quoted escaped and cut
//!   ([`MAX_MODEL_QUOTE_BYTES`]); a path is printed with `{:?}`.
//! - No JSON file larger than [`MAX_MODEL_JSON_BYTES`] is read, and no path
//!   from `modules.json` leaves the model's directory: absolute paths and
//!   `..` are refused. The check is on the path's text; symbolic links are
//!   followed (a Hugging Face cache's snapshot is made of them).
//! - Defaults are sentence-transformers' own: a Pooling config without
//!   `pooling_mode_mean_tokens` means mean (with any other mode it asks for
//!   two); `include_prompt` true; `do_lower_case` false; without
//!   `max_seq_length`, the smaller of `max_position_embeddings` and the
//!   tokenizer's `model_max_length` (`tokenizer_config.json`), as the
//!   Transformer module computes it.
//! - [`super::form::TextForm::apply`] is the one place a prompt is put before
//!   a text. A query takes the prompt named `query`, a document the first
//!   of `document`, `passage`, `corpus` (as `encode_query` and
//!   `encode_document` choose); without one, `default_prompt_name`'s; an
//!   empty prompt is none.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::limits::{MAX_MODEL_JSON_BYTES, MAX_MODEL_QUOTE_BYTES};

mod transformer;

use transformer::{read_sentence_bert, read_shape};

/// How token vectors become one vector: the engines' own type, so what is
/// read here is what they run.
pub use embedhost_text::Pooling;

/// The transformer's shape, from its Hugging Face `config.json` (each
/// field is the key of the same name).
#[derive(Clone, Debug, PartialEq)]
pub struct BertShape {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
}

/// A model's description: what embedhost needs to run it as
/// sentence-transformers does. See the module's invariants.
#[derive(Clone, Debug)]
pub struct Description {
    transformer_dir: PathBuf,
    pooling_config: PathBuf,
    shape: BertShape,
    pooling: Pooling,
    normalize: bool,
    max_seq_length: usize,
    do_lower_case: bool,
    query_prompt: Option<String>,
    document_prompt: Option<String>,
}

impl Description {
    /// The Transformer module's directory: where `config.json`, the weights
    /// and `tokenizer.json` are (the model's directory itself, usually).
    pub fn transformer_dir(&self) -> &Path {
        &self.transformer_dir
    }

    /// The Pooling module's `config.json`.
    pub fn pooling_config(&self) -> &Path {
        &self.pooling_config
    }

    /// The Transformer module's `tokenizer.json` (it exists).
    pub fn tokenizer(&self) -> PathBuf {
        self.transformer_dir.join(TOKENIZER)
    }

    /// The transformer's shape.
    pub fn shape(&self) -> &BertShape {
        &self.shape
    }

    /// The pooling.
    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// Whether vectors are L2-normalized (a Normalize module is there).
    pub fn normalize(&self) -> bool {
        self.normalize
    }

    /// The length of every vector (the transformer's `hidden_size`).
    pub fn dimension(&self) -> usize {
        self.shape.hidden_size
    }

    /// Tokens kept of an input, special tokens included; the rest is cut.
    pub fn max_seq_length(&self) -> usize {
        self.max_seq_length
    }

    /// Whether a text (its prompt included) is lowercased before the
    /// tokenizer sees it.
    pub fn do_lower_case(&self) -> bool {
        self.do_lower_case
    }

    /// The prompt put before a query (`is_query`) or a document, if any.
    pub fn prompt(&self, is_query: bool) -> Option<&str> {
        if is_query {
            self.query_prompt.as_deref()
        } else {
            self.document_prompt.as_deref()
        }
    }

    /// The prompts and lowercasing a text gets before the model sees it
    /// (applied by [`super::form::TextForm::apply`], the one place).
    pub fn form(&self) -> super::form::TextForm {
        super::form::TextForm::of(self)
    }
}

/// A model that cannot be described, or that embedhost cannot run: the
/// culprit file (or directory) and the problem.
#[derive(Debug, thiserror::Error)]
#[error("{path:?}: {problem}")]
pub struct DescribeError {
    /// The file (or, for [`Problem::NoTokenizer`], the directory).
    pub path: PathBuf,
    /// What is wrong with it.
    pub problem: Problem,
}

/// What is wrong with a file of a model's description. Quoted text from
/// the file is escaped and cut.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    #[error("cannot read it: {0}")]
    Unreadable(std::io::Error),
    #[error("is not a file")]
    NotAFile,
    #[error("is larger than {MAX_MODEL_JSON_BYTES} bytes; refused unread")]
    TooLarge,
    #[error("is not valid JSON of its kind at line {line} column {column}: {reason}")]
    Malformed {
        reason: String,
        line: usize,
        column: usize,
    },
    #[error(
        "module {index} is of type {kind}, which embedhost does not run (it runs \
         sentence_transformers.models.Transformer, Pooling and Normalize)"
    )]
    UnsupportedModule { index: usize, kind: String },
    #[error(
        "the modules are {found}; embedhost runs Transformer, Pooling, then an \
         optional Normalize"
    )]
    ModuleOrder { found: String },
    #[error("module {index}'s path {path} leaves the model's directory")]
    ModulePath { index: usize, path: String },
    #[error(
        "asks for pooling {modes}; embedhost runs exactly one of cls, mean, max, \
         lasttoken, weightedmean"
    )]
    PoolingModes { modes: String },
    #[error("pooling_mode {0} is not one of mean, max, cls, weightedmean, lasttoken")]
    PoolingMode(String),
    #[error(
        "word_embedding_dimension {pooling} differs from the transformer's \
         hidden_size {hidden}"
    )]
    PoolingDimension { pooling: usize, hidden: usize },
    #[error(
        "include_prompt is false, but embedhost pools over the prompt's tokens \
         too (the model has prompts)"
    )]
    ExcludesPrompt,
    #[error(
        "model_type {model_type} (architectures {architectures}) is not bert, the one embedhost runs"
    )]
    Architecture {
        model_type: String,
        architectures: String,
    },
    #[error("hidden_act {0} is not gelu, the one embedhost runs")]
    Activation(String),
    #[error("position_embedding_type {0} is not absolute, the one embedhost runs")]
    PositionEmbedding(String),
    #[error("has no {0}")]
    MissingKey(&'static str),
    #[error("{key} is {value}: {reason}")]
    Value {
        key: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("default_prompt_name {0} is not among the prompts")]
    DefaultPrompt(String),
    #[error("has no tokenizer.json (embedhost needs a fast tokenizer's)")]
    NoTokenizer,
}

const MODULES: &str = "modules.json";
const ST_CONFIG: &str = "config_sentence_transformers.json";
const HF_CONFIG: &str = "config.json";
const TOKENIZER: &str = "tokenizer.json";

/// Reads the model in `dir` (the sentence-transformers layout).
///
/// # Errors
/// [`DescribeError`] naming the first file that cannot be read or asks for
/// what embedhost does not run.
pub fn describe(dir: &Path) -> Result<Description, DescribeError> {
    let modules = Modules::read(dir)?;
    let transformer_dir = modules.transformer_dir;
    let shape = read_shape(&transformer_dir)?;
    let pooling_path = modules.pooling_dir.join(HF_CONFIG);
    let pooling: PoolingConfig = read_json(&pooling_path)?;
    let (pooling, include_prompt) = pooling
        .check(shape.hidden_size)
        .map_err(at(&pooling_path))?;
    let (max_seq_length, do_lower_case) = read_sentence_bert(&transformer_dir, &shape)?;
    let st_path = dir.join(ST_CONFIG);
    let (query_prompt, document_prompt) = match read_optional::<StConfig>(&st_path)? {
        Some(config) => config.prompts().map_err(at(&st_path))?,
        None => (None, None),
    };
    if !include_prompt && (query_prompt.is_some() || document_prompt.is_some()) {
        return Err(at(&pooling_path)(Problem::ExcludesPrompt));
    }
    if !transformer_dir.join(TOKENIZER).is_file() {
        return Err(at(&transformer_dir)(Problem::NoTokenizer));
    }
    Ok(Description {
        transformer_dir,
        pooling_config: pooling_path,
        shape,
        pooling,
        normalize: modules.normalize,
        max_seq_length,
        do_lower_case,
        query_prompt,
        document_prompt,
    })
}

/// A [`DescribeError`] at `path`.
fn at(path: &Path) -> impl Fn(Problem) -> DescribeError + '_ {
    move |problem| DescribeError {
        path: path.to_path_buf(),
        problem,
    }
}

/// Text from a file, safe to put in an error.
fn quote(text: &str) -> String {
    format!(
        "\"{}\"",
        crate::untrusted::sanitize(text, MAX_MODEL_QUOTE_BYTES)
    )
}

/// The JSON file at `path`, at most [`MAX_MODEL_JSON_BYTES`] of it.
fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, DescribeError> {
    let fail = at(path);
    // Looked at before opening, as opening a FIFO would block.
    let meta = std::fs::metadata(path).map_err(|e| fail(Problem::Unreadable(e)))?;
    if !meta.is_file() {
        return Err(fail(Problem::NotAFile));
    }
    if meta.len() > MAX_MODEL_JSON_BYTES {
        return Err(fail(Problem::TooLarge));
    }
    let file = std::fs::File::open(path).map_err(|e| fail(Problem::Unreadable(e)))?;
    let mut bytes = Vec::new();
    // Bounded again while reading: the file may grow after the check.
    file.take(MAX_MODEL_JSON_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| fail(Problem::Unreadable(e)))?;
    if bytes.len() as u64 > MAX_MODEL_JSON_BYTES {
        return Err(fail(Problem::TooLarge));
    }
    serde_json::from_slice(&bytes).map_err(|e| fail(malformed(&e)))
}

/// A JSON error as [`Problem::Malformed`]: serde's message quotes the
/// file's text, so it is escaped and cut, its place kept.
fn malformed(error: &serde_json::Error) -> Problem {
    let message = error.to_string();
    let place = format!(" at line {} column {}", error.line(), error.column());
    Problem::Malformed {
        reason: crate::untrusted::sanitize(
            message.strip_suffix(&place).unwrap_or(&message),
            MAX_MODEL_QUOTE_BYTES,
        ),
        line: error.line(),
        column: error.column(),
    }
}

/// As [`read_json`], but a file that is not there is `None`.
fn read_optional<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, DescribeError> {
    match read_json(path) {
        Err(DescribeError {
            problem: Problem::Unreadable(e),
            ..
        }) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        other => other.map(Some),
    }
}

/// One entry of `modules.json` (`idx` and `name` are not needed: the
/// list's order is the pipeline's, as sentence-transformers runs it).
#[derive(Deserialize)]
struct ModuleEntry {
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ModuleKind {
    Transformer,
    Pooling,
    Normalize,
}

impl ModuleKind {
    /// The kind of a module type, under its v3-v5 name or the name newer
    /// releases write.
    fn of(kind: &str) -> Option<ModuleKind> {
        let (package, class) = kind.rsplit_once('.')?;
        let known = matches!(
            package,
            "sentence_transformers.models"
                | "sentence_transformers.base.models"
                | "sentence_transformers.sentence_transformer.models"
        );
        if !known {
            return None;
        }
        match class {
            "Transformer" => Some(ModuleKind::Transformer),
            "Pooling" => Some(ModuleKind::Pooling),
            "Normalize" => Some(ModuleKind::Normalize),
            _ => None,
        }
    }
}

/// The pipeline of `modules.json`, checked.
struct Modules {
    transformer_dir: PathBuf,
    pooling_dir: PathBuf,
    normalize: bool,
}

impl Modules {
    fn read(dir: &Path) -> Result<Modules, DescribeError> {
        let path = dir.join(MODULES);
        let entries: Vec<ModuleEntry> = read_json(&path)?;
        let fail = at(&path);
        let mut kinds = Vec::with_capacity(entries.len());
        let mut dirs = Vec::with_capacity(entries.len());
        for (index, entry) in entries.iter().enumerate() {
            let kind = ModuleKind::of(&entry.kind).ok_or_else(|| {
                fail(Problem::UnsupportedModule {
                    index,
                    kind: quote(&entry.kind),
                })
            })?;
            kinds.push(kind);
            dirs.push(module_dir(dir, &entry.path).ok_or_else(|| {
                fail(Problem::ModulePath {
                    index,
                    path: quote(&entry.path),
                })
            })?);
        }
        use ModuleKind::{Normalize, Pooling, Transformer};
        let normalize = match kinds.as_slice() {
            [Transformer, Pooling] => false,
            [Transformer, Pooling, Normalize] => true,
            _ => {
                let names: Vec<&str> = entries.iter().map(|e| e.kind.as_str()).collect();
                return Err(fail(Problem::ModuleOrder {
                    found: quote(&format!("[{}]", names.join(", "))),
                }));
            }
        };
        Ok(Modules {
            transformer_dir: dirs[0].clone(),
            pooling_dir: dirs[1].clone(),
            normalize,
        })
    }
}

/// `dir` joined with a module's `path`, unless that leaves `dir`.
fn module_dir(dir: &Path, path: &str) -> Option<PathBuf> {
    let mut joined = dir.to_path_buf();
    for component in Path::new(path).components() {
        match component {
            Component::Normal(name) => joined.push(name),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(joined)
}

/// The Pooling module's `config.json`. A flag not there takes
/// sentence-transformers' default (mean true, the others false).
#[derive(Deserialize)]
struct PoolingConfig {
    word_embedding_dimension: usize,
    pooling_mode: Option<String>,
    pooling_mode_cls_token: Option<bool>,
    pooling_mode_mean_tokens: Option<bool>,
    pooling_mode_max_tokens: Option<bool>,
    pooling_mode_mean_sqrt_len_tokens: Option<bool>,
    pooling_mode_weightedmean_tokens: Option<bool>,
    pooling_mode_lasttoken: Option<bool>,
    include_prompt: Option<bool>,
}

impl PoolingConfig {
    /// The one pooling asked for, and `include_prompt`.
    fn check(&self, hidden: usize) -> Result<(Pooling, bool), Problem> {
        let modes = self.modes()?;
        let pooling = match modes.as_slice() {
            ["cls"] => Pooling::Cls,
            ["mean"] => Pooling::Mean,
            ["max"] => Pooling::Max,
            ["lasttoken"] => Pooling::LastToken,
            ["weightedmean"] => Pooling::WeightedMean,
            [] => {
                return Err(Problem::PoolingModes {
                    modes: "no mode".into(),
                });
            }
            _ => {
                return Err(Problem::PoolingModes {
                    modes: modes.join(" + "),
                });
            }
        };
        if self.word_embedding_dimension != hidden {
            return Err(Problem::PoolingDimension {
                pooling: self.word_embedding_dimension,
                hidden,
            });
        }
        Ok((pooling, self.include_prompt.unwrap_or(true)))
    }

    /// The modes set, by sentence-transformers' short name; `pooling_mode`,
    /// when there, sets all but `mean_sqrt_len_tokens` (as it does there).
    fn modes(&self) -> Result<Vec<&'static str>, Problem> {
        let by_name = match &self.pooling_mode {
            None => None,
            Some(mode) => match mode.to_lowercase().as_str() {
                name @ ("mean" | "max" | "cls" | "weightedmean" | "lasttoken") => {
                    Some(name.to_string())
                }
                _ => return Err(Problem::PoolingMode(quote(mode))),
            },
        };
        let flag = |name: &str, value: Option<bool>, default: bool| match &by_name {
            Some(chosen) => chosen == name,
            None => value.unwrap_or(default),
        };
        let modes = [
            ("cls", flag("cls", self.pooling_mode_cls_token, false)),
            ("mean", flag("mean", self.pooling_mode_mean_tokens, true)),
            ("max", flag("max", self.pooling_mode_max_tokens, false)),
            (
                "mean_sqrt_len_tokens",
                self.pooling_mode_mean_sqrt_len_tokens.unwrap_or(false),
            ),
            (
                "weightedmean",
                flag("weightedmean", self.pooling_mode_weightedmean_tokens, false),
            ),
            (
                "lasttoken",
                flag("lasttoken", self.pooling_mode_lasttoken, false),
            ),
        ];
        Ok(modes
            .into_iter()
            .filter_map(|(name, on)| on.then_some(name))
            .collect())
    }
}

/// `config_sentence_transformers.json`, as far as it is read.
#[derive(Deserialize)]
struct StConfig {
    /// `null` is taken as `{}`.
    #[serde(default)]
    prompts: Option<BTreeMap<String, String>>,
    default_prompt_name: Option<String>,
}

impl StConfig {
    /// The query's and the document's prompts (see the module's invariants).
    fn prompts(&self) -> Result<(Option<String>, Option<String>), Problem> {
        let none = BTreeMap::new();
        let prompts = self.prompts.as_ref().unwrap_or(&none);
        let default = match &self.default_prompt_name {
            Some(name) if !prompts.contains_key(name) => {
                return Err(Problem::DefaultPrompt(quote(name)));
            }
            other => other.as_deref(),
        };
        let pick = |candidates: &[&str]| {
            let name = candidates
                .iter()
                .copied()
                .find(|name| prompts.contains_key(*name))
                .or(default)?;
            Some(prompts[name].clone()).filter(|p| !p.is_empty())
        };
        Ok((pick(&["query"]), pick(&["document", "passage", "corpus"])))
    }
}

#[cfg(test)]
#[path = "describe_tests.rs"]
mod tests;
