//! The in-memory search index: every chunk's vector in one contiguous
//! matrix, searched by cosine (dot product of unit vectors).
//!
//! # Exact, then quantized
//! Scanning every f32 vector is bound by memory bandwidth: 100,000 chunks of
//! 384 dimensions are 154 MB per query, 15 ms on the CI machine (`cargo
//! bench --bench index`). So each row is also kept as int8 with its own
//! scale (a quarter of the bytes). From [`QUANTIZED_FROM`] rows on, a search
//! scans the int8 rows on every core, keeps the best [`RERANK_PER_RESULT`]
//! candidates per result asked for, and re-scores those with their f32
//! vectors: the scores returned are exact, and the ranking misses a true
//! top-10 hit only when quantization error moves it below hundreds of
//! others (recall@10 against the exact scan is measured by the bench and
//! tested below). Unlike a graph index (HNSW), this needs no build time and
//! handles removal (a file re-indexed or deleted) exactly.
//!
//! # Invariants
//! - It mirrors the store: loaded from it at start, then changed only after
//!   a store commit succeeded, with the ids the commit returned.
//! - Rows are contiguous (`ids[i]`'s vector is `data[i*d..(i+1)*d]`);
//!   removing a row moves the last one into its place, so removal is O(d).
//! - Search is exact: every row is scored. Every row and every query is
//!   scaled to unit length on the way in, so a score is a cosine whether or
//!   not the model normalizes (a model without sentence-transformers'
//!   `Normalize` module, or a plugin whose `normalized` is wrong).

use std::collections::HashMap;

/// Rows from which a search scans the int8 copies: below it the exact
/// scan takes under 2 ms (10,000 rows of 384 dimensions on the CI machine,
/// `cargo bench --bench index`), and exact is simplest.
pub const QUANTIZED_FROM: usize = 10_000;

/// Candidates re-scored exactly per result asked for (at least
/// [`RERANK_MIN`]): enough that int8 error almost never pushes a true hit
/// out of the candidates.
pub const RERANK_PER_RESULT: usize = 10;

/// Fewest candidates re-scored.
pub const RERANK_MIN: usize = 100;

/// Rows per thread below which a scan stays on one thread (spawning costs
/// more than it saves).
const ROWS_PER_THREAD: usize = 10_000;

/// Chunks' vectors, searchable.
#[derive(Clone, Debug, Default)]
pub struct VectorIndex {
    dimension: usize,
    ids: Vec<i64>,
    data: Vec<f32>,
    /// `data` as int8, row by row, and each row's scale.
    quantized: Vec<i8>,
    scales: Vec<f32>,
    rows: HashMap<i64, usize>,
}

/// `v` as int8 with the scale that maps its largest magnitude to 127.
fn quantize(v: &[f32], out: &mut Vec<i8>) -> f32 {
    let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
    out.extend(
        v.iter()
            .map(|x| (x / scale).round().clamp(-127.0, 127.0) as i8),
    );
    scale
}

/// `v` scaled to unit length (zero stays zero).
fn unit(v: &[f32]) -> Vec<f32> {
    let mut v = v.to_vec();
    embedhost_text::l2_normalize(&mut v);
    v
}

impl VectorIndex {
    /// An index of `ids` with their vectors `data` (row after row).
    ///
    /// # Panics
    /// If `data` does not hold `ids.len()` rows of `dimension` (a caller bug:
    /// the store checks every vector's length).
    pub fn new(dimension: usize, ids: Vec<i64>, mut data: Vec<f32>) -> Self {
        assert_eq!(ids.len() * dimension, data.len(), "rows of {dimension}");
        data.chunks_exact_mut(dimension.max(1))
            .for_each(embedhost_text::l2_normalize);
        let rows = ids.iter().enumerate().map(|(row, &id)| (id, row)).collect();
        let mut quantized = Vec::with_capacity(data.len());
        let scales = data
            .chunks_exact(dimension.max(1))
            .map(|row| quantize(row, &mut quantized))
            .collect();
        VectorIndex {
            dimension,
            ids,
            data,
            quantized,
            scales,
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
        if self.rows.contains_key(&id) {
            self.remove(id);
        }
        self.rows.insert(id, self.ids.len());
        self.ids.push(id);
        let vector = unit(vector);
        self.data.extend_from_slice(&vector);
        let scale = quantize(&vector, &mut self.quantized);
        self.scales.push(scale);
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
            self.quantized
                .copy_within(last * d..(last + 1) * d, row * d);
            self.scales[row] = self.scales[last];
        }
        self.ids.pop();
        self.scales.pop();
        self.data.truncate(last * self.dimension);
        self.quantized.truncate(last * self.dimension);
    }

