//! What a caller hands the front door ([`Job`]), what it gets back
//! ([`Row`]s), and every way a job can fail ([`EmbedError`]), typed up to
//! the edge: the CLI prints it, the HTTP routes map it to a status, the
//! bus peer to a [`RemoteError`] code.
//!
//! Invariants:
//! - A job's texts keep their order: row `i` is text `i`'s answer.
//! - An [`EmbedError`] fails the whole job; a [`Row`]'s error fails one
//!   text (a poison text, a text the plugin refused) and never its
//!   neighbours.

use std::time::Duration;

use crate::bus::{ErrorCode, RemoteError};
use crate::limits;
use crate::supervisor::SupervisorError;

/// One text's answer: its vector, or why that text could not be embedded.
pub type Row = Result<Vec<f32>, TextFailure>;

/// Why one text has no vector, as the backend said it (a plugin's or a
/// child's own words, escaped where they were read).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TextFailure(pub String);

/// One request to embed, from any entrance.
#[derive(Clone, Debug)]
pub struct Job {
    /// The texts, one row each.
    pub texts: Vec<String>,
    /// Queries may embed differently from passages.
    pub is_query: bool,
    /// How long the caller waits, from when the job is prepared.
    pub deadline: Duration,
    /// Token counts the caller already has from the model's tokenizer
    /// (the worker's chunker), so the front door does not count again.
    pub tokens: Option<Vec<usize>>,
    /// Cut a text longer than the model's window (the engine reads only
    /// its window); `false` refuses it instead.
    pub truncate: bool,
    /// Held to the service's admission limits: words and tokens per input
    /// ([`limits::SERVE_MAX_INPUT_TOKENS`]), a text the tokenizer refuses
    /// fails the job, and the deadline is checked against the pool's
    /// measured speed. The HTTP routes' jobs are; the CLI's, the worker's
    /// and a bus peer's are not (a text is truncated by the engine, and a
    /// text the tokenizer refuses fails only its own row).
    pub guarded: bool,
}

impl Job {
    /// Passages, truncated to the model's window, within
    /// [`limits::DEFAULT_REQUEST_TIMEOUT`].
    pub fn new(texts: Vec<String>) -> Self {
        Job {
            texts,
            is_query: false,
            deadline: limits::DEFAULT_REQUEST_TIMEOUT,
            tokens: None,
            truncate: true,
            guarded: false,
        }
    }

    /// Held to the service's admission limits (see [`Job::guarded`]).
    #[must_use]
    pub fn guarded(mut self) -> Self {
        self.guarded = true;
        self
    }

    /// As queries (`true`) or passages.
    #[must_use]
    pub fn query(mut self, is_query: bool) -> Self {
        self.is_query = is_query;
        self
    }

    /// Within `deadline`.
    #[must_use]
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// With the texts' token counts, already counted by the model's
    /// tokenizer.
    #[must_use]
    pub fn counted(mut self, tokens: Vec<usize>) -> Self {
        self.tokens = Some(tokens);
        self
    }

    /// Refuses a text over the model's window instead of cutting it.
    #[must_use]
    pub fn strict(mut self) -> Self {
        self.truncate = false;
        self
    }
}

/// What is wrong with one input, found before any of the job is queued.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InputProblem {
    /// Its words alone pass the limit (counted without tokenizing).
    #[error("has at least {words} tokens (one per word); at most {limit} are accepted per input")]
    TooManyWords {
        /// Words that hold a letter or digit.
        words: usize,
        /// [`limits::SERVE_MAX_INPUT_TOKENS`].
        limit: usize,
    },
    /// More tokens than any input may have.
    #[error("has {tokens} tokens; at most {limit} are accepted per input")]
    TooManyTokens {
        /// Its tokens.
        tokens: usize,
        /// [`limits::SERVE_MAX_INPUT_TOKENS`].
        limit: usize,
    },
    /// Longer than the model's window, in a job that does not truncate.
    #[error(
        "has {tokens} tokens; the model reads at most {window} (send `truncate: true` to cut it)"
    )]
    OverWindow {
        /// Its tokens.
        tokens: usize,
        /// The model's window.
        window: usize,
    },
    /// The tokenizer refused it.
    #[error("cannot be tokenized: {0}")]
    Untokenizable(crate::tokens::TokenizeError),
}

