//! A component of another world (see `wit/probe.wit`): the BERT plugin's
//! linear layer alone, for `cargo bench --bench throughput`'s kernel
//! figures. The weights and inputs are made once per shape from a fixed
//! sequence, so every call measures only the products.

use embedhost_kernels::{F32Linear, I8Linear, Pull, Quantized, ROWS, Then, round_up};

wit_bindgen::generate!({
    path: "wit",
    world: "kernel-probe",
});

/// The largest operand a call may ask for, so a caller cannot make the
/// probe allocate without bound.
const MAX_ELEMENTS: u64 = 1 << 24;

struct Probe;

/// A fixed pseudo-random sequence in -0.5..0.5 (no dependency needed).
fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(2_654_435_761).max(1);
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state as f32 / u32::MAX as f32) - 0.5
        })
        .collect()
}

struct Layer {
    shape: (Precision, usize, usize, usize),
    f32: Option<F32Linear>,
    i8: Option<I8Linear>,
    x: Vec<f32>,
    q: Quantized,
    out: Vec<f32>,
}

static LAYER: std::sync::Mutex<Option<Layer>> = std::sync::Mutex::new(None);

impl Guest for Probe {
    fn linear(precision: Precision, rows: u32, outputs: u32, inputs: u32, reps: u32) -> f32 {
        let rows = round_up(rows.max(1) as usize, ROWS);
        let (outputs, inputs) = (outputs.max(1) as usize, inputs.max(1) as usize);
        let biggest = (rows * inputs).max(outputs * inputs).max(rows * outputs) as u64;
        if biggest > MAX_ELEMENTS {
            return f32::NAN;
        }
        let shape = (precision, rows, outputs, inputs);
        let mut slot = LAYER.lock().unwrap_or_else(|e| e.into_inner());
        if slot.as_ref().is_none_or(|l| l.shape != shape) {
            let w = values(outputs * inputs, 1);
            let b = values(outputs, 2);
            *slot = Some(Layer {
                shape,
                f32: (precision == Precision::Fp32)
                    .then(|| F32Linear::new(&w, &b, outputs, inputs)),
                i8: (precision == Precision::Int8)
                    .then(|| I8Linear::new(&w, &b, outputs, inputs, None, Pull::None)),
                x: values(rows * inputs, 3),
                q: Quantized::default(),
                out: vec![0.0; rows * outputs],
            });
        }
        let Some(layer) = slot.as_mut() else {
            return f32::NAN;
        };
        for _ in 0..reps {
            if let Some(l) = &layer.f32 {
                l.forward(&layer.x, rows, &mut layer.out, Then::Store);
            }
            if let Some(l) = &layer.i8 {
                l.quantize(&layer.x, rows, &mut layer.q);
                l.forward(&layer.q, rows, &mut layer.out, Then::Store);
            }
        }
        layer.out.iter().sum()
    }
}

export!(Probe);
