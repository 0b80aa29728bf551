//! A component of another world (see `wit/probe.wit`): the BERT plugin's
//! linear layer alone, for `cargo bench --bench throughput`'s kernel
//! figures. The weights and inputs are made once per shape from a fixed
//! sequence, so every call measures only the products.
//!
//! It also checks the kernels against plain f64 references at any shape
//! (`check-linear`, `check-attention`), for the test in
//! `tests/all/kernels.rs`: the model's own shapes never reach the kernels'
//! partial tiles and remainders.

use embedhost_kernels::{
    Attention, F32Linear, I8Linear, Pull, Quantized, ROWS, Sums, Then, attend, attend_fixed, gelu,
    round_up,
};

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

/// Weights (`outputs x inputs`) shaped like a trained layer's: bell-shaped
/// and mostly small (the mean of four [`values`]), with one weight of each
/// output at 0.5 setting its int8 scale, as a trained layer's few large
/// weights do. Weights drawn evenly from the whole range would make the
/// int8 layer fall back from paired sums (see `PAIRS_AT_RISK`), and the
/// probe would neither measure nor check them.
fn weights(outputs: usize, inputs: usize, seed: u32) -> Vec<f32> {
    let n = outputs * inputs;
    let parts: Vec<Vec<f32>> = (0..4).map(|i| values(n, seed * 4 + i)).collect();
    let mut w: Vec<f32> = (0..n)
        .map(|i| parts.iter().map(|p| p[i]).sum::<f32>() / 4.0)
        .collect();
    for o in 0..outputs {
        w[o * inputs + o % inputs] = 0.5;
    }
    w
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
            let w = weights(outputs, inputs, 1);
            let b = values(outputs, 2);
            *slot = Some(Layer {
                shape,
                f32: (precision == Precision::Fp32)
                    .then(|| F32Linear::new(&w, &b, outputs, inputs)),
                i8: sums(precision)
                    .map(|s| I8Linear::new(&w, &b, outputs, inputs, None, Pull::None, s)),
                x: values(rows * inputs, 3),
                q: Quantized::default(),
                out: vec![0.0; rows * outputs],
            });
        }
        let Some(layer) = slot.as_mut() else {
            return f32::NAN;
        };
        if layer.i8.as_ref().map(I8Linear::sums) != sums(precision) {
            // The int8 kernel asked for would not run.
            return f32::NAN;
        }
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

    fn check_linear(precision: Precision, rows: u32, outputs: u32, inputs: u32) -> f32 {
        let (rows, outputs, inputs) = (
            rows.max(1) as usize,
            outputs.max(1) as usize,
            inputs.max(1) as usize,
        );
        let biggest = (round_up(rows, ROWS) * inputs.max(outputs)).max(outputs * inputs) as u64;
        if biggest > MAX_ELEMENTS {
            return f32::NAN;
        }
        check_linear(precision, rows, outputs, inputs)
    }

    fn pairs_kept(outputs: u32, inputs: u32) -> (bool, bool) {
        let (outputs, inputs) = (outputs.max(1) as usize, inputs.max(1) as usize);
        if (outputs * inputs) as u64 > MAX_ELEMENTS {
            return (false, false);
        }
        let b = values(outputs, 2);
        let kept = |w: &[f32]| {
            I8Linear::new(w, &b, outputs, inputs, None, Pull::None, Sums::Pairs).sums()
                == Sums::Pairs
        };
        (
            kept(&weights(outputs, inputs, 1)),
            kept(&values(outputs * inputs, 1)),
        )
    }

    fn check_attention(precision: Precision, n: u32, head: u32) -> f32 {
        let (n, head) = (n.max(1) as usize, head.max(1) as usize);
        if (n * (3 * head + 5)).max(n * n) as u64 > MAX_ELEMENTS {
            return f32::NAN;
        }
        check_attention(precision, n, head)
    }
}

/// The largest `|got - want|` over `want`'s entries, divided by the largest
/// `|want|`.
fn relative_error(got: &[f32], want: &[f32]) -> f32 {
    let scale = want
        .iter()
        .fold(0f32, |m, w| m.max(w.abs()))
        .max(f32::MIN_POSITIVE);
    let worst = got.iter().zip(want).fold(0f32, |m, (g, w)| {
        if (g - w).abs() > m || g.is_nan() {
            (g - w).abs()
        } else {
            m
        }
    });
    worst / scale
}

