//! `embedhost plugin add|list|remove` and `[plugin] name`: the stub plugin
//! added from a file and from a URL (a local HTTP server, resuming a cut
//! download), listed, run by name, and refused at the next load once its
//! stored file changes (a new `embed`, with the compiled plugin in the
//! artifact cache; a `serve` reload, the pool in force staying); what is
//! not a plugin, or not the bytes a sha256 names, refused
//! with the store left as it was.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use crate::OutputWithin;

/// Runs the CLI with `store` as its model store and `cache` as its
/// artifact cache.
fn embedhost(store: &Path, cache: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_embedhost"))
        .args(args)
        .env("EMBEDHOST_MODELS_DIR", store)
        .env("EMBEDHOST_CACHE_DIR", cache)
        .env_remove("RUST_LOG")
        .env_remove("EMBEDHOST_OFFLINE")
        .output_within(crate::PROCESS_LIMIT)
        .expect("run embedhost")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        stderr(&o)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The refusal of a command: its one line on stderr.
fn refused(o: Output) -> String {
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    err
}

fn stub() -> Vec<u8> {
    std::fs::read(embedhost::plugins::STUB).unwrap()
}

/// The stored plugins, as `plugin list --json` shows them.
fn listed(store: &Path, cache: &Path) -> Vec<serde_json::Value> {
    serde_json::from_str(&ok(embedhost(store, cache, &["plugin", "list", "--json"]))).unwrap()
}

/// What is in the store's directory of plugins (nothing after a refused
/// add, but resumable downloads).
fn entries(store: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(store.join("plugins"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A config running the stored plugin `name`.
fn config(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, format!("[plugin]\nname = \"{name}\"\n")).unwrap();
    path
}

fn embed(store: &Path, cache: &Path, config: &Path) -> Output {
    embedhost(
        store,
        cache,
        &["--config", config.to_str().unwrap(), "embed", "hello"],
    )
}

#[test]
fn a_stored_plugin_runs_by_name_until_its_file_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, cache) = (tmp.path().join("store"), tmp.path().join("cache"));
    let bytes = stub();
    let sha = embedhost::files::sha256_hex(&bytes);
    let out = ok(embedhost(
        &store,
        &cache,
        &["plugin", "add", embedhost::plugins::STUB, "--name", "stub"],
    ));
    assert!(out.contains("added stub in") && out.contains(&sha), "{out}");
    assert!(out.contains("no sha256 was given"), "{out}");
    let list = listed(&store, &cache);
    assert_eq!(list.len(), 1, "{list:?}");
    let entry = &list[0];
    assert_eq!(
        (entry["name"].as_str(), entry["sha256"].as_str()),
        (Some("stub"), Some(&*sha))
    );
    assert_eq!(entry["size"].as_u64(), Some(bytes.len() as u64));
    assert_eq!(entry["state"], "verified");
    assert_eq!(entry["contract"], "0.1.1");
    let source = std::fs::canonicalize(embedhost::plugins::STUB).unwrap();
    assert_eq!(entry["source"].as_str(), Some(source.to_str().unwrap()));
    let table = ok(embedhost(&store, &cache, &["plugin", "list"]));
    let row = table
        .lines()
        .find(|l| l.starts_with("stub "))
        .unwrap_or_default();
    assert!(
        row.contains(&sha[..12]) && row.contains("verified"),
        "{table}"
    );

    // Run by name, twice: the second load maps the cached artifact.
    let cfg = config(tmp.path(), "stub");
    for _ in 0..2 {
        let out = ok(embed(&store, &cache, &cfg));
        assert!(out.contains("\"vector\""), "{out}");
    }

    // One byte changed in place, same size and modification time: the
    // next load, with the compiled plugin still in the cache, is refused.
    let file = store.join("plugins/stub/plugin.wasm");
    let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
    let mut changed = bytes.clone();
    let last = changed.len() - 1;
    changed[last] ^= 1;
    std::fs::write(&file, &changed).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let err = refused(embed(&store, &cache, &cfg));
    let actual = embedhost::files::sha256_hex(&changed);
    assert!(
        err.contains(&sha) && err.contains(&actual) && err.contains("plugins/stub/plugin.wasm"),
        "{err}"
    );
    assert!(
        listed(&store, &cache)[0]["state"]
            .as_str()
            .unwrap()
            .starts_with("changed")
    );

    // Removed: gone from the list, and the config names what is stored.
    ok(embedhost(&store, &cache, &["plugin", "remove", "stub"]));
    assert!(listed(&store, &cache).is_empty());
    let err = refused(embed(&store, &cache, &cfg));
    assert!(
        err.contains("[plugin] name") && err.contains("no plugin `stub`"),
        "{err}"
    );
}

#[test]
fn what_is_not_a_stored_plugin_is_refused_and_nothing_is_added() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, cache) = (tmp.path().join("store"), crate::test_cache_dir());
    let stub_path = embedhost::plugins::STUB;
    let notes = tmp.path().join("notes.wasm");
    std::fs::write(&notes, "not a plugin\n").unwrap();
    let core = tmp.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    // Past the bound by a byte (sparse: nothing is written or read).
    let huge = tmp.path().join("huge.wasm");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(embedhost::limits::MAX_PLUGIN_FILE_BYTES + 1)
        .unwrap();
    let sha = embedhost::files::sha256_hex(&stub());
    let other = "0".repeat(64);
    let cases: [(Vec<&str>, Vec<&str>); 6] = [
        (
            vec![huge.to_str().unwrap()],
            vec!["huge.wasm", "limits::MAX_PLUGIN_FILE_BYTES"],
        ),
        (
            vec![notes.to_str().unwrap()],
            vec!["notes.wasm", "is not a WebAssembly component"],
        ),
        (
            vec![core.to_str().unwrap()],
            vec!["core.wasm", "core WebAssembly module"],
        ),
        (
            vec![stub_path, "--sha256", &other],
            vec![&sha, &other, "refused"],
        ),
        (
            vec![stub_path, "--name", "Bad/Name"],
            vec!["`Bad/Name`", "--name"],
        ),
        (vec!["/no/such/plugin.wasm"], vec!["/no/such/plugin.wasm"]),
    ];
    for (args, expected) in cases {
        let mut all = vec!["plugin", "add"];
        all.extend(&args);
        let err = refused(embedhost(&store, &cache, &all));
        for part in expected {
            assert!(err.contains(part), "{args:?}: {part}: {err}");
        }
        assert_eq!(entries(&store), Vec::<String>::new(), "{args:?}");
    }
    // A name is taken once; a model cannot take the plugins' directory.
    ok(embedhost(
        &store,
        &cache,
        &["plugin", "add", stub_path, "--name", "p", "--sha256", &sha],
    ));
    let err = refused(embedhost(
        &store,
        &cache,
        &["plugin", "add", stub_path, "--name", "p"],
    ));
    assert!(err.contains("already in the store"), "{err}");
    assert_eq!(entries(&store), ["p"]);
    let err = refused(embedhost(
        &store,
        &cache,
        &[
            "model",
            "add",
            tmp.path().to_str().unwrap(),
            "--id",
            "plugins",
        ],
    ));
    assert!(err.contains("directory of plugins"), "{err}");
    // `path` and `name` together, or a pin other than the store's.
    let cfg = tmp.path().join("both.toml");
    for (extra, expected) in [
        ("path = \"x.wasm\"\n", "[plugin] path and [plugin] name"),
        (&format!("sha256 = \"{other}\"\n")[..], "has sha256"),
    ] {
        std::fs::write(&cfg, format!("[plugin]\nname = \"p\"\n{extra}")).unwrap();
        let err = refused(embed(&store, &cache, &cfg));
        assert!(err.contains(expected), "{err}");
    }
    std::fs::write(
        &cfg,
        format!(
            "[plugin]\nname = \"p\"\nsha256 = \"{}\"\n",
            sha.to_uppercase()
        ),
    )
    .unwrap();
    ok(embed(&store, &cache, &cfg));
}

