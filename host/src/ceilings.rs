//! The ceiling of every value a config file can set, and the pool's memory
//! checked against the machine's.
//!
//! # Invariants
//! - Every numeric key of `embedhost.toml` is in [`CEILINGS`], with the
//!   constant of `limits.rs` that bounds it; a value past it is refused when
//!   the file is read ([`crate::config::ConfigError::PastCeiling`], naming
//!   the key). A value within every ceiling cannot panic or hang the host:
//!   durations built from them stay far from overflow, and the arithmetic
//!   that grows them (a call's deadline with its text) saturates and is
//!   capped ([`crate::limits::MAX_WORK_DEADLINE`]).
//! - A pool whose memory caps add up to more than
//!   [`crate::limits::POOL_MEMORY_SHARE_PERCENT`] of the machine's memory
//!   does not start ([`fit_pool`]): an explicit `pool_size` is refused with
//!   one line, the default (one instance per core) is made smaller.

use crate::config::Config;
use crate::limits;

/// One key's ceiling.
#[derive(Clone, Copy)]
pub struct Ceiling {
    /// The key, as `[section] key`.
    pub key: &'static str,
    /// The largest value accepted, in the key's own unit.
    pub max: u64,
    /// The constant of `limits.rs` the ceiling comes from.
    pub constant: &'static str,
    /// The key's value in a config, if set.
    value: fn(&Config) -> Option<u64>,
}

impl std::fmt::Debug for Ceiling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ceiling")
            .field("key", &self.key)
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

const fn ms(d: std::time::Duration) -> u64 {
    d.as_millis() as u64
}

const MIB: u64 = 1024 * 1024;

macro_rules! ceiling {
    ($key:literal, $max:expr, $constant:literal, |$c:ident| $value:expr) => {
        Ceiling {
            key: $key,
            max: $max,
            constant: $constant,
            value: |$c: &Config| $value,
        }
    };
}

