//! Pools on several hosts over a real nats-server (installed by `./x
//! setup`): three `embedhost serve --nats` members, two WASM and one
//! native, index 2,000 files for an `embedhost index` whose config names
//! `[embedder] remote`. The index must equal a local run's with no faults,
//! with a member SIGKILLed and another started mid-run, and with
//! nats-server restarted mid-run.

use crate::OutputWithin;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use embedhost::worker::store::Store;

use crate::serve::{Service, stub_config};

const FILES: usize = 2000;

/// A nats-server on a loopback port, restartable on the same port.
struct NatsServer {
    child: Option<Child>,
    port: u16,
}

impl NatsServer {
    fn start() -> NatsServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = NatsServer { child: None, port };
        server.up();
        server
    }

    fn binary() -> PathBuf {
        let deps = embedhost::deps::deps_dir().expect("run ./x setup");
        let path = deps.join("venv/bin/nats-server");
        assert!(
            path.exists(),
            "run ./x setup: {} is missing",
            path.display()
        );
        path
    }

    fn up(&mut self) {
        let child = Command::new(Self::binary())
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let until = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < until, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn down(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.down();
    }
}

/// Notes of one to three chunks, in folders.
fn corpus(dir: &Path) {
    for i in 0..FILES {
        let words = 20 + (i % 3) * 40;
        let text: Vec<String> = (0..words)
            .map(|j| format!("w{}", (i * 37 + j * 11) % 1499))
            .collect();
        let lines: Vec<String> = text.chunks(12).map(|l| l.join(" ")).collect();
        let path = dir.join(format!("d{}/note{i}.txt", i % 20));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, lines.join("\n")).unwrap();
    }
}

/// A member: the stub on `backend`, each call 100 ms (a slow model, so a
/// run lasts seconds, long enough to fault it), joined to `url`.
fn member(backend: &str, url: &str) -> Service {
    let config = stub_config(backend, "\"fault.sleep_ms\" = \"100\"", "");
    Service::start(&config, &["--nats", url])
}

