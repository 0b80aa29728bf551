use super::*;

fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
    p.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn process_faults_are_taken_out_and_the_rest_left_for_the_engine() {
    let mut settings = pairs(&[
        ("dimension", "8"),
        ("child.exit_marker", "BYE"),
        ("child.exit_code", "7"),
        ("child.leak_mb_per_call", "2"),
    ]);
    let faults = ProcessFaults::take_from(&mut settings).unwrap();
    assert_eq!(settings, pairs(&[("dimension", "8")]));
    assert_eq!(faults.exit_marker.as_deref(), Some("BYE"));
    assert_eq!(faults.exit_code, 7);
    assert_eq!(faults.leak_mb_per_call, 2);
}

#[test]
fn an_unknown_or_malformed_process_fault_names_the_key() {
    let err = ProcessFaults::take_from(&mut pairs(&[("child.explode", "1")]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("child.explode"), "{err}");
    let err = ProcessFaults::take_from(&mut pairs(&[("child.exit_code", "x")]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("child.exit_code"), "{err}");
}

#[test]
fn malformed_fault_values_and_chaos_kinds_name_the_key() {
    for (key, value, words) in [
        ("child.ignore_sigterm", "maybe", "is not true or false"),
        ("child.chaos_seed", "-1", "is not a whole number"),
        (
            "child.chaos_kinds",
            "kill,explode",
            "`explode` is not one of kill, abort, exit, hang, leak",
        ),
    ] {
        let err = ProcessFaults::take_from(&mut pairs(&[(key, value)]))
            .unwrap_err()
            .to_string();
        assert!(err.contains(key) && err.contains(words), "{err}");
    }
    let faults = ProcessFaults::take_from(&mut pairs(&[(
        "child.chaos_kinds",
        " kill, abort ,exit,hang,leak",
    )]))
    .unwrap();
    assert_eq!(faults.chaos_kinds, ProcessChaos::ALL);
}

#[test]
fn unseeded_chaos_strikes_at_its_chance_with_one_of_its_kinds() {
    let certain = ProcessFaults::take_from(&mut pairs(&[
        ("child.chaos", "1"),
        ("child.chaos_kinds", "hang"),
    ]))
    .unwrap();
    assert_eq!(certain.chaos_seed, None);
    for _ in 0..20 {
        assert_eq!(certain.chaos(), Some(ProcessChaos::Hang));
    }
    let never = ProcessFaults {
        chaos_ppm: 0,
        ..certain
    };
    assert_eq!(never.chaos(), None);
}

/// An engine whose every batch goes wrong as `fail` says.
struct Broken {
    fail: fn() -> EngineError,
}

impl Engine for Broken {
    fn model_info(&self) -> ModelInfo {
        ModelInfo {
            model_id: crate::backend::ModelId::new("broken").unwrap(),
            dimension: 2,
            max_input_tokens: 8,
            normalized: true,
        }
    }

    fn embed(&mut self, _: &[String], _: bool) -> Result<Vectors, EngineError> {
        Err((self.fail)())
    }
}

fn bus(router: Router) -> crate::bus::Bus {
    crate::bus::Bus::new(crate::bus::transport::InProcess::new(router))
}

async fn embed(bus: &crate::bus::Bus) -> RemoteError {
    let request = EmbedRequest {
        texts: vec!["a".into(), "b".into()],
        is_query: false,
    };
    match bus
        .send::<EmbedderEmbed>(request, crate::bus::SendOptions::default())
        .await
    {
        Err(crate::bus::BusError::Remote(remote)) => remote,
        other => panic!("not a remote error: {other:?}"),
    }
}

#[tokio::test]
async fn an_engines_refusal_reaches_the_host_as_its_remote_error() {
    let refused = || EngineError::InvalidInput {
        index: 1,
        message: "too odd".into(),
    };
    let stop = CancellationToken::new();
    let router = engine_router(
        Box::new(Broken { fail: refused }),
        ProcessFaults::default(),
        stop,
    );
    let remote = embed(&bus(router)).await;
    assert_eq!(
        (remote.code, remote.index, remote.message.as_str()),
        (ErrorCode::InvalidInput, Some(1), "too odd")
    );
    let failed = || EngineError::Failed("out of ideas".into());
    let router = engine_router(
        Box::new(Broken { fail: failed }),
        ProcessFaults::default(),
        CancellationToken::new(),
    );
    let remote = embed(&bus(router)).await;
    assert_eq!(
        (remote.code, remote.message.as_str()),
        (ErrorCode::Failed, "out of ideas")
    );
}

#[tokio::test]
async fn an_engine_that_panics_is_reported_unavailable_and_health_still_answers() {
    let panics = || -> EngineError { panic!("the engine's own bug") };
    let router = engine_router(
        Box::new(Broken { fail: panics }),
        ProcessFaults::default(),
        CancellationToken::new(),
    );
    let bus = bus(router);
    let remote = embed(&bus).await;
    assert_eq!(remote.code, ErrorCode::Unavailable, "{remote}");
    assert!(remote.message.contains("the engine crashed"), "{remote}");
    // Its lock was poisoned by the panic; the child still serves.
    let health = bus
        .send::<EmbedderHealth>(Empty {}, crate::bus::SendOptions::default())
        .await
        .unwrap();
    assert_eq!(health.processed_count, 0, "a crashed batch is not counted");
}

#[tokio::test]
async fn a_child_whose_engine_cannot_start_fails_its_handshake_with_the_reason_and_still_stops() {
    let stop = CancellationToken::new();
    let bus = bus(failed_router(
        "no model at `/m/model.onnx`".into(),
        stop.clone(),
    ));
    match bus
        .send::<EmbedderHandshake>(Empty {}, crate::bus::SendOptions::default())
        .await
    {
        Err(crate::bus::BusError::Remote(remote)) => {
            assert_eq!(remote.code, ErrorCode::Failed);
            assert_eq!(remote.message, "no model at `/m/model.onnx`");
        }
        other => panic!("{other:?}"),
    }
    assert!(!stop.is_cancelled());
    let request = crate::messages::ShutdownRequest {
        reason: "test".into(),
    };
    bus.send::<Shutdown>(request, crate::bus::SendOptions::default())
        .await
        .unwrap();
    assert!(stop.is_cancelled());
}
