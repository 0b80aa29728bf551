//! The `onnx` engine: a sentence-transformer ONNX graph run by ONNX Runtime
//! (through `ort`), with tokenization and pooling from `embedhost-text`.
//!
//! ONNX Runtime is loaded at run time from a shared library (`ort`'s
//! `load-dynamic`), by default the one `./x setup` unpacks from the PyPI
//! wheel: `ort`'s build-time download cannot work offline, and a library
//! found at run time can be swapped without rebuilding. See
//! [`resolve_library`] for where it is looked for.
//!
//! # The model directory
//! - `model.onnx` (or the file the `model_file` setting names, such as the
//!   int8 `model.int8.onnx`): inputs among `input_ids`, `attention_mask` and
//!   `token_type_ids` (int64, `[batch, sequence]`); output either
//!   `last_hidden_state` (`[batch, sequence, dimension]`, or the first float
//!   output of that rank under another name; pooled here by the
//!   `pooling` setting, mean unless it says otherwise) or
//!   `sentence_embedding` (`[batch, dimension]`, already pooled). Either way
//!   the vectors are L2-normalized here unless `normalize = false` (a model
//!   without sentence-transformers' `Normalize` module).
//! - `tokenizer.json`: the model's Hugging Face tokenizer.
//! - `sentence_bert_config.json` (optional): its `max_seq_length` is the
//!   truncation length unless the `max_tokens` setting overrides it.
//!
//! # Invariants
//! - Loading checks everything it can before the handshake (library version,
//!   graph inputs, output rank, dimension), so a bad model fails the start,
//!   not the first request.
//! - One session per child, run by one thread at a time; parallelism within
//!   a batch is ONNX Runtime's intra-op pool (`threads`).

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use embedhost_text::{Batch, Pooling, TextEncoder};
use ort::session::{Session, SessionInputValue, builder::GraphOptimizationLevel};
use ort::value::Tensor;

use super::child::{Engine, EngineError};
use crate::backend::ModelInfo;
use crate::vectors::Vectors;

/// The library's file name, as `./x setup` links it.
pub const LIBRARY_NAME: &str = "libonnxruntime.so";

/// The graph loaded unless the `model_file` setting names another.
pub const DEFAULT_MODEL_FILE: &str = "model.onnx";

/// The int8 graph of a model store's directory (`[native] precision =
/// "int8"`): onnxruntime's dynamic quantization of the fp32 graph's MatMul
/// weights, per channel, made once by the `quantize_int8` script.
pub const INT8_MODEL_FILE: &str = "model.int8.onnx";

/// The tokenizer a model directory must hold beside its graph.
pub use crate::tokens::TOKENIZER_FILE;

/// Environment variable naming the library (ort's own convention).
pub const LIBRARY_ENV: &str = "ORT_DYLIB_PATH";

/// Truncation length when neither the settings nor the model say: BERT's
/// position table has 512 entries.
pub const DEFAULT_MAX_TOKENS: usize = 512;

/// Texts per inference run within a batch, after sorting the batch by
/// length: small enough that texts of similar length share a run (less
/// padding), large enough that each run's matrix products stay efficient.
/// Measured with `cargo bench --bench throughput` (see README).
pub const LENGTH_GROUP: usize = 8;

/// The onnx engine's settings (the `--set` table of `embedhost child`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OnnxSettings {
    /// Directory with `model.onnx` and `tokenizer.json`.
    pub model_dir: PathBuf,
    /// The ONNX Runtime shared library.
    pub library: PathBuf,
    /// Intra-op threads.
    pub threads: usize,
    /// Truncation length, if overridden.
    pub max_tokens: Option<usize>,
    /// The model id reported, if overridden (default: the directory's name).
    pub model_id: Option<String>,
    /// The graph's file name in `model_dir`, if not [`DEFAULT_MODEL_FILE`].
    pub model_file: Option<String>,
    /// How token states become a vector (`pooling`; default mean).
    pub pooling: Pooling,
    /// Whether vectors are L2-normalized (`normalize`; default true).
    pub normalize: bool,
}