    /// The exact score (cosine) of chunk `id` against `query`, if the
    /// index holds it.
    pub fn score(&self, id: i64, query: &[f32]) -> Option<f32> {
        let row = *self.rows.get(&id)?;
        let d = self.dimension;
        (query.len() == d).then(|| dot(&self.data[row * d..(row + 1) * d], &unit(query)))
    }

    /// The `limit` chunks most similar to `query`, best first, with their
    /// scores (exact cosine): an exact scan below [`QUANTIZED_FROM`] rows,
    /// the int8 scan with exact re-scoring from there.
    pub fn search(&self, query: &[f32], limit: usize) -> Vec<(i64, f32)> {
        let query = unit(query);
        if self.len() >= QUANTIZED_FROM {
            self.search_quantized(&query, limit)
        } else {
            self.search_exact(&query, limit)
        }
    }

    /// The exact scan: every f32 row scored against `query`, which must be
    /// of unit length (as [`VectorIndex::search`] makes it).
    pub fn search_exact(&self, query: &[f32], limit: usize) -> Vec<(i64, f32)> {
        if limit == 0 || self.is_empty() || query.len() != self.dimension {
            return Vec::new();
        }
        let scored: Vec<(f32, usize)> = self
            .data
            .chunks_exact(self.dimension)
            .map(|row| dot(row, query))
            .enumerate()
            .map(|(i, s)| (s, i))
            .collect();
        self.best(scored, limit)
    }

    /// The int8 scan on every core, then the best candidates re-scored
    /// with their f32 vectors; `query` of unit length, as for
    /// [`VectorIndex::search_exact`].
    pub fn search_quantized(&self, query: &[f32], limit: usize) -> Vec<(i64, f32)> {
        if limit == 0 || self.is_empty() || query.len() != self.dimension {
            return Vec::new();
        }
        let d = self.dimension;
        let mut q = Vec::with_capacity(d);
        let q_scale = quantize(query, &mut q);
        let candidates = (limit * RERANK_PER_RESULT).max(RERANK_MIN);
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(self.len().div_ceil(ROWS_PER_THREAD))
            .max(1);
        let per_thread = self.len().div_ceil(threads);
        let dot_i8 = dot_i8_for_cpu();
        let scan = |first: usize| {
            let last = (first + per_thread).min(self.len());
            let scored: Vec<(f32, usize)> = (first..last)
                .map(|row| {
                    let r = &self.quantized[row * d..][..d];
                    (dot_i8(r, &q) as f32 * self.scales[row] * q_scale, row)
                })
                .collect();
            best_rows(scored, candidates)
        };
        let mut pool: Vec<(f32, usize)> = if threads == 1 {
            scan(0)
        } else {
            std::thread::scope(|s| {
                let scan = &scan;
                let handles: Vec<_> = (0..threads)
                    .map(|t| s.spawn(move || scan(t * per_thread)))
                    .collect();
                handles
                    .into_iter()
                    .flat_map(|h| h.join().unwrap_or_default())
                    .collect()
            })
        };
        // Exact scores for the candidates.
        for (score, row) in &mut pool {
            *score = dot(&self.data[*row * d..][..d], query);
        }
        self.best(pool, limit)
    }

    fn best(&self, scored: Vec<(f32, usize)>, limit: usize) -> Vec<(i64, f32)> {
        best_rows(scored, limit)
            .into_iter()
            .map(|(score, row)| (self.ids[row], score))
            .collect()
    }
}

/// The `limit` best of `scored`, best first (ties by row, so the order is
/// deterministic).
fn best_rows(mut scored: Vec<(f32, usize)>, limit: usize) -> Vec<(f32, usize)> {
    let by_score = |a: &(f32, usize), b: &(f32, usize)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    let limit = limit.min(scored.len());
    if limit == 0 {
        return Vec::new();
    }
    if limit < scored.len() {
        scored.select_nth_unstable_by(limit - 1, by_score);
        scored.truncate(limit);
    }
    scored.sort_unstable_by(by_score);
    scored
}

