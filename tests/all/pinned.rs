//! Pinned plugin files: `[plugin] sha256` makes every load refuse a file
//! that differs, naming both hashes.

use std::path::Path;
use std::process::{Command, Output};

use crate::OutputWithin;

fn embed(config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_embedhost"))
        .args(["--config", config.to_str().unwrap(), "embed", "pinned"])
        .env("EMBEDHOST_CACHE_DIR", crate::test_cache_dir())
        .env_remove("RUST_LOG")
        .output_within(crate::PROCESS_LIMIT)
        .unwrap()
}

#[test]
fn a_pinned_plugin_loads_only_while_its_bytes_are_the_pinned_ones() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("plugin.wasm");
    let bytes = std::fs::read(embedhost::plugins::STUB).unwrap();
    std::fs::write(&plugin, &bytes).unwrap();
    let pinned = embedhost::files::sha256_hex(&bytes);
    let config = dir.path().join("embedhost.toml");
    let write = |sha256: &str| {
        let text = format!("[plugin]\npath = \"plugin.wasm\"\nsha256 = \"{sha256}\"\n");
        std::fs::write(&config, text).unwrap();
    };
    write(&pinned.to_uppercase());
    let out = embed(&config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Another file under the same name: refused, naming both hashes.
    let mut other = bytes.clone();
    other.extend_from_slice(b"\0\0\0\0");
    std::fs::write(&plugin, &other).unwrap();
    let out = embed(&config);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let actual = embedhost::files::sha256_hex(&other);
    assert!(
        err.contains(&pinned) && err.contains(&actual) && err.contains("plugin.wasm"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // A pin that is not a sha256, or on a built-in plugin: refused naming the key.
    for text in [
        "[plugin]\npath = \"plugin.wasm\"\nsha256 = \"abc\"\n".to_string(),
        format!("[plugin]\npath = \"builtin:stub\"\nsha256 = \"{pinned}\"\n"),
    ] {
        std::fs::write(&config, text).unwrap();
        let err = String::from_utf8_lossy(&embed(&config).stderr).into_owned();
        assert!(err.contains("[plugin] sha256"), "{err}");
    }
}
