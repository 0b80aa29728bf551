//! The arithmetic of the engine, written for WebAssembly SIMD: the matrix
//! kernels, all one 4x8 tile over 4-byte units (int8 with the relaxed dot
//! product, exact or with paired 16-bit sums; 16-bit fixed point for the int8
//! precision's attention; and f32) and the lane kernels around them
//! (LayerNorm, GELU, softmax, quantization).
//!
//! # Why these shapes
//! - Cranelift (wasmtime 48) allocates xmm0–xmm15 only, so a tile keeps
//!   8 accumulators (4 rows x 8 outputs, two vectors a row) plus the two
//!   weight vectors and one broadcast operand: 11 registers, no spill.
//!   Wider tiles (12x4, 6x8) spill and run slower.
//! - SIMD is enabled per function (`#[target_feature]`), not for the crate:
//!   with `+simd128` for the whole crate LLVM auto-vectorizes shuffles and
//!   strided copies that Cranelift lowers poorly.
//! - int8: `i32x4.relaxed_dot_i8x16_i7x16_add` multiplies signed weight bytes
//!   by activation bytes in 0..=127 and adds groups of four into i32 lanes.
//!   With the activation below 128, the pairwise i16 sums stay within
//!   ±32512, so no platform saturates and the result is exact and identical
//!   everywhere (x86 lowers it to `pmaddubsw` + `pmaddwd`). [`Sums::Pairs`]
//!   trades that exactness for speed where saturation is rare.
//! - 16-bit fixed point: `i32x4.dot_i16x8_s` is exact; [`attend_fixed`]
//!   bounds its codes so that no i32 sum overflows.
//!
//! # Invariants
//! - Every row is computed alone, in a fixed order of operations, whatever
//!   rows share its tile: a text's vector never depends on its batch
//!   neighbours, bit for bit.
//! - Matrices hold a multiple of [`ROWS`] rows (callers pad), and packed
//!   weights a multiple of [`COLS`] outputs (padded with zero weights).
//! - No fused multiply-add (`relaxed_madd`): its rounding differs by
//!   platform, which would make vectors differ by machine.

use core::arch::wasm32::*;

pub mod timing;

use timing::{Stage, lap};

/// Rows (tokens) of one tile.
pub const ROWS: usize = 4;
/// Outputs of one tile: two f32x4 / i32x4 vectors.
pub const COLS: usize = 8;
/// The largest activation code: 7 bits, see the module docs.
const ACT_MAX: f32 = 127.0;
/// The largest weight code (symmetric, so -127..=127).
const WEIGHT_MAX: f32 = 127.0;
/// LayerNorm's and quantization's floor for a zero spread.
const TINY: f32 = 1e-30;

/// `n` rounded up to a multiple of `m`.
pub const fn round_up(n: usize, m: usize) -> usize {
    n.div_ceil(m) * m
}

/// Rows of activations a weight block is applied to before the next block:
/// 64 rows of 384 inputs are 24 KiB (int8) to 96 KiB (f32), held in L1/L2
/// while the layer's weights stream past once per 64 rows instead of once
/// per 4.
const ROW_CHUNK: usize = 64;

/// Calls `tile(row, output block)` for each of a product's tiles, blocks
/// outer within each chunk of [`ROW_CHUNK`] rows. (Plain loops: a chain of
/// `flat_map`s cost about 1% of a passage's time.)
#[inline(always)]
fn for_each_tile(rows: usize, outputs: usize, mut tile: impl FnMut(usize, usize)) {
    let blocks = outputs.div_ceil(COLS);
    let mut chunk = 0;
    while chunk < rows {
        let end = rows.min(chunk + ROW_CHUNK);
        for block in 0..blocks {
            let mut r = chunk;
            while r < end {
                tile(r, block);
                r += ROWS;
            }
        }
        chunk = end;
    }
}

/// What a linear layer does to its output before storing it.
#[derive(Clone, Copy)]
pub enum Then<'a> {
    /// Store `x W^T + b`.
    Store,
    /// Store `gelu(x W^T + b)` (the exact, erf form BERT uses).
    Gelu,
    /// Store `x W^T + b + residual` (`residual` has the output's shape).
    Add(&'a [f32]),
}

/// A linear layer's weights in f32, packed for [`f32_tile`]: for each block
/// of [`COLS`] outputs, every input's 8 weights side by side.
pub struct F32Linear {
    pub inputs: usize,
    pub outputs: usize,
    packed: Vec<f32>,
    bias: Vec<f32>,
}

/// Packs `outputs x inputs` weights, `row(o)` holding output `o`'s, into
/// `packed` for [`f32_tile`]: for each block of [`COLS`] outputs (the last
/// padded with zeros), every input's 8 weights side by side. Four outputs by
/// four inputs at a time, transposed in registers: attention packs its keys
/// this way for every text and head.
#[target_feature(enable = "simd128")]
fn pack_f32<'a>(
    packed: &mut Vec<f32>,
    outputs: usize,
    inputs: usize,
    row: impl Fn(usize) -> &'a [f32],
) {
    packed.clear();
    packed.resize(outputs.div_ceil(COLS) * inputs * COLS, 0.0);
    let whole = inputs / 4 * 4;
    for first in (0..outputs).step_by(4) {
        let (block, lane) = (first / COLS, first % COLS);
        let dst = &mut packed[block * inputs * COLS..][..inputs * COLS];
        let count = 4.min(outputs - first);
        let rows: [&[f32]; 4] = core::array::from_fn(|i| {
            if i < count {
                &row(first + i)[..inputs]
            } else {
                &[]
            }
        });
        for k in (0..whole).step_by(4) {
            // (A loop, not `from_fn`: a closure would not get the SIMD.)
            let mut v = [f32x4_splat(0.0); 4];
            for (v, r) in v.iter_mut().zip(&rows).take(count) {
                *v = load4(&r[k..]);
            }
            // The 4x4 transpose: t[j] holds input k + j of the 4 outputs.
            let a = i32x4_shuffle::<0, 4, 1, 5>(v[0], v[1]);
            let b = i32x4_shuffle::<2, 6, 3, 7>(v[0], v[1]);
            let c = i32x4_shuffle::<0, 4, 1, 5>(v[2], v[3]);
            let d = i32x4_shuffle::<2, 6, 3, 7>(v[2], v[3]);
            let t = [
                i32x4_shuffle::<0, 1, 4, 5>(a, c),
                i32x4_shuffle::<2, 3, 6, 7>(a, c),
                i32x4_shuffle::<0, 1, 4, 5>(b, d),
                i32x4_shuffle::<2, 3, 6, 7>(b, d),
            ];
            for (j, t) in t.into_iter().enumerate() {
                let d = &mut dst[(k + j) * COLS + lane..][..4];
                // SAFETY: 4 values.
                unsafe { v128_store(d.as_mut_ptr() as *mut v128, t) };
            }
        }
        for (i, r) in rows.iter().enumerate().take(count) {
            for k in whole..inputs {
                dst[k * COLS + lane + i] = r[k];
            }
        }
    }
}

/// Per output, padded with zeros to whole blocks of [`COLS`].
fn padded(bias: &[f32]) -> Vec<f32> {
    let mut padded = bias.to_vec();
    padded.resize(round_up(bias.len(), COLS), 0.0);
    padded
}

/// As [`pack_f32`] for weights that are the columns of `inputs` rows:
/// `weight(o, k) = row(k)[o]`, `row(k)` holding `outputs` values. Each block
/// of 8 outputs of an input is then 8 values side by side in its row: one
/// copy, not 8 strided reads.
#[target_feature(enable = "simd128")]
fn pack_columns_f32<'a>(
    packed: &mut Vec<f32>,
    inputs: usize,
    outputs: usize,
    row: impl Fn(usize) -> &'a [f32],
) {
    let blocks = outputs.div_ceil(COLS);
    packed.clear();
    packed.resize(blocks * inputs * COLS, 0.0);
    for k in 0..inputs {
        for (block, chunk) in row(k)[..outputs].chunks(COLS).enumerate() {
            let dst = &mut packed[(block * inputs + k) * COLS..][..chunk.len()];
            if chunk.len() == COLS {
                // Two vector copies, not a call to memmove.
                // SAFETY: 8 values each.
                unsafe {
                    v128_store(dst.as_mut_ptr() as *mut v128, load4(chunk));
                    v128_store(dst[4..].as_mut_ptr() as *mut v128, load4(&chunk[4..]));
                }
            } else {
                dst.copy_from_slice(chunk);
            }
        }
    }
}

/// `out[r][o] = x_r . w_o` through [`f32_tile`], with no bias: `rows` rows
/// (a multiple of [`ROWS`]) of `units` values, `stride` apart in `x`, against
/// `packed` weights (from [`pack_f32`]) of `blocks` blocks of outputs; `out`
/// rows are `blocks * COLS` wide.
///
/// # Panics
/// If `x`, `packed` or `out` is shorter than that (a bug).
fn f32_product(
    x: &[f32],
    stride: usize,
    units: usize,
    rows: usize,
    packed: &[f32],
    blocks: usize,
    out: &mut [f32],
) {
    let width = blocks * COLS;
    assert!(rows.is_multiple_of(ROWS) && stride >= units);
    assert!(rows == 0 || x.len() >= (rows - 1) * stride + units);
    assert!(packed.len() >= blocks * units * COLS && out.len() >= rows * width);
    for r in (0..rows).step_by(ROWS) {
        for block in 0..blocks {
            // SAFETY: ROWS rows of `units` values `stride` apart at row r,
            // the block's `units * COLS` weights, and ROWS rows of `width`
            // outputs at row r (asserted above).
            unsafe {
                f32_tile(
                    x[r * stride..].as_ptr() as *const u8,
                    stride,
                    units,
                    packed[block * units * COLS..].as_ptr() as *const u8,
                    out[r * width + block * COLS..].as_mut_ptr(),
                    width,
                )
            };
        }
    }
}

