//! Pre-initialized snapshots of model plugins (wasmtime-wizer).
//!
//! A model plugin's `init` reads its weights through WASI: about 300 ms for
//! all-MiniLM-L6-v2, paid again by every restarted instance. A snapshot is
//! the plugin with `init` already run: wizer instruments the component, the
//! host runs `init` in one instance with the model directory, and wizer
//! writes the instance's memory and globals out as a new component whose
//! data segments hold the loaded model. Instantiating it maps that memory
//! copy-on-write from the compiled artifact, so a restart costs an
//! instantiation, not a model load.
//!
//! # Invariants
//! - A snapshot is made once per plugin, model files and `init`
//!   configuration ([`snapshot_id`]) and kept in the artifact cache beside
//!   the plugin's precompiled code; a changed plugin, setting, or content
//!   of any file under the model directory at any depth makes another
//!   (the whole content is hashed, within
//!   [`crate::limits::MAX_SNAPSHOT_MODEL_BYTES`] and
//!   [`crate::limits::MAX_SNAPSHOT_MODEL_FILES`]).
//! - An instance restored from a snapshot still gets `init(config)` from the
//!   host, with the configuration the snapshot was made with: the plugin
//!   answers from its loaded model without touching a file. (File handles
//!   taken during pre-initialization belonged to another store; the contract
//!   asks a plugin that supports snapshots not to use them again.)
//! - Any failure here is reported, never fatal: the caller falls back to the
//!   plain plugin, which loads its model in `init` as before.

use std::path::Path;

use sha2::{Digest, Sha256};
use wasmtime::Store;
use wasmtime::component::{ComponentExportIndex, Lift, WasmList};
use wasmtime_wizer::{ComponentInstanceState, Wizer};

use super::bindings::Plugin;
use super::error::{SnapshotError, StateError};
use super::host::HostState;
use super::instance::CallRuntime;
use super::{InstanceLimits, WasmEngine, deadline_ticks};

/// Part of every snapshot's id: changed whenever the way a snapshot is made
/// changes, so a cache never hands back a snapshot made the old way.
const SNAPSHOT_FORMAT: &str = "embedhost-snapshot-1 wasmtime-wizer-48";

/// What an export's result may copy out of the pre-initializing store:
/// wizer reads each memory back through one export returning a `list<u8>`
/// of the whole memory (about 190 MB with all-MiniLM-L6-v2), so the limit
/// here is the instance's memory cap. Host imports (a log line in `init`)
/// keep [`crate::limits::MAX_HOSTCALL_BYTES`], as in every store.
fn snapshot_hostcall_fuel(limits: &InstanceLimits) -> usize {
    usize::try_from(limits.memory_bytes)
        .unwrap_or(usize::MAX)
        .max(128 << 20)
}

/// The id of the snapshot of the plugin `bytes` over the model in
/// `model_dir` with `config`: a sha256 over the plugin, the content of
/// every file under `model_dir` at any depth (with its relative path; see
/// [`hash_model_dir`]), and the configuration.
///
/// # Errors
/// [`SnapshotIdError`]: the directory cannot be read, or is past its
/// bounds (the plugin then runs without a snapshot).
pub fn snapshot_id(
    bytes: &[u8],
    model_dir: &Path,
    config: &[(String, String)],
) -> Result<String, SnapshotIdError> {
    let mut hasher = Sha256::new();
    let mut field = |data: &[u8]| {
        hasher.update((data.len() as u64).to_le_bytes());
        hasher.update(data);
    };
    field(SNAPSHOT_FORMAT.as_bytes());
    field(super::sha256_hex(bytes).as_bytes());
    field(hash_model_dir(model_dir)?.as_bytes());
    for (key, value) in config {
        field(key.as_bytes());
        field(value.as_bytes());
    }
    Ok(super::sha256_hex(&hasher.finalize()))
}