/// Every numeric key of the config and its ceiling.
pub static CEILINGS: &[Ceiling] = &[
    ceiling!(
        "[limits] memory_mb",
        limits::MAX_MEMORY_LIMIT_BYTES / MIB,
        "limits::MAX_MEMORY_LIMIT_BYTES",
        |c| Some(c.limits.memory_mb)
    ),
    ceiling!(
        "[limits] call_deadline_ms",
        ms(limits::MAX_CONFIG_DEADLINE),
        "limits::MAX_CONFIG_DEADLINE",
        |c| Some(c.limits.call_deadline_ms)
    ),
    ceiling!(
        "[limits] call_deadline_per_kib_ms",
        ms(limits::MAX_CALL_DEADLINE_PER_KIB),
        "limits::MAX_CALL_DEADLINE_PER_KIB",
        |c| Some(c.limits.call_deadline_per_kib_ms)
    ),
    ceiling!(
        "[limits] init_deadline_ms",
        ms(limits::MAX_CONFIG_DEADLINE),
        "limits::MAX_CONFIG_DEADLINE",
        |c| Some(c.limits.init_deadline_ms)
    ),
    ceiling!(
        "[cache] max_mb",
        limits::MAX_CACHE_BYTES / MIB,
        "limits::MAX_CACHE_BYTES",
        |c| c.cache.max_mb
    ),
    ceiling!(
        "[supervisor] pool_size",
        limits::MAX_POOL_SIZE as u64,
        "limits::MAX_POOL_SIZE",
        |c| c.supervisor.pool_size.map(|n| n as u64)
    ),
    ceiling!(
        "[supervisor] max_restarts",
        limits::MAX_CONFIG_COUNT,
        "limits::MAX_CONFIG_COUNT",
        |c| c.supervisor.max_restarts.map(u64::from)
    ),
    ceiling!(
        "[supervisor] restart_window_ms",
        ms(limits::MAX_CONFIG_INTERVAL),
        "limits::MAX_CONFIG_INTERVAL",
        |c| c.supervisor.restart_window_ms
    ),
    ceiling!(
        "[supervisor] restart_backoff_min_ms",
        ms(limits::MAX_CONFIG_INTERVAL),
        "limits::MAX_CONFIG_INTERVAL",
        |c| c.supervisor.restart_backoff_min_ms
    ),
    ceiling!(
        "[supervisor] restart_backoff_max_ms",
        ms(limits::MAX_CONFIG_INTERVAL),
        "limits::MAX_CONFIG_INTERVAL",
        |c| c.supervisor.restart_backoff_max_ms
    ),
    ceiling!(
        "[supervisor] health_interval_ms",
        ms(limits::MAX_CONFIG_INTERVAL),
        "limits::MAX_CONFIG_INTERVAL",
        |c| c.supervisor.health_interval_ms
    ),
    ceiling!(
        "[supervisor] health_timeout_ms",
        ms(limits::MAX_CONFIG_DEADLINE),
        "limits::MAX_CONFIG_DEADLINE",
        |c| c.supervisor.health_timeout_ms
    ),
    ceiling!(
        "[supervisor] recycle_memory_bytes",
        limits::MAX_CONFIG_MEMORY_BYTES,
        "limits::MAX_CONFIG_MEMORY_BYTES",
        |c| c.supervisor.recycle_memory_bytes
    ),
    ceiling!(
        "[supervisor] recycle_processed",
        limits::MAX_RECYCLE_PROCESSED,
        "limits::MAX_RECYCLE_PROCESSED",
        |c| c.supervisor.recycle_processed
    ),
    ceiling!(
        "[supervisor] poison_after",
        limits::MAX_CONFIG_COUNT,
        "limits::MAX_CONFIG_COUNT",
        |c| c.supervisor.poison_after.map(u64::from)
    ),
    ceiling!(
        "[native] threads",
        limits::MAX_NATIVE_THREADS as u64,
        "limits::MAX_NATIVE_THREADS",
        |c| c.native.threads.map(|n| n as u64)
    ),
    ceiling!(
        "[native] grace_ms",
        ms(limits::MAX_CONFIG_GRACE),
        "limits::MAX_CONFIG_GRACE",
        |c| Some(c.native.grace_ms)
    ),
    ceiling!(
        "[native] memory_ceiling_mb",
        limits::MAX_CONFIG_MEMORY_BYTES / MIB,
        "limits::MAX_CONFIG_MEMORY_BYTES",
        |c| c.native.memory_ceiling_mb
    ),
    ceiling!(
        "[index] max_file_bytes",
        limits::MAX_INDEX_FILE_BYTES,
        "limits::MAX_INDEX_FILE_BYTES",
        |c| Some(c.index.max_file_bytes)
    ),
    ceiling!(
        "[index] chunk_tokens",
        limits::MAX_CONFIG_TOKENS,
        "limits::MAX_CONFIG_TOKENS",
        |c| Some(c.index.chunk_tokens as u64)
    ),
    ceiling!(
        "[index] chunk_overlap",
        limits::MAX_CONFIG_TOKENS,
        "limits::MAX_CONFIG_TOKENS",
        |c| Some(c.index.chunk_overlap as u64)
    ),
    ceiling!(
        "[index] batch_chunks",
        limits::MAX_CONFIG_BATCH,
        "limits::MAX_CONFIG_BATCH",
        |c| Some(c.index.batch_chunks as u64)
    ),
    ceiling!(
        "[index] log_interval_ms",
        ms(limits::MAX_CONFIG_INTERVAL),
        "limits::MAX_CONFIG_INTERVAL",
        |c| Some(c.index.log_interval_ms)
    ),
    ceiling!(
        "[index] max_file_chunks",
        limits::MAX_CONFIG_FILE_CHUNKS,
        "limits::MAX_CONFIG_FILE_CHUNKS",
        |c| Some(c.index.max_file_chunks as u64)
    ),
    ceiling!(
        "[serve] max_body_kb",
        limits::MAX_SERVE_BODY_BYTES / 1024,
        "limits::MAX_SERVE_BODY_BYTES",
        |c| Some(c.serve.max_body_kb as u64)
    ),
    ceiling!(
        "[serve] max_inputs",
        limits::MAX_CONFIG_BATCH,
        "limits::MAX_CONFIG_BATCH",
        |c| Some(c.serve.max_inputs as u64)
    ),
    ceiling!(
        "[serve] max_concurrent_requests",
        limits::MAX_SERVE_CONCURRENT,
        "limits::MAX_SERVE_CONCURRENT",
        |c| Some(c.serve.max_concurrent_requests as u64)
    ),
    ceiling!(
        "[serve] request_deadline_ms",
        ms(limits::SERVE_MAX_REQUEST_DEADLINE),
        "limits::SERVE_MAX_REQUEST_DEADLINE",
        |c| Some(c.serve.request_deadline_ms)
    ),
    ceiling!(
        "[serve] max_batch_tokens",
        limits::MAX_CONFIG_TOKENS,
        "limits::MAX_CONFIG_TOKENS",
        |c| Some(c.serve.max_batch_tokens as u64)
    ),
    ceiling!(
        "[serve] batch_wait_us",
        limits::MAX_SERVE_BATCH_WAIT.as_micros() as u64,
        "limits::MAX_SERVE_BATCH_WAIT",
        |c| Some(c.serve.batch_wait_us)
    ),
    ceiling!(
        "[serve] shutdown_grace_ms",
        ms(limits::MAX_CONFIG_GRACE),
        "limits::MAX_CONFIG_GRACE",
        |c| Some(c.serve.shutdown_grace_ms)
    ),
];

