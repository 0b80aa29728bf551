//! The models a service serves beside its default one (`[[models]]`):
//! started with it, reloaded one by one, stopped with it.
//!
//! # Invariants
//! - Each model has its own front door ([`Embedder`]) and supervised pool:
//!   one model's crashes, restarts and escalations never reach another's
//!   requests, and a reload that adds, removes or swaps one model leaves
//!   the others' generations (and their requests) untouched.
//! - The service starts only when every model's pool is up, and only if
//!   the memory caps of all the pools together fit the machine's share
//!   ([`crate::ceilings::fit_models`]); a model that cannot start fails the
//!   start, naming it.
//! - A model swapped or removed by a reload retires as the default one
//!   does: it stops once its last request is answered.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::ServeError;
use super::state::{State, lock};
use crate::config::Config;
use crate::embedder::{Embedder, Generation};

/// Whether `a` and `b` run the same embedder (a reload keeps its pool).
pub(super) fn same_embedder(a: &Config, b: &Config) -> bool {
    a.embedder_id() == b.embedder_id()
        && a.supervisor_config() == b.supervisor_config()
        && a.instance_limits() == b.instance_limits()
        && a.native == b.native
        && a.model == b.model
        && a.name == b.name
}

/// Refuses the start unless every served model's pool fits the machine's
/// memory together.
///
/// # Errors
/// [`ServeError::Memory`] naming each model's share and the budget.
pub(super) fn check_memory(config: &Config) -> Result<(), ServeError> {
    let pools: Vec<(String, usize, Option<u64>)> = config
        .served()
        .iter()
        .map(|c| {
            let size = c.supervisor_config().pool_size;
            (c.served_name(), size, crate::launch::instance_memory(c))
        })
        .collect();
    match crate::ceilings::machine_memory_bytes() {
        Some(machine) => crate::ceilings::fit_models(&pools, machine).map_err(ServeError::Memory),
        None => Ok(()),
    }
}

/// A pool for `config` as generation number `generation`, up.
async fn start(config: Config, generation: u64) -> Result<Arc<Generation>, ServeError> {
    let name = config.served_name();
    let budget = config.serve.max_batch_tokens;
    let pool = Generation::start(config, generation, None, budget)
        .await
        .map_err(|source| ServeError::Model { name, source })?;
    pool.wait_all_up().await;
    Ok(pool)
}

/// Starts every model of `config.models`, in order.
///
/// # Errors
/// [`ServeError::Model`] naming the first that did not start.
pub(super) async fn start_others(state: &Arc<State>, config: &Config) -> Result<(), ServeError> {
    // Each known before any starts: a request for one still starting is
    // answered 503 (retry), not 404.
    let embedders: Vec<(&Config, Arc<Embedder>)> = config
        .models
        .iter()
        .map(|other| (other, Arc::new(Embedder::new())))
        .collect();
    for (other, embedder) in &embedders {
        lock(&state.others).insert(other.served_name(), embedder.clone());
    }
    for (other, embedder) in embedders {
        let generation = state.generations.fetch_add(1, Ordering::Relaxed) + 1;
        let pool = start(other.clone(), generation).await?;
        tracing::info!(model = %other.served_name(), backend = pool.backend, "embedder pool up");
        embedder.install(pool);
    }
    Ok(())
}

/// SIGHUP for the models beside the default one: starts those `config`
/// adds, swaps those whose embedder changed once the new pool is up,
/// retires those it no longer names; the rest are not touched. A model
/// that fails to start keeps what it had (or stays absent).
pub(super) async fn reload_others(state: &Arc<State>, config: &Config) {
    let wanted: BTreeMap<String, &Config> =
        config.models.iter().map(|c| (c.served_name(), c)).collect();
    let removed: Vec<(String, Arc<Embedder>)> = {
        let mut others = lock(&state.others);
        let gone: Vec<String> = others
            .keys()
            .filter(|n| !wanted.contains_key(*n))
            .cloned()
            .collect();
        gone.into_iter()
            .filter_map(|n| others.remove(&n).map(|e| (n, e)))
            .collect()
    };
    for (name, embedder) in removed {
        tracing::info!(model = %name, "reload: model no longer served");
        retire(state, embedder.take());
    }
    for (name, other) in wanted {
        let current = lock(&state.others).get(&name).cloned();
        let kept = current
            .as_ref()
            .and_then(|e| e.generation().ok())
            .is_some_and(|g| same_embedder(&g.config, other));
        if kept {
            continue;
        }
        let generation = state.generations.fetch_add(1, Ordering::Relaxed) + 1;
        match start(other.clone(), generation).await {
            Ok(pool) => {
                tracing::info!(model = %name, generation, "reload: model's pool swapped in");
                let embedder = current.unwrap_or_else(|| {
                    let embedder = Arc::new(Embedder::new());
                    lock(&state.others).insert(name.clone(), embedder.clone());
                    embedder
                });
                retire(state, embedder.install(pool));
            }
            Err(e) => tracing::error!("reload of `{name}` failed, what it had stays: {e}"),
        }
    }
}

/// Lets `old` stop once its last request is answered.
pub(super) fn retire(state: &State, old: Option<Arc<Generation>>) {
    if let Some(old) = old {
        let task = tokio::spawn(old.retire());
        let mut retiring = lock(&state.retiring);
        retiring.retain(|t| !t.is_finished());
        retiring.push(task);
    }
}

/// Stops every model beside the default one.
pub(super) async fn shut_down_others(state: &State) {
    let others: Vec<Arc<Embedder>> = std::mem::take(&mut *lock(&state.others))
        .into_values()
        .collect();
    for embedder in others {
        if let Some(pool) = embedder.take() {
            pool.shutdown().await;
        }
    }
}