/// Why a snapshot's id could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotIdError {
    /// A file or directory could not be read.
    #[error("cannot read `{path}`: {source}")]
    Io {
        /// What.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// More entries than [`crate::limits::MAX_SNAPSHOT_MODEL_FILES`].
    #[error(
        "the model directory holds more than {limit} files and directories (limits::MAX_SNAPSHOT_MODEL_FILES)"
    )]
    TooManyFiles {
        /// The bound.
        limit: usize,
    },
    /// More bytes than [`crate::limits::MAX_SNAPSHOT_MODEL_BYTES`].
    #[error("the model directory holds more than {limit} bytes (limits::MAX_SNAPSHOT_MODEL_BYTES)")]
    TooManyBytes {
        /// The bound.
        limit: u64,
    },
}

/// A sha256 over everything under `dir` a plugin can read at `/model`:
/// each entry's path relative to `dir`, its kind, and for a regular file
/// its whole content, for a symbolic link its target (links are not
/// followed: WASI refuses those leading out of `/model`, and those inside
/// lead to files hashed under their own path). Other kinds (a FIFO, a
/// socket) count by name and kind only and are never opened, so hashing
/// cannot block. The host's own record of verified files
/// ([`crate::model::VERIFIED_FILE`]) is left out: it only holds digests of
/// the files hashed here.
///
/// # Errors
/// As [`snapshot_id`].
pub fn hash_model_dir(dir: &Path) -> Result<String, SnapshotIdError> {
    use std::io::Read;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SnapshotIdError::Io { path, source }
    };
    let mut hasher = Sha256::new();
    let mut entries = 0usize;
    let mut budget = crate::limits::MAX_SNAPSHOT_MODEL_BYTES;
    let mut pending = vec![std::path::PathBuf::new()];
    let mut buffer = vec![0u8; 1 << 16];
    while let Some(relative) = pending.pop() {
        let full = dir.join(&relative);
        let mut listing: Vec<_> = std::fs::read_dir(&full)
            .map_err(io(&full))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(io(&full))?;
        listing.sort();
        for name in listing {
            entries += 1;
            if entries > crate::limits::MAX_SNAPSHOT_MODEL_FILES {
                return Err(SnapshotIdError::TooManyFiles {
                    limit: crate::limits::MAX_SNAPSHOT_MODEL_FILES,
                });
            }
            let path = relative.join(&name);
            let full = dir.join(&path);
            if relative.as_os_str().is_empty() && name == crate::model::VERIFIED_FILE {
                continue;
            }
            let meta = std::fs::symlink_metadata(&full).map_err(io(&full))?;
            let kind = meta.file_type();
            hasher.update((path.as_os_str().len() as u64).to_le_bytes());
            hasher.update(path.as_os_str().as_encoded_bytes());
            if kind.is_dir() {
                hasher.update(b"d");
                pending.push(path);
            } else if kind.is_symlink() {
                let target = std::fs::read_link(&full).map_err(io(&full))?;
                hasher.update(b"l");
                hasher.update((target.as_os_str().len() as u64).to_le_bytes());
                hasher.update(target.as_os_str().as_encoded_bytes());
            } else if kind.is_file() {
                hasher.update(b"f");
                let mut file = open_regular(&full).map_err(io(&full))?;
                let mut length = 0u64;
                loop {
                    let n = file.read(&mut buffer).map_err(io(&full))?;
                    if n == 0 {
                        break;
                    }
                    budget = budget
                        .checked_sub(n as u64)
                        .ok_or(SnapshotIdError::TooManyBytes {
                            limit: crate::limits::MAX_SNAPSHOT_MODEL_BYTES,
                        })?;
                    length += n as u64;
                    hasher.update(&buffer[..n]);
                }
                hasher.update(length.to_le_bytes());
            } else {
                hasher.update(b"o");
            }
        }
    }
    Ok(super::sha256_hex(&hasher.finalize()))
}

/// Opens `path` for reading only if it is still a regular file: without
/// following a link, without blocking (a FIFO swapped in after the listing
/// would otherwise block the open), and checked again once open.
fn open_regular(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("no longer a regular file"));
    }
    Ok(file)
}

