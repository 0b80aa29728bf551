//! What a request must pass before it costs the service work: its body,
//! read whole within a time limit, then one admission slot of the whole
//! service.
//!
//! Invariants, and why:
//! - The body is read before the request takes a slot: a client that sends
//!   headers and no body (or a body that never ends) holds its connection
//!   until `[serve] body_timeout_ms` (then 408), never a slot another
//!   client needs.
//! - A declared `Content-Length` past `[serve] max_body_kb` is refused (413)
//!   before a byte of it is read; a body that grows past it is refused when
//!   it does. Either closes the connection.
//! - Admission is one semaphore for the whole service
//!   (`[serve] max_concurrent_requests`), shared by every route that costs
//!   work and taken without waiting: 429 with `Retry-After` past it.
//!   (A tower `ConcurrencyLimitLayer` under `Router::layer` makes one
//!   semaphore per route, so the limit was per route.)
//! - At a stop, a body already sent is read and answered: the read polls
//!   the body before the stop, and a body still arriving gets
//!   [`limits::SERVE_DRAIN_BODY_WAIT`] more (its own timeout if sooner), then
//!   503, so an accepted request is not refused for arriving at the same
//!   moment as the signal, and a stalled client does not hold the drain.
//! - The bytes of all bodies held at once (arriving, or read and not yet
//!   answered) are at most [`limits::SERVE_BODY_BYTES_IN_FLIGHT`] beyond the
//!   first [`limits::SERVE_BODY_FREE_BYTES`] of each (which the connection
//!   cap bounds): a body whose next bytes do not fit is refused (429) rather
//!   than buffered, so memory for bodies stays bounded however many
//!   connections send them, and a small request is never refused for
//!   others' large bodies.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State as Shared};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt as _;

use super::State;
use super::api::{ApiError, Style};
use super::routes::Access;
use crate::limits;

/// The error shape of the route at `path`.
pub fn style_of(path: &str) -> Style {
    if path.starts_with("/v1/") {
        Style::OpenAi
    } else {
        Style::Tei
    }
}

/// An error that also closes the connection (its body was not read whole).
fn closing(error: ApiError) -> Response {
    let mut response = error.into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Why a body was not read.
enum Unread {
    /// Past `[serve] max_body_kb` (413).
    TooLarge,
    /// Bodies in flight hold [`limits::SERVE_BODY_BYTES_IN_FLIGHT`] (429).
    Crowded,
    /// Not whole within `[serve] body_timeout_ms` (408).
    Late,
    /// The service is stopping (503).
    Stopping,
    /// The connection failed (400).
    Broken(String),
}

/// Reads the request's body whole, within `[serve] body_timeout_ms`,
/// `[serve] max_body_kb` and the bytes all bodies may hold at once, and
/// passes the request on with it; the body's share of
/// [`limits::SERVE_BODY_BYTES_IN_FLIGHT`] is held until the answer.
pub async fn read_body(
    Shared((state, _)): Shared<(Arc<State>, Access)>,
    request: Request,
    next: Next,
) -> Response {
    let limit = state.settings.max_body_kb * 1024;
    let timeout = Duration::from_millis(state.settings.body_timeout_ms);
    let (parts, body) = request.into_parts();
    let style = style_of(parts.uri.path());
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let read = if declared.is_some_and(|n| n > limit as u64) {
        Err(Unread::TooLarge)
    } else {
        collect(&state.bodies, &state.draining, body, limit, timeout).await
    };
    let refusal = |status, message: String| closing(ApiError::new(status, message).style(style));
    let (bytes, _held) = match read {
        Ok(read) => read,
        Err(Unread::TooLarge) => {
            return refusal(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is larger than {limit} bytes ([serve] max_body_kb)"),
            );
        }
        Err(Unread::Late) => {
            return refusal(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} ms ([serve] body_timeout_ms)",
                    timeout.as_millis()
                ),
            );
        }
        Err(Unread::Broken(e)) => {
            return refusal(
                StatusCode::BAD_REQUEST,
                format!("cannot read the request body: {e}"),
            );
        }
        Err(unread) => {
            let (status, message) = match unread {
                Unread::Crowded => (
                    StatusCode::TOO_MANY_REQUESTS,
                    "the service is receiving too many request bodies at once; retry shortly",
                ),
                _ => (StatusCode::SERVICE_UNAVAILABLE, "the service is stopping"),
            };
            return closing(
                ApiError::new(status, message)
                    .style(style)
                    .retry_after(limits::SERVE_RETRY_AFTER),
            );
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// The body's bytes, frame by frame, each taking its share of `bodies` (the
/// bytes in flight), by `timeout`; once `draining`, by
/// [`limits::SERVE_DRAIN_BODY_WAIT`] from then if that is sooner.
async fn collect(
    bodies: &Arc<tokio::sync::Semaphore>,
    draining: &tokio_util::sync::CancellationToken,
    mut body: Body,
    limit: usize,
    timeout: Duration,
) -> Result<(axum::body::Bytes, tokio::sync::OwnedSemaphorePermit), Unread> {
    let mut until = tokio::time::Instant::now() + timeout;
    let mut stopping = false;
    let mut held = bodies
        .clone()
        .try_acquire_many_owned(0)
        .map_err(|_| Unread::Crowded)?;
    let mut bytes = bytes::BytesMut::new();
    loop {
        // Biased: a frame already here is taken before the stop is seen.
        let frame = tokio::select! {
            biased;
            frame = tokio::time::timeout_at(until, body.frame()) => frame,
            () = draining.cancelled(), if !stopping => {
                stopping = true;
                until = until.min(tokio::time::Instant::now() + limits::SERVE_DRAIN_BODY_WAIT);
                continue;
            }
        };
        let data = match frame {
            Err(_) if stopping => return Err(Unread::Stopping),
            Err(_) => return Err(Unread::Late),
            Ok(None) => return Ok((bytes.freeze(), held)),
            Ok(Some(Err(e))) => return Err(Unread::Broken(e.to_string())),
            Ok(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue,
            },
        };
        if bytes.len() + data.len() > limit {
            return Err(Unread::TooLarge);
        }
        // The first bytes of every body are free: their memory is bounded
        // by the connection cap, and a sentence is never refused for
        // others' large bodies.
        let free = limits::SERVE_BODY_FREE_BYTES.saturating_sub(bytes.len());
        let share = u32::try_from(data.len().saturating_sub(free)).map_err(|_| Unread::TooLarge)?;
        let more = bodies
            .clone()
            .try_acquire_many_owned(share)
            .map_err(|_| Unread::Crowded)?;
        held.merge(more);
        bytes.extend_from_slice(&data);
    }
}

/// Takes one slot of the service's admission limit for the request, or
/// answers 429 at once.
pub async fn admit(
    Shared((state, _)): Shared<(Arc<State>, Access)>,
    request: Request,
    next: Next,
) -> Response {
    let Ok(_slot) = state.admission.clone().try_acquire_owned() else {
        return ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "too many requests at once (more than {}, [serve] max_concurrent_requests); retry shortly",
                state.settings.max_concurrent_requests
            ),
        )
        .style(style_of(request.uri().path()))
        .retry_after(limits::SERVE_RETRY_AFTER)
        .into_response();
    };
    next.run(request).await
}

