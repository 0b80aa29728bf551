//! Restart intensity and backoff: when to restart, how long to wait, and
//! when to give up.
//!
//! OTP's rule: more than `max_restarts` restarts within `window` escalates.
//! Beyond OTP: the first restart in a window is immediate, later ones wait
//! exponentially with full jitter, and the backoff exponent resets once an
//! instance has stayed up for `stable_uptime`.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// The restart policy's numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IntensityConfig {
    /// MaxR: restarts allowed within `window` before escalation.
    pub max_restarts: u32,
    /// MaxT: the sliding window.
    pub window: Duration,
    /// Delay before the second restart within a window; doubles after.
    pub backoff_min: Duration,
    /// Cap on the delay.
    pub backoff_max: Duration,
    /// Uptime after which an instance counts as stable: the backoff
    /// exponent starts over.
    pub stable_uptime: Duration,
}

/// What to do about a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Restart after this delay.
    Restart { delay: Duration },
    /// Too many restarts: give up.
    Escalate { restarts: u32, window: Duration },
}

/// Tracks one supervised slot's restarts.
#[derive(Debug)]
pub struct Intensity {
    config: IntensityConfig,
    restarts: VecDeque<Instant>,
    /// Restarts since the last stable period, for the backoff exponent.
    streak: u32,
}

impl Intensity {
    /// A tracker with no restarts yet.
    pub fn new(config: IntensityConfig) -> Self {
        Intensity {
            config,
            restarts: VecDeque::new(),
            streak: 0,
        }
    }

    /// Records a failure of an instance that had been up for `uptime`, at
    /// `now`, and decides.
    pub fn on_failure(&mut self, now: Instant, uptime: Duration) -> Decision {
        if uptime >= self.config.stable_uptime {
            self.streak = 0;
        }
        while self
            .restarts
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.config.window)
        {
            self.restarts.pop_front();
        }
        if self.restarts.len() as u32 >= self.config.max_restarts {
            return Decision::Escalate {
                restarts: self.restarts.len() as u32 + 1,
                window: self.config.window,
            };
        }
        self.restarts.push_back(now);
        self.streak += 1;
        // The first restart in a window is immediate; later ones draw from
        // [0, ceiling] (full jitter).
        let delay = if self.restarts.len() <= 1 {
            Duration::ZERO
        } else {
            Self::ceiling(&self.config, self.streak).mul_f64(fastrand::f64())
        };
        Decision::Restart { delay }
    }

    /// The ceiling of the delay of the n-th consecutive restart (n from 1):
    /// zero for the first, then `backoff_min` doubling, capped at `backoff_max`.
    pub fn ceiling(config: &IntensityConfig, n: u32) -> Duration {
        if n <= 1 {
            Duration::ZERO
        } else {
            config
                .backoff_min
                .saturating_mul(1 << (n - 2).min(16))
                .min(config.backoff_max)
        }
    }
}