/// Makes the snapshot: instruments `bytes`, runs `init(config)` in an
/// instance that sees `model_dir`, and returns the component with that
/// instance's state in it.
///
/// # Errors
/// [`SnapshotError`], naming the step that failed: instrumenting,
/// compiling, instantiating, `init` (with the plugin's error), or the
/// snapshot.
pub fn make(
    engine: &WasmEngine,
    name: &str,
    bytes: &[u8],
    model_dir: Option<&Path>,
    limits: InstanceLimits,
    config: &[(String, String)],
    encoder: Option<&super::Encoder>,
) -> Result<Vec<u8>, SnapshotError> {
    let mut wizer = Wizer::new();
    // The contract's `init` is the initializer, called by the host below,
    // not an export wizer calls and then removes: restored instances are
    // still given `init`.
    wizer.keep_init_func(true);
    let (cx, instrumented) = wizer
        .instrument_component(bytes)
        .map_err(SnapshotError::Instrument)?;
    let component = engine
        .compile(&instrumented)
        .map_err(SnapshotError::Compile)?;
    let linker = super::linker(engine)?;
    let state = HostState::new(name.into(), limits.memory_bytes, model_dir)?;
    let mut store = Store::new(engine.engine(), state);
    store.limiter(|state| &mut state.limiter);
    store.epoch_deadline_trap();
    store.set_epoch_deadline(deadline_ticks(limits.init_deadline));
    // Host calls keep their bound during `init`; only the accessors' results
    // (the instance's memory, read back by wizer) get the memory cap.
    store.data_mut().export_allowance = snapshot_hostcall_fuel(&limits);
    super::host::bound_hostcalls(&mut store);
    let runtime = CallRuntime::new().map_err(SnapshotError::Runtime)?;
    // Each step is bounded like an instance's `init`: guest code by the
    // epoch deadline, a wait in a host function by the timer.
    let bound = limits
        .init_deadline
        .saturating_add(crate::limits::HOST_CALL_GRACE);
    let timed_out = |_| SnapshotError::Deadline(limits.init_deadline);
    let initialized = runtime.run_for(bound, async {
        let engine_bytes = start_encoder(&mut store, encoder).await?;
        let instance = linker
            .instantiate_async(&mut store, &component)
            .await
            .map_err(SnapshotError::Instantiate)?;
        let plugin = Plugin::new(&mut store, &instance).map_err(SnapshotError::Exports)?;
        plugin
            .embedhost_embedder_embedder()
            .call_init(&mut store, config)
            .await
            .map_err(SnapshotError::InitTrapped)?
            .map_err(|e| SnapshotError::InitFailed(e.into()))?;
        Ok::<_, SnapshotError>((instance, engine_bytes))
    });
    let (instance, engine_bytes) = initialized.map_err(timed_out)??;
    // Only the plugin's own memories go into the snapshot.
    let held = store.data().memory_bytes().saturating_sub(engine_bytes);
    if held > crate::limits::MAX_SNAPSHOT_BYTES {
        return Err(SnapshotError::TooLarge {
            held,
            limit: crate::limits::MAX_SNAPSHOT_BYTES,
        });
    }
    store.set_epoch_deadline(deadline_ticks(limits.init_deadline));
    let mut access = Access {
        store: &mut store,
        instance,
        failure: None,
    };
    let snapshot = runtime
        .run_for(bound, wizer.snapshot_component(&cx, &mut access))
        .map_err(timed_out)?
        .map_err(SnapshotError::Write)?;
    if let Some(reason) = access.failure {
        return Err(SnapshotError::State(reason));
    }
    Ok(snapshot)
}

/// Starts `encoder`'s engine in `store`, for the plugin's `init` to ask:
/// in the store, not in the snapshot (each instance starts its own engine
/// from the engine's snapshot). The bytes the store then holds.
async fn start_encoder(
    store: &mut Store<HostState>,
    encoder: Option<&super::Encoder>,
) -> Result<u64, SnapshotError> {
    if let Some(encoder) = encoder {
        super::encoder::start(store, encoder)
            .await
            .map_err(SnapshotError::InitTrapped)?
            .map_err(|e| SnapshotError::InitFailed(e.into()))?;
    }
    Ok(store.data().memory_bytes())
}

