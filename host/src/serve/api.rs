//! HTTP errors in the shapes clients expect, and request bodies read field
//! by field so that a refusal names the field.
//!
//! Two shapes: OpenAI's (`{"error": {"message", "type", "param", "code"}}`)
//! on `/v1/*`, and TEI's (`{"error", "error_type"}`) everywhere else.
//! Nothing a client sends becomes a 500: a body that is not JSON, a field of
//! the wrong type, a value out of range are 400s that say which.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::embedder::{EmbedError, InputProblem};
use crate::supervisor::SupervisorError;

/// Which API's error shape a route answers in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// `{"error": {"message", "type", "param", "code"}}`.
    OpenAi,
    /// `{"error", "error_type"}`.
    Tei,
}

/// A refused or failed request.
#[derive(Clone, Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong, for a person.
    pub message: String,
    /// The field at fault, if one is.
    pub param: Option<String>,
    /// When to retry (429, 503).
    pub retry_after: Option<Duration>,
    /// The shape to answer in.
    pub style: Style,
    /// A size or count past a limit: 400 in OpenAI's shape, 413 in TEI's
    /// (TEI answers its validation errors so).
    pub limit: bool,
}

impl ApiError {
    /// An error of `status`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
            retry_after: None,
            style: Style::Tei,
            limit: false,
        }
    }

    /// 400 (413 on TEI's routes) for a size or count past a limit, naming
    /// `param`.
    pub fn over_limit(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            limit: true,
            ..Self::bad(param, message)
        }
    }

    /// 400, naming `param`.
    pub fn bad(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param.to_string()),
            ..Self::new(StatusCode::BAD_REQUEST, message)
        }
    }

    /// The same error in `style`'s shape.
    #[must_use]
    pub fn style(mut self, style: Style) -> Self {
        self.style = style;
        self
    }

    /// 503 (or 429) with a `Retry-After`.
    #[must_use]
    pub fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    fn openai_type(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// OpenAI's `code`: a stable, machine-readable name of the refusal
    /// (OpenAI's own where it has one).
    fn openai_code(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "invalid_api_key",
            StatusCode::NOT_FOUND if self.param.as_deref() == Some("model") => "model_not_found",
            StatusCode::NOT_FOUND => "not_found",
            StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
            StatusCode::REQUEST_TIMEOUT => "request_timeout",
            StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
            StatusCode::UNPROCESSABLE_ENTITY => "input_failed",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_exceeded",
            StatusCode::SERVICE_UNAVAILABLE => "service_unavailable",
            StatusCode::GATEWAY_TIMEOUT => "deadline_exceeded",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request",
        }
    }

    fn tei_type(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "Unauthorized",
            StatusCode::TOO_MANY_REQUESTS => "Overloaded",
            StatusCode::SERVICE_UNAVAILABLE => "Unhealthy",
            StatusCode::PAYLOAD_TOO_LARGE => "Validation",
            s if s.is_server_error() || s == StatusCode::UNPROCESSABLE_ENTITY => "Backend",
            _ => "Validation",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(mut self) -> Response {
        if self.limit && self.style == Style::Tei {
            self.status = StatusCode::PAYLOAD_TOO_LARGE;
        }
        let body = match self.style {
            Style::OpenAi => json!({
                "error": {
                    "message": self.message,
                    "type": self.openai_type(),
                    "param": self.param,
                    "code": self.openai_code(),
                }
            }),
            Style::Tei => json!({ "error": self.message, "error_type": self.tei_type() }),
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(after) = self.retry_after {
            let secs = after.as_secs_f64().ceil().max(1.0) as u64;
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        response
    }
}

impl From<EmbedError> for ApiError {
    fn from(e: EmbedError) -> Self {
        ApiError::embedding(e, "input")
    }
}

impl ApiError {
    /// The front door's refusal of the texts in `field`, as the client's
    /// answer: an input's problem names `field[i]`, running out of time
    /// names the deadline header.
    pub fn embedding(e: EmbedError, field: &str) -> Self {
        let message = e.to_string();
        let retry_after = e.retry_after();
        let error = match e {
            EmbedError::Input { index, problem } => {
                let message = format!("`{field}[{index}]` {problem}");
                return match problem {
                    InputProblem::Untokenizable(_) => ApiError::bad(field, message),
                    _ => ApiError::over_limit(field, message),
                };
            }
            EmbedError::TooSlow { .. } => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("{message} (the {} header)", super::DEADLINE_HEADER),
            ),
            EmbedError::Behind { .. } | EmbedError::TokenizerBusy | EmbedError::Overloaded(_) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, message)
            }
            EmbedError::Starting
            | EmbedError::Stopped
            | EmbedError::Supervisor(SupervisorError::Unavailable { .. })
            | EmbedError::Supervisor(SupervisorError::Escalated(_)) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message)
            }
            EmbedError::Supervisor(SupervisorError::DeadlineExceeded(_)) => {
                ApiError::new(StatusCode::GATEWAY_TIMEOUT, message)
            }
            EmbedError::Supervisor(SupervisorError::Refused(_)) => {
                ApiError::new(StatusCode::BAD_GATEWAY, message)
            }
            EmbedError::ShutDown => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message),
            EmbedError::Counts { .. } | EmbedError::TokenizerFailed(_) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
            }
        };
        ApiError {
            retry_after,
            ..error
        }
    }
}

