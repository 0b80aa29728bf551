//! The in-memory search index: every chunk's vector in one contiguous
//! matrix, searched exactly by cosine (dot product of unit vectors).
//!
//! # Invariants
//! - It mirrors the store: loaded from it at start, then changed only after
//!   a store commit succeeded, with the ids the commit returned.
//! - Rows are contiguous (`ids[i]`'s vector is `data[i*d..(i+1)*d]`);
//!   removing a row moves the last one into its place, so removal is O(d).
//! - Search is exact: every row is scored. Scores of unit vectors are their
//!   cosine; the embedders normalize (the contract's `normalized`).

use std::collections::HashMap;

/// Chunks' vectors, searchable.
#[derive(Clone, Debug, Default)]
pub struct VectorIndex {
    dimension: usize,
    ids: Vec<i64>,
    data: Vec<f32>,
    rows: HashMap<i64, usize>,
}

impl VectorIndex {
    /// An index of `ids` with their vectors `data` (row after row).
    ///
    /// # Panics
    /// If `data` does not hold `ids.len()` rows of `dimension` (a caller bug:
    /// the store checks every vector's length).
    pub fn new(dimension: usize, ids: Vec<i64>, data: Vec<f32>) -> Self {
        assert_eq!(ids.len() * dimension, data.len(), "rows of {dimension}");
        let rows = ids.iter().enumerate().map(|(row, &id)| (id, row)).collect();
        VectorIndex {
            dimension,
            ids,
            data,
            rows,
        }
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Adds the vector of chunk `id`.
    pub fn insert(&mut self, id: i64, vector: &[f32]) {
        debug_assert_eq!(vector.len(), self.dimension);
        if let Some(&row) = self.rows.get(&id) {
            self.data[row * self.dimension..][..self.dimension].copy_from_slice(vector);
            return;
        }
        self.rows.insert(id, self.ids.len());
        self.ids.push(id);
        self.data.extend_from_slice(vector);
    }

    /// Removes chunk `id`'s vector, if present.
    pub fn remove(&mut self, id: i64) {
        let Some(row) = self.rows.remove(&id) else {
            return;
        };
        let last = self.ids.len() - 1;
        if row != last {
            let moved = self.ids[last];
            self.ids[row] = moved;
            self.rows.insert(moved, row);
            let d = self.dimension;
            self.data.copy_within(last * d..(last + 1) * d, row * d);
        }
        self.ids.pop();
        self.data.truncate(last * self.dimension);
    }

    /// The `limit` chunks most similar to `query`, best first, with their
    /// scores.
    pub fn search(&self, query: &[f32], limit: usize) -> Vec<(i64, f32)> {
        if limit == 0 || self.is_empty() || query.len() != self.dimension {
            return Vec::new();
        }
        let mut scored: Vec<(f32, usize)> = self
            .data
            .chunks_exact(self.dimension)
            .map(|row| dot(row, query))
            .enumerate()
            .map(|(i, s)| (s, i))
            .collect();
        let limit = limit.min(scored.len());
        let by_score = |a: &(f32, usize), b: &(f32, usize)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if limit < scored.len() {
            scored.select_nth_unstable_by(limit - 1, by_score);
            scored.truncate(limit);
        }
        scored.sort_unstable_by(by_score);
        scored
            .into_iter()
            .map(|(score, row)| (self.ids[row], score))
            .collect()
    }
}

/// Dot product in eight independent lanes, which the compiler turns into
/// SIMD (a single running sum would serialize on each addition).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 8;
    let mut acc = [0f32; LANES];
    let (a8, b8) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a8.zip(b8) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    #[test]
    fn search_ranks_by_cosine_and_follows_removals() {
        let mut index = VectorIndex::new(3, vec![], vec![]);
        index.insert(10, &unit(&[1.0, 0.0, 0.0]));
        index.insert(11, &unit(&[0.0, 1.0, 0.0]));
        index.insert(12, &unit(&[1.0, 1.0, 0.0]));
        let q = unit(&[1.0, 0.2, 0.0]);
        let hits: Vec<i64> = index.search(&q, 2).iter().map(|h| h.0).collect();
        assert_eq!(hits, [10, 12]);
        index.remove(10);
        let hits: Vec<i64> = index.search(&q, 5).iter().map(|h| h.0).collect();
        assert_eq!(hits, [12, 11]);
        assert_eq!(index.len(), 2);
        index.remove(99);
        assert_eq!(index.len(), 2);
    }

    #[test]
    fn dot_matches_the_plain_sum_for_any_length() {
        for n in [1, 7, 8, 9, 384] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let plain: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - plain).abs() < 1e-4, "{n}");
        }
    }
}