/// A linear layer's weights in int8 with one scale per output, packed for
/// [`i8_tile`]: for each block of [`COLS`] outputs and each group of 4
/// inputs, 32 bytes (4 outputs x 4 inputs, twice).
pub struct I8Linear {
    pub inputs: usize,
    pub outputs: usize,
    /// Inputs padded to a multiple of 4.
    stride: usize,
    packed: Vec<i8>,
    /// Per input: the factor applied before quantizing (1 / the smoothing
    /// scale folded into the weights), if smoothed.
    smooth: Option<Vec<f32>>,
    /// With [`Pull::Outlier`]: the weight codes again, input-major
    /// (`inputs x` padded outputs), for the pulled channel's correction.
    columns: Option<Vec<i8>>,
    /// Per output (padded): the weight scale, the sum of its codes, the bias.
    scale: Vec<f32>,
    code_sum: Vec<f32>,
    bias: Vec<f32>,
    sums: Sums,
}

/// How an int8 layer adds its products: the tile kernel it runs.
///
/// - `Exact` ([`i8_tile`]): every group of four products straight into i32.
/// - `Pairs` ([`i8_pair_tile`]): two groups added in 16 bits, with
///   saturation, before they widen: 3 multiplier instructions for two groups
///   on x86 where `Exact` takes 4 (`cargo bench --bench throughput` reports
///   both kernels). A 16-bit lane then holds four products, and past
///   ±32767 it saturates: in all-MiniLM-L6-v2's weights about 0.2% of the
///   lanes could get there with the largest activation codes.
/// - `PairsBefore(o)`: `Pairs` for outputs below `o` (a multiple of
///   [`COLS`]), `Exact` from there.
///
/// The engine gives the query/key/value product `PairsBefore` the values:
/// measured on the golden sentences ("hello" is the minimum each time),
/// `Pairs` everywhere gives 0.9933 to 0.9936, `Pairs` but for that whole
/// product 0.9963, and `Pairs` but for its values 0.9961. The values reach
/// the output through the attention's average alone, and in a short text a
/// few tokens' values, the [CLS] token's among them with its outlier
/// channel (see [`Pull`]), carry it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sums {
    Exact,
    Pairs,
    PairsBefore(usize),
}

impl Sums {
    /// Whether outputs `first..first + COLS` add their products in pairs.
    fn paired(self, first: usize) -> bool {
        match self {
            Sums::Exact => false,
            Sums::Pairs => true,
            Sums::PairsBefore(end) => first < end,
        }
    }
}

/// The largest share of a layer's 16-bit lanes whose four weight codes
/// could saturate the lane with the largest activation codes, for
/// paired sums to be used; above it the layer runs `Exact`. In
/// all-MiniLM-L6-v2 the share is 0.2% in every layer (trained weights are
/// mostly small); weights drawn evenly from the whole code range reach
/// about 8%, and there saturation is no longer rare.
pub const PAIRS_AT_RISK: f32 = 0.01;

/// Of one output's weight codes (input order, padded to whole units), the
/// 16-bit lanes of [`i8_pair_tile`] that could saturate, and all its lanes: a lane adds
/// inputs `j, j+1` of two neighbouring units, and saturates only if the
/// codes of one sign, times the largest activation code, pass `i16::MAX`.
fn lanes_at_risk(codes: &[i8]) -> (usize, usize) {
    // Units pair up within each whole step of 4 units (16 inputs); the
    // last `units % 4` go through the exact dot.
    let paired = codes.len() / 16 * 16;
    let (mut risky, mut all) = (0, 0);
    for pair in codes[..paired].chunks_exact(8) {
        for j in [0, 2] {
            let lane = [pair[j], pair[j + 1], pair[4 + j], pair[4 + j + 1]];
            let (mut up, mut down) = (0f32, 0f32);
            for c in lane {
                let c = f32::from(c);
                if c > 0.0 {
                    up += c;
                } else {
                    down -= c;
                }
            }
            all += 1;
            if ACT_MAX * up.max(down) > f32::from(i16::MAX) {
                risky += 1;
            }
        }
    }
    (risky, all)
}

/// Whether a layer's activations are quantized with each token's largest
/// channel pulled out.
///
/// A token's activations can hold one channel far larger than the rest: in
/// all-MiniLM-L6-v2 the [CLS] token's input to the query/key/value product
/// reaches 6.6 to 8.2 in one channel while its others stay below 0.8 (median
/// 0.01 to 0.05). One 7-bit step across that range (0.06) is larger than most
/// of the token's values, and the softmax magnifies the error: "hello" fell to
/// cosine 0.989. With `Outlier`, the largest `|x|` of each row is left out of
/// the row's range; the int8 product counts it at the nearest code, and the
/// output step adds back the rest of it, `delta * w` over that channel's int8
/// weights (`outputs` more multiply-adds per row, against `inputs x outputs`).
/// Measured: min cosine 0.9955 over the golden sentences, as with the 14-bit
/// activations (two passes of the kernel) that this replaces in one pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pull {
    None,
    Outlier,
}

impl F32Linear {
    /// Packs `weight` (`[outputs, inputs]`, PyTorch's layout) and `bias`.
    pub fn new(weight: &[f32], bias: &[f32], outputs: usize, inputs: usize) -> Self {
        let mut packed = Vec::new();
        pack_f32(&mut packed, outputs, inputs, |o| {
            &weight[o * inputs..][..inputs]
        });
        F32Linear {
            inputs,
            outputs,
            packed,
            bias: padded(bias),
        }
    }

    /// `out[r] = then(x[r] W^T + b)` for every row of `x` (`rows x inputs`,
    /// `rows` a multiple of [`ROWS`]); `out` is `rows x outputs`.
    pub fn forward(&self, x: &[f32], rows: usize, out: &mut [f32], then: Then) {
        assert!(rows.is_multiple_of(ROWS) && x.len() >= rows * self.inputs);
        let mut tile = [0f32; ROWS * COLS];
        for_each_tile(rows, self.outputs, |r, block| {
            // SAFETY: the tile reads ROWS rows of `inputs` values from
            // `x` at row r, and `inputs * COLS` packed weights of this
            // block; both are in bounds by construction (asserted above).
            unsafe {
                f32_tile(
                    x.as_ptr().add(r * self.inputs) as *const u8,
                    self.inputs,
                    self.inputs,
                    self.packed.as_ptr().add(block * self.inputs * COLS) as *const u8,
                    tile.as_mut_ptr(),
                    COLS,
                );
            }
            store(
                &tile,
                Target::of(&self.bias, self.outputs, r, block, &mut *out, then),
            );
        });
    }
}

impl I8Linear {
    /// Quantizes `weight` (`[outputs, inputs]`) per output channel and packs
    /// it. With `smooth` (per input, from [`smoothing`]), input `k`'s weights
    /// are multiplied by `smooth[k]` and its activations divided by it.
    pub fn new(
        weight: &[f32],
        bias: &[f32],
        outputs: usize,
        inputs: usize,
        smooth: Option<Vec<f32>>,
        pull: Pull,
        sums: Sums,
    ) -> Self {
        let stride = round_up(inputs, 4);
        let blocks = outputs.div_ceil(COLS);
        let mut packed = vec![0i8; blocks * stride * COLS];
        let mut scale = vec![0f32; blocks * COLS];
        let mut code_sum = vec![0f32; blocks * COLS];
        let mut columns = (pull == Pull::Outlier).then(|| vec![0i8; inputs * blocks * COLS]);
        let (mut codes, mut at_risk, mut lanes) = (Vec::with_capacity(inputs), 0, 0);
        for o in 0..outputs {
            let row: Vec<f32> = match &smooth {
                Some(s) => weight[o * inputs..][..inputs]
                    .iter()
                    .zip(s)
                    .map(|(w, s)| w * s)
                    .collect(),
                None => weight[o * inputs..][..inputs].to_vec(),
            };
            let max = row.iter().fold(0f32, |m, w| m.max(w.abs()));
            let s = max.max(TINY) / WEIGHT_MAX;
            scale[o] = s;
            let (block, lane) = (o / COLS, o % COLS);
            let mut sum = 0i32;
            codes.clear();
            for (k, &w) in row.iter().enumerate() {
                let q = (w / s).round().clamp(-WEIGHT_MAX, WEIGHT_MAX) as i8;
                codes.push(q);
                sum += i32::from(q);
                // Group g of 4 inputs: 32 bytes; the first 16 hold outputs
                // 0..4 of the block, the next 16 outputs 4..8, each 4 bytes.
                let (g, within) = (k / 4, k % 4);
                let at = (block * stride / 4 + g) * 32 + (lane / 4) * 16 + (lane % 4) * 4 + within;
                packed[at] = q;
                if let Some(c) = &mut columns {
                    c[k * blocks * COLS + o] = q;
                }
            }
            code_sum[o] = sum as f32;
            if sums.paired(block * COLS) {
                codes.resize(stride, 0);
                let (risky, all) = lanes_at_risk(&codes);
                at_risk += risky;
                lanes += all;
            }
        }
        // Paired sums only where the weights make saturation rare.
        let sums = if at_risk as f32 > PAIRS_AT_RISK * lanes as f32 {
            Sums::Exact
        } else {
            sums
        };
        I8Linear {
            inputs,
            outputs,
            stride,
            packed,
            scale,
            code_sum,
            bias: padded(bias),
            smooth: smooth.map(|s| s.iter().map(|v| 1.0 / v).collect()),
            columns,
            sums,
        }
    }

    /// How this layer adds its products: as asked, or `Exact` where paired
    /// sums were asked but its weights could saturate them too often (see
    /// [`PAIRS_AT_RISK`]).
    pub fn sums(&self) -> Sums {
        self.sums
    }

    /// Quantizes `rows` rows of `x` for this layer into `q`.
    pub fn quantize(&self, x: &[f32], rows: usize, q: &mut Quantized) {
        q.pull = self.columns.is_some();
        quantize(x, rows, self.inputs, self.stride, self.smooth.as_deref(), q);
    }

