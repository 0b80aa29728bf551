//! The onnx engine's errors at load: the library not found or not loaded,
//! a model whose graph the engine cannot feed or pool, a test embedding
//! that failed. Each names the library or file at fault.

use std::path::PathBuf;

use super::child::EngineError;
use super::onnx::{LIBRARY_ENV, LIBRARY_NAME};

/// No ONNX Runtime library was configured or found: the places looked at.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "cannot find the ONNX Runtime library ({LIBRARY_NAME}); run `./x setup`, or set `[native] onnxruntime` or ${LIBRARY_ENV} (looked in: {})",
    looked.join(", ")
)]
pub struct LibraryNotFound {
    /// The candidate paths, in the order they were looked at.
    pub looked: Vec<String>,
}

/// Why the onnx engine could not load ONNX Runtime or the model, naming
/// the library or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum OnnxLoadError {
    /// The library could not be loaded.
    #[error("cannot load ONNX Runtime from `{library}`: {source}")]
    LoadLibrary {
        library: PathBuf,
        source: ort::LoadDynamicError,
    },
    /// The library loaded, but its environment could not start.
    #[error("cannot start ONNX Runtime from `{library}`: {source}")]
    StartLibrary {
        library: PathBuf,
        source: ort::Error,
    },
    /// The graph is not in the model's directory.
    #[error("no model at `{0}`")]
    NoModel(PathBuf),
    /// `sentence_bert_config.json` is not JSON.
    #[error("`{path}`: {source}")]
    SentenceConfig {
        path: PathBuf,
        source: serde_json::Error,
    },
    /// The tokenizer could not be read.
    #[error(transparent)]
    Tokenizer(embedhost_text::TextError),
    /// The session for the graph could not be set up.
    #[error("`{path}`: {source}")]
    Session { path: PathBuf, source: ort::Error },
    /// The graph could not be loaded.
    #[error("cannot load `{path}`: {source}")]
    Graph { path: PathBuf, source: ort::Error },
    /// The graph has an input the engine does not feed.
    #[error(
        "`{path}` has input `{input}`; the onnx engine feeds input_ids, attention_mask and token_type_ids"
    )]
    UnknownInput { path: PathBuf, input: String },
    /// The graph has no `input_ids` input.
    #[error("`{0}` has no `input_ids` input")]
    NoIds(PathBuf),
    /// The graph has no output.
    #[error("`{0}` has no output")]
    NoOutput(PathBuf),
    /// The chosen output is of a shape the engine cannot pool.
    #[error(
        "`{path}` output `{output}` has rank {rank}; expected [batch, sequence, dimension] or [batch, dimension]"
    )]
    Rank {
        path: PathBuf,
        output: String,
        rank: usize,
    },
    /// The model's id is not one the host accepts.
    #[error(transparent)]
    ModelId(#[from] crate::backend::ModelIdError),
    /// The test embedding failed.
    #[error("`{path}` failed a test embedding: {reason}")]
    Probe { path: PathBuf, reason: ProbeError },
    /// The test embedding's dimension is not the one the graph declares.
    #[error("`{path}` declares dimension {declared} but produced {produced}")]
    Dimension {
        path: PathBuf,
        declared: i64,
        produced: usize,
    },
}

/// Why the test embedding of [`OnnxEngine::load`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The tokenizer refused the text.
    #[error(transparent)]
    Encode(embedhost_text::TextError),
    /// The run failed.
    #[error(transparent)]
    Run(EngineError),
}
