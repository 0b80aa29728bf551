//! Per-stage wall-clock timing of a forward pass, for profiling only: with
//! the `stage-timing` feature, [`lap`] adds the time since the previous lap
//! to a stage's total; without it (the default) every function here is an
//! empty inline one and the engine's code is unchanged.
//!
//! # Invariants
//! - Laps partition time: each lap charges the interval since the last one
//!   (or since [`reset`]) to exactly one stage, so the totals add up to the
//!   pass's time, the clock's own cost included.
//! - One thread: the totals are thread-local (a plugin instance runs one).

/// The stages of a forward pass [`lap`] can charge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Embedding lookup and its LayerNorm.
    Embeddings,
    /// Per-token activation quantization before an int8 layer.
    Quantize,
    /// The query/key/value product.
    Qkv,
    /// Attention's inputs: coding queries, keys and values and packing them.
    AttentionPack,
    /// The scores, `q k^T`.
    Scores,
    /// The softmax over the scores.
    Softmax,
    /// The context, `p v`, and its final scaling.
    Context,
    /// The attention's output product (with its residual).
    AttentionOut,
    /// Both LayerNorms of a block.
    Norm,
    /// The feed-forward's first product.
    FfnUp,
    /// GELU (only split out of `FfnUp` under this feature).
    Gelu,
    /// The feed-forward's second product (with its residual).
    FfnDown,
    /// Mean pooling and normalization.
    Pooling,
}

/// Every stage, in report order.
pub const STAGES: [Stage; 13] = [
    Stage::Embeddings,
    Stage::Quantize,
    Stage::Qkv,
    Stage::AttentionPack,
    Stage::Scores,
    Stage::Softmax,
    Stage::Context,
    Stage::AttentionOut,
    Stage::Norm,
    Stage::FfnUp,
    Stage::Gelu,
    Stage::FfnDown,
    Stage::Pooling,
];

/// Whether stages are timed (the `stage-timing` feature).
pub const ENABLED: bool = cfg!(feature = "stage-timing");

#[cfg(feature = "stage-timing")]
mod clock {
    use super::{STAGES, Stage};
    use std::cell::{Cell, RefCell};
    use std::time::Instant;

    thread_local! {
        static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
        static TOTALS: RefCell<[u64; STAGES.len()]> = const { RefCell::new([0; STAGES.len()]) };
    }

    pub fn reset() {
        LAST.with(|l| l.set(Some(Instant::now())));
    }

    pub fn lap(stage: Stage) {
        let now = Instant::now();
        let since = LAST.with(|l| l.replace(Some(now)));
        if let Some(since) = since {
            let ns = now.duration_since(since).as_nanos() as u64;
            TOTALS.with(|t| t.borrow_mut()[stage as usize] += ns);
        }
    }

    pub fn take() -> Vec<(Stage, u64)> {
        TOTALS.with(|t| {
            let totals = std::mem::take(&mut *t.borrow_mut());
            STAGES.iter().copied().zip(totals).collect()
        })
    }
}

/// Starts the clock: the next [`lap`] charges time from here.
#[inline(always)]
pub fn reset() {
    #[cfg(feature = "stage-timing")]
    clock::reset();
}

/// Charges the time since the last lap (or [`reset`]) to `stage`.
#[inline(always)]
pub fn lap(stage: Stage) {
    #[cfg(feature = "stage-timing")]
    clock::lap(stage);
    #[cfg(not(feature = "stage-timing"))]
    let _ = stage;
}

/// The nanoseconds charged to each stage since the last call (empty without
/// the feature), and the totals set back to zero.
pub fn take() -> Vec<(Stage, u64)> {
    #[cfg(feature = "stage-timing")]
    return clock::take();
    #[cfg(not(feature = "stage-timing"))]
    Vec::new()
}
