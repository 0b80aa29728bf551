//! Search: by meaning over the in-memory index, by keyword over the
//! store's FTS5 index, or both fused with reciprocal rank fusion
//! ([`fuse`]).
//!
//! # Invariants
//! - A hybrid search orders its hits by the fused rank, and each hit shows
//!   its cosine to the query, a score that means the same from query to
//!   query.
//! - Equal fused scores are ordered by the texts' own scores, then by id,
//!   never by the order the chunks were stored.

use std::collections::HashMap;

use super::{Opened, SEARCH_EMBED_TIMEOUT, Worker, WorkerError, blocking, lock};
use crate::embedder::Job;
use crate::messages::{SearchMode, SearchResult};

impl Worker {
    /// `worker.search`: the `limit` chunks closest in meaning to `query`,
    /// best first.
    ///
    /// # Errors
    /// The embedder's or the store's error.
    pub async fn search(
        &self,
        query: String,
        limit: usize,
    ) -> Result<Vec<SearchResult>, WorkerError> {
        self.search_mode(query, limit, SearchMode::default()).await
    }

    /// `worker.search` in `mode`: by meaning, by keyword, or both fused
    /// with reciprocal rank fusion ([`crate::limits::RRF_K`]). In hybrid
    /// mode each ranking contributes its best
    /// [`crate::limits::HYBRID_CANDIDATES`] (or `limit`, if more), and a
    /// result's score is its fused score.
    ///
    /// # Errors
    /// The embedder's or the store's error.
    pub async fn search_mode(
        &self,
        query: String,
        limit: usize,
        mode: SearchMode,
    ) -> Result<Vec<SearchResult>, WorkerError> {
        let opened = self.opened().await?;
        let candidates = limit.max(crate::limits::HYBRID_CANDIDATES);
        let keyword = match mode {
            SearchMode::Semantic => Vec::new(),
            SearchMode::Keyword | SearchMode::Hybrid => {
                let (store, q) = (opened.store.clone(), query.clone());
                let fused = mode == SearchMode::Hybrid;
                blocking(move || Ok(lock(&store).keyword(&q, candidates, fused)?)).await?
            }
        };
        let (semantic, query_vector) = match mode {
            SearchMode::Keyword => (Vec::new(), Vec::new()),
            SearchMode::Semantic => self.semantic(&opened, query, limit).await?,
            SearchMode::Hybrid => self.semantic(&opened, query, candidates).await?,
        };
        let hits = match mode {
            SearchMode::Semantic => semantic,
            SearchMode::Keyword => keyword.into_iter().take(limit).collect(),
            // Fusion orders the hits; each shows its cosine to the query,
            // a score that means the same from query to query (a fusion
            // score is only a rank: 0.033 for the best and the second).
            SearchMode::Hybrid => {
                let index = opened.index.read().unwrap_or_else(|e| e.into_inner());
                fuse(&[semantic, keyword], limit)
                    .into_iter()
                    .map(|(id, _)| (id, index.score(id, &query_vector).unwrap_or_default()))
                    .collect()
            }
        };
        let store = opened.store.clone();
        let ids: Vec<i64> = hits.iter().map(|h| h.0).collect();
        let rows = blocking(move || Ok(lock(&store).chunks(&ids)?)).await?;
        let scores: HashMap<i64, f32> = hits.into_iter().collect();
        Ok(rows
            .into_iter()
            .map(|row| SearchResult {
                score: scores.get(&row.id).copied().unwrap_or_default(),
                path: row.path,
                start_line: row.start_line,
                end_line: row.end_line,
                text: row.text,
            })
            .collect())
    }

    /// The `limit` chunks closest in meaning to `query`, with their cosine,
    /// and the query's vector.
    async fn semantic(
        &self,
        opened: &Opened,
        query: String,
        limit: usize,
    ) -> Result<(Vec<(i64, f32)>, Vec<f32>), WorkerError> {
        let job = Job::new(vec![query])
            .query(true)
            .deadline(SEARCH_EMBED_TIMEOUT);
        let done = self.inner.embedder.embed(job).await?;
        let vector = match done.rows.into_iter().next() {
            Some(Ok(vector)) => vector,
            Some(Err(reason)) => return Err(WorkerError::Query(reason.0)),
            None => return Err(WorkerError::Query("no reason given".into())),
        };
        let hits = opened
            .index
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .search(&vector, limit);
        Ok((hits, vector))
    }
}

/// Reciprocal rank fusion of `rankings` (each best first): a chunk scores
/// the sum of `1 / (RRF_K + rank)` over the rankings it appears in (rank
/// from 1); the best `limit`, best first. Equal fused scores are ordered by
/// each ranking's own score in turn (the first ranking's first), then by
/// id: the order depends on the texts, not on the order they were stored.
pub fn fuse(rankings: &[Vec<(i64, f32)>], limit: usize) -> Vec<(i64, f32)> {
    let mut scores: HashMap<i64, (f32, Vec<f32>)> = HashMap::new();
    for (r, ranking) in rankings.iter().enumerate() {
        for (rank, (id, own)) in ranking.iter().enumerate() {
            let entry = scores
                .entry(*id)
                .or_insert_with(|| (0.0, vec![f32::NEG_INFINITY; rankings.len()]));
            entry.0 += 1.0 / (crate::limits::RRF_K + rank as f32 + 1.0);
            entry.1[r] = *own;
        }
    }
    let mut fused: Vec<(i64, (f32, Vec<f32>))> = scores.into_iter().collect();
    fused.sort_by(|a, b| {
        let by_own =
            a.1.1
                .iter()
                .zip(&b.1.1)
                .fold(std::cmp::Ordering::Equal, |o, (x, y)| {
                    o.then(y.total_cmp(x))
                });
        b.1.0.total_cmp(&a.1.0).then(by_own).then(a.0.cmp(&b.0))
    });
    fused.truncate(limit);
    fused
        .into_iter()
        .map(|(id, (score, _))| (id, score))
        .collect()
}
