//! Unit tests of `instance.rs`.

use super::*;

/// The race of finding 10 of issue 26, made deterministic: a caller has
/// a place in the queue (a permit) when the thread ends and drains the
/// queue; the job it then sends lands in the drained queue, where its
/// reply is never sent nor dropped while the caller's handle lives.
#[tokio::test]
async fn a_job_sent_into_a_queue_drained_by_an_ended_thread_is_answered_gone() {
    let (jobs, queue) = mpsc::channel(JOB_QUEUE);
    let ended = CancellationToken::new();
    let embedder = WasmEmbedder {
        jobs,
        info: Arc::new(ModelInfo {
            model_id: crate::backend::ModelId::default(),
            dimension: 1,
            max_input_tokens: 1,
            normalized: false,
        }),
        name: Arc::from("test"),
        ended: ended.clone(),
    };
    let permit = embedder.jobs.reserve().await.unwrap();
    // The thread ends: its queue is dropped (closed, drained), then its
    // end is signalled.
    drop(queue);
    let (reply, answer) = oneshot::channel();
    permit.send(Job::Health {
        deadline: None,
        reply,
    });
    ended.cancel();
    let waited = tokio::time::timeout(Duration::from_secs(10), embedder.wait(answer)).await;
    assert!(
        matches!(waited, Ok(Err(WasmError::InstanceGone { .. }))),
        "the caller was never woken: {waited:?}"
    );
}

#[test]
fn an_embedder_shows_its_name_and_model_only() {
    let (jobs, _queue) = mpsc::channel(JOB_QUEUE);
    let embedder = WasmEmbedder {
        jobs,
        info: Arc::new(ModelInfo {
            model_id: crate::backend::ModelId::default(),
            dimension: 7,
            max_input_tokens: 1,
            normalized: false,
        }),
        name: Arc::from("shown"),
        ended: CancellationToken::new(),
    };
    let shown = format!("{embedder:?}");
    assert!(
        shown.starts_with("WasmEmbedder { name: \"shown\", info: ModelInfo {")
            && shown.contains("dimension: 7")
            && !shown.contains("jobs"),
        "{shown}"
    );
}

/// A plugin whose instantiation traps (a core module's start function) is
/// refused as an instantiation failure naming the plugin and the trap.
#[test]
fn a_plugin_that_traps_while_instantiating_is_refused_naming_the_trap() {
    let module = wat::parse_str("(module (func $trap unreachable) (start $trap))").unwrap();
    let bytes = crate::wasm::snapshot::tests::splice(crate::plugins::STUB_WASM_BYTES, &module);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("trapping.wasm");
    std::fs::write(&file, bytes).unwrap();
    let engine = super::super::WasmEngine::new(None).unwrap();
    let plugin =
        WasmPlugin::load(&engine, &super::super::PluginSource::File(file.clone())).unwrap();
    let Err(err) = Instance::start(&plugin, InstanceLimits::default(), &[]) else {
        panic!("a trapping plugin started");
    };
    let WasmError::Instantiate { name, reason } = &err else {
        panic!("not an instantiation failure: {err:?}");
    };
    assert_eq!(*name, file.display().to_string());
    assert!(reason.to_string().contains("unreachable"), "{reason}");
}
