//! Entry points for fuzzing the parsers that read untrusted bytes: frames
//! from a child's stdout, message bodies inside them, config files and
//! model manifests.
//!
//! Each function takes arbitrary bytes and must return without panicking,
//! allocating without bound, or hanging; where the input parses, it also
//! checks a property (a frame re-encodes, a body decodes the same twice).
//! They are driven two ways:
//! - `fuzz/` holds cargo-fuzz targets (coverage-guided, nightly Rust):
//!   `./x fuzz TARGET SECONDS`;
//! - `tests/all/fuzz.rs` replays the committed corpus (`fuzz/corpus/`) and
//!   a bounded run of random mutations on stable Rust, in every test run.
//!
//! Not part of the API: the names and signatures change with the parsers.

use bytes::BytesMut;
use tokio_util::codec::Decoder;

use crate::bus::Body;
use crate::bus::transport::child::{Frame, FrameCodec};
use crate::limits::MAX_FRAME_BYTES;
use crate::messages::{
    EmbedRequest, EmbedResponse, HandshakeResponse, HealthResponse, IndexRequest, InitRequest,
    SearchRequest, SearchResponse, StatsResponse,
};

/// A fuzz target: what it does with one input.
pub type Target = fn(&[u8]);

/// The fuzz targets, by name: what `fuzz/` and the stable replay run.
pub const TARGETS: &[(&str, Target)] = &[
    ("frames", frames),
    ("envelope", envelope),
    ("config", config),
    ("manifest", manifest),
];

/// A byte stream from a child, arriving in pieces: the first byte picks the
/// piece size. Every frame the codec yields is decoded as a [`Frame`]; a
/// frame that decodes must encode again, and its request body is decoded
/// as the messages a child receives.
pub fn frames(data: &[u8]) {
    let Some((&step, stream)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    // A small limit, so the fuzzer also reaches the oversized path.
    let mut codec = FrameCodec::new(if step % 2 == 0 { 64 } else { MAX_FRAME_BYTES });
    let mut buffer = BytesMut::new();
    for piece in stream.chunks(step) {
        buffer.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buffer) {
                Ok(Some(frame)) => {
                    let Ok(frame) = ciborium::from_reader::<Frame, _>(frame.as_ref()) else {
                        continue;
                    };
                    let mut again = Vec::new();
                    ciborium::into_writer(&frame, &mut again).expect("a decoded frame encodes");
                    if let Frame::Request { body, .. } = frame {
                        envelope(&body);
                    }
                }
                Ok(None) => break,
                // The connection closes on any frame error: nothing more is read.
                Err(_) => return,
            }
        }
    }
}

/// A message body, as a peer's router decodes it: every request and
/// response type that crosses a process boundary.
pub fn envelope(data: &[u8]) {
    fn decode<T: serde::de::DeserializeOwned + 'static>(data: &[u8]) {
        let body = || Body::Encoded(bytes::Bytes::copy_from_slice(data));
        let first = body().decode::<T>("fuzz").is_ok();
        assert_eq!(
            first,
            body().decode::<T>("fuzz").is_ok(),
            "decoding is pure"
        );
    }
    decode::<EmbedRequest>(data);
    decode::<EmbedResponse>(data);
    decode::<HandshakeResponse>(data);
    decode::<HealthResponse>(data);
    decode::<InitRequest>(data);
    decode::<IndexRequest>(data);
    decode::<SearchRequest>(data);
    decode::<SearchResponse>(data);
    decode::<StatsResponse>(data);
    if let Ok(response) =
        Body::Encoded(bytes::Bytes::copy_from_slice(data)).decode::<EmbedResponse>("fuzz")
    {
        // Whatever decodes is well-shaped: rows of the stated dimension.
        let v = &response.vectors;
        assert_eq!(v.iter().count(), v.len());
        assert!(v.iter().all(|row| row.len() == v.dimension()));
    }
}

/// A config file.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) =
        crate::config::Config::parse(text, std::path::Path::new("/fuzz/embedhost.toml"))
    {
        // What the host derives from a config must not panic either.
        let _ = config.supervisor_config();
        let _ = config.instance_limits();
        let _ = crate::worker::WorkerSettings::from_config(&config);
        let _ = config.plugin_config();
    }
}

/// A model manifest.
pub fn manifest(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = crate::model::Manifest::parse(text, "fuzz");
}
