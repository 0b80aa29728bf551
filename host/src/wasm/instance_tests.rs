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
