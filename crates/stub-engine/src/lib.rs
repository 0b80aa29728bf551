//! The stub embedder: deterministic, model-free embeddings plus faults on demand.
//!
//! This crate is the one implementation of the stub algorithm. The stub WASM
//! plugin (`plugins/stub`) wraps it in the WIT contract, and the native child
//! process serves it over the bus, so both backends compute bit-identical
//! vectors from the same input and the same configuration.
//!
//! # Algorithm
//! Feature hashing: the text is lower-cased and split into words (maximal runs
//! of alphanumeric characters). Each word is hashed with 64-bit FNV-1a; the
//! hash picks a bucket (`hash % dimension`) and a sign (bit 63). The vector is
//! the signed bucket counts, L2-normalized. Texts sharing words therefore have
//! a positive cosine, texts sharing none a cosine near zero. A text with no
//! words embeds as the pseudo-word [`EMPTY_TOKEN`], so every vector is a unit
//! vector.
//!
//! # Faults
//! Every failure path of the host must be testable without a model, so the
//! engine misbehaves on request, configured through the same string table the
//! host passes to a plugin's `init` (see [`StubConfig::from_pairs`]). A fault
//! is carried out by [`StubEngine::embed`] itself: traps are panics (a trap in
//! WASM, an abort or unwind natively), loops and memory growth are real, and a
//! slow call is a busy wait so that WASM epoch interruption can stop it (a
//! blocking sleep would sit in a host call where epochs do not reach).
//!
//! Chaos (`fault.chaos = P`) fails each call with probability `P`, picking
//! one of `fault.chaos_kinds` (trap, loop, grow) at random. The dice are
//! seeded from the platform's randomness per engine, so a restarted instance
//! does not replay its predecessor's faults; the chaos tests depend on that.
//! `fault.chaos_seed = S` seeds them instead ([`seeded_roll`]): a host that
//! gives each instance its own seed (the chaos tests mix the run's seed
//! with the slot and incarnation) can replay a run's faults.
//!
//! # Invariants
//! - Same configuration and same inputs give the same output, bit for bit, on
//!   every target: only integer hashing and `f32` arithmetic in a fixed order.
//!   (Chaos decides only whether a call fails, never what a vector is.)
//! - No dependency, so it builds for `wasm32-wasip2` and natively unchanged.

use std::fmt;
use std::time::{Duration, Instant};

/// The dimension a stub produces when the configuration names none. It
/// matches all-MiniLM-L6-v2, the real default model, so a stub index and a
/// real one have the same shape.
pub const DEFAULT_DIMENSION: usize = 384;

/// The largest dimension a stub accepts: large enough for any real model
/// (the largest common ones use 4096), small enough that a typo cannot ask
/// for gigabytes per vector.
pub const MAX_DIMENSION: usize = 65_536;

/// The word a text without words is embedded as.
pub const EMPTY_TOKEN: &str = "\u{0}empty";

/// The stub has no tokenizer; it reports the real default model's limit so a
/// stub index is chunked the way a real one would be.
pub const MAX_INPUT_TOKENS: u32 = 256;

/// The model id the stub reports.
pub const MODEL_ID: &str = "embedhost/stub-feature-hash";

/// How the stub was asked to misbehave. All fields default to "never".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// Trap on every call after this many successful calls.
    pub trap_after: Option<u64>,
    /// Trap when a text contains this marker.
    pub trap_marker: Option<String>,
    /// Loop forever when a text contains this marker.
    pub loop_marker: Option<String>,
    /// Allocate memory without bound when a text contains this marker.
    pub grow_marker: Option<String>,
    /// Busy-wait this long on every call before answering.
    pub sleep: Option<Duration>,
    /// Busy-wait this long per KiB of the call's texts (a slow model).
    pub sleep_per_kib: Option<Duration>,
    /// Return a vector one element short for a text containing this marker.
    pub wrong_dimension_marker: Option<String>,
    /// Put a NaN into the vector of a text containing this marker.
    pub nan_marker: Option<String>,
    /// Calls per million that fail at random (`fault.chaos`, given as a
    /// probability).
    pub chaos_ppm: u32,
    /// What a random failure does, picked at random among these.
    pub chaos_kinds: Vec<Chaos>,
    /// The chaos dice's seed (`fault.chaos_seed`): the same seed gives the
    /// same faults at the same calls. Without one, the dice are keyed from
    /// the platform's randomness.
    pub chaos_seed: Option<u64>,
}