    /// As [`F32Linear::forward`], on activations quantized by
    /// [`Self::quantize`].
    pub fn forward(&self, x: &Quantized, rows: usize, out: &mut [f32], then: Then) {
        assert!(rows.is_multiple_of(ROWS) && x.codes.len() >= rows * self.stride);
        assert!(x.stride == self.stride && x.step.len() >= rows);
        assert!(!x.pull || x.channel.len() >= rows);
        assert_eq!(x.pull, self.columns.is_some());
        // One block's tiles for a chunk of rows, then their output step in
        // one call.
        let mut tiles = [[0i32; ROWS * COLS]; ROW_CHUNK / ROWS];
        let width = round_up(self.outputs, COLS);
        // Units of 4 codes.
        let units = self.stride / 4;
        let mut chunk = 0;
        while chunk < rows {
            let end = rows.min(chunk + ROW_CHUNK);
            let groups = (end - chunk) / ROWS;
            for block in 0..self.outputs.div_ceil(COLS) {
                let w = self.packed[block * self.stride * COLS..].as_ptr() as *const u8;
                let kernel = if self.sums.paired(block * COLS) {
                    i8_pair_tile
                } else {
                    i8_tile
                };
                for (g, tile) in tiles[..groups].iter_mut().enumerate() {
                    let r = chunk + g * ROWS;
                    // SAFETY: ROWS rows of `stride` codes at row r, and the
                    // block's `stride * COLS` packed bytes: in bounds by
                    // construction (asserted above).
                    unsafe {
                        kernel(
                            x.codes.as_ptr().add(r * self.stride),
                            units,
                            units,
                            w,
                            tile.as_mut_ptr(),
                            COLS,
                        );
                    }
                }
                let o = block * COLS;
                let pulled = self.columns.as_deref().map(|c| Pulled {
                    columns: c,
                    width,
                    channel: &x.channel[chunk..end],
                    delta: &x.delta[chunk..end],
                });
                dequantize(
                    &tiles[..groups],
                    &x.step[chunk..end],
                    &x.low[chunk..end],
                    &self.scale[o..o + COLS],
                    &self.code_sum[o..o + COLS],
                    pulled,
                    Target::of(&self.bias, self.outputs, chunk, block, &mut *out, then),
                );
            }
            chunk = end;
        }
    }
}

/// Where a tile's outputs go: rows `row..row + ROWS`, outputs `first..` of
/// `out` (`outputs` a row), with the block's `bias` and the follow-up.
struct Target<'a, 'b> {
    bias: &'a [f32],
    row: usize,
    first: usize,
    outputs: usize,
    out: &'b mut [f32],
    then: Then<'a>,
}

impl<'a, 'b> Target<'a, 'b> {
    /// The tile at row `row` and output block `block` of a layer with
    /// `outputs` outputs and `bias` padded to whole blocks.
    fn of(
        bias: &'a [f32],
        outputs: usize,
        row: usize,
        block: usize,
        out: &'b mut [f32],
        then: Then<'a>,
    ) -> Self {
        let first = block * COLS;
        Target {
            bias: &bias[first..first + COLS],
            row,
            first,
            outputs,
            out,
            then,
        }
    }
}

/// Writes one tile's `x W^T` (plus bias, then the follow-up) where `to`
/// says.
#[target_feature(enable = "simd128")]
fn store(tile: &[f32; ROWS * COLS], to: Target) {
    let Target {
        bias,
        row,
        first,
        outputs,
        out,
        then,
    } = to;
    let width = COLS.min(outputs - first);
    if width < COLS {
        for i in 0..ROWS {
            let at = (row + i) * outputs + first;
            let dst = &mut out[at..][..width];
            for j in 0..width {
                dst[j] = tile[i * COLS + j] + bias[j];
            }
            match then {
                Then::Store => {}
                Then::Gelu => gelu(dst),
                Then::Add(residual) => {
                    for (d, r) in dst.iter_mut().zip(&residual[at..][..width]) {
                        *d += r;
                    }
                }
            }
        }
        return;
    }
    // The same arithmetic, four lanes at a time.
    let bias = [load4(&bias[..4]), load4(&bias[4..8])];
    for i in 0..ROWS {
        let at = (row + i) * outputs + first;
        for h in 0..2 {
            let v = f32x4_add(load4(&tile[i * COLS + 4 * h..]), bias[h]);
            finish4(v, at + 4 * h, out, then);
        }
    }
}

/// The first 4 values of `s` as a vector.
#[inline(always)]
fn load4(s: &[f32]) -> v128 {
    let s = &s[..4];
    // SAFETY: 4 values.
    unsafe { v128_load(s.as_ptr() as *const v128) }
}

/// Applies `then` to `v` (outputs `at..at + 4` of `out`, bias added) and
/// stores it there.
#[inline(always)]
fn finish4(v: v128, at: usize, out: &mut [f32], then: Then) {
    let v = match then {
        Then::Store => v,
        Then::Gelu => gelu4(v),
        Then::Add(residual) => f32x4_add(v, load4(&residual[at..])),
    };
    let d = &mut out[at..][..4];
    // SAFETY: 4 values.
    unsafe { v128_store(d.as_mut_ptr() as *mut v128, v) };
}

/// The pulled channels of a tile's rows, for [`dequantize`].
struct Pulled<'a> {
    /// The layer's weight codes, input-major, `width` a row.
    columns: &'a [i8],
    width: usize,
    /// Per row: the pulled channel and what its code left out.
    channel: &'a [u32],
    delta: &'a [f32],
}

/// Int8 tiles' sums as real values: `x ~ step * code + low`, `w = scale *
/// code`, so `x.w = scale * (step * sum(codes) + low * sum(w codes))`; plus,
/// with `pulled`, each row's `delta * scale * code` of its pulled channel's
/// weights; then the bias and the follow-up, stored as [`store`] does.
/// `tiles` are one block's tiles for rows `to.row..` in order (`step`,
/// `low` and `pulled` cover the same rows): one call a block of a chunk of
/// rows, not one a tile. A whole block of 8 outputs goes from the sums to
/// `out` in registers; a partial last block through [`store`].
#[target_feature(enable = "simd128")]
#[allow(clippy::too_many_arguments)]
fn dequantize(
    tiles: &[[i32; ROWS * COLS]],
    step: &[f32],
    low: &[f32],
    scale: &[f32],
    code_sum: &[f32],
    pulled: Option<Pulled>,
    to: Target,
) {
    let (scale, sums) = (
        [load4(&scale[..4]), load4(&scale[4..8])],
        [load4(&code_sum[..4]), load4(&code_sum[4..8])],
    );
    let bias = [load4(&to.bias[..4]), load4(&to.bias[4..8])];
    let whole = to.outputs - to.first >= COLS;
    for (g, tile) in tiles.iter().enumerate() {
        // A partial block goes through a tile of real values and [`store`].
        // (Only then: a zeroed array is a call to wasmtime's memory.fill.)
        let mut partial = (!whole).then_some([0f32; ROWS * COLS]);
        // The rows written out, not a loop: a loop's header checks the
        // epoch, and across that check Cranelift keeps the scales, sums and
        // biases in stack slots, reloading them for every row.
        macro_rules! row {
            ($r:literal) => {{
                let (r, pr) = ($r, g * ROWS + $r);
                let at = (to.row + pr) * to.outputs + to.first;
                let v = row_values(
                    &tile[r * COLS..][..COLS],
                    pr,
                    step[pr],
                    low[pr],
                    scale,
                    sums,
                    pulled.as_ref(),
                    to.first,
                );
                for (h, v) in v.into_iter().enumerate() {
                    match &mut partial {
                        None => finish4(f32x4_add(v, bias[h]), at + 4 * h, to.out, to.then),
                        Some(real) => {
                            let d = &mut real[r * COLS + 4 * h..][..4];
                            // SAFETY: 4 values.
                            unsafe { v128_store(d.as_mut_ptr() as *mut v128, v) };
                        }
                    }
                }
            }};
        }
        const _: () = assert!(ROWS == 4);
        row!(0);
        row!(1);
        row!(2);
        row!(3);
        if let Some(real) = partial {
            store(
                &real,
                Target {
                    row: to.row + g * ROWS,
                    out: &mut *to.out,
                    ..to
                },
            );
        }
    }
}

/// Row `r` of an int8 tile (`tile` the row's 8 sums, `r` its index in
/// `pulled`'s rows) as real values before the bias (see [`dequantize`]).
/// (A function, not a closure: a closure is compiled without the caller's
/// SIMD and was not inlined.)
#[target_feature(enable = "simd128")]
#[inline]
#[allow(clippy::too_many_arguments)]
fn row_values(
    tile: &[i32],
    r: usize,
    step: f32,
    low: f32,
    scale: [v128; 2],
    sums: [v128; 2],
    pulled: Option<&Pulled>,
    first: usize,
) -> [v128; 2] {
    let (st, lo) = (f32x4_splat(step), f32x4_splat(low));
    // The pulled channel's 8 weight codes as two f32x4, times delta.
    let extra = pulled.map(|p| {
        let codes = &p.columns[p.channel[r] as usize * p.width + first..][..COLS];
        // SAFETY: 8 bytes.
        let c = i16x8_extend_low_i8x16(unsafe { v128_load64_zero(codes.as_ptr() as *const u64) });
        let d = f32x4_splat(p.delta[r]);
        [
            f32x4_mul(d, f32x4_convert_i32x4(i32x4_extend_low_i16x8(c))),
            f32x4_mul(d, f32x4_convert_i32x4(i32x4_extend_high_i16x8(c))),
        ]
    });
    let mut v = [f32x4_splat(0.0); 2];
    for (h, v) in v.iter_mut().enumerate() {
        let codes = &tile[4 * h..][..4];
        // SAFETY: 4 values.
        let codes = f32x4_convert_i32x4(unsafe { v128_load(codes.as_ptr() as *const v128) });
        let mut sum = f32x4_add(f32x4_mul(st, codes), f32x4_mul(lo, sums[h]));
        if let Some(e) = extra {
            sum = f32x4_add(sum, e[h]);
        }
        *v = f32x4_mul(scale[h], sum);
    }
    v
}

