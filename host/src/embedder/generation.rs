//! One generation of the front door's backend: a supervised pool and its
//! batcher (or, with `[embedder] remote`, a pool on other machines over
//! NATS), and the tokenizer that counts tokens for it.
//!
//! A reload starts a new generation beside the old one (make before break),
//! swaps it in, and only then stops the old one: a job holds the
//! generation it was prepared on (an `Arc`) until it is answered, so the
//! old pool stops only once no job uses it, and no job is validated on one
//! model and embedded on another.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::batcher::{BatchSettings, Batcher};
use super::job::{EmbedError, Row, TextFailure};
use crate::backend::{Health, ModelInfo};
use crate::config::{Backend, Config};
use crate::limits;
use crate::model::form::TextForm;
use crate::supervisor::{Supervisor, SupervisorError};
use crate::tokens::Tokens;
use crate::wasm::PluginSource;

/// A running backend.
pub struct Generation {
    /// Counts reloads: 1 for the first pool.
    pub generation: u64,
    /// The configuration it was started from.
    pub config: Config,
    /// What the model reported.
    pub info: ModelInfo,
    /// `wasm`, `native` or `remote`.
    pub backend: &'static str,
    /// The plugin (WASM), engine (native) or NATS server (remote) serving.
    pub engine_name: String,
    /// Counts tokens as the model does (or words, for the stub).
    pub tokens: Tokens,
    /// The prompts and lowercasing the model's texts get, which the front
    /// door applies before counting (plain for a remote pool: its members'
    /// front doors apply theirs).
    pub form: TextForm,
    /// The configured model's full name (its Hugging Face name,
    /// `sentence-transformers/all-MiniLM-L6-v2`), which clients may ask
    /// for as well as its id.
    pub alias: Option<String>,
    engine: Engine,
}

/// Where a generation's embeddings come from.
enum Engine {
    /// A supervised pool here, behind the batcher.
    Local {
        supervisor: Supervisor,
        batcher: Batcher,
    },
    /// A pool on other machines, over NATS (`[embedder] remote`): requests
    /// go as they come; the members batch.
    Remote { bus: crate::bus::Bus },
}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation")
            .field("generation", &self.generation)
            .field("backend", &self.backend)
            .field("model", &self.info.model_id)
            .finish_non_exhaustive()
    }
}

/// The batch settings for a pool of `pool_size` with batches of at most
/// `budget` tokens, waiting as `config` says: one lane per instance.
fn batch_settings(config: &Config, pool_size: usize, budget: usize) -> BatchSettings {
    BatchSettings {
        max_batch_tokens: budget,
        wait: Duration::from_micros(config.serve.batch_wait_us),
        lanes: pool_size.max(1),
        model: config.served_name(),
    }
}

impl Generation {
    /// Starts the configured backend (at most `max_pool` instances of it)
    /// and its batcher, whose batches hold at most `budget` tokens (the
    /// service's `[serve] max_batch_tokens`, or
    /// [`limits::ONE_SHOT_BATCH_TOKENS`] for a command's own pool).
    ///
    /// # Errors
    /// Why the backend could not start (model files, plugin, escalation).
    pub async fn start(
        config: Config,
        generation: u64,
        max_pool: Option<usize>,
        budget: usize,
    ) -> Result<Arc<Generation>, crate::launch::LaunchError> {
        if let Some((bus, info)) = crate::launch::remote_embedder(&config).await? {
            let tokens = crate::launch::remote_tokens(&config, &info)?;
            let name = config.embedder.remote.clone().unwrap_or_default();
            return Ok(Arc::new(Generation::remote(
                bus, info, tokens, config, name,
            )));
        }
        let form = config.model_form()?;
        let source = config.plugin_source();
        let (supervisor, _) = crate::launch::start_backend(&config, &source, max_pool).await?;
        let tokens =
            crate::launch::tokens(&config, supervisor.model_info().max_input_tokens as usize)?;
        let engine = match config.backend {
            Backend::Wasm => match &source {
                PluginSource::File(path) | PluginSource::Pinned { path, .. } => {
                    path.display().to_string()
                }
                PluginSource::Bytes { name, .. } => name.to_string(),
            },
            Backend::Native => format!("{} ({:?})", config.native.engine, config.native.precision),
        };
        let mut local = Generation::batching(supervisor, tokens, config, budget);
        local.generation = generation;
        local.engine_name = engine;
        local.form = form;
        Ok(Arc::new(local))
    }

