//! The native backend: supervised child processes serving the same contract.

use crate::OutputWithin;

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
        call_deadline: Duration::from_secs(30),
        call_deadline_per_kib: embedhost::limits::CALL_DEADLINE_PER_KIB,
        grace: Duration::from_millis(500),
        memory_ceiling: Some(embedhost::limits::DEFAULT_CHILD_MEMORY_CEILING),
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
async fn a_child_that_exits_at_start_up_every_time_escalates_with_its_exit_code() {
    let started = Instant::now();
    let err = Supervisor::start(spawner(&[("child.exit_at_start", "3")]), config(1))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, SupervisorError::Escalated(why)
            if why.contains("failed 4 times within") && why.contains("exit status: 3")),
        "{err}"
    );
    // Three restarts with backoff (0, 100, 200 ms), not a silent loop.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_child_of_another_protocol_version_is_refused() {
    let err = Supervisor::start(spawner(&[("child.protocol_version", "99")]), config(1))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("speaks protocol version 99"),
        "{err}"
    );
}

#[tokio::test]
async fn a_setting_the_engine_refuses_is_reported_naming_the_key() {
    let err = Supervisor::start(spawner(&[("no.such.key", "1")]), config(1))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no.such.key"), "{err}");
}

/// Waits until `pid` is gone (or 2 s pass); whether it is.
async fn gone(pid: u32) -> bool {
    for _ in 0..100 {
        if !alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// A supervisor whose child writes `marker`'s fault to its stdout: the text
/// is answered as poison with the transport's typed error, every child that
/// wrote to the pipe is replaced, and the pool serves afterwards.
async fn stdout_fault_is_contained(setting: &str, expected: &str) {
    let supervisor = Supervisor::start(spawner(&[(setting, "BAD")]), config(1))
        .await
        .unwrap();
    let first = supervisor.status()[0].pid.unwrap();
    let r = supervisor
        .embed(vec!["a".into(), "BAD".into(), "b".into()], false, DEADLINE)
        .await
        .unwrap();
    assert_eq!(r.failed.len(), 1, "{r:?}");
    assert_eq!(r.failed[0].index, 1);
    assert!(
        r.failed[0].reason.contains(expected),
        "{}",
        r.failed[0].reason
    );
    assert_eq!(r.vectors.get(0).unwrap(), stub_vector("a").as_slice());
    assert_eq!(r.vectors.get(1).unwrap(), stub_vector("b").as_slice());
    assert!(
        gone(first).await,
        "the child that broke the pipe was killed"
    );
    let status = &supervisor.status()[0];
    // The batch's crash, then the text alone until it is poison.
    assert_eq!(
        status.restarts.get("exited"),
        Some(&u64::from(embedhost::limits::POISON_VERDICT_CRASHES)),
        "{status:?}"
    );
    let ok = supervisor
        .embed(vec!["fine".into()], false, DEADLINE)
        .await
        .unwrap();
    assert_eq!(ok.vectors.get(0).unwrap(), stub_vector("fine").as_slice());
}

#[tokio::test]
async fn garbage_on_the_childs_stdout_is_a_typed_error_and_a_restart() {
    stdout_fault_is_contained("child.garbage_marker", "frame").await;
}

#[tokio::test]
async fn an_oversized_frame_from_the_child_is_a_typed_error_and_a_restart() {
    stdout_fault_is_contained("child.oversized_marker", "frame").await;
}

#[tokio::test]
async fn an_aborting_child_fails_only_its_text() {
    stdout_fault_is_contained("child.abort_marker", "exited").await;
}

#[tokio::test]
async fn a_child_exiting_mid_request_fails_only_its_text() {
    stdout_fault_is_contained("child.exit_marker", "exited").await;
}

#[tokio::test]
async fn a_hung_child_is_found_by_the_health_check_killed_and_replaced() {
    let mut supervision = config(1);
    supervision.health_interval = Duration::from_millis(200);
    supervision.health_timeout = Duration::from_millis(200);
    let supervisor = Supervisor::start(spawner(&[("child.hang_marker", "HANG")]), supervision)
        .await
        .unwrap();
    let pid = supervisor.status()[0].pid.unwrap();
    let started = Instant::now();
    // The caller's deadline is long: the health check, not the deadline,
    // finds the hang.
    let r = supervisor
        .embed(vec!["ok".into(), "HANG".into()], false, DEADLINE)
        .await
        .unwrap();
    assert_eq!(r.failed.len(), 1, "{r:?}");
    assert!(
        r.failed[0].reason.contains("health"),
        "{}",
        r.failed[0].reason
    );
    assert_eq!(r.vectors.get(0).unwrap(), stub_vector("ok").as_slice());
    // Two hangs (the batch, then the text alone), each found within an
    // interval plus a timeout, plus a restart.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(gone(pid).await, "the hung child was killed");
    let status = &supervisor.status()[0];
    assert_eq!(
        status.restarts.get("health_timeout"),
        Some(&u64::from(embedhost::limits::POISON_VERDICT_CRASHES)),
        "{status:?}"
    );
}

#[tokio::test]
async fn a_child_that_ignores_shutdown_and_sigterm_is_killed_once_its_grace_is_over() {
    let grace = Duration::from_millis(300);
    let mut spawner = spawner(&[
        ("child.hang_marker", "HANG"),
        ("child.ignore_sigterm", "true"),
    ]);
    spawner.grace = grace;
    let (mut worker, _) = embedhost::supervisor::Spawner::start(&spawner, 0, 1)
        .await
        .unwrap();
    let pid = worker.pid().unwrap();
    let call = tokio::spawn(worker.embed(vec!["HANG".into()], false, DEADLINE));
    // The child is hung on the call once a health check goes unanswered.
    let hung = tokio::time::timeout(Duration::from_secs(60), async {
        while worker.health(Duration::from_millis(200)).await.is_ok() {}
    });
    hung.await.expect("the child never hung on the call");
    let started = Instant::now();
    worker.stop().await;
    let took = started.elapsed();
    assert!(!alive(pid), "stop returns once the child is reaped");
    assert!(took >= grace, "it was given its grace period: {took:?}");
    // Bounded (SIGKILL after the grace and the SIGTERM wait), with room
    // for a busy machine: only a stop that waits on the child fails this.
    assert!(took < grace + Duration::from_secs(10), "{took:?}");
    assert!(call.await.unwrap().is_err(), "the call in flight failed");
}

#[tokio::test]
async fn a_leaking_child_is_recycled_before_the_threshold_without_failing_a_request() {
    let mut supervision = config(1);
    supervision.health_interval = Duration::from_millis(50);
    supervision.max_memory_bytes = 150 * 1024 * 1024;
    supervision.max_processed = u64::MAX;
    let supervisor = Supervisor::start(spawner(&[("child.leak_mb_per_call", "8")]), supervision)
        .await
        .unwrap();
    let first = supervisor.status()[0].pid.unwrap();
    let mut served = 0;
    let started = Instant::now();
    while supervisor.status()[0]
        .restarts
        .get("recycle")
        .copied()
        .unwrap_or(0)
        < 2
    {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no recycle: {:?}",
            supervisor.status()
        );
        let text = format!("text {served}");
        let r = supervisor
            .embed(vec![text.clone()], false, DEADLINE)
            .await
            .unwrap();
        assert!(r.failed.is_empty(), "{r:?}");
        assert_eq!(r.vectors.get(0).unwrap(), stub_vector(&text).as_slice());
        served += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let status = &supervisor.status()[0];
    assert_eq!(
        status.restarts.len(),
        1,
        "only planned recycles: {status:?}"
    );
    assert_ne!(status.pid, Some(first));
    assert!(gone(first).await, "the leaking child was stopped");
    assert!(served > 10, "{served}");
}

#[tokio::test]
async fn a_hung_child_is_killed_and_replaced() {
    let mut supervision = config(1);
    supervision.poison_after = 1;
    // A call is a hang when it passes the backend's call deadline (not when
    // its caller stops waiting, see the supervisor's tests).
    let hanging = NativeSpawner {
        call_deadline: Duration::from_millis(300),
        call_deadline_per_kib: embedhost::limits::CALL_DEADLINE_PER_KIB,
        ..spawner(&[("fault.loop_marker", "HANG")])
    };
    let supervisor = Supervisor::start(hanging, supervision).await.unwrap();
    let pid = supervisor.status()[0].pid.unwrap();
    let started = Instant::now();
    let r = supervisor
        .embed(vec!["HANG".into()], false, Duration::from_secs(10))
        .await;
    // The call ran out of its deadline: the child is treated as hung.
    assert!(
        r.is_err() || r.as_ref().is_ok_and(|r| r.failed.len() == 1),
        "{r:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(
        gone(pid).await,
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
    assert!(
        gone(pid).await,
        "child {pid} still alive after the supervisor was dropped"
    );
}

#[test]
fn a_sigkilled_host_leaves_no_orphan() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("native.toml");
    std::fs::write(
        &config,
        "backend = \"native\"\n[native]\nengine = \"stub\"\n[plugin]\nconfig = { \"fault.sleep_ms\" = 60000 }\n",
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

#[test]
fn a_normal_exit_leaves_every_native_child_exited_with_status_0() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("embedhost.toml");
    std::fs::write(
        &config,
        "backend = \"native\"\n[native]\nengine = \"stub\"\n[supervisor]\npool_size = 2\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_embedhost"))
        .args([
            "--config",
            config.to_str().unwrap(),
            "embed",
            "one",
            "two",
            "three",
        ])
        .env("RUST_LOG", "embedhost::native=debug")
        .output_within(crate::PROCESS_LIMIT)
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let stopped: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("child stopped"))
        .collect();
    assert_eq!(stopped.len(), 2, "{err}");
    assert!(
        stopped.iter().all(|l| l.contains("exit status: 0")),
        "{err}"
    );
    assert!(!err.contains("killing it"), "{err}");
}

#[tokio::test]
async fn a_request_too_large_to_send_fails_alone_without_killing_the_child() {
    let supervisor = Supervisor::start(spawner(&[]), config(1)).await.unwrap();
    let pid = supervisor.status()[0].pid.unwrap();
    // Past the child transport's frame limit once encoded.
    let huge = "word ".repeat(embedhost::limits::MAX_FRAME_BYTES / 5 + 1);
    let r = supervisor
        .embed(vec!["a".into(), huge, "c".into()], false, DEADLINE)
        .await
        .unwrap();
    assert_eq!((r.vectors.len(), r.failed.len()), (2, 1), "{:?}", r.failed);
    assert_eq!(r.failed[0].index, 1);
    assert!(r.failed[0].reason.contains("frame"), "{:?}", r.failed);
    assert_eq!(r.vectors.get(1).unwrap(), stub_vector("c").as_slice());
    // The child was never at fault: the same process serves on.
    assert_eq!(supervisor.status()[0].pid, Some(pid));
    assert!(
        supervisor.restarts().is_empty(),
        "{:?}",
        supervisor.restarts()
    );
}

#[tokio::test]
async fn a_transient_child_is_restarted_after_a_crash_but_not_after_a_normal_exit() {
    use embedhost::supervisor::RestartType;
    for (restart, code, restarted) in [
        (RestartType::Transient, "0", false),
        (RestartType::Transient, "3", true),
        (RestartType::Permanent, "0", true),
    ] {
        let mut supervision = config(1);
        supervision.restart = restart;
        let spawner = spawner(&[("child.exit_marker", "BYE"), ("child.exit_code", code)]);
        let supervisor = Supervisor::start(spawner, supervision).await.unwrap();
        let r = supervisor.embed(vec!["BYE".into()], false, DEADLINE).await;
        let case = format!("{restart:?} with exit code {code}");
        if restarted {
            // Restarted after each exit, until the text is isolated.
            let r = r.unwrap_or_else(|e| panic!("{case}: {e}"));
            assert_eq!(r.failed.len(), 1, "{case}");
            assert!(supervisor.restarts().contains_key("exited"), "{case}");
        } else {
            // The slot left the pool; with none left, the call fails at once.
            let err = r.unwrap_err();
            assert!(
                matches!(&err, SupervisorError::Escalated(why) if why.contains("none is restarted")),
                "{case}: {err}"
            );
            assert!(
                supervisor.restarts().is_empty(),
                "{case}: {:?}",
                supervisor.restarts()
            );
        }
    }
}

/// Asked for by [`the_ceiling_makes_the_kernel_refuse_memory_past_it`] in a
/// process of its own: it lowers its own process's data limit for good.
const CEILING_PROBE: &str = "EMBEDHOST_TEST_CEILING_PROBE";

#[test]
#[ignore = "run in a process of its own by the_ceiling_makes_the_kernel_refuse_memory_past_it"]
fn ceiling_probe() {
    assert!(
        std::env::var_os(CEILING_PROBE).is_some(),
        "it would lower this test process's RLIMIT_DATA"
    );
    let ceiling: u64 = 1 << 30;
    embedhost::native::ceiling::apply(ceiling).unwrap();
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_DATA, &mut limit) }, 0);
    assert_eq!((limit.rlim_cur, limit.rlim_max), (ceiling, ceiling));
    // Twice the ceiling: refused by the kernel, not by some later check.
    let mut block: Vec<u8> = Vec::new();
    assert!(block.try_reserve_exact(2 << 30).is_err());
    // Well under it: fine.
    block.try_reserve_exact(16 << 20).unwrap();
}