/// The `n`-th roll of dice seeded with `seed` (splitmix64): the same seed
/// and `n` give the same roll on every platform, so a chaos run's faults
/// can be replayed from its seed.
pub fn seeded_roll(seed: u64, n: u64) -> u64 {
    let mut z = seed.wrapping_add(n.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A fault `fault.chaos` can pick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chaos {
    /// Panic: a trap in WASM.
    Trap,
    /// Spin forever: a call past its deadline.
    Loop,
    /// Allocate without bound: the memory cap.
    Grow,
}

impl Chaos {
    /// Every kind, the default of `fault.chaos_kinds`.
    pub const ALL: [Chaos; 3] = [Chaos::Trap, Chaos::Loop, Chaos::Grow];

    fn parse(name: &str) -> Option<Chaos> {
        match name.trim() {
            "trap" => Some(Chaos::Trap),
            "loop" => Some(Chaos::Loop),
            "grow" => Some(Chaos::Grow),
            _ => None,
        }
    }
}

/// A value that is not a probability from 0 to 1 (the value).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotAChance(pub String);

impl std::fmt::Display for NotAChance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}` is not a probability from 0 to 1", self.0)
    }
}

impl std::error::Error for NotAChance {}

/// Parses a probability (`"0.05"`) into calls per million.
///
/// # Errors
/// [`NotAChance`] if `value` is not a number from 0 to 1.
pub fn parse_chance(value: &str) -> Result<u32, NotAChance> {
    match value.trim().parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok((p * 1e6).round() as u32),
        _ => Err(NotAChance(value.to_string())),
    }
}

/// The stub's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StubConfig {
    /// Length of every vector.
    pub dimension: usize,
    /// Faults to inject.
    pub faults: Faults,
}

impl Default for StubConfig {
    fn default() -> Self {
        StubConfig {
            dimension: DEFAULT_DIMENSION,
            faults: Faults::default(),
        }
    }
}

/// A configuration key the stub cannot accept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The offending key.
    pub key: String,
    /// Why it was refused.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stub config key `{}`: {}", self.key, self.reason)
    }
}

impl std::error::Error for ConfigError {}

/// The configuration keys the stub understands, for error messages.
pub const CONFIG_KEYS: &[&str] = &[
    "dimension",
    "fault.trap_after",
    "fault.trap_marker",
    "fault.loop_marker",
    "fault.grow_marker",
    "fault.sleep_ms",
    "fault.sleep_ms_per_kib",
    "fault.wrong_dimension_marker",
    "fault.nan_marker",
    "fault.chaos",
    "fault.chaos_kinds",
    "fault.chaos_seed",
];

impl StubConfig {
    /// Parses the string table a host passes to `init`.
    ///
    /// # Errors
    /// An unknown key, or a value that does not parse, is refused with a
    /// [`ConfigError`] naming the key.
    pub fn from_pairs<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, ConfigError> {
        let mut config = StubConfig::default();
        for (key, value) in pairs {
            let err = |reason: String| ConfigError {
                key: key.to_string(),
                reason,
            };
            let number = |v: &str| -> Result<u64, ConfigError> {
                v.trim()
                    .parse::<u64>()
                    .map_err(|e| err(format!("`{v}` is not a whole number: {e}")))
            };
            let marker = |v: &str| -> Result<Option<String>, ConfigError> {
                if v.is_empty() {
                    Err(err("an empty marker would match every text".to_string()))
                } else {
                    Ok(Some(v.to_string()))
                }
            };
            match key {
                "dimension" => {
                    let d = number(value)? as usize;
                    if d == 0 || d > MAX_DIMENSION {
                        return Err(err(format!(
                            "must be between 1 and {MAX_DIMENSION}, got {d}"
                        )));
                    }
                    config.dimension = d;
                }
                "fault.trap_after" => config.faults.trap_after = Some(number(value)?),
                "fault.trap_marker" => config.faults.trap_marker = marker(value)?,
                "fault.loop_marker" => config.faults.loop_marker = marker(value)?,
                "fault.grow_marker" => config.faults.grow_marker = marker(value)?,
                "fault.sleep_ms" => {
                    config.faults.sleep = Some(Duration::from_millis(number(value)?))
                }
                "fault.sleep_ms_per_kib" => {
                    config.faults.sleep_per_kib = Some(Duration::from_millis(number(value)?))
                }
                "fault.wrong_dimension_marker" => {
                    config.faults.wrong_dimension_marker = marker(value)?
                }
                "fault.nan_marker" => config.faults.nan_marker = marker(value)?,
                "fault.chaos" => {
                    config.faults.chaos_ppm = parse_chance(value).map_err(|e| err(e.to_string()))?
                }
                "fault.chaos_seed" => config.faults.chaos_seed = Some(number(value)?),
                "fault.chaos_kinds" => {
                    config.faults.chaos_kinds = value
                        .split(',')
                        .map(|k| {
                            Chaos::parse(k)
                                .ok_or_else(|| err(format!("`{k}` is not one of trap, loop, grow")))
                        })
                        .collect::<Result<_, _>>()?;
                }
                _ => {
                    return Err(err(format!(
                        "unknown key; the stub understands {}",
                        CONFIG_KEYS.join(", ")
                    )));
                }
            }
        }
        if config.faults.chaos_kinds.is_empty() {
            config.faults.chaos_kinds = Chaos::ALL.to_vec();
        }
        Ok(config)
    }
}

/// The stub embedder. One per plugin instance or child process.
#[derive(Debug)]
pub struct StubEngine {
    config: StubConfig,
    calls: u64,
    processed: u64,
    /// The chaos dice: randomly keyed per engine.
    dice: std::collections::hash_map::RandomState,
}

impl StubEngine {
    /// Creates an engine with this configuration.
    pub fn new(config: StubConfig) -> Self {
        StubEngine {
            config,
            calls: 0,
            processed: 0,
            dice: std::collections::hash_map::RandomState::new(),
        }
    }

    /// The random fault this call suffers, if any.
    fn chaos(&self) -> Option<Chaos> {
        use std::hash::BuildHasher;
        let faults = &self.config.faults;
        if faults.chaos_ppm == 0 || faults.chaos_kinds.is_empty() {
            return None;
        }
        let roll = match faults.chaos_seed {
            Some(seed) => seeded_roll(seed, self.calls),
            None => self.dice.hash_one(self.calls),
        };
        ((roll % 1_000_000) < u64::from(faults.chaos_ppm))
            .then(|| faults.chaos_kinds[((roll >> 32) % faults.chaos_kinds.len() as u64) as usize])
    }

    /// The configured dimension.
    pub fn dimension(&self) -> usize {
        self.config.dimension
    }

    /// Texts embedded since start.
    pub fn processed(&self) -> u64 {
        self.processed
    }

    /// Embeds `texts` into one flat row-major buffer of
    /// `texts.len() * dimension` floats, carrying out any configured fault.
    ///
    /// A `wrong_dimension_marker` fault makes the buffer one float short per
    /// matching text, as a buggy plugin would; the host must catch it.
    pub fn embed<S: AsRef<str>>(&mut self, texts: &[S]) -> Vec<f32> {
        self.calls += 1;
        let faults = &self.config.faults;
        if let Some(n) = faults.trap_after
            && self.calls > n
        {
            panic!(
                "stub fault: trap after {n} calls (this is call {})",
                self.calls
            );
        }
        match self.chaos() {
            Some(Chaos::Trap) => panic!("stub fault: chaos trap (call {})", self.calls),
            Some(Chaos::Loop) => spin_forever(),
            Some(Chaos::Grow) => grow_forever(),
            None => {}
        }
        if let Some(sleep) = faults.sleep {
            busy_wait(sleep);
        }
        if let Some(per_kib) = faults.sleep_per_kib {
            // A model's cost grows with its input: emulate a slow one.
            let bytes: usize = texts.iter().map(|t| t.as_ref().len()).sum();
            busy_wait(per_kib.mul_f64(bytes as f64 / 1024.0));
        }
        let dimension = self.config.dimension;
        let mut out = Vec::with_capacity(texts.len() * dimension);
        for text in texts {
            let text = text.as_ref();
            if contains(text, &faults.trap_marker) {
                panic!("stub fault: trap on marker");
            }
            if contains(text, &faults.loop_marker) {
                spin_forever();
            }
            if contains(text, &faults.grow_marker) {
                grow_forever();
            }
            let start = out.len();
            out.resize(start + dimension, 0.0);
            embed_into(text, &mut out[start..]);
            if contains(text, &faults.nan_marker) {
                out[start] = f32::NAN;
            }
            if contains(text, &faults.wrong_dimension_marker) {
                out.pop();
            }
        }
        self.processed += texts.len() as u64;
        out
    }
}

fn contains(text: &str, marker: &Option<String>) -> bool {
    marker.as_deref().is_some_and(|m| text.contains(m))
}

/// 64-bit FNV-1a: tiny, dependency-free and identical on every target.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Embeds one text into `out` (whose length is the dimension) without faults.
pub fn embed_into(text: &str, out: &mut [f32]) {
    debug_assert!(!out.is_empty());
    out.fill(0.0);
    let lower = text.to_lowercase();
    let mut any = false;
    for word in lower
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        add_word(word, out);
        any = true;
    }
    if !any {
        add_word(EMPTY_TOKEN, out);
    }
    let norm = out.iter().map(|x| x * x).sum::<f32>().sqrt();
    // `norm` is at least 1: at least one word landed in some bucket with
    // weight ±1, and collisions of opposite signs cannot cancel every bucket
    // unless two words collide exactly, in which case fall back to bucket 0.
    if norm > 0.0 {
        out.iter_mut().for_each(|x| *x /= norm);
    } else {
        out[0] = 1.0;
    }
}

fn add_word(word: &str, out: &mut [f32]) {
    let hash = fnv1a(word.as_bytes());
    let bucket = (hash % out.len() as u64) as usize;
    let sign = if hash >> 63 == 0 { 1.0 } else { -1.0 };
    out[bucket] += sign;
}

/// Waits without blocking in a host call, so an epoch deadline can interrupt it.
fn busy_wait(duration: Duration) {
    let start = Instant::now();
    while start.elapsed() < duration {
        std::hint::spin_loop();
    }
}

fn spin_forever() -> ! {
    let mut x: u64 = 0;
    loop {
        x = std::hint::black_box(x.wrapping_add(1));
    }
}

fn grow_forever() -> ! {
    /// Allocation step: large enough to hit any cap quickly, touched so that
    /// a native process's resident set really grows.
    const STEP: usize = 1 << 20;
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        hoard.push(vec![1u8; STEP]);
        std::hint::black_box(&hoard);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cosine(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn vectors_are_unit_length_and_deterministic() {
        let mut e = StubEngine::new(StubConfig::default());
        let a = e.embed(&["Hello world", "", "   "]);
        let b = e.embed(&["Hello world", "", "   "]);
        assert_eq!(a, b);
        for row in a.chunks(DEFAULT_DIMENSION) {
            let norm: f32 = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-6, "norm {norm}");
        }
        assert_eq!(e.processed(), 6);
    }

    #[test]
    fn shared_words_score_higher_than_unrelated_text() {
        let mut e = StubEngine::new(StubConfig::default());
        let v = e.embed(&[
            "the cat sat on the mat",
            "a cat on a mat",
            "quantum chromodynamics",
        ]);
        let (a, b, c) = (&v[..384], &v[384..768], &v[768..]);
        assert!(cosine(a, b) > 0.3, "{}", cosine(a, b));
        assert!(cosine(a, b) > cosine(a, c) + 0.3);
    }

    #[test]
    fn case_and_punctuation_do_not_matter() {
        let mut e = StubEngine::new(StubConfig::default());
        let v = e.embed(&["Hello, World!", "hello world"]);
        assert_eq!(v[..384], v[384..]);
    }

    #[test]
    fn config_parses_faults_and_rejects_unknown_keys() {
        let c = StubConfig::from_pairs([
            ("dimension", "8"),
            ("fault.sleep_ms", "5"),
            ("fault.nan_marker", "X"),
        ])
        .unwrap();
        assert_eq!(c.dimension, 8);
        assert_eq!(c.faults.sleep, Some(Duration::from_millis(5)));
        let e = StubConfig::from_pairs([("dimenson", "8")]).unwrap_err();
        assert_eq!(e.key, "dimenson");
        assert!(e.to_string().contains("unknown key"));
        assert!(StubConfig::from_pairs([("dimension", "0")]).is_err());
        assert!(StubConfig::from_pairs([("fault.trap_marker", "")]).is_err());
        assert!(
            StubConfig::from_pairs([("fault.trap_after", "x")])
                .unwrap_err()
                .to_string()
                .contains("`x`")
        );
    }

    #[test]
    fn output_faults_corrupt_only_the_marked_text() {
        let config = StubConfig::from_pairs([
            ("dimension", "4"),
            ("fault.nan_marker", "NAN"),
            ("fault.wrong_dimension_marker", "SHORT"),
        ])
        .unwrap();
        let mut e = StubEngine::new(config);
        let v = e.embed(&["fine", "NAN here"]);
        assert_eq!(v.len(), 8);
        assert!(v[..4].iter().all(|x| x.is_finite()));
        assert!(v[4].is_nan());
        assert_eq!(e.embed(&["SHORT"]).len(), 3);
    }

    #[test]
    #[should_panic(expected = "trap after 1 calls")]
    fn trap_after_n_calls() {
        let mut e = StubEngine::new(StubConfig::from_pairs([("fault.trap_after", "1")]).unwrap());
        let first = e.embed(&["ok"]);
        assert_eq!(first.len(), DEFAULT_DIMENSION);
        e.embed(&["boom"]);
    }

    #[test]
    fn chaos_fails_about_its_share_of_calls_and_never_changes_a_vector() {
        let config = StubConfig::from_pairs([
            ("dimension", "8"),
            ("fault.chaos", "0.25"),
            ("fault.chaos_kinds", "trap"),
        ])
        .unwrap();
        let clean = StubEngine::new(StubConfig::from_pairs([("dimension", "8")]).unwrap())
            .embed(&["same text"]);
        let mut e = StubEngine::new(config);
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let mut failed = 0;
        for _ in 0..2000 {
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| e.embed(&["same text"])))
            {
                Ok(v) => assert_eq!(v, clean),
                Err(_) => failed += 1,
            }
        }
        std::panic::set_hook(hook);
        assert!(
            (400..600).contains(&failed),
            "{failed} of 2000 calls failed at p = 0.25"
        );
    }

    #[test]
    fn chaos_settings_are_checked() {
        let c = StubConfig::from_pairs([("fault.chaos", "0.05")]).unwrap();
        assert_eq!(
            (c.faults.chaos_ppm, c.faults.chaos_kinds.len()),
            (50_000, 3)
        );
        let e = StubConfig::from_pairs([("fault.chaos", "1.5")]).unwrap_err();
        assert_eq!(e.key, "fault.chaos");
        let e = StubConfig::from_pairs([("fault.chaos_kinds", "trap,explode")]).unwrap_err();
        assert!(e.reason.contains("`explode`"), "{e}");
        let mut quiet = StubEngine::new(StubConfig::from_pairs([("fault.chaos", "0")]).unwrap());
        for _ in 0..100 {
            quiet.embed(&["never fails"]);
        }
    }
}