pub use crate::embedder::job::fewest_tokens;

/// Refuses, before any tokenizing, a text in `field` whose fewest possible
/// tokens already pass [`limits::SERVE_MAX_INPUT_TOKENS`] (400 naming it;
/// 413 on TEI's routes).
///
/// # Errors
/// The refusal.
pub fn check_words(field: &str, texts: &[String]) -> Result<(), ApiError> {
    crate::embedder::job::check_words(texts).map_err(|e| ApiError::embedding(e, field))
}

/// Runs `work`, a tokenization of `bytes` of text, within the share of
/// the text being tokenized that every caller of the front door uses
/// ([`crate::embedder::tokenizing`]).
///
/// # Errors
/// 429 if the share does not come in time; 500 if the work panicked.
pub async fn tokenizing<T: Send + 'static>(
    share_of: &Arc<tokio::sync::Semaphore>,
    bytes: usize,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    Ok(crate::embedder::tokenizing(share_of, bytes, work).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fewest_tokens_never_exceed_the_words_the_stub_counts() {
        assert_eq!(fewest_tokens("hello world"), 2);
        assert_eq!(fewest_tokens("  a\t\tb\nc\r\n"), 3);
        // Punctuation alone, controls and other spaces are not counted.
        assert_eq!(fewest_tokens("... !!! \u{0085}\u{200b}"), 0);
        assert_eq!(fewest_tokens("a\u{2028}b a\u{000c}b"), 2);
        // One unknown word is one token, however long.
        assert_eq!(fewest_tokens(&"x".repeat(100_000)), 1);
        let text = "word ".repeat(9000);
        assert_eq!(fewest_tokens(&text), 9000);
        assert!(check_words("input", &[text]).is_err());
        assert!(check_words("input", &["x".repeat(100_000)]).is_ok());
        assert!(check_words("input", &[" ".repeat(100_000) + "a"]).is_ok());
    }

    /// A body whose bytes come `after` the start of the read, in one frame.
    fn arriving(after: Duration, text: &'static str) -> Body {
        let chunk = async move {
            tokio::time::sleep(after).await;
            Ok::<_, std::io::Error>(axum::body::Bytes::from_static(text.as_bytes()))
        };
        Body::from_stream(futures::stream::once(chunk))
    }

    /// Reads `body` with a stop already under way, with the default limits.
    async fn read_while_stopping(body: Body) -> Result<axum::body::Bytes, Unread> {
        let bodies = Arc::new(tokio::sync::Semaphore::new(
            limits::SERVE_BODY_BYTES_IN_FLIGHT,
        ));
        let draining = tokio_util::sync::CancellationToken::new();
        draining.cancel();
        let timeout = limits::DEFAULT_SERVE_BODY_TIMEOUT;
        collect(&bodies, &draining, body, 1 << 20, timeout)
            .await
            .map(|(bytes, _held)| bytes)
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_already_sent_or_arriving_at_the_stop_is_read_and_a_stalled_one_refused() {
        // Sent whole before the stop was seen: read, every time (an
        // unbiased race between the two once refused one of these).
        for _ in 0..64 {
            let read = read_while_stopping(Body::from("{\"input\":\"hello\"}")).await;
            assert!(
                matches!(read, Ok(ref b) if b.len() == 17),
                "refused a body already here"
            );
        }
        // Arriving just after the stop: still read.
        let lag = limits::SERVE_DRAIN_BODY_WAIT / 2;
        let read = read_while_stopping(arriving(lag, "late but coming")).await;
        assert!(matches!(read, Ok(ref b) if &b[..] == b"late but coming"));
        // Stalled: 503 once the drain's wait is over, not the body timeout.
        let start = tokio::time::Instant::now();
        let stalled = arriving(limits::DEFAULT_SERVE_BODY_TIMEOUT * 2, "never");
        let read = read_while_stopping(stalled).await;
        assert!(matches!(read, Err(Unread::Stopping)));
        assert_eq!(start.elapsed(), limits::SERVE_DRAIN_BODY_WAIT);
    }

    #[tokio::test]
    async fn tokenizing_holds_at_most_the_bytes_in_flight_and_refuses_past_the_wait() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::{Mutex, mpsc};
        let cap = limits::SERVE_TOKENIZE_BYTES_IN_FLIGHT;
        let share_of = Arc::new(tokio::sync::Semaphore::new(cap));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let (release, released) = mpsc::channel::<()>();
        let released = Arc::new(Mutex::new(released));
        // Twelve requests of a quarter of the cap each, whose work blocks
        // until released: four fit at once.
        let requests: Vec<_> = (0..12)
            .map(|_| {
                let (share_of, in_flight) = (share_of.clone(), in_flight.clone());
                let released = released.clone();
                tokio::spawn(async move {
                    tokenizing(&share_of, cap / 4, move || {
                        in_flight.fetch_add(1, Ordering::SeqCst);
                        let _ = released.lock().unwrap().recv();
                    })
                    .await
                })
            })
            .collect();
        // Polled, not slept: four works start once they have their share.
        let until = std::time::Instant::now() + Duration::from_secs(60);
        while in_flight.load(Ordering::SeqCst) < 4 {
            assert!(
                std::time::Instant::now() < until,
                "four works never started"
            );
            tokio::task::yield_now().await;
        }
        // The eight without a share are refused once the tokenize wait
        // passes (real time: blocked work holds the paused clock still),
        // while the four hold it all. Awaited, with a guard against a hang.
        let mut waiting = requests;
        let mut refused = 0;
        while refused < 8 {
            let guard = limits::SERVE_TOKENIZE_WAIT * 12;
            let (done, _, rest) = tokio::time::timeout(guard, futures::future::select_all(waiting))
                .await
                .expect("requests ran without their share of the bytes");
            assert_eq!(
                done.unwrap().unwrap_err().status,
                StatusCode::TOO_MANY_REQUESTS
            );
            refused += 1;
            waiting = rest;
        }
        assert_eq!(in_flight.load(Ordering::SeqCst), 4);
        let requests = waiting;
        for _ in 0..12 {
            release.send(()).unwrap();
        }
        let mut statuses = Vec::new();
        for request in requests {
            statuses.push(
                request
                    .await
                    .unwrap()
                    .map_or_else(|e| e.status, |()| StatusCode::OK),
            );
        }
        assert_eq!(statuses, vec![StatusCode::OK; 4]);
        assert_eq!(share_of.available_permits(), cap);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_waiting_past_the_tokenize_wait_gets_429() {
        let share_of = Arc::new(tokio::sync::Semaphore::new(
            limits::SERVE_TOKENIZE_BYTES_IN_FLIGHT,
        ));
        let _all = share_of
            .clone()
            .acquire_many_owned(share_of.available_permits() as u32)
            .await;
        let err = tokenizing(&share_of, 1 << 20, || ()).await.unwrap_err();
        assert_eq!(err.status, StatusCode::TOO_MANY_REQUESTS);
        // A sentence needs no share.
        tokenizing(&share_of, 10, || ()).await.unwrap();
    }
}