/// An onnx engine setting the child cannot accept, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum OnnxSettingError {
    /// A number that is not a positive whole number.
    #[error("setting `{key}`: `{value}` is not a positive whole number")]
    NotPositive { key: String, value: String },
    /// `model_file` is not a file name.
    #[error("setting `model_file`: `{0}` is not a file name in `model_dir`")]
    ModelFile(String),
    /// `pooling` names no mode.
    #[error("setting `pooling`: `{0}` is not one of {modes}", modes = Pooling::names())]
    Pooling(String),
    /// `normalize` is not `true` or `false`.
    #[error("setting `normalize`: `{0}` is not true or false")]
    Normalize(String),
    /// A key the onnx engine does not know.
    #[error(
        "unknown onnx engine setting `{0}` (known: model_dir, onnxruntime, threads, max_tokens, model_id, model_file, pooling, normalize)"
    )]
    Unknown(String),
    /// No `model_dir`.
    #[error("the onnx engine needs `model_dir`")]
    NoModelDir,
    /// No `onnxruntime`, and no library found.
    #[error(transparent)]
    NoLibrary(#[from] LibraryNotFound),
}

impl OnnxSettings {
    /// Settings from the child's table: `model_dir` (required),
    /// `onnxruntime`, `threads`, `max_tokens`, `model_id`, `model_file`,
    /// `pooling`, `normalize`.
    ///
    /// # Errors
    /// [`OnnxSettingError`]: a missing `model_dir`, an unknown key or a bad
    /// number, naming it.
    pub fn from_pairs(settings: &[(String, String)]) -> Result<Self, OnnxSettingError> {
        let mut model_dir = None;
        let mut library = None;
        let mut threads = None;
        let mut max_tokens = None;
        let mut model_id = None;
        let mut model_file = None;
        let mut pooling = Pooling::default();
        let mut normalize = true;
        for (key, value) in settings {
            let number = || {
                value
                    .trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| OnnxSettingError::NotPositive {
                        key: key.clone(),
                        value: value.clone(),
                    })
            };
            match key.as_str() {
                "model_dir" => model_dir = Some(PathBuf::from(value)),
                "onnxruntime" => library = Some(PathBuf::from(value)),
                "threads" => threads = Some(number()?),
                "max_tokens" => max_tokens = Some(number()?),
                "model_id" => model_id = Some(value.clone()),
                "model_file" => {
                    // A file name, not a path: the graph lives in `model_dir`.
                    if value.is_empty() || value.contains('/') || value == ".." {
                        return Err(OnnxSettingError::ModelFile(value.clone()));
                    }
                    model_file = Some(value.clone());
                }
                "pooling" => {
                    pooling = Pooling::from_name(value)
                        .ok_or_else(|| OnnxSettingError::Pooling(value.clone()))?;
                }
                "normalize" => {
                    normalize = value
                        .parse()
                        .map_err(|_| OnnxSettingError::Normalize(value.clone()))?;
                }
                other => return Err(OnnxSettingError::Unknown(other.to_string())),
            }
        }
        Ok(OnnxSettings {
            model_dir: model_dir.ok_or(OnnxSettingError::NoModelDir)?,
            library: match library {
                Some(path) => path,
                None => resolve_library(None)?,
            },
            threads: threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
            max_tokens,
            model_id,
            model_file,
            pooling,
            normalize,
        })
    }
}

impl OnnxSettings {
    /// The child's settings table for these settings: what
    /// [`OnnxSettings::from_pairs`] reads back.
    pub fn to_pairs(&self) -> Vec<(String, String)> {
        let mut pairs = vec![
            (
                "model_dir".to_string(),
                self.model_dir.display().to_string(),
            ),
            (
                "onnxruntime".to_string(),
                self.library.display().to_string(),
            ),
            ("threads".to_string(), self.threads.to_string()),
        ];
        if let Some(n) = self.max_tokens {
            pairs.push(("max_tokens".into(), n.to_string()));
        }
        if let Some(id) = &self.model_id {
            pairs.push(("model_id".into(), id.clone()));
        }
        if let Some(file) = &self.model_file {
            pairs.push(("model_file".into(), file.clone()));
        }
        if self.pooling != Pooling::default() {
            pairs.push(("pooling".into(), self.pooling.name().into()));
        }
        if !self.normalize {
            pairs.push(("normalize".into(), "false".into()));
        }
        pairs
    }

