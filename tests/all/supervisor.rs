//! The supervisor's policy on tokio's paused clock, with scripted workers:
//! restart intensity, backoff bands, restart types, health checks and
//! planned recycling under load.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use embedhost::bus::BoxFuture;
use embedhost::supervisor::{
    CallError, FailureReason, Health, Intensity, RestartType, SpawnError, Supervisor,
    SupervisorConfig, SupervisorError, Worker,
};
use embedhost::vectors::Vectors;
use embedhost::wasm::ModelInfo;
use tokio::time::Instant;

/// What a scripted worker does with one call.
#[derive(Clone, Copy, Debug)]
enum Act {
    Ok,
    Crash,
    Sleep(Duration),
    /// A bug in the host's own code on the slot's task.
    Panic,
}

type Script = Arc<dyn Fn(usize, u64, &str) -> Act + Send + Sync>;

struct Scripted {
    slot: usize,
    incarnation: u64,
    script: Script,
    processed: u64,
    health_hangs: bool,
}

/// The vector a scripted worker gives a text: its length and the
/// incarnation that embedded it is not part of it, so answers are
/// comparable across restarts.
fn vector_of(text: &str) -> [f32; 2] {
    [text.len() as f32, 1.0]
}

impl Worker for Scripted {
    fn embed(
        &mut self,
        texts: Vec<String>,
        _: bool,
        deadline: Duration,
    ) -> BoxFuture<Result<Vectors, CallError>> {
        let act = (self.script)(self.slot, self.incarnation, &texts[0]);
        self.processed += texts.len() as u64;
        Box::pin(async move {
            match act {
                Act::Panic => panic!("scripted panic on the slot's task"),
                Act::Crash => Err(CallError::Crash {
                    reason: FailureReason::Trap("scripted".into()),
                    message: "scripted crash".into(),
                }),
                // As a real backend does, a call that outlives the deadline
                // it was given is interrupted, and the instance is lost.
                Act::Sleep(d) => {
                    match tokio::time::timeout(deadline, tokio::time::sleep(d)).await {
                        Err(_) => Err(CallError::Crash {
                            reason: FailureReason::Deadline,
                            message: format!("ran past its {deadline:?} deadline"),
                        }),
                        Ok(()) => Ok(Vectors::new(
                            2,
                            texts.iter().flat_map(|t| vector_of(t)).collect(),
                        )
                        .unwrap()),
                    }
                }
                Act::Ok => {
                    Ok(Vectors::new(2, texts.iter().flat_map(|t| vector_of(t)).collect()).unwrap())
                }
            }
        })
    }

    fn health(&mut self, _: Duration) -> BoxFuture<Result<Health, CallError>> {
        let processed = self.processed;
        let hangs = self.health_hangs;
        Box::pin(async move {
            if hangs {
                std::future::pending::<()>().await;
            }
            Ok(Health {
                memory_bytes: 1000,
                processed,
            })
        })
    }

    fn stop(self: Box<Self>) -> BoxFuture<()> {
        Box::pin(async {})
    }
}

fn info() -> ModelInfo {
    ModelInfo {
        model_id: embedhost::backend::ModelId::new("scripted").unwrap(),
        dimension: 2,
        max_input_tokens: 16,
        normalized: false,
    }
}

/// Records every start: (slot, incarnation, when).
type Starts = Arc<Mutex<Vec<(usize, u64, Instant)>>>;

async fn supervise(
    config: SupervisorConfig,
    script: impl Fn(usize, u64, &str) -> Act + Send + Sync + 'static,
    init_fails: impl Fn(usize, u64) -> bool + Send + Sync + 'static,
    health_hangs: impl Fn(u64) -> bool + Send + Sync + 'static,
) -> (Supervisor, Starts) {
    let script: Script = Arc::new(script);
    let starts: Starts = Arc::default();
    let log = starts.clone();
    let init_fails = Arc::new(init_fails);
    let health_hangs = Arc::new(health_hangs);
    let supervisor = Supervisor::from_fn(
        move |slot, incarnation| {
            log.lock()
                .unwrap()
                .push((slot, incarnation, Instant::now()));
            let (script, fails, hangs) = (
                script.clone(),
                init_fails(slot, incarnation),
                health_hangs(incarnation),
            );
            Box::pin(async move {
                if fails {
                    return Err(SpawnError::backend(std::io::Error::other(format!(
                        "scripted init failure of incarnation {incarnation}"
                    ))));
                }
                let worker = Scripted {
                    slot,
                    incarnation,
                    script,
                    processed: 0,
                    health_hangs: hangs,
                };
                Ok((Box::new(worker) as Box<dyn Worker>, info()))
            })
        },
        config,
    )
    .await
    .unwrap();
    (supervisor, starts)
}

/// A worker whose embedder is `supervisor`, through the front door, one
/// text per call.
fn worker_over(
    supervisor: &Supervisor,
    settings: embedhost::worker::WorkerSettings,
) -> embedhost::worker::Worker {
    // One text per call: a scripted embedder decides a batch by its first
    // text, so the front door must not merge the worker's batches.
    let mut config = embedhost::config::Config::default();
    config.serve.max_batch_tokens = 1;
    let embedder = std::sync::Arc::new(embedhost::embedder::Embedder::serving(
        embedhost::embedder::Generation::local(
            supervisor.clone(),
            embedhost::worker::chunk::Tokens::Words,
            config,
        ),
    ));
    embedhost::worker::Worker::new(
        embedder,
        info(),
        embedhost::worker::chunk::Tokens::Words,
        settings,
    )
}

/// The shipped policy (poison verdicts, intensity, cooldowns) for a pool
/// of `pool`, with the tests' jitter seed and no recycling by count.
fn shipped(pool: usize) -> SupervisorConfig {
    SupervisorConfig {
        pool_size: pool,
        jitter_seed: Some(SEED),
        max_processed: u64::MAX,
        ..SupervisorConfig::default()
    }
}

/// The jitter seed of every test's supervisor: printed by the tests that
/// depend on it, so a failure can be replayed.
const SEED: u64 = 0x5eed_0001;