#[test]
fn the_ceiling_makes_the_kernel_refuse_memory_past_it() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "native::ceiling_probe",
            "--ignored",
            "--test-threads=1",
        ])
        .env(CEILING_PROBE, "1")
        .output_within(crate::PROCESS_LIMIT)
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_child_whose_fault_settings_are_refused_answers_its_handshake_with_why_and_exits_when_asked()
 {
    use embedhost::bus::transport::child::ChildProcess;
    use embedhost::bus::{Bus, BusError, Empty, ErrorCode, SendOptions};
    use embedhost::messages::{EmbedderHandshake, Shutdown, ShutdownRequest};
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_embedhost"));
    command.args(["child", "--engine", "stub", "--set", "child.explode=1"]);
    let mut process = ChildProcess::spawn(command, "refused-child").unwrap();
    let bus = Bus::new(process.connection());
    let options = || SendOptions::default().timeout(DEADLINE);
    match bus.send::<EmbedderHandshake>(Empty {}, options()).await {
        Err(BusError::Remote(remote)) => {
            assert_eq!(remote.code, ErrorCode::Failed);
            assert!(
                remote.message.contains("unknown setting `child.explode`"),
                "{remote}"
            );
        }
        other => panic!("{other:?}"),
    }
    let request = ShutdownRequest {
        reason: "test".into(),
    };
    bus.send::<Shutdown>(request, options()).await.unwrap();
    let status = process
        .wait_for_exit(DEADLINE)
        .await
        .expect("the child exits when asked");
    assert!(status.success(), "{status}");
}
