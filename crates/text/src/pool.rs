//! Pooling: how a text's token states become its one vector, in every mode
//! of sentence-transformers' `Pooling` module that embedhost runs, and the
//! optional L2 normalization of its `Normalize` module.
//!
//! # Invariants
//! - Only a text's real tokens are pooled: padding never contributes, in any
//!   mode (a batch's rows are its texts' tokens first, then padding with
//!   attention mask 0).
//! - Each mode computes what sentence-transformers computes, in f32:
//!   - `mean`: the average of the states;
//!   - `cls`: the first token's state;
//!   - `max`: the largest value of each dimension;
//!   - `lasttoken`: the last real token's state;
//!   - `weightedmean`: the average weighted by position (1, 2, …, n).
//! - A text has at least one token (every encoding carries the model's
//!   special tokens); an empty one pools to zeros, never NaN.
//! - Normalization happens only when asked: a model without a `Normalize`
//!   module gives vectors of whatever length its pooling gives.

use crate::{Batch, TextError, l2_normalize};

/// A mode of sentence-transformers' `Pooling` module.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Pooling {
    /// `pooling_mode_mean_tokens`.
    #[default]
    Mean,
    /// `pooling_mode_cls_token`.
    Cls,
    /// `pooling_mode_max_tokens`.
    Max,
    /// `pooling_mode_lasttoken`.
    LastToken,
    /// `pooling_mode_weightedmean_tokens`.
    WeightedMean,
}

impl Pooling {
    /// Every mode, in the order their names are listed.
    pub const ALL: [Pooling; 5] = [
        Pooling::Mean,
        Pooling::Cls,
        Pooling::Max,
        Pooling::LastToken,
        Pooling::WeightedMean,
    ];

    /// The mode's name in configs: `mean`, `cls`, `max`, `lasttoken`,
    /// `weightedmean` (sentence-transformers' `pooling_mode` names).
    pub fn name(self) -> &'static str {
        match self {
            Pooling::Mean => "mean",
            Pooling::Cls => "cls",
            Pooling::Max => "max",
            Pooling::LastToken => "lasttoken",
            Pooling::WeightedMean => "weightedmean",
        }
    }

    /// The mode named `name` (see [`Pooling::name`]), if any.
    pub fn from_name(name: &str) -> Option<Pooling> {
        Pooling::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The names of every mode, for a message listing them.
    pub fn names() -> String {
        Pooling::ALL.map(Pooling::name).join(", ")
    }

    /// Pools one text's token `states` (`n x dimension`, row-major, its real
    /// tokens only) into `out` (`dimension` values, overwritten).
    pub fn pool_text(self, states: &[f32], dimension: usize, out: &mut [f32]) {
        let rows = states.chunks_exact(dimension.max(1));
        let n = rows.len();
        out.fill(0.0);
        if n == 0 {
            return;
        }
        match self {
            Pooling::Cls => out.copy_from_slice(&states[..dimension]),
            Pooling::LastToken => out.copy_from_slice(&states[(n - 1) * dimension..][..dimension]),
            Pooling::Max => {
                out.fill(f32::NEG_INFINITY);
                for row in rows {
                    for (acc, &x) in out.iter_mut().zip(row) {
                        *acc = acc.max(x);
                    }
                }
            }
            Pooling::Mean | Pooling::WeightedMean => {
                let weighted = self == Pooling::WeightedMean;
                let mut total = 0f32;
                for (i, row) in rows.enumerate() {
                    let w = if weighted { (i + 1) as f32 } else { 1.0 };
                    total += w;
                    for (acc, &x) in out.iter_mut().zip(row) {
                        *acc += w * x;
                    }
                }
                out.iter_mut().for_each(|x| *x /= total);
            }
        }
    }
}

