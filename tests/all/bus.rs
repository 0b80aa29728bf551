//! The bus on tokio's paused clock: timeouts, retries, deadlines,
//! cancellation, overload, middleware, and the mock transport.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use embedhost::bus::transport::{InProcess, MockReply, MockTransport};
use embedhost::bus::{
    Bus, BusConfig, BusError, Empty, ErrorCode, RemoteError, Router, SendOptions, TraceContext,
};
use embedhost::messages::*;
use embedhost::vectors::Vectors;
use tokio::time::Instant;

fn gone() -> BusError {
    BusError::PeerGone {
        peer: "mock".into(),
        reason: "test".into(),
    }
}

fn embed_request() -> EmbedRequest {
    EmbedRequest {
        texts: vec!["a".into()],
        is_query: false,
    }
}

fn embed_response() -> EmbedResponse {
    EmbedResponse::complete(Vectors::new(2, vec![1.0, 0.0]).unwrap())
}

#[tokio::test(start_paused = true)]
async fn a_request_without_answer_times_out_at_its_timeout() {
    let mock = MockTransport::new();
    mock.on::<EmbedderEmbed>(|_, _| MockReply::Hang);
    let bus = Bus::new(mock.clone());
    let start = Instant::now();
    let err = bus
        .send::<EmbedderEmbed>(
            embed_request(),
            SendOptions::default().timeout(Duration::from_secs(3)),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, BusError::Timeout { message: "embedder.embed", after } if after == Duration::from_secs(3)),
        "{err}"
    );
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    // The caller gave up, so the mock saw the request cancelled.
    assert_eq!(mock.cancelled().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_default_timeout_is_the_seeds_30_seconds() {
    let mock = MockTransport::new();
    mock.on::<EmbedderHealth>(|_, _| MockReply::Hang);
    let start = Instant::now();
    let err = Bus::new(mock)
        .request::<EmbedderHealth>(Empty {})
        .await
        .unwrap_err();
    assert!(matches!(err, BusError::Timeout { .. }));
    assert_eq!(start.elapsed(), Duration::from_secs(30));
}

#[tokio::test(start_paused = true)]
async fn retries_back_off_exponentially_then_succeed() {
    let mock = MockTransport::new();
    mock.on::<EmbedderEmbed>(|_, n| {
        if n <= 3 {
            MockReply::Fail(gone())
        } else {
            MockReply::ok::<EmbedderEmbed>(embed_response())
        }
    });
    let bus = Bus::new(mock.clone());
    let start = Instant::now();
    let options = SendOptions::default()
        .retries(5)
        .backoff(Duration::from_millis(100), Duration::from_secs(5))
        .jitter(false);
    let response = bus
        .send::<EmbedderEmbed>(embed_request(), options)
        .await
        .unwrap();
    assert_eq!(response, embed_response());
    // 100 + 200 + 400 ms between the four attempts (tokio's timer rounds
    // each sleep up to its next millisecond).
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(700) && elapsed <= Duration::from_millis(704),
        "{elapsed:?}"
    );
    let sent = mock.sent();
    assert_eq!(sent.len(), 4);
    // Every attempt has its own id, and all share one trace.
    let mut ids: Vec<_> = sent.iter().map(|s| s.id).collect();
    ids.dedup();
    assert_eq!(ids.len(), 4);
    assert!(
        sent.iter()
            .all(|s| s.trace.trace_id == sent[0].trace.trace_id)
    );
    assert_eq!(mock.requests::<EmbedderEmbed>(), vec![embed_request(); 4]);
}