/// The int8 dot product for this CPU: compiled for AVX2 where the CPU has
/// it (checked once per search), which doubles the lanes of the portable
/// build's SSE2 code.
fn dot_i8_for_cpu() -> fn(&[i8], &[i8]) -> i32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        return |a, b| {
            // SAFETY: the CPU has AVX2 (detected above), all the function
            // requires.
            unsafe { dot_i8_avx2(a, b) }
        };
    }
    dot_i8
}

/// [`dot_i8`] compiled with AVX2.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_i8_avx2(a: &[i8], b: &[i8]) -> i32 {
    dot_i8(a, b)
}

/// Dot product of int8 rows in sixteen i32 lanes (vectorized by the
/// compiler; 384 products of at most 127 * 127 cannot overflow).
#[inline(always)]
fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    const LANES: usize = 16;
    let mut acc = [0i32; LANES];
    let (a16, b16) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: i32 = a16
        .remainder()
        .iter()
        .zip(b16.remainder())
        .map(|(&x, &y)| i32::from(x) * i32::from(y))
        .sum();
    for (x, y) in a16.zip(b16) {
        for i in 0..LANES {
            acc[i] += i32::from(x[i]) * i32::from(y[i]);
        }
    }
    acc.iter().sum::<i32>() + tail
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
    fn vectors_of_any_length_are_ranked_and_scored_by_cosine() {
        // A long vector along x, a unit one at (0.6, 0.8), a query three
        // times that: by dot product the long one would win.
        let mut index = VectorIndex::new(2, vec![1], vec![10.0, 0.0]);
        index.insert(2, &[0.6, 0.8]);
        let hits = index.search(&[1.8, 2.4], 2);
        assert_eq!(hits[0].0, 2, "{hits:?}");
        assert!(
            (hits[0].1 - 1.0).abs() < 1e-6 && (hits[1].1 - 0.6).abs() < 1e-6,
            "{hits:?}"
        );
        assert!((index.score(1, &[1.8, 2.4]).unwrap() - 0.6).abs() < 1e-6);
        // A zero vector scores zero, never NaN.
        index.insert(3, &[0.0, 0.0]);
        assert_eq!(index.score(3, &[1.0, 0.0]), Some(0.0));
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

    fn random_unit(rng: &mut fastrand::Rng, n: usize, d: usize) -> Vec<f32> {
        (0..n)
            .flat_map(|_| unit(&(0..d).map(|_| rng.f32() - 0.5).collect::<Vec<_>>()))
            .collect()
    }

    #[test]
    fn the_quantized_scan_finds_what_the_exact_one_does() {
        // Random directions are the hard case: their cosines all crowd near
        // zero, where int8 error matters most.
        let (n, d) = (5_000, 384);
        let mut rng = fastrand::Rng::with_seed(3);
        let mut index = VectorIndex::new(d, (0..n as i64).collect(), random_unit(&mut rng, n, d));
        let queries = random_unit(&mut rng, 20, d);
        let mut found = 0;
        for q in queries.chunks_exact(d) {
            let exact = index.search_exact(q, 10);
            let approx = index.search_quantized(q, 10);
            found += approx.iter().filter(|hit| exact.contains(hit)).count();
            // Returned scores are exact, best first.
            assert!(approx.windows(2).all(|w| w[0].1 >= w[1].1));
        }
        let recall = found as f64 / 200.0;
        assert!(recall >= 0.95, "recall@10 {recall}");
        // Removal keeps the int8 rows in step with the f32 ones.
        let q = &queries[..d];
        let top = index.search_quantized(q, 1)[0].0;
        index.remove(top);
        index.remove(0);
        assert_eq!(index.search_quantized(q, 5), index.search_exact(q, 5));
    }

    #[test]
    fn int8_dot_matches_the_plain_sum() {
        let a: Vec<i8> = (0..390).map(|i| ((i * 37) % 255 - 127) as i8).collect();
        let b: Vec<i8> = (0..390).map(|i| ((i * 91) % 255 - 127) as i8).collect();
        let plain: i32 = a
            .iter()
            .zip(&b)
            .map(|(&x, &y)| i32::from(x) * i32::from(y))
            .sum();
        for dot in [dot_i8, dot_i8_for_cpu()] {
            assert_eq!(dot(&a, &b), plain);
            assert_eq!(dot(&[-127; 384], &[-127; 384]), 384 * 127 * 127);
        }
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
