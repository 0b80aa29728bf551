//! Where `./x setup` put the native dependencies that are not crates: ONNX
//! Runtime's library (`onnxruntime/`) and the Python tools (`venv/`).
//!
//! `$EMBEDHOST_DEPS` if set (the `x` script sets it), else an
//! `embedhost-deps` directory beside the executable or up to two levels
//! above it: `target/embedhost-deps` serves `target/release/embedhost`,
//! `target/debug/embedhost` and the test binaries in `target/debug/deps`.

use std::path::PathBuf;

/// Environment variable naming the directory.
pub const DEPS_ENV: &str = "EMBEDHOST_DEPS";

/// The directory's name under `target/`.
pub const DEPS_DIR_NAME: &str = "embedhost-deps";

/// The dependencies directory, if there is one.
pub fn deps_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os(DEPS_ENV) {
        return Some(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().ok()?;
    exe.ancestors()
        .skip(1)
        .take(3)
        .map(|dir| dir.join(DEPS_DIR_NAME))
        .find(|dir| dir.is_dir())
}

/// The setup's Python (with `onnx` and `numpy`), if it exists.
pub fn python() -> Option<PathBuf> {
    deps_dir()
        .map(|d| d.join("venv/bin/python"))
        .filter(|p| p.exists())
}
