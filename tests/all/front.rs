//! The front door (`embedder::Embedder`): every peer answers the same
//! verbs, a job keeps the generation it was checked on across a reload,
//! and a text is tokenized once per job (never when its caller counted
//! it). The entrances of the service and the CLI are checked in
//! `serve.rs` and `cli.rs` by the metric and the log event only the front
//! door emits.

use std::sync::Arc;
use std::time::Duration;

use embedhost::bus::transport::InProcess;
use embedhost::bus::{Bus, BusError, Empty, ErrorCode, Router, SendOptions};
use embedhost::embedder::peer::{self, Role};
use embedhost::embedder::{EmbedError, Embedder, Generation, Job};
use embedhost::messages::{
    EmbedRequest, EmbedderEmbed, EmbedderHandshake, EmbedderHealth, ModelCheck, Shutdown,
    ShutdownRequest,
};
use embedhost::supervisor::{Supervisor, SupervisorConfig};
use embedhost::tokens::Tokens;
use embedhost::wasm::{InstanceLimits, PluginSource, WasmEngine, WasmPlugin, WasmSpawner};
use embedhost::worker::{Worker, WorkerSettings};

/// A pool of the WASM stub giving vectors of `dimension`.
async fn stub(dimension: usize) -> Supervisor {
    let engine = WasmEngine::new(None).unwrap();
    let spawner = WasmSpawner {
        plugin: WasmPlugin::load(&engine, &PluginSource::builtin_stub()).unwrap(),
        limits: InstanceLimits::default(),
        config: vec![("dimension".into(), dimension.to_string())],
    };
    Supervisor::start(spawner, SupervisorConfig::default())
        .await
        .unwrap()
}

