//! The BERT plugin's kernels at shapes the model never has, against plain
//! f64 references computed inside the same component (`kernel-probe`'s
//! `check-linear` and `check-attention`): rows, outputs and inputs that are
//! not multiples of the tiles', so partial tiles, padded rows and the
//! scalar remainders of the SIMD packing run. all-MiniLM-L6-v2's shapes
//! (384, 1152, 1536; head 32) never reach those paths, so the golden tests
//! cannot catch a mistake there.

use embedhost::wasm::WasmEngine;

#[path = "../../benches/common/kernel_probe.rs"]
mod kernel_probe;
use kernel_probe::Precision;

/// f32 sums in a different order than f64's: relative error well below.
const F32_TOLERANCE: f32 = 1e-5;
/// int8 weights and 7-bit activations: about 1% of the largest output; a
/// layout mistake gives errors of the order of the outputs themselves. (The
/// paired sums saturate rarely, and a saturated lane loses a fraction of
/// one group's products, well within this.)
const INT8_TOLERANCE: f32 = 0.05;

/// Attention in 16-bit fixed point (11- to 13-bit codes): measured 1e-4 to
/// 4e-4 of the largest output; a layout mistake gives errors of the order
/// of the outputs themselves.
const FIXED_TOLERANCE: f32 = 0.002;

#[test]
fn the_kernels_match_plain_products_at_shapes_off_the_tiles() {
    let (mut store, probe) = kernel_probe::instantiate(&WasmEngine::new(None).unwrap());
    // (rows, outputs, inputs): partial row tiles, partial output blocks,
    // inputs off the 4-wide units and the 16-byte steps, and one of each.
    let shapes = [
        (1, 1, 1),
        (5, 13, 7),
        (4, 8, 16),
        (9, 3, 33),
        (13, 30, 45),
        (70, 21, 100),
    ];
    for (rows, outputs, inputs) in shapes {
        for (precision, tolerance) in [
            (Precision::Fp32, F32_TOLERANCE),
            (Precision::Int8, INT8_TOLERANCE),
            (Precision::Int8Pairs, INT8_TOLERANCE),
        ] {
            let error = probe
                .call_check_linear(&mut store, precision, rows, outputs, inputs)
                .unwrap();
            assert!(
                error < tolerance,
                "{precision:?} linear {rows}x{inputs} -> {outputs}: relative error {error}"
            );
        }
    }
    // (n, head): n off the tiles' 4 rows and 8 keys, heads off the 4-wide
    // packing and the 8-wide value blocks, odd n and heads off the fixed
    // point's pairs; and the longest text at a wide head, where the
    // fixed point's codes are bounded so that no sum overflows.
    for (n, head) in [
        (1, 1),
        (3, 5),
        (5, 7),
        (9, 12),
        (13, 32),
        (37, 19),
        (256, 32),
    ] {
        for (precision, tolerance) in [
            (Precision::Fp32, F32_TOLERANCE),
            (Precision::Int8, FIXED_TOLERANCE),
        ] {
            let error = probe
                .call_check_attention(&mut store, precision, n, head)
                .unwrap();
            assert!(
                error < tolerance,
                "{precision:?} attention n={n} head={head}: relative error {error}"
            );
        }
    }
}

#[test]
fn paired_int8_sums_fall_back_to_exact_ones_for_weights_that_would_saturate_them() {
    let (mut store, probe) = kernel_probe::instantiate(&WasmEngine::new(None).unwrap());
    // all-MiniLM-L6-v2's shapes: trained-like weights keep the paired sums,
    // weights spread evenly over the codes (about 8% of lanes at risk)
    // fall back.
    for (outputs, inputs) in [(384, 384), (1536, 384), (384, 1536)] {
        let (trained, even) = probe.call_pairs_kept(&mut store, outputs, inputs).unwrap();
        assert!(
            trained,
            "{inputs} -> {outputs}: trained-like weights lost the paired sums"
        );
        assert!(
            !even,
            "{inputs} -> {outputs}: even weights kept the paired sums"
        );
    }
}
