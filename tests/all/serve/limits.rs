//! The service under hostile clients (issue 27): slow-loris and idle
//! floods past the connection cap, bodies that never arrive or never end,
//! one admission limit across routes, and a SIGTERM with slow connections
//! open. Each runs on real sockets with a client beside the attack that
//! must keep being served; waits are polls of what the service reports,
//! bounded generously, never sleeps.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;

use super::{Service, eventually, metric, stub_config};

/// Longer than any of these tests' timeouts on a loaded machine, shorter
/// than a hang.
const WITHIN: Duration = Duration::from_secs(60);

fn connect(s: &Service) -> TcpStream {
    let addr = s.url.trim_start_matches("http://");
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(WITHIN)).unwrap();
    stream
}

/// The status line of the answer on `stream` ("" if it was closed first).
fn status_line(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n") {
        match stream.read(&mut byte) {
            Ok(0) => break,
            Ok(_) => got.push(byte[0]),
            Err(e) => panic!("no answer within {WITHIN:?}: {e}"),
        }
    }
    String::from_utf8_lossy(&got).trim().to_string()
}

/// The status line of the answer on `stream`, or "reset" if the service
/// reset it (closing a connection with a body still unread resets it, and
/// the answer can be lost with it).
fn status_or_reset(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n") {
        match stream.read(&mut byte) {
            Ok(0) => break,
            Ok(_) => got.push(byte[0]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return "reset".into(),
            Err(e) => panic!("no answer within {WITHIN:?}: {e}"),
        }
    }
    String::from_utf8_lossy(&got).trim().to_string()
}

/// Whether the service closed `stream` (EOF or reset) within [`WITHIN`].
fn closed_by_the_service(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 512];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A `kB` line of the service's `/proc/PID/status` (`VmRSS`, `VmHWM`), in
/// bytes.
fn memory(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no {field} in {status}"))
        * 1024
}

/// The memory bound README states for the service under hostile load, in
/// bytes above what it held before the attack: bodies
/// (`SERVE_BODY_BYTES_IN_FLIGHT`, plus the free first `SERVE_BODY_FREE_BYTES`
/// of each of `connections`), text being tokenized (about 100 bytes of the
/// tokenizer's state per byte of `SERVE_TOKENIZE_BYTES_IN_FLIGHT`), and
/// 64 MiB for connections' own buffers and the allocator.
fn memory_bound(connections: u64) -> u64 {
    use embedhost::limits::{
        SERVE_BODY_BYTES_IN_FLIGHT, SERVE_BODY_FREE_BYTES, SERVE_TOKENIZE_BYTES_IN_FLIGHT,
    };
    SERVE_BODY_BYTES_IN_FLIGHT as u64
        + connections * SERVE_BODY_FREE_BYTES as u64
        + 100 * SERVE_TOKENIZE_BYTES_IN_FLIGHT as u64
        + 64 * 1024 * 1024
}

/// Fails unless the service's peak RSS stayed within [`memory_bound`]
/// above `before` (its peak before the attack).
fn assert_within_memory_bound(s: &Service, before: u64, connections: u64) {
    let peak = memory(s.pid(), "VmHWM");
    assert!(
        peak < before + memory_bound(connections),
        "peak RSS {peak} past the bound {} above {before}",
        memory_bound(connections)
    );
}

fn metrics_of(s: &Service) -> String {
    let (status, text, _) = s.raw("GET", "/metrics", None, &[]);
    assert_eq!(status, 200, "{text}");
    text
}

/// A one-sentence client's request, which must be answered.
fn sentence(s: &Service, i: usize) {
    let (status, body) = s.post(
        "/v1/embeddings",
        &json!({ "input": format!("a background sentence, number {i}") }),
    );
    assert_eq!(status, 200, "the background client was refused: {body}");
}