/// Each verb of the catalogue an embedder peer serves, asked of `router`
/// in turn (`shutdown` last): answered, or the code it was refused with.
async fn verbs(router: Router) -> Vec<(&'static str, Result<(), ErrorCode>)> {
    let bus = Bus::new(InProcess::named("peer", router));
    let options = || SendOptions::default().timeout(Duration::from_secs(60));
    let code = |r: Result<(), BusError>| {
        r.map_err(|e| match e {
            BusError::Remote(remote) => remote.code,
            other => panic!("not answered: {other}"),
        })
    };
    let embed = EmbedRequest {
        texts: vec!["hello".into()],
        is_query: false,
    };
    vec![
        (
            "embedder.handshake",
            code(
                bus.send::<EmbedderHandshake>(Empty {}, options())
                    .await
                    .map(drop),
            ),
        ),
        (
            "embedder.embed",
            code(bus.send::<EmbedderEmbed>(embed, options()).await.map(drop)),
        ),
        (
            "embedder.health",
            code(
                bus.send::<EmbedderHealth>(Empty {}, options())
                    .await
                    .map(drop),
            ),
        ),
        (
            "model.check",
            code(bus.send::<ModelCheck>(Empty {}, options()).await.map(drop)),
        ),
        (
            "shutdown",
            code(
                bus.send::<Shutdown>(ShutdownRequest::default(), options())
                    .await
                    .map(drop),
            ),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_embedder_peer_answers_the_same_verbs() {
    // The catalogue's embedder verbs are exactly the ones asked here.
    let asked = [
        "embedder.handshake",
        "embedder.embed",
        "embedder.health",
        "model.check",
        "shutdown",
    ];
    let mut served: Vec<&str> = embedhost::messages::ALL
        .iter()
        .copied()
        .filter(|n| !n.starts_with("worker."))
        .collect();
    served.sort_unstable();
    let mut sorted = asked.to_vec();
    sorted.sort_unstable();
    assert_eq!(served, sorted, "the catalogue changed: ask every new verb");

    let owner = verbs(peer::router(
        Embedder::local(stub(8).await, Tokens::Words),
        Role::Owner,
    ))
    .await;
    let member = verbs(peer::router(
        Embedder::local(stub(8).await, Tokens::Words),
        Role::Member,
    ))
    .await;
    let engine = embedhost::native::child::StubEngine::new(&[]).unwrap();
    let child = verbs(embedhost::native::child::engine_router(
        Box::new(engine),
        Default::default(),
        tokio_util::sync::CancellationToken::new(),
    ))
    .await;
    for (name, answers) in [("owner", &owner), ("member", &member), ("child", &child)] {
        let names: Vec<&str> = answers.iter().map(|a| a.0).collect();
        assert_eq!(names, asked);
        for (verb, answer) in answers.iter() {
            assert_ne!(
                answer.err(),
                Some(ErrorCode::NoHandler),
                "the {name} peer does not serve {verb}"
            );
        }
    }
    assert!(owner.iter().all(|a| a.1.is_ok()), "{owner:?}");
    assert!(child.iter().all(|a| a.1.is_ok()), "{child:?}");
    // A NATS member answers everything but a stranger's `shutdown`.
    assert!(member[..4].iter().all(|a| a.1.is_ok()), "{member:?}");
    assert_eq!(member[4].1, Err(ErrorCode::InvalidRequest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_checked_before_a_reload_is_answered_by_the_generation_it_was_checked_on() {
    let front = Embedder::local(stub(8).await, Tokens::Words);
    let old = front.generation().unwrap();
    let prepared = front
        .prepare(&old, Job::new(vec!["checked on the old model".into()]))
        .await
        .unwrap();
    // A reload to another model (16 dimensions) between the check and
    // the embedding.
    let new = Generation::local(stub(16).await, Tokens::Words, Default::default());
    let replaced = front.install(Arc::new(new)).unwrap();
    assert!(Arc::ptr_eq(&replaced, &old));
    drop((old, replaced));
    let done = prepared.run().await.unwrap();
    assert_eq!(
        done.rows[0].as_ref().unwrap().len(),
        8,
        "embedded on the new model"
    );
    assert_eq!(done.generation.info.dimension, 8);
    // The next job is checked and embedded on the new one.
    let next = front.embed(Job::new(vec!["next".into()])).await.unwrap();
    assert_eq!(next.rows[0].as_ref().unwrap().len(), 16);
    assert_eq!(front.jobs(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_is_tokenized_once_per_job_and_never_when_its_caller_counted_it() {
    let front = Embedder::local(stub(8).await, Tokens::Words);
    let texts: Vec<String> = ["one", "two words", "three more words"]
        .map(String::from)
        .to_vec();
    front.embed(Job::new(texts.clone())).await.unwrap();
    assert_eq!(front.tokenized(), 3, "each text once");
    front
        .embed(Job::new(texts.clone()).counted(vec![1, 2, 3]))
        .await
        .unwrap();
    assert_eq!(
        front.tokenized(),
        3,
        "counted texts are not tokenized again"
    );
    // Counts that do not match the texts are refused, not guessed at.
    let refused = front.embed(Job::new(texts).counted(vec![1])).await;
    assert!(matches!(
        refused,
        Err(EmbedError::Counts {
            counts: 1,
            texts: 3
        })
    ));

    // The worker hands the front door its chunker's counts: indexing
    // tokenizes no chunk twice.
    let root = tempfile::tempdir().unwrap();
    for i in 0..5 {
        std::fs::write(
            root.path().join(format!("{i}.txt")),
            "a line of words ".repeat(100 + i),
        )
        .unwrap();
    }
    let model = front.generation().unwrap().info.clone();
    let worker = Worker::new(
        front.clone(),
        model,
        Tokens::Words,
        WorkerSettings::default(),
    );
    worker.init(&root.path().join("index")).await.unwrap();
    let jobs = front.jobs();
    worker.index(vec![root.path().to_path_buf()]).await.unwrap();
    let until = std::time::Instant::now() + Duration::from_secs(120);
    while worker.stats().await.unwrap().indexed < 5 {
        assert!(std::time::Instant::now() < until, "never indexed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(front.jobs() > jobs, "the worker went around the front door");
    assert_eq!(
        front.tokenized(),
        3,
        "the worker's chunks were tokenized again"
    );
    // A search's query is one text, tokenized once.
    worker.search("words".into(), 3).await.unwrap();
    assert_eq!(front.tokenized(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_through_the_owners_peer_stops_the_pool_and_later_jobs_are_refused() {
    let front = Embedder::local(stub(8).await, Tokens::Words);
    let bus = Bus::new(InProcess::named(
        "peer",
        peer::router(front.clone(), Role::Owner),
    ));
    bus.request::<Shutdown>(ShutdownRequest::default())
        .await
        .unwrap();
    assert!(matches!(
        front.embed(Job::new(vec!["late".into()])).await,
        Err(EmbedError::ShutDown)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_guarded_job_is_held_to_the_services_limits_and_an_empty_job_queues_nothing() {
    let front = Embedder::local(stub(8).await, Tokens::Words);
    let long = vec!["word ".repeat(embedhost::limits::SERVE_MAX_INPUT_TOKENS + 1)];
    // The CLI's, the worker's and a peer's jobs: the engine truncates.
    let done = front.embed(Job::new(long.clone())).await.unwrap();
    assert!(done.rows[0].is_ok());
    // The HTTP routes' jobs: refused before any work, naming the input.
    let refused = front.embed(Job::new(long).guarded()).await;
    assert!(
        matches!(refused, Err(EmbedError::Input { index: 0, .. })),
        "{refused:?}"
    );
    // An empty job (a peer may send one) is answered at once, many times
    // over, and leaves nothing in the queue a later job would wait behind.
    for _ in 0..1000 {
        assert!(front.embed(Job::new(vec![])).await.unwrap().rows.is_empty());
    }
    assert_eq!(front.generation().unwrap().queued(), 0);
    let done = front.embed(Job::new(vec!["after".into()])).await.unwrap();
    assert_eq!(done.rows.len(), 1);
}

#[test]
fn a_front_door_made_outside_a_runtime_serves_once_used_inside_one() {
    // A library user (and `cargo bench --bench index`) may build the front
    // door in plain code: its batcher's lanes start with its first job.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let supervisor = rt.block_on(stub(8));
    let front = Embedder::local(supervisor, Tokens::Words);
    let done = rt
        .block_on(front.embed(Job::new(vec!["hello".into()])))
        .unwrap();
    assert_eq!(done.rows[0].as_ref().unwrap().len(), 8);
}
