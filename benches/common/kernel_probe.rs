//! The `kernel-probe` component (plugins/kernel-probe), instantiated on an
//! embedhost engine (the host's settings: epoch interruption, relaxed
//! SIMD), and the state of any probe component of another world (a WASI
//! context and nothing else). Shared by the benches (through
//! `common`) and by `tests/all/kernels.rs`, which includes this file.

wasmtime::component::bindgen!({ path: "../plugins/kernel-probe/wit", world: "kernel-probe" });

/// The state of a probe component: a WASI context and nothing else.
pub struct ProbeState {
    wasi: wasmtime_wasi::WasiCtx,
    table: wasmtime::component::ResourceTable,
}

impl ProbeState {
    /// An empty WASI context.
    pub fn new() -> Self {
        ProbeState {
            wasi: wasmtime_wasi::WasiCtxBuilder::new().build(),
            table: Default::default(),
        }
    }
}

impl wasmtime_wasi::WasiView for ProbeState {
    fn ctx(&mut self) -> wasmtime_wasi::WasiCtxView<'_> {
        wasmtime_wasi::WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// The kernel probe, compiled by `engine` and instantiated in a store of
/// its own with no epoch deadline in reach.
pub fn instantiate(
    engine: &embedhost::wasm::WasmEngine,
) -> (wasmtime::Store<ProbeState>, KernelProbe) {
    let component = wasmtime::component::Component::from_file(
        engine.engine(),
        embedhost::plugins::KERNEL_PROBE,
    )
    .expect("compile the kernel probe");
    let mut linker = wasmtime::component::Linker::new(engine.engine());
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker).expect("link WASI");
    let mut store = wasmtime::Store::new(engine.engine(), ProbeState::new());
    store.set_epoch_deadline(u64::MAX / 2);
    let probe = KernelProbe::instantiate(&mut store, &component, &linker)
        .expect("instantiate the kernel probe");
    (store, probe)
}
