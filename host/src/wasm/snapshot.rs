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
//!   the plugin's precompiled code; a changed plugin, model file or setting
//!   makes another.
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
use wasmtime::component::{Component, ComponentExportIndex, Lift, WasmList};
use wasmtime_wizer::{ComponentInstanceState, Wizer};

use super::bindings::Plugin;
use super::host::HostState;
use super::instance::CallRuntime;
use super::{InstanceLimits, WasmEngine, deadline_ticks};

/// Part of every snapshot's id: changed whenever the way a snapshot is made
/// changes, so a cache never hands back a snapshot made the old way.
const SNAPSHOT_FORMAT: &str = "embedhost-snapshot-1 wasmtime-wizer-48";

/// Hostcall fuel of the pre-initializing store: wizer reads each memory
/// back through one call returning a `list<u8>` of the whole memory (about
/// 190 MB with all-MiniLM-L6-v2), past wasmtime's 128 MiB default, which
/// guards ordinary instances against a guest making the host allocate
/// without bound. The pre-initializing instance runs only the plugin's own
/// `init`, so the limit here is the instance's memory cap.
fn snapshot_hostcall_fuel(limits: &InstanceLimits) -> usize {
    usize::try_from(limits.memory_bytes)
        .unwrap_or(usize::MAX)
        .max(128 << 20)
}

/// The id of the snapshot of the plugin `bytes` over the model in
/// `model_dir` with `config`: a sha256 over the plugin, every model file's (hidden ones aside)
/// name, size and modification time, and the configuration.
///
/// # Errors
/// The model directory cannot be listed.
pub fn snapshot_id(
    bytes: &[u8],
    model_dir: &Path,
    config: &[(String, String)],
) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut field = |data: &[u8]| {
        hasher.update((data.len() as u64).to_le_bytes());
        hasher.update(data);
    };
    field(SNAPSHOT_FORMAT.as_bytes());
    field(super::sha256_hex(bytes).as_bytes());
    let mut files = Vec::new();
    for entry in std::fs::read_dir(model_dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        // Hidden files are the host's own bookkeeping (the model store's
        // record of verified files, temporary files of atomic writes), not
        // the model.
        if !meta.is_file() || entry.file_name().as_encoded_bytes().starts_with(b".") {
            continue;
        }
        let modified = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        files.push((entry.file_name(), meta.len(), modified));
    }
    files.sort();
    for (name, size, modified) in files {
        field(name.as_encoded_bytes());
        field(&size.to_le_bytes());
        field(&modified.to_le_bytes());
    }
    for (key, value) in config {
        field(key.as_bytes());
        field(value.as_bytes());
    }
    Ok(super::sha256_hex(&hasher.finalize()))
}

/// Makes the snapshot: instruments `bytes`, runs `init(config)` in an
/// instance that sees `model_dir`, and returns the component with that
/// instance's state in it.
///
/// # Errors
/// A message naming the step that failed: instrumenting, compiling,
/// instantiating, `init` (with the plugin's error), or the snapshot.
pub fn make(
    engine: &WasmEngine,
    name: &str,
    bytes: &[u8],
    model_dir: &Path,
    limits: InstanceLimits,
    config: &[(String, String)],
) -> Result<Vec<u8>, String> {
    let mut wizer = Wizer::new();
    // The contract's `init` is the initializer, called by the host below,
    // not an export wizer calls and then removes: restored instances are
    // still given `init`.
    wizer.keep_init_func(true);
    let (cx, instrumented) = wizer
        .instrument_component(bytes)
        .map_err(|e| format!("cannot instrument the component: {e:#}"))?;
    let component = Component::new(engine.engine(), &instrumented)
        .map_err(|e| format!("cannot compile the instrumented component: {e:#}"))?;
    let linker = super::linker(engine)?;
    let state = HostState::new(name.into(), limits.memory_bytes, Some(model_dir))?;
    let mut store = Store::new(engine.engine(), state);
    store.limiter(|state| &mut state.limiter);
    store.epoch_deadline_trap();
    store.set_epoch_deadline(deadline_ticks(limits.init_deadline));
    store.set_hostcall_fuel(snapshot_hostcall_fuel(&limits));
    let runtime = CallRuntime::new().map_err(|e| format!("no runtime: {e}"))?;
    // Each step is bounded like an instance's `init`: guest code by the
    // epoch deadline, a wait in a host function by the timer.
    let bound = limits.init_deadline + crate::limits::HOST_CALL_GRACE;
    let timed_out = || format!("`init` ran past its {:?} deadline", limits.init_deadline);
    let initialized = runtime.run_for(bound, async {
        let instance = linker
            .instantiate_async(&mut store, &component)
            .await
            .map_err(|e| format!("cannot instantiate the instrumented component: {e:#}"))?;
        let plugin = Plugin::new(&mut store, &instance)
            .map_err(|e| format!("the instrumented component lost its exports: {e:#}"))?;
        plugin
            .embedhost_embedder_embedder()
            .call_init(&mut store, config)
            .await
            .map_err(|e| format!("`init` trapped: {e:#}"))?
            .map_err(|e| format!("`init` failed: {}", super::PluginError::from(e)))?;
        Ok::<_, String>(instance)
    });
    let instance = initialized.map_err(|_| timed_out())??;
    let held = store.data().memory_bytes();
    if held > crate::limits::MAX_SNAPSHOT_BYTES {
        return Err(format!(
            "the instance holds {held} bytes after `init`, more than a snapshot may keep ({} bytes, limits::MAX_SNAPSHOT_BYTES)",
            crate::limits::MAX_SNAPSHOT_BYTES
        ));
    }
    store.set_epoch_deadline(deadline_ticks(limits.init_deadline));
    let mut access = Access {
        store: &mut store,
        instance,
        failure: None,
    };
    let snapshot = runtime
        .run_for(bound, wizer.snapshot_component(&cx, &mut access))
        .map_err(|_| timed_out())?
        .map_err(|e| format!("cannot write the snapshot: {e:#}"))?;
    if let Some(reason) = access.failure {
        return Err(format!("cannot read the instance's state: {reason}"));
    }
    Ok(snapshot)
}

/// Wizer's view of the pre-initialized instance: calls to the accessor
/// functions its instrumentation exported.
struct Access<'a> {
    store: &'a mut Store<HostState>,
    instance: wasmtime::component::Instance,
    /// The first accessor call that failed (wizer's trait has no error
    /// channel; the value returned in its place is discarded with the
    /// snapshot).
    failure: Option<String>,
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
                .ok_or_else(|| format!("no export `{instance}`"))?;
            let (_, index): (_, ComponentExportIndex) = self
                .instance
                .get_export(&mut *self.store, Some(&parent), func)
                .ok_or_else(|| format!("no export `{instance}#{func}`"))?;
            let typed = self
                .instance
                .get_typed_func::<(), (R,)>(&mut *self.store, index)
                .map_err(|e| format!("`{instance}#{func}`: {e:#}"))?;
            typed
                .call_async(&mut *self.store, ())
                .await
                .map(|(r,)| r)
                .map_err(|e| format!("`{instance}#{func}` trapped: {e:#}"))
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