// The tiles' inner loops: each iteration takes 4 inputs (f32) or 16 (int8),
// loading 16 bytes of each of the 4 rows once and broadcasting their lanes
// with shuffles. wasmtime checks the epoch at every loop header, and the
// check's slow path is a call that clobbers every vector register, so
// Cranelift keeps the 8 accumulators in stack slots across the back-edge: 16
// moves an iteration, which this much work per iteration shares. (Seen in the
// machine code, see the plugin's README. Measured with a temporary timer
// inside the guest, not a benchmark that can be rerun: one group an iteration with scalar broadcasts ran the int8 tile at
// 37 GOP/s, 8 groups at 40 to 57, this shape at 60 to 95 (the machine's noise
// is that wide); two of these iterations unrolled into one were slower, as
// Cranelift then loads all of them first and spills.)
//
// Why all loads come first: a load from linear memory may trap, so Cranelift
// keeps loads in program order, while it places pure arithmetic where a
// side-effecting instruction first needs it, here the back-edge. Every vector
// an iteration loads is live at once, so an iteration holds at most about 13
// (here 12: 4 rows and 8 weight vectors). A dot-product form (two rows by four
// outputs, horizontal sums once per tile, no shuffles) holds fewer
// multiply-adds per loaded vector and was slower with one, two and four
// steps an iteration (an informal timing of the kernel probe in a loop, not
// a committed benchmark).

/// 16 bytes at `p` as a vector (WebAssembly loads need no alignment).
///
/// # Safety
/// 16 bytes at `p` must be readable.
#[inline(always)]
unsafe fn load<T>(p: *const T) -> v128 {
    // SAFETY: the caller's.
    unsafe { v128_load(p as *const v128) }
}

/// Four bytes at `p`, in every lane.
///
/// # Safety
/// 4 bytes at `p` must be readable.
#[inline(always)]
unsafe fn splat32<T>(p: *const T) -> v128 {
    // SAFETY: the caller's.
    u32x4_splat(unsafe { (p as *const u32).read_unaligned() })
}

