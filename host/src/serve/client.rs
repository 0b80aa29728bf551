//! The CLI's way to a running `embedhost serve`: HTTP over the owner-only
//! Unix socket in the index directory.
//!
//! [`Client::find`] answers only if a live service holds the socket (it
//! answers `/health` within [`limits::SERVE_SOCKET_CONNECT_TIMEOUT`]); a
//! socket left by a dead service is not a service. Answers are bounded
//! ([`MAX_ANSWER_BYTES`]) even from our own server, and so is the wait for
//! them: the request's deadline plus [`limits::SERVE_CLIENT_ANSWER_GRACE`]
//! ([`ClientError::Timeout`]).

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
    /// The service did not answer within the request's deadline and
    /// [`limits::SERVE_CLIENT_ANSWER_GRACE`].
    #[error("the service at `{path}` did not answer within {waited:?}")]
    Timeout {
        /// The socket.
        path: PathBuf,
        /// How long the client waited.
        waited: Duration,
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

    /// One request, waited for at most its deadline (else the longest a
    /// service may give one) plus [`limits::SERVE_CLIENT_ANSWER_GRACE`].
    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        deadline: Option<Duration>,
    ) -> Result<Value, ClientError> {
        let waited = deadline.unwrap_or(limits::SERVE_MAX_REQUEST_DEADLINE)
            + limits::SERVE_CLIENT_ANSWER_GRACE;
        tokio::time::timeout(waited, self.exchange(method, path, body, deadline))
            .await
            .map_err(|_| ClientError::Timeout {
                path: self.path.clone(),
                waited,
            })?
    }

    async fn exchange(
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixListener;

    /// A socket in a new directory, with a server that answers every
    /// connection with `answer` (raw HTTP), or never if it is `None`.
    fn server(answer: Option<&'static str>) -> (tempfile::TempDir, Client) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = [0u8; 4096];
                    let _ = stream.read(&mut request).await;
                    match answer {
                        Some(a) => {
                            let _ = stream.write_all(a.as_bytes()).await;
                        }
                        // Holds the connection open, answering nothing.
                        None => std::future::pending::<()>().await,
                    }
                });
            }
        });
        (dir, Client { path })
    }

    fn http(status: &str, body: &str) -> &'static str {
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .leak()
    }

    #[tokio::test]
    async fn no_socket_or_a_dead_ones_file_is_no_service() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Client::find(dir.path()).await.is_none());
        // A socket file left by a service that is gone.
        let path = super::super::socket_path(dir.path());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        assert!(Client::find(dir.path()).await.is_none());
    }

    #[tokio::test]
    async fn answers_and_errors_of_each_shape_are_read() {
        let (_d, ok) = server(Some(http("200 OK", r#"{"status":"ok"}"#)));
        assert_eq!(ok.get("/health").await.unwrap()["status"], "ok");
        assert!(ok.path().ends_with("s.sock"));
        let body = serde_json::json!({ "texts": ["a"] });
        let deadline = Some(Duration::from_secs(1));
        assert!(ok.post("/embedhost/embed", &body, deadline).await.is_ok());
        for (answer, message) in [
            (r#"{"error":"plain"}"#, "plain"),
            (r#"{"error":{"message":"openai shaped"}}"#, "openai shaped"),
            (r#"{"error":7}"#, "7"),
        ] {
            let (_d, c) = server(Some(http("400 Bad Request", answer)));
            match c.get("/x").await {
                Err(ClientError::Status {
                    status: 400,
                    message: m,
                }) => assert_eq!(m, message),
                other => panic!("{answer}: {other:?}"),
            }
        }
        // Not JSON, or cut off: one error naming the socket.
        for answer in [
            http("200 OK", "not json"),
            "HTTP/1.1 200 OK\r\ncontent-length: 99\r\n\r\n{",
        ] {
            let (_d, c) = server(Some(answer));
            let e = c.get("/x").await.unwrap_err();
            assert!(matches!(e, ClientError::Connect { .. }), "{e:?}");
            assert!(e.to_string().contains("s.sock"), "{e}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_service_that_never_answers_fails_the_call_after_its_deadline_and_grace() {
        let (_d, c) = server(None);
        let body = serde_json::json!({});
        let started = tokio::time::Instant::now();
        let waited = Duration::from_secs(2) + limits::SERVE_CLIENT_ANSWER_GRACE;
        // A guard on the paused clock: a client with no bound fails here.
        let call = c.post("/search", &body, Some(Duration::from_secs(2)));
        let e = tokio::time::timeout(waited * 2, call)
            .await
            .expect("the client waits without a bound")
            .unwrap_err();
        assert!(
            matches!(e, ClientError::Timeout { waited: w, .. } if w == waited),
            "{e:?}"
        );
        assert_eq!(started.elapsed(), waited);
        // With no deadline, the longest a service may take, plus the grace.
        let e = tokio::time::timeout(limits::SERVE_MAX_REQUEST_DEADLINE * 2, c.get("/index"))
            .await
            .expect("the client waits without a bound")
            .unwrap_err();
        assert!(e.to_string().contains("did not answer"), "{e}");
    }
}
