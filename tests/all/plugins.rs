//! Plugins written against the host: the conformance suite (`embedhost
//! plugin test`) on good and broken plugins, the plugin template, and
//! hostile plugins that attack the sandbox.

use crate::OutputWithin;

use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use embedhost::conformance::{self, Outcome};
use embedhost::supervisor::{Supervisor, SupervisorConfig, SupervisorError};
use embedhost::wasm::{
    ArtifactCache, InstanceLimits, PluginSource, WasmEmbedder, WasmEngine, WasmError, WasmPlugin,
    WasmSpawner,
};

fn engine() -> &'static WasmEngine {
    static ENGINE: OnceLock<WasmEngine> = OnceLock::new();
    ENGINE
        .get_or_init(|| WasmEngine::new(Some(ArtifactCache::new(crate::test_cache_dir()))).unwrap())
}

fn load(path: &str) -> WasmPlugin {
    WasmPlugin::load(engine(), &PluginSource::File(path.into())).unwrap()
}

fn plugin_test(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_embedhost"))
        .args(["plugin", "test", "--seconds", "0.2"])
        .args(args)
        .env("EMBEDHOST_CACHE_DIR", crate::test_cache_dir())
        .env_remove("RUST_LOG")
        .output_within(crate::PROCESS_LIMIT)
        .expect("run embedhost");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The table's result column for `check`.
fn result_of<'a>(table: &'a str, check: &str) -> &'a str {
    table
        .lines()
        .find(|l| l.starts_with(&format!("{check}  ")))
        .and_then(|l| l[check.len()..].split_whitespace().next())
        .unwrap_or_else(|| panic!("no row `{check}` in\n{table}"))
}

#[test]
fn plugin_test_passes_the_stub_and_the_template_with_a_readable_table() {
    for plugin in [embedhost::plugins::STUB, embedhost::plugins::TEMPLATE] {
        let (ok, table, err) = plugin_test(&[plugin]);
        assert!(ok, "{plugin}:\n{table}\n{err}");
        for check in [
            "init",
            "declares a model",
            "embeds a batch",
            "normalized as declared",
            "deterministic",
            "batch-independent",
            "empty list",
            "empty string",
            "very long input",
            "non-ASCII input",
            "query kind",
            "bad config is a value",
            "health",
        ] {
            assert_eq!(
                result_of(&table, check),
                "pass",
                "{plugin}: {check}\n{table}"
            );
        }
        assert!(table.contains("texts/s"), "{table}");
        assert!(table.contains("MiB of linear memory"), "{table}");
        assert!(table.contains("13 passed, 0 failed"), "{table}");
    }
}

#[test]
fn plugin_test_fails_a_broken_plugin_naming_each_broken_rule() {
    let (ok, table, err) = plugin_test(&[embedhost::plugins::BROKEN]);
    assert!(!ok, "{table}");
    assert!(err.contains("failed 5 of 13 checks"), "{err}");
    assert_eq!(result_of(&table, "init"), "pass", "{table}");
    assert_eq!(result_of(&table, "embeds a batch"), "pass", "{table}");
    assert_eq!(
        result_of(&table, "normalized as declared"),
        "FAIL",
        "{table}"
    );
    assert!(table.contains("has norm 2.0"), "{table}");
    assert_eq!(result_of(&table, "deterministic"), "FAIL", "{table}");
    // Its answers drift from call to call, so a text alone differs too.
    assert_eq!(result_of(&table, "batch-independent"), "FAIL", "{table}");
    assert_eq!(result_of(&table, "very long input"), "pass", "{table}");
    assert_eq!(result_of(&table, "empty string"), "FAIL", "{table}");
    assert!(table.contains("trapped"), "{table}");
    assert_eq!(result_of(&table, "health"), "FAIL", "{table}");
    assert!(table.contains("`processed` went from 0 to 0"), "{table}");
    // The JSON form carries the same verdicts.
    let (_, json, _) = plugin_test(&["--json", embedhost::plugins::BROKEN]);
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    let failed: Vec<&str> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["outcome"] == "fail")
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        failed,
        [
            "normalized as declared",
            "deterministic",
            "batch-independent",
            "empty string",
            "health"
        ]
    );
}

