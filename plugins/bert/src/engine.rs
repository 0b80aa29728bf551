//! The BERT encoder: embeddings, `layers` x (self-attention, feed-forward),
//! with the matrix products in [`kernels`] at the chosen [`Precision`].
//!
//! # Layout
//! Texts are packed, not padded: one forward pass holds the tokens of
//! several texts back to back (`rows x hidden`), and attention runs per text
//! and per head on its own rows. A short text pays for no other text's
//! length, and nothing is transposed or allocated per operation: the
//! [`Scratch`] buffers live as long as the model.
//!
//! # Precision
//! - `fp32`: every product in f32; the reference's arithmetic up to summation
//!   order (cosine >= 0.9999 to the golden vectors).
//! - `int8`: the six linear layers of each block in int8 (weights per output
//!   channel, activations per token; paired 16-bit sums but for the
//!   attention's values), attention's two products in 16-bit fixed
//!   point (`attend_fixed`: 11- to 13-bit codes, exact integer sums), and
//!   everything else (the scores' scaling, softmax, LayerNorm, GELU,
//!   residuals) in f32.
//!
//! # Profiling
//! Built with the `stage-timing` feature, each stage's time is charged to
//! [`embedhost_kernels::timing`]'s totals (GELU then runs apart from its
//! product, to be seen apart; the vectors are the same). Without it the laps
//! are empty and the pass is as written.

use embedhost_kernels::timing::{self, Stage, lap};
use embedhost_kernels::{
    self as kernels, F32Linear, I8Linear, Pull, Quantized, ROWS, Sums, Then, round_up,
};
use embedhost_text::Pooling;

// At int8, the query/key/value product pulls each token's largest channel
// out of its quantization range (`Pull::Outlier`): queries and keys feed the
// softmax, which turns small score errors into large weight errors, and the
// [CLS] token carries one channel ten times larger than the rest. Without it,
// "hello" fell to cosine 0.989 against the reference; with it, 0.9955
// (`the_wasm_plugin_in_int8_stays_near_the_reference`). The other layers'
// inputs have no such outlier worth its cost. The values of that product
// add their int8 products exactly, and everything else adds pairs of groups
// in 16 bits (`Sums::PairsBefore`, `Sums::Pairs`; see `Sums` for the
// measurements).

/// How the linear layers compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    Fp32,
    Int8,
}

/// A linear layer at one precision.
pub enum Linear {
    F32(F32Linear),
    I8(I8Linear),
}

impl Linear {
    /// `after` is the LayerNorm that feeds this layer, if one does: at int8
    /// its scales even out the input channels before quantization. `pull`
    /// says whether each token's outlier channel is pulled out, and `sums`
    /// how the int8 products are added.
    #[allow(clippy::too_many_arguments)]
    fn new(
        precision: Precision,
        w: &[f32],
        b: &[f32],
        outputs: usize,
        inputs: usize,
        after: Option<&Norm>,
        pull: Pull,
        sums: Sums,
    ) -> Self {
        match precision {
            Precision::Fp32 => Linear::F32(F32Linear::new(w, b, outputs, inputs)),
            Precision::Int8 => Linear::I8(I8Linear::new(
                w,
                b,
                outputs,
                inputs,
                after.map(|n| kernels::smoothing(w, outputs, inputs, &n.gamma, &n.beta)),
                pull,
                sums,
            )),
        }
    }

    fn outputs(&self) -> usize {
        match self {
            Linear::F32(l) => l.outputs,
            Linear::I8(l) => l.outputs,
        }
    }

    /// `out = then(x W^T + b)`, quantizing `x` into `q` first at int8;
    /// the product's time is charged to `stage`.
    fn forward(
        &self,
        x: &[f32],
        rows: usize,
        q: &mut Quantized,
        out: &mut [f32],
        then: Then,
        stage: Stage,
    ) {
        match self {
            Linear::F32(l) => l.forward(x, rows, out, then),
            Linear::I8(l) => {
                l.quantize(x, rows, q);
                lap(Stage::Quantize);
                l.forward(q, rows, out, then)
            }
        }
        lap(stage);
    }
}

