//! Log bytes per plugin: one budget shared by all of a plugin's instances,
//! restarts and snapshots, living outside any instance.
//!
//! # Invariants
//! - Whatever a plugin does (log from many instances, trap and restart in
//!   a loop), the host writes at most [`limits::PLUGIN_LOG_BYTES_BURST`] +
//!   [`limits::PLUGIN_LOG_BYTES_PER_SECOND`] × t bytes of its log lines in
//!   any t seconds, and at most [`limits::PLUGIN_LOG_BYTES_PER_HOUR`] (plus
//!   the hour's own refill) in any hour: two token buckets keyed by the
//!   plugin's name, in a process-wide registry, so a new instance starts
//!   with what the last one left.
//! - A line either passes whole or is dropped whole; dropped bytes are
//!   counted in [`METRIC_LOG_DROPPED_BYTES`].
//! - The registry holds one small entry per plugin name the process has
//!   loaded (one, or a few across reloads).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use crate::limits;

/// Bytes a log line is charged beyond its message and the plugin's name:
/// its timestamp, level, target and field names as the host's log prints
/// them (about 100 bytes), rounded up.
pub(crate) const LINE_OVERHEAD: usize = 128;

/// Metric: bytes of plugin log lines dropped by the byte budget, by plugin.
pub const METRIC_LOG_DROPPED_BYTES: &str = "plugin_log_dropped_bytes_total";

/// A token bucket of bytes.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    capacity: f64,
    per_second: f64,
    refilled: Instant,
}

impl Bucket {
    fn new(capacity: u64, per_second: f64, now: Instant) -> Self {
        Bucket {
            tokens: capacity as f64,
            capacity: capacity as f64,
            per_second,
            refilled: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.capacity);
        self.refilled = now;
    }
}

/// One plugin's log budget: a per-second and a per-hour bucket.
#[derive(Debug)]
pub(crate) struct LogBudget {
    second: Bucket,
    hour: Bucket,
    /// Bytes dropped over the process's life.
    pub(crate) dropped_bytes: u64,
}

impl LogBudget {
    pub(crate) fn new(now: Instant) -> Self {
        LogBudget {
            second: Bucket::new(
                limits::PLUGIN_LOG_BYTES_BURST,
                limits::PLUGIN_LOG_BYTES_PER_SECOND as f64,
                now,
            ),
            hour: Bucket::new(
                limits::PLUGIN_LOG_BYTES_PER_HOUR,
                limits::PLUGIN_LOG_BYTES_PER_HOUR as f64 / 3600.0,
                now,
            ),
            dropped_bytes: 0,
        }
    }

    /// Whether a line of `bytes` may be written at `now`; if so, it is
    /// paid for from both buckets.
    pub(crate) fn admit(&mut self, bytes: usize, now: Instant) -> bool {
        self.second.refill(now);
        self.hour.refill(now);
        let cost = bytes as f64;
        if self.second.tokens >= cost && self.hour.tokens >= cost {
            self.second.tokens -= cost;
            self.hour.tokens -= cost;
            true
        } else {
            self.dropped_bytes = self.dropped_bytes.saturating_add(bytes as u64);
            false
        }
    }
}

/// The budget of the plugin named `plugin`, shared by every instance of it
/// in this process.
pub(crate) fn for_plugin(plugin: &Arc<str>) -> Arc<Mutex<LogBudget>> {
    type Budgets = HashMap<Arc<str>, Arc<Mutex<LogBudget>>>;
    static BUDGETS: OnceLock<Mutex<Budgets>> = OnceLock::new();
    let mut budgets = BUDGETS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    budgets
        .entry(plugin.clone())
        .or_insert_with(|| Arc::new(Mutex::new(LogBudget::new(Instant::now()))))
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_passes_then_the_rate_holds() {
        let t0 = Instant::now();
        let mut budget = LogBudget::new(t0);
        let line = 4000;
        let mut written = 0u64;
        for _ in 0..1000 {
            if budget.admit(line, t0) {
                written += line as u64;
            }
        }
        assert!(written <= limits::PLUGIN_LOG_BYTES_BURST, "{written}");
        assert!(written > limits::PLUGIN_LOG_BYTES_BURST - line as u64);
        // Ten seconds later, ten seconds' worth more.
        let later = t0 + Duration::from_secs(10);
        let mut more = 0u64;
        for _ in 0..1000 {
            if budget.admit(line, later) {
                more += line as u64;
            }
        }
        // (and what the burst left, under one line)
        assert!(
            more <= 10 * limits::PLUGIN_LOG_BYTES_PER_SECOND + line as u64,
            "{more}"
        );
        assert!(budget.dropped_bytes > 0);
    }

    #[test]
    fn an_hour_at_the_full_rate_is_cut_by_the_hourly_budget() {
        let t0 = Instant::now();
        let mut budget = LogBudget::new(t0);
        let line = 4000;
        let mut written = 0u64;
        // Every 100 ms for three hours, as much as the buckets allow.
        let hours = 3;
        for step in 0..36_000 * hours {
            let now = t0 + Duration::from_millis(100 * step);
            while budget.admit(line, now) {
                written += line as u64;
            }
        }
        // The first bucket, and the hours' refill.
        let hourly = limits::PLUGIN_LOG_BYTES_PER_HOUR;
        assert!(written <= (1 + hours) * hourly + line as u64, "{written}");
        assert!(
            written < limits::PLUGIN_LOG_BYTES_PER_SECOND * 3600 * hours,
            "the hourly budget never bound: {written}"
        );
    }

    #[test]
    fn instances_of_one_plugin_share_a_budget() {
        let name: Arc<str> = Arc::from("test:shared-budget");
        let a = for_plugin(&name);
        let b = for_plugin(&name);
        assert!(Arc::ptr_eq(&a, &b));
        let other = for_plugin(&Arc::from("test:other-budget"));
        assert!(!Arc::ptr_eq(&a, &other));
    }
}