/// The body as a JSON object.
///
/// # Errors
/// 400 if it is not JSON or not an object; 413 past the body limit.
pub fn object(
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Map<String, Value>, ApiError> {
    let body = body.map_err(|e| {
        let status = e.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(status, format!("the request body is too large: {e}"))
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("cannot read the request body: {e}"),
            )
        }
    })?;
    let values = json_values(&body);
    if values > crate::limits::SERVE_MAX_BODY_JSON_VALUES {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the body holds {values} JSON values; at most {} are read (limits::SERVE_MAX_BODY_JSON_VALUES)",
                crate::limits::SERVE_MAX_BODY_JSON_VALUES
            ),
        ));
    }
    match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the body must be a JSON object, not {}", kind(&other)),
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the body is not valid JSON: {e}"),
        )),
    }
}

/// An upper bound on the JSON values in `body`, counted before it is
/// parsed: one more than its commas, colons and opening brackets outside
/// strings. Parsing builds a `Value` (tens of bytes) for each, so a body of
/// empty arrays would cost many times its size; the count bounds that.
pub fn json_values(body: &[u8]) -> usize {
    let (mut count, mut in_string, mut escaped) = (1usize, false, false);
    for &b in body {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
        } else {
            match b {
                b'"' => in_string = true,
                b',' | b':' | b'[' | b'{' => count += 1,
                _ => {}
            }
        }
    }
    count
}

/// A JSON value's kind, for messages.
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A string or an array of strings (`input`, `inputs`).
///
/// # Errors
/// 400 naming `field` if it is missing or of another type.
pub fn texts(map: &Map<String, Value>, field: &str) -> Result<Vec<String>, ApiError> {
    match map.get(field) {
        None | Some(Value::Null) => Err(ApiError::bad(field, format!("`{field}` is required"))),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                Value::Number(_) | Value::Array(_) => Err(ApiError::bad(
                    field,
                    format!(
                        "`{field}[{i}]` is {}: token arrays are not accepted, send text",
                        kind(v)
                    ),
                )),
                other => Err(ApiError::bad(
                    field,
                    format!("`{field}[{i}]` must be a string, not {}", kind(other)),
                )),
            })
            .collect(),
        Some(other) => Err(ApiError::bad(
            field,
            format!(
                "`{field}` must be a string or an array of strings, not {}",
                kind(other)
            ),
        )),
    }
}

/// An optional boolean field.
///
/// # Errors
/// 400 naming `field` if it is not a boolean.
pub fn boolean(map: &Map<String, Value>, field: &str, default: bool) -> Result<bool, ApiError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(ApiError::bad(
            field,
            format!("`{field}` must be a boolean, not {}", kind(other)),
        )),
    }
}

/// An optional string field.
///
/// # Errors
/// 400 naming `field` if it is not a string.
pub fn string<'a>(map: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>, ApiError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(ApiError::bad(
            field,
            format!("`{field}` must be a string, not {}", kind(other)),
        )),
    }
}

/// An optional non-negative integer field.
///
/// # Errors
/// 400 naming `field` if it is not a non-negative integer.
pub fn integer(map: &Map<String, Value>, field: &str) -> Result<Option<u64>, ApiError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| {
            ApiError::bad(
                field,
                format!("`{field}` must be a non-negative integer, not {n}"),
            )
        }),
        Some(other) => Err(ApiError::bad(
            field,
            format!("`{field}` must be an integer, not {}", kind(other)),
        )),
    }
}

#[cfg(test)]
mod json_value_tests {
    use super::json_values;