/// The first key of `config` past its ceiling: the ceiling and the value.
pub fn first_past(config: &Config) -> Option<(&'static Ceiling, u64)> {
    CEILINGS.iter().find_map(|ceiling| {
        (ceiling.value)(config)
            .filter(|&value| value > ceiling.max)
            .map(|value| (ceiling, value))
    })
}

/// A pool whose memory caps do not fit the machine's budget.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{pool} instances of {per_instance} bytes each may use {total} bytes, more than {budget} bytes ({}% of this machine's {machine} bytes, limits::POOL_MEMORY_SHARE_PERCENT): lower `[supervisor] pool_size` or the memory per instance",
    limits::POOL_MEMORY_SHARE_PERCENT
)]
pub struct PoolMemoryError {
    /// Instances asked for.
    pub pool: usize,
    /// Each instance's memory cap.
    pub per_instance: u64,
    /// Their total.
    pub total: u64,
    /// What the machine allows.
    pub budget: u64,
    /// The machine's memory.
    pub machine: u64,
}

/// The pool size to start: `pool` if its caps fit the share of `machine`
/// bytes; for a default (not `explicit`) pool, as many as fit (at least
/// one); for an explicit one, the error.
///
/// # Errors
/// [`PoolMemoryError`] for an explicit pool that does not fit, or when not
/// even one instance fits.
pub fn fit_pool(
    pool: usize,
    explicit: bool,
    per_instance: u64,
    machine: u64,
) -> Result<usize, PoolMemoryError> {
    let budget =
        u64::try_from(u128::from(machine) * u128::from(limits::POOL_MEMORY_SHARE_PERCENT) / 100)
            .unwrap_or(u64::MAX);
    let total = per_instance.saturating_mul(pool as u64);
    if total <= budget {
        return Ok(pool);
    }
    let fits = usize::try_from(budget / per_instance.max(1)).unwrap_or(usize::MAX);
    if !explicit && fits >= 1 {
        tracing::info!(
            pool,
            fits,
            per_instance,
            "the default pool is made smaller to fit this machine's memory"
        );
        return Ok(fits.min(pool));
    }
    Err(PoolMemoryError {
        pool,
        per_instance,
        total,
        budget,
        machine,
    })
}

/// Several models' pools whose memory caps together do not fit the
/// machine's budget.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the pools of the models served may use {total} bytes together ({}), more than {budget} bytes ({}% of this machine's {machine} bytes, limits::POOL_MEMORY_SHARE_PERCENT): serve fewer models, or lower their `pool_size` or memory per instance",
    .pools.iter().map(|(name, pool, each)| format!("`{name}`: {pool} x {each}")).collect::<Vec<_>>().join(", "),
    limits::POOL_MEMORY_SHARE_PERCENT
)]
pub struct ModelsMemoryError {
    /// Each model's name, pool size and memory cap per instance.
    pub pools: Vec<(String, usize, u64)>,
    /// Their total.
    pub total: u64,
    /// What the machine allows.
    pub budget: u64,
    /// The machine's memory.
    pub machine: u64,
}

