//! The CLI's way to a running `embedhost serve`: HTTP over the owner-only
//! Unix socket in the index directory.
//!
//! [`Client::find`] answers only if a live service holds the socket (it
//! answers `/health` within [`limits::SERVE_SOCKET_CONNECT_TIMEOUT`]); a
//! socket left by a dead service is not a service. Answers are bounded
//! ([`MAX_ANSWER_BYTES`]) even from our own server.

use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::body::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::limits;

/// Largest answer the client reads: 2048 vectors of 4096 floats as JSON.
pub const MAX_ANSWER_BYTES: usize = 256 * 1024 * 1024;

/// Errors talking to the service.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("cannot reach the service at `{path}`: {message}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The service answered with an error.
    #[error("the service answered {status}: {message}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// Its error message.
        message: String,
    },
}

/// A running service's socket.
#[derive(Clone, Debug)]
pub struct Client {
    path: PathBuf,
}

impl Client {
    /// The service serving the index in `db`, if one runs.
    pub async fn find(db: &Path) -> Option<Client> {
        let client = Client {
            path: super::socket_path(db),
        };
        if !client.path.exists() {
            return None;
        }
        let probe = client.get("/health");
        match tokio::time::timeout(limits::SERVE_SOCKET_CONNECT_TIMEOUT, probe).await {
            Ok(Ok(_)) => Some(client),
            _ => None,
        }
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `GET path`.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.call("GET", path, None, None).await
    }

    /// `POST path` with a JSON body, under `deadline` (sent as the
    /// service's deadline header) if given.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn post(
        &self,
        path: &str,
        body: &Value,
        deadline: Option<Duration>,
    ) -> Result<Value, ClientError> {
        self.call("POST", path, Some(body), deadline).await
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        deadline: Option<Duration>,
    ) -> Result<Value, ClientError> {
        let connect = |e: &dyn std::fmt::Display| ClientError::Connect {
            path: self.path.clone(),
            message: e.to_string(),
        };
        let stream = tokio::net::UnixStream::connect(&self.path)
            .await
            .map_err(|e| connect(&e))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| connect(&e))?;
        tokio::spawn(connection);
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::CONTENT_TYPE, "application/json");
        if let Some(d) = deadline {
            request = request.header(super::DEADLINE_HEADER, d.as_millis().to_string());
        }
        let request = request
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| connect(&e))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| connect(&e))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| connect(&e))?
            .to_bytes();
        let value: Value = serde_json::from_slice(&body).map_err(|e| connect(&e))?;
        if status.is_success() {
            return Ok(value);
        }
        let message = match &value["error"] {
            Value::String(s) => s.clone(),
            Value::Object(o) => o
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            other => other.to_string(),
        };
        Err(ClientError::Status {
            status: status.as_u16(),
            message,
        })
    }
}
