//! The message catalogue: every message the bus carries, with its request
//! and response types (the seed's catalogue, in Rust).
//!
//! Idempotence decides retries (see [`crate::bus::Message::IDEMPOTENT`]):
//! reads and embeddings are idempotent; `worker.index` queues work, but
//! queueing the same paths twice is harmless (files already queued or
//! unchanged are skipped), so it is idempotent too. `worker.init` and
//! `shutdown` have effects a second run could repeat
//! while the first is still under way, so they are not retried.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::bus::{Empty, Message};
use crate::vectors::Vectors;

macro_rules! message {
    ($(#[$doc:meta])* $ty:ident, $name:literal, idempotent = $idem:literal, $req:ty => $resp:ty) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy)]
        pub struct $ty;
        impl Message for $ty {
            const NAME: &'static str = $name;
            const IDEMPOTENT: bool = $idem;
            type Request = $req;
            type Response = $resp;
        }
    };
}

/// `worker.init`: open or create the index.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InitRequest {
    /// Where the index lives (created if missing).
    pub db_dir: PathBuf,
    /// The application's data directory (the seed's field; informational).
    pub user_data_path: PathBuf,
}

/// Answer to `worker.init`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InitResponse {
    /// The index is open.
    pub ready: bool,
}

/// `worker.search`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SearchRequest {
    /// What to look for, in words.
    pub query: String,
    /// Results wanted, at most.
    pub limit: u32,
    /// How results are found (default: both ways, fused).
    #[serde(default)]
    pub mode: SearchMode,
}

/// How `worker.search` finds chunks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SearchMode {
    /// By meaning and by keyword, the two rankings fused (reciprocal rank
    /// fusion): finds exact names as well as meanings.
    #[default]
    Hybrid,
    /// By meaning only (the query's vector against the chunks').
    Semantic,
    /// By keyword only (BM25 over the chunks' words).
    Keyword,
}

/// A name that is no [`SearchMode`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a search mode (hybrid, semantic, keyword)")]
pub struct UnknownSearchMode(pub String);

impl std::str::FromStr for SearchMode {
    type Err = UnknownSearchMode;
    fn from_str(s: &str) -> Result<Self, UnknownSearchMode> {
        match s {
            "hybrid" => Ok(SearchMode::Hybrid),
            "semantic" => Ok(SearchMode::Semantic),
            "keyword" => Ok(SearchMode::Keyword),
            other => Err(UnknownSearchMode(other.to_string())),
        }
    }
}

/// One search hit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SearchResult {
    /// The file the chunk is from.
    pub path: PathBuf,
    /// First line of the chunk (1-based).
    pub start_line: u32,
    /// Last line of the chunk (inclusive).
    pub end_line: u32,
    /// Cosine similarity to the query; higher is closer.
    pub score: f32,
    /// The chunk's text.
    pub text: String,
}

/// Answer to `worker.search`, best first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SearchResponse {
    /// Best first.
    pub results: Vec<SearchResult>,
}

/// `worker.index`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IndexRequest {
    /// Files and folders to index.
    pub paths: Vec<PathBuf>,
}

/// Answer to `worker.index`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IndexResponse {
    /// Files queued by this request.
    pub queued: u64,
}

/// Answer to `worker.stats`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatsResponse {
    /// Files indexed.
    pub indexed: u64,
    /// Files waiting to be indexed.
    pub queued: u64,
    /// Files being read, embedded or stored now.
    pub processing: u64,
    /// Chunks in the index.
    #[serde(default)]
    pub chunks: u64,
    /// Files not indexed, by reason (`binary`, `too_large`, `not_utf8`,
    /// `unreadable`, `embed_failed`).
    #[serde(default)]
    pub failures: std::collections::BTreeMap<String, u64>,
    /// Why indexing is paused with files queued (the embedder failed), if
    /// it is.
    #[serde(default)]
    pub stalled: Option<String>,
}

/// `embedder.embed`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EmbedRequest {
    /// The texts, one vector each.
    pub texts: Vec<String>,
    /// The seed's `isQuery`: queries and documents may embed differently.
    pub is_query: bool,
}

