//! The front door: the one path from every entrance to the embedders.
//!
//! The CLI's `embed`, every HTTP route, the worker (in the CLI and in
//! `serve`), a NATS member ([`peer`]) and `[embedder] remote` all hand an
//! [`Embedder`] one typed [`Job`], and get one [`Row`] per text back:
//!
//! 1. [`Embedder::generation`] takes the generation serving now (an
//!    `Arc`): the job keeps it until it is answered, so a reload never
//!    validates a job on one model and embeds it on another.
//! 2. [`Embedder::prepare`] puts each text in the model's form (its prompt
//!    for the job's kind and its lowercasing, [`crate::model::form`]: the
//!    one place), then counts its tokens, once: words before tokens, the
//!    caller's own counts when it has them (the worker's chunker) and the
//!    form left the text as it was, else the model's tokenizer under the
//!    shared tokenizing budget; then the deadline against the pool's
//!    measured speed.
//! 3. [`Prepared::run`] hands the texts and their counts to the
//!    generation's batcher, which orders them by length, cuts them into
//!    pieces of the token budget and queues them in the one rotation; the
//!    supervisor under it only supervises.
//!
//! Invariants:
//! - Every job passes through [`Embedder::prepare`] (counted in
//!   [`Embedder::jobs`]); a text is tokenized there at most once per job
//!   ([`Embedder::tokenized`]), and never when the caller gave counts of
//!   the text the model sees.
//! - Errors stay typed ([`EmbedError`]) until an edge turns them into a
//!   message, an HTTP status or a bus code.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::Semaphore;
use tokio::time::Instant;

pub mod batcher;
pub mod generation;
pub mod job;
pub mod peer;

pub use generation::Generation;
pub use job::{EmbedError, InputProblem, Job, Row, TextFailure};

use crate::limits;

/// Jobs through the front door, from every entrance (the metric the
/// entrance tests read).
pub const METRIC_JOBS: &str = "front_door_jobs_total";
/// Texts the front door tokenized (none for a job that came counted).
pub const METRIC_TOKENIZED: &str = "front_door_texts_tokenized_total";
/// The target of the one event every job emits, `job`, at debug level:
/// `RUST_LOG=embedhost::front_door=debug` shows each job's path.
pub const LOG_TARGET: &str = "embedhost::front_door";

/// The front door: the generation serving now, the tokenizing budget all
/// jobs share, and counters of what passed.
pub struct Embedder {
    current: RwLock<Serving>,
    tokenizing: Arc<Semaphore>,
    jobs: AtomicU64,
    tokenized: AtomicU64,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("current", &self.current())
            .finish_non_exhaustive()
    }
}

impl Default for Embedder {
    fn default() -> Self {
        Embedder {
            current: RwLock::new(Serving::Starting),
            tokenizing: Arc::new(Semaphore::new(limits::SERVE_TOKENIZE_BYTES_IN_FLIGHT)),
            jobs: AtomicU64::new(0),
            tokenized: AtomicU64::new(0),
        }
    }
}

/// What the front door serves.
#[derive(Debug, Default)]
enum Serving {
    /// Nothing yet.
    #[default]
    Starting,
    /// This generation.
    Now(Arc<Generation>),
    /// Nothing any more: [`Embedder::take`] took the last generation.
    ShutDown,
}

/// A job checked and counted on one generation, ready to run.
#[derive(Debug)]
pub struct Prepared {
    /// The generation it runs on, held until it is answered.
    pub generation: Arc<Generation>,
    texts: Vec<String>,
    counts: Vec<usize>,
    is_query: bool,
    until: Instant,
}

/// A job's answer.
#[derive(Debug)]
pub struct Embedded {
    /// The generation that answered it.
    pub generation: Arc<Generation>,
    /// One per text, in order.
    pub rows: Vec<Row>,
    /// The tokens the model read (each text's count capped at its window).
    pub tokens: usize,
}

