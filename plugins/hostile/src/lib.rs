//! A hostile plugin, as a test fixture: it behaves until it sees the text
//! [`TRIGGER`], then carries out the attack its `mode` names.
//!
//! Attacks that probe the sandbox (`files`, `env`, `socket`, `handles`)
//! answer with a `model-failure` value describing what they tried: it
//! starts with `contained:` when every attempt was refused and `ESCAPED:`
//! when one got through, so a test can tell the two apart. The others are
//! the crash or the abuse itself; the host must turn each into a typed error
//! and a fresh instance, and stay within its bounds:
//!
//! | mode | what it does |
//! |---|---|
//! | `alloc`, `recurse` | unbounded memory, unbounded stack |
//! | `giant_output`, `giant_log` | 128 MiB of vectors; one 4 MiB log message |
//! | `log_flood` | a million `host-log` lines, each forging a host line after a newline |
//! | `init_loop` | spins forever in `init` |
//! | `sleep_init`, `sleep_embed`, `sleep_health` | blocks in a WASI clock wait (what `std::thread::sleep` becomes) in `init`, on the trigger in `embed`, or in every `health` |
//! | `huge_error` | `init` refuses with an `invalid-config` text of 100 MB (`bytes = N` for another size) |
//! | `huge_model_id` | `init` declares a model id of 100 MB (`bytes = N`) |
//! | `handles` | opens the model file until refused, holding every handle |
//! | `fill_init` | fills `fill_mb` MiB (default 900) in `init`, so a snapshot would keep it |
//! | `escape_model_id` | `init` declares a model id with ESC, BEL, a newline forging a host line and a bidi override |
//! | `big_log` | one `host-log` call of `bytes` (default 3 MiB), then one vector (declare a large `dimension` to make the batch's allowance large) |
//! | `big_log_init` | the same `host-log` call in `init` (what a snapshot runs) |
//! | `slow_health` | every `health` sleeps `health_ms` (default 250) before answering |
//! | `log_trap` | logs `lines` lines (default 400) of 4 KB, then traps |

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

/// The id `escape_model_id` declares: it would clear the screen, set the
/// terminal's title, forge a host log line and reverse the rest.
pub const ESCAPING_MODEL_ID: &str =
    "embedhost/\x1b[2J\x1b]0;pwned\x07x\n2026-01-01T00:00:00Z ERROR embedhost: forged\u{202e}di";

struct Config {
    mode: String,
    /// `fill_init`: MiB filled in `init`.
    fill_mb: usize,
    /// `huge_error`, `huge_model_id`, `big_log`: the text's length.
    bytes: usize,
    /// The dimension declared (default 4).
    dimension: u32,
    /// `log_trap`: lines logged before the trap.
    lines: usize,
    /// `slow_health`: how long each `health` takes, in ms.
    health_ms: u64,
    /// A host path the `files` attack tries to create and read.
    probe: Option<String>,
    /// A socket address the `socket` attack tries to reach.
    addr: Option<String>,
}

static CONFIG: Mutex<Option<Config>> = Mutex::new(None);
static PROCESSED: Mutex<u64> = Mutex::new(0);
/// What `fill_init` keeps, so the snapshot would hold it.
static FILLED: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// Blocks in the host: a monotonic-clock wait of a year, which is what
/// `std::thread::sleep` becomes on wasm32-wasip2. Epoch interruption cannot
/// reach it; only the host's timer can.
fn sleep_forever() -> ! {
    loop {
        std::thread::sleep(std::time::Duration::from_secs(365 * 24 * 3600));
    }
}

struct Hostile;