#[test]
fn idle_and_slow_loris_floods_past_the_cap_leave_other_clients_served() {
    // A header timeout far longer than the test: only the cap can keep the
    // service's descriptors bounded here.
    const CAP: usize = 32;
    let config = stub_config(
        "wasm",
        "",
        &format!("[serve]\nmax_connections = {CAP}\nheader_timeout_ms = 120000\n"),
    );
    let s = Service::start(&config, &[]);
    let memory_before = memory(s.pid(), "VmHWM");
    sentence(&s, 0);
    let before = open_fds(s.pid());
    let mut flood = Vec::new();
    for i in 0..300 {
        let mut c = connect(&s);
        if i % 2 == 1 {
            c.write_all(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
        }
        flood.push(c);
        if i % 60 == 0 {
            sentence(&s, i);
        }
    }
    for i in 0..10 {
        sentence(&s, 1000 + i);
    }
    assert_eq!(s.get("/health").0, 200);
    eventually(WITHIN, "the service holds at most the cap", || {
        open_fds(s.pid()) <= before + CAP
    });
    let m = metrics_of(&s);
    assert!(metric(&m, "http_connections_open") <= CAP as f64, "{m}");
    assert!(metric(&m, "http_connections_evicted_total") >= 250.0, "{m}");
    // The oldest were closed to make room.
    assert!(closed_by_the_service(&mut flood[0]));
    assert_within_memory_bound(&s, memory_before, 4096);
}

#[test]
fn idle_and_slow_loris_connections_are_closed_at_the_header_timeout() {
    let config = stub_config("wasm", "", "[serve]\nheader_timeout_ms = 1000\n");
    let s = Service::start(&config, &[]);
    let memory_before = memory(s.pid(), "VmHWM");
    let mut idle: Vec<TcpStream> = (0..10).map(|_| connect(&s)).collect();
    // A slow-loris client keeps sending, a byte at a time: progress does
    // not extend the timeout.
    let mut loris = connect(&s);
    loris.write_all(b"GET /health HTTP/1.1\r\n").unwrap();
    let started = Instant::now();
    let mut cut = false;
    for _ in 0..600 {
        if loris.write_all(b"X").is_err() {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(cut, "a slow-loris client was kept {:?}", started.elapsed());
    // Cut by the configured 1 s, not by hyper's own default (30 s): a busy
    // machine is given 20 s of slack, never 30.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "cut after {:?}, not at header_timeout_ms = 1000",
        started.elapsed()
    );
    // A kept-alive connection that goes quiet is closed as well.
    let mut kept = connect(&s);
    kept.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_eq!(status_line(&mut kept), "HTTP/1.1 200 OK");
    assert!(
        closed_by_the_service(&mut kept),
        "an idle keep-alive was kept"
    );
    for c in &mut idle {
        assert!(closed_by_the_service(c), "an idle connection was kept");
    }
    sentence(&s, 0);
    assert_within_memory_bound(&s, memory_before, 4096);
}

#[test]
fn bodies_that_never_arrive_hold_no_slot_and_get_408() {
    let config = stub_config(
        "wasm",
        "",
        "[serve]\nmax_concurrent_requests = 2\nbody_timeout_ms = 15000\nmax_body_kb = 16\n",
    );
    let s = Service::start(&config, &[]);
    let memory_before = memory(s.pid(), "VmHWM");
    // Headers and the start of a body, never the rest.
    let mut held: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut c = connect(&s);
            c.write_all(
                b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"input\":",
            )
            .unwrap();
            c
        })
        .collect();
    // Two of them read (plus the /metrics request itself): with admission
    // before the body they would hold both slots now.
    eventually(WITHIN, "the held requests reach the service", || {
        metric(&metrics_of(&s), "http_requests_in_flight") >= 3.0
    });
    for i in 0..10 {
        sentence(&s, i);
    }
    for c in &mut held {
        assert_eq!(status_line(c), "HTTP/1.1 408 Request Timeout");
    }
    // A declared body past the limit: 413 before any of it is sent.
    let mut huge = connect(&s);
    huge.write_all(b"POST /embed HTTP/1.1\r\nHost: x\r\ncontent-length: 10000000000\r\n\r\n")
        .unwrap();
    assert_eq!(status_line(&mut huge), "HTTP/1.1 413 Payload Too Large");
    // A chunked body that never ends: 413 once it passes the limit.
    let mut endless = connect(&s);
    endless
        .write_all(b"POST /embed HTTP/1.1\r\nHost: x\r\ntransfer-encoding: chunked\r\n\r\n")
        .unwrap();
    let writer = {
        let mut endless = endless.try_clone().unwrap();
        std::thread::spawn(move || {
            let chunk = format!("400\r\n{}\r\n", "a".repeat(0x400));
            let until = Instant::now() + WITHIN;
            while Instant::now() < until && endless.write_all(chunk.as_bytes()).is_ok() {}
        })
    };
    assert_eq!(status_line(&mut endless), "HTTP/1.1 413 Payload Too Large");
    drop(endless);
    writer.join().unwrap();
    sentence(&s, 100);
    assert_within_memory_bound(&s, memory_before, 4096);
}