impl Embedder {
    /// A front door with nothing serving yet ([`EmbedError::Starting`]).
    pub fn new() -> Self {
        Embedder::default()
    }

    /// A front door serving `generation`.
    pub fn serving(generation: Generation) -> Self {
        let embedder = Embedder::default();
        embedder.install(Arc::new(generation));
        embedder
    }

    /// A front door over a running `supervisor` (batched as
    /// [`crate::config::Config::default`]'s `[serve]` says), counting
    /// tokens with `tokens`: for library users and tests that start their
    /// own pool.
    pub fn local(
        supervisor: crate::supervisor::Supervisor,
        tokens: crate::tokens::Tokens,
    ) -> Arc<Self> {
        Arc::new(Embedder::serving(Generation::local(
            supervisor,
            tokens,
            crate::config::Config::default(),
        )))
    }

    /// Starts the configured backend, at most `max_pool` instances of it,
    /// for a command's own use (batches of
    /// [`limits::ONE_SHOT_BATCH_TOKENS`]).
    ///
    /// # Errors
    /// Why it could not start.
    pub async fn start(
        config: crate::config::Config,
        max_pool: Option<usize>,
    ) -> Result<Self, crate::launch::LaunchError> {
        let budget = limits::ONE_SHOT_BATCH_TOKENS.max(config.serve.max_batch_tokens);
        let generation = Generation::start(config, 1, max_pool, budget).await?;
        let embedder = Embedder::default();
        embedder.install(generation);
        Ok(embedder)
    }

    /// The generation serving now, if any.
    pub fn current(&self) -> Option<Arc<Generation>> {
        match &*self.current.read().unwrap_or_else(|p| p.into_inner()) {
            Serving::Now(generation) => Some(generation.clone()),
            _ => None,
        }
    }

    /// The generation serving now.
    ///
    /// # Errors
    /// [`EmbedError::Starting`] before the first is installed,
    /// [`EmbedError::ShutDown`] after [`Embedder::take`].
    pub fn generation(&self) -> Result<Arc<Generation>, EmbedError> {
        match &*self.current.read().unwrap_or_else(|p| p.into_inner()) {
            Serving::Now(generation) => Ok(generation.clone()),
            Serving::Starting => Err(EmbedError::Starting),
            Serving::ShutDown => Err(EmbedError::ShutDown),
        }
    }

    /// Serves `generation` from now on; returns the one it replaces (still
    /// held by the jobs prepared on it).
    pub fn install(&self, generation: Arc<Generation>) -> Option<Arc<Generation>> {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        match std::mem::replace(&mut *current, Serving::Now(generation)) {
            Serving::Now(old) => Some(old),
            _ => None,
        }
    }

    /// Stops serving for good; returns the generation that served.
    pub fn take(&self) -> Option<Arc<Generation>> {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        match std::mem::replace(&mut *current, Serving::ShutDown) {
            Serving::Now(old) => Some(old),
            _ => None,
        }
    }

    /// Jobs that came through the front door, from any entrance.
    pub fn jobs(&self) -> u64 {
        self.jobs.load(Ordering::Relaxed)
    }

    /// Texts the front door has tokenized.
    pub fn tokenized(&self) -> u64 {
        self.tokenized.load(Ordering::Relaxed)
    }

    /// The bytes of text being tokenized now share this budget
    /// ([`limits::SERVE_TOKENIZE_BYTES_IN_FLIGHT`]).
    pub fn tokenizing_budget(&self) -> &Arc<Semaphore> {
        &self.tokenizing
    }

    /// Embeds `job` on the generation serving now: [`Embedder::prepare`],
    /// then [`Prepared::run`].
    ///
    /// # Errors
    /// [`EmbedError`]: why no row can be given.
    pub async fn embed(&self, job: Job) -> Result<Embedded, EmbedError> {
        let generation = self.generation()?;
        self.prepare(&generation, job).await?.run().await
    }

