//! What crosses back from a plugin: its errors, turned into typed ones,
//! and its output, checked against the contract.
//!
//! # Invariant
//! Nothing a plugin returns is passed on unchecked: a trap, a deadline, the
//! memory cap and the hostcall bound each become their [`WasmError`], and
//! vectors of the wrong dimension or count, or with a NaN or infinite
//! value, are [`WasmError::InvalidOutput`].

use std::time::Duration;

use wasmtime::Store;

use super::host::HostState;
use super::{ModelInfo, WasmError};
use crate::limits;
use crate::vectors::Vectors;

/// Turns a wasmtime error into the typed error it stands for.
pub(super) fn classify(
    store: &Store<HostState>,
    call: &'static str,
    deadline: Duration,
    error: wasmtime::Error,
    otherwise: impl FnOnce(String) -> WasmError,
) -> WasmError {
    if let Some(hit) = error.downcast_ref::<super::MemoryCapHit>() {
        return WasmError::MemoryCap {
            call,
            source: super::MemoryCapHit {
                limit: hit.limit,
                desired: hit.desired,
            },
        };
    }
    if let Some(desired) = store.data().limiter.hit {
        // The growth was refused and the plugin trapped on the failure.
        return WasmError::MemoryCap {
            call,
            source: super::MemoryCapHit {
                limit: store.data().limiter.limit,
                desired,
            },
        };
    }
    if format!("{error:#}").contains("fuel allocated for hostcalls has been exhausted") {
        return WasmError::Trap {
            call,
            reason: format!(
                "the plugin passed the host more than {} bytes in one host call (limits::MAX_HOSTCALL_BYTES), or a result of `{call}` larger than its {} bytes",
                limits::MAX_HOSTCALL_BYTES,
                store.data().export_allowance
            ),
        };
    }
    match error.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => WasmError::DeadlineExceeded { call, deadline },
        // The trap's kind is the message; its wasm backtrace goes to the debug log.
        Some(trap) => {
            tracing::debug!(call, "trap details: {error:?}");
            otherwise(trap.to_string())
        }
        None => otherwise(format!("{error:#}")),
    }
}

/// Checks the contract on a plugin's output.
pub(super) fn validate(
    info: &ModelInfo,
    texts: usize,
    dimension: u32,
    data: Vec<f32>,
) -> Result<Vectors, WasmError> {
    if dimension != info.dimension {
        return Err(WasmError::InvalidOutput {
            index: None,
            reason: format!(
                "vectors of dimension {dimension}, but `init` declared {}",
                info.dimension
            ),
        });
    }
    let expected = texts * dimension as usize;
    if data.len() != expected {
        return Err(WasmError::InvalidOutput {
            index: None,
            reason: format!(
                "{} floats for {texts} texts of dimension {dimension} (expected {expected})",
                data.len()
            ),
        });
    }
    if let Some(at) = data.iter().position(|x| !x.is_finite()) {
        let index = (at / dimension as usize) as u32;
        return Err(WasmError::InvalidOutput {
            index: Some(index),
            reason: format!("the vector of input {index} contains {}", data[at]),
        });
    }
    Vectors::new(dimension as usize, data).map_err(|e| WasmError::InvalidOutput {
        index: None,
        reason: e.to_string(),
    })
}