/// Serves `body` at `/dir/stub.wasm`, honouring `Range`; while `cut` holds
/// a length, a response ends after that many bytes. Each request's `Range`
/// header (empty if none) is recorded.
fn serve(body: Vec<u8>, cut: Arc<Mutex<Option<usize>>>) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/dir/stub.wasm", listener.local_addr().unwrap());
    let ranges = Arc::new(Mutex::new(Vec::new()));
    let seen = ranges.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut range = String::new();
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 2 {
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("range:") {
                    range = v.trim().to_string();
                }
                line.clear();
            }
            seen.lock().unwrap().push(range.clone());
            let start = range
                .strip_prefix("bytes=")
                .and_then(|v| v.trim_end_matches('-').parse::<usize>().ok())
                .unwrap_or(0);
            let head = match start {
                0 => format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n", body.len()),
                _ => format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{}\r\n",
                    body.len() - start,
                    body.len() - 1,
                    body.len()
                ),
            };
            let mut stream = stream;
            let _ = stream.write_all(format!("{head}Connection: close\r\n\r\n").as_bytes());
            let rest = &body[start..];
            let sent = match *cut.lock().unwrap() {
                Some(n) => &rest[..n.min(rest.len())],
                None => rest,
            };
            let _ = stream.write_all(sent);
        }
    });
    (url, ranges)
}