/// Checks that the pools of several models (name, pool size, memory cap
/// per instance, none for an unbounded one) fit the share of `machine`
/// bytes together.
///
/// # Errors
/// [`ModelsMemoryError`] naming each pool's share.
pub fn fit_models(
    pools: &[(String, usize, Option<u64>)],
    machine: u64,
) -> Result<(), ModelsMemoryError> {
    let budget =
        u64::try_from(u128::from(machine) * u128::from(limits::POOL_MEMORY_SHARE_PERCENT) / 100)
            .unwrap_or(u64::MAX);
    let bounded: Vec<(String, usize, u64)> = pools
        .iter()
        .filter_map(|(name, pool, each)| each.map(|each| (name.clone(), *pool, each)))
        .collect();
    let total = bounded.iter().fold(0u64, |sum, (_, pool, each)| {
        sum.saturating_add(each.saturating_mul(*pool as u64))
    });
    if total <= budget {
        return Ok(());
    }
    Err(ModelsMemoryError {
        pools: bounded,
        total,
        budget,
        machine,
    })
}

/// The machine's memory (`MemTotal` in `/proc/meminfo`), if it can be read.
pub fn machine_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(text: &str) -> Result<Config, crate::config::ConfigError> {
        Config::parse(text, Path::new("c.toml"))
    }

    fn setting(ceiling: &Ceiling, value: u64) -> String {
        let (section, key) = ceiling.key.split_once(' ').unwrap();
        format!("{section}\n{key} = {value}\n")
    }

    #[test]
    fn every_key_past_its_ceiling_is_refused_naming_the_key() {
        for ceiling in CEILINGS {
            for value in [ceiling.max + 1, i64::MAX as u64] {
                let err = parse(&setting(ceiling, value)).unwrap_err();
                let text = err.to_string();
                let key = ceiling.key.split_once(' ').unwrap().1;
                assert!(text.contains(key), "{}: {text}", ceiling.key);
                // A value the key's type cannot hold is refused by the
                // parser, which names the key too; any other by its ceiling.
                let past = matches!(err, crate::config::ConfigError::PastCeiling { .. });
                assert!(past || value != ceiling.max + 1, "{}: {text}", ceiling.key);
                assert!(
                    !past || text.contains(ceiling.constant),
                    "{}: {text}",
                    ceiling.key
                );
            }
        }
    }

    #[test]
    fn every_key_at_its_ceiling_is_accepted_and_cannot_panic_the_host() {
        for ceiling in CEILINGS {
            let mut text = setting(ceiling, ceiling.max);
            if ceiling.key == "[index] chunk_overlap" {
                // It must stay below chunk_tokens, whose ceiling it shares.
                text = format!(
                    "[index]\nchunk_tokens = {0}\nchunk_overlap = {1}\n",
                    ceiling.max,
                    ceiling.max - 1
                );
            }
            let config = parse(&text).unwrap_or_else(|e| panic!("{}: {e}", ceiling.key));
            // What the host derives from the values, at their ceilings.
            let limits = config.instance_limits();
            let huge = vec!["x".repeat(1 << 20); 64];
            let deadline = crate::backend::work_deadline(
                limits.call_deadline,
                limits.call_deadline_per_kib,
                &huge,
            );
            assert!(deadline <= limits::MAX_WORK_DEADLINE, "{}", ceiling.key);
            let supervision = config.supervisor_config();
            let _ = std::time::Instant::now() + supervision.health_interval;
            let _ = std::time::Instant::now() + supervision.intensity.window;
            let _ = supervision.pool_size + 1;
        }
    }

    #[test]
    fn the_default_config_is_within_every_ceiling() {
        assert!(first_past(&Config::default()).is_none());
    }

    #[test]
    fn a_pool_past_the_machine_is_refused_when_explicit_and_shrunk_when_not() {
        let gib = 1 << 30;
        // 8 GiB machine: 6 GiB of caps allowed.
        assert_eq!(fit_pool(6, true, gib, 8 * gib), Ok(6));
        let err = fit_pool(8, true, gib, 8 * gib).unwrap_err();
        assert_eq!((err.total, err.budget), (8 * gib, 6 * gib));
        assert!(
            err.to_string().contains("POOL_MEMORY_SHARE_PERCENT"),
            "{err}"
        );
        assert_eq!(err.to_string().lines().count(), 1);
        assert_eq!(fit_pool(8, false, gib, 8 * gib), Ok(6));
        // Not even one fits.
        assert!(fit_pool(1, false, 16 * gib, 8 * gib).is_err());
        assert!(machine_memory_bytes().is_some_and(|m| m > 0));
    }
}
