//! Every timeout, threshold and size limit of the host, in one place, each
//! with the reason for its value.
//!
//! A value that a user may want to change is also a configuration key (see
//! [`crate::config`]); the constant here is then its default.

use std::time::Duration;

/// Per-attempt timeout of a bus request when the caller sets none. The seed's
/// value: long enough for a large embedding batch on a slow machine, short
/// enough that a hung peer is noticed within a user's patience.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// First retry delay of the bus's exponential backoff. Small: the usual cause
/// of a retry is an instance that crashed and is replaced within milliseconds.
pub const DEFAULT_BACKOFF_MIN: Duration = Duration::from_millis(100);

/// Largest retry delay: past a few seconds the caller is better served by an
/// error than by waiting.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Growth factor between consecutive retry delays (the seed doubles).
pub const DEFAULT_BACKOFF_FACTOR: f32 = 2.0;

/// Requests in flight to one peer before the bus answers `Overloaded`
/// instead of queueing. Bounded so that a stuck peer turns into errors rather
/// than unbounded memory; large enough for a worker's pipelined batches.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 256;

/// Largest frame the child-process transport sends or accepts. A batch of 256
/// texts at 4096 dimensions (the largest common models) is 4 MiB of floats;
/// 32 MiB leaves room for long texts in requests while still refusing a
/// corrupt length prefix before allocating for it.
pub const MAX_FRAME_BYTES: usize = 32 * 1024 * 1024;

/// Interval of the WASM engine's epoch ticker. A call's deadline is enforced
/// to within one tick: 5 ms keeps that error small against the smallest
/// deadline anyone sets (tens of milliseconds) at negligible cost (one atomic
/// increment per tick).
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Deadline of one call into a WASM plugin when the configuration sets none:
/// an embedding batch of a real model takes well under 10 s even on 2 cores;
/// a call longer than this is treated as hung.
pub const DEFAULT_CALL_DEADLINE: Duration = Duration::from_secs(30);

/// Deadline of a plugin's `init`: loading a model can read tens of megabytes.
pub const DEFAULT_INIT_DEADLINE: Duration = Duration::from_secs(60);

/// Per-instance cap on a plugin's linear memory when the configuration sets
/// none. all-MiniLM-L6-v2 needs about 190 MiB; 1 GiB leaves room for
/// larger models while still stopping a runaway allocation long before the
/// host feels it.
pub const DEFAULT_MEMORY_LIMIT_BYTES: u64 = 1024 * 1024 * 1024;

/// Longest line of plugin stdout/stderr forwarded to the log; the rest of the
/// line is dropped, so a plugin cannot flood the host's log with one write.
pub const MAX_PLUGIN_LOG_LINE: usize = 4096;

/// Longest message a plugin may pass to `host-log.log`, for the same reason.
pub const MAX_PLUGIN_LOG_MESSAGE: usize = 4096;

/// OTP's MaxR default: restarts of one instance allowed within
/// [`DEFAULT_RESTART_WINDOW`] before the backend is declared failed.
pub const DEFAULT_MAX_RESTARTS: u32 = 3;

/// OTP's MaxT default (5 s): the sliding window for [`DEFAULT_MAX_RESTARTS`].
pub const DEFAULT_RESTART_WINDOW: Duration = Duration::from_secs(5);

/// Backoff before the second restart within a window; doubles after. The
/// first restart is immediate: most crashes are one-offs, and the seed's
/// recovery target (under 5 s) leaves no room for waiting by default.
pub const DEFAULT_RESTART_BACKOFF_MIN: Duration = Duration::from_millis(100);

/// Cap on the restart backoff: no longer than the window itself, so a slot
/// that keeps failing still reaches escalation instead of sleeping past it.
pub const DEFAULT_RESTART_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Uptime after which an instance counts as stable and the backoff starts
/// over: twice the window, so a slot that fails once per window keeps its
/// backoff.
pub const DEFAULT_STABLE_UPTIME: Duration = Duration::from_secs(10);

/// Interval of the periodic health check (the seed's 10 s).
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(10);

/// Deadline of one health check (the seed's 5 s): `health` is cheap, so an
/// instance that cannot answer in 5 s is hung.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// Memory above which an instance is recycled (make-before-break).
///
/// Derived from measurement, not the seed's 300 MB (which was set for a
/// leaking child): all-MiniLM-L6-v2 holds 185 MB resident in a native child
/// and 203 MB of linear memory in a WASM instance at steady state, and a
/// batch of 256-token passages takes the native child past 300 MB (ONNX
/// Runtime keeps the arena a large batch needed), so 300 MB recycled healthy
/// children after every large batch (`cargo bench --bench throughput` prints
/// both figures). 768 MB is about four times the steady state: a real leak
/// still crosses it long before it hurts the machine.
pub const DEFAULT_RECYCLE_MEMORY_BYTES: u64 = 768_000_000;

/// Texts after which an instance is recycled.
///
/// Not the seed's 200: a recycle reloads the model (about 0.3 s natively,
/// longer in WASM), and at 300 texts/s 200 texts would recycle every 0.7 s.
/// At 100,000 a fully loaded instance is recycled about every five minutes,
/// and the reload costs under 0.5% of its time; leaks are the memory
/// threshold's job.
pub const DEFAULT_RECYCLE_PROCESSED: u64 = 100_000;

/// A text that crashes this many instances on its own is poison and is
/// answered with an error instead of being retried (two: one crash may be
/// bad luck, two in a row on the same text alone is the text).
pub const DEFAULT_POISON_AFTER: u32 = 2;

/// How long a native child waits after answering `shutdown` before it exits,
/// so the answer reaches the pipe: a frame write takes microseconds; 20 ms is
/// generous and still far below the host's grace period.
pub const CHILD_SHUTDOWN_FLUSH: Duration = Duration::from_millis(20);

/// Time a native child gets to answer `shutdown` and exit before SIGTERM
/// (the 5 s: an engine may be finishing a batch).
pub const DEFAULT_CHILD_GRACE: Duration = Duration::from_secs(5);

/// Time a native child gets to exit after SIGTERM before SIGKILL. Short: the
/// child has already ignored `shutdown` for a whole grace period, and our
/// child does not handle SIGTERM (the default action ends it at once), so
/// SIGTERM is a courtesy to wrappers; a child that ignores everything is
/// gone within the grace period plus this plus the reap.
pub const CHILD_SIGTERM_GRACE: Duration = Duration::from_millis(50);

/// Time given to one `embedder.embed` of a batch while indexing: a batch of
/// 32 passages of 256 tokens takes about 2 s natively and up to 10 s in one
/// WASM instance on a slow machine, so a hung embedder is noticed within
/// minutes without failing a slow one.
pub const INDEX_EMBED_TIMEOUT: Duration = Duration::from_secs(120);

/// Time given to a search's query embedding: one short text, so a generous
/// bound still fails a stuck embedder while a person waits.
pub const SEARCH_EMBED_TIMEOUT: Duration = Duration::from_secs(30);

/// How long an index database statement waits for another connection's
/// lock (`embedhost stats` reading while `index` writes) before failing:
/// commits hold it for milliseconds.
pub const INDEX_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How often `embedhost index` asks the worker for its counts to draw the
/// progress bar: often enough to look live, rarely enough to cost nothing
/// (each ask takes the store's lock).
pub const INDEX_PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// Time given to `worker.index` to walk the paths and queue files (the
/// walk of a large tree reads every file's metadata; the indexing itself
/// continues in the background).
pub const INDEX_WALK_TIMEOUT: Duration = Duration::from_secs(600);