/// Answer to `embedder.embed`.
///
/// `vectors` holds one row per text that was embedded, in input order;
/// `failed` names the texts that could not be (a poison input that crashed
/// the embedder, or an input the plugin refused), so
/// `vectors.len() + failed.len()` is the number of texts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EmbedResponse {
    /// The rows of the texts not in `failed`, in input order.
    pub vectors: Vectors,
    #[serde(default)]
    /// Texts that could not be embedded, by index.
    pub failed: Vec<FailedInput>,
}

/// A text the embedder could not embed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedInput {
    /// Its position in the request.
    pub index: u32,
    /// Why, for a person.
    pub reason: String,
}

impl EmbedResponse {
    /// A response with a vector for every text.
    pub fn complete(vectors: Vectors) -> Self {
        EmbedResponse {
            vectors,
            failed: Vec::new(),
        }
    }

    /// For each of the `n` texts of the request, its vector or its failure;
    /// `None` if the response does not account for exactly `n` texts.
    pub fn per_text(&self, n: usize) -> Option<Vec<Result<&[f32], &FailedInput>>> {
        if self.vectors.len() + self.failed.len() != n {
            return None;
        }
        let mut rows = self.vectors.iter();
        let mut failed = self.failed.iter().peekable();
        (0..n)
            .map(|i| match failed.peek() {
                Some(f) if f.index as usize == i => failed.next().map(Err),
                _ => rows.next().map(Ok),
            })
            .collect()
    }
}

/// Answer to `embedder.health`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HealthResponse {
    /// Memory in use, in bytes.
    pub memory: u64,
    /// Texts processed since the embedder started.
    pub processed_count: u64,
}

/// Answer to `model.check`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelCheckResponse {
    /// Every file of the model is present and verified.
    pub exists: bool,
    /// The model's directory, if it exists.
    pub path: Option<PathBuf>,
}

/// The version of the embedder protocol a native child speaks. A child of
/// another version is refused at the handshake.
pub const PROTOCOL_VERSION: u32 = 1;

/// Answer to `embedder.handshake`, the first request to a native child.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HandshakeResponse {
    /// The child's protocol version ([`PROTOCOL_VERSION`]).
    pub protocol_version: u32,
    /// The child's model.
    pub model: crate::backend::ModelInfo,
}

/// `shutdown`: stop gracefully.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ShutdownRequest {
    /// Why the host asks (logged by the peer).
    pub reason: String,
}

message!(/// Open or create the index.
    WorkerInit, "worker.init", idempotent = false, InitRequest => InitResponse);
message!(/// Search the index by meaning.
    WorkerSearch, "worker.search", idempotent = true, SearchRequest => SearchResponse);
message!(/// Queue files and folders for indexing.
    WorkerIndex, "worker.index", idempotent = true, IndexRequest => IndexResponse);
message!(/// Index counters.
    WorkerStats, "worker.stats", idempotent = true, Empty => StatsResponse);
message!(/// Embed a batch of texts.
    EmbedderEmbed, "embedder.embed", idempotent = true, EmbedRequest => EmbedResponse);
message!(/// Protocol version and model info of a native child.
    EmbedderHandshake, "embedder.handshake", idempotent = true, Empty => HandshakeResponse);
message!(/// The embedder's memory and processed count.
    EmbedderHealth, "embedder.health", idempotent = true, Empty => HealthResponse);
message!(/// Whether the model files are present (checked by size).
    ModelCheck, "model.check", idempotent = true, Empty => ModelCheckResponse);
message!(/// Stop gracefully.
    Shutdown, "shutdown", idempotent = false, ShutdownRequest => Empty);

/// Every message name, for checks that each is served.
pub const ALL: &[&str] = &[
    WorkerInit::NAME,
    WorkerSearch::NAME,
    WorkerIndex::NAME,
    WorkerStats::NAME,
    EmbedderEmbed::NAME,
    EmbedderHandshake::NAME,
    EmbedderHealth::NAME,
    ModelCheck::NAME,
    Shutdown::NAME,
];