#[test]
fn one_admission_limit_holds_across_routes() {
    // Each call sleeps 6 s: whichever two requests are admitted first hold
    // both slots while the others arrive, on whichever route.
    let config = stub_config(
        "wasm",
        "\"fault.sleep_ms\" = \"6000\"",
        "[serve]\nmax_concurrent_requests = 2\n",
    );
    let s = Service::start(&config, &[]);
    let memory_before = memory(s.pid(), "VmHWM");
    let answers = std::thread::scope(|scope| {
        let requests: Vec<_> = [
            ("/v1/embeddings", json!({ "input": "one route" })),
            ("/v1/embeddings", json!({ "input": "the same route" })),
            ("/embed", json!({ "inputs": "another route" })),
            ("/search", json!({ "query": "a third route" })),
        ]
        .into_iter()
        .map(|(path, body)| {
            let s = &s;
            scope.spawn(move || s.raw("POST", path, Some(body.to_string()), &[]))
        })
        .collect();
        eventually(WITHIN, "both slots are taken", || {
            metric(&metrics_of(&s), "http_requests_admitted") >= 2.0
        });
        // Outside the limit.
        assert_eq!(s.get("/health").0, 200);
        assert_eq!(s.get("/ready").0, 200);
        requests
            .into_iter()
            .map(|r| r.join().unwrap())
            .collect::<Vec<_>>()
    });
    // One limit for all routes: two answered, two refused (a limit per
    // route would have answered all four).
    let ok = answers.iter().filter(|a| a.0 == 200).count();
    let statuses: Vec<u16> = answers.iter().map(|a| a.0).collect();
    assert_eq!(ok, 2, "{statuses:?}");
    for (status, text, retry) in answers.iter().filter(|a| a.0 != 200) {
        assert_eq!(*status, 429, "{text}");
        assert_eq!(retry.as_deref(), Some("1"));
        assert!(text.contains("max_concurrent_requests"), "{text}");
    }
    assert_within_memory_bound(&s, memory_before, 4096);
}

#[test]
fn sigterm_closes_idle_and_slow_connections_at_once_and_says_so() {
    // A grace period and header timeout longer than the test's bound: only
    // closing them at the stop lets the service exit in time.
    let config = stub_config(
        "wasm",
        "",
        "[serve]\nshutdown_grace_ms = 120000\nheader_timeout_ms = 120000\nbody_timeout_ms = 120000\n",
    );
    let mut s = Service::start(&config, &[]);
    let idle: Vec<TcpStream> = (0..5).map(|_| connect(&s)).collect();
    let loris: Vec<TcpStream> = (0..5)
        .map(|_| {
            let mut c = connect(&s);
            c.write_all(b"POST /embed HTTP/1.1\r\nHost: x\r\n").unwrap();
            c
        })
        .collect();
    let mut slow_bodies: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut c = connect(&s);
            c.write_all(b"POST /embed HTTP/1.1\r\nHost: x\r\ncontent-length: 50\r\n\r\n{")
                .unwrap();
            c
        })
        .collect();
    eventually(WITHIN, "the slow bodies reach the service", || {
        metric(&metrics_of(&s), "http_requests_in_flight") >= 4.0
    });
    s.signal(libc::SIGTERM);
    let started = Instant::now();
    let status = s.wait_exit(WITHIN);
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() < WITHIN);
    for c in &mut slow_bodies {
        assert_eq!(status_line(c), "HTTP/1.1 503 Service Unavailable");
    }
    let last = s.rest_of_stdout();
    assert!(last.contains(" 0 cut off;"), "{last}");
    assert!(last.contains("3 answered during the drain"), "{last}");
    let closed: usize = last
        .split("; ")
        .nth(2)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{last}"));
    assert!(closed >= 10, "{last}");
    drop((idle, loris));
}

/// Batches the service has formed so far.
fn batches(s: &Service) -> f64 {
    metric(&metrics_of(s), "embed_batch_size_count")
}