    /// Checks `job` and counts its tokens on `generation`, which the
    /// returned job keeps.
    ///
    /// # Errors
    /// [`EmbedError::Input`] naming the first bad text,
    /// [`EmbedError::Counts`], [`EmbedError::TokenizerBusy`], or
    /// [`EmbedError::TooSlow`]/[`EmbedError::Behind`] when the pool cannot
    /// finish it in time.
    pub async fn prepare(
        &self,
        generation: &Arc<Generation>,
        job: Job,
    ) -> Result<Prepared, EmbedError> {
        self.jobs.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(METRIC_JOBS, "model" => generation.config.served_name()).increment(1);
        tracing::debug!(
            target: LOG_TARGET,
            texts = job.texts.len(),
            counted = job.tokens.is_some(),
            generation = generation.generation,
            backend = generation.backend,
            "job"
        );
        let until = Instant::now() + job.deadline;
        let Job {
            texts,
            is_query,
            tokens,
            truncate,
            guarded,
            ..
        } = job;
        // The model's prompt and lowercasing, before any count, so the
        // limits count what the model sees. The caller's counts were of
        // its own text: counted again then.
        let form = &generation.form;
        let (texts, tokens) = if form.is_plain() {
            (texts, tokens)
        } else {
            let formed = texts.into_iter().map(|t| form.apply(t, is_query));
            (formed.collect(), None)
        };
        let (texts, counts) = match tokens {
            Some(counts) if counts.len() == texts.len() => (texts, counts),
            Some(counts) => {
                return Err(EmbedError::Counts {
                    counts: counts.len(),
                    texts: texts.len(),
                });
            }
            None => self.count(generation, texts, guarded).await?,
        };
        let window = generation.info.max_input_tokens.max(1) as usize;
        job::check_counts(&counts, window, truncate, guarded)?;
        if guarded {
            let total: usize = counts.iter().map(|&n| n.min(window)).sum();
            check_deadline(generation, total.max(texts.len()), until)?;
        }
        Ok(Prepared {
            generation: generation.clone(),
            texts,
            counts,
            is_query,
            until,
        })
    }

    /// Token counts of `texts` by `generation`'s tokenizer (words first, for
    /// a `guarded` job), within the shared budget. A text the tokenizer
    /// refuses fails a guarded job; otherwise it counts as one token and
    /// the engine judges it.
    async fn count(
        &self,
        generation: &Arc<Generation>,
        texts: Vec<String>,
        guarded: bool,
    ) -> Result<(Vec<String>, Vec<usize>), EmbedError> {
        if guarded {
            job::check_words(&texts)?;
        }
        self.tokenized
            .fetch_add(texts.len() as u64, Ordering::Relaxed);
        metrics::counter!(METRIC_TOKENIZED, "model" => generation.config.served_name())
            .increment(texts.len() as u64);
        let bytes: usize = texts.iter().map(String::len).sum();
        let counter = generation.clone();
        let (texts, counted) = tokenizing(&self.tokenizing, bytes, move || {
            let counted: Vec<Result<usize, crate::tokens::TokenizeError>> = texts
                .iter()
                .map(|t| counter.tokens.spans(t).map(|s| s.len()))
                .collect();
            (texts, counted)
        })
        .await?;
        let mut counts = Vec::with_capacity(counted.len());
        for (index, count) in counted.into_iter().enumerate() {
            counts.push(match count {
                Ok(n) => n,
                Err(reason) if guarded => {
                    return Err(EmbedError::Input {
                        index,
                        problem: InputProblem::Untokenizable(reason),
                    });
                }
                Err(_) => 1,
            });
        }
        Ok((texts, counts))
    }
}

/// The owner's bus peer ([`peer::router`]) over a front door on a running
/// `supervisor`, counting tokens by words.
pub fn supervised_router(supervisor: crate::supervisor::Supervisor) -> crate::bus::Router {
    peer::router(
        Embedder::local(supervisor, crate::tokens::Tokens::Words),
        peer::Role::Owner,
    )
}