#[test]
fn plugin_test_reports_a_plugin_that_cannot_start_and_a_bad_argument() {
    let (ok, table, err) = plugin_test(&[embedhost::plugins::TEMPLATE, "--set", "dimension=3"]);
    assert!(!ok);
    assert_eq!(result_of(&table, "init"), "FAIL", "{table}");
    assert!(table.contains("`dimension = 3`"), "{table}");
    assert!(err.contains("failed 1 of 2 checks"), "{err}");
    let (ok, _, err) = plugin_test(&[embedhost::plugins::TEMPLATE, "--set", "dimension"]);
    assert!(!ok);
    assert!(
        err.contains("`--set dimension` is not of the form KEY=VALUE"),
        "{err}"
    );
}

#[tokio::test]
async fn the_template_embeds_by_spelling_and_honours_its_config() {
    let config = vec![("dimension".to_string(), "64".to_string())];
    let embedder = WasmEmbedder::start(
        load(embedhost::plugins::TEMPLATE),
        InstanceLimits::default(),
        config,
    )
    .await
    .unwrap();
    assert_eq!(embedder.model_info().dimension, 64);
    let v = embedder
        .embed(
            ["the garden hose", "a garden hose", "quantum chromodynamics"]
                .map(String::from)
                .to_vec(),
            false,
            None,
        )
        .await
        .unwrap();
    let c = |i, j| embedhost::vectors::cosine(v.get(i).unwrap(), v.get(j).unwrap());
    assert!(c(0, 1) > 0.7 && c(0, 2) < 0.3, "{} {}", c(0, 1), c(0, 2));
    let report = conformance::run(
        load(embedhost::plugins::TEMPLATE),
        conformance::Options {
            config: vec![("colour".into(), "blue".into())],
            limits: InstanceLimits::default(),
            throughput_time: Duration::ZERO,
        },
    )
    .await;
    assert_eq!(report.checks[0].outcome, Outcome::Fail);
    assert!(
        report.checks[0].detail.contains("unknown key `colour`"),
        "{:?}",
        report.checks[0]
    );
}

// --- hostile plugins -------------------------------------------------------

const TRIGGER: &str = "attack";

fn limits() -> InstanceLimits {
    InstanceLimits {
        memory_bytes: 256 * 1024 * 1024,
        call_deadline: Duration::from_secs(5),
        call_deadline_per_kib: embedhost::limits::CALL_DEADLINE_PER_KIB,
        init_deadline: Duration::from_millis(500),
    }
}

async fn hostile(pairs: &[(&str, &str)]) -> Result<Supervisor, SupervisorError> {
    let spawner = WasmSpawner {
        plugin: load(embedhost::plugins::HOSTILE).with_model_dir(model_dir()),
        limits: limits(),
        config: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    Supervisor::start(
        spawner,
        SupervisorConfig {
            pool_size: 1,
            ..SupervisorConfig::default()
        },
    )
    .await
}

/// A model directory for the hostile plugin: it should see this and
/// nothing else, and only read it.
fn model_dir() -> std::path::PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("weights.bin"), b"weights").unwrap();
        dir
    })
    .path()
    .to_path_buf()
}

/// Sends the trigger, returns the failure the caller got: the error of a
/// refused batch, or the reason of a text isolated after crashes.
async fn attack(supervisor: &Supervisor) -> String {
    match supervisor
        .embed(vec![TRIGGER.into()], false, Duration::from_secs(60))
        .await
    {
        Ok(r) => {
            assert_eq!((r.vectors.len(), r.failed.len()), (0, 1), "{r:?}");
            r.failed[0].reason.clone()
        }
        Err(SupervisorError::Refused(e)) => e.message,
        Err(e) => panic!("not a typed refusal: {e}"),
    }
}

/// The instance (or its replacement) still serves ordinary text.
async fn still_serves(supervisor: &Supervisor) {
    let r = supervisor
        .embed(vec!["ordinary text".into()], false, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!((r.vectors.len(), r.failed.len()), (1, 0));
}

fn restarts(supervisor: &Supervisor, reason: &str) -> u64 {
    supervisor.restarts().get(reason).copied().unwrap_or(0)
}

#[tokio::test]
async fn a_plugin_cannot_read_or_write_files_outside_its_model_directory() {
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret.txt");
    std::fs::write(&secret, "host secret").unwrap();
    let probe = secret.to_str().unwrap();
    let supervisor = hostile(&[("mode", "files"), ("probe", probe)])
        .await
        .unwrap();
    let reason = attack(&supervisor).await;
    assert!(reason.contains("contained:"), "{reason}");
    assert!(!reason.contains("ESCAPED"), "{reason}");
    assert!(reason.contains("read /etc/passwd: refused"), "{reason}");
    assert!(
        reason.contains("write /model/written-by-plugin: refused"),
        "{reason}"
    );
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "host secret");
    assert!(!model_dir().join("written-by-plugin").exists());
    assert_eq!(
        std::fs::read_dir(model_dir()).unwrap().count(),
        1,
        "the model directory is read-only"
    );
    still_serves(&supervisor).await;
}

