//! The `embedhost` binary, as a user runs it.

use crate::OutputWithin;

use std::process::{Command, Output};

fn embedhost(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_embedhost"))
        .args(args)
        .env("EMBEDHOST_CACHE_DIR", crate::test_cache_dir())
        .env_remove("RUST_LOG")
        .output_within(crate::PROCESS_LIMIT)
        .expect("run embedhost")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The `(text, vector)` rows of `embed`'s JSON lines.
pub(crate) fn vectors(o: &Output) -> Vec<(String, Vec<f32>)> {
    stdout(o)
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let vector: Vec<f32> = serde_json::from_value(v["vector"].clone()).unwrap();
            assert_eq!(v["dimension"].as_u64().unwrap() as usize, vector.len());
            (v["text"].as_str().unwrap().to_string(), vector)
        })
        .collect()
}

#[test]
fn embed_prints_a_unit_vector_per_text_and_is_deterministic() {
    let out = embedhost(&["embed", "--plugin", embedhost::plugins::STUB, "hello world"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rows = vectors(&out);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].0, "hello world");
    assert_eq!(rows[0].1.len(), 384);
    let norm: f32 = rows[0].1.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5);
    // The built-in stub gives the same vector as the stub's file.
    let again = embedhost(&["embed", "--plugin", "builtin:stub", "hello world"]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(vectors(&again), rows);
    let pair = vectors(&embedhost(&[
        "embed",
        "--plugin",
        "builtin:stub",
        "--query",
        "hello world",
        "hello big world",
        "zebra crossing",
    ]));
    let (a, b, c) = (&pair[0].1, &pair[1].1, &pair[2].1);
    assert!(embedhost::vectors::cosine(a, b) > embedhost::vectors::cosine(a, c));
}

#[test]
fn plugin_check_accepts_the_stub() {
    let out = embedhost(&["plugin", "check", embedhost::plugins::STUB]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("embedhost/stub-feature-hash") && text.contains("dimension:        384"),
        "{text}"
    );
}