    /// A generation over a running `supervisor`, counting with `tokens`,
    /// batching as `config`'s `[serve]` says.
    pub fn local(supervisor: Supervisor, tokens: Tokens, config: Config) -> Generation {
        let budget = config.serve.max_batch_tokens;
        Generation::batching(supervisor, tokens, config, budget)
    }

    /// [`Generation::local`] with batches of at most `budget` tokens.
    fn batching(
        supervisor: Supervisor,
        tokens: Tokens,
        config: Config,
        budget: usize,
    ) -> Generation {
        let pool_size = supervisor.status().len();
        let settings = batch_settings(&config, pool_size, budget);
        Generation {
            generation: 1,
            backend: config.backend.name(),
            engine_name: String::new(),
            alias: alias(&config),
            info: supervisor.model_info(),
            tokens,
            form: TextForm::default(),
            engine: Engine::Local {
                batcher: Batcher::start(supervisor.clone(), settings),
                supervisor,
            },
            config,
        }
    }

    /// A generation whose pool is behind `bus` (NATS members, or any
    /// `embedder.*` peer), serving `info`.
    pub fn remote(
        bus: crate::bus::Bus,
        info: ModelInfo,
        tokens: Tokens,
        config: Config,
        name: String,
    ) -> Generation {
        Generation {
            generation: 1,
            backend: "remote",
            engine: Engine::Remote { bus },
            engine_name: name,
            alias: alias(&config),
            info,
            tokens,
            form: TextForm::default(),
            config,
        }
    }

    /// Waits until every instance is up (at most the init deadline), so a
    /// generation swapped in serves at full width from its first request.
    pub async fn wait_all_up(&self) {
        if let Some(supervisor) = self.supervisor() {
            supervisor
                .wait_all_up(self.config.instance_limits().init_deadline)
                .await;
        }
    }

    /// The supervised pool, unless the pool is remote.
    pub fn supervisor(&self) -> Option<&Supervisor> {
        match &self.engine {
            Engine::Local { supervisor, .. } => Some(supervisor),
            Engine::Remote { .. } => None,
        }
    }

    /// Embeds `texts` through the batcher by `until`; each text's
    /// token count is capped at the model's window (the engine truncates).
    ///
    /// # Errors
    /// [`EmbedError`] when no text can be answered.
    pub(super) async fn embed(
        &self,
        texts: Vec<String>,
        tokens: &[usize],
        is_query: bool,
        until: Instant,
    ) -> Result<Vec<Row>, EmbedError> {
        let window = self.info.max_input_tokens.max(1) as usize;
        let capped: Vec<usize> = tokens.iter().map(|&t| t.clamp(1, window)).collect();
        match &self.engine {
            Engine::Local { batcher, .. } => batcher.embed(texts, &capped, is_query, until).await,
            Engine::Remote { bus } => remote_embed(bus, texts, is_query, until).await,
        }
    }

    /// How long `tokens` more would take here (see
    /// [`Batcher::estimate`]); `None` for a remote pool or before a
    /// measurement.
    pub fn estimate(&self, tokens: usize) -> Option<super::batcher::Estimate> {
        match &self.engine {
            Engine::Local {
                batcher,
                supervisor,
            } => batcher.estimate(tokens, supervisor.status().len()),
            Engine::Remote { .. } => None,
        }
    }

    /// Requests waiting in the batcher's rotation (none for a remote pool).
    pub fn queued(&self) -> usize {
        match &self.engine {
            Engine::Local { batcher, .. } => batcher.queued(),
            Engine::Remote { .. } => 0,
        }
    }

    /// The pool's memory and texts processed (a remote pool's, asked over
    /// the bus).
    ///
    /// # Errors
    /// Why the pool cannot answer (cooling down, unreachable).
    pub async fn health(&self) -> Result<Health, SupervisorError> {
        match &self.engine {
            Engine::Local { supervisor, .. } => supervisor.health(),
            Engine::Remote { bus } => {
                let options = crate::bus::SendOptions::default()
                    .timeout(limits::DEFAULT_REQUEST_TIMEOUT)
                    .retries(limits::NATS_HANDSHAKE_RETRIES);
                let health = bus
                    .send::<crate::messages::EmbedderHealth>(crate::bus::Empty {}, options)
                    .await
                    .map_err(|e| bus_error(e, limits::DEFAULT_REQUEST_TIMEOUT))?;
                Ok(Health {
                    memory_bytes: health.memory,
                    processed: health.processed_count,
                })
            }
        }
    }

