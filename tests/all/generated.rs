//! Machine-made text (generated, minified, lock files) is told from text
//! people write by its shape alone.

use crate::OutputWithin;

use std::path::{Path, PathBuf};

use embedhost::worker::extract::generated;

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if path.is_dir() {
            if !["target", ".git", "fuzz"].contains(&name.as_str()) {
                files(&path, out);
            }
        } else if ["rs", "md", "toml", "py", "txt", "wit", "sh"]
            .iter()
            .any(|e| name.ends_with(&format!(".{e}")))
        {
            out.push(path);
        }
    }
}

#[test]
fn text_people_write_is_never_taken_for_machine_made() {
    // Every source, document and config file of this repository.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut all = Vec::new();
    files(&root, &mut all);
    assert!(all.len() > 50, "{}", all.len());
    let mut flagged = Vec::new();
    for path in &all {
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        if let Some(why) = generated(&text) {
            flagged.push(format!("{}: {why}", path.display()));
        }
    }
    assert!(flagged.is_empty(), "{flagged:#?}");
    // And the Markdown of every crate this build downloaded (READMEs,
    // changelogs with long lists of links and versions).
    let registry = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_default()
        .join("registry/src");
    let mut checked = 0;
    for index in std::fs::read_dir(&registry).into_iter().flatten().flatten() {
        for krate in std::fs::read_dir(index.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            for entry in std::fs::read_dir(krate.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let path = entry.path();
                if path.extension().is_none_or(|e| e != "md") {
                    continue;
                }
                let Ok(text) = std::fs::read_to_string(&path) else {
                    continue;
                };
                checked += 1;
                if let Some(why) = generated(&text) {
                    flagged.push(format!("{}: {why}", path.display()));
                }
            }
        }
    }
    assert!(checked > 100, "{checked} registry files");
    assert!(flagged.is_empty(), "{flagged:#?}");
}

#[test]
fn generated_minified_and_lock_files_are_recognized_by_shape() {
    // A lock file: this repository's own.
    let lock = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.lock"))
        .unwrap();
    let why = generated(&lock).expect("Cargo.lock");
    assert!(why.contains("lock file"), "{why}");
    // A search index as documentation generators write it: JSON on one line.
    let index: Vec<serde_json::Value> = (0..400)
        .map(|i| serde_json::json!({ "id": i, "title": format!("Chapter {i}"), "terms": ["ownership", "borrowing", i] }))
        .collect();
    let js = format!(
        "window.searchIndex = {};",
        serde_json::to_string(&index).unwrap()
    );
    assert!(
        generated(&js).unwrap().contains("lines over"),
        "searchindex"
    );
    // Minified CSS, broken into short lines (some minifiers do).
    let css: String = (0..300)
        .map(|i| format!(".c{i}{{color:#{i:03x};margin:0}}\n"))
        .collect();
    assert!(generated(&css).is_some(), "minified css");
    // An SVG icon: its path data on one line, as drawing programs save it.
    let d: String = (0..300)
        .map(|i| format!("M{i}.5,{}.25L{},{}Z", i * 2, i + 3, i * 7))
        .collect();
    let svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 24 24\">\n<path d=\"{d}\"/>\n</svg>\n"
    );
    assert!(generated(&svg).is_some(), "svg");
    // Short files are never judged.
    assert!(generated("{\"a\":1}").is_none());
    // The toolchain's own documentation, where it is installed: its search
    // index and minified scripts are caught, its chapters are not.
    let docs = std::process::Command::new("rustc")
        .args(["--print", "sysroot"])
        .output_within(crate::PROCESS_LIMIT);
    if let Ok(out) = docs {
        let book = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
            .join("share/doc/rust/html/book");
        if book.is_dir() {
            let mut caught = 0;
            for entry in std::fs::read_dir(&book).unwrap().flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                let Ok(text) = std::fs::read_to_string(entry.path()) else {
                    continue;
                };
                let verdict = generated(&text);
                if name.starts_with("searchindex") || name.ends_with(".min.js") {
                    assert!(verdict.is_some(), "{name} not caught");
                    caught += 1;
                }
                if name.starts_with("ch") && name.ends_with(".html") {
                    let prose = embedhost::worker::extract::extract(&entry.path(), text.as_bytes())
                        .unwrap();
                    assert!(
                        generated(&prose).is_none(),
                        "{name}: {:?}",
                        generated(&prose)
                    );
                }
            }
            assert!(caught > 0);
        }
    }
}