#[tokio::test(start_paused = true)]
async fn jittered_delays_stay_within_their_bands() {
    for _ in 0..20 {
        let mock = MockTransport::new();
        let times = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = times.clone();
        mock.on::<EmbedderHealth>(move |_, _| {
            seen.lock().unwrap().push(Instant::now());
            MockReply::Fail(BusError::PeerGone {
                peer: "mock".into(),
                reason: "x".into(),
            })
        });
        let options = SendOptions::default()
            .retries(4)
            .backoff(Duration::from_millis(100), Duration::from_millis(500));
        let err = Bus::new(mock)
            .send::<EmbedderHealth>(Empty {}, options)
            .await
            .unwrap_err();
        assert!(matches!(err, BusError::PeerGone { .. }));
        let times = times.lock().unwrap();
        assert_eq!(times.len(), 5);
        // Delay n is drawn from [d, 2d), d = 100, 200, 400, then capped at
        // 500; tokio's timer rounds a sleep up to its next millisecond.
        let bands = [(100, 200), (200, 400), (400, 800), (500, 1000)];
        for (pair, (lo, hi)) in times.windows(2).zip(bands) {
            let gap = pair[1] - pair[0];
            assert!(
                gap >= Duration::from_millis(lo) && gap <= Duration::from_millis(hi + 1),
                "{gap:?} not in [{lo}, {hi}] ms"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn the_deadline_bounds_all_attempts_together() {
    let mock = MockTransport::new();
    mock.on::<EmbedderEmbed>(|_, _| MockReply::Hang);
    let start = Instant::now();
    let options = SendOptions::default()
        .timeout(Duration::from_secs(1))
        .retries(100)
        .deadline(Duration::from_millis(2500))
        .backoff(Duration::from_millis(100), Duration::from_millis(100))
        .jitter(false);
    let err = Bus::new(mock.clone())
        .send::<EmbedderEmbed>(embed_request(), options)
        .await
        .unwrap_err();
    assert!(
        matches!(err, BusError::DeadlineExceeded { attempts: 3, .. }),
        "{err}"
    );
    // 1 s + 0.1 s + 1 s + 0.1 s, then the third attempt gets only the 0.3 s left.
    assert_eq!(start.elapsed(), Duration::from_millis(2500));
    let deadlines: Vec<_> = mock.sent().iter().map(|s| s.deadline.unwrap()).collect();
    assert_eq!(
        deadlines,
        vec![
            Duration::from_secs(1),
            Duration::from_secs(1),
            Duration::from_millis(300)
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn no_retry_when_the_backoff_would_overrun_the_deadline() {
    let mock = MockTransport::new();
    mock.on::<EmbedderEmbed>(|_, _| {
        MockReply::Fail(BusError::PeerGone {
            peer: "mock".into(),
            reason: "x".into(),
        })
    });
    let options = SendOptions::default()
        .retries(5)
        .deadline(Duration::from_millis(50))
        .backoff(Duration::from_millis(100), Duration::from_secs(1));
    let err = Bus::new(mock.clone())
        .send::<EmbedderEmbed>(embed_request(), options)
        .await
        .unwrap_err();
    match err {
        BusError::DeadlineExceeded {
            attempts: 1,
            last_error: Some(last),
            ..
        } => {
            assert!(matches!(*last, BusError::PeerGone { .. }))
        }
        other => panic!("unexpected {other}"),
    }
    assert_eq!(mock.sent().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn non_idempotent_messages_and_permanent_errors_are_not_retried() {
    let mock = MockTransport::new();
    mock.on::<Shutdown>(|_, _| {
        MockReply::Fail(BusError::PeerGone {
            peer: "mock".into(),
            reason: "x".into(),
        })
    });
    mock.on::<EmbedderEmbed>(|_, _| {
        MockReply::Fail(RemoteError::invalid_input(3, "bad text").into())
    });
    let bus = Bus::new(mock.clone());
    let err = bus
        .send::<Shutdown>(
            ShutdownRequest::default(),
            SendOptions::default().retries(3),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, BusError::PeerGone { .. }));
    let err = bus
        .send::<EmbedderEmbed>(embed_request(), SendOptions::default().retries(3))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            BusError::Remote(RemoteError {
                code: ErrorCode::InvalidInput,
                index: Some(3),
                ..
            })
        ),
        "{err}"
    );
    assert_eq!(mock.sent().len(), 2, "each was sent once");
}

#[tokio::test(start_paused = true)]
async fn an_unavailable_peer_is_retried_for_idempotent_messages() {
    let mock = MockTransport::new();
    mock.on::<EmbedderEmbed>(|_, n| match n {
        1 => MockReply::Fail(RemoteError::new(ErrorCode::Unavailable, "instance crashed").into()),
        _ => MockReply::ok::<EmbedderEmbed>(embed_response()),
    });
    let r = Bus::new(mock.clone())
        .send::<EmbedderEmbed>(embed_request(), SendOptions::default().retries(1))
        .await;
    assert_eq!(r.unwrap(), embed_response());
    assert_eq!(mock.sent().len(), 2);
}

/// A handler that never finishes and records when its future is dropped.
fn hanging_router(started: Arc<AtomicU32>, dropped: Arc<AtomicBool>) -> Router {
    let mut router = Router::new();
    router.handle::<EmbedderEmbed, _, _>(move |_, _| {
        let dropped = dropped.clone();
        started.fetch_add(1, Ordering::SeqCst);
        async move {
            let _guard = crate::DropFlag(dropped);
            std::future::pending::<Result<EmbedResponse, RemoteError>>().await
        }
    });
    router
}

#[tokio::test(start_paused = true)]
async fn dropping_the_callers_future_cancels_the_handler_in_process() {
    let (started, dropped) = (
        Arc::new(AtomicU32::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let bus = Bus::new(InProcess::new(hanging_router(
        started.clone(),
        dropped.clone(),
    )));
    let call = tokio::spawn({
        let bus = bus.clone();
        async move { bus.request::<EmbedderEmbed>(embed_request()).await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(started.load(Ordering::SeqCst), 1);
    assert!(!dropped.load(Ordering::SeqCst));
    call.abort();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(
        dropped.load(Ordering::SeqCst),
        "the handler's future was dropped at the peer"
    );
}

#[tokio::test(start_paused = true)]
async fn the_peer_enforces_the_remaining_deadline() {
    let mut router = Router::new();
    router.handle::<EmbedderHealth, _, _>(|ctx, _| async move {
        assert_eq!(ctx.deadline, Some(Duration::from_secs(2)));
        tokio::time::sleep(Duration::from_secs(10)).await;
        Ok(HealthResponse {
            memory: 0,
            processed_count: 0,
        })
    });
    // A request from another process arrives with the time its caller left;
    // dispatch enforces it.
    let envelope = embedhost::bus::Envelope {
        id: embedhost::bus::RequestId::next(),
        message: "embedder.health".into(),
        deadline: Some(Duration::from_secs(2)),
        trace: TraceContext::current_or_new(),
        body: embedhost::bus::Body::local(Empty {}),
    };
    let start = Instant::now();
    let err = router.dispatch(envelope).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::DeadlineExceeded, "{err}");
    assert_eq!(start.elapsed(), Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn past_the_in_flight_limit_callers_get_overloaded_at_once() {
    let (started, dropped) = (
        Arc::new(AtomicU32::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let bus = Bus::with_config(
        InProcess::named("slow", hanging_router(started.clone(), dropped)),
        BusConfig { max_in_flight: 2 },
    );
    let a = tokio::spawn({
        let bus = bus.clone();
        async move { bus.request::<EmbedderEmbed>(embed_request()).await }
    });
    let b = tokio::spawn({
        let bus = bus.clone();
        async move { bus.request::<EmbedderEmbed>(embed_request()).await }
    });
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(started.load(Ordering::SeqCst), 2);
    let start = Instant::now();
    let err = bus
        .request::<EmbedderEmbed>(embed_request())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, BusError::Overloaded { limit: 2, peer } if peer == "slow"),
        "{err}"
    );
    assert_eq!(start.elapsed(), Duration::ZERO, "no queueing");
    assert_eq!(
        started.load(Ordering::SeqCst),
        2,
        "the shed request never reached the peer"
    );
    // Capacity comes back when a request ends.
    a.abort();
    tokio::time::sleep(Duration::from_millis(1)).await;
    let c = tokio::spawn({
        let bus = bus.clone();
        async move { bus.request::<EmbedderEmbed>(embed_request()).await }
    });
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(started.load(Ordering::SeqCst), 3);
    b.abort();
    c.abort();
}

#[tokio::test]
async fn handlers_see_the_callers_trace_and_nested_requests_join_it() {
    let inner_trace = Arc::new(std::sync::Mutex::new(None));
    let mut inner = Router::new();
    let seen = inner_trace.clone();
    inner.handle::<EmbedderHealth, _, _>(move |ctx, _| {
        *seen.lock().unwrap() = Some(ctx.trace.trace_id);
        async {
            Ok(HealthResponse {
                memory: 1,
                processed_count: 2,
            })
        }
    });
    let inner_bus = Bus::new(InProcess::new(inner));
    let mut outer = Router::new();
    outer.handle::<WorkerStats, _, _>(move |_, _| {
        let inner_bus = inner_bus.clone();
        async move {
            let health = inner_bus
                .request::<EmbedderHealth>(Empty {})
                .await
                .map_err(|e| RemoteError::new(ErrorCode::Internal, e.to_string()))?;
            Ok(StatsResponse {
                indexed: health.processed_count,
                ..StatsResponse::default()
            })
        }
    });
    let trace = TraceContext {
        trace_id: 42,
        parent_span: 1,
    };
    let stats = trace
        .scope(Bus::new(InProcess::new(outer)).request::<WorkerStats>(Empty {}))
        .await
        .unwrap();
    assert_eq!(stats.indexed, 2);
    assert_eq!(*inner_trace.lock().unwrap(), Some(42));
}

#[test]
fn middleware_records_requests_outcomes_and_in_flight() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let mock = MockTransport::new();
            mock.on::<EmbedderHealth>(|_, n| match n {
                1 => MockReply::ok::<EmbedderHealth>(HealthResponse {
                    memory: 0,
                    processed_count: 0,
                }),
                _ => MockReply::Hang,
            });
            let bus = Bus::new(mock);
            bus.request::<EmbedderHealth>(Empty {}).await.unwrap();
            let _ = bus
                .send::<EmbedderHealth>(
                    Empty {},
                    SendOptions::default().timeout(Duration::from_secs(1)),
                )
                .await;
        });
    });
    let snapshot = snapshotter.snapshot().into_vec();
    let find = |name: &str, outcome: Option<&str>| {
        snapshot.iter().find(|(key, ..)| {
            let key = key.key();
            key.name() == name
                && key
                    .labels()
                    .any(|l| l.key() == "message" && l.value() == "embedder.health")
                && outcome
                    .is_none_or(|o| key.labels().any(|l| l.key() == "outcome" && l.value() == o))
        })
    };
    assert!(matches!(
        find("bus_requests_total", Some("ok")),
        Some((_, _, _, DebugValue::Counter(1)))
    ));
    // The timed-out request was dropped by `send`: counted as cancelled, and
    // the in-flight gauge is back to zero.
    assert!(matches!(
        find("bus_requests_total", Some("cancelled")),
        Some((_, _, _, DebugValue::Counter(1)))
    ));
    assert!(
        matches!(find("bus_requests_in_flight", None), Some((_, _, _, DebugValue::Gauge(g))) if g.into_inner() == 0.0)
    );
    assert!(
        matches!(find("bus_request_duration_seconds", None), Some((_, _, _, DebugValue::Histogram(h))) if h.len() == 2)
    );
}

#[tokio::test]
async fn a_response_of_the_wrong_type_is_a_decode_error_not_a_panic() {
    let mock = MockTransport::new();
    mock.on::<EmbedderHealth>(|_, _| {
        MockReply::Respond(embedhost::bus::Body::local(
            "not a health report".to_string(),
        ))
    });
    let err = Bus::new(mock)
        .request::<EmbedderHealth>(Empty {})
        .await
        .unwrap_err();
    assert!(
        matches!(&err, BusError::Decode { what, .. } if what == "embedder.health"),
        "{err}"
    );
}

#[tokio::test]
async fn an_unknown_message_gets_a_no_handler_error() {
    let err = Bus::new(InProcess::new(Router::new()))
        .request::<ModelCheck>(Empty {})
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            BusError::Remote(RemoteError {
                code: ErrorCode::NoHandler,
                ..
            })
        ),
        "{err}"
    );
    assert!(err.to_string().contains("model.check"));
}

#[tokio::test]
async fn a_closed_in_process_peer_is_gone() {
    let peer = InProcess::named("worker", Router::new());
    let bus = Bus::new(peer.clone());
    peer.close();
    let err = bus.request::<WorkerStats>(Empty {}).await.unwrap_err();
    assert!(
        matches!(&err, BusError::PeerGone { peer, .. } if peer == "worker"),
        "{err}"
    );
}

#[test]
fn the_catalogue_lists_every_message_the_source_defines_once_with_the_seeds_names() {
    // Every `message!` in messages.rs is in `ALL`, once: a message added
    // without its entry (which the checks that each is served rely on) or
    // an entry naming another's message fails here.
    let source = include_str!("../../host/src/messages.rs");
    let defined: Vec<&str> = source
        .split("message!(")
        .skip(1)
        .filter_map(|m| m.split('"').nth(1))
        .collect();
    assert!(defined.len() >= 9, "{defined:?}");
    let mut listed = ALL.to_vec();
    listed.sort_unstable();
    let mut sorted = defined.clone();
    sorted.sort_unstable();
    assert_eq!(listed, sorted, "messages.rs defines {defined:?}");
    listed.dedup();
    assert_eq!(listed.len(), ALL.len(), "a name listed twice: {ALL:?}");
    // The seed's verbs keep their names: peers written to the seed's
    // catalogue (another language's worker) reach them under these.
    for name in [
        "worker.init",
        "worker.search",
        "worker.index",
        "worker.stats",
        "embedder.embed",
        "embedder.health",
        "shutdown",
    ] {
        assert!(ALL.contains(&name), "{name} is missing from {ALL:?}");
    }
}