fn config(pool: usize) -> SupervisorConfig {
    let mut c = SupervisorConfig {
        pool_size: pool,
        jitter_seed: Some(SEED),
        ..SupervisorConfig::default()
    };
    // Out of the way unless a test is about them.
    c.max_processed = u64::MAX;
    c.poison_after = 1000;
    c
}

const DEADLINE: Duration = Duration::from_secs(600);

fn one(text: &str) -> Vec<String> {
    vec![text.to_string()]
}

#[tokio::test(start_paused = true)]
async fn escalates_after_max_restarts_plus_one_failures_within_the_window() {
    // Incarnation 1 crashes on "boom"; every later start fails.
    let (supervisor, starts) = supervise(
        config(1),
        |_, _, t| if t == "boom" { Act::Crash } else { Act::Ok },
        |_, inc| inc > 1,
        |_| false,
    )
    .await;
    let t0 = Instant::now();
    let r = supervisor.embed(one("boom"), false, DEADLINE).await;
    // Failure 1 (the crash) and failures 2..=3 (init) are restarted; failure 4
    // exceeds MaxR = 3 within 5 s and escalates.
    let err = r.unwrap_err();
    assert!(
        matches!(&err, SupervisorError::Unavailable { reason, retry_after } if reason.contains("failed 4 times within 5s") && reason.contains("init") && *retry_after == embedhost::limits::ESCALATION_COOLDOWN_MIN),
        "{err}"
    );
    assert_eq!(
        starts.lock().unwrap().len(),
        4,
        "the first start and three restarts"
    );
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(supervisor.escalated().is_some());
    // Every call during the cooldown fails at once, with the reason and
    // the time left.
    let t1 = Instant::now();
    let err = supervisor
        .embed(one("fine"), false, DEADLINE)
        .await
        .unwrap_err();
    assert!(matches!(err, SupervisorError::Unavailable { .. }), "{err}");
    assert_eq!(t1.elapsed(), Duration::ZERO);
    let status = &supervisor.status()[0];
    assert_eq!(status.restarts.get("trap"), Some(&1));
    assert_eq!(status.restarts.get("init_failed"), Some(&3));
}

#[tokio::test(start_paused = true)]
async fn a_first_instance_that_fails_to_start_is_restarted_within_the_intensity() {
    // Two failed starts, then one that comes up: `start` rides them out.
    let (supervisor, starts) = supervise(
        config(1),
        |_, _, _| Act::Ok,
        |_, incarnation| incarnation <= 2,
        |_| false,
    )
    .await;
    let starts = starts.lock().unwrap().clone();
    assert_eq!(starts.len(), 3);
    // The first restart is immediate, the second waits a jittered backoff
    // drawn from [0, 100 ms].
    assert_eq!(starts[1].2, starts[0].2);
    let gap = starts[2].2 - starts[1].2;
    assert!(gap <= Duration::from_millis(101), "{gap:?}");
    let status = &supervisor.status()[0];
    assert_eq!(status.incarnation, 3);
    assert_eq!(status.restarts.get("init_failed"), Some(&2));
    let r = supervisor.embed(one("ok"), false, DEADLINE).await.unwrap();
    assert_eq!(r.vectors.get(0).unwrap(), vector_of("ok"));
}

#[tokio::test(start_paused = true)]
async fn a_first_instance_that_never_starts_escalates_with_the_last_reason() {
    let attempts = Arc::new(AtomicU64::new(0));
    let counter = attempts.clone();
    let t0 = Instant::now();
    let err = Supervisor::from_fn(
        move |_, incarnation| {
            counter.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                let exited = format!("exit status: 3 (incarnation {incarnation})");
                Err(SpawnError::backend(std::io::Error::other(exited)))
            })
        },
        config(1),
    )
    .await
    .unwrap_err();
    // MaxR = 3 restarts are allowed; the 4th failure within 5 s escalates.
    assert_eq!(attempts.load(Ordering::SeqCst), 4);
    assert!(
        matches!(&err, SupervisorError::Escalated(why)
            if why.contains("failed 4 times within 5s") && why.contains("exit status: 3 (incarnation 4)")),
        "{err}"
    );
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    // Nothing is left running: no recovery restarts the failed pool after
    // its cooldown (an hour on the paused clock).
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(attempts.load(Ordering::SeqCst), 4);
}