    /// The graph's path.
    pub fn model_path(&self) -> PathBuf {
        self.model_dir
            .join(self.model_file.as_deref().unwrap_or(DEFAULT_MODEL_FILE))
    }
}

/// Finds the ONNX Runtime library: `configured` if given, else
/// `$ORT_DYLIB_PATH`, else `libonnxruntime.so` next to this executable, else
/// in `onnxruntime/` of the setup's [`crate::deps::deps_dir`].
///
/// # Errors
/// [`LibraryNotFound`] when no candidate exists, listing the places looked
/// at.
pub fn resolve_library(configured: Option<&Path>) -> Result<PathBuf, LibraryNotFound> {
    if let Some(path) = configured {
        return Ok(path.to_path_buf());
    }
    if let Some(path) = std::env::var_os(LIBRARY_ENV) {
        return Ok(PathBuf::from(path));
    }
    let mut looked = Vec::new();
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(LIBRARY_NAME)));
    let deps = crate::deps::deps_dir().map(|d| d.join("onnxruntime").join(LIBRARY_NAME));
    for candidate in [beside, deps].into_iter().flatten() {
        if candidate.exists() {
            return Ok(candidate);
        }
        looked.push(candidate.display().to_string());
    }
    Err(LibraryNotFound { looked })
}

pub use super::onnx_errors::{LibraryNotFound, OnnxLoadError, ProbeError};

/// An [`OnnxLoadError`] made by `make` from an `ort` error of any
/// recovery type.
fn ort_error<R>(
    make: impl Fn(ort::Error) -> OnnxLoadError,
) -> impl Fn(ort::Error<R>) -> OnnxLoadError
where
    ort::Error: From<ort::Error<R>>,
{
    move |e| make(ort::Error::from(e))
}

/// Loads ONNX Runtime from `library` (once per process) and reports its
/// version.
///
/// # Errors
/// [`OnnxLoadError::LoadLibrary`] or [`OnnxLoadError::StartLibrary`] when
/// the library cannot be loaded or is older than the API `ort` needs.
pub fn load_library(library: &Path) -> Result<ort::environment::Environment, OnnxLoadError> {
    ort::init_from(library)
        .map_err(|source| OnnxLoadError::LoadLibrary {
            library: library.to_path_buf(),
            source,
        })?
        .with_name("embedhost")
        .build()
        .map_err(ort_error(|source| OnnxLoadError::StartLibrary {
            library: library.to_path_buf(),
            source,
        }))
}

/// Which graph input a tokenizer output feeds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Input {
    Ids,
    Mask,
    TypeIds,
}

/// The graph's output: token states or vectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Output {
    /// `[batch, sequence, dimension]`: pooled over the attention mask here.
    States,
    /// `[batch, dimension]`: already pooled.
    Pooled,
}

/// A loaded model.
pub struct OnnxEngine {
    session: Session,
    encoder: TextEncoder,
    inputs: Vec<(String, Input)>,
    output: String,
    kind: Output,
    pooling: Pooling,
    info: ModelInfo,
}

/// The session of the model at `model_path`, on `threads` intra-op
/// threads.
fn open_session(
    environment: &ort::environment::Environment,
    threads: usize,
    model_path: &Path,
) -> Result<Session, OnnxLoadError> {
    let session_error = |source| OnnxLoadError::Session {
        path: model_path.to_path_buf(),
        source,
    };
    Session::builder(environment)
        .map_err(ort_error(session_error))?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(ort_error(session_error))?
        .with_intra_threads(threads)
        .map_err(ort_error(session_error))?
        // ONNX Runtime's workers spin after each run by default, burning
        // a core each for a while: in a pool of children sharing the
        // machine, that spinning steals the CPU the other children's
        // batches need.
        .with_intra_op_spinning(false)
        .map_err(ort_error(session_error))?
        .commit_from_file(model_path)
        .map_err(ort_error(|source| OnnxLoadError::Graph {
            path: model_path.to_path_buf(),
            source,
        }))
}