#[test]
fn a_url_is_fetched_verified_resumed_and_pinned() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, cache) = (tmp.path().join("store"), crate::test_cache_dir());
    let bytes = stub();
    let sha = embedhost::files::sha256_hex(&bytes);
    let cut = Arc::new(Mutex::new(None));
    let (url, ranges) = serve(bytes.clone(), cut.clone());
    let add = |source: &str, name: &str| {
        embedhost(&store, &cache, &["plugin", "add", source, "--name", name])
    };

    // Another sha256: refused naming both, nothing kept.
    let wrong = "f".repeat(64);
    let err = refused(add(&format!("{url}#sha256={wrong}"), "remote"));
    assert!(
        err.contains(&sha) && err.contains(&wrong) && err.contains(&url),
        "{err}"
    );
    assert_eq!(entries(&store), [".downloads"]);
    assert!(
        std::fs::read_dir(store.join("plugins/.downloads"))
            .unwrap()
            .next()
            .is_none()
    );

    // Cut after a third: refused, and the next add asks for the rest.
    let third = bytes.len() / 3;
    *cut.lock().unwrap() = Some(third);
    let pinned = format!("{url}#sha256={sha}");
    let err = refused(add(&pinned, "remote"));
    assert!(err.contains(&url), "{err}");
    *cut.lock().unwrap() = None;
    let out = ok(add(&pinned, "remote"));
    assert!(out.contains("verified   against the sha256"), "{out}");
    let resumed = format!("bytes={third}-");
    assert_eq!(ranges.lock().unwrap().last(), Some(&resumed));
    let manifest =
        std::fs::read_to_string(store.join("plugins/remote/.embedhost-manifest.toml")).unwrap();
    assert!(
        manifest.contains(&format!("https = \"{url}\"")),
        "{manifest}"
    );
    assert_eq!(
        std::fs::read(store.join("plugins/remote/plugin.wasm")).unwrap(),
        bytes
    );

    // No sha256: what was fetched is recorded, and its hash printed.
    let out = ok(add(&url, "unpinned"));
    assert!(
        out.contains(&sha) && out.contains("no sha256 was given"),
        "{out}"
    );
    let list = listed(&store, &cache);
    assert_eq!(list.len(), 2);
    assert!(
        list.iter()
            .all(|p| p["sha256"] == sha.as_str() && p["source"] == url.as_str())
    );
    ok(embed(&store, &cache, &config(tmp.path(), "remote")));

    // Offline, a URL is not fetched.
    let err = refused(embedhost(
        &store,
        &cache,
        &["plugin", "add", &url, "--name", "x", "--offline"],
    ));
    assert!(err.contains("offline"), "{err}");
}

/// The dimension `serve` answers with now.
fn served_dimension(s: &crate::serve::Service) -> usize {
    let (status, body) = s.post("/v1/embeddings", &serde_json::json!({ "input": "x" }));
    assert_eq!(status, 200, "{body}");
    body["data"][0]["embedding"].as_array().unwrap().len()
}

#[test]
fn a_reload_onto_a_changed_stored_plugin_is_refused_and_the_pool_in_force_stays() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, cache) = (tmp.path().join("store"), crate::test_cache_dir());
    ok(embedhost(
        &store,
        &cache,
        &["plugin", "add", embedhost::plugins::STUB, "--name", "stub"],
    ));
    let dir = tmp.path().join("serve");
    std::fs::create_dir(&dir).unwrap();
    let config = |dimension: u32| {
        format!(
            "[plugin]\nname = \"stub\"\n[plugin.config]\ndimension = \"{dimension}\"\n\
             [index]\ndir = \"index\"\n[supervisor]\npool_size = 1\n"
        )
    };
    let envs = [("EMBEDHOST_MODELS_DIR", store.as_os_str())];
    let s = crate::serve::Service::start_with(&dir, &config(8), &[], &envs);
    assert_eq!(served_dimension(&s), 8);

    // The stored file changed (still a plugin that would run), and a
    // reload to a new pool of it asked for: refused before anything is
    // compiled, the pool in force answering.
    let file = store.join("plugins/stub/plugin.wasm");
    let bytes = stub();
    let mut changed = bytes.clone();
    *changed.last_mut().unwrap() ^= 1;
    std::fs::write(&file, &changed).unwrap();
    std::fs::write(dir.join("embedhost.toml"), config(16)).unwrap();
    s.signal(libc::SIGHUP);
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(served_dimension(&s), 8);

    // The control: the same reload with the stored bytes back is made.
    std::fs::write(&file, &bytes).unwrap();
    s.signal(libc::SIGHUP);
    let until = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while served_dimension(&s) != 16 {
        assert!(std::time::Instant::now() < until, "the reload never came");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