    /// Per-instance status (none for a remote pool: its members report
    /// their own).
    pub fn status(&self) -> Vec<crate::supervisor::InstanceStatus> {
        self.supervisor()
            .map(Supervisor::status)
            .unwrap_or_default()
    }

    /// Restarts by reason.
    pub fn restarts(&self) -> std::collections::BTreeMap<String, u64> {
        self.supervisor()
            .map(Supervisor::restarts)
            .unwrap_or_default()
    }

    /// Why the pool is cooling down, if it is.
    pub fn escalated(&self) -> Option<String> {
        self.supervisor().and_then(Supervisor::escalated)
    }

    /// Stops the pool in order, at once.
    pub async fn shutdown(&self) {
        if let Some(supervisor) = self.supervisor() {
            supervisor.shutdown().await;
        }
    }

    /// Stops this generation once nothing else holds it (or after
    /// [`limits::SERVE_RELOAD_DRAIN`]): the batcher answers what is queued,
    /// then the pool stops in order.
    pub async fn retire(self: Arc<Self>) {
        let until = std::time::Instant::now() + limits::SERVE_RELOAD_DRAIN;
        while Arc::strong_count(&self) > 1 && std::time::Instant::now() < until {
            tokio::time::sleep(limits::SERVE_RELOAD_POLL).await;
        }
        if let Engine::Local {
            batcher,
            supervisor,
        } = &self.engine
        {
            batcher.close().await;
            supervisor.shutdown().await;
        }
    }
}

/// The configured model's full name, if it is one the host knows.
fn alias(config: &Config) -> Option<String> {
    crate::model::manifest(config.model_id())
        .ok()
        .map(|manifest| manifest.name)
}

/// A bus error from a remote pool as the supervisor's error a local pool
/// would have given (`left`: the time the call had).
fn bus_error(e: crate::bus::BusError, left: Duration) -> SupervisorError {
    use crate::bus::{BusError, ErrorCode};
    match e {
        BusError::Remote(r) if r.code == ErrorCode::Unavailable => SupervisorError::Unavailable {
            reason: r.message,
            retry_after: Duration::from_millis(r.retry_after_ms.unwrap_or(0)),
        },
        BusError::Remote(r) if r.code == ErrorCode::DeadlineExceeded => {
            SupervisorError::DeadlineExceeded(left)
        }
        BusError::Remote(r) => SupervisorError::Refused(r),
        BusError::Timeout { .. } | BusError::DeadlineExceeded { .. } => {
            SupervisorError::DeadlineExceeded(left)
        }
        other => SupervisorError::Unavailable {
            reason: other.to_string(),
            retry_after: limits::NATS_RETRY_AFTER,
        },
    }
}

