//! The native backend: supervised child processes serving the same contract.

use std::time::{Duration, Instant};

use embedhost::native::NativeSpawner;
use embedhost::supervisor::{Supervisor, SupervisorConfig, SupervisorError};

fn spawner(settings: &[(&str, &str)]) -> NativeSpawner {
    NativeSpawner {
        executable: env!("CARGO_BIN_EXE_embedhost").into(),
        engine: "stub".into(),
        settings: settings
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        init_deadline: Duration::from_secs(10),
        grace: Duration::from_millis(500),
    }
}

fn config(pool: usize) -> SupervisorConfig {
    SupervisorConfig {
        pool_size: pool,
        ..SupervisorConfig::default()
    }
}

const DEADLINE: Duration = Duration::from_secs(20);

fn stub_vector(text: &str) -> Vec<f32> {
    embedhost_stub_engine::StubEngine::new(Default::default()).embed(&[text])
}

fn alive(pid: u32) -> bool {
    // A zombie is dead for our purposes.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            !stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

#[tokio::test]
async fn a_child_killed_during_a_request_is_replaced_and_the_request_succeeds() {
    let supervisor = Supervisor::start(spawner(&[("fault.sleep_ms", "300")]), config(1))
        .await
        .unwrap();
    let pid = supervisor.status()[0]
        .pid
        .expect("a native worker has a pid");
    let call = tokio::spawn({
        let s = supervisor.clone();
        async move { s.embed(vec!["hello".into()], false, DEADLINE).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let r = call.await.unwrap().unwrap();
    assert_eq!(r.vectors.get(0).unwrap(), stub_vector("hello").as_slice());
    let status = &supervisor.status()[0];
    assert_eq!(status.incarnation, 2);
    assert_ne!(status.pid, Some(pid));
    assert_eq!(
        status.restarts.get("exited"),
        Some(&1),
        "{:?}",
        status.restarts
    );
}

#[tokio::test]
async fn a_child_that_exits_at_start_up_is_reported_with_its_exit_status() {
    let err = Supervisor::start(spawner(&[("no.such.key", "1")]), config(1))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, SupervisorError::StartFailed(msg) if msg.contains("exit status: 1")),
        "{err}"
    );
}

#[tokio::test]
async fn a_hung_child_is_killed_and_replaced() {
    let mut supervision = config(1);
    supervision.poison_after = 1;
    let supervisor = Supervisor::start(spawner(&[("fault.loop_marker", "HANG")]), supervision)
        .await
        .unwrap();
    let pid = supervisor.status()[0].pid.unwrap();
    let started = Instant::now();
    let r = supervisor
        .embed(vec!["HANG".into()], false, Duration::from_millis(300))
        .await;
    // The call ran out of its deadline: the child is treated as hung.
    assert!(
        r.is_err() || r.as_ref().is_ok_and(|r| r.failed.len() == 1),
        "{r:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    for _ in 0..100 {
        if !alive(pid) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !alive(pid),
        "the hung child was killed: {:?} {r:?}",
        supervisor.status()
    );
    let ok = supervisor
        .embed(vec!["fine".into()], false, DEADLINE)
        .await
        .unwrap();
    assert_eq!(ok.vectors.get(0).unwrap(), stub_vector("fine").as_slice());
}

#[tokio::test]
async fn a_graceful_stop_leaves_no_child_behind() {
    let supervisor = Supervisor::start(spawner(&[]), config(1)).await.unwrap();
    let pid = supervisor.status()[0].pid.unwrap();
    assert!(alive(pid));
    drop(supervisor);
    for _ in 0..100 {
        if !alive(pid) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("child {pid} still alive after the supervisor was dropped");
}

#[test]
fn a_sigkilled_host_leaves_no_orphan() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("native.toml");
    std::fs::write(
        &config,
        "backend = \"native\"\n[plugin]\nconfig = { \"fault.sleep_ms\" = 60000 }\n",
    )
    .unwrap();
    let mut host = std::process::Command::new(env!("CARGO_BIN_EXE_embedhost"))
        .args(["--config", config.to_str().unwrap(), "embed", "slow"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Find the child the host started.
    let mut child = None;
    for _ in 0..200 {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", host.id())).unwrap();
        for task in tasks.flatten() {
            let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            if let Some(pid) = list.split_whitespace().next() {
                child = pid.parse::<u32>().ok();
            }
        }
        if child.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let child = child.expect("the host started a child");
    assert!(alive(child));
    host.kill().unwrap(); // SIGKILL
    host.wait().unwrap();
    for _ in 0..100 {
        if !alive(child) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("child {child} outlived its SIGKILLed host");
}