/// The model's inputs, each one the engine feeds; `input_ids` among them.
fn session_inputs(
    session: &Session,
    model_path: &Path,
) -> Result<Vec<(String, Input)>, OnnxLoadError> {
    let mut inputs = Vec::new();
    for input in session.inputs() {
        let kind = match input.name() {
            "input_ids" => Input::Ids,
            "attention_mask" => Input::Mask,
            "token_type_ids" => Input::TypeIds,
            other => {
                return Err(OnnxLoadError::UnknownInput {
                    path: model_path.to_path_buf(),
                    input: other.to_string(),
                });
            }
        };
        inputs.push((input.name().to_string(), kind));
    }
    if !inputs.iter().any(|(_, k)| *k == Input::Ids) {
        return Err(OnnxLoadError::NoIds(model_path.to_path_buf()));
    }
    Ok(inputs)
}

/// The output the engine reads, how it is pooled, and the dimension it
/// declares (if static): `sentence_embedding`, else `last_hidden_state`,
/// else the first float output of rank 3 (token states, under an
/// exporter's name such as `onnx::Shape_422`: paraphrase-MiniLM-L3-v2's
/// graph echoes its int64 inputs as its first outputs), else the first.
fn session_output(
    session: &Session,
    model_path: &Path,
) -> Result<(String, Output, Option<i64>), OnnxLoadError> {
    let outputs = session.outputs();
    let token_states = |o: &&ort::value::Outlet| {
        o.dtype().tensor_type() == Some(ort::value::TensorElementType::Float32)
            && o.dtype().tensor_shape().is_some_and(|s| s.len() == 3)
    };
    let chosen = outputs
        .iter()
        .find(|o| o.name() == "sentence_embedding")
        .or_else(|| outputs.iter().find(|o| o.name() == "last_hidden_state"))
        .or_else(|| outputs.iter().find(token_states))
        .or_else(|| outputs.first())
        .ok_or_else(|| OnnxLoadError::NoOutput(model_path.to_path_buf()))?;
    let shape = chosen
        .dtype()
        .tensor_shape()
        .map(|s| s.to_vec())
        .unwrap_or_default();
    let kind = match shape.len() {
        3 => Output::States,
        2 => Output::Pooled,
        rank => {
            return Err(OnnxLoadError::Rank {
                path: model_path.to_path_buf(),
                output: chosen.name().to_string(),
                rank,
            });
        }
    };
    let declared = shape.last().copied().filter(|&d| d > 0);
    Ok((chosen.name().to_string(), kind, declared))
}