/// `embedder.embed` to a remote pool, as rows.
async fn remote_embed(
    bus: &crate::bus::Bus,
    texts: Vec<String>,
    is_query: bool,
    until: Instant,
) -> Result<Vec<Row>, EmbedError> {
    let left = until.saturating_duration_since(Instant::now());
    let n = texts.len();
    let options = crate::bus::SendOptions::default()
        .timeout(left)
        .deadline(left)
        .retries(limits::NATS_HANDSHAKE_RETRIES);
    let request = crate::messages::EmbedRequest { texts, is_query };
    let response = bus
        .send::<crate::messages::EmbedderEmbed>(request, options)
        .await
        .map_err(|e| bus_error(e, left))?;
    let rows = response
        .per_text(n)
        .ok_or(EmbedError::Stopped)?
        .into_iter()
        .map(|row| {
            row.map(<[f32]>::to_vec)
                .map_err(|f| TextFailure(f.reason.clone()))
        })
        .collect();
    Ok(rows)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::bus::transport::InProcess;
    use crate::bus::{ErrorCode, RemoteError, RequestContext, Router};
    use crate::messages::{EmbedRequest, EmbedResponse, EmbedderEmbed};
    use crate::supervisor::SupervisorError;

    fn remote() -> (Generation, InProcess) {
        remote_pool(Config::default(), true)
    }

    /// A remote pool of a 2-dimensional model (`normalized` as given)
    /// started from `config`, whose members answer `embedder.embed` by
    /// the first text: `ok` embeds as (0.5, 0.5), `unavailable`,
    /// `deadline` and `refused` refuse so, any other never answers.
    pub(crate) fn remote_pool(config: Config, normalized: bool) -> (Generation, InProcess) {
        let mut router = Router::new();
        router.handle::<EmbedderEmbed, _, _>(
            |_: RequestContext, request: EmbedRequest| async move {
                let error =
                    |code, message: &str| Err::<EmbedResponse, _>(RemoteError::new(code, message));
                match request.texts[0].as_str() {
                    "ok" => {
                        let data = vec![0.5; 2 * request.texts.len()];
                        Ok(EmbedResponse::complete(
                            crate::vectors::Vectors::new(2, data).unwrap(),
                        ))
                    }
                    "unavailable" => {
                        let mut e = RemoteError::new(ErrorCode::Unavailable, "cooling down");
                        e.retry_after_ms = Some(2500);
                        Err(e)
                    }
                    "deadline" => error(ErrorCode::DeadlineExceeded, "too slow"),
                    "refused" => error(ErrorCode::InvalidRequest, "no such thing"),
                    _ => futures::future::pending().await,
                }
            },
        );
        let transport = InProcess::named("members", router);
        let pool = Generation {
            generation: 3,
            config,
            info: ModelInfo {
                model_id: crate::backend::ModelId::default(),
                dimension: 2,
                max_input_tokens: 8,
                normalized,
            },
            backend: "remote",
            engine_name: "nats://members".into(),
            tokens: Tokens::Words,
            form: TextForm::default(),
            alias: None,
            engine: Engine::Remote {
                bus: crate::bus::Bus::new(transport.clone()),
            },
        };
        (pool, transport)
    }

    /// Embeds `text` with a deadline long enough for every retry the bus
    /// makes (the clock is paused: waiting costs nothing).
    async fn embed(pool: &Generation, text: &str) -> Result<Vec<Row>, EmbedError> {
        let until = Instant::now() + Duration::from_secs(3600);
        pool.embed(vec![text.to_string()], &[1], false, until).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_remote_pools_answers_and_refusals_become_the_batch_errors_routes_answer_with() {
        let (pool, transport) = remote();
        let rows = embed(&pool, "ok").await.unwrap();
        assert_eq!(rows, vec![Ok(vec![0.5, 0.5])]);
        match embed(&pool, "unavailable").await {
            Err(EmbedError::Supervisor(SupervisorError::Unavailable {
                reason,
                retry_after,
            })) => {
                assert_eq!(reason, "cooling down");
                assert_eq!(retry_after, Duration::from_millis(2500));
            }
            other => panic!("not unavailable: {other:?}"),
        }
        assert!(
            matches!(
                embed(&pool, "deadline").await,
                Err(EmbedError::Supervisor(SupervisorError::DeadlineExceeded(_)))
            ),
            "a member's deadline is the request's"
        );
        match embed(&pool, "refused").await {
            Err(EmbedError::Supervisor(SupervisorError::Refused(e))) => {
                assert_eq!(
                    (e.code, e.message.as_str()),
                    (ErrorCode::InvalidRequest, "no such thing")
                );
            }
            other => panic!("not refused: {other:?}"),
        }
        // No answer within the request's deadline.
        assert!(
            matches!(
                embed(&pool, "silent").await,
                Err(EmbedError::Supervisor(SupervisorError::DeadlineExceeded(_)))
            ),
            "a silent member runs out the deadline"
        );
        // Members gone, past every retry: unavailable, retried after the
        // NATS pause.
        transport.close();
        match embed(&pool, "ok").await {
            Err(EmbedError::Supervisor(SupervisorError::Unavailable { retry_after, .. })) => {
                assert_eq!(retry_after, limits::NATS_RETRY_AFTER);
            }
            other => panic!("not unavailable: {other:?}"),
        }
    }

    #[test]
    fn a_remote_pool_reports_no_local_state_and_shows_what_it_serves() {
        let (pool, _transport) = remote();
        assert!(pool.status().is_empty());
        assert!(pool.restarts().is_empty());
        assert_eq!(pool.escalated(), None);
        assert!(pool.estimate(100).is_none());
        let shown = format!("{pool:?}");
        assert!(
            shown.starts_with("Generation { generation: 3, backend: \"remote\", model: ")
                && shown.ends_with(", .. }"),
            "{shown}"
        );
    }
}
