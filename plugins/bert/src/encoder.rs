//! The `encoder` interface: the engine's model offered to another plugin,
//! which the host links to it inside one sandbox.
//!
//! # Invariants
//! - Every call is bounded before any work: at most [`MAX_BATCH`] inputs,
//!   each truncated (texts) or refused (id lists) past the model's
//!   `max-input-tokens`; an id outside the vocabulary is `invalid-input`
//!   naming its list, never an index out of bounds.
//! - A call before `init` is `not-initialized`.

use crate::embedhost::embedder::types::InvalidInput;
use crate::exports::embedhost::embedder::encoder::{EncoderInfo, Guest, HiddenStates};
use crate::{EmbedError, Embeddings, Output, Plugin, lock};

/// The most bytes of token states one `token-states` call may answer (the
/// host's `ENCODER_MAX_RESULT_BYTES`): past it the call is refused before
/// the forward pass, not trapped after it.
const MAX_STATES_BYTES: usize = 256 * 1024 * 1024;

/// The most texts (or id lists) one call may carry: a batch of the host's
/// is split by its token budget long before this, and a plugin that asks
/// for more (a million texts) is refused at once, before any is tokenized.
pub const MAX_BATCH: u32 = 1024;

fn bounded(count: usize) -> Result<(), EmbedError> {
    if count > MAX_BATCH as usize {
        return Err(EmbedError::InvalidInput(InvalidInput {
            index: MAX_BATCH,
            reason: format!("{count} inputs in one call; the encoder takes at most {MAX_BATCH}"),
        }));
    }
    Ok(())
}

fn refuse(index: usize, reason: String) -> EmbedError {
    EmbedError::InvalidInput(InvalidInput {
        index: index as u32,
        reason,
    })
}

impl Guest for Plugin {
    fn info() -> EncoderInfo {
        let guard = lock();
        match guard.as_ref() {
            Some(model) => EncoderInfo {
                model_id: model.info.model_id.clone(),
                dimension: model.info.dimension,
                max_input_tokens: model.info.max_input_tokens,
                normalized: model.info.normalized,
                vocabulary_size: model.bert.shape.vocab as u32,
                max_batch: MAX_BATCH,
            },
            None => EncoderInfo {
                model_id: String::new(),
                dimension: 0,
                max_input_tokens: 0,
                normalized: false,
                vocabulary_size: 0,
                max_batch: MAX_BATCH,
            },
        }
    }

    fn encode(texts: Vec<String>) -> Result<Embeddings, EmbedError> {
        bounded(texts.len())?;
        // The engine's own `embed`: a text's kind changes nothing here.
        <Plugin as crate::Guest>::embed(texts, crate::InputKind::Document)
    }

    fn tokenize(texts: Vec<String>) -> Result<Vec<Vec<u32>>, EmbedError> {
        bounded(texts.len())?;
        let guard = lock();
        let model = guard.as_ref().ok_or(EmbedError::NotInitialized)?;
        Ok(model.tokenize(&texts)?.0)
    }

    fn encode_ids(ids: Vec<Vec<u32>>) -> Result<Embeddings, EmbedError> {
        bounded(ids.len())?;
        let mut guard = lock();
        let model = guard.as_mut().ok_or(EmbedError::NotInitialized)?;
        let (vocab, max) = (model.bert.shape.vocab, model.info.max_input_tokens as usize);
        for (index, list) in ids.iter().enumerate() {
            if list.is_empty() || list.len() > max {
                return Err(refuse(
                    index,
                    format!("{} token ids; the encoder takes 1 to {max}", list.len()),
                ));
            }
            if let Some(&id) = list.iter().find(|&&id| id as usize >= vocab) {
                return Err(refuse(
                    index,
                    format!("token id {id} is outside the vocabulary of {vocab}"),
                ));
            }
        }
        let types: Vec<Vec<u32>> = ids.iter().map(|list| vec![0; list.len()]).collect();
        let data = model.run(&ids, &types, Output::Pooled)?;
        Ok(Embeddings {
            dimension: model.info.dimension,
            data,
        })
    }

    fn token_states(texts: Vec<String>) -> Result<HiddenStates, EmbedError> {
        bounded(texts.len())?;
        let mut guard = lock();
        let model = guard.as_mut().ok_or(EmbedError::NotInitialized)?;
        let (ids, types) = model.tokenize(&texts)?;
        let row = model.bert.shape.hidden * 4;
        let mut bytes = 0usize;
        for (index, list) in ids.iter().enumerate() {
            bytes = bytes.saturating_add(list.len().saturating_mul(row));
            if bytes > MAX_STATES_BYTES {
                return Err(refuse(
                    index,
                    format!(
                        "the states up to this text pass the {MAX_STATES_BYTES} bytes one call answers; ask for fewer texts"
                    ),
                ));
            }
        }
        let data = model.run(&ids, &types, Output::States)?;
        Ok(HiddenStates {
            dimension: model.info.dimension,
            lengths: ids.iter().map(|list| list.len() as u32).collect(),
            data,
        })
    }
}