impl Guest for Hostile {
    fn init(config: Vec<(String, String)>) -> Result<ModelInfo, EmbedError> {
        let mut parsed = Config {
            mode: String::new(),
            fill_mb: 900,
            bytes: 100 << 20,
            dimension: DIMENSION,
            lines: 400,
            health_ms: 250,
            probe: None,
            addr: None,
        };
        for (key, value) in config {
            match key.as_str() {
                "mode" => parsed.mode = value,
                "probe" => parsed.probe = Some(value),
                "addr" => parsed.addr = Some(value),
                "fill_mb" => {
                    parsed.fill_mb = value
                        .parse()
                        .map_err(|_| EmbedError::InvalidConfig("fill_mb".into()))?
                }
                "dimension" => {
                    parsed.dimension = value
                        .parse()
                        .map_err(|_| EmbedError::InvalidConfig("dimension".into()))?
                }
                "health_ms" => {
                    parsed.health_ms = value
                        .parse()
                        .map_err(|_| EmbedError::InvalidConfig("health_ms".into()))?
                }
                "lines" => {
                    parsed.lines = value
                        .parse()
                        .map_err(|_| EmbedError::InvalidConfig("lines".into()))?
                }
                "bytes" => {
                    parsed.bytes = value
                        .parse()
                        .map_err(|_| EmbedError::InvalidConfig("bytes".into()))?
                }
                other => return Err(EmbedError::InvalidConfig(format!("unknown key `{other}`"))),
            }
        }
        let mut model_id = String::from("embedhost/hostile");
        match parsed.mode.as_str() {
            "init_loop" =>
            {
                #[allow(clippy::empty_loop)]
                loop {
                    std::hint::spin_loop();
                }
            }
            "sleep_init" => sleep_forever(),
            "huge_error" => return Err(EmbedError::InvalidConfig("e".repeat(parsed.bytes))),
            "huge_model_id" => model_id = "m".repeat(parsed.bytes),
            "escape_model_id" => model_id = ESCAPING_MODEL_ID.into(),
            "big_log_init" => host_log::log(Level::Warn, &"x".repeat(big_log_bytes(&parsed))),
            "fill_init" => {
                let filled = vec![7u8; parsed.fill_mb << 20];
                FILLED
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(filled);
            }
            _ => {}
        }
        let dimension = parsed.dimension;
        *embedhost_plugin_support::lock(&CONFIG) = Some(parsed);
        Ok(ModelInfo {
            model_id,
            dimension,
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
        let dimension = embedhost_plugin_support::lock(&CONFIG)
            .as_ref()
            .map_or(DIMENSION, |c| c.dimension);
        Ok(Embeddings {
            dimension,
            data: unit_vectors(texts.len(), dimension),
        })
    }

    fn health() -> HealthReport {
        let (sleeps, slow) =
            embedhost_plugin_support::lock(&CONFIG)
                .as_ref()
                .map_or((false, None), |c| {
                    (
                        c.mode == "sleep_health",
                        (c.mode == "slow_health").then_some(c.health_ms),
                    )
                });
        if sleeps {
            sleep_forever();
        }
        if let Some(ms) = slow {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        HealthReport {
            // A lie the host must not believe: it measures memory itself.
            memory_bytes: if linear_memory_bytes() > 0 { 1 } else { 0 },
            processed: *embedhost_plugin_support::lock(&PROCESSED),
        }
    }
}

/// `texts` unit vectors of `dimension`.
fn unit_vectors(texts: usize, dimension: u32) -> Vec<f32> {
    let mut data = vec![0.0; texts * dimension as usize];
    for row in data.chunks_mut(dimension.max(1) as usize) {
        row[0] = 1.0;
    }
    data
}

/// `big_log`'s size: `bytes` if set, else 3 MiB.
fn big_log_bytes(config: &Config) -> usize {
    if config.bytes == 100 << 20 {
        3 << 20
    } else {
        config.bytes
    }
}

fn attack(config: &Config) -> Result<Embeddings, EmbedError> {
    match config.mode.as_str() {
        "big_log" => {
            let message = "x".repeat(big_log_bytes(config));
            host_log::log(Level::Warn, &message);
            Ok(Embeddings {
                dimension: config.dimension,
                data: unit_vectors(1, config.dimension),
            })
        }
        "log_trap" => {
            let line = "l".repeat(4000);
            for _ in 0..config.lines {
                host_log::log(Level::Warn, &line);
            }
            std::process::abort()
        }
        "files" => report(files(config.probe.as_deref())),
        "env" => {
            let vars: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
            let args: Vec<String> = std::env::args().collect();
            let cwd = std::env::current_dir().ok();
            report(vec![
                (
                    format!("{} environment variables {vars:?}", vars.len()),
                    !vars.is_empty(),
                ),
                (format!("{} arguments", args.len()), !args.is_empty()),
                (
                    format!("working directory {cwd:?}"),
                    cwd.is_some_and(|d| d.as_os_str() != "/" && !d.as_os_str().is_empty()),
                ),
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
            Err(EmbedError::ModelFailure(format!(
                "recursion ended at {depth}"
            )))
        }
        "giant_output" => {
            // A log line past the host's line limit (but within what a host
            // call may copy), then 32 Mi floats for one text of dimension 4.
            host_log::log(Level::Warn, &"x".repeat(512 << 10));
            Ok(Embeddings {
                dimension: DIMENSION,
                data: vec![0.5; 32 << 20],
            })
        }
        "giant_log" => {
            host_log::log(Level::Warn, &"x".repeat(4 << 20));
            Err(EmbedError::ModelFailure(
                "the giant log line got through".into(),
            ))
        }
        "log_flood" => {
            for i in 0..1_000_000u32 {
                host_log::log(
                    Level::Error,
                    &format!(
                        "line {i}\n2026-01-01T00:00:00.000000Z ERROR embedhost::supervisor: forged by the plugin"
                    ),
                );
            }
            println!("stdout\r\x1b[2Kforged too");
            Ok(Embeddings {
                dimension: DIMENSION,
                data: vec![1.0, 0.0, 0.0, 0.0],
            })
        }
        "sleep_embed" => sleep_forever(),
        "handles" => {
            let mut held = Vec::new();
            let refused = loop {
                match std::fs::File::open("/model/weights.bin") {
                    Ok(file) => held.push(file),
                    Err(e) => break e,
                }
                if held.len() >= 1_000_000 {
                    return report(vec![("opened a million handles".into(), true)]);
                }
            };
            report(vec![(
                format!("opened {} handles, then refused ({refused})", held.len()),
                false,
            )])
        }
        other => Err(EmbedError::ModelFailure(format!(
            "no attack named `{other}`"
        ))),
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
    let escaped: Vec<&str> = attempts
        .iter()
        .filter(|(_, ok)| *ok)
        .map(|(a, _)| a.as_str())
        .collect();
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
    for path in [
        "/etc/passwd",
        "/etc/hostname",
        "/model/../../etc/passwd",
        "../etc/passwd",
        "/proc/self/environ",
    ] {
        read(path);
    }
    if let Some(probe) = probe {
        read(probe);
    }
    let listed = std::fs::read_dir("/");
    attempts.push((format!("list /: {}", outcome(&listed)), listed.is_ok()));
    for path in probe
        .into_iter()
        .chain(["/tmp/embedhost-hostile-probe", "/model/written-by-plugin"])
    {
        let written = std::fs::write(path, b"escaped");
        attempts.push((
            format!("write {path}: {}", outcome(&written)),
            written.is_ok(),
        ));
    }
    attempts
}

fn sockets(addr: Option<&str>) -> Attempts {
    let mut attempts = Attempts::new();
    if let Some(addr) = addr {
        let tcp = std::net::TcpStream::connect(addr);
        attempts.push((
            format!("tcp connect {addr}: {}", outcome(&tcp)),
            tcp.is_ok(),
        ));
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