/// Wizer's view of the pre-initialized instance: calls to the accessor
/// functions its instrumentation exported.
struct Access<'a> {
    store: &'a mut Store<HostState>,
    instance: wasmtime::component::Instance,
    /// The first accessor call that failed (wizer's trait has no error
    /// channel; the value returned in its place is discarded with the
    /// snapshot).
    failure: Option<StateError>,
}

impl Access<'_> {
    async fn call<R>(&mut self, instance: &str, func: &str) -> Option<R>
    where
        R: Lift + Send + Sync + 'static,
    {
        let result = async {
            let (_, parent) = self
                .instance
                .get_export(&mut *self.store, None, instance)
                .ok_or_else(|| StateError::NoInstance {
                    instance: instance.to_string(),
                })?;
            let (_, index): (_, ComponentExportIndex) = self
                .instance
                .get_export(&mut *self.store, Some(&parent), func)
                .ok_or_else(|| StateError::NoFunc {
                    instance: instance.to_string(),
                    func: func.to_string(),
                })?;
            let typed = self
                .instance
                .get_typed_func::<(), (R,)>(&mut *self.store, index)
                .map_err(|source| StateError::Type {
                    instance: instance.to_string(),
                    func: func.to_string(),
                    source,
                })?;
            typed
                .call_async(&mut *self.store, ())
                .await
                .map(|(r,)| r)
                .map_err(|source| StateError::Trapped {
                    instance: instance.to_string(),
                    func: func.to_string(),
                    source,
                })
        }
        .await;
        match result {
            Ok(value) => Some(value),
            Err(reason) => {
                self.failure.get_or_insert(reason);
                None
            }
        }
    }
}

