//! Restart intensity and backoff: when to restart, how long to wait, and
//! when to give up.
//!
//! OTP's rule: more than `max_restarts` restarts within `window` escalates.
//! Beyond OTP: the first restart in a window is immediate, later ones wait
//! exponentially with equal jitter (a delay drawn from the upper half of
//! the ceiling, so every later restart waits at least half of it), and the
//! backoff exponent resets once an instance has stayed up for
//! `stable_uptime`. The jitter comes from a seeded RNG
//! ([`Intensity::with_seed`]), so a test can reproduce any schedule.
//!
//! A second rule catches failures spaced more than the window apart (a
//! health check that fails every interval, a crash after each backoff):
//! more than `max_unproven` failures in a row with no successful call or
//! health check in between also escalate. The sliding window alone would
//! let such a slot restart forever.
//!
//! A third rule sees rates, not yes/no: the slot keeps the outcomes of its
//! last `rate_window` calls (answered or crashed, across incarnations). A
//! crash during a call is *sporadic*, restarted at once and not counted in
//! the window, only while the crashes among those outcomes stay at or
//! below `max_sporadic_percent` of them (one crash is always allowed once
//! a call was answered; a slot that never answered one is counted from its
//! first crash, as OTP counts).
//! Otherwise it counts like any other failure: backoff, then escalation
//! past MaxR/MaxT. Whether the crashed incarnation had answered a call
//! does not matter: at a 2% crash rate one in fifty fresh instances
//! crashes on its first call, and a plugin that crashes on every call
//! shows a rate of 100%. So a pool serving hundreds of calls a
//! second at a steady 2% crash rate never escalates (2 crashes in 100
//! calls), while an instance that answers every other call, or one call in
//! five, is a crash loop and is stopped after a bounded number of restarts
//! with growing delays. The numbers are in `limits.rs`
//! ([`crate::limits::CRASH_RATE_WINDOW`],
//! [`crate::limits::MAX_SPORADIC_CRASH_PERCENT`]).
//!
//! A rate says nothing about a process killed from outside between calls
//! it answered at a low rate: a kill every second under a load of 100
//! calls a second is a 1% crash rate, and is treated as one.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// The restart policy's numbers.
#[derive(Clone, Copy, Debug, PartialEq)]
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
    /// Outcomes of calls (answered or crashed) the crash rate is taken
    /// over.
    pub rate_window: u32,
    /// Crashes after work, in percent of `rate_window`'s outcomes, up to
    /// which a crash is sporadic (restarted at once, not counted).
    pub max_sporadic_percent: u32,
}

impl Default for IntensityConfig {
    fn default() -> Self {
        use crate::limits;
        IntensityConfig {
            max_restarts: limits::DEFAULT_MAX_RESTARTS,
            window: limits::DEFAULT_RESTART_WINDOW,
            backoff_min: limits::DEFAULT_RESTART_BACKOFF_MIN,
            backoff_max: limits::DEFAULT_RESTART_BACKOFF_MAX,
            stable_uptime: limits::DEFAULT_STABLE_UPTIME,
            max_unproven: limits::DEFAULT_MAX_UNPROVEN_FAILURES,
            rate_window: limits::CRASH_RATE_WINDOW,
            max_sporadic_percent: limits::MAX_SPORADIC_CRASH_PERCENT,
        }
    }
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
    /// The last `rate_window` call outcomes, `true` for a crash.
    outcomes: VecDeque<bool>,
    /// Crashes among `outcomes`.
    crashes: u32,
    rng: fastrand::Rng,
}

impl Intensity {
    /// A tracker with no restarts yet, its jitter drawn from a random seed.
    pub fn new(config: IntensityConfig) -> Self {
        Self::with_seed(config, fastrand::u64(..))
    }