/// A LayerNorm's parameters.
pub struct Norm {
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
}

/// One encoder block.
pub struct Layer {
    /// Query, key and value in one product: outputs `[q | k | v]`.
    pub qkv: Linear,
    pub attention_out: Linear,
    pub attention_norm: Norm,
    pub intermediate: Linear,
    pub output: Linear,
    pub output_norm: Norm,
}

/// The sizes a checkpoint's `config.json` gives.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub hidden: usize,
    pub heads: usize,
    pub layers: usize,
    pub inner: usize,
    pub vocab: usize,
    pub positions: usize,
    pub type_vocab: usize,
    pub eps: f32,
}

/// The weights, in the layout the kernels read.
pub struct Bert {
    pub shape: Shape,
    pub precision: Precision,
    words: Vec<f32>,
    positions: Vec<f32>,
    types: Vec<f32>,
    norm: Norm,
    layers: Vec<Layer>,
}

/// Where a checkpoint's tensors come from: name to `(data, shape)`.
pub trait Tensors {
    /// The f32 values of tensor `name` and its shape.
    ///
    /// # Errors
    /// A message naming the tensor if it is missing or not f32.
    fn get(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>), String>;
}

/// Buffers of one forward pass, reused across calls.
#[derive(Default)]
pub struct Scratch {
    x: Vec<f32>,
    qkv: Vec<f32>,
    context: Vec<f32>,
    attended: Vec<f32>,
    inner: Vec<f32>,
    attention: kernels::Attention,
    q: Quantized,
}

/// One text of a packed pass: its token ids and type ids.
pub struct Text<'a> {
    pub ids: &'a [u32],
    pub types: &'a [u32],
}

impl Bert {
    /// Loads and packs the weights from `tensors`.
    ///
    /// # Errors
    /// A message naming the tensor that is missing or has the wrong shape.
    pub fn load(tensors: &dyn Tensors, shape: Shape, precision: Precision) -> Result<Self, String> {
        let Shape {
            hidden,
            heads,
            inner,
            ..
        } = shape;
        if heads == 0 || hidden % heads != 0 || (hidden / heads) % 4 != 0 || hidden % 4 != 0 {
            return Err(format!(
                "hidden_size {hidden} with {heads} heads: the engine needs a head size that is a multiple of 4"
            ));
        }
        // Checkpoints are saved with or without the `bert.` prefix.
        let prefix = if tensors
            .get("bert.embeddings.word_embeddings.weight")
            .is_ok()
        {
            "bert."
        } else {
            ""
        };
        let get = |name: &str, want: &[usize]| -> Result<Vec<f32>, String> {
            let full = format!("{prefix}{name}");
            let (data, got) = tensors.get(&full)?;
            if got != want {
                return Err(format!(
                    "tensor `{full}` has shape {got:?}, expected {want:?}"
                ));
            }
            Ok(data)
        };
        let norm = |name: &str| -> Result<Norm, String> {
            Ok(Norm {
                gamma: get(&format!("{name}.weight"), &[hidden])?,
                beta: get(&format!("{name}.bias"), &[hidden])?,
            })
        };
        let linear = |name: &str,
                      outputs: usize,
                      inputs: usize,
                      after: Option<&Norm>|
         -> Result<Linear, String> {
            let w = get(&format!("{name}.weight"), &[outputs, inputs])?;
            let b = get(&format!("{name}.bias"), &[outputs])?;
            Ok(Linear::new(
                precision,
                &w,
                &b,
                outputs,
                inputs,
                after,
                Pull::None,
                Sums::Pairs,
            ))
        };
        let embedding_norm = norm("embeddings.LayerNorm")?;
        let mut layers: Vec<Layer> = Vec::with_capacity(shape.layers);
        for i in 0..shape.layers {
            let l = format!("encoder.layer.{i}");
            let a = format!("{l}.attention");
            let mut w = Vec::with_capacity(3 * hidden * hidden);
            let mut b = Vec::with_capacity(3 * hidden);
            for part in ["query", "key", "value"] {
                w.extend(get(&format!("{a}.self.{part}.weight"), &[hidden, hidden])?);
                b.extend(get(&format!("{a}.self.{part}.bias"), &[hidden])?);
            }
            let before = layers.last().map_or(&embedding_norm, |l| &l.output_norm);
            let qkv = Linear::new(
                precision,
                &w,
                &b,
                3 * hidden,
                hidden,
                Some(before),
                Pull::Outlier,
                Sums::PairsBefore(2 * hidden),
            );
            let attention_norm = norm(&format!("{a}.output.LayerNorm"))?;
            layers.push(Layer {
                qkv,
                attention_out: linear(&format!("{a}.output.dense"), hidden, hidden, None)?,
                intermediate: linear(
                    &format!("{l}.intermediate.dense"),
                    inner,
                    hidden,
                    Some(&attention_norm),
                )?,
                attention_norm,
                output: linear(&format!("{l}.output.dense"), hidden, inner, None)?,
                output_norm: norm(&format!("{l}.output.LayerNorm"))?,
            });
        }
        Ok(Bert {
            words: get("embeddings.word_embeddings.weight", &[shape.vocab, hidden])?,
            positions: get(
                "embeddings.position_embeddings.weight",
                &[shape.positions, hidden],
            )?,
            types: get(
                "embeddings.token_type_embeddings.weight",
                &[shape.type_vocab, hidden],
            )?,
            norm: embedding_norm,
            layers,
            shape,
            precision,
        })
    }