/// Pools `hidden` (`[batch, tokens, dimension]`, row-major) over the batch's
/// attention mask with `pooling`, then L2-normalizes each row if
/// `normalize`: one flat `batch x dimension` matrix.
///
/// # Errors
/// [`TextError::Shape`] if `hidden` does not hold `batch x tokens x
/// dimension` values.
pub fn pool(
    batch: &Batch,
    hidden: &[f32],
    dimension: usize,
    pooling: Pooling,
    normalize: bool,
) -> Result<Vec<f32>, TextError> {
    let expected = batch.batch * batch.tokens * dimension;
    if hidden.len() != expected {
        return Err(TextError::Shape {
            got: hidden.len(),
            expected,
            batch: batch.batch,
            tokens: batch.tokens,
            dimension,
        });
    }
    let mut out = vec![0f32; batch.batch * dimension];
    let mut real = Vec::new();
    for (b, row) in out.chunks_exact_mut(dimension.max(1)).enumerate() {
        real.clear();
        for t in 0..batch.tokens {
            if batch.attention_mask[b * batch.tokens + t] != 0 {
                real.extend_from_slice(&hidden[(b * batch.tokens + t) * dimension..][..dimension]);
            }
        }
        pooling.pool_text(&real, dimension, row);
        if normalize {
            l2_normalize(row);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two texts of dimension 2: the first of 3 real tokens, the second of
    /// 1 real token and 2 of padding whose states are huge (they must never
    /// show).
    fn batch() -> (Batch, Vec<f32>) {
        let batch = Batch {
            batch: 2,
            tokens: 3,
            input_ids: vec![1, 2, 3, 1, 0, 0],
            attention_mask: vec![1, 1, 1, 1, 0, 0],
            token_type_ids: vec![0; 6],
        };
        #[rustfmt::skip]
        let hidden = vec![
            1.0, -2.0,   3.0, 4.0,   -5.0, 6.0,
            7.0, 8.0,    1e6, 1e6,   -1e6, -1e6,
        ];
        (batch, hidden)
    }

    #[test]
    fn every_mode_pools_what_sentence_transformers_computes_and_padding_never_shows() {
        let (batch, hidden) = batch();
        let expected: [(Pooling, [f32; 4]); 5] = [
            (Pooling::Mean, [-1.0 / 3.0, 8.0 / 3.0, 7.0, 8.0]),
            (Pooling::Cls, [1.0, -2.0, 7.0, 8.0]),
            (Pooling::Max, [3.0, 6.0, 7.0, 8.0]),
            (Pooling::LastToken, [-5.0, 6.0, 7.0, 8.0]),
            // (1*1 + 2*3 + 3*-5) / 6, (1*-2 + 2*4 + 3*6) / 6.
            (Pooling::WeightedMean, [-8.0 / 6.0, 24.0 / 6.0, 7.0, 8.0]),
        ];
        for (pooling, want) in expected {
            let got = pool(&batch, &hidden, 2, pooling, false).unwrap();
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 1e-6, "{pooling:?}: {got:?} != {want:?}");
            }
        }
    }

    #[test]
    fn normalization_happens_only_when_asked() {
        let (batch, hidden) = batch();
        let raw = pool(&batch, &hidden, 2, Pooling::Cls, false).unwrap();
        assert_eq!(raw, [1.0, -2.0, 7.0, 8.0]);
        let unit = pool(&batch, &hidden, 2, Pooling::Cls, true).unwrap();
        for row in unit.chunks(2) {
            let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-6, "{unit:?}");
        }
    }

    #[test]
    fn names_round_trip_and_an_empty_text_pools_to_zeros() {
        for p in Pooling::ALL {
            assert_eq!(Pooling::from_name(p.name()), Some(p));
        }
        assert_eq!(Pooling::from_name("mean_sqrt_len"), None);
        assert_eq!(Pooling::names(), "mean, cls, max, lasttoken, weightedmean");
        for p in Pooling::ALL {
            let mut out = [9.0; 3];
            p.pool_text(&[], 3, &mut out);
            assert_eq!(out, [0.0; 3], "{p:?}");
        }
    }

    #[test]
    fn a_hidden_state_of_the_wrong_shape_is_an_error() {
        let (batch, hidden) = batch();
        assert!(matches!(
            pool(&batch, &hidden[1..], 2, Pooling::Max, true),
            Err(TextError::Shape { .. })
        ));
        let err = pool(&batch, &[0.0; 5], 2, Pooling::Mean, true).unwrap_err();
        assert!(err.to_string().contains("expected 12"), "{err}");
    }
}