    #[test]
    fn values_are_counted_outside_strings_only_and_bound_the_real_count() {
        assert_eq!(json_values(br#"{"a":[1,2,3]}"#), 6); // 5 values
        assert_eq!(json_values(br#"{"a":"x,y:[z{"}"#), 3); // 2 values
        assert_eq!(json_values(br#"{"a":"q\",[,"}"#), 3); // an escaped quote
        let flood = format!("{{\"input\":[{}]}}", vec!["[]"; 300_000].join(","));
        assert!(json_values(flood.as_bytes()) > crate::limits::SERVE_MAX_BODY_JSON_VALUES);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{ErrorCode, RemoteError};

    fn map(json: Value) -> Map<String, Value> {
        let Value::Object(map) = json else {
            panic!("not an object: {json}")
        };
        map
    }

    fn body(text: &str) -> Result<axum::body::Bytes, axum::extract::rejection::BytesRejection> {
        Ok(axum::body::Bytes::copy_from_slice(text.as_bytes()))
    }

    #[test]
    fn each_batch_error_has_its_status_and_a_retry_only_where_one_helps() {
        let cases = [
            (
                EmbedError::Overloaded(5),
                StatusCode::TOO_MANY_REQUESTS,
                Some(crate::limits::SERVE_RETRY_AFTER),
            ),
            (
                EmbedError::Stopped,
                StatusCode::SERVICE_UNAVAILABLE,
                Some(crate::limits::SERVE_RETRY_AFTER),
            ),
            (
                EmbedError::Supervisor(SupervisorError::Unavailable {
                    reason: "crashes".into(),
                    retry_after: Duration::from_secs(7),
                }),
                StatusCode::SERVICE_UNAVAILABLE,
                Some(Duration::from_secs(7)),
            ),
            (
                EmbedError::Supervisor(SupervisorError::DeadlineExceeded(Duration::from_secs(2))),
                StatusCode::GATEWAY_TIMEOUT,
                None,
            ),
            (
                EmbedError::Supervisor(SupervisorError::Escalated("no instance".into())),
                StatusCode::SERVICE_UNAVAILABLE,
                None,
            ),
            (
                EmbedError::Supervisor(SupervisorError::Refused(RemoteError::new(
                    ErrorCode::Failed,
                    "the plugin said no",
                ))),
                StatusCode::BAD_GATEWAY,
                None,
            ),
        ];
        for (error, status, retry) in cases {
            let message = error.to_string();
            let api = ApiError::from(error);
            assert_eq!((api.status, api.retry_after), (status, retry), "{message}");
            assert_eq!(api.message, message);
        }
        let response = ApiError::from(EmbedError::Supervisor(SupervisorError::Unavailable {
            reason: "crashes".into(),
            retry_after: Duration::from_secs(7),
        }))
        .into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "7");
    }

    #[test]
    fn a_body_that_is_json_but_no_object_is_400_naming_what_it_is() {
        for (text, what) in [
            ("[1]", "an array"),
            ("null", "null"),
            ("true", "a boolean"),
            ("3", "a number"),
            ("\"s\"", "a string"),
        ] {
            let err = object(body(text)).unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{text}");
            assert_eq!(
                err.message,
                format!("the body must be a JSON object, not {what}")
            );
        }
        assert_eq!(object(body(r#"{"a":1}"#)).unwrap()["a"], 1);
    }

    #[test]
    fn a_body_of_too_many_values_is_413_before_it_is_parsed() {
        let flood = format!("{{\"input\":[{}]}}", vec!["0"; 300_000].join(","));
        let err = object(body(&flood)).unwrap_err();
        assert_eq!(err.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(
            err.message.contains("SERVE_MAX_BODY_JSON_VALUES")
                && err
                    .message
                    .contains(&json_values(flood.as_bytes()).to_string()),
            "{}",
            err.message
        );
    }

    #[tokio::test]
    async fn a_body_that_cannot_be_read_is_400_and_one_past_the_limit_is_413() {
        use axum::extract::FromRequest;
        let broken =
            axum::body::Body::from_stream(futures::stream::iter([Err::<axum::body::Bytes, _>(
                std::io::Error::other("the peer went away"),
            )]));
        let request = axum::http::Request::new(broken);
        let rejection = axum::body::Bytes::from_request(request, &()).await;
        let err = object(rejection).unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert!(
            err.message.starts_with("cannot read the request body"),
            "{}",
            err.message
        );
        // axum's own default limit (2 MB), without a layer setting another.
        let large = axum::http::Request::new(axum::body::Body::from(vec![b' '; 3 << 20]));
        let rejection = axum::body::Bytes::from_request(large, &()).await;
        let err = object(rejection).unwrap_err();
        assert_eq!(err.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(
            err.message.starts_with("the request body is too large"),
            "{}",
            err.message
        );
    }

    #[test]
    fn an_input_that_is_not_text_is_refused_naming_its_index_and_kind() {
        for (item, what) in [
            (json!(true), "a boolean"),
            (json!(null), "null"),
            (json!({}), "an object"),
        ] {
            let err = texts(&map(json!({ "input": ["a", item] })), "input").unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST);
            assert_eq!(err.param.as_deref(), Some("input"));
            assert_eq!(
                err.message,
                format!("`input[1]` must be a string, not {what}")
            );
        }
    }

    #[test]
    fn a_string_or_integer_field_of_another_type_is_refused_naming_it() {
        let fields = map(json!({
            "s": "x", "n": 3, "neg": -1, "frac": 1.5, "text": "3", "none": null
        }));
        assert_eq!(string(&fields, "s").unwrap(), Some("x"));
        assert_eq!(string(&fields, "none").unwrap(), None);
        let err = string(&fields, "n").unwrap_err();
        assert_eq!(err.param.as_deref(), Some("n"));
        assert_eq!(err.message, "`n` must be a string, not a number");

        assert_eq!(integer(&fields, "n").unwrap(), Some(3));
        assert_eq!(integer(&fields, "missing").unwrap(), None);
        for (field, message) in [
            ("neg", "`neg` must be a non-negative integer, not -1"),
            ("frac", "`frac` must be a non-negative integer, not 1.5"),
            ("text", "`text` must be an integer, not a string"),
        ] {
            let err = integer(&fields, field).unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST);
            assert_eq!(err.param.as_deref(), Some(field));
            assert_eq!(err.message, message);
        }
    }
}
