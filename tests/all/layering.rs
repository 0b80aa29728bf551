//! The layering ARCHITECTURE.md promises, checked on the source: the
//! supervisor, the WASM backend and the native backend depend on
//! `backend.rs` and never on each other, so no import runs in a circle
//! between them.

use std::path::Path;

/// Every `crate::MODULE` path named in the Rust files under `dir`.
fn mentions(dir: &Path, module: &str) -> Vec<String> {
    let mut found = Vec::new();
    let needle = format!("crate::{module}");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(mentions(&path, module));
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or_default();
                if code.contains(&needle) {
                    found.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
                }
            }
        }
    }
    found
}

#[test]
fn supervisor_wasm_and_native_never_import_each_other() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for (module, forbidden) in [
        ("supervisor", ["wasm", "native"]),
        ("wasm", ["supervisor", "native"]),
        ("native", ["supervisor", "wasm"]),
    ] {
        for other in forbidden {
            let found = mentions(&src.join(module), other);
            assert!(
                found.is_empty(),
                "`{module}` imports `{other}`:\n{}",
                found.join("\n")
            );
        }
    }
    // And the shared layer depends on none of them.
    let backend = std::fs::read_to_string(src.join("backend.rs")).unwrap();
    for module in ["supervisor", "wasm", "native"] {
        assert!(
            !backend.contains(&format!("crate::{module}")),
            "backend.rs imports {module}"
        );
    }
}

#[test]
fn the_front_ends_sit_on_top_and_nothing_imports_them() {
    // `cli` may use `serve` (to find a running service), `serve` never uses
    // `cli`, and no other module uses either: both start pools through
    // `launch`.
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let found = mentions(&src.join("serve"), "cli");
    assert!(
        found.is_empty(),
        "`serve` imports `cli`:\n{}",
        found.join("\n")
    );
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        if ["cli", "serve", "main", "lib"].contains(&name.as_str()) {
            continue;
        }
        let found = if path.is_dir() {
            [mentions(&path, "cli"), mentions(&path, "serve")].concat()
        } else {
            let text = std::fs::read_to_string(&path).unwrap();
            text.lines()
                .filter(|l| {
                    let code = l.split("//").next().unwrap_or_default();
                    code.contains("crate::cli") || code.contains("crate::serve")
                })
                .map(str::to_string)
                .collect()
        };
        assert!(
            found.is_empty(),
            "`{name}` imports a front end:\n{}",
            found.join("\n")
        );
    }
}
