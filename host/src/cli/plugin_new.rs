//! `embedhost plugin new NAME --lang rust|python|js`: a plugin project of
//! the contract's `model-plugin` world, written from the kits in `kits/`.
//!
//! The kits' files are compiled into the binary, so an installed
//! `embedhost` writes a project anywhere. Each kit is a working project
//! under its own name (`embedhost-plugin-python`, `-js`, `-rust`); a new
//! project gets NAME in its place, and a copy of the contract in `wit/`.
//!
//! # Invariants
//! - NAME is a letter, then letters, digits, `-` or `_` (at most
//!   [`MAX_NAME_CHARS`]): it becomes a file name, a Cargo package and an
//!   npm package, and all three take it.
//! - Nothing is written into an existing directory that holds anything.

use std::path::{Path, PathBuf};

use super::{PluginLang, PluginNewArgs};

/// The longest NAME taken ([`crate::limits::MAX_PLUGIN_NAME_CHARS`]).
pub const MAX_NAME_CHARS: usize = crate::limits::MAX_PLUGIN_NAME_CHARS;

/// The contract every kit gets a copy of, in `wit/embedder.wit`.
const CONTRACT: &str = include_str!("../../../wit/embedder.wit");

/// One kit: the name it is built under in the repository, and its files
/// (path in the project, contents).
struct Kit {
    name: &'static str,
    files: &'static [(&'static str, &'static str)],
}

const PYTHON: Kit = Kit {
    name: "embedhost-plugin-python",
    files: &[
        ("app.py", include_str!("../../../kits/python/app.py")),
        (
            "requirements.txt",
            include_str!("../../../kits/python/requirements.txt"),
        ),
        ("README.md", include_str!("../../../kits/python/README.md")),
        (
            ".gitignore",
            include_str!("../../../kits/python/.gitignore"),
        ),
    ],
};

const JS: Kit = Kit {
    name: "embedhost-plugin-js",
    files: &[
        ("app.js", include_str!("../../../kits/js/app.js")),
        ("build.mjs", include_str!("../../../kits/js/build.mjs")),
        (
            "package.json",
            include_str!("../../../kits/js/package.json"),
        ),
        (
            "package-lock.json",
            include_str!("../../../kits/js/package-lock.json"),
        ),
        ("README.md", include_str!("../../../kits/js/README.md")),
        (".gitignore", include_str!("../../../kits/js/.gitignore")),
    ],
};

const RUST: Kit = Kit {
    name: "embedhost-plugin-rust",
    files: &[
        ("Cargo.toml", include_str!("../../../kits/rust/Cargo.toml")),
        ("Cargo.lock", include_str!("../../../kits/rust/Cargo.lock")),
        ("src/lib.rs", include_str!("../../../kits/rust/src/lib.rs")),
        ("README.md", include_str!("../../../kits/rust/README.md")),
        (".gitignore", include_str!("../../../kits/rust/.gitignore")),
    ],
};

fn kit(lang: PluginLang) -> &'static Kit {
    match lang {
        PluginLang::Python => &PYTHON,
        PluginLang::Js => &JS,
        PluginLang::Rust => &RUST,
    }
}

pub(super) fn plugin_new(args: PluginNewArgs) -> Result<(), String> {
    check_name(&args.name)?;
    let parent = args.dir.unwrap_or_else(|| PathBuf::from("."));
    let dir = parent.join(&args.name);
    check_empty(&dir)?;
    let kit = kit(args.lang);
    let mut files: Vec<(&str, String)> = kit
        .files
        .iter()
        .map(|(path, text)| (*path, named(text, kit.name, &args.name)))
        .collect();
    files.push(("wit/embedder.wit", CONTRACT.to_string()));
    for (path, text) in &files {
        write(&dir.join(path), text)?;
    }
    outln!(
        "wrote {} ({} plugin of the model-plugin world, contract {})",
        dir.display(),
        args.lang.shown(),
        crate::wasm::contract::HOST_CONTRACT
    );
    outln!("\nnext steps:\n  cd {}", dir.display());
    for step in next_steps(args.lang, &args.name) {
        outln!("  {step}");
    }
    outln!("\nthen serve it: see README.md in the project");
    Ok(())
}

/// NAME must be a letter, then letters, digits, `-` or `_`.
pub fn check_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && name.len() <= MAX_NAME_CHARS;
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{}` is not a plugin name: use a letter, then letters, digits, `-` or `_` (at most {MAX_NAME_CHARS})",
            crate::untrusted::sanitize(name, MAX_NAME_CHARS * 2)
        ))
    }
}

fn check_empty(dir: &Path) -> Result<(), String> {
    match std::fs::read_dir(dir).map(|mut entries| entries.next().is_some()) {
        Ok(true) => Err(format!(
            "{} already exists and is not empty: choose another name or --dir",
            dir.display()
        )),
        Ok(false) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot use {}: {e}", dir.display())),
    }
}

/// `text` with the kit's name replaced by `name`: as it is, as a Rust
/// crate (`_`), and as an npm package's `name` (lowercase).
fn named(text: &str, kit: &str, name: &str) -> String {
    text.replace(
        &format!("\"name\": \"{kit}\""),
        &format!("\"name\": \"{}\"", name.to_lowercase()),
    )
    .replace(kit, name)
    .replace(&kit.replace('-', "_"), &name.replace('-', "_"))
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The commands that build and test the new project, from its directory.
pub fn next_steps(lang: PluginLang, name: &str) -> Vec<String> {
    match lang {
        PluginLang::Python => vec![
            "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt".into(),
            format!(
                ".venv/bin/componentize-py -d wit/embedder.wit -w model-plugin componentize app -o {name}.wasm"
            ),
            format!("embedhost plugin test {name}.wasm"),
        ],
        PluginLang::Js => vec![
            "npm ci".into(),
            "npm run build".into(),
            format!("embedhost plugin test {name}.wasm"),
        ],
        PluginLang::Rust => vec![
            "rustup target add wasm32-wasip2".into(),
            "cargo build --release --target wasm32-wasip2".into(),
            format!(
                "embedhost plugin test target/wasm32-wasip2/release/{}.wasm",
                name.replace('-', "_")
            ),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_refused_unless_identifier_like() {
        for good in [
            "a",
            "my-embedder",
            "My_Embedder2",
            &"x".repeat(MAX_NAME_CHARS),
        ] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "2fast",
            "-x",
            "a b",
            "a/b",
            "..",
            "a.b",
            "é",
            &"x".repeat(MAX_NAME_CHARS + 1),
        ] {
            let err = check_name(bad).unwrap_err();
            assert!(err.contains("is not a plugin name"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_kit_is_renamed_everywhere_and_npm_gets_lowercase() {
        let text = "\"name\": \"embedhost-plugin-js\"\nnode build.mjs embedhost-plugin-js.wasm\nembedhost_plugin_js";
        let out = named(text, "embedhost-plugin-js", "My-Kit");
        assert_eq!(
            out,
            "\"name\": \"my-kit\"\nnode build.mjs My-Kit.wasm\nMy_Kit"
        );
        for kit in [&PYTHON, &JS, &RUST] {
            assert!(
                kit.files.iter().any(|(_, text)| text.contains(kit.name)),
                "{} names itself somewhere",
                kit.name
            );
        }
    }
}
