use super::*;

#[test]
fn settings_round_trip_through_the_childs_table() {
    let settings = OnnxSettings {
        model_dir: "/models/m".into(),
        library: "/lib/libonnxruntime.so".into(),
        threads: 3,
        max_tokens: Some(128),
        model_id: Some("m".into()),
        model_file: Some(INT8_MODEL_FILE.into()),
        pooling: Default::default(),
        normalize: true,
    };
    assert_eq!(
        OnnxSettings::from_pairs(&settings.to_pairs()).unwrap(),
        settings
    );
    let cls = OnnxSettings {
        pooling: embedhost_text::Pooling::Cls,
        normalize: false,
        ..settings.clone()
    };
    assert_eq!(OnnxSettings::from_pairs(&cls.to_pairs()).unwrap(), cls);
    for (key, bad) in [("pooling", "mean_sqrt_len"), ("normalize", "yes")] {
        let pairs = [
            ("model_dir".to_string(), "/m".to_string()),
            ("onnxruntime".to_string(), "/lib/x.so".to_string()),
            (key.to_string(), bad.to_string()),
        ];
        let err = OnnxSettings::from_pairs(&pairs).unwrap_err().to_string();
        assert!(err.contains(key) && err.contains(bad), "{err}");
    }
    assert_eq!(
        settings.model_path(),
        Path::new("/models/m/model.int8.onnx")
    );
    for bad in ["../m.onnx", "", "/etc/passwd"] {
        let pairs = [
            ("model_dir".to_string(), "/m".to_string()),
            ("model_file".to_string(), bad.to_string()),
        ];
        let err = OnnxSettings::from_pairs(&pairs).unwrap_err().to_string();
        assert!(err.contains("model_file"), "{err}");
    }
}

/// A minimal protobuf writer: just what an ONNX model file needs.
mod pb {
    fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    pub fn int(field: u64, v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        varint(&mut out, field << 3);
        varint(&mut out, v);
        out
    }

    pub fn bytes(field: u64, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        varint(&mut out, (field << 3) | 2);
        varint(&mut out, data.len() as u64);
        out.extend_from_slice(data);
        out
    }

    /// A `ValueInfoProto` of a tensor of `elem` (1 float, 7 int64) with
    /// symbolic dimensions.
    pub fn tensor(name: &str, elem: u64, dims: &[&str]) -> Vec<u8> {
        let shape: Vec<u8> = dims
            .iter()
            .flat_map(|d| bytes(1, &bytes(2, d.as_bytes())))
            .collect();
        let tensor_type = [int(1, elem), bytes(2, &shape)].concat();
        [bytes(1, name.as_bytes()), bytes(2, &bytes(1, &tensor_type))].concat()
    }
}

/// An ONNX model whose output `sentence_embedding` ([batch, sequence])
/// is `input_ids` cast to float: an already pooled output whose
/// dimension is the text's length in tokens.
fn pooled_ids_model() -> Vec<u8> {
    let to_float = [pb::bytes(1, b"to"), pb::int(3, 1), pb::int(20, 2)].concat();
    let node = [
        pb::bytes(1, b"input_ids"),
        pb::bytes(2, b"sentence_embedding"),
        pb::bytes(4, b"Cast"),
        pb::bytes(5, &to_float),
    ]
    .concat();
    let graph = [
        pb::bytes(1, &node),
        pb::bytes(2, b"pooled"),
        pb::bytes(11, &pb::tensor("input_ids", 7, &["batch", "sequence"])),
        pb::bytes(
            12,
            &pb::tensor("sentence_embedding", 1, &["batch", "sequence"]),
        ),
    ]
    .concat();
    [
        pb::int(1, 7),
        pb::bytes(8, &pb::int(2, 13)),
        pb::bytes(7, &graph),
    ]
    .concat()
}

/// A word-level tokenizer: [CLS]=1, [SEP]=2, [UNK]=3, then the words.
fn tokenizer_json() -> String {
    crate::test_support::word_level_tokenizer(&["hello", "world", "cats", "dogs"])
}

fn unit(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / norm).collect()
}

fn assert_close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{got:?} != {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "{got:?} != {want:?}");
    }
}

/// ONNX Runtime allows one environment per process: the only test of
/// this binary that loads an engine.
#[test]
fn a_pooled_output_is_normalized_per_row_and_a_dimension_that_varies_is_refused() {
    let library = resolve_library(None).unwrap();
    assert_eq!(resolve_library(Some(&library)).unwrap(), library);
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("pooled-ids");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join(DEFAULT_MODEL_FILE), pooled_ids_model()).unwrap();
    std::fs::write(dir.join(TOKENIZER_FILE), tokenizer_json()).unwrap();
    let settings = OnnxSettings {
        model_dir: dir.clone(),
        library,
        threads: 1,
        max_tokens: Some(16),
        model_id: None,
        model_file: None,
        pooling: Default::default(),
        normalize: true,
    };
    let mut engine = OnnxEngine::load(&settings).unwrap();
    // One ONNX Runtime environment per process: a second engine is
    // refused, naming the library (a child serves one engine).
    let err = OnnxEngine::load(&settings).unwrap_err().to_string();
    assert!(
        err.starts_with("cannot start ONNX Runtime from")
            && err.contains(&settings.library.display().to_string()),
        "{err}"
    );
    let info = engine.model_info();
    assert_eq!(info.model_id, "pooled-ids", "the directory's name");
    assert_eq!(info.max_input_tokens, 16);
    // Learnt from the test embedding: [CLS] embedhost [SEP].
    assert_eq!(info.dimension, 3);
    assert!(format!("{engine:?}").contains("pooled-ids"));
    assert_eq!(engine.embed(&[], false).unwrap().len(), 0);
    let texts = ["cats".to_string(), "dogs".to_string()];
    let vectors = engine.embed(&texts, false).unwrap();
    assert_close(vectors.get(0).unwrap(), &unit(&[1.0, 6.0, 2.0]));
    assert_close(vectors.get(1).unwrap(), &unit(&[1.0, 7.0, 2.0]));
    // A four-token text makes rows of four: not the dimension served.
    let err = engine
        .embed(&["cats".to_string(), "hello world".to_string()], false)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("8 values for 2 texts of dimension 3"),
        "{err}"
    );
    // Refused as a whole batch, as the host's protocol reports it.
    let remote: crate::bus::RemoteError = err.into();
    assert_eq!(remote.code, crate::bus::ErrorCode::Failed);
}

#[test]
fn a_bad_setting_is_named() {
    let pairs = |key: &str, value: &str| {
        [
            ("model_dir".to_string(), "/m".to_string()),
            ("onnxruntime".to_string(), "/lib.so".to_string()),
            (key.to_string(), value.to_string()),
        ]
    };
    for (key, value, words) in [
        (
            "threads",
            "0",
            "`threads`: `0` is not a positive whole number",
        ),
        ("max_tokens", "many", "`max_tokens`: `many`"),
        ("gpu", "yes", "unknown onnx engine setting `gpu`"),
    ] {
        let err = OnnxSettings::from_pairs(&pairs(key, value))
            .unwrap_err()
            .to_string();
        assert!(err.contains(words), "{err}");
    }
    // Without `onnxruntime`, the library is looked for.
    let found =
        OnnxSettings::from_pairs(&[("model_dir".to_string(), "/m".to_string())]).map(|s| s.library);
    assert_eq!(
        found.map_err(|e| e.to_string()),
        resolve_library(None).map_err(|e| e.to_string())
    );
}