#[test]
fn a_single_sentence_is_not_queued_behind_every_piece_of_the_largest_request() {
    // The largest request these limits allow: 64 inputs at the model's
    // window (the stub reads 256 words), one piece per input at a budget
    // of 256 tokens, each call 300 ms: 32 rounds on two instances.
    let config = stub_config(
        "wasm",
        "\"fault.sleep_ms\" = \"300\"",
        "[serve]\nmax_inputs = 64\nmax_batch_tokens = 256\n",
    );
    let s = Service::start(&config, &[]);
    let memory_before = memory(s.pid(), "VmHWM");
    let passage = vec!["word"; 256].join(" ");
    let largest = vec![passage; 64];
    std::thread::scope(|scope| {
        let big = scope.spawn(|| s.post("/embed", &json!({ "inputs": largest })));
        eventually(WITHIN, "the large request is being embedded", || {
            batches(&s) >= 3.0
        });
        let before = batches(&s);
        let (status, body) = s.post("/v1/embeddings", &json!({ "input": "one sentence" }));
        assert_eq!(status, 200, "{body}");
        // Counted, not timed: first in, first out, the sentence would wait
        // for the 60 pieces still queued; round-robin, for at most one
        // batch per lane (two) before its own, and those formed while
        // this thread reads the count (generous: a busy machine may stall
        // it for seconds).
        let ran = batches(&s) - before;
        assert!(ran <= 20.0, "{ran} batches ran before the sentence's");
        let (status, body) = big.join().unwrap();
        assert_eq!(status, 200);
        assert_eq!(body.as_array().map(Vec::len), Some(64));
    });
    assert_within_memory_bound(&s, memory_before, 4096);
}

#[test]
fn a_request_that_cannot_finish_in_its_deadline_is_refused_before_any_work() {
    // Each call takes 100 ms per KiB of text: slow enough that the pool's
    // measured speed makes 64 passages far longer than half a second.
    let config = stub_config(
        "wasm",
        "\"fault.sleep_ms_per_kib\" = \"100\"",
        "[serve]\nmax_inputs = 64\n",
    );
    let s = Service::start(&config, &[]);
    let passage = vec!["word"; 250].join(" ");
    // Batches large enough to measure the pool by (two passages each).
    let (status, _) = s.post("/embed", &json!({ "inputs": vec![passage.clone(); 8] }));
    assert_eq!(status, 200);
    let before = batches(&s);
    let (status, e) = s.call(
        "POST",
        "/v1/embeddings",
        Some(json!({ "input": vec![passage; 64] }).to_string()),
        &[("x-embedhost-deadline-ms", "500")],
    );
    assert_eq!(status, 413, "{e}");
    let message = e["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("16000 tokens") && message.contains("deadline"),
        "{message}"
    );
    assert_eq!(e["error"]["code"], "request_too_large");
    assert_eq!(batches(&s), before, "the refused request cost a batch");
    // A sentence fits the same deadline.
    let (status, _) = s.call(
        "POST",
        "/v1/embeddings",
        Some(json!({ "input": "one sentence" }).to_string()),
        &[("x-embedhost-deadline-ms", "5000")],
    );
    assert_eq!(status, 200);
}

#[test]
fn oversized_strings_in_parallel_are_refused_from_their_words_before_tokenizing() {
    let s = Service::start(&stub_config("wasm", "", ""), &[]);
    sentence(&s, 0);
    let before = memory(s.pid(), "VmRSS");
    // Just under the 4 MiB body limit: 1.3 million words.
    let huge = "ab ".repeat(1_300_000);
    let body = json!({ "input": huge }).to_string();
    std::thread::scope(|scope| {
        let attackers: Vec<_> = (0..16)
            .map(|_| {
                let (s, body) = (&s, body.clone());
                scope.spawn(move || s.call("POST", "/v1/embeddings", Some(body), &[]))
            })
            .collect();
        for i in 0..10 {
            sentence(&s, i);
        }
        for attacker in attackers {
            let (status, e) = attacker.join().unwrap();
            assert_eq!(status, 400, "{e}");
            let message = e["error"]["message"].as_str().unwrap();
            // Counted from its words, not its tokens: nothing was tokenized.
            assert!(message.contains("at least 1300000 tokens"), "{message}");
        }
    });
    sentence(&s, 100);
    // The bound: each of the 16 bodies in flight costs at most eight times
    // its size (the body, its JSON, the text, copies), and memory returns
    // (glibc gives large blocks back, see `memory.rs`). Measured: 32 MB
    // before, 80 MB at the peak, 34 MB after.
    const BODY: u64 = 4 * 1024 * 1024;
    let (peak, after) = (memory(s.pid(), "VmHWM"), memory(s.pid(), "VmRSS"));
    assert!(
        peak < before + 16 * 8 * BODY,
        "peak RSS {peak}, {before} before"
    );
    assert!(
        after < before + 8 * BODY,
        "RSS {after} after, {before} before"
    );
}