/// Why a job got no rows at all.
#[derive(Clone, Debug, thiserror::Error)]
pub enum EmbedError {
    /// No generation serves yet (the service is starting).
    #[error("the embedder backend is starting")]
    Starting,
    /// Input `index` cannot be embedded; nothing of the job was queued.
    #[error("input {index} {problem}")]
    Input {
        /// Its position in the job.
        index: usize,
        /// What is wrong with it.
        problem: InputProblem,
    },
    /// The caller's token counts do not match its texts.
    #[error("{counts} token counts were given for {texts} texts")]
    Counts {
        /// Counts given.
        counts: usize,
        /// Texts given.
        texts: usize,
    },
    /// The job's tokens cannot be embedded within its deadline even alone
    /// on the pool, at the fastest speed the pool was measured at.
    #[error(
        "this request's {tokens} tokens would take about {:.1} s at the fastest the pool has been measured at, more than the {:.1} s left of its deadline: send fewer or shorter texts, or a longer deadline",
        needs.as_secs_f64(), left.as_secs_f64()
    )]
    TooSlow {
        /// The job's tokens.
        tokens: usize,
        /// The time they would take alone.
        needs: Duration,
        /// What was left of the deadline.
        left: Duration,
    },
    /// The job could finish alone, but not behind the work queued ahead.
    #[error(
        "with the work queued ahead of it, this request's {tokens} tokens would take about {:.1} s, more than the {:.1} s left of its deadline; retry shortly",
        needs.as_secs_f64(), left.as_secs_f64()
    )]
    Behind {
        /// The job's tokens.
        tokens: usize,
        /// The time they would take behind the queue.
        needs: Duration,
        /// What was left of the deadline.
        left: Duration,
    },
    /// Other jobs' text fills the tokenizer's share
    /// ([`limits::SERVE_TOKENIZE_BYTES_IN_FLIGHT`]) past
    /// [`limits::SERVE_TOKENIZE_WAIT`].
    #[error("the tokenizer is busy with other requests' text; retry shortly")]
    TokenizerBusy,
    /// The thread tokenizing the job panicked.
    #[error("the tokenizer failed: {0}")]
    TokenizerFailed(#[source] std::sync::Arc<tokio::task::JoinError>),
    /// The batch queue is full: retry shortly.
    #[error("the service is overloaded: {0} pieces of requests wait for the embedder")]
    Overloaded(usize),
    /// The generation stopped (a reload retired it): the next try reaches
    /// the one serving now.
    #[error("the embedder pool was stopped")]
    Stopped,
    /// The front door was shut down: nothing will serve again.
    #[error("the embedder was shut down")]
    ShutDown,
    /// The supervisor's (or a remote pool's) error for the whole batch.
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
}

impl EmbedError {
    /// How long a caller should wait before trying again, for errors that
    /// pass.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            EmbedError::Starting
            | EmbedError::TokenizerBusy
            | EmbedError::Overloaded(_)
            | EmbedError::Stopped => Some(limits::SERVE_RETRY_AFTER),
            EmbedError::Behind { needs, left, .. } => {
                Some((*needs - *left).max(limits::SERVE_RETRY_AFTER))
            }
            EmbedError::Supervisor(SupervisorError::Unavailable { retry_after, .. }) => {
                Some(*retry_after)
            }
            _ => None,
        }
    }
}

impl From<EmbedError> for RemoteError {
    fn from(e: EmbedError) -> Self {
        let retry_after = e.retry_after();
        let remote = match e {
            EmbedError::Supervisor(s) => return RemoteError::from(s),
            EmbedError::Input { index, .. } => {
                return RemoteError::invalid_input(index as u32, e.to_string());
            }
            EmbedError::Counts { .. } | EmbedError::TooSlow { .. } => {
                RemoteError::new(ErrorCode::InvalidRequest, e.to_string())
            }
            EmbedError::TokenizerFailed(_) | EmbedError::ShutDown => {
                RemoteError::new(ErrorCode::Failed, e.to_string())
            }
            _ => RemoteError::new(ErrorCode::Unavailable, e.to_string()),
        };
        remote.retry_after(retry_after)
    }
}