    /// A tracker whose jitter is drawn from `seed`: the same seed and the
    /// same failures give the same delays.
    pub fn with_seed(config: IntensityConfig, seed: u64) -> Self {
        Intensity {
            config,
            restarts: VecDeque::new(),
            streak: 0,
            unproven: 0,
            outcomes: VecDeque::new(),
            crashes: 0,
            rng: fastrand::Rng::with_seed(seed),
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

    /// Records that the slot's instance answered a health check: its
    /// failures in a row start over.
    pub fn on_success(&mut self) {
        self.unproven = 0;
    }

    /// Records that the slot's instance answered a call: its failures in a
    /// row start over, and the answer counts in the crash rate.
    pub fn on_answer(&mut self) {
        self.unproven = 0;
        self.record(false);
    }

    /// Crashes among the last outcomes, and how many outcomes that is.
    pub fn crash_rate(&self) -> (u32, u32) {
        (self.crashes, self.outcomes.len() as u32)
    }

    fn record(&mut self, crashed: bool) {
        self.outcomes.push_back(crashed);
        self.crashes += u32::from(crashed);
        while self.outcomes.len() > self.config.rate_window.max(1) as usize {
            if self.outcomes.pop_front() == Some(true) {
                self.crashes -= 1;
            }
        }
    }

    /// Whether the crash just recorded keeps the rate sporadic.
    fn sporadic(&self) -> bool {
        let outcomes = self.outcomes.len() as u64;
        let answered = outcomes > u64::from(self.crashes);
        answered
            && (self.crashes <= 1
                || u64::from(self.crashes) * 100
                    <= u64::from(self.config.max_sporadic_percent) * outcomes)
    }

    /// Records a failure of an instance that had been up for `uptime`, at
    /// `now`, and decides.
    pub fn on_failure(&mut self, now: Instant, uptime: Duration) -> Decision {
        self.record(true);
        self.counted(now, uptime)
    }

    /// Records a crash during a call: restarted at once and not counted
    /// while the crash rate is sporadic (see the module docs); counted as
    /// [`Intensity::on_failure`] counts otherwise.
    pub fn on_call_crash(&mut self, now: Instant, uptime: Duration) -> Decision {
        self.record(true);
        if self.sporadic() {
            self.streak = 0;
            self.unproven = 0;
            return Decision::Restart {
                delay: Duration::ZERO,
            };
        }
        self.counted(now, uptime)
    }

    /// A failure counted in the window, in a row and in the backoff.
    fn counted(&mut self, now: Instant, uptime: Duration) -> Decision {
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
        // [ceiling / 2, ceiling] (equal jitter: spread, yet always growing).
        let delay = if self.restarts.len() <= 1 {
            Duration::ZERO
        } else {
            let ceiling = Self::ceiling(&self.config, self.streak);
            ceiling / 2 + (ceiling / 2).mul_f64(self.rng.f64())
        };
        Decision::Restart { delay }
    }

    /// The ceiling of the delay of the n-th consecutive restart (n from 1):
    /// zero for the first, then `backoff_min` doubling, capped at `backoff_max`.
    /// The delay itself is drawn from its upper half.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64, start: Instant) -> Instant {
        start + Duration::from_millis(ms)
    }

    #[test]
    fn the_same_seed_gives_the_same_delays_and_every_later_delay_is_in_its_upper_half() {
        let config = IntensityConfig {
            max_restarts: 100,
            window: Duration::from_secs(3600),
            ..IntensityConfig::default()
        };
        let start = Instant::now();
        let run = |seed| {
            let mut i = Intensity::with_seed(config, seed);
            (0..8)
                .map(|n| match i.on_failure(at(n, start), Duration::ZERO) {
                    Decision::Restart { delay } => delay,
                    other => panic!("seed {seed}: {other:?}"),
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        for (n, delay) in run(7).into_iter().enumerate() {
            let ceiling = Intensity::ceiling(&config, n as u32 + 1);
            assert!(
                delay <= ceiling && delay >= ceiling / 2,
                "restart {}: {delay:?} of {ceiling:?}",
                n + 1
            );
        }
    }

    #[test]
    fn crashes_at_a_low_rate_are_sporadic_and_at_a_high_rate_are_counted() {
        let config = IntensityConfig::default();
        let start = Instant::now();
        // 2%: one crash in every 50 calls, for 5,000 calls, all at the same
        // instant (no window ever expires): never counted.
        let mut low = Intensity::with_seed(config, 1);
        for n in 0..5000u64 {
            if n % 50 == 49 {
                let d = low.on_call_crash(at(0, start), Duration::ZERO);
                assert_eq!(
                    d,
                    Decision::Restart {
                        delay: Duration::ZERO
                    },
                    "crash at call {n}"
                );
            } else {
                low.on_answer();
            }
        }
        assert_eq!(low.crash_rate(), (2, 100));
        // 50%: answered, crashed, answered, crashed...: the first crash is
        // free, then the window counts, with growing delays, to escalation.
        let mut high = Intensity::with_seed(config, 1);
        let mut decisions = Vec::new();
        for n in 0..20 {
            high.on_answer();
            let d = high.on_call_crash(at(n, start), Duration::ZERO);
            decisions.push(d);
            if !matches!(d, Decision::Restart { .. }) {
                break;
            }
        }
        assert!(
            matches!(decisions.last(), Some(Decision::Escalate { .. })),
            "{decisions:?}"
        );
        assert_eq!(
            decisions.len() as u32,
            1 + config.max_restarts + 1,
            "{decisions:?}"
        );
        assert!(
            matches!(decisions[3], Decision::Restart { delay } if delay >= config.backoff_min),
            "{decisions:?}"
        );
    }
}
