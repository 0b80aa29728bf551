//! What a stranger on the service's port can learn of the machine: nothing
//! outside `[serve] index_roots`, whether a path exists or not.

use serde_json::json;

use crate::serve::{Service, stub_config};

#[test]
fn index_and_forget_answer_the_same_outside_the_roots_whether_the_path_exists_or_not() {
    let dir = tempfile::tempdir().unwrap().keep();
    let docs = dir.join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    std::fs::write(docs.join("a.txt"), "violin cello orchestra").unwrap();
    let config = stub_config(
        "wasm",
        "",
        "[serve]\nindex_roots = [\"docs\"]\nwatch = false\n",
    );
    let s = Service::start_in(&dir, &config, &[]);
    let outside = dir.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let climbing = format!("{}/../outside", docs.display());
    let missing_climbing = format!("{}/../no-such-folder", docs.display());
    let answers: Vec<(u16, String)> = [
        outside.display().to_string(),
        dir.join("no-such-folder").display().to_string(),
        climbing,
        missing_climbing,
        "/etc".into(),
        "/no/such/path/anywhere".into(),
    ]
    .iter()
    .flat_map(|path| {
        let index = s.post("/index", &json!({ "paths": [path] }));
        let forget = s.post("/forget", &json!({ "path": path }));
        [index, forget].map(|(status, e)| {
            // The path is named as it was given; the rest must not depend on it.
            let message = e["error"]
                .as_str()
                .unwrap_or_default()
                .replace(path.as_str(), "PATH");
            (status, message)
        })
    })
    .collect();
    for (i, answer) in answers.iter().enumerate() {
        assert_eq!(answer.0, 403, "{i}: {answer:?}");
        assert_eq!(answer, &answers[i % 2], "{i}: {answers:#?}");
    }
    // Inside the roots, `..` that stays inside is fine.
    let inside = format!("{}/../docs/a.txt", docs.display());
    let (status, e) = s.post("/index", &json!({ "paths": [inside] }));
    assert_eq!(status, 202, "{e}");
}

#[test]
fn the_cli_uses_a_running_service_only_when_it_would_run_the_same_embedder() {
    let dir = tempfile::tempdir().unwrap().keep();
    let s = Service::start_in(&dir, &stub_config("wasm", "dimension = \"32\"", ""), &[]);
    let index = dir.join("index");
    // The same config: answered by the service, silently.
    let same = s.cli(&["embed", "hello"]);
    assert!(
        same.status.success(),
        "{}",
        String::from_utf8_lossy(&same.stderr)
    );
    assert_eq!(crate::cli::vectors(&same)[0].1.len(), 32);
    assert!(!String::from_utf8_lossy(&same.stderr).contains("another embedder"));
    // Another config for the same index (another dimension): run here, and
    // said so; the service's model never answers for it.
    let other = dir.join("other.toml");
    std::fs::write(
        &other,
        format!(
            "{}\n",
            stub_config("wasm", "dimension = \"16\"", "")
                .replace("dir = \"index\"", &format!("dir = \"{}\"", index.display()))
        ),
    )
    .unwrap();
    let out = s.cli(&["--config", other.to_str().unwrap(), "embed", "hello"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(crate::cli::vectors(&out)[0].1.len(), 16, "{err}");
    assert!(err.contains("runs another embedder"), "{err}");
}

#[test]
fn an_api_key_on_the_command_line_is_warned_of_as_visible_to_local_users() {
    use crate::OutputWithin;
    // The service cannot bind this address, so it ends at once; the warning
    // comes first.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_embedhost"))
        .args([
            "serve",
            "--listen",
            "256.0.0.1:1",
            "--api-key",
            "0123456789abcdef0123",
        ])
        .env("EMBEDHOST_CACHE_DIR", crate::test_cache_dir())
        .env_remove("EMBEDHOST_API_KEY")
        .output_within(crate::PROCESS_LIMIT)
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("--api-key is visible to every local user")
            && err.contains("EMBEDHOST_API_KEY"),
        "{err}"
    );
    assert!(
        !err.contains("0123456789abcdef0123"),
        "the key is never echoed: {err}"
    );
}
