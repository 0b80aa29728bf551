//! A hostile plugin, as a test fixture: it behaves until it sees the text
//! [`TRIGGER`], then carries out the attack its `mode` names.
//!
//! Attacks that probe the sandbox (`files`, `env`, `socket`) answer with a
//! `model-failure` value describing what they tried: it starts with
//! `contained:` when every attempt was refused and `ESCAPED:` when one got
//! through, so a test can tell the two apart. The others (`alloc`,
//! `recurse`, `giant_output`, `init_loop`) are the crash or the abuse itself;
//! the host must turn each into a typed error and a fresh instance.

use std::sync::Mutex;

wit_bindgen::generate!({
    path: "../../wit",
    world: "plugin",
});

use embedhost::embedder::host_log::{self, Level};
use embedhost::embedder::types::{EmbedError, Embeddings, HealthReport, InputKind, ModelInfo};
use embedhost_plugin_support::linear_memory_bytes;
use exports::embedhost::embedder::embedder::Guest;

/// The text that sets off the attack.
pub const TRIGGER: &str = "attack";

const DIMENSION: u32 = 4;

struct Config {
    mode: String,
    /// A host path the `files` attack tries to create and read.
    probe: Option<String>,
    /// A socket address the `socket` attack tries to reach.
    addr: Option<String>,
}

static CONFIG: Mutex<Option<Config>> = Mutex::new(None);
static PROCESSED: Mutex<u64> = Mutex::new(0);

struct Hostile;

impl Guest for Hostile {
    fn init(config: Vec<(String, String)>) -> Result<ModelInfo, EmbedError> {
        let mut parsed = Config {
            mode: String::new(),
            probe: None,
            addr: None,
        };
        for (key, value) in config {
            match key.as_str() {
                "mode" => parsed.mode = value,
                "probe" => parsed.probe = Some(value),
                "addr" => parsed.addr = Some(value),
                other => return Err(EmbedError::InvalidConfig(format!("unknown key `{other}`"))),
            }
        }
        if parsed.mode == "init_loop" {
            #[allow(clippy::empty_loop)]
            loop {
                std::hint::spin_loop();
            }
        }
        *embedhost_plugin_support::lock(&CONFIG) = Some(parsed);
        Ok(ModelInfo {
            model_id: "embedhost/hostile".into(),
            dimension: DIMENSION,
            max_input_tokens: 512,
            normalized: true,
        })
    }

    fn embed(texts: Vec<String>, _kind: InputKind) -> Result<Embeddings, EmbedError> {
        if texts.iter().any(|t| t == TRIGGER) {
            let guard = embedhost_plugin_support::lock(&CONFIG);
            let config = guard.as_ref().ok_or(EmbedError::NotInitialized)?;
            return attack(config);
        }
        *embedhost_plugin_support::lock(&PROCESSED) += texts.len() as u64;
        let mut data = Vec::with_capacity(texts.len() * DIMENSION as usize);
        for _ in &texts {
            data.extend_from_slice(&[1.0, 0.0, 0.0, 0.0]);
        }
        Ok(Embeddings {
            dimension: DIMENSION,
            data,
        })
    }

    fn health() -> HealthReport {
        HealthReport {
            memory_bytes: linear_memory_bytes(),
            processed: *embedhost_plugin_support::lock(&PROCESSED),
        }
    }
}

fn attack(config: &Config) -> Result<Embeddings, EmbedError> {
    match config.mode.as_str() {
        "files" => report(files(config.probe.as_deref())),
        "env" => {
            let vars: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
            let args: Vec<String> = std::env::args().collect();
            let cwd = std::env::current_dir().ok();
            report(vec![
                (format!("{} environment variables {vars:?}", vars.len()), !vars.is_empty()),
                (format!("{} arguments", args.len()), !args.is_empty()),
                (format!("working directory {cwd:?}"), cwd.is_some_and(|d| d.as_os_str() != "/" && !d.as_os_str().is_empty())),
            ])
        }
        "socket" => report(sockets(config.addr.as_deref())),
        "alloc" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 16 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        "recurse" => {
            let depth = recurse(std::hint::black_box(1));
            Err(EmbedError::ModelFailure(format!("recursion ended at {depth}")))
        }
        "giant_output" => {
            // A log line far past the host's limit, then 32 Mi floats for
            // one text of dimension 4.
            host_log::log(Level::Warn, &"x".repeat(4 << 20));
            Ok(Embeddings {
                dimension: DIMENSION,
                data: vec![0.5; 32 << 20],
            })
        }
        other => Err(EmbedError::ModelFailure(format!("no attack named `{other}`"))),
    }
}

#[inline(never)]
#[allow(unconditional_recursion)]
fn recurse(n: u64) -> u64 {
    let frame = std::hint::black_box([n; 64]);
    recurse(frame[0] + 1) + frame[63]
}

/// Each attempt and whether it got through.
type Attempts = Vec<(String, bool)>;

fn report(attempts: Attempts) -> Result<Embeddings, EmbedError> {
    let escaped: Vec<&str> = attempts.iter().filter(|(_, ok)| *ok).map(|(a, _)| a.as_str()).collect();
    let all: Vec<&str> = attempts.iter().map(|(a, _)| a.as_str()).collect();
    Err(EmbedError::ModelFailure(if escaped.is_empty() {
        format!("contained: {}", all.join("; "))
    } else {
        format!("ESCAPED: {}", escaped.join("; "))
    }))
}

fn files(probe: Option<&str>) -> Attempts {
    let mut attempts = Attempts::new();
    let mut read = |path: &str| {
        let result = std::fs::read(path);
        attempts.push((format!("read {path}: {}", outcome(&result)), result.is_ok()));
    };
    for path in ["/etc/passwd", "/etc/hostname", "/model/../../etc/passwd", "../etc/passwd", "/proc/self/environ"] {
        read(path);
    }
    if let Some(probe) = probe {
        read(probe);
    }
    let listed = std::fs::read_dir("/");
    attempts.push((format!("list /: {}", outcome(&listed)), listed.is_ok()));
    for path in probe.into_iter().chain(["/tmp/embedhost-hostile-probe", "/model/written-by-plugin"]) {
        let written = std::fs::write(path, b"escaped");
        attempts.push((format!("write {path}: {}", outcome(&written)), written.is_ok()));
    }
    attempts
}

fn sockets(addr: Option<&str>) -> Attempts {
    let mut attempts = Attempts::new();
    if let Some(addr) = addr {
        let tcp = std::net::TcpStream::connect(addr);
        attempts.push((format!("tcp connect {addr}: {}", outcome(&tcp)), tcp.is_ok()));
        let udp = std::net::UdpSocket::bind("0.0.0.0:0").and_then(|s| s.send_to(b"escaped", addr));
        attempts.push((format!("udp send {addr}: {}", outcome(&udp)), udp.is_ok()));
    }
    let listen = std::net::TcpListener::bind("127.0.0.1:0");
    attempts.push((format!("tcp listen: {}", outcome(&listen)), listen.is_ok()));
    let lookup = std::net::ToSocketAddrs::to_socket_addrs("localhost:80");
    attempts.push((format!("name lookup: {}", outcome(&lookup)), lookup.is_ok()));
    attempts
}

fn outcome<T>(r: &std::io::Result<T>) -> String {
    match r {
        Ok(_) => "succeeded".into(),
        Err(e) => format!("refused ({e})"),
    }
}

export!(Hostile);