impl ComponentInstanceState for Access<'_> {
    async fn call_func_ret_list_u8(
        &mut self,
        instance: &str,
        func: &str,
        contents: impl FnOnce(&[u8]) + Send,
    ) {
        match self.call::<WasmList<u8>>(instance, func).await {
            Some(list) => contents(list.as_le_slice(&*self.store)),
            None => contents(&[]),
        }
    }

    async fn call_func_ret_s32(&mut self, instance: &str, func: &str) -> i32 {
        self.call(instance, func).await.unwrap_or_default()
    }

    async fn call_func_ret_s64(&mut self, instance: &str, func: &str) -> i64 {
        self.call(instance, func).await.unwrap_or_default()
    }

    async fn call_func_ret_f32(&mut self, instance: &str, func: &str) -> u32 {
        self.call::<f32>(instance, func)
            .await
            .unwrap_or_default()
            .to_bits()
    }

    async fn call_func_ret_f64(&mut self, instance: &str, func: &str) -> u64 {
        self.call::<f64>(instance, func)
            .await
            .unwrap_or_default()
            .to_bits()
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    #[test]
    fn a_symbolic_link_counts_by_its_target_and_is_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("weights"), "w").unwrap();
        let link = dir.path().join("link");
        // Dangling (a target outside the directory): hashed, not read.
        std::os::unix::fs::symlink("/nonexistent/one", &link).unwrap();
        let one = hash_model_dir(dir.path()).unwrap();
        assert_eq!(hash_model_dir(dir.path()).unwrap(), one);
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink("/nonexistent/two", &link).unwrap();
        let two = hash_model_dir(dir.path()).unwrap();
        assert_ne!(one, two, "another target is another model directory");
    }

    #[test]
    fn a_model_directory_past_its_entry_count_is_refused_naming_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let limit = crate::limits::MAX_SNAPSHOT_MODEL_FILES;
        std::fs::create_dir(dir.path().join("many")).unwrap();
        for i in 0..limit {
            std::fs::write(dir.path().join("many").join(i.to_string()), "").unwrap();
        }
        // The directory and its files: one entry too many.
        let err = hash_model_dir(dir.path()).unwrap_err();
        assert!(
            matches!(err, SnapshotIdError::TooManyFiles { limit: l } if l == limit),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("MAX_SNAPSHOT_MODEL_FILES"),
            "{err}"
        );
        std::fs::remove_file(dir.path().join("many").join("0")).unwrap();
        assert!(hash_model_dir(dir.path()).is_ok());
    }

    #[test]
    fn a_model_directory_that_cannot_be_read_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let err = snapshot_id(b"plugin", &missing, &[]).unwrap_err();
        assert!(
            matches!(&err, SnapshotIdError::Io { path, .. } if *path == missing),
            "{err:?}"
        );
        assert!(
            err.to_string().contains(&*missing.to_string_lossy()),
            "{err}"
        );
    }

    /// `component` with `module` added as one more top-level core module,
    /// instantiated with no imports.
    pub(crate) fn splice(component: &[u8], module: &[u8]) -> Vec<u8> {
        use wasmparser::{ComponentAlias, ComponentOuterAliasKind, Parser, Payload};
        let leb = |out: &mut Vec<u8>, mut n: usize| loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                break;
            }
            out.push(byte | 0x80);
        };
        let (mut depth, mut modules) = (0usize, 0usize);
        for payload in Parser::new(0).parse_all(component) {
            match payload.unwrap() {
                Payload::Version { .. } => depth += 1,
                Payload::End(_) => depth -= 1,
                Payload::ModuleSection { .. } if depth == 1 => modules += 1,
                Payload::ComponentAliasSection(aliases) if depth == 1 => {
                    for alias in aliases {
                        if let ComponentAlias::Outer {
                            kind: ComponentOuterAliasKind::CoreModule,
                            ..
                        } = alias.unwrap()
                        {
                            modules += 1;
                        }
                    }
                }
                _ => {}
            }
        }
        let mut out = component.to_vec();
        out.push(1); // core module section
        leb(&mut out, module.len());
        out.extend_from_slice(module);
        let mut instance = vec![1, 0]; // one instance: instantiate
        leb(&mut instance, modules);
        instance.push(0); // no arguments
        out.push(2); // core instance section
        leb(&mut out, instance.len());
        out.extend_from_slice(&instance);
        out
    }

    /// Wizer reads every global of the instance back through the host: a
    /// 64-bit integer and both float kinds come out in the snapshot with
    /// the values the instance held, not zeros.
    #[test]
    fn a_snapshot_keeps_the_instances_64_bit_and_float_globals() {
        use wasmparser::{Operator, Parser, Payload, ValType};
        let module = wat::parse_str(
            // An export section: wizer exports the globals in it.
            "(module
                (func (export \"f\"))
                (global (mut i64) (i64.const 0x123456789abc))
                (global (mut f32) (f32.const 3.25))
                (global (mut f64) (f64.const -6.5)))",
        )
        .unwrap();
        let bytes = splice(crate::plugins::STUB_WASM_BYTES, &module);
        let engine = WasmEngine::new(None).unwrap();
        let model = tempfile::tempdir().unwrap();
        let limits = InstanceLimits {
            memory_bytes: 256 << 20,
            ..InstanceLimits::default()
        };
        let snapshot = make(
            &engine,
            "spliced",
            &bytes,
            Some(model.path()),
            limits,
            &[],
            None,
        )
        .unwrap();
        let mut found = Vec::new();
        for payload in Parser::new(0).parse_all(&snapshot) {
            let Payload::GlobalSection(globals) = payload.unwrap() else {
                continue;
            };
            for global in globals {
                let global = global.unwrap();
                if !global.ty.mutable {
                    continue;
                }
                let init = global.init_expr.get_operators_reader().read().unwrap();
                match (global.ty.content_type, init) {
                    (ValType::I64, Operator::I64Const { value }) => {
                        found.push(format!("i64 {value}"))
                    }
                    (ValType::F32, Operator::F32Const { value }) => {
                        found.push(format!("f32 {}", f32::from_bits(value.bits())));
                    }
                    (ValType::F64, Operator::F64Const { value }) => {
                        found.push(format!("f64 {}", f64::from_bits(value.bits())));
                    }
                    _ => {}
                }
            }
        }
        for kept in [
            format!("i64 {}", 0x1234_5678_9abc_i64),
            "f32 3.25".into(),
            "f64 -6.5".into(),
        ] {
            assert!(found.contains(&kept), "{kept} not in {found:?}");
        }
    }
}