#[tokio::test]
async fn a_plugin_sees_no_environment_and_no_arguments() {
    // The test process has an environment (PATH at least): none of it may
    // reach the plugin.
    assert!(std::env::vars().count() > 0);
    let supervisor = hostile(&[("mode", "env")]).await.unwrap();
    let reason = attack(&supervisor).await;
    assert!(reason.contains("contained:"), "{reason}");
    assert!(reason.contains("0 environment variables"), "{reason}");
    assert!(reason.contains("0 arguments"), "{reason}");
}

#[tokio::test]
async fn a_plugin_can_open_no_socket() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let supervisor = hostile(&[("mode", "socket"), ("addr", &addr)])
        .await
        .unwrap();
    let reason = attack(&supervisor).await;
    assert!(reason.contains("contained:"), "{reason}");
    assert!(
        reason.contains(&format!("tcp connect {addr}: refused")),
        "{reason}"
    );
    assert!(reason.contains("tcp listen: refused"), "{reason}");
    assert!(reason.contains("name lookup: refused"), "{reason}");
    assert!(
        listener.accept().is_err(),
        "nothing connected to the host's listener"
    );
}

#[tokio::test]
async fn unbounded_allocation_hits_the_memory_cap_and_the_instance_is_replaced() {
    let supervisor = hostile(&[("mode", "alloc")]).await.unwrap();
    let reason = attack(&supervisor).await;
    assert!(reason.contains("memory limit"), "{reason}");
    // The batch's crash, then the text alone until it is poison.
    let poison = u64::from(embedhost::limits::POISON_VERDICT_CRASHES);
    assert_eq!(restarts(&supervisor, "memory_cap"), poison);
    still_serves(&supervisor).await;
}

#[tokio::test]
async fn unbounded_recursion_traps_and_the_instance_is_replaced() {
    let supervisor = hostile(&[("mode", "recurse")]).await.unwrap();
    let reason = attack(&supervisor).await;
    // Rust's shadow stack lives in linear memory and grows down: running
    // past its bottom is an out-of-bounds access, which wasmtime traps.
    assert!(reason.contains("trapped"), "{reason}");
    assert!(reason.contains("out of bounds memory access"), "{reason}");
    assert_eq!(
        restarts(&supervisor, "trap"),
        u64::from(embedhost::limits::POISON_VERDICT_CRASHES)
    );
    still_serves(&supervisor).await;
}

#[tokio::test]
async fn a_gigantic_output_and_log_line_are_refused_at_the_boundary() {
    let supervisor = hostile(&[("mode", "giant_output")]).await.unwrap();
    let reason = attack(&supervisor).await;
    // The 128 MiB of vectors are refused while still in the plugin's
    // memory: the host copies out what the batch needs, and no more.
    let budget = 4 * 4 + embedhost::limits::MAX_HOSTCALL_BYTES;
    assert!(
        reason.contains(&format!("larger than its {budget} bytes")),
        "{reason}"
    );
    still_serves(&supervisor).await;
}

#[tokio::test]
async fn a_plugin_looping_forever_in_init_fails_to_start_with_a_typed_error() {
    let started = Instant::now();
    let err = hostile(&[("mode", "init_loop")]).await.unwrap_err();
    let message = err.to_string();
    assert!(message.contains("deadline"), "{message}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "bounded by the init deadline and the restart intensity: {:?}",
        started.elapsed()
    );
    // The bare instance says the same, as a typed error.
    let e = WasmEmbedder::start(
        load(embedhost::plugins::HOSTILE),
        limits(),
        vec![("mode".into(), "init_loop".into())],
    )
    .await
    .unwrap_err();
    assert!(
        matches!(e, WasmError::DeadlineExceeded { call: "init", .. }),
        "{e:?}"
    );
}