#[test]
fn plugin_check_rejects_a_non_component_and_a_component_of_another_world() {
    let dir = tempfile::tempdir().unwrap();
    let core = dir.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    let out = embedhost(&["plugin", "check", core.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("core.wasm") && err.contains("not a WebAssembly component"),
        "{err}"
    );

    let out = embedhost(&["plugin", "check", embedhost::plugins::SHAPE_PROBE]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("not an embedhost plugin")
            && err.contains(embedhost::wasm::EXPORTED_INTERFACE),
        "{err}"
    );
}

#[test]
fn a_config_with_an_unknown_key_is_refused_naming_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("embedhost.toml");
    std::fs::write(&config, "backend = \"wasm\"\n[limits]\ncall_deadline = 5\n").unwrap();
    let out = embedhost(&["--config", config.to_str().unwrap(), "embed", "x"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("call_deadline") && err.contains(config.to_str().unwrap()),
        "{err}"
    );
}

#[test]
fn the_example_config_works_and_passes_its_plugin_config() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let config = root.join("examples/config/wasm.toml");
    let out = embedhost(&["--config", config.to_str().unwrap(), "embed", "hello"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(vectors(&out)[0].1.len(), 384);
}

#[test]
fn a_crashing_plugin_gives_an_error_and_a_non_zero_exit_not_a_crash_of_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("embedhost.toml");
    std::fs::write(
        &config,
        "[plugin]\npath = \"builtin:stub\"\nconfig = { \"fault.trap_marker\" = \"BOOM\" }\n",
    )
    .unwrap();
    let out = embedhost(&[
        "--config",
        config.to_str().unwrap(),
        "embed",
        "fine",
        "BOOM",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    let last = err.lines().last().unwrap_or_default();
    assert_eq!(last, "error: 1 of 2 texts could not be embedded", "{err}");
    // The poison text is named, the other one embedded.
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["dimension"], 384);
    assert_eq!(lines[1]["text"], "BOOM");
    let reason = lines[1]["error"].as_str().unwrap();
    assert!(
        reason.contains(&format!(
            "crashed {} instances",
            embedhost::limits::POISON_VERDICT_CRASHES
        )) && reason.contains("unreachable"),
        "{reason}"
    );
}

#[test]
fn an_escalated_backend_exits_non_zero_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("embedhost.toml");
    std::fs::write(
        &config,
        "[plugin]\npath = \"builtin:stub\"\nconfig = { \"fault.trap_marker\" = \"BOOM\" }\n[supervisor]\npool_size = 1\nmax_restarts = 0\n",
    )
    .unwrap();
    let out = embedhost(&["--config", config.to_str().unwrap(), "embed", "BOOM"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ")
            && last.contains("backend is recovering")
            && last.contains("failed 1 times"),
        "{err}"
    );
}

#[test]
fn swapping_the_backend_is_one_line_and_changes_no_output() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let texts = ["hello world", "Grüße aus Köln", ""];
    let run = |config: &str| {
        let config = root.join("examples/config").join(config);
        let mut args = vec!["--config", config.to_str().unwrap(), "embed"];
        args.extend(texts);
        let out = embedhost(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    let read =
        |name: &str| std::fs::read_to_string(root.join("examples/config").join(name)).unwrap();
    let (wasm_file, native_file) = (read("wasm.toml"), read("native.toml"));
    let differing: Vec<_> = wasm_file
        .lines()
        .zip(native_file.lines())
        .filter(|(a, b)| a != b)
        .collect();
    assert_eq!(wasm_file.lines().count(), native_file.lines().count());
    assert_eq!(
        differing,
        [("backend = \"wasm\"", "backend = \"native\"")],
        "one line"
    );
    let wasm = run("wasm.toml");
    assert_eq!(wasm.lines().count(), 3);
    assert_eq!(run("native.toml"), wasm, "the same vectors, bit for bit");
}

#[test]
fn status_model_check_and_stats_print_for_a_person() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("embedhost.toml");
    std::fs::write(
        &config,
        "[plugin]\npath = \"builtin:stub\"\n[supervisor]\npool_size = 1\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let out = embedhost(&["--config", config, "status"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for line in ["config:", "backend:", "instance 0:"] {
        assert!(text.contains(line), "{line}: {text}");
    }
    // A model store without the model: each file is named, and the fix.
    let models = dir.path().join("models");
    let out = Command::new(env!("CARGO_BIN_EXE_embedhost"))
        .args(["model", "check", "all-minilm-l6-v2"])
        .env("EMBEDHOST_MODELS_DIR", &models)
        .output_within(crate::PROCESS_LIMIT)
        .unwrap();
    assert!(!out.status.success());
    assert!(stdout(&out).contains("  missing  "), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("embedhost model fetch all-minilm-l6-v2"),
        "{}",
        stderr(&out)
    );
    // An index, and its stats as a person reads them.
    let docs = dir.path().join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    std::fs::write(docs.join("a.txt"), "a note about bicycles").unwrap();
    std::fs::write(docs.join("b.bin"), [0u8, 1, 2, 3]).unwrap();
    let db = dir.path().join("db");
    let db = db.to_str().unwrap();
    let out = embedhost(&[
        "--config",
        config,
        "index",
        "--db",
        db,
        docs.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = embedhost(&["--config", config, "stats", "--db", db]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("indexed:  1 files"), "{text}");
    assert!(
        text.contains("skipped:") && text.contains("b.bin"),
        "{text}"
    );
}

#[test]
fn a_reader_that_closes_the_pipe_early_ends_the_command_quietly_not_in_a_panic() {
    use std::io::Read;
    // As `embedhost embed ... | head -c 100` does: the reader takes a little
    // and closes its end while most of the output is still to be written.
    let texts: Vec<String> = (0..200).map(|i| format!("text number {i}")).collect();
    let mut child = Command::new(env!("CARGO_BIN_EXE_embedhost"))
        .args(["embed", "--plugin", "builtin:stub"])
        .args(&texts)
        .env("EMBEDHOST_CACHE_DIR", crate::test_cache_dir())
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 100];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert!(!err.contains("panicked"), "{err}");
    assert!(out.status.success(), "{:?} {err}", out.status);
}

#[test]
fn index_into_a_closed_pipe_stops_its_native_children_politely_not_by_sigkill() {
    // As `embedhost index DIR | head -0`: stdout is gone before the summary
    // is written. The command still ends through its normal path: each
    // child gets `shutdown` and exits 0 (logged at debug), none is killed.
    let root = tempfile::tempdir().unwrap();
    let docs = root.path().join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    std::fs::write(docs.join("a.txt"), "violin cello orchestra").unwrap();
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("examples/config/native.toml");
    let mut child = Command::new(env!("CARGO_BIN_EXE_embedhost"))
        .args(["-vv", "--config", config.to_str().unwrap(), "index", "--db"])
        .arg(root.path().join("db"))
        .arg(&docs)
        .env("EMBEDHOST_CACHE_DIR", crate::test_cache_dir())
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let (tx, rx) = std::sync::mpsc::channel();
    let pid = child.id();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = rx.recv_timeout(crate::PROCESS_LIMIT).unwrap_or_else(|_| {
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        panic!("index into a closed pipe did not end");
    });
    let out = out.unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "{:?} {err}", out.status);
    let stopped = err.lines().filter(|l| l.contains("child stopped")).count();
    assert!(stopped >= 1, "no child was stopped politely: {err}");
    assert!(
        err.lines()
            .filter(|l| l.contains("child stopped"))
            .all(|l| l.contains("exit status: 0")),
        "{err}"
    );
    assert!(!err.contains("killing it"), "{err}");
}

#[test]
fn embed_index_and_search_go_through_the_front_door() {
    // Only the front door logs to `embedhost::front_door`, once per job.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("embedhost.toml");
    std::fs::write(
        &config,
        "[plugin]\npath = \"builtin:stub\"\n[index]\ndir = \"index\"\n",
    )
    .unwrap();
    let docs = dir.path().join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    std::fs::write(docs.join("a.txt"), "a note about a flat tyre\nand a pump\n").unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_embedhost"))
            .current_dir(dir.path())
            .args(args)
            .env("EMBEDHOST_CACHE_DIR", crate::test_cache_dir())
            .env("RUST_LOG", "embedhost::front_door=debug")
            .output_within(crate::PROCESS_LIMIT)
            .expect("run embedhost");
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        let jobs = stderr(&out)
            .lines()
            .filter(|l| l.contains("embedhost::front_door") && l.contains("job"))
            .count();
        (out, jobs)
    };
    let (out, jobs) = run(&["embed", "one", "two"]);
    assert_eq!(vectors(&out).len(), 2);
    assert_eq!(jobs, 1, "embed: {}", stderr(&out));
    let (out, jobs) = run(&["index", "docs"]);
    assert!(jobs >= 1, "index: {}", stderr(&out));
    let (out, jobs) = run(&["search", "flat", "tyre"]);
    assert!(stdout(&out).contains("a.txt"), "{}", stdout(&out));
    assert_eq!(jobs, 1, "search: {}", stderr(&out));
}