/// Starts `embedhost index docs` in `dir` with `config`.
fn index(dir: &Path, config: &str) -> Child {
    std::fs::write(dir.join("embedhost.toml"), config).unwrap();
    Command::new(env!("CARGO_BIN_EXE_embedhost"))
        .current_dir(dir)
        .args(["index", "docs"])
        .env("EMBEDHOST_CACHE_DIR", crate::test_cache_dir())
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(child: Child) {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "index failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every chunk of an index (file relative to its root, lines, text) with
/// its vector.
type Chunks = BTreeMap<(PathBuf, u32, String), Vec<f32>>;

/// The index in `dir/index`: every chunk with its vector, and the files
/// indexed and skipped.
fn contents(dir: &Path) -> (Chunks, u64, u64) {
    let store = Store::open_existing(&dir.join("index")).unwrap();
    let (ids, data) = store.vectors().unwrap();
    let dimension = data.len() / ids.len().max(1);
    let rows = store.chunks(&ids).unwrap();
    let mut by_id = BTreeMap::new();
    for (k, id) in ids.iter().enumerate() {
        by_id.insert(*id, data[k * dimension..(k + 1) * dimension].to_vec());
    }
    let chunks = rows
        .into_iter()
        .map(|r| {
            let path = r.path.strip_prefix(dir).unwrap_or(&r.path).to_path_buf();
            ((path, r.start_line, r.text), by_id[&r.id].clone())
        })
        .collect();
    let stats = store.stats().unwrap();
    let skipped: u64 = stats.skipped.values().sum();
    (chunks, stats.indexed, skipped)
}

fn assert_same(remote: &Path, local: &Path) {
    let (a, files_a, skipped_a) = contents(remote);
    let (b, files_b, skipped_b) = contents(local);
    assert_eq!(
        (files_a, skipped_a),
        (files_b, skipped_b),
        "files indexed, skipped"
    );
    assert_eq!(files_a, FILES as u64);
    assert_eq!(a.len(), b.len(), "chunks");
    for ((key, va), (kb, vb)) in a.iter().zip(&b) {
        assert_eq!(key, kb);
        let cos = embedhost::vectors::cosine(va, vb);
        assert!(cos >= 0.9999, "{key:?}: cosine {cos}");
    }
}

/// A client directory with the corpus, indexing through `url` in batches
/// of 8 chunks: about 500 calls of 100 ms on six instances, so a run lasts
/// seconds on any machine.
fn client(url: &str) -> (PathBuf, String) {
    let dir = tempfile::tempdir().unwrap().keep();
    corpus(&dir.join("docs"));
    let config = stub_config(
        "wasm",
        "",
        &format!("[embedder]\nremote = \"{url}\"\n[index]\nbatch_chunks = 8\n"),
    )
    .replace("[index]\ndir = \"index\"\n", "")
    .replace(
        "[index]\nbatch_chunks",
        "[index]\ndir = \"index\"\nbatch_chunks",
    );
    (dir, config)
}

/// Waits until `run` has indexed some files but not all: the point to
/// fault it at. Polls the client's index (no fixed sleep: a fast machine
/// and a slow one both reach it), for at most two minutes.
fn under_way(dir: &Path, run: &mut Child) {
    let db = dir.join("index").join(embedhost::worker::store::DB_FILE);
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(
            run.try_wait().unwrap().is_none(),
            "the run ended before the faults"
        );
        let indexed: i64 =
            rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .and_then(|c| c.query_row("SELECT COUNT(*) FROM files", [], |r| r.get(0)))
                .unwrap_or(0);
        if indexed >= 100 {
            assert!(indexed < FILES as i64, "the run was over before the faults");
            return;
        }
        assert!(
            Instant::now() < until,
            "the run made no progress: {indexed} files"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The same corpus indexed by a local pool, no NATS.
fn local_run() -> PathBuf {
    let dir = tempfile::tempdir().unwrap().keep();
    corpus(&dir.join("docs"));
    finish(index(&dir, &stub_config("wasm", "", "")));
    dir
}

#[test]
fn three_mixed_members_index_2000_files_as_a_local_run_does_through_faults() {
    let mut nats = NatsServer::start();
    let url = nats.url();
    let local = local_run();
    let members = [
        member("wasm", &url),
        member("wasm", &url),
        member("native", &url),
    ];

    // 1. No faults.
    let (dir, config) = client(&url);
    finish(index(&dir, &config));
    assert_same(&dir, &local);

    // 2. A member SIGKILLed mid-run, another started mid-run.
    let [mut first, second, third] = members;
    let (dir, config) = client(&url);
    let mut run = index(&dir, &config);
    under_way(&dir, &mut run);
    first.signal(libc::SIGKILL);
    let _ = first.wait_exit(Duration::from_secs(5));
    let fourth = member("wasm", &url);
    finish(run);
    assert_same(&dir, &local);

    // 3. nats-server restarted mid-run.
    let (dir, config) = client(&url);
    let mut run = index(&dir, &config);
    under_way(&dir, &mut run);
    nats.down();
    std::thread::sleep(Duration::from_millis(300));
    nats.up();
    finish(run);
    assert_same(&dir, &local);
    drop((second, third, fourth));
}

/// A request of one text.
fn one_text(text: &str) -> embedhost::messages::EmbedRequest {
    embedhost::messages::EmbedRequest {
        texts: vec![text.to_string()],
        is_query: false,
    }
}

/// Waits for [`busy_member`]'s first request, lets the member settle, and
/// checks that no other request was ever run on its instance.
async fn only_the_first_ran(first: FirstRequest, member: Service, bus: embedhost::bus::Bus) {
    use embedhost::bus::SendOptions;
    use embedhost::messages::EmbedderEmbed;
    first.await.unwrap().unwrap();
    // One more request, queued behind every late one: once it is answered,
    // the member's one instance has taken (and dropped, or run) all of
    // them, so its count of calls says which ran. No sleep needed.
    bus.send::<EmbedderEmbed>(one_text("after"), SendOptions::default())
        .await
        .unwrap();
    let info = tokio::task::spawn_blocking(move || member.get("/info").1)
        .await
        .unwrap();
    assert_eq!(
        info["served_calls"], 2,
        "the first and the one after: {info}"
    );
}

/// The request [`busy_member`] keeps its instance busy with.
/// A member started from `config` on `nats`, and a caller's bus to its
/// model's pool.
async fn member_and_caller(nats: &NatsServer, config: String) -> (Service, embedhost::bus::Bus) {
    use embedhost::bus::transport::nats::{Nats, NatsOptions, connect};
    let url = nats.url();
    let member = tokio::task::spawn_blocking(move || Service::start(&config, &["--nats", &url]))
        .await
        .unwrap();
    let client = connect(&nats.url(), &NatsOptions::default(), "test")
        .await
        .unwrap();
    let bus = embedhost::bus::Bus::new(Nats::new(client, "all-minilm-l6-v2").await.unwrap());
    (member, bus)
}

type FirstRequest =
    tokio::task::JoinHandle<Result<embedhost::messages::EmbedResponse, embedhost::bus::BusError>>;

/// A nats-server; a member whose one instance takes `call_ms` a call; a
/// caller's bus to it; and a first request, handed to the member's pool
/// by the time this returns.
async fn busy_member(call_ms: u64) -> (NatsServer, Service, embedhost::bus::Bus, FirstRequest) {
    use embedhost::bus::SendOptions;
    use embedhost::messages::EmbedderEmbed;
    let nats = NatsServer::start();
    let config = stub_config("wasm", &format!("\"fault.sleep_ms\" = \"{call_ms}\""), "")
        .replace("pool_size = 2", "pool_size = 1");
    let (member, bus) = member_and_caller(&nats, config).await;
    let first = {
        let bus = bus.clone();
        tokio::spawn(async move {
            bus.send::<EmbedderEmbed>(one_text("first"), SendOptions::default())
                .await
        })
    };
    // Until the member's batcher has handed the first request to its pool
    // (its one instance then takes it before anything sent later).
    let member = tokio::task::spawn_blocking(move || {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, metrics, _) = member.raw("GET", "/metrics", None, &[]);
            let batches = crate::serve::metric(&metrics, "embed_batch_size_count");
            if batches >= 1.0 {
                return member;
            }
            assert!(
                Instant::now() < until,
                "the first request never reached the member"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    })
    .await
    .unwrap();
    (nats, member, bus, first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_deadline_is_dropped_by_the_member_too() {
    use embedhost::bus::SendOptions;
    use embedhost::messages::EmbedderEmbed;
    // One instance, 2 s a call: every late request below gives up while the
    // first still runs (a call already running is never interrupted).
    let (_nats, member, bus, first) = busy_member(2000).await;
    // Five more give up after 200 ms.
    for i in 0..5 {
        let r = bus
            .send::<EmbedderEmbed>(
                one_text(&format!("late {i}")),
                SendOptions::default().timeout(Duration::from_millis(200)),
            )
            .await;
        assert!(
            r.is_err(),
            "a 200 ms request to a busy member cannot succeed"
        );
    }
    only_the_first_ran(first, member, bus).await;
}

#[test]
fn a_service_whose_embedder_is_remote_serves_and_indexes_through_the_pool() {
    let nats = NatsServer::start();
    let url = nats.url();
    let pool = Service::start(&stub_config("native", "", ""), &["--nats", &url]);
    let config = stub_config("wasm", "", &format!("[embedder]\nremote = \"{url}\"\n"));
    let front = Service::start(&config, &[]);
    let (_, info) = front.get("/info");
    assert_eq!(info["backend"], "remote", "{info}");
    assert_eq!(info["model_id"], "embedhost/stub-feature-hash");
    let body = serde_json::json!({ "inputs": ["first text", "second text"] });
    let (status, remote) = front.post("/embed", &body);
    assert_eq!(status, 200, "{remote}");
    assert_eq!(remote, pool.post("/embed", &body).1);
    // A member of this model may not join another pool as a front.
    let out = front.cli(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--nats",
        &url,
        "--db",
        "other",
    ]);
    assert!(!out.status.success());
    // The front's worker indexes through the pool.
    let docs = front.dir.join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    std::fs::write(docs.join("a.txt"), "ownership and borrowing").unwrap();
    std::fs::write(docs.join("b.txt"), "the quick brown fox").unwrap();
    let out = front.cli(&["index", "docs"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, results) = front.post(
        "/search",
        &serde_json::json!({ "query": "borrowing", "limit": 1 }),
    );
    assert_eq!(status, 200);
    assert!(
        results[0]["path"].as_str().unwrap().ends_with("a.txt"),
        "{results}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_gives_up_early_cancels_its_request_at_the_member() {
    use embedhost::bus::SendOptions;
    use embedhost::messages::EmbedderEmbed;
    let (_nats, member, bus, first) = busy_member(500).await;
    // A 30 s deadline, but the caller drops the request after 150 ms: only
    // the cancel can keep the member from running it after the first.
    let gave_up = tokio::time::timeout(
        Duration::from_millis(150),
        bus.send::<EmbedderEmbed>(
            one_text("given up"),
            SendOptions::default().timeout(Duration::from_secs(30)),
        ),
    )
    .await;
    assert!(gave_up.is_err());
    only_the_first_ran(first, member, bus).await;
}

/// A CA and a server certificate for 127.0.0.1 it signed, as PEM files in
/// `dir`: (ca, cert, key).
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

#[test]
fn tls_and_credentials_pass_through_to_the_nats_client() {
    use embedhost::bus::transport::nats::split_credentials;
    assert_eq!(
        split_credentials("nats://u:p@h:4222"),
        (
            "nats://h:4222".to_string(),
            Some("u".into()),
            Some("p".into())
        )
    );
    assert_eq!(
        split_credentials("nats://tok@h"),
        ("nats://h".to_string(), Some("tok".into()), None)
    );
    assert_eq!(
        split_credentials("nats://h:1"),
        ("nats://h:1".to_string(), None, None)
    );
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates(dir.path());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = Command::new(NatsServer::binary())
        .args([
            "-a",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "--user",
            "pool",
            "--pass",
            "s3cret-pass",
        ])
        .arg("--tlscert")
        .arg(&cert)
        .arg("--tlskey")
        .arg(&key)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < until, "nats-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let url = format!("nats://pool:s3cret-pass@127.0.0.1:{port}");
    let tls = format!(
        "[nats]\ntls_ca = \"{}\"\nrequire_tls = true\n",
        ca.display()
    );
    let member = Service::start(&stub_config("wasm", "", &tls), &["--nats", &url]);
    // A caller with the CA and the credentials embeds through the pool.
    let client = tempfile::tempdir().unwrap();
    let config = stub_config(
        "wasm",
        "",
        &format!("{tls}[embedder]\nremote = \"{url}\"\n"),
    );
    std::fs::write(client.path().join("embedhost.toml"), &config).unwrap();
    let embed = |dir: &Path| {
        Command::new(env!("CARGO_BIN_EXE_embedhost"))
            .current_dir(dir)
            .args(["embed", "over tls"])
            .env("EMBEDHOST_CACHE_DIR", crate::test_cache_dir())
            .env_remove("RUST_LOG")
            .output_within(crate::PROCESS_LIMIT)
            .unwrap()
    };
    let out = embed(client.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, tei) = member.post("/embed", &serde_json::json!({ "inputs": "over tls" }));
    assert_eq!(status, 200);
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (a, b): (Vec<f32>, Vec<f32>) = (
        serde_json::from_value(line["vector"].clone()).unwrap(),
        serde_json::from_value(tei[0].clone()).unwrap(),
    );
    assert_eq!(a, b);
    // Without the CA, or without the password, the caller is refused with
    // the server named.
    for bad in [
        stub_config("wasm", "", &format!("[embedder]\nremote = \"{url}\"\n")),
        stub_config(
            "wasm",
            "",
            &format!("{tls}[embedder]\nremote = \"nats://pool:wrong@127.0.0.1:{port}\"\n"),
        ),
    ] {
        std::fs::write(client.path().join("embedhost.toml"), &bad).unwrap();
        let out = embed(client.path());
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
        // The password never shows.
        assert!(
            !err.contains("s3cret-pass") && !err.contains("wrong"),
            "{err}"
        );
    }
    let _ = server.kill();
    let _ = server.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_answers_every_embedder_verb_through_its_front_door() {
    use embedhost::bus::{BusError, Empty, ErrorCode, SendOptions};
    use embedhost::messages::{
        EmbedderEmbed, EmbedderHandshake, EmbedderHealth, ModelCheck, Shutdown, ShutdownRequest,
    };
    let nats = NatsServer::start();
    let (member, bus) = member_and_caller(&nats, stub_config("wasm", "", "")).await;
    let options = || SendOptions::default().timeout(Duration::from_secs(60));
    let hello = bus
        .send::<EmbedderHandshake>(Empty {}, options())
        .await
        .unwrap();
    let embedded = bus
        .send::<EmbedderEmbed>(one_text("hello"), options())
        .await
        .unwrap();
    assert_eq!(embedded.vectors.dimension(), hello.model.dimension as usize);
    let health = bus
        .send::<EmbedderHealth>(Empty {}, options())
        .await
        .unwrap();
    assert!(health.processed_count >= 1, "{health:?}");
    let model = bus.send::<ModelCheck>(Empty {}, options()).await.unwrap();
    assert!(model.exists, "the stub needs no files: {model:?}");
    // A stranger on the server cannot stop the member's pool.
    let refused = bus
        .send::<Shutdown>(ShutdownRequest::default(), options())
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, BusError::Remote(r) if r.code == ErrorCode::InvalidRequest),
        "{refused}"
    );
    // Every call went through the member's front door, and it still serves.
    let member = tokio::task::spawn_blocking(move || {
        let (_, metrics, _) = member.raw("GET", "/metrics", None, &[]);
        assert!(
            crate::serve::metric(&metrics, "front_door_jobs_total") >= 1.0,
            "{metrics}"
        );
        assert_eq!(member.get("/ready").0, 200);
        member
    })
    .await
    .unwrap();
    // A caller whose embedder is remote goes through its own front door
    // too: `embedhost embed` with `[embedder] remote`.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("embedhost.toml"),
        format!(
            "[embedder]\nremote = \"{}\"\n[index]\ndir = \"index\"\n",
            nats.url()
        ),
    )
    .unwrap();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_embedhost"))
            .current_dir(dir.path())
            .args(["embed", "over the pool"])
            .env("EMBEDHOST_CACHE_DIR", crate::test_cache_dir())
            .env("RUST_LOG", "embedhost::front_door=debug")
            .output_within(crate::PROCESS_LIMIT)
            .unwrap()
    })
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.lines()
            .any(|l| l.contains("embedhost::front_door") && l.contains("remote")),
        "{err}"
    );
    drop(member);
}