/// Defines a 4x8 tile kernel over 4-byte units: one f32 input, or a group of
/// four int8 codes. `x` is ROWS rows of `units` units, `stride` units apart;
/// `w` holds 32 bytes of packed weights per unit (outputs 0..4, then 4..8), as
/// both [`F32Linear`] and [`I8Linear`] pack them. `|acc, s, w| mac` adds the
/// products of the unit `s` (broadcast to every lane) and weights `w` to
/// `acc`; `|acc, s0, w0, s1, w1| pair`, if given, adds those of two units in
/// a row (by default `mac` twice).
/// The sums go to ROWS rows of COLS values at `out`, `out_stride` values
/// apart (straight into a product's output where nothing follows).
///
/// Each iteration loads 16 bytes (4 units) of each row once and broadcasts
/// the units with shuffles; the last `units % 4` take a unit at a time.
macro_rules! tile_kernel {
    (
        $(#[$attr:meta])* $name:ident, $sum:ty, $features:literal,
        |$acc:ident, $s:ident, $w:ident| $mac:expr
        $(, |$pacc:ident, $s0:ident, $w0:ident, $s1:ident, $w1:ident| $pair:expr)?
    ) => {
        $(#[$attr])*
        #[target_feature(enable = $features)]
        unsafe fn $name(
            x: *const u8,
            stride: usize,
            units: usize,
            w: *const u8,
            out: *mut $sum,
            out_stride: usize,
        ) {
            let mac = |$acc: v128, $s: v128, $w: v128| -> v128 { $mac };
            #[allow(unused_variables)]
            let pair = |a: v128, s0: v128, w0: v128, s1: v128, w1: v128| mac(mac(a, s0, w0), s1, w1);
            $(let pair = |$pacc: v128, $s0: v128, $w0: v128, $s1: v128, $w1: v128| -> v128 { $pair };)?
            let mut acc = [i32x4_splat(0); 8];
            // The products of units `u` and `u + 1` with each row's
            // broadcast units `a` and `b`.
            let mut add2 = |u: usize, a: [v128; ROWS], b: [v128; ROWS]| {
                // SAFETY: u + 1 < units; the caller guarantees the extents.
                let w = unsafe {
                    [
                        load(w.add(32 * u)),
                        load(w.add(32 * u + 16)),
                        load(w.add(32 * u + 32)),
                        load(w.add(32 * u + 48)),
                    ]
                };
                for r in 0..ROWS {
                    acc[2 * r] = pair(acc[2 * r], a[r], w[0], b[r], w[2]);
                    acc[2 * r + 1] = pair(acc[2 * r + 1], a[r], w[1], b[r], w[3]);
                }
            };
            let mut u = 0;
            while u + 4 <= units {
                // SAFETY: units u..u + 4 of every row are in bounds.
                let x = unsafe {
                    [
                        load(x.add(4 * u)),
                        load(x.add(4 * (stride + u))),
                        load(x.add(4 * (2 * stride + u))),
                        load(x.add(4 * (3 * stride + u))),
                    ]
                };
                add2(
                    u,
                    x.map(|x| i32x4_shuffle::<0, 0, 0, 0>(x, x)),
                    x.map(|x| i32x4_shuffle::<1, 1, 1, 1>(x, x)),
                );
                add2(
                    u + 2,
                    x.map(|x| i32x4_shuffle::<2, 2, 2, 2>(x, x)),
                    x.map(|x| i32x4_shuffle::<3, 3, 3, 3>(x, x)),
                );
                u += 4;
            }
            while u < units {
                // SAFETY: unit u of every row is in bounds.
                let (x, w0, w1) = unsafe {
                    (
                        [
                            splat32(x.add(4 * u)),
                            splat32(x.add(4 * (stride + u))),
                            splat32(x.add(4 * (2 * stride + u))),
                            splat32(x.add(4 * (3 * stride + u))),
                        ],
                        load(w.add(32 * u)),
                        load(w.add(32 * u + 16)),
                    )
                };
                for (r, s) in x.into_iter().enumerate() {
                    acc[2 * r] = mac(acc[2 * r], s, w0);
                    acc[2 * r + 1] = mac(acc[2 * r + 1], s, w1);
                }
                u += 1;
            }
            for (i, v) in acc.into_iter().enumerate() {
                // SAFETY: the caller's: ROWS rows of COLS values.
                unsafe { v128_store(out.add((i / 2) * out_stride + (i % 2) * 4) as *mut v128, v) };
            }
        }
    };
}

tile_kernel!(
    /// One 4x8 tile of `x W^T` in f32 (a unit is one input).
    ///
    /// # Safety
    /// `x` must hold ROWS readable rows of `units` f32 values `stride` apart,
    /// `w` `units * COLS` packed f32 weights, and `out` ROWS writable rows of
    /// COLS values `out_stride` apart.
    f32_tile,
    f32,
    "simd128",
    |acc, s, w| f32x4_add(acc, f32x4_mul(s, w))
);

tile_kernel!(
    /// One 4x8 tile of `x W^T` in int8 (a unit is 4 activation codes,
    /// 0..=127, and 4 weight codes per output), exact.
    ///
    /// # Safety
    /// `x` must hold ROWS readable rows of `4 * units` bytes, `4 * stride`
    /// apart, `w` `32 * units` packed weight bytes, and `out` ROWS writable
    /// rows of COLS values `out_stride` apart.
    i8_tile,
    i32,
    "simd128,relaxed-simd",
    |acc, s, w| i32x4_relaxed_dot_i8x16_i7x16_add(w, s, acc)
);

tile_kernel!(
    /// As [`i8_tile`], with two units summed in 16 bits: each one's
    /// `i16x8.relaxed_dot` (x86: one `pmaddubsw`) is exact (pairs of
    /// products within ±32512), the two are added with saturation, and one
    /// widening pairwise add (x86: one `pmaddwd`) takes them to the i32
    /// sums: three multiplier instructions for two units where [`i8_tile`]
    /// takes four. Four products beyond ±32767 saturate; the add is
    /// WebAssembly's `add_sat`, so the result is still the same on every
    /// platform.
    ///
    /// # Safety
    /// As [`i8_tile`].
    i8_pair_tile,
    i32,
    "simd128,relaxed-simd",
    |acc, s, w| i32x4_relaxed_dot_i8x16_i7x16_add(w, s, acc),
    |acc, s0, w0, s1, w1| i32x4_add(
        acc,
        i32x4_extadd_pairwise_i16x8(i16x8_add_sat(
            i16x8_relaxed_dot_i8x16_i7x16(w0, s0),
            i16x8_relaxed_dot_i8x16_i7x16(w1, s1),
        )),
    )
);

tile_kernel!(
    /// One 4x8 tile of a product in 16-bit fixed point (a unit is two i16
    /// inputs): `i32x4.dot_i16x8_s` (x86: one `pmaddwd`) multiplies and adds
    /// pairs exactly; the caller bounds the codes so that no sum passes
    /// `i32::MAX` (see [`attend_fixed`]). Twice the multiply-adds of the f32
    /// tile an instruction.
    ///
    /// # Safety
    /// `x` must hold ROWS readable rows of `2 * units` i16 codes, `2 *
    /// stride` apart, `w` `32 * units` packed bytes, and `out` ROWS writable
    /// rows of COLS values `out_stride` apart.
    i16_tile,
    i32,
    "simd128",
    |acc, s, w| i32x4_add(acc, i32x4_dot_i16x8(s, w)),
    |acc, s0, w0, s1, w1| i32x4_add(
        acc,
        i32x4_add(i32x4_dot_i16x8(s0, w0), i32x4_dot_i16x8(s1, w1))
    )
);

/// Activations quantized per row (per token, never per batch: a text's codes
/// do not depend on its neighbours): `x ~ step * code + low`, codes 0..=127.
/// With `pull`, each row's largest `|x|` is left out of its range (see
/// [`Pull`]): `channel` names it and `delta` is what its code leaves out.
#[derive(Default)]
pub struct Quantized {
    pub pull: bool,
    pub codes: Vec<u8>,
    pub step: Vec<f32>,
    pub low: Vec<f32>,
    pub channel: Vec<u32>,
    pub delta: Vec<f32>,
    pub stride: usize,
    /// One row, smoothed or with its pulled channel set aside; reused.
    row: Vec<f32>,
}

/// Per-input smoothing scales for a linear layer fed by a LayerNorm with
/// `gamma` and `beta` (SmoothQuant's balance, with the LayerNorm's
/// parameters standing in for calibration): an input channel the norm makes
/// large is divided down before per-token quantization, and its weights are
/// multiplied up to match, so one loud channel no longer coarsens the
/// quantization step of every other channel of the token.
pub fn smoothing(
    weight: &[f32],
    outputs: usize,
    inputs: usize,
    gamma: &[f32],
    beta: &[f32],
) -> Vec<f32> {
    (0..inputs)
        .map(|k| {
            let act = gamma[k].abs() + beta[k].abs();
            let w = (0..outputs).fold(0f32, |m, o| m.max(weight[o * inputs + k].abs()));
            if act <= TINY || w <= TINY {
                1.0
            } else {
                (act / w).sqrt()
            }
        })
        .collect()
}

/// Quantizes `rows` rows of `x` (each `width` values, divided by `smooth`'s
/// per-input factors first if given) into `q` (pulling each row's outlier
/// if `q.pull`), with `stride` codes a row (the padding codes are 0).
fn quantize(
    x: &[f32],
    rows: usize,
    width: usize,
    stride: usize,
    smooth: Option<&[f32]>,
    q: &mut Quantized,
) {
    q.stride = stride;
    q.codes.clear();
    q.codes.resize(rows * stride, 0);
    for v in [&mut q.step, &mut q.low, &mut q.delta] {
        v.clear();
    }
    q.channel.clear();
    // A row is copied only to be changed: smoothed, or its outlier set aside.
    let copy = smooth.is_some() || q.pull;
    for r in 0..rows {
        let source = &x[r * width..][..width];
        if copy {
            q.row.clear();
            q.row.resize(width, 0.0);
            match smooth {
                Some(f) => multiply(source, f, &mut q.row),
                None => q.row.copy_from_slice(source),
            }
        }
        // The outlier: the first channel of the largest |x|. It is set to 0
        // (or the nearest end of the others' range) for the codes.
        let pulled = q.pull.then(|| {
            let big = largest_abs(&q.row);
            let at = q.row.iter().position(|v| v.abs() == big).unwrap_or(0);
            let value = q.row[at];
            q.row[at] = 0.0;
            (at, value)
        });
        let row: &[f32] = if copy { &q.row } else { source };
        let (low, high) = min_max(row);
        let step = (high - low).max(TINY) / ACT_MAX;
        let codes = &mut q.codes[r * stride..][..width];
        encode_row(row, low, 1.0 / step, ACT_MAX, codes);
        if let Some((at, value)) = pulled {
            q.channel.push(at as u32);
            q.delta.push(value - (low + step * f32::from(codes[at])));
        }
        q.step.push(step);
        q.low.push(low);
    }
}

/// `dst[i] = x[i] * f[i]` (all three as long as `dst`).
#[target_feature(enable = "simd128")]
fn multiply(x: &[f32], f: &[f32], dst: &mut [f32]) {
    let (x, f) = (&x[..dst.len()], &f[..dst.len()]);
    let mut d = dst.chunks_exact_mut(4);
    let (mut a, mut b) = (x.chunks_exact(4), f.chunks_exact(4));
    for ((d, a), b) in (&mut d).zip(&mut a).zip(&mut b) {
        // SAFETY: 4 values.
        unsafe { v128_store(d.as_mut_ptr() as *mut v128, f32x4_mul(load4(a), load4(b))) };
    }
    let rest = d
        .into_remainder()
        .iter_mut()
        .zip(a.remainder())
        .zip(b.remainder());
    for ((d, a), b) in rest {
        *d = a * b;
    }
}

/// The four lanes of an f32x4.
#[target_feature(enable = "simd128")]
fn lanes(v: v128) -> [f32; 4] {
    [
        f32x4_extract_lane::<0>(v),
        f32x4_extract_lane::<1>(v),
        f32x4_extract_lane::<2>(v),
        f32x4_extract_lane::<3>(v),
    ]
}

/// The smallest and largest value of `row`.
#[target_feature(enable = "simd128")]
fn min_max(row: &[f32]) -> (f32, f32) {
    let mut lo = f32x4_splat(f32::INFINITY);
    let mut hi = f32x4_splat(f32::NEG_INFINITY);
    let mut chunks = row.chunks_exact(4);
    for c in &mut chunks {
        // SAFETY: the chunk holds 4 values.
        let v = unsafe { v128_load(c.as_ptr() as *const v128) };
        lo = f32x4_pmin(lo, v);
        hi = f32x4_pmax(hi, v);
    }
    let (mut l, mut h) = (f32::INFINITY, f32::NEG_INFINITY);
    for &v in lanes(lo).iter().chain(chunks.remainder()) {
        l = if v < l { v } else { l };
    }
    for &v in lanes(hi).iter().chain(chunks.remainder()) {
        h = if v > h { v } else { h };
    }
    (l, h)
}

/// The largest value of `row` (softmax needs only this side of
/// [`min_max`]). Sixteen values an iteration, as in [`softmax_unscaled`].
#[target_feature(enable = "simd128")]
fn largest(row: &[f32]) -> f32 {
    let mut hi = [f32x4_splat(f32::NEG_INFINITY); 2];
    let mut blocks = row.chunks_exact(16);
    for b in &mut blocks {
        let v = [load4(b), load4(&b[4..]), load4(&b[8..]), load4(&b[12..])];
        hi[0] = f32x4_pmax(f32x4_pmax(hi[0], v[0]), v[1]);
        hi[1] = f32x4_pmax(f32x4_pmax(hi[1], v[2]), v[3]);
    }
    let mut chunks = blocks.remainder().chunks_exact(4);
    for c in &mut chunks {
        hi[0] = f32x4_pmax(hi[0], load4(c));
    }
    let mut h = f32::NEG_INFINITY;
    for &v in lanes(f32x4_pmax(hi[0], hi[1]))
        .iter()
        .chain(chunks.remainder())
    {
        h = if v > h { v } else { h };
    }
    h
}

/// The codes of one row: `round((v - low) * inverse)`, within 0..=`top`.
#[target_feature(enable = "simd128")]
fn encode_row(row: &[f32], low: f32, inverse: f32, top: f32, codes: &mut [u8]) {
    let (l, inv, half, t) = (
        f32x4_splat(low),
        f32x4_splat(inverse),
        f32x4_splat(0.5),
        f32x4_splat(top),
    );
    // Adding one half and truncating rounds to nearest for v >= low (every
    // value of the row: its low is its minimum). For those values truncation
    // is the floor, and a floored value (within 0..=top) converts exactly
    // through [`round4`]: three instructions on x86, where Cranelift's
    // saturating conversion takes about ten.
    let code = |v: v128| {
        round4(f32x4_floor(f32x4_pmin(
            f32x4_add(f32x4_mul(f32x4_sub(v, l), inv), half),
            t,
        )))
    };
    let n = row.len() / 16 * 16;
    for i in (0..n).step_by(16) {
        // SAFETY: 16 values at i < n <= row.len(), 16 bytes at i in codes.
        unsafe {
            let p = row.as_ptr().add(i);
            let c = u8x16_narrow_i16x8(
                i16x8_narrow_i32x4(
                    code(v128_load(p as *const v128)),
                    code(v128_load(p.add(4) as *const v128)),
                ),
                i16x8_narrow_i32x4(
                    code(v128_load(p.add(8) as *const v128)),
                    code(v128_load(p.add(12) as *const v128)),
                ),
            );
            v128_store(codes.as_mut_ptr().add(i) as *mut v128, c);
        }
    }
    for i in n..row.len() {
        codes[i] = ((row[i] - low) * inverse + 0.5).clamp(0.0, top) as u8;
    }
}

/// LayerNorm of each row of `x` in place (`width` values a row).
/// Four lanes at a time where `width` allows (the engine checks that the
/// hidden size is a multiple of 4), in a fixed order per row.
#[target_feature(enable = "simd128")]
pub fn layer_norm(x: &mut [f32], width: usize, gamma: &[f32], beta: &[f32], eps: f32) {
    let lanes = |v: v128| {
        f32x4_extract_lane::<0>(v)
            + f32x4_extract_lane::<1>(v)
            + f32x4_extract_lane::<2>(v)
            + f32x4_extract_lane::<3>(v)
    };
    let load = |s: &[f32]| {
        let s = &s[..4];
        // SAFETY: 4 values.
        unsafe { v128_load(s.as_ptr() as *const v128) }
    };
    if !width.is_multiple_of(4) {
        for row in x.chunks_exact_mut(width) {
            let mean = row.iter().sum::<f32>() / width as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / width as f32;
            let inv = 1.0 / (var + eps).sqrt();
            for ((v, g), b) in row.iter_mut().zip(gamma).zip(beta) {
                *v = (*v - mean) * inv * g + b;
            }
        }
        return;
    }
    for row in x.chunks_exact_mut(width) {
        let mut sum = f32x4_splat(0.0);
        for c in row.chunks_exact(4) {
            sum = f32x4_add(sum, load(c));
        }
        let mean = lanes(sum) / width as f32;
        let m = f32x4_splat(mean);
        let mut var = f32x4_splat(0.0);
        for c in row.chunks_exact(4) {
            let d = f32x4_sub(load(c), m);
            var = f32x4_add(var, f32x4_mul(d, d));
        }
        let inv = f32x4_splat(1.0 / (lanes(var) / width as f32 + eps).sqrt());
        for ((c, g), b) in row
            .chunks_exact_mut(4)
            .zip(gamma.chunks_exact(4))
            .zip(beta.chunks_exact(4))
        {
            let v = f32x4_add(
                f32x4_mul(f32x4_mul(f32x4_sub(load(c), m), inv), load(g)),
                load(b),
            );
            // SAFETY: 4 values.
            unsafe { v128_store(c.as_mut_ptr() as *mut v128, v) };
        }
    }
}

/// GELU, exact form: `x/2 (1 + erf(x / sqrt 2))`, in place.
pub fn gelu(x: &mut [f32]) {
    let mut chunks = x.chunks_exact_mut(4);
    for c in &mut chunks {
        // SAFETY: the chunk holds 4 values.
        unsafe {
            let p = c.as_mut_ptr() as *mut v128;
            v128_store(p, gelu4(v128_load(p as *const v128)));
        }
    }
    for v in chunks.into_remainder() {
        *v = f32x4_extract_lane::<0>(gelu4(f32x4_splat(*v)));
    }
}

#[target_feature(enable = "simd128")]
fn gelu4(x: v128) -> v128 {
    let half = f32x4_splat(0.5);
    let z = f32x4_mul(x, f32x4_splat(core::f32::consts::FRAC_1_SQRT_2));
    f32x4_mul(f32x4_mul(half, x), f32x4_add(f32x4_splat(1.0), erf4(z)))
}

/// erf as a rational function, odd over even, of x clamped to ±4 (erf is
/// ±1 in f32 beyond): absolute error below 5e-7 against `math.erf` over
/// -6..6, checked in float32 numpy. The coefficients are the minimax fit
/// Eigen and XNNPACK use for f32. No `exp` and one division: about 25
/// operations for four lanes, where Abramowitz and Stegun 7.1.26 with an
/// `exp` took about 40.
#[target_feature(enable = "simd128")]
fn erf4(x: v128) -> v128 {
    let x = f32x4_pmax(f32x4_pmin(x, f32x4_splat(4.0)), f32x4_splat(-4.0));
    let x2 = f32x4_mul(x, x);
    let horner = |coefficients: &[f32]| {
        let mut p = f32x4_splat(coefficients[0]);
        for &c in &coefficients[1..] {
            p = f32x4_add(f32x4_mul(p, x2), f32x4_splat(c));
        }
        p
    };
    let odd = horner(&[
        -2.726_142_3e-10,
        2.770_681_4e-8,
        -2.101_024e-6,
        -5.692_506_4e-5,
        -7.349_906_3e-4,
        -2.954_600_1e-3,
        -1.609_603_3e-2,
    ]);
    let even = horner(&[
        -1.456_607_2e-5,
        -2.133_740_6e-4,
        -1.682_827e-3,
        -7.373_329_3e-3,
        -1.426_474e-2,
    ]);
    f32x4_div(f32x4_mul(x, odd), even)
}

/// e^x for each lane of `x <= 0` (softmax's `x - max`): relative error
/// below 2e-7 against f64 `exp` over -87..=0 (checked in float32 numpy);
/// below -87 it is e^-87. Above 0 it is wrong: the caller subtracts the max.
///
/// About 22 operations for four lanes: the rounding of `x log2 e` to an
/// integer `n` is one addition of 1.5 * 2^23 (whose float then holds `n` in
/// its low bits, so 2^n is an integer add and shift), where `nearest` and a
/// saturating conversion took about 10; and a fitted polynomial of degree 5
/// is as exact as Taylor's of degree 6.
#[target_feature(enable = "simd128")]
fn exp4(x: v128) -> v128 {
    // Adding ROUND rounds to an integer, held in the low bits (see there).
    // pmax: one instruction on x86, where max (with its NaN rules) takes
    // several; the inputs are finite.
    let x = f32x4_pmax(x, f32x4_splat(-87.0));
    let t = f32x4_add(
        f32x4_mul(x, f32x4_splat(core::f32::consts::LOG2_E)),
        f32x4_splat(ROUND),
    );
    let n = f32x4_sub(t, f32x4_splat(ROUND));
    // x - n ln 2, in two parts for precision (Cody and Waite).
    let r = f32x4_sub(x, f32x4_mul(n, f32x4_splat(0.693_359_4)));
    let r = f32x4_add(r, f32x4_mul(n, f32x4_splat(2.121_944_4e-4)));
    // e^r on |r| <= ln2/2 as 1 + r q(r), q fitted for the least largest
    // relative error (1.8e-7 in f32 over -87..=0; Taylor to r^5: 3.3e-6).
    let mut q = f32x4_splat(8.290_315e-3);
    for c in [4.189_793e-2, 0.166_676_36, 0.499_991_5, 0.999_999_7f32] {
        q = f32x4_add(f32x4_mul(q, r), f32x4_splat(c));
    }
    let p = f32x4_add(f32x4_mul(q, r), f32x4_splat(1.0));
    // 2^n: n + 127 in the exponent field. t's bits are 0x4B40_0000 + n,
    // whose constant part the shift by 23 pushes out of the word.
    let scale = i32x4_shl(i32x4_add(t, i32x4_splat(127)), 23);
    f32x4_mul(p, scale)
}

/// Softmax of `x` without its last division: `x` becomes `e^(x - max)` and
/// the sum is returned (the caller divides the smaller product by it).
///
/// Sixteen values an iteration: [`exp4`]'s constants are loop-invariant, so
/// Cranelift hoists them out of the loop, and the epoch check at the loop
/// header (a call on its slow path) puts them in stack slots, reloaded and
/// stored again on every iteration. Four vectors an iteration share that.
#[target_feature(enable = "simd128")]
fn softmax_unscaled(x: &mut [f32]) -> f32 {
    let max = largest(x);
    let m = f32x4_splat(max);
    let mut acc = [f32x4_splat(0.0); 2];
    let mut blocks = x.chunks_exact_mut(16);
    for b in &mut blocks {
        let e = [
            exp4(f32x4_sub(load4(b), m)),
            exp4(f32x4_sub(load4(&b[4..]), m)),
            exp4(f32x4_sub(load4(&b[8..]), m)),
            exp4(f32x4_sub(load4(&b[12..]), m)),
        ];
        for (d, e) in b.chunks_exact_mut(4).zip(e) {
            // SAFETY: 4 values.
            unsafe { v128_store(d.as_mut_ptr() as *mut v128, e) };
        }
        acc[0] = f32x4_add(f32x4_add(acc[0], e[0]), e[1]);
        acc[1] = f32x4_add(f32x4_add(acc[1], e[2]), e[3]);
    }
    let mut chunks = blocks.into_remainder().chunks_exact_mut(4);
    for c in &mut chunks {
        let e = exp4(f32x4_sub(load4(c), m));
        // SAFETY: 4 values.
        unsafe { v128_store(c.as_mut_ptr() as *mut v128, e) };
        acc[0] = f32x4_add(acc[0], e);
    }
    let mut sum = 0f32;
    for v in chunks.into_remainder() {
        *v = f32x4_extract_lane::<0>(exp4(f32x4_splat(*v - max)));
        sum += *v;
    }
    sum += lanes(f32x4_add(acc[0], acc[1])).iter().sum::<f32>();
    sum
}

/// `dst[i] = src[i] * factor` (`dst` as long as `src`).
#[target_feature(enable = "simd128")]
fn scaled(dst: &mut [f32], src: &[f32], factor: f32) {
    let f = f32x4_splat(factor);
    let mut d = dst.chunks_exact_mut(4);
    let mut s = src.chunks_exact(4);
    for (d, s) in (&mut d).zip(&mut s) {
        // SAFETY: 4 values each.
        unsafe { v128_store(d.as_mut_ptr() as *mut v128, f32x4_mul(load4(s), f)) };
    }
    for (d, s) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *d = s * factor;
    }
}

/// Buffers of [`attend`] and [`attend_fixed`], reused across heads and
/// calls.
#[derive(Default)]
pub struct Attention {
    q: Vec<f32>,
    keys: Vec<f32>,
    values: Vec<f32>,
    scores: Vec<f32>,
    sums: Vec<f32>,
    context: Vec<f32>,
    fixed: Fixed,
}

/// [`attend_fixed`]'s buffers: codes and packed codes (i16), sums (i32).
#[derive(Default)]
struct Fixed {
    q: Vec<i16>,
    q_scale: Vec<f32>,
    keys: Vec<i16>,
    values: Vec<i16>,
    scores: Vec<i32>,
    p: Vec<i16>,
    p_sum: Vec<i32>,
    context: Vec<i32>,
}

/// One text's self-attention for one head, all in f32 (the fp32
/// precision's; int8 uses [`attend_fixed`]): for each query row
/// `i < n`, `out[i] = softmax(scale * q_i . k_j) . v_j`, as two products
/// through the f32 tile: the keys packed as the "weights" of the scores, the
/// values as those of the context (packing is `n x head` copies against
/// `n x n x head` multiply-adds).
///
/// Rows are `stride` values apart in `qkv`, starting at the text's first
/// row; `q`, `k` and `v` are the head's offsets in a row, `head` its width.
/// `out` rows are `out_stride` apart, the head at `o`.
///
/// # Panics
/// If the offsets or row counts fall outside `qkv` or `out` (a bug).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "simd128")]
pub fn attend(
    qkv: &[f32],
    stride: usize,
    (q, k, v): (usize, usize, usize),
    n: usize,
    head: usize,
    scale: f32,
    a: &mut Attention,
    out: &mut [f32],
    out_stride: usize,
    o: usize,
) {
    if n == 0 {
        return;
    }
    let row = |i: usize, at: usize| &qkv[i * stride + at..][..head];
    let (rows, keys, dims) = (round_up(n, ROWS), round_up(n, COLS), round_up(head, COLS));
    // Queries, contiguous and padded to whole tiles.
    // The scale is applied here, to n x head values rather than n x n.
    a.q.clear();
    a.q.resize(rows * head, 0.0);
    for i in 0..n {
        scaled(&mut a.q[i * head..][..head], row(i, q), scale);
    }
    // The keys as the weights of the scores (an output per key), and the
    // values as those of the context (an output per dimension).
    pack_f32(&mut a.keys, n, head, |j| row(j, k));
    pack_columns_f32(&mut a.values, n, head, |j| row(j, v));
    a.scores.clear();
    a.scores.resize(rows * keys, 0.0);
    a.context.clear();
    a.context.resize(rows * dims, 0.0);
    lap(Stage::AttentionPack);
    f32_product(&a.q, head, head, rows, &a.keys, keys / COLS, &mut a.scores);
    lap(Stage::Scores);
    a.sums.clear();
    for i in 0..n {
        a.sums
            .push(softmax_unscaled(&mut a.scores[i * keys..][..n]));
    }
    lap(Stage::Softmax);
    f32_product(
        &a.scores,
        keys,
        n,
        rows,
        &a.values,
        dims / COLS,
        &mut a.context,
    );
    for i in 0..n {
        scaled(
            &mut out[i * out_stride + o..][..head],
            &a.context[i * dims..][..head],
            1.0 / a.sums[i],
        );
    }
    lap(Stage::Context);
}

/// The largest code of an attention probability in [`attend_fixed`]: 2^11.
/// The softmax's numerators are `e^(x - max)`, so the largest is exactly 1 and
/// needs no scale of its own; a power of two, so [`p_code`] folds it into the
/// exponent.
const P_BITS: i32 = 11;
const P_MAX: f32 = (1 << P_BITS) as f32;

/// The largest code of a query, key or value in [`attend_fixed`]: 13 bits
/// (less where the sums would pass `i32::MAX`, see there).
const QKV_MAX: f32 = 4095.0;

/// 1.5 * 2^23: adding it to a float below 2^22 in magnitude rounds it to
/// an integer (to nearest even), which the sum's bits then hold in their
/// low bits, as `ROUND_BITS + n`. Two operations, where a saturating
/// conversion takes Cranelift about 7.
const ROUND: f32 = 12_582_912.0;
const ROUND_BITS: i32 = 0x4B40_0000;

/// `v` (within `±2^15`) rounded to the nearest integer (ties to even).
#[inline(always)]
fn code16(v: f32) -> i16 {
    ((v + ROUND).to_bits() as i32 - ROUND_BITS) as i16
}

/// The largest `|x|` of `row`.
#[target_feature(enable = "simd128")]
fn largest_abs(row: &[f32]) -> f32 {
    let mut top = f32x4_splat(0.0);
    let mut chunks = row.chunks_exact(4);
    for c in &mut chunks {
        top = f32x4_pmax(top, f32x4_abs(load4(c)));
    }
    // Comparisons, not `f32::max`: in WebAssembly that is a call to `fmaxf`.
    let mut m = 0f32;
    for x in lanes(top).iter().chain(chunks.remainder()) {
        m = if x.abs() > m { x.abs() } else { m };
    }
    m
}

/// `row`'s values times `inverse`, rounded to integer codes, into `codes`
/// (as long as `row`; `|x * inverse|` must stay within `2^15`).
#[target_feature(enable = "simd128")]
fn code_row(row: &[f32], inverse: f32, codes: &mut [i16]) {
    let factor = f32x4_splat(inverse);
    let mut eights = row.chunks_exact(8);
    let mut out = codes.chunks_exact_mut(8);
    for (x, c) in (&mut eights).zip(&mut out) {
        let v = code8(x, factor);
        // SAFETY: 8 codes.
        unsafe { v128_store(c.as_mut_ptr() as *mut v128, v) };
    }
    for (c, x) in out.into_remainder().iter_mut().zip(eights.remainder()) {
        *c = code16(x * inverse);
    }
}

/// One text's self-attention for one head, as [`attend`] computes it but with
/// both products in 16-bit fixed point through [`i16_tile`]: queries coded
/// per row, keys and values per head (one scale each), and the softmax's
/// numerators `e^(x - max)` in 0..=1 as 11-bit codes, whose sum (an exact
/// integer) normalizes them. The scores, the softmax and the last scaling
/// stay f32. The int8 precision uses it: its products take half the
/// instructions of [`f32_tile`]'s, and the codes are finer (11 to 13 bits)
/// than the int8 layers' 7-bit activations around them.
///
/// No sum can overflow: a score adds `head` products of codes within
/// `±q_max`, with `head * q_max^2 < 2^31`, and a context value `n` products
/// of codes within `P_MAX` and `±v_max`, with `n * P_MAX * v_max < 2^31`.
/// Both bounds depend only on the head width and the text's length, so a
/// text's codes never depend on its batch neighbours.
///
/// Keys and values are coded straight into the tiles' packed layout, and
/// the softmax runs over whole vectors of four (the lanes past `n` masked to
/// code 0), so no step of the head's work is a scalar loop over its tokens.
///
/// # Panics
/// As [`attend`].
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "simd128")]
pub fn attend_fixed(
    qkv: &[f32],
    stride: usize,
    (q, k, v): (usize, usize, usize),
    n: usize,
    head: usize,
    scale: f32,
    a: &mut Attention,
    out: &mut [f32],
    out_stride: usize,
    o: usize,
) {
    if n == 0 {
        return;
    }
    let f = &mut a.fixed;
    let rows_of = |at: usize| Rows {
        qkv,
        stride,
        at,
        n,
        head,
    };
    // Inputs come in pairs (a unit of the tile): dims for the scores, tokens
    // for the context. The context's rows of codes are whole vectors of four
    // (`tokens`); the bound on its sums counts the pairs the products add
    // (the extra pair of a row is zeros).
    let (dims, tokens) = (round_up(head, 2), round_up(n, 4));
    let limit = i32::MAX as f32;
    let q_max = QKV_MAX.min((limit / dims as f32).sqrt().floor());
    let v_max = QKV_MAX.min((limit / (round_up(n, 2) as f32 * P_MAX)).floor());
    code_queries(f, &rows_of(q), dims, q_max, scale);
    let (big_k, big_v) = rows_of(k).largest_abs_with(&rows_of(v));
    pack_keys(&mut f.keys, &rows_of(k), dims, q_max / big_k);
    pack_values(&mut f.values, &rows_of(v), tokens, v_max / big_v);
    lap(Stage::AttentionPack);
    fixed_product(&f.q, dims / 2, n, &f.keys, round_up(n, COLS), &mut f.scores);
    lap(Stage::Scores);
    // The softmax's numerators as codes; the padding rows' stay 0.
    let keys = round_up(n, COLS);
    f.p.clear();
    f.p.resize(round_up(n, ROWS) * tokens, 0);
    f.p_sum.clear();
    for i in 0..n {
        let c = f.q_scale[i] * (big_k / q_max);
        let sum = softmax_codes(&f.scores[i * keys..], n, c, &mut f.p[i * tokens..]);
        f.p_sum.push(sum.max(1));
    }
    lap(Stage::Softmax);
    let width = round_up(head, COLS);
    fixed_product(&f.p, tokens / 2, n, &f.values, width, &mut f.context);
    let v_scale = big_v / v_max;
    for i in 0..n {
        let factor = v_scale / f.p_sum[i] as f32;
        let dst = &mut out[i * out_stride + o..][..head];
        for (d, c) in dst.iter_mut().zip(&f.context[i * width..][..head]) {
            *d = *c as f32 * factor;
        }
    }
    lap(Stage::Context);
}

