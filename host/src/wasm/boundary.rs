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

#[cfg(test)]
mod tests {
    use super::*;

    fn info(dimension: u32) -> ModelInfo {
        ModelInfo {
            model_id: crate::backend::ModelId::default(),
            dimension,
            max_input_tokens: 8,
            normalized: false,
        }
    }

    #[test]
    fn vectors_of_another_dimension_than_init_declared_are_refused_naming_both() {
        let err = validate(&info(4), 1, 3, vec![0.0; 3]).unwrap_err();
        let WasmError::InvalidOutput { index, reason } = &err else {
            panic!("not an invalid output: {err:?}");
        };
        assert_eq!(*index, None);
        assert_eq!(reason, "vectors of dimension 3, but `init` declared 4");
    }

    #[test]
    fn a_dimension_of_zero_is_refused_not_divided_by() {
        let err = validate(&info(0), 2, 0, Vec::new()).unwrap_err();
        assert!(
            matches!(&err, WasmError::InvalidOutput { index: None, reason } if reason.contains("0-dimensional")),
            "{err:?}"
        );
        // The shapes that fit pass.
        assert_eq!(validate(&info(2), 2, 2, vec![1.0; 4]).unwrap().len(), 2);
    }
}
