//! The child-process transport: frames over a byte stream (tested on
//! in-memory pipes with hostile peers) and a real child process.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use embedhost::bus::transport::child::{self, ChildProcess, Connection, Frame, FrameCodec};
use embedhost::bus::{Bus, BusError, Empty, ErrorCode, RemoteError, Router, SendOptions};
use embedhost::messages::*;
use embedhost::vectors::Vectors;
use embedhost_stub_engine::{StubConfig, StubEngine};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio_util::codec::{FramedRead, FramedWrite};

const MAX: usize = 64 * 1024;

/// A client connection and the server's ends of its pipes.
fn pipes(max_frame: usize) -> (Connection, DuplexStream, DuplexStream) {
    let (client_out, server_in) = tokio::io::duplex(1 << 20);
    let (server_out, client_in) = tokio::io::duplex(1 << 20);
    (
        Connection::new("test-peer", client_in, client_out, max_frame),
        server_in,
        server_out,
    )
}

fn served(router: Router, max_frame: usize) -> Bus {
    let (conn, server_in, server_out) = pipes(max_frame);
    tokio::spawn(child::serve_stream(
        router, server_in, server_out, max_frame,
    ));
    Bus::new(conn)
}

fn echo_router() -> Router {
    let mut router = Router::new();
    router.handle::<EmbedderEmbed, _, _>(|_, req: EmbedRequest| async move {
        let data: Vec<f32> = req.texts.iter().map(|t| t.len() as f32).collect();
        Ok(EmbedResponse::complete(Vectors::new(1, data).unwrap()))
    });
    router
}

#[tokio::test]
async fn requests_round_trip_as_cbor_frames() {
    let bus = served(echo_router(), MAX);
    let r = bus
        .request::<EmbedderEmbed>(EmbedRequest {
            texts: vec!["ab".into(), "abcd".into()],
            is_query: true,
        })
        .await
        .unwrap();
    assert_eq!(r.vectors.as_flat(), &[2.0, 4.0]);
    // Errors travel typed.
    let err = bus.request::<EmbedderHealth>(Empty {}).await.unwrap_err();
    assert!(
        matches!(
            &err,
            BusError::Remote(RemoteError {
                code: ErrorCode::NoHandler,
                ..
            })
        ),
        "{err}"
    );
}