/// One head's slice of a text's rows in the query/key/value matrix: `n`
/// rows of `head` values at offset `at`, `stride` apart.
struct Rows<'a> {
    qkv: &'a [f32],
    stride: usize,
    at: usize,
    n: usize,
    head: usize,
}

impl Rows<'_> {
    /// Row `j`.
    #[inline(always)]
    fn row(&self, j: usize) -> &[f32] {
        &self.qkv[j * self.stride + self.at..][..self.head]
    }

    /// The largest `|x|` of these rows and of `other`'s (as many rows, as
    /// wide), each at least [`TINY`]: one pass over both, the lanes reduced
    /// once at the end.
    #[target_feature(enable = "simd128")]
    fn largest_abs_with(&self, other: &Rows) -> (f32, f32) {
        let mut top = [f32x4_splat(TINY); 2];
        let mut rest = [TINY; 2];
        for j in 0..self.n {
            for (side, rows) in [self, other].into_iter().enumerate() {
                let mut chunks = rows.row(j).chunks_exact(4);
                for c in &mut chunks {
                    top[side] = f32x4_pmax(top[side], f32x4_abs(load4(c)));
                }
                for x in chunks.remainder() {
                    rest[side] = if x.abs() > rest[side] {
                        x.abs()
                    } else {
                        rest[side]
                    };
                }
            }
        }
        // Comparisons, not `f32::max`: in WebAssembly that is a call to `fmaxf`.
        let reduce = |side: usize| {
            lanes(top[side])
                .into_iter()
                .fold(rest[side], |m, x| if x > m { x } else { m })
        };
        (reduce(0), reduce(1))
    }
}