#[test]
fn ready_stays_200_while_a_reload_starts_its_pool_and_the_old_one_serves() {
    // The new pool's native children start 3 s late (a wrapper sleeps,
    // then runs the real child): a reload window long enough to watch.
    let dir = tempfile::tempdir().unwrap().keep();
    let wrapper = dir.join("slow-child.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nsleep 3\nexec {} \"$@\"\n",
            env!("CARGO_BIN_EXE_embedhost")
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let s = Service::start_in(&dir, &stub_config("wasm", "", ""), &[]);
    let native = stub_config("native", "", "")
        .replace(env!("CARGO_BIN_EXE_embedhost"), wrapper.to_str().unwrap());
    std::fs::write(dir.join("embedhost.toml"), native).unwrap();
    s.signal(libc::SIGHUP);
    let (mut reloading, mut swapped) = (0, false);
    let until = Instant::now() + WITHIN;
    while !swapped {
        assert!(Instant::now() < until, "the reload never finished");
        let (status, ready) = s.get("/ready");
        assert_eq!(status, 200, "{ready}");
        if ready["reloading"] == true {
            reloading += 1;
            // The old pool serves meanwhile.
            sentence(&s, reloading);
        }
        swapped = ready["backend"] == "native";
    }
    assert!(reloading > 0, "never saw the reload");
}

#[test]
fn large_bodies_past_the_bytes_in_flight_are_refused_and_sentences_still_pass() {
    // 70 bodies of 4 MiB less one byte, never finished: 289 MB past their
    // free first 64 KiB, more than the 256 MiB all bodies may hold.
    let config = stub_config("wasm", "", "[serve]\nbody_timeout_ms = 10000\n");
    let s = Service::start(&config, &[]);
    sentence(&s, 0);
    let before = memory(s.pid(), "VmRSS");
    const BODY: usize = 4 * 1024 * 1024;
    let chunk = vec![b' '; BODY - 1];
    let mut held: Vec<TcpStream> = (0..70)
        .map(|_| {
            let mut c = connect(&s);
            let head = format!(
                "POST /v1/embeddings HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: {BODY}\r\n\r\n"
            );
            // A refused body's connection is closed under the writer.
            let _ = c.write_all(head.as_bytes()).and_then(|()| c.write_all(&chunk));
            c
        })
        .collect();
    for i in 0..10 {
        sentence(&s, i + 1);
    }
    let peak = memory(s.pid(), "VmHWM");
    let statuses: Vec<String> = held.iter_mut().map(status_or_reset).collect();
    // Refused early: answered 429, or reset with the answer (only a
    // refusal closes a connection before the body timeout).
    let crowded = statuses
        .iter()
        .filter(|l| matches!(l.as_str(), "HTTP/1.1 429 Too Many Requests" | "reset"))
        .count();
    let late = statuses
        .iter()
        .filter(|l| l.as_str() == "HTTP/1.1 408 Request Timeout")
        .count();
    assert!(crowded >= 1 && crowded + late == 70, "{statuses:?}");
    // The bodies' memory is bounded by the budget (and the free 64 KiB of
    // each), with room for the copies a request makes.
    assert!(
        peak < before + 2 * 256 * 1024 * 1024 + 70 * 64 * 1024,
        "peak RSS {peak}, {before} before"
    );
    sentence(&s, 100);
}

/// A service started as `start_in` does, but under a file descriptor limit
/// of `nofile` (soft and hard), as systemd's default or a container sets.
fn start_with_nofile(config: &str, nofile: u64) -> Service {
    use std::io::BufRead as _;
    let dir = tempfile::tempdir().unwrap().keep();
    std::fs::write(dir.join("embedhost.toml"), config).unwrap();
    let mut child = std::process::Command::new("prlimit")
        .arg(format!("--nofile={nofile}:{nofile}"))
        .arg(env!("CARGO_BIN_EXE_embedhost"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .current_dir(&dir)
        .env("EMBEDHOST_CACHE_DIR", crate::test_cache_dir())
        .env_remove("RUST_LOG")
        .env_remove("EMBEDHOST_API_KEY")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("prlimit (util-linux)");
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in `{line}`"))
        .to_string();
    let s = Service {
        child: Some(child),
        stdout: Some(stdout),
        url,
        dir,
        agent: super::agent(),
    };
    eventually(WITHIN, "the service becomes ready", || {
        s.get("/ready").0 == 200
    });
    s
}

#[test]
fn an_idle_flood_past_a_low_fd_limit_is_capped_below_it() {
    // 400 descriptors in all, and a header timeout longer than the test:
    // only the cap (400 / 2 = 200 connections, the reserve of 256 not
    // fitting) keeps accept from running out of descriptors.
    const NOFILE: u64 = 400;
    let config = stub_config("wasm", "", "[serve]\nheader_timeout_ms = 120000\n");
    let s = start_with_nofile(&config, NOFILE);
    let memory_before = memory(s.pid(), "VmHWM");
    sentence(&s, 0);
    let flood: Vec<TcpStream> = (0..600).map(|_| connect(&s)).collect();
    for i in 0..10 {
        sentence(&s, i + 1);
    }
    assert_eq!(s.get("/health").0, 200);
    assert!(open_fds(s.pid()) < NOFILE as usize, "{}", open_fds(s.pid()));
    let m = metrics_of(&s);
    assert!(metric(&m, "http_connections_open") <= 200.0, "{m}");
    drop(flood);
    assert_within_memory_bound(&s, memory_before, 4096);
}

/// A text of `words` words of 90 letters each, none in a vocabulary: it
/// passes the word check (one token per word at least) yet costs the real
/// tokenizer hundreds of thousands of word pieces.
fn costly_text(words: usize) -> String {
    (0..words)
        .map(|i| {
            (0..90)
                .map(|j| (b'a' + ((i * 7 + j * j * 13) % 26) as u8) as char)
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn costly_texts_in_parallel_keep_the_real_models_service_within_its_memory_bound() {
    // The default model (all-MiniLM-L6-v2 on WASM) and its real tokenizer.
    let models = crate::onnx::real_model().parent().unwrap().to_path_buf();
    let dir = tempfile::tempdir().unwrap().keep();
    let config = "backend = \"wasm\"\n[index]\ndir = \"index\"\n[supervisor]\npool_size = 2\n";
    let offline = std::ffi::OsString::from("1");
    let s = Service::start_with(
        &dir,
        config,
        &[],
        &[
            ("EMBEDHOST_MODELS_DIR", models.as_os_str()),
            ("EMBEDHOST_OFFLINE", offline.as_os_str()),
        ],
    );
    for i in 0..4 {
        sentence(&s, i);
    }
    let before = memory(s.pid(), "VmRSS").max(memory(s.pid(), "VmHWM"));
    // 32 requests of 8,000 words (720 KB) each at once: 23 MB of text to
    // tokenize, of which at most 8 MiB is tokenized at a time.
    let body = json!({ "input": costly_text(8000) }).to_string();
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let attackers: Vec<_> = (0..32)
            .map(|_| {
                let (s, body) = (&s, body.clone());
                scope.spawn(move || s.call("POST", "/v1/embeddings", Some(body), &[]).0)
            })
            .collect();
        for i in 0..10 {
            sentence(&s, 100 + i);
        }
        attackers.into_iter().map(|a| a.join().unwrap()).collect()
    });
    // Each was tokenized and refused for its tokens, or told to retry
    // while the tokenizer's share was taken; none crashed the service.
    assert!(
        statuses.iter().all(|s| [400, 429].contains(s)),
        "{statuses:?}"
    );
    assert!(
        statuses.contains(&400),
        "nothing was tokenized: {statuses:?}"
    );
    sentence(&s, 200);
    let (peak, after) = (memory(s.pid(), "VmHWM"), memory(s.pid(), "VmRSS"));
    eprintln!(
        "real model: {} MB before, {} MB at the peak, {} MB after; {statuses:?}",
        before >> 20,
        peak >> 20,
        after >> 20
    );
    // The bound README states, for these 32 connections.
    assert_within_memory_bound(&s, before, 32);
    assert!(
        after < before + 64 * 1024 * 1024,
        "RSS {after} after, {before} before"
    );
}