#[tokio::test]
async fn dropping_the_callers_future_cancels_the_handler_across_the_stream() {
    let dropped = Arc::new(AtomicBool::new(false));
    let flag = dropped.clone();
    let mut router = Router::new();
    router.handle::<EmbedderHealth, _, _>(move |_, _| {
        let flag = flag.clone();
        async move {
            let _guard = crate::DropFlag(flag);
            std::future::pending::<Result<HealthResponse, RemoteError>>().await
        }
    });
    let bus = served(router, MAX);
    let err = bus
        .send::<EmbedderHealth>(
            Empty {},
            SendOptions::default().timeout(Duration::from_millis(50)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, BusError::Timeout { .. }));
    for _ in 0..200 {
        if dropped.load(Ordering::SeqCst) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the peer never dropped the cancelled handler");
}

/// A peer that ignores cancellation: it answers the first request only after
/// the second arrives, then answers the second.
#[tokio::test]
async fn a_late_reply_is_dropped_and_never_reaches_another_caller() {
    let (conn, server_in, server_out) = pipes(MAX);
    let peer = tokio::spawn(async move {
        let mut reader = FramedRead::new(server_in, FrameCodec::new(MAX));
        let mut writer = FramedWrite::new(server_out, FrameCodec::new(MAX));
        let mut requests = Vec::new();
        while requests.len() < 2 {
            let bytes = reader.next().await.unwrap().unwrap();
            if let Frame::Request { id, .. } =
                ciborium::from_reader::<Frame, _>(&bytes[..]).unwrap()
            {
                requests.push(id);
            }
        }
        for (id, processed) in [(requests[0], 111), (requests[1], 222)] {
            let mut body = Vec::new();
            ciborium::into_writer(
                &HealthResponse {
                    memory: 0,
                    processed_count: processed,
                },
                &mut body,
            )
            .unwrap();
            let mut frame = Vec::new();
            ciborium::into_writer(
                &Frame::Response {
                    id,
                    result: Ok(serde_bytes::ByteBuf::from(body)),
                },
                &mut frame,
            )
            .unwrap();
            writer.send(Bytes::from(frame)).await.unwrap();
        }
    });
    let bus = Bus::new(conn);
    let first = bus
        .send::<EmbedderHealth>(
            Empty {},
            SendOptions::default().timeout(Duration::from_millis(20)),
        )
        .await;
    assert!(matches!(first, Err(BusError::Timeout { .. })));
    let second = bus.request::<EmbedderHealth>(Empty {}).await.unwrap();
    assert_eq!(
        second.processed_count, 222,
        "the late reply (111) must not be delivered"
    );
    peer.await.unwrap();
}

#[test]
fn a_frame_arriving_in_pieces_decodes_once_whole() {
    use tokio_util::codec::{Decoder, Encoder};
    let mut codec = FrameCodec::new(MAX);
    let mut wire = bytes::BytesMut::new();
    let payload: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
    codec
        .encode(Bytes::from(payload.clone()), &mut wire)
        .unwrap();
    codec
        .encode(Bytes::from_static(b"second"), &mut wire)
        .unwrap();
    let mut buffer = bytes::BytesMut::new();
    let mut frames = Vec::new();
    for byte in wire {
        buffer.extend_from_slice(&[byte]);
        if let Some(frame) = codec.decode(&mut buffer).unwrap() {
            frames.push(frame.to_vec());
        }
    }
    assert_eq!(frames, vec![payload, b"second".to_vec()]);
    assert!(buffer.is_empty());
}

#[tokio::test]
async fn a_large_response_crosses_the_pipe_in_pieces() {
    let mut router = Router::new();
    router.handle::<EmbedderEmbed, _, _>(|_, _| async {
        Ok(EmbedResponse::complete(
            Vectors::new(384, vec![0.25; 384 * 256]).unwrap(),
        ))
    });
    let bus = served(router, embedhost::limits::MAX_FRAME_BYTES);
    for _ in 0..3 {
        let r = bus
            .request::<EmbedderEmbed>(EmbedRequest {
                texts: vec![],
                is_query: false,
            })
            .await
            .unwrap();
        assert_eq!(r.vectors.len(), 256);
    }
}

#[tokio::test]
async fn an_oversized_request_fails_alone_and_the_connection_stays_up() {
    let bus = served(echo_router(), 1024);
    let big = EmbedRequest {
        texts: vec!["x".repeat(4096)],
        is_query: false,
    };
    let err = bus.request::<EmbedderEmbed>(big).await.unwrap_err();
    assert!(
        matches!(err, BusError::FrameTooLarge { max: 1024, size } if size > 4096),
        "{err}"
    );
    let ok = bus
        .request::<EmbedderEmbed>(EmbedRequest {
            texts: vec!["abc".into()],
            is_query: false,
        })
        .await
        .unwrap();
    assert_eq!(ok.vectors.as_flat(), &[3.0]);
}

#[tokio::test]
async fn an_oversized_response_is_a_typed_remote_error() {
    let mut router = Router::new();
    router.handle::<EmbedderEmbed, _, _>(|_, _| async {
        Ok(EmbedResponse::complete(
            Vectors::new(1, vec![0.5; 4096]).unwrap(),
        ))
    });
    let bus = served(router, 1024);
    let err = bus
        .request::<EmbedderEmbed>(EmbedRequest {
            texts: vec![],
            is_query: false,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            BusError::Remote(RemoteError {
                code: ErrorCode::FrameTooLarge,
                ..
            })
        ),
        "{err}"
    );
}

/// Sends one request, then has the peer write `bytes` instead of an answer;
/// returns the request's error.
async fn answer_with_raw_bytes(bytes: &[u8]) -> (BusError, Connection) {
    let (conn, _server_in, mut server_out) = pipes(MAX);
    let bus = Bus::new(conn.clone());
    let pending = tokio::spawn(async move { bus.request::<EmbedderHealth>(Empty {}).await });
    tokio::time::sleep(Duration::from_millis(10)).await;
    server_out.write_all(bytes).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    (err, conn)
}

#[tokio::test]
async fn a_frame_header_past_the_limit_closes_the_connection_and_fails_pending_requests() {
    // A length prefix claiming 1 GiB: refused before any allocation.
    let (err, conn) = answer_with_raw_bytes(&(1u32 << 30).to_be_bytes()).await;
    assert!(
        matches!(&err, BusError::PeerGone { reason, .. } if reason.contains("exceeds the 65536-byte limit")),
        "{err}"
    );
    assert!(conn.closed_reason().is_some());
}

#[tokio::test]
async fn garbage_on_the_stream_closes_the_connection_with_a_clear_reason() {
    let (err, conn) = answer_with_raw_bytes(&[0, 0, 0, 3, 0xff, 0xfe, 0xfd]).await;
    assert!(
        matches!(&err, BusError::PeerGone { reason, .. } if reason.contains("malformed frame")),
        "{err}"
    );
    assert!(conn.closed_reason().is_some());
}

fn child_command(settings: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_embedhost"));
    cmd.arg("child").arg("--engine").arg("stub");
    for s in settings {
        cmd.arg("--set").arg(s);
    }
    cmd
}

#[tokio::test]
async fn a_real_child_process_serves_the_stub_engine_bit_for_bit() {
    let child = ChildProcess::spawn(child_command(&["dimension=32"]), "stub-child").unwrap();
    let bus = Bus::new(child.connection());
    let texts = vec![
        "hello world".to_string(),
        "Grüße, Welt".to_string(),
        String::new(),
    ];
    let r = bus
        .request::<EmbedderEmbed>(EmbedRequest {
            texts: texts.clone(),
            is_query: false,
        })
        .await
        .unwrap();
    let expected =
        StubEngine::new(StubConfig::from_pairs([("dimension", "32")]).unwrap()).embed(&texts);
    assert_eq!(r.vectors.dimension(), 32);
    assert_eq!(r.vectors.as_flat(), expected.as_slice());
    let health = bus.request::<EmbedderHealth>(Empty {}).await.unwrap();
    assert_eq!(health.processed_count, 3);
}

#[tokio::test]
async fn a_killed_child_fails_requests_in_flight_at_once() {
    // The call hangs the child (its only thread blocks): once a health
    // check goes unanswered, the call is surely in the child's hands.
    let mut child =
        ChildProcess::spawn(child_command(&["child.hang_marker=HANG"]), "hung-child").unwrap();
    let bus = Bus::new(child.connection());
    let probe = bus.clone();
    let pending = tokio::spawn(async move {
        bus.request::<EmbedderEmbed>(EmbedRequest {
            texts: vec!["HANG".into()],
            is_query: false,
        })
        .await
    });
    let hung = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let check = probe.send::<embedhost::messages::EmbedderHealth>(
                embedhost::bus::Empty {},
                embedhost::bus::SendOptions::default()
                    .timeout(Duration::from_millis(200))
                    .retries(0),
            );
            if check.await.is_err() {
                return;
            }
        }
    });
    hung.await.expect("the child never hung on the call");
    child.kill().await.unwrap();
    // The caller's error is the closed pipe, not the bus timeout (30 s)
    // nor anything later: a closed pipe fails every pending call at once.
    let err = tokio::time::timeout(Duration::from_secs(20), pending)
        .await
        .expect("the call in flight was not failed when the child died")
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(&err, BusError::PeerGone { reason, .. } if reason.contains("closed its output")),
        "{err}"
    );
}
