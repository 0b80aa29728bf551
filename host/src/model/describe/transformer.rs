//! The Transformer module of a model's description: its Hugging Face
//! `config.json` (the BERT shape), `sentence_bert_config.json` and
//! `tokenizer_config.json`. The invariants are the parent module's.

use std::path::Path;

use serde::Deserialize;

use super::{BertShape, DescribeError, HF_CONFIG, Problem, at, quote, read_json, read_optional};

const BERT_CONFIG: &str = "sentence_bert_config.json";
const TOKENIZER_CONFIG: &str = "tokenizer_config.json";

/// The transformer's Hugging Face `config.json`, as far as it is read. The
/// shape has no defaults (the BERT engine needs each), but its absence is
/// told after the architecture (another architecture names its sizes
/// otherwise); the rest takes `BertConfig`'s defaults.
#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    hidden_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    intermediate_size: Option<usize>,
    vocab_size: Option<usize>,
    max_position_embeddings: Option<usize>,
    type_vocab_size: Option<usize>,
    layer_norm_eps: Option<f64>,
    hidden_act: Option<String>,
    position_embedding_type: Option<String>,
}

/// The transformer's shape, from `dir/config.json`, checked.
pub(super) fn read_shape(dir: &Path) -> Result<BertShape, DescribeError> {
    let path = dir.join(HF_CONFIG);
    let config: HfConfig = read_json(&path)?;
    config.check().map_err(at(&path))
}

impl HfConfig {
    fn check(self) -> Result<BertShape, Problem> {
        let architectures = self.architectures.as_deref().unwrap_or_default();
        let bert = self.model_type.as_deref() == Some("bert")
            && architectures.iter().all(|a| a.starts_with("Bert"));
        if !bert {
            let architectures: Vec<&str> = architectures.iter().map(String::as_str).collect();
            return Err(Problem::Architecture {
                model_type: self.model_type.as_deref().map_or("absent".into(), quote),
                architectures: quote(&format!("[{}]", architectures.join(", "))),
            });
        }
        let act = self.hidden_act.as_deref().unwrap_or("gelu");
        if act != "gelu" {
            return Err(Problem::Activation(quote(act)));
        }
        let position = self
            .position_embedding_type
            .as_deref()
            .unwrap_or("absolute");
        if position != "absolute" {
            return Err(Problem::PositionEmbedding(quote(position)));
        }
        let need = |key: &'static str, value: Option<usize>| value.ok_or(Problem::MissingKey(key));
        let shape = BertShape {
            hidden_size: need("hidden_size", self.hidden_size)?,
            num_hidden_layers: need("num_hidden_layers", self.num_hidden_layers)?,
            num_attention_heads: need("num_attention_heads", self.num_attention_heads)?,
            intermediate_size: need("intermediate_size", self.intermediate_size)?,
            vocab_size: need("vocab_size", self.vocab_size)?,
            max_position_embeddings: need("max_position_embeddings", self.max_position_embeddings)?,
            type_vocab_size: need("type_vocab_size", self.type_vocab_size)?,
            layer_norm_eps: self.layer_norm_eps.unwrap_or(1e-12),
        };
        shape.check()?;
        Ok(shape)
    }
}

impl BertShape {
    fn check(&self) -> Result<(), Problem> {
        let sizes = [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ];
        if let Some((key, value)) = sizes.into_iter().find(|(_, v)| *v == 0) {
            return Err(value_problem(key, value, "must be at least 1"));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(value_problem(
                "hidden_size",
                self.hidden_size,
                "is not a multiple of num_attention_heads",
            ));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return Err(value_problem(
                "layer_norm_eps",
                self.layer_norm_eps,
                "must be a positive number",
            ));
        }
        Ok(())
    }
}

fn value_problem(key: &'static str, value: impl ToString, reason: &'static str) -> Problem {
    Problem::Value {
        key,
        value: value.to_string(),
        reason,
    }
}

/// The Transformer module's `sentence_bert_config.json` (optional).
#[derive(Deserialize, Default)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
    #[serde(default)]
    do_lower_case: bool,
}

/// The tokenizer's `tokenizer_config.json` (optional), as far as it is
/// read. `model_max_length` is often a float (1e30 for "no limit").
#[derive(Deserialize, Default)]
struct TokenizerConfig {
    model_max_length: Option<serde_json::Value>,
}

/// `max_seq_length` and `do_lower_case` of the Transformer module in `dir`.
pub(super) fn read_sentence_bert(
    dir: &Path,
    shape: &BertShape,
) -> Result<(usize, bool), DescribeError> {
    let path = dir.join(BERT_CONFIG);
    let config: SentenceBertConfig = read_optional(&path)?.unwrap_or_default();
    let positions = shape.max_position_embeddings;
    let max_seq_length = match config.max_seq_length {
        Some(n) if n == 0 || n > positions => {
            return Err(at(&path)(value_problem(
                "max_seq_length",
                n,
                "must be at least 1 and at most the transformer's max_position_embeddings",
            )));
        }
        Some(n) => n,
        None => {
            let tokenizer: TokenizerConfig =
                read_optional(&dir.join(TOKENIZER_CONFIG))?.unwrap_or_default();
            let limit = tokenizer.model_max_length.and_then(|v| v.as_u64());
            limit
                .and_then(|n| usize::try_from(n).ok())
                .filter(|&n| n > 0)
                .map_or(positions, |n| n.min(positions))
        }
    };
    Ok((max_seq_length, config.do_lower_case))
}