#[tokio::test(start_paused = true)]
async fn a_slot_whose_task_panics_is_not_left_up_and_the_pool_recovers() {
    let (supervisor, starts) = supervise(
        config(1),
        |_, incarnation, t| match (incarnation, t) {
            (1, "panic") => Act::Panic,
            _ => Act::Ok,
        },
        |_, _| false,
        |_| false,
    )
    .await;
    let long = Duration::from_secs(3600);
    assert!(supervisor.embed(one("panic"), false, long).await.is_err());
    // The slot is gone: not reported up, and the pool recovers after its
    // cooldown instead of queueing every later call until its deadline.
    assert!(!supervisor.status()[0].up);
    let t0 = Instant::now();
    let r = loop {
        match supervisor.embed(one("after"), false, long).await {
            Err(SupervisorError::Unavailable { retry_after, .. }) => {
                tokio::time::sleep(retry_after.max(Duration::from_millis(10))).await;
            }
            other => break other,
        }
    };
    assert_eq!(r.unwrap().vectors.get(0).unwrap(), vector_of("after"));
    assert!(
        t0.elapsed() < Duration::from_secs(120),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(starts.lock().unwrap().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn shutdown_fails_queued_calls_at_once_not_at_their_deadlines() {
    let (supervisor, _) = supervise(
        config(1),
        |_, _, t| match t {
            "slow" => Act::Sleep(Duration::from_secs(5)),
            _ => Act::Ok,
        },
        |_, _| false,
        |_| false,
    )
    .await;
    let long = Duration::from_secs(600);
    let call = |text: &'static str| {
        let s = supervisor.clone();
        tokio::spawn(async move { s.embed(one(text), false, long).await })
    };
    let running = call("slow");
    // Yields (no time passes on the paused clock): the slow call starts,
    // the next one is queued behind it.
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    let queued = call("queued");
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    let t0 = Instant::now();
    supervisor.shutdown().await;
    let err = queued.await.unwrap().unwrap_err();
    assert!(matches!(err, SupervisorError::Escalated(_)), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(60), "{:?}", t0.elapsed());
    let _ = running.await.unwrap();
    let err = supervisor
        .embed(one("late"), false, long)
        .await
        .unwrap_err();
    assert!(matches!(err, SupervisorError::Escalated(_)), "{err}");
}

#[tokio::test(start_paused = true)]
async fn failures_spread_beyond_the_window_never_escalate() {
    // Each "boom-i" text crashes the first instance that sees it, once.
    let seen = Arc::new(Mutex::new(std::collections::HashSet::new()));
    let script = move |_: usize, _: u64, t: &str| {
        if t.starts_with("boom") && seen.lock().unwrap().insert(t.to_string()) {
            Act::Crash
        } else {
            Act::Ok
        }
    };
    let (supervisor, starts) = supervise(config(1), script, |_, _| false, |_| false).await;
    for i in 0..10 {
        // A failure every 2 s: never more than 3 within a 5 s window.
        let r = supervisor
            .embed(one(&format!("boom-{i}")), false, DEADLINE)
            .await
            .unwrap();
        assert_eq!(
            r.vectors.len(),
            1,
            "retried on a fresh instance and answered"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert!(
        supervisor.escalated().is_none(),
        "{:?}",
        supervisor.escalated()
    );
    assert_eq!(starts.lock().unwrap().len(), 11);
    assert_eq!(supervisor.status()[0].restarts.get("trap"), Some(&10));
}

#[tokio::test(start_paused = true)]
async fn restart_delays_fall_within_their_backoff_bands() {
    let mut c = config(1);
    c.intensity.max_restarts = 8;
    c.intensity.window = Duration::from_secs(60);
    // Incarnation 1 crashes on its first call; every restart fails to init.
    let (supervisor, starts) = supervise(
        c.clone(),
        |_, inc, _| if inc == 1 { Act::Crash } else { Act::Ok },
        |_, inc| inc > 1,
        |_| false,
    )
    .await;
    let err = supervisor
        .embed(one("x"), false, DEADLINE)
        .await
        .unwrap_err();
    assert!(matches!(err, SupervisorError::Unavailable { .. }), "{err}");
    let starts = starts.lock().unwrap();
    assert_eq!(starts.len(), 9, "first start + 8 restarts");
    // Gap n (from 1) between consecutive starts is drawn from
    // [ceiling(n) / 2, ceiling(n)]: ceilings 0, 100, 200, 400, 800, 1600,
    // 3200, 5000 ms (capped). A supervisor without backoff fails the lower
    // bound, one with a fixed delay the growth.
    for (n, pair) in starts.windows(2).enumerate() {
        let gap = pair[1].2 - pair[0].2;
        let ceiling = Intensity::ceiling(&c.intensity, n as u32 + 1);
        assert!(
            gap <= ceiling + Duration::from_millis(1)
                && gap + Duration::from_millis(1) >= ceiling / 2,
            "restart {}: {gap:?} outside [{:?}, {ceiling:?}] (jitter seed {SEED})",
            n + 1,
            ceiling / 2
        );
    }
    assert_eq!(starts[1].2, starts[0].2, "the first restart is immediate");
}

#[tokio::test(start_paused = true)]
async fn the_backoff_starts_over_after_a_stable_uptime() {
    let mut c = config(1);
    c.intensity.max_restarts = 100;
    c.intensity.window = Duration::from_secs(3600);
    let (supervisor, starts) = supervise(
        c.clone(),
        |_, _, t| if t == "boom" { Act::Crash } else { Act::Ok },
        |_, _| false,
        |_| false,
    )
    .await;
    for _ in 0..4 {
        let _ = supervisor
            .embed(one("boom"), false, Duration::from_millis(1))
            .await;
        tokio::time::sleep(Duration::from_secs(6)).await;
    }
    assert!(
        starts.lock().unwrap().len() >= 5,
        "the crashes restarted the instance"
    );
    // Stable for longer than `stable_uptime`: the next restart is immediate.
    tokio::time::sleep(c.intensity.stable_uptime).await;
    let before = starts.lock().unwrap().len();
    let crashed_at = Instant::now();
    let _ = supervisor
        .embed(one("boom"), false, Duration::from_millis(1))
        .await;
    tokio::time::sleep(Duration::from_millis(1)).await;
    let starts = starts.lock().unwrap();
    assert_eq!(starts.len(), before + 1);
    assert!(starts.last().unwrap().2 - crashed_at <= Duration::from_millis(1));
}

#[tokio::test(start_paused = true)]
async fn a_temporary_instance_is_not_restarted() {
    let mut c = config(1);
    c.restart = RestartType::Temporary;
    let (supervisor, starts) = supervise(
        c,
        |_, _, t| if t == "boom" { Act::Crash } else { Act::Ok },
        |_, _| false,
        |_| false,
    )
    .await;
    let t0 = Instant::now();
    let err = supervisor
        .embed(one("boom"), false, Duration::from_secs(1))
        .await
        .unwrap_err();
    // The slot left the pool; a pool with no slot left fails at once
    // (before, its callers waited until their deadline).
    assert!(
        matches!(&err, SupervisorError::Escalated(why) if why.contains("none is restarted")),
        "{err}"
    );
    assert_eq!(t0.elapsed(), Duration::ZERO);
    assert_eq!(starts.lock().unwrap().len(), 1);
    assert!(!supervisor.status()[0].up);
    let err = supervisor
        .embed(one("fine"), false, DEADLINE)
        .await
        .unwrap_err();
    assert!(matches!(err, SupervisorError::Escalated(_)), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_hung_health_check_restarts_the_instance_with_its_reason() {
    let mut c = config(1);
    c.health_interval = Duration::from_secs(10);
    c.health_timeout = Duration::from_secs(5);
    let (supervisor, starts) = supervise(c, |_, _, _| Act::Ok, |_, _| false, |inc| inc == 1).await;
    tokio::time::sleep(Duration::from_secs(16)).await;
    let status = &supervisor.status()[0];
    assert_eq!(status.restarts.get("health_timeout"), Some(&1));
    assert_eq!(status.incarnation, 2);
    let gap = {
        let starts = starts.lock().unwrap();
        starts[1].2 - starts[0].2
    };
    assert_eq!(gap, Duration::from_secs(15), "interval 10 s + timeout 5 s");
    assert_eq!(
        supervisor
            .embed(one("abc"), false, DEADLINE)
            .await
            .unwrap()
            .vectors
            .as_flat(),
        &[3.0, 1.0]
    );
}

#[tokio::test(start_paused = true)]
async fn a_crash_on_one_instance_never_fails_calls_running_on_another() {
    let (supervisor, _) = supervise(
        config(2),
        |_, _, t| match t {
            "slow" => Act::Sleep(Duration::from_secs(3)),
            "boom" => Act::Crash,
            _ => Act::Ok,
        },
        |_, _| false,
        |_| false,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1)).await; // both slots up
    let slow = tokio::spawn({
        let s = supervisor.clone();
        async move { s.embed(one("slow"), false, DEADLINE).await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    let boom = supervisor
        .embed(one("boom"), false, Duration::from_secs(1))
        .await;
    assert!(boom.is_err(), "every attempt at `boom` crashes");
    let slow = slow.await.unwrap().unwrap();
    assert_eq!(slow.vectors.as_flat(), &[4.0, 1.0]);
}

#[tokio::test(start_paused = true)]
async fn a_planned_recycle_under_constant_load_fails_no_request() {
    let mut c = config(2);
    c.max_processed = 50;
    c.health_interval = Duration::from_millis(100);
    let (supervisor, starts) = supervise(
        c,
        |_, _, _| Act::Sleep(Duration::from_millis(1)),
        |_, _| false,
        |_| false,
    )
    .await;
    let answered = Arc::new(AtomicU64::new(0));
    let callers: Vec<_> = (0..4)
        .map(|caller| {
            let (supervisor, answered) = (supervisor.clone(), answered.clone());
            tokio::spawn(async move {
                for i in 0..500 {
                    let text = format!("caller {caller} request {i}");
                    let r = supervisor
                        .embed(one(&text), false, Duration::from_secs(5))
                        .await
                        .unwrap();
                    assert_eq!(r.vectors.as_flat(), &vector_of(&text));
                    answered.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await.unwrap();
    }
    assert_eq!(answered.load(Ordering::Relaxed), 2000);
    let recycles: u64 = supervisor
        .status()
        .iter()
        .map(|s| s.restarts.get("recycle").copied().unwrap_or(0))
        .sum();
    let failures: u64 = supervisor
        .status()
        .iter()
        .flat_map(|s| s.restarts.iter())
        .filter(|(k, _)| *k != "recycle")
        .map(|(_, v)| v)
        .sum();
    assert!(recycles >= 5, "{recycles} recycles");
    assert_eq!(failures, 0);
    assert!(starts.lock().unwrap().len() as u64 >= 2 + recycles);
}

#[tokio::test(start_paused = true)]
async fn callers_that_give_up_early_never_kill_or_escalate_a_healthy_instance() {
    // Every call takes 2 s; every caller gives up after 100 ms. Before, the
    // caller's remaining time was the call's deadline: each call killed its
    // instance, and the fourth escalated the pool.
    let (supervisor, starts) = supervise(
        config(1),
        |_, _, _| Act::Sleep(Duration::from_secs(2)),
        |_, _| false,
        |_| false,
    )
    .await;
    for _ in 0..10 {
        let err = supervisor
            .embed(one("slow"), false, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(err, SupervisorError::DeadlineExceeded(_)), "{err}");
    }
    assert!(supervisor.escalated().is_none());
    assert!(
        supervisor.restarts().is_empty(),
        "{:?}",
        supervisor.restarts()
    );
    assert_eq!(starts.lock().unwrap().len(), 1);
    // A patient caller is served by the same instance.
    let r = supervisor
        .embed(one("slow"), false, DEADLINE)
        .await
        .unwrap();
    assert_eq!(r.vectors.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_job_whose_caller_gave_up_in_the_queue_is_never_started() {
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let log = seen.clone();
    let (supervisor, _) = supervise(
        config(1),
        move |_, _, t| {
            log.lock().unwrap().push(t.to_string());
            Act::Sleep(Duration::from_secs(1))
        },
        |_, _| false,
        |_| false,
    )
    .await;
    let busy = {
        let s = supervisor.clone();
        tokio::spawn(async move { s.embed(one("first"), false, DEADLINE).await })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    // Queued behind a 1 s call, with 500 ms to live.
    let err = supervisor
        .embed(one("impatient"), false, Duration::from_millis(500))
        .await
        .unwrap_err();
    assert!(matches!(err, SupervisorError::DeadlineExceeded(_)), "{err}");
    busy.await.unwrap().unwrap();
    let after = supervisor
        .embed(one("after"), false, DEADLINE)
        .await
        .unwrap();
    assert_eq!(after.vectors.len(), 1);
    assert_eq!(*seen.lock().unwrap(), ["first", "after"]);
    assert!(supervisor.restarts().is_empty());
}

#[tokio::test(start_paused = true)]
async fn an_escalated_pool_recovers_by_itself_once_the_plugin_behaves() {
    // Incarnation 1 crashes on its call; incarnations 2 to 5 fail to
    // start (the pool escalates, and its first restart fails too); later
    // ones behave.
    let (supervisor, starts) = supervise(
        config(1),
        |_, inc, _| if inc == 1 { Act::Crash } else { Act::Ok },
        |_, inc| (2..=5).contains(&inc),
        |_| false,
    )
    .await;
    let t0 = Instant::now();
    let mut waited = Vec::new();
    let r = loop {
        match supervisor.embed(one("x"), false, DEADLINE).await {
            Ok(r) => break r,
            Err(SupervisorError::Unavailable { retry_after, .. }) => {
                // What an indexer does: wait out the cooldown, lose nothing.
                waited.push(retry_after);
                tokio::time::sleep(retry_after).await;
            }
            Err(SupervisorError::Refused(_)) => {}
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(r.vectors.len(), 1);
    assert!(supervisor.escalated().is_none());
    assert!(!waited.is_empty(), "it escalated at least once");
    // The first cooldown is the shortest; a second one in a row doubles.
    assert_eq!(waited[0], embedhost::limits::ESCALATION_COOLDOWN_MIN);
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
    assert!(starts.lock().unwrap().len() >= 6);
    // Served again: the next escalation would start from the shortest.
    assert_eq!(
        supervisor
            .embed(one("y"), false, DEADLINE)
            .await
            .unwrap()
            .vectors
            .len(),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn a_poison_text_never_crashes_an_instance_twice_across_batches() {
    let mut c = config(1);
    c.poison_after = embedhost::limits::DEFAULT_POISON_AFTER;
    let crashes = Arc::new(AtomicU64::new(0));
    let counted = crashes.clone();
    let (supervisor, _) = supervise(
        c,
        move |_, _, t| {
            if t == "poison" {
                counted.fetch_add(1, Ordering::SeqCst);
                Act::Crash
            } else {
                Act::Ok
            }
        },
        |_, _| false,
        |_| false,
    )
    .await;
    let batch = vec!["poison".to_string(), "fine".to_string()];
    let r = supervisor
        .embed(batch.clone(), false, DEADLINE)
        .await
        .unwrap();
    assert_eq!((r.vectors.len(), r.failed.len()), (1, 1));
    let first = crashes.load(Ordering::SeqCst);
    assert!(first > 0);
    // In another batch, later: answered at once, no instance crashes.
    let r = supervisor
        .embed(vec!["other".into(), "poison".into()], false, DEADLINE)
        .await
        .unwrap();
    assert_eq!((r.vectors.len(), r.failed.len()), (1, 1));
    assert_eq!(r.failed[0].index, 1);
    assert!(
        r.failed[0].reason.contains("known poison"),
        "{:?}",
        r.failed
    );
    assert_eq!(crashes.load(Ordering::SeqCst), first);
}

#[tokio::test(start_paused = true)]
async fn poison_texts_close_together_do_not_escalate_a_pool_of_one_under_the_defaults() {
    // The shipped policy, poison included.
    let c = shipped(1);
    let (supervisor, _) = supervise(
        c,
        |_, _, t| {
            if t.starts_with("poison") {
                Act::Crash
            } else {
                Act::Ok
            }
        },
        |_, _| false,
        |_| false,
    )
    .await;
    // Five batches, each with a different poison text, back to back.
    for n in 0..5 {
        // (A scripted worker decides a batch by its first text.)
        let batch = vec![
            format!("poison {n}"),
            format!("fine {n}"),
            format!("also fine {n}"),
        ];
        let r = supervisor.embed(batch, false, DEADLINE).await.unwrap();
        assert_eq!((r.vectors.len(), r.failed.len()), (2, 1), "batch {n}");
    }
    assert!(supervisor.escalated().is_none());
}

#[tokio::test(start_paused = true)]
async fn a_plugin_that_crashes_on_every_text_still_escalates() {
    let c = shipped(1);
    let (supervisor, _) = supervise(c, |_, _, _| Act::Crash, |_, _| false, |_| false).await;
    let texts: Vec<String> = (0..64).map(|i| format!("text {i}")).collect();
    let err = supervisor.embed(texts, false, DEADLINE).await.unwrap_err();
    assert!(matches!(err, SupervisorError::Unavailable { .. }), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_wrong_row_count_or_a_nan_is_caught_for_every_backend() {
    // A worker that drops a row, or returns a NaN for one text.
    struct Liar(&'static str);
    impl Worker for Liar {
        fn embed(
            &mut self,
            texts: Vec<String>,
            _: bool,
            _: Duration,
        ) -> BoxFuture<Result<Vectors, CallError>> {
            let lie = self.0;
            Box::pin(async move {
                let mut data: Vec<f32> = texts.iter().flat_map(|t| vector_of(t)).collect();
                match lie {
                    "short" => data.truncate(data.len() - 2),
                    _ => {
                        if let Some(i) = texts.iter().position(|t| t == "nan") {
                            data[i * 2] = f32::NAN;
                        }
                    }
                }
                Ok(Vectors::new(2, data).unwrap())
            })
        }
        fn health(&mut self, _: Duration) -> BoxFuture<Result<Health, CallError>> {
            Box::pin(async { Ok(Health::default()) })
        }
        fn stop(self: Box<Self>) -> BoxFuture<()> {
            Box::pin(async {})
        }
    }
    for lie in ["short", "nan"] {
        let supervisor = Supervisor::from_fn(
            move |_, _| {
                Box::pin(async move { Ok((Box::new(Liar(lie)) as Box<dyn Worker>, info())) })
            },
            config(1),
        )
        .await
        .unwrap();
        let texts = vec!["a".to_string(), "nan".to_string(), "c".to_string()];
        let r = supervisor.embed(texts, false, DEADLINE).await;
        match lie {
            "short" => {
                let err = r.unwrap_err();
                assert!(err.to_string().contains("2 vectors for 3 texts"), "{err}");
            }
            _ => {
                let r = r.unwrap();
                assert_eq!((r.vectors.len(), r.failed.len()), (2, 1));
                assert_eq!(r.failed[0].index, 1);
                assert!(r.failed[0].reason.contains("NaN"), "{:?}", r.failed);
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn an_instance_of_another_model_is_refused() {
    let supervisor = Supervisor::from_fn(
        |_, incarnation| {
            Box::pin(async move {
                let mut model = info();
                if incarnation > 1 {
                    model.dimension = 3;
                }
                let worker = Scripted {
                    slot: 0,
                    incarnation,
                    script: Arc::new(|_, inc, _| if inc == 1 { Act::Crash } else { Act::Ok }),
                    processed: 0,
                    health_hangs: false,
                };
                Ok((Box::new(worker) as Box<dyn Worker>, model))
            })
        },
        config(1),
    )
    .await
    .unwrap();
    let err = supervisor
        .embed(one("x"), false, DEADLINE)
        .await
        .unwrap_err();
    let status = &supervisor.status()[0];
    assert!(
        status.restarts.get("init_failed").is_some_and(|n| *n >= 3),
        "{status:?} {err}"
    );
    assert!(
        supervisor
            .escalated()
            .is_some_and(|why| why.contains("but the pool serves")),
        "{err}"
    );
}

#[tokio::test(start_paused = true)]
async fn health_failures_spaced_wider_than_the_window_still_escalate() {
    // Every incarnation's health check hangs: one failure every 15 s
    // (interval 10 s + timeout 5 s), three times the 5 s window, so the
    // window never holds two. Before, such a slot restarted forever.
    let c = shipped(1);
    let (supervisor, starts) = supervise(c, |_, _, _| Act::Ok, |_, _| false, |_| true).await;
    let bound = u64::from(embedhost::limits::DEFAULT_MAX_UNPROVEN_FAILURES) + 1;
    // Failure k comes at 15k s (each restart is immediate: the window is
    // empty again); the last one escalates, and the pool is down for the
    // first cooldown (1 s) before it restarts.
    tokio::time::sleep(Duration::from_millis(15_000 * bound + 500)).await;
    let why = supervisor.escalated().expect("escalated");
    assert!(why.contains("in a row without serving"), "{why}");
    assert_eq!(
        supervisor.restarts().get("health_timeout"),
        Some(&bound),
        "{:?}",
        supervisor.restarts()
    );
    assert!(starts.lock().unwrap().len() as u64 >= bound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_indexer_waits_out_an_escalation_and_loses_nothing() {
    // Incarnation 1 crashes on its first call; 2 to 4 fail to start: the
    // pool escalates while the indexer's first batch is in flight, cools
    // down, and restarts with instances that behave.
    let (supervisor, _) = supervise(
        config(1),
        |_, inc, _| if inc == 1 { Act::Crash } else { Act::Ok },
        |_, inc| (2..=4).contains(&inc),
        |_| false,
    )
    .await;
    let worker = worker_over(&supervisor, embedhost::worker::WorkerSettings::default());
    let root = tempfile::tempdir().unwrap();
    let docs = root.path().join("docs");
    for i in 0..20 {
        crate::worker::write(&docs.join(format!("{i}.txt")), &format!("note number {i}"));
    }
    worker.init(&root.path().join("db")).await.unwrap();
    worker.index(vec![docs]).await.unwrap();
    let stats = crate::worker::settled_within(&worker, Duration::from_secs(60)).await;
    assert!(
        stats.failures.is_empty(),
        "nothing marked failed: {stats:?}"
    );
    assert_eq!(stats.indexed, 20, "{stats:?}");
    let restarts = supervisor.restarts();
    assert_eq!(
        restarts.get("init_failed"),
        Some(&3),
        "it escalated: {restarts:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_stops_slots_in_reverse_order_each_within_its_timeout() {
    // Workers that record their stop; slot 1's stop hangs.
    struct Recorded(usize, Arc<Mutex<Vec<usize>>>);
    impl Worker for Recorded {
        fn embed(
            &mut self,
            texts: Vec<String>,
            _: bool,
            _: Duration,
        ) -> BoxFuture<Result<Vectors, CallError>> {
            Box::pin(async move {
                Ok(Vectors::new(2, texts.iter().flat_map(|t| vector_of(t)).collect()).unwrap())
            })
        }
        fn health(&mut self, _: Duration) -> BoxFuture<Result<Health, CallError>> {
            Box::pin(async { Ok(Health::default()) })
        }
        fn stop(self: Box<Self>) -> BoxFuture<()> {
            Box::pin(async move {
                self.1.lock().unwrap().push(self.0);
                if self.0 == 1 {
                    std::future::pending::<()>().await;
                }
            })
        }
    }
    let stopped = Arc::new(Mutex::new(Vec::new()));
    let log = stopped.clone();
    let supervisor = Supervisor::from_fn(
        move |slot, _| {
            let log = log.clone();
            Box::pin(async move { Ok((Box::new(Recorded(slot, log)) as Box<dyn Worker>, info())) })
        },
        config(3),
    )
    .await
    .unwrap();
    while !supervisor.status().iter().all(|s| s.up) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let t0 = Instant::now();
    supervisor.shutdown().await;
    assert_eq!(*stopped.lock().unwrap(), [2, 1, 0]);
    // The hung stop cost its slot's timeout, no more.
    assert_eq!(t0.elapsed(), embedhost::limits::SHUTDOWN_SLOT_TIMEOUT);
    let err = supervisor
        .embed(one("x"), false, DEADLINE)
        .await
        .unwrap_err();
    assert!(matches!(err, SupervisorError::Escalated(_)), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_batch_is_cut_across_the_pool_and_gathered_in_order() {
    // Each call takes 100 ms: cut in two on a pool of two, 8 texts take
    // one call's time, not two.
    let calls = Arc::new(AtomicU64::new(0));
    let counted = calls.clone();
    let (supervisor, _) = supervise(
        config(2),
        move |_, _, _| {
            counted.fetch_add(1, Ordering::SeqCst);
            Act::Sleep(Duration::from_millis(100))
        },
        |_, _| false,
        |_| false,
    )
    .await;
    let texts: Vec<String> = (0..8).map(|i| "x".repeat(i + 1)).collect();
    // With one instance busy, a batch stays whole for the other.
    let busy = {
        let s = supervisor.clone();
        tokio::spawn(async move { s.embed(one("busy"), false, DEADLINE).await })
    };
    tokio::time::sleep(Duration::from_millis(1)).await;
    supervisor
        .embed(texts.clone(), false, DEADLINE)
        .await
        .unwrap();
    busy.await.unwrap().unwrap();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the busy call and one whole batch"
    );
    calls.store(0, Ordering::SeqCst);
    let t0 = Instant::now();
    let batch = supervisor
        .embed(texts.clone(), false, DEADLINE)
        .await
        .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert!(
        t0.elapsed() < Duration::from_millis(150),
        "{:?}",
        t0.elapsed()
    );
    let expected: Vec<[f32; 2]> = texts.iter().map(|t| vector_of(t)).collect();
    let got: Vec<[f32; 2]> = batch.vectors.iter().map(|v| [v[0], v[1]]).collect();
    assert_eq!(got, expected);
    // Fewer texts than two parts' worth stay in one call.
    calls.store(0, Ordering::SeqCst);
    supervisor
        .embed(texts[..5].to_vec(), false, DEADLINE)
        .await
        .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[test]
fn the_batcher_cuts_requests_by_the_token_budget() {
    use embedhost::embedder::batcher::pieces;
    assert_eq!(pieces(&[5, 5, 5, 20, 1], 10), vec![0..2, 2..3, 3..4, 4..5]);
    assert_eq!(pieces(&[3; 4], 100), vec![0..4]);
    assert!(pieces(&[], 10).is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_batcher_merges_requests_within_its_wait_and_not_after() {
    use embedhost::embedder::batcher::{BatchSettings, Batcher};
    let calls = Arc::new(Mutex::new(Vec::new()));
    let log = calls.clone();
    let (supervisor, _) = supervise(
        config(1),
        move |_, _, first| {
            log.lock().unwrap().push(first.to_string());
            if first == "busy" {
                Act::Sleep(Duration::from_millis(20))
            } else {
                Act::Ok
            }
        },
        |_, _| false,
        |_| false,
    )
    .await;
    let batcher = Arc::new(Batcher::start(
        supervisor,
        BatchSettings {
            max_batch_tokens: 100,
            wait: Duration::from_millis(10),
            lanes: 2,
            model: "stub".into(),
        },
    ));
    let until = Instant::now() + DEADLINE;
    let send = |text: &'static str, after: Duration| {
        let b = batcher.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            b.embed(vec![text.into()], &[1], false, until)
                .await
                .unwrap()
        })
    };
    // The instance is busy for 20 ms: a and bb, 4 ms apart, wait for it
    // together and share a batch. ccc comes when the instance is free and
    // goes at once, alone.
    let t0 = Instant::now();
    let (busy, a, b, c) = (
        send("busy", Duration::ZERO),
        send("a", Duration::from_millis(1)),
        send("bb", Duration::from_millis(5)),
        send("ccc", Duration::from_millis(50)),
    );
    busy.await.unwrap();
    let rows = [a.await.unwrap(), b.await.unwrap()];
    let answered = Instant::now();
    let rows = [rows[0].clone(), rows[1].clone(), c.await.unwrap()];
    assert!(
        answered - t0 < Duration::from_millis(25),
        "{:?}",
        answered - t0
    );
    assert_eq!(t0.elapsed(), Duration::from_millis(50), "ccc waited");
    assert_eq!(
        *calls.lock().unwrap(),
        vec!["busy".to_string(), "a".to_string(), "ccc".to_string()]
    );
    // Each request got its own row back.
    for (row, len) in rows.iter().zip([1.0, 2.0, 3.0]) {
        assert_eq!(row.len(), 1);
        assert_eq!(row[0].as_ref().unwrap()[0], len);
    }
    // A request over the budget is ordered longest first, cut into
    // pieces by tokens (60 | 60 30 | 20 10 5), and gathered back in the
    // caller's order.
    let texts: Vec<String> = (0..6).map(|i| "y".repeat(i + 1)).collect();
    let tokens = [10, 60, 20, 60, 5, 30];
    let rows = batcher.embed(texts, &tokens, false, until).await.unwrap();
    let lens: Vec<f32> = rows.iter().map(|r| r.as_ref().unwrap()[0]).collect();
    assert_eq!(lens, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    assert_eq!(
        calls.lock().unwrap()[3..],
        ["yy".to_string(), "yyyy".to_string(), "yyy".to_string()],
        "each piece starts with its longest text, the longest piece first"
    );
    batcher.close().await;
    let closed = batcher.embed(vec!["z".into()], &[1], false, until).await;
    assert!(matches!(
        closed,
        Err(embedhost::embedder::EmbedError::Stopped)
    ));
}

#[tokio::test(start_paused = true)]
async fn a_steady_two_percent_crash_rate_under_load_never_escalates_under_the_shipped_policy() {
    // 5,000 calls back to back (all within a few seconds of the clock),
    // each crashing with probability 2% (seeded): about 100 crashes, many
    // times MaxR = 3 within 5 s, yet a working pool. No call may fail.
    let seed = SEED;
    let rng = Arc::new(Mutex::new(fastrand::Rng::with_seed(seed)));
    let draw = rng.clone();
    let c = shipped(1);
    let (supervisor, starts) = supervise(
        c,
        move |_, _, _| {
            if draw.lock().unwrap().u32(0..100) < 2 {
                Act::Crash
            } else {
                Act::Ok
            }
        },
        |_, _| false,
        |_| false,
    )
    .await;
    for i in 0..5000 {
        let text = format!("text {i}");
        let batch = supervisor.embed(one(&text), false, DEADLINE).await;
        let batch = batch.unwrap_or_else(|e| panic!("call {i}: {e} (seed {seed})"));
        assert_eq!(batch.vectors.len(), 1, "{text} (seed {seed})");
    }
    assert!(supervisor.escalated().is_none(), "seed {seed}");
    let restarts = starts.lock().unwrap().len();
    assert!(
        (50..200).contains(&restarts),
        "{restarts} starts (seed {seed})"
    );
}

#[tokio::test(start_paused = true)]
async fn a_crash_loop_that_answers_every_other_call_is_stopped_with_growing_delays() {
    // Each incarnation answers one call and crashes on the next: "has
    // answered" is true of every incarnation, but the rate is 50%.
    let calls = Arc::new(AtomicU64::new(0));
    let counted = calls.clone();
    let c = shipped(1);
    let (supervisor, starts) = supervise(
        c.clone(),
        move |_, _, _| {
            if counted.fetch_add(1, Ordering::SeqCst) % 2 == 1 {
                Act::Crash
            } else {
                Act::Ok
            }
        },
        |_, _| false,
        |_| false,
    )
    .await;
    let mut stopped = None;
    for i in 0..1000 {
        match supervisor
            .embed(one(&format!("text {i}")), false, DEADLINE)
            .await
        {
            Ok(_) => {}
            Err(e) => {
                stopped = Some(e);
                break;
            }
        }
    }
    let err = stopped.expect("the crash loop was never stopped");
    assert!(matches!(err, SupervisorError::Unavailable { .. }), "{err}");
    let starts = starts.lock().unwrap();
    // Bounded: the rate's one free crash, then MaxR restarts within the
    // window, then escalation.
    assert!(
        starts.len() <= 8,
        "{} starts before escalation",
        starts.len()
    );
    // The counted restarts wait, longer each time.
    let gaps: Vec<Duration> = starts.windows(2).map(|p| p[1].2 - p[0].2).collect();
    let waited: Vec<&Duration> = gaps.iter().filter(|g| !g.is_zero()).collect();
    assert!(waited.len() >= 2, "{gaps:?} (seed {SEED})");
    assert!(
        waited.windows(2).all(|w| w[1] > w[0]),
        "delays grow: {gaps:?} (seed {SEED})"
    );
    assert!(
        *waited[0] >= c.intensity.backoff_min / 2,
        "{gaps:?} (seed {SEED})"
    );
}

#[tokio::test(start_paused = true)]
async fn a_six_second_storm_mid_index_marks_no_file_and_leaves_every_file_indexed() {
    // The shipped policy and worker settings, but one chunk per batch (the
    // case that lost files): after 20 calls, every call crashes for 6 s of
    // the clock, then the plugin behaves again.
    let calls = Arc::new(AtomicU64::new(0));
    let storm: Arc<Mutex<Option<Instant>>> = Arc::default();
    let (counted, began) = (calls.clone(), storm.clone());
    let c = shipped(2);
    let (supervisor, _) = supervise(
        c,
        move |_, _, _| {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            let mut began = began.lock().unwrap();
            if n == 20 {
                *began = Some(Instant::now());
            }
            match *began {
                Some(t) if Instant::now() < t + Duration::from_secs(6) => Act::Crash,
                _ => Act::Ok,
            }
        },
        |_, _| false,
        |_| false,
    )
    .await;
    let settings = embedhost::worker::WorkerSettings {
        batch_chunks: 1,
        ..embedhost::worker::WorkerSettings::default()
    };
    let worker = worker_over(&supervisor, settings);
    let root = tempfile::tempdir().unwrap();
    let docs = root.path().join("docs");
    for i in 0..80 {
        crate::worker::write(&docs.join(format!("{i}.txt")), &format!("note number {i}"));
    }
    worker.init(&root.path().join("db")).await.unwrap();
    worker.index(vec![docs.clone()]).await.unwrap();
    let first = crate::worker::settled_within(&worker, Duration::from_secs(120)).await;
    assert!(storm.lock().unwrap().is_some(), "the storm happened");
    // One more run, with the plugin behaving: every file is indexed, and
    // none was ever taken for poison.
    worker.index(vec![docs]).await.unwrap();
    let stats = crate::worker::settled_within(&worker, Duration::from_secs(120)).await;
    assert_eq!(stats.indexed, 80, "first run {first:?}, second {stats:?}");
    assert!(
        stats.failures.is_empty(),
        "first run {first:?}, second {stats:?}"
    );
    assert!(
        first.failures.is_empty(),
        "a storm marks no file as failed: {first:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_file_the_embedder_failed_is_tried_again_by_the_next_runs_a_bounded_number_of_times() {
    let c = shipped(1);
    let (supervisor, _) = supervise(
        c,
        |_, _, t| {
            if t.contains("poison") {
                Act::Crash
            } else {
                Act::Ok
            }
        },
        |_, _| false,
        |_| false,
    )
    .await;
    let worker = worker_over(
        &supervisor,
        embedhost::worker::WorkerSettings {
            // (A scripted worker decides a batch by its first text.)
            batch_chunks: 1,
            ..embedhost::worker::WorkerSettings::default()
        },
    );
    let root = tempfile::tempdir().unwrap();
    let docs = root.path().join("docs");
    crate::worker::write(&docs.join("fine.txt"), "a fine note");
    crate::worker::write(&docs.join("bad.txt"), "poison");
    let db = root.path().join("db");
    worker.init(&db).await.unwrap();
    let max = embedhost::limits::MAX_EMBED_ATTEMPTS;
    for run in 1..=max + 1 {
        let queued = worker.index(vec![docs.clone()]).await.unwrap();
        let stats = crate::worker::settled_within(&worker, Duration::from_secs(120)).await;
        assert_eq!(stats.indexed, 1, "run {run}: {stats:?}");
        assert_eq!(
            stats.failures.get("embed_failed"),
            Some(&1),
            "run {run}: {stats:?}"
        );
        // The first run queues both; each next one retries the failed file,
        // until it has failed `max` runs in a row.
        let expected = match run {
            1 => 2,
            r if r <= max => 1,
            _ => 0,
        };
        assert_eq!(queued, expected, "run {run}");
    }
    let store = embedhost::worker::store::Store::open_existing(&db).unwrap();
    let skipped = store.skipped().unwrap();
    assert_eq!(skipped.len(), 1);
    assert_eq!(
        (skipped[0].reason.as_str(), skipped[0].attempts),
        ("embed_failed", max)
    );
    assert!(skipped[0].detail.contains("crashed"), "{:?}", skipped[0]);
}