/// The fewest tokens the model's tokenizer can give `text`, counted without
/// tokenizing it: one per word (split at ASCII spaces, tabs and line
/// breaks) that holds a letter or a digit. Every tokenizer the host reads
/// splits at those (BERT's WordPiece, SentencePiece's metaspace, byte-level
/// BPE, the stub's words) and gives a word with a letter or digit at least
/// one token (an unknown word is one `[UNK]`); other characters may be
/// dropped by normalization (controls, accents), and other Unicode spaces
/// may not split, so they are not counted. So the count never exceeds the
/// real one, and a text refused for it could not have fitted.
pub fn fewest_tokens(text: &str) -> usize {
    text.split([' ', '\t', '\n', '\r'])
        .filter(|word| word.chars().any(char::is_alphanumeric))
        .count()
}

/// Refuses, before any tokenizing, a text whose fewest possible tokens
/// already pass [`limits::SERVE_MAX_INPUT_TOKENS`].
///
/// # Errors
/// [`EmbedError::Input`] naming the first such text.
pub fn check_words(texts: &[String]) -> Result<(), EmbedError> {
    for (index, text) in texts.iter().enumerate() {
        // A text of fewer bytes than the limit cannot have more words.
        if text.len() <= limits::SERVE_MAX_INPUT_TOKENS {
            continue;
        }
        let words = fewest_tokens(text);
        if words > limits::SERVE_MAX_INPUT_TOKENS {
            return Err(EmbedError::Input {
                index,
                problem: InputProblem::TooManyWords {
                    words,
                    limit: limits::SERVE_MAX_INPUT_TOKENS,
                },
            });
        }
    }
    Ok(())
}

/// Refuses a count past [`limits::SERVE_MAX_INPUT_TOKENS`] (for a
/// `guarded` job), or past the model's `window` unless the job truncates.
///
/// # Errors
/// [`EmbedError::Input`] naming the first such text.
pub fn check_counts(
    counts: &[usize],
    window: usize,
    truncate: bool,
    guarded: bool,
) -> Result<(), EmbedError> {
    for (index, &tokens) in counts.iter().enumerate() {
        let problem = if guarded && tokens > limits::SERVE_MAX_INPUT_TOKENS {
            InputProblem::TooManyTokens {
                tokens,
                limit: limits::SERVE_MAX_INPUT_TOKENS,
            }
        } else if !truncate && tokens > window {
            InputProblem::OverWindow { tokens, window }
        } else {
            continue;
        };
        return Err(EmbedError::Input { index, problem });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_counted_as_no_tokenizer_could_count_fewer() {
        assert_eq!(fewest_tokens("  two words\t"), 2);
        assert_eq!(fewest_tokens("-- ... !!"), 0);
        let long = "word ".repeat(limits::SERVE_MAX_INPUT_TOKENS + 1);
        match check_words(&["short".into(), long]) {
            Err(EmbedError::Input {
                index: 1,
                problem: InputProblem::TooManyWords { words, .. },
            }) => assert_eq!(words, limits::SERVE_MAX_INPUT_TOKENS + 1),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn counts_are_refused_past_the_limit_and_past_the_window_only_when_strict() {
        assert!(check_counts(&[10, 300], 256, true, true).is_ok());
        assert!(matches!(
            check_counts(&[10, 300], 256, false, true),
            Err(EmbedError::Input {
                index: 1,
                problem: InputProblem::OverWindow {
                    tokens: 300,
                    window: 256
                }
            })
        ));
        assert!(matches!(
            check_counts(&[limits::SERVE_MAX_INPUT_TOKENS + 1], 256, true, true),
            Err(EmbedError::Input {
                index: 0,
                problem: InputProblem::TooManyTokens { .. }
            })
        ));
    }

    #[test]
    fn an_unguarded_job_is_not_held_to_the_services_limits() {
        assert!(check_counts(&[limits::SERVE_MAX_INPUT_TOKENS + 1], 256, true, false).is_ok());
        assert!(check_counts(&[300], 256, false, false).is_err());
    }

    #[test]
    fn errors_keep_their_retry_hint_on_the_bus() {
        let remote = RemoteError::from(EmbedError::Overloaded(3));
        assert_eq!(remote.code, ErrorCode::Unavailable);
        assert!(remote.retry_after_ms.is_some());
        let remote = RemoteError::from(EmbedError::Input {
            index: 2,
            problem: InputProblem::Untokenizable(
                embedhost_text::TextError::Encode("bad".into()).into(),
            ),
        });
        assert_eq!(remote.code, ErrorCode::InvalidInput);
        assert_eq!(remote.index, Some(2));
    }
}
