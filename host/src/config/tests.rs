//! Parsing and validation of `embedhost.toml`.

use std::path::Path;

use super::*;
use crate::wasm::InstanceLimits;

#[test]
fn empty_file_gives_defaults() {
    let c = Config::parse("", Path::new("/etc/x/embedhost.toml")).unwrap();
    assert_eq!(c.backend, Backend::Wasm);
    assert!(c.plugin.path.is_none());
    assert_eq!(c.instance_limits(), InstanceLimits::default());
}

#[test]
fn relative_paths_follow_the_file_and_values_become_strings() {
    let text = "backend = \"wasm\"\n[plugin]\npath = \"p.wasm\"\nconfig = { dimension = 8, name = \"x\", on = true }\n";
    let c = Config::parse(text, Path::new("/etc/x/embedhost.toml")).unwrap();
    assert_eq!(c.plugin.path.as_deref(), Some(Path::new("/etc/x/p.wasm")));
    assert_eq!(
        c.plugin_config(),
        vec![
            ("dimension".into(), "8".into()),
            ("name".into(), "x".into()),
            ("on".into(), "true".into())
        ]
    );
}

#[test]
fn unknown_keys_name_the_key_and_the_file() {
    let err = Config::parse(
        "[limits]\nmemory_mbs = 5\n",
        Path::new("conf/embedhost.toml"),
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("memory_mbs"), "{msg}");
    assert!(msg.contains("conf/embedhost.toml"), "{msg}");
    let err = Config::parse("backnd = \"wasm\"\n", Path::new("a.toml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("backnd") && err.contains("a.toml"), "{err}");
}

#[test]
fn zero_intervals_are_refused_and_the_native_executable_follows_the_file() {
    let err = Config::parse(
        "[supervisor]\nhealth_interval_ms = 0\n",
        Path::new("a.toml"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("[supervisor]") && err.contains("a.toml"),
        "{err}"
    );
    let c = Config::parse(
        "backend = \"native\"\n[native]\nexecutable = \"bin/eh\"\n",
        Path::new("/etc/x/e.toml"),
    )
    .unwrap();
    assert_eq!(
        c.native.executable.as_deref(),
        Some(Path::new("/etc/x/bin/eh"))
    );
}

#[test]
fn unknown_backend_and_zero_limits_are_refused() {
    let err = Config::parse("backend = \"gpu\"\n", Path::new("a.toml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("gpu"), "{err}");
    let err = Config::parse("[limits]\nmemory_mb = 0\n", Path::new("a.toml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("greater than zero"), "{err}");
}

#[test]
fn only_the_backend_that_runs_decides_whether_the_models_files_are_used() {
    let uses = |text: &str| {
        Config::parse(text, Path::new("a.toml"))
            .unwrap()
            .uses_model_files()
    };
    // The default plugin line names the BERT plugin, but a native stub
    // engine never loads it: no tokenizer to read, nothing to fetch.
    assert!(!uses("backend = \"native\"\n[native]\nengine = \"stub\"\n"));
    assert!(uses("backend = \"native\"\n"));
    assert!(uses(""));
    assert!(!uses("[plugin]\npath = \"builtin:stub\"\n"));
}

/// The encoder's engine gets the model's own pooling and normalization,
/// never `[plugin.config]`'s (the plugin's own settings); `[plugin.encoder]`
/// overrides them. (paraphrase-MiniLM-L3-v2 is mean-pooled, not normalized.)
#[test]
fn the_encoder_gets_the_models_pooling_and_plugin_encoder_overrides_it() {
    let parse = |text: &str| Config::parse(text, Path::new("/etc/x/embedhost.toml")).unwrap();
    let key = |config: &[(String, String)], k: &str| {
        config
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    let c = parse(
        "[model]\nid = \"paraphrase-minilm-l3-v2\"\n[plugin]\npath = \"p.wasm\"\nconfig = { pooling = \"cls\", normalize = \"true\" }\n",
    );
    let encoder = c.encoder_config();
    assert_eq!(key(&encoder, "pooling"), None, "{encoder:?}");
    assert_eq!(key(&encoder, "normalize").as_deref(), Some("false"));
    assert_eq!(
        key(&encoder, "model_id").as_deref(),
        Some("paraphrase-minilm-l3-v2")
    );
    let c = parse(
        "[plugin]\npath = \"p.wasm\"\nencoder = { pooling = \"cls\", precision = \"fp32\" }\n",
    );
    let encoder = c.encoder_config();
    assert_eq!(key(&encoder, "pooling").as_deref(), Some("cls"));
    assert_eq!(key(&encoder, "precision").as_deref(), Some("fp32"));
    assert_eq!(encoder.iter().filter(|(k, _)| k == "pooling").count(), 1);
}