    /// The vector of each text, `texts.len() x hidden`, appended to `out`:
    /// its token states pooled by `pooled`'s mode, L2-normalized if
    /// `pooled` says so.
    ///
    /// # Errors
    /// A message if a token id, type id or length is outside the model's
    /// tables (the tokenizer and model do not match).
    pub fn embed(
        &self,
        texts: &[Text],
        pooled: (Pooling, bool),
        scratch: &mut Scratch,
        out: &mut Vec<f32>,
    ) -> Result<(), String> {
        self.forward(texts, scratch)?;
        let hidden = self.shape.hidden;
        // Pooling over each text's rows, then L2 normalization if asked.
        let (pooling, normalize) = pooled;
        let mut first = 0;
        for text in texts {
            let n = text.ids.len();
            let start = out.len();
            out.resize(start + hidden, 0.0);
            let v = &mut out[start..];
            pooling.pool_text(&scratch.x[first * hidden..(first + n) * hidden], hidden, v);
            if normalize {
                embedhost_text::l2_normalize(v);
            }
            first += n;
        }
        lap(Stage::Pooling);
        Ok(())
    }

    /// The last layer's state of every token of `texts`, in order, appended
    /// to `out`: `hidden` floats a token, for a caller that pools them its
    /// own way.
    ///
    /// # Errors
    /// As [`Bert::embed`].
    pub fn states(
        &self,
        texts: &[Text],
        scratch: &mut Scratch,
        out: &mut Vec<f32>,
    ) -> Result<(), String> {
        self.forward(texts, scratch)?;
        let total: usize = texts.iter().map(|t| t.ids.len()).sum();
        out.extend_from_slice(&scratch.x[..total * self.shape.hidden]);
        Ok(())
    }