/// How an int8 precision adds its products; `None` for f32.
fn sums(precision: Precision) -> Option<Sums> {
    match precision {
        Precision::Fp32 => None,
        Precision::Int8 => Some(Sums::Exact),
        Precision::Int8Pairs => Some(Sums::Pairs),
    }
}

/// One layer's forward pass into `out`, through a given output step.
type Forward = Box<dyn Fn(&mut [f32], Then)>;

/// `check-linear`, for shapes within [`MAX_ELEMENTS`].
fn check_linear(precision: Precision, rows: usize, outputs: usize, inputs: usize) -> f32 {
    let padded = round_up(rows, ROWS);
    let (w, b) = (weights(outputs, inputs, 5), values(outputs, 6));
    let (x, residual) = (values(padded * inputs, 7), values(padded * outputs, 8));
    let mut plain = vec![0f32; rows * outputs];
    for r in 0..rows {
        for o in 0..outputs {
            let dot: f64 = (0..inputs)
                .map(|k| f64::from(x[r * inputs + k]) * f64::from(w[o * inputs + k]))
                .sum();
            plain[r * outputs + o] = (dot + f64::from(b[o])) as f32;
        }
    }
    let mut gelu_plain = plain.clone();
    gelu(&mut gelu_plain);
    let added: Vec<f32> = plain.iter().zip(&residual).map(|(p, r)| p + r).collect();
    let layers: Vec<Forward> = match sums(precision) {
        None => {
            let l = F32Linear::new(&w, &b, outputs, inputs);
            vec![Box::new(move |out: &mut [f32], then: Then| {
                l.forward(&x, padded, out, then)
            })]
        }
        Some(sums) => {
            let built: Vec<I8Linear> = [Pull::None, Pull::Outlier]
                .into_iter()
                .map(|pull| I8Linear::new(&w, &b, outputs, inputs, None, pull, sums))
                .collect();
            if built.iter().any(|l| l.sums() != sums) {
                // The kernel asked for would not run: nothing to check.
                return f32::NAN;
            }
            built
                .into_iter()
                .map(|l| {
                    let x = x.clone();
                    Box::new(move |out: &mut [f32], then: Then| {
                        let mut q = Quantized::default();
                        l.quantize(&x, padded, &mut q);
                        l.forward(&q, padded, out, then)
                    }) as Forward
                })
                .collect()
        }
    };
    let mut worst = 0f32;
    for layer in &layers {
        for (then, want) in [
            (Then::Store, &plain),
            (Then::Gelu, &gelu_plain),
            (Then::Add(&residual), &added),
        ] {
            let mut out = vec![0f32; padded * outputs];
            layer(&mut out, then);
            worst = worst.max(relative_error(&out[..rows * outputs], want));
        }
    }
    worst
}

/// `check-attention`, for shapes within [`MAX_ELEMENTS`]: the rows are laid
/// out as the engine's are (query, key and value side by side, with more
/// in a row), and the output lands at an offset in wider rows.
fn check_attention(precision: Precision, n: usize, head: usize) -> f32 {
    let stride = 3 * head + 5;
    let qkv = values(n * stride, 9);
    let (out_stride, at) = (head + 3, 1);
    let scale = 1.0 / (head as f32).sqrt();
    let mut want = vec![0f32; n * head];
    for i in 0..n {
        let scores: Vec<f64> = (0..n)
            .map(|j| {
                (0..head)
                    .map(|d| f64::from(qkv[i * stride + d]) * f64::from(qkv[j * stride + head + d]))
                    .sum::<f64>()
                    * f64::from(scale)
            })
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        for d in 0..head {
            let v: f64 = (0..n)
                .map(|j| e[j] * f64::from(qkv[j * stride + 2 * head + d]))
                .sum();
            want[i * head + d] = (v / sum) as f32;
        }
    }
    let mut out = vec![0f32; n * out_stride];
    let attend = match precision {
        Precision::Fp32 => attend,
        Precision::Int8 | Precision::Int8Pairs => attend_fixed,
    };
    attend(
        &qkv,
        stride,
        (0, head, 2 * head),
        n,
        head,
        scale,
        &mut Attention::default(),
        &mut out,
        out_stride,
        at,
    );
    let got: Vec<f32> = (0..n)
        .flat_map(|i| out[i * out_stride + at..][..head].to_vec())
        .collect();
    relative_error(&got, &want)
}

export!(Probe);