/// Codes the queries into `f.q` (`round_up(n, ROWS)` rows of `dims` codes,
/// the padding zero), one scale a row with the attention's `scale` folded
/// into `f.q_scale`.
#[target_feature(enable = "simd128")]
fn code_queries(f: &mut Fixed, rows: &Rows, dims: usize, q_max: f32, scale: f32) {
    f.q.clear();
    f.q.resize(round_up(rows.n, ROWS) * dims, 0);
    f.q_scale.clear();
    for i in 0..rows.n {
        let r = rows.row(i);
        let big = largest_abs(r).max(TINY);
        code_row(r, q_max / big, &mut f.q[i * dims..][..rows.head]);
        f.q_scale.push(big * scale / q_max);
    }
}

/// Codes the keys (times `factor`) into `keys` as the scores' weights: per
/// block of [`COLS`] keys and unit of 2 dims, each key's 2 codes side by side
/// (one u32), so a key's 8 codes from [`code_row`]'s vector are 4 lane
/// stores, [`COLS`] u32 apart.
#[target_feature(enable = "simd128")]
fn pack_keys(keys: &mut Vec<i16>, rows: &Rows, dims: usize, factor: f32) {
    let (units, head) = (dims / 2, rows.head);
    keys.clear();
    keys.resize(round_up(rows.n, COLS) * dims, 0);
    let whole = head / 8 * 8;
    let fx = f32x4_splat(factor);
    for j in 0..rows.n {
        let (block, lane) = (j / COLS, j % COLS);
        let x = rows.row(j);
        // Unit u of this key: i16 offset `at(u)`.
        let at = |u: usize| ((block * units + u) * COLS + lane) * 2;
        for d in (0..whole).step_by(8) {
            let v = code8(&x[d..], fx);
            let u = d / 2;
            let dst = &mut keys[at(u)..at(u + 3) + 2];
            let p = dst.as_mut_ptr();
            // SAFETY: the four units' codes are at offsets 0, 16, 32 and 48
            // of `dst` (COLS u32 apart), each 2 i16 long, within it.
            unsafe {
                v128_store32_lane::<0>(v, p as *mut u32);
                v128_store32_lane::<1>(v, p.add(2 * COLS) as *mut u32);
                v128_store32_lane::<2>(v, p.add(4 * COLS) as *mut u32);
                v128_store32_lane::<3>(v, p.add(6 * COLS) as *mut u32);
            }
        }
        for d in whole..head {
            keys[at(d / 2) + d % 2] = code16(x[d] * factor);
        }
    }
}

