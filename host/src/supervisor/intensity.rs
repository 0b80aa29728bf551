//! Restart intensity and backoff: when to restart, how long to wait, and
//! when to give up.
//!
//! OTP's rule: more than `max_restarts` restarts within `window` escalates.
//! Beyond OTP: the first restart in a window is immediate, later ones wait
//! exponentially with full jitter, and the backoff exponent resets once an
//! instance has stayed up for `stable_uptime`.
//!
//! A second rule catches failures spaced more than the window apart (a
//! health check that fails every interval, a crash after each backoff):
//! more than `max_unproven` failures in a row with no successful call or
//! health check in between also escalate. The sliding window alone would
//! let such a slot restart forever.
//!
//! The window is for crash loops: an instance that answered calls and then
//! failed is a working backend with a sporadic fault, and its restart
//! ([`Intensity::on_failure_after_work`]) is immediate and not counted in
//! it. Otherwise a pool serving hundreds of calls a second would escalate
//! (and fail every request for a cooldown) at any steady crash rate, 2% as
//! much as 100%; the service's load test holds that at 2% no request
//! fails. A plugin that crashes on every call never answers one, so it
//! still escalates.

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
    /// Failures in a row, with no success in between, before escalation
    /// however far apart they are.
    pub max_unproven: u32,
}

/// What to do about a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Restart after this delay.
    Restart { delay: Duration },
    /// Too many restarts: give up.
    Escalate { restarts: u32, window: Duration },
    /// Too many failures in a row without a success: give up.
    Unproven { failures: u32 },
}

/// Tracks one supervised slot's restarts.
#[derive(Debug)]
pub struct Intensity {
    config: IntensityConfig,
    restarts: VecDeque<Instant>,
    /// Restarts since the last stable period, for the backoff exponent.
    streak: u32,
    /// Failures since the last success.
    unproven: u32,
}

impl Intensity {
    /// A tracker with no restarts yet.
    pub fn new(config: IntensityConfig) -> Self {
        Intensity {
            config,
            restarts: VecDeque::new(),
            streak: 0,
            unproven: 0,
        }
    }

    /// Takes back the latest failure: it turned out to be an input's doing
    /// (a poison text), not the instance's.
    pub fn forgive(&mut self) {
        self.restarts.pop_back();
        self.streak = self.streak.saturating_sub(1);
        self.unproven = self.unproven.saturating_sub(1);
    }

    /// Failures since the last success.
    pub fn unproven(&self) -> u32 {
        self.unproven
    }

    /// Records that the slot's instance served a call or answered a health
    /// check: its failures in a row start over.
    pub fn on_success(&mut self) {
        self.unproven = 0;
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
        self.unproven += 1;
        if self.unproven > self.config.max_unproven {
            return Decision::Unproven {
                failures: self.unproven,
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

    /// Records a failure of an instance that had answered calls before it
    /// failed: restart it at once, outside the window (see the module docs).
    pub fn on_failure_after_work(&mut self, _now: Instant, _uptime: Duration) -> Decision {
        self.streak = 0;
        self.unproven = 0;
        Decision::Restart {
            delay: Duration::ZERO,
        }
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