impl Prepared {
    /// The tokens the model will read.
    pub fn tokens(&self) -> usize {
        let window = self.generation.info.max_input_tokens.max(1) as usize;
        self.counts.iter().map(|&n| n.min(window)).sum()
    }

    /// Runs the job on its generation.
    ///
    /// # Errors
    /// [`EmbedError`] when no row can be given (queue full, pool stopped,
    /// the pool's error for the whole batch).
    pub async fn run(self) -> Result<Embedded, EmbedError> {
        let tokens = self.tokens();
        let rows = self
            .generation
            .embed(self.texts, &self.counts, self.is_query, self.until)
            .await?;
        Ok(Embedded {
            generation: self.generation,
            rows,
            tokens,
        })
    }
}

/// Refuses at once a job of `tokens` that `generation` cannot finish by
/// `until` at the fastest speed it has been measured at.
fn check_deadline(
    generation: &Generation,
    tokens: usize,
    until: Instant,
) -> Result<(), EmbedError> {
    let Some(estimate) = generation.estimate(tokens) else {
        return Ok(());
    };
    let left = until.saturating_duration_since(Instant::now());
    if estimate.alone > left {
        return Err(EmbedError::TooSlow {
            tokens,
            needs: estimate.alone,
            left,
        });
    }
    if estimate.queued > left {
        return Err(EmbedError::Behind {
            tokens,
            needs: estimate.queued,
            left,
        });
    }
    Ok(())
}

/// Texts up to this many bytes in all are tokenized on the caller's own
/// task, without a share of [`limits::SERVE_TOKENIZE_BYTES_IN_FLIGHT`]: a
/// sentence takes microseconds, less than a hand-off to a blocking thread.
const INLINE_TOKENIZE_BYTES: usize = 4096;

/// Runs `work`, a tokenization of `bytes` of text: here if they are few,
/// else on a blocking thread once it has its share of `share_of` (one
/// permit per byte, at most [`limits::SERVE_TOKENIZE_BYTES_IN_FLIGHT`]),
/// held until the work ends.
///
/// # Errors
/// [`EmbedError::TokenizerBusy`] if the share does not come within
/// [`limits::SERVE_TOKENIZE_WAIT`]; [`EmbedError::TokenizerFailed`] if the
/// blocking thread panicked.
pub async fn tokenizing<T: Send + 'static>(
    share_of: &Arc<Semaphore>,
    bytes: usize,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, EmbedError> {
    if bytes <= INLINE_TOKENIZE_BYTES {
        return Ok(work());
    }
    let share = bytes.min(limits::SERVE_TOKENIZE_BYTES_IN_FLIGHT) as u32;
    let permit = tokio::time::timeout(
        limits::SERVE_TOKENIZE_WAIT,
        share_of.clone().acquire_many_owned(share),
    )
    .await
    .ok()
    .and_then(Result::ok)
    .ok_or(EmbedError::TokenizerBusy)?;
    let share_of = share_of.clone();
    tokio::task::spawn_blocking(move || {
        let done = work();
        drop(permit);
        give_back_after_burst(&share_of);
        done
    })
    .await
    .map_err(|e| EmbedError::TokenizerFailed(Arc::new(e)))
}

/// Gives the heaps' free pages back once a burst of tokenizing has ended
/// (`share_of` whole again): the tokenizer's state was many small blocks,
/// and without it the service kept 513 MB after an attack. Once a burst,
/// not after each job: a trim walks every heap and would drop pages the
/// tokenizations still running are about to reuse. Racy but harmless: at
/// worst one trim too many, or one missed until the next burst ends.
fn give_back_after_burst(share_of: &Semaphore) {
    if share_of.available_permits() >= limits::SERVE_TOKENIZE_BYTES_IN_FLIGHT {
        crate::memory::give_back();
    }
}