    /// One packed forward pass over `texts`: the last layer's states of
    /// their tokens, in order, in `scratch.x` (its first `total x hidden`
    /// floats).
    fn forward(&self, texts: &[Text], scratch: &mut Scratch) -> Result<(), String> {
        let Shape {
            hidden,
            heads,
            inner,
            eps,
            ..
        } = self.shape;
        let total: usize = texts.iter().map(|t| t.ids.len()).sum();
        let rows = round_up(total.max(1), ROWS);
        timing::reset();
        let s = scratch;
        for buffer in [&mut s.x, &mut s.attended] {
            buffer.clear();
            buffer.resize(rows * hidden, 0.0);
        }
        s.context.clear();
        s.context.resize(rows * hidden, 0.0);
        s.qkv.clear();
        s.qkv.resize(rows * 3 * hidden, 0.0);
        s.inner.clear();
        s.inner.resize(rows * inner, 0.0);

        // Embeddings.
        let mut row = 0;
        for text in texts {
            if text.ids.len() > self.shape.positions {
                return Err(format!(
                    "a text of {} tokens is longer than the model's {} positions",
                    text.ids.len(),
                    self.shape.positions
                ));
            }
            for (p, (&id, &ty)) in text.ids.iter().zip(text.types).enumerate() {
                let (id, ty) = (id as usize, ty as usize);
                if id >= self.shape.vocab || ty >= self.shape.type_vocab {
                    return Err(format!(
                        "token id {id} or type {ty} is outside the model's tables"
                    ));
                }
                let dst = &mut s.x[row * hidden..][..hidden];
                let w = &self.words[id * hidden..][..hidden];
                let pos = &self.positions[p * hidden..][..hidden];
                let t = &self.types[ty * hidden..][..hidden];
                for i in 0..hidden {
                    dst[i] = w[i] + t[i] + pos[i];
                }
                row += 1;
            }
        }
        kernels::layer_norm(
            &mut s.x[..total * hidden],
            hidden,
            &self.norm.gamma,
            &self.norm.beta,
            eps,
        );
        lap(Stage::Embeddings);

        let head = hidden / heads;
        let scale = 1.0 / (head as f32).sqrt();
        let attend = match self.precision {
            Precision::Fp32 => kernels::attend,
            Precision::Int8 => kernels::attend_fixed,
        };
        for layer in &self.layers {
            layer
                .qkv
                .forward(&s.x, rows, &mut s.q, &mut s.qkv, Then::Store, Stage::Qkv);
            // Attention per text and head, on the text's own rows.
            let mut first = 0;
            for text in texts {
                let n = text.ids.len();
                for h in 0..heads {
                    attend(
                        &s.qkv[first * 3 * hidden..],
                        3 * hidden,
                        (h * head, hidden + h * head, 2 * hidden + h * head),
                        n,
                        head,
                        scale,
                        &mut s.attention,
                        &mut s.context[first * hidden..],
                        hidden,
                        h * head,
                    );
                }
                first += n;
            }
            layer.attention_out.forward(
                &s.context,
                rows,
                &mut s.q,
                &mut s.attended,
                Then::Add(&s.x),
                Stage::AttentionOut,
            );
            let n = &layer.attention_norm;
            kernels::layer_norm(
                &mut s.attended[..total * hidden],
                hidden,
                &n.gamma,
                &n.beta,
                eps,
            );
            lap(Stage::Norm);
            debug_assert_eq!(layer.intermediate.outputs(), inner);
            // Timed, GELU runs apart from the product to be seen apart.
            let gelu = if timing::ENABLED {
                Then::Store
            } else {
                Then::Gelu
            };
            layer.intermediate.forward(
                &s.attended,
                rows,
                &mut s.q,
                &mut s.inner,
                gelu,
                Stage::FfnUp,
            );
            if timing::ENABLED {
                kernels::gelu(&mut s.inner[..total * inner]);
                lap(Stage::Gelu);
            }
            layer.output.forward(
                &s.inner,
                rows,
                &mut s.q,
                &mut s.x,
                Then::Add(&s.attended),
                Stage::FfnDown,
            );
            let n = &layer.output_norm;
            kernels::layer_norm(&mut s.x[..total * hidden], hidden, &n.gamma, &n.beta, eps);
            lap(Stage::Norm);
        }
        Ok(())
    }

    /// The number of encoder blocks.
    pub fn layers(&self) -> usize {
        self.layers.len()
    }
}