impl std::fmt::Debug for OnnxEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxEngine")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl OnnxEngine {
    /// Loads ONNX Runtime and the model.
    ///
    /// # Errors
    /// [`OnnxLoadError`] naming the file or library at fault.
    pub fn load(settings: &OnnxSettings) -> Result<Self, OnnxLoadError> {
        let environment = load_library(&settings.library)?;
        let dir = &settings.model_dir;
        let model_path = settings.model_path();
        if !model_path.is_file() {
            return Err(OnnxLoadError::NoModel(model_path));
        }
        let max_tokens = match settings.max_tokens {
            Some(n) => n,
            None => max_seq_length(dir)?.unwrap_or(DEFAULT_MAX_TOKENS),
        };
        let encoder = TextEncoder::from_file(&dir.join(TOKENIZER_FILE), max_tokens)
            .map_err(OnnxLoadError::Tokenizer)?;
        let session = open_session(&environment, settings.threads, &model_path)?;
        let inputs = session_inputs(&session, &model_path)?;
        let (output, kind, declared) = session_output(&session, &model_path)?;
        let model_id = settings.model_id.clone().unwrap_or_else(|| {
            dir.file_name().map_or_else(
                || dir.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            )
        });
        let model_id = crate::backend::ModelId::new(model_id)?;
        let mut engine = OnnxEngine {
            session,
            encoder,
            inputs,
            output,
            kind,
            pooling: settings.pooling,
            info: ModelInfo {
                model_id,
                dimension: declared.unwrap_or(0) as u32,
                max_input_tokens: max_tokens as u32,
                normalized: settings.normalize,
            },
        };
        // A dynamic dimension is learnt from one run; a static one is
        // checked by it.
        let probe = engine
            .encoder
            .encode(&["embedhost"])
            .map_err(ProbeError::Encode)
            .and_then(|batch| engine.run(&batch).map_err(ProbeError::Run))
            .map_err(|reason| OnnxLoadError::Probe {
                path: model_path.clone(),
                reason,
            })?;
        if declared.is_some_and(|d| d as usize != probe.len()) {
            return Err(OnnxLoadError::Dimension {
                path: model_path,
                declared: declared.unwrap_or_default(),
                produced: probe.len(),
            });
        }
        engine.info.dimension = probe.len() as u32;
        Ok(engine)
    }

    fn run(&mut self, batch: &Batch) -> Result<Vec<f32>, EngineError> {
        let failed = |e: ort::Error| EngineError::Failed(format!("onnx runtime: {e}"));
        let shape = vec![batch.batch as i64, batch.tokens as i64];
        let mut feeds: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = Vec::new();
        for (name, kind) in &self.inputs {
            let data = match kind {
                Input::Ids => batch.input_ids.clone(),
                Input::Mask => batch.attention_mask.clone(),
                Input::TypeIds => batch.token_type_ids.clone(),
            };
            let tensor = Tensor::from_array((shape.clone(), data)).map_err(failed)?;
            feeds.push((Cow::Owned(name.clone()), tensor.into()));
        }
        let outputs = self.session.run(feeds).map_err(failed)?;
        let value = outputs.get(&self.output).ok_or_else(|| {
            EngineError::Failed(format!("the model produced no `{}`", self.output))
        })?;
        let (shape, data) = value.try_extract_tensor::<f32>().map_err(failed)?;
        let dimension = shape.last().copied().unwrap_or(0).max(0) as usize;
        let normalize = self.info.normalized;
        let pooled = match self.kind {
            Output::States => embedhost_text::pool(batch, data, dimension, self.pooling, normalize)
                .map_err(|e| EngineError::Failed(e.to_string()))?,
            Output::Pooled => {
                let mut rows = data.to_vec();
                for row in rows
                    .chunks_exact_mut(dimension.max(1))
                    .filter(|_| normalize)
                {
                    embedhost_text::l2_normalize(row);
                }
                rows
            }
        };
        Ok(pooled)
    }
}

impl Engine for OnnxEngine {
    fn model_info(&self) -> ModelInfo {
        self.info.clone()
    }

    fn embed(&mut self, texts: &[String], _is_query: bool) -> Result<Vectors, EngineError> {
        if texts.is_empty() {
            return Ok(Vectors::default());
        }
        // Padding is wasted work: a batch is run in groups of texts of
        // similar length (sorted by tokens), each padded to its own longest.
        let groups = self
            .encoder
            .encode_by_length(texts, LENGTH_GROUP)
            .map_err(|e| EngineError::Failed(e.to_string()))?;
        let dimension = self.info.dimension as usize;
        let mut data = vec![0f32; texts.len() * dimension];
        for (group, batch) in &groups {
            let rows = self.run(batch)?;
            if rows.len() != group.len() * dimension {
                return Err(EngineError::Failed(format!(
                    "the model gave {} values for {} texts of dimension {dimension}",
                    rows.len(),
                    group.len()
                )));
            }
            for (k, &i) in group.iter().enumerate() {
                data[i * dimension..][..dimension]
                    .copy_from_slice(&rows[k * dimension..][..dimension]);
            }
        }
        Vectors::new(dimension, data).map_err(|e| EngineError::Failed(e.to_string()))
    }
}

/// `max_seq_length` from the model's `sentence_bert_config.json`, if any.
fn max_seq_length(dir: &Path) -> Result<Option<usize>, OnnxLoadError> {
    let path = dir.join("sentence_bert_config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(None);
    };
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|source| OnnxLoadError::SentenceConfig { path, source })?;
    Ok(value
        .get("max_seq_length")
        .and_then(serde_json::Value::as_u64)
        .map(|n| n as usize))
}

#[cfg(test)]
#[path = "onnx_tests.rs"]
mod tests;