/// Codes the values (times `factor`) into `values` as the context's
/// weights: per block of [`COLS`] dims and unit of 2 tokens, each dim's 2
/// codes side by side: rows `2u` and `2u + 1` coded and interleaved 8 dims
/// at a time. `tokens` (even, at least `n`) rows, those past `n` zero.
#[target_feature(enable = "simd128")]
fn pack_values(values: &mut Vec<i16>, rows: &Rows, tokens: usize, factor: f32) {
    let (head, n) = (rows.head, rows.n);
    let (blocks, t_units) = (head.div_ceil(COLS), tokens / 2);
    values.clear();
    values.resize(blocks * COLS * tokens, 0);
    let fx = f32x4_splat(factor);
    for u in 0..n.div_ceil(2) {
        let a = rows.row(2 * u);
        let b = (2 * u + 1 < n).then(|| rows.row(2 * u + 1));
        for block in 0..blocks {
            let at = (block * t_units + u) * COLS * 2;
            let dst = &mut values[at..at + 2 * COLS];
            let first = block * COLS;
            if head - first >= COLS {
                let x = code8(&a[first..], fx);
                let y = match b {
                    Some(b) => code8(&b[first..], fx),
                    None => i16x8_splat(0),
                };
                // SAFETY: 16 codes.
                unsafe {
                    v128_store(
                        dst.as_mut_ptr() as *mut v128,
                        i16x8_shuffle::<0, 8, 1, 9, 2, 10, 3, 11>(x, y),
                    );
                    v128_store(
                        dst[8..].as_mut_ptr() as *mut v128,
                        i16x8_shuffle::<4, 12, 5, 13, 6, 14, 7, 15>(x, y),
                    );
                }
            } else {
                for lane in 0..head - first {
                    dst[2 * lane] = code16(a[first + lane] * factor);
                    dst[2 * lane + 1] = b.map_or(0, |b| code16(b[first + lane] * factor));
                }
            }
        }
    }
}

/// `out[r][c] = x_r . w_c` in 16-bit fixed point through [`i16_tile`]:
/// `round_up(n, ROWS)` rows of `units` pairs of codes in `x`, against
/// `width / COLS` packed blocks of `w`; `out` rows are `width` sums wide.
#[target_feature(enable = "simd128")]
fn fixed_product(x: &[i16], units: usize, n: usize, w: &[i16], width: usize, out: &mut Vec<i32>) {
    let rows = round_up(n, ROWS);
    assert!(x.len() >= rows * units * 2 && w.len() >= width * units * 2);
    out.clear();
    out.resize(rows * width, 0);
    for r in (0..rows).step_by(ROWS) {
        for block in 0..width / COLS {
            // SAFETY: ROWS rows of `units` pairs at row r, the block's
            // `units * 32` packed bytes, ROWS rows of `width` sums at row r
            // (asserted and sized above).
            unsafe {
                i16_tile(
                    x[r * units * 2..].as_ptr() as *const u8,
                    units,
                    units,
                    w[block * units * COLS * 2..].as_ptr() as *const u8,
                    out[r * width + block * COLS..].as_mut_ptr(),
                    width,
                )
            };
        }
    }
}

/// The codes of `e^((s - max) c)` for integer scores `s <= max`:
/// `round(P_MAX * 2^y)` with `y = (s - max) * k`, `k = c log2 e`. 2^y is
/// `2^n * 2^f` for the nearest integer `n` and `f` in -0.5..=0.5, with 2^f
/// a fitted degree-4 polynomial (relative error below 3e-6 in f32, checked
/// in numpy: a thousandth of a code) and P_MAX folded into `n`. Below
/// `y = -24` the code is 0, so `y` is clamped there. About 19 operations
/// for four lanes, where [`exp4`] and the scaling took 27: the codes need
/// 11 bits, not `exp4`'s 23.
/// (A function, not a closure: a closure would not get the SIMD.)
#[inline(always)]
fn p_code(s: v128, max: v128, k: v128) -> v128 {
    let y = f32x4_pmax(
        f32x4_mul(f32x4_convert_i32x4(i32x4_sub(s, max)), k),
        f32x4_splat(-24.0),
    );
    let t = f32x4_add(y, f32x4_splat(ROUND));
    let f = f32x4_sub(y, f32x4_sub(t, f32x4_splat(ROUND)));
    let mut p = f32x4_splat(9.582_853e-3);
    for c in [5.590_642_6e-2, 0.240_241, 0.693_124_2] {
        p = f32x4_add(f32x4_mul(p, f), f32x4_splat(c));
    }
    let p = f32x4_add(f32x4_mul(p, f), f32x4_splat(1.0));
    // 2^(n + P_BITS): t's bits are ROUND_BITS + n, whose constant part the
    // shift by 23 pushes out of the word.
    let scale = i32x4_shl(i32x4_add(t, i32x4_splat(127 + P_BITS)), 23);
    round4(f32x4_mul(p, scale))
}

/// Each lane of `v` (within `±2^22`) rounded to the nearest integer, as i32
/// (see [`ROUND`]).
#[inline(always)]
fn round4(v: v128) -> v128 {
    i32x4_sub(f32x4_add(v, f32x4_splat(ROUND)), i32x4_splat(ROUND_BITS))
}

/// All ones in the lanes of the vector of four at `at` that are below `n`.
/// (A function, not a closure: a closure would not get the SIMD.)
#[inline(always)]
fn live(at: usize, n: usize) -> v128 {
    let at = at as i32;
    i32x4_lt(i32x4(at, at + 1, at + 2, at + 3), i32x4_splat(n as i32))
}

/// Eight values of `x` times `factor`, rounded to i16 codes as [`code_row`]
/// does.
#[inline(always)]
fn code8(x: &[f32], factor: v128) -> v128 {
    i16x8_narrow_i32x4(
        round4(f32x4_mul(load4(x), factor)),
        round4(f32x4_mul(load4(&x[4..]), factor)),
    )
}

/// Row `scores` (integer sums for keys `0..n`, times `c` in real terms)
/// through the softmax's numerators `e^(x - max)`, as codes `0..=P_MAX` into
/// `codes[..n]`; returns their sum. Both slices hold at least
/// `round_up(n, 4)` values: the row runs in whole vectors of four, sixteen
/// values an iteration as in [`softmax_unscaled`], and the lanes of the last
/// vector past `n` are left out of the max and coded 0.
#[target_feature(enable = "simd128")]
fn softmax_codes(scores: &[i32], n: usize, c: f32, codes: &mut [i16]) -> i32 {
    let whole = round_up(n, 4);
    let (scores, codes) = (&scores[..whole], &mut codes[..whole]);
    let last = whole - 4;
    let mut top = i32x4_splat(i32::MIN);
    for s in scores[..last].chunks_exact(4) {
        // SAFETY: 4 values.
        top = i32x4_max(top, unsafe { load(s.as_ptr()) });
    }
    // SAFETY: 4 values.
    let tail = unsafe { load(scores[last..].as_ptr()) };
    let tail = v128_bitselect(tail, i32x4_splat(i32::MIN), live(last, n));
    let top = i32x4_max(top, tail);
    let max = [
        i32x4_extract_lane::<0>(top),
        i32x4_extract_lane::<1>(top),
        i32x4_extract_lane::<2>(top),
        i32x4_extract_lane::<3>(top),
    ]
    .into_iter()
    .fold(i32::MIN, i32::max);
    // c > 0, so the largest score is the largest real value.
    let m = i32x4_splat(max);
    let c = f32x4_splat(c * core::f32::consts::LOG2_E);
    let mut sum = i32x4_splat(0);
    // Whole sixteens of keys, then vectors of four, masked.
    let sixteens = n / 16 * 16;
    for (s, d) in scores[..sixteens]
        .chunks_exact(16)
        .zip(codes.chunks_exact_mut(16))
    {
        // SAFETY: 16 values each side.
        unsafe {
            let (a, b) = (load(s.as_ptr()), load(s[4..].as_ptr()));
            let (e, g) = (load(s[8..].as_ptr()), load(s[12..].as_ptr()));
            let (a, b) = (p_code(a, m, c), p_code(b, m, c));
            let (e, g) = (p_code(e, m, c), p_code(g, m, c));
            sum = i32x4_add(sum, i32x4_add(i32x4_add(a, b), i32x4_add(e, g)));
            v128_store(d.as_mut_ptr() as *mut v128, i16x8_narrow_i32x4(a, b));
            v128_store(d[8..].as_mut_ptr() as *mut v128, i16x8_narrow_i32x4(e, g));
        }
    }
    let tails = scores[sixteens..]
        .chunks_exact(4)
        .zip(codes[sixteens..].chunks_exact_mut(4));
    for (at, (s, d)) in (sixteens..).step_by(4).zip(tails) {
        // SAFETY: 4 values each side.
        unsafe {
            let p = v128_and(p_code(load(s.as_ptr()), m, c), live(at, n));
            sum = i32x4_add(sum, p);
            v128_store64_lane::<0>(i16x8_narrow_i32x4(p, p), d.as_mut_ptr() as *mut u64);
        }
    }
    i32x4_extract_lane::<0>(sum)
        + i32x4_extract_lane::<1>(sum)
        + i32x4_extract_lane::<2>(sum)
        + i32x4_extract_lane::<3>(sum)
}
