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
