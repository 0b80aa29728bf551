//! Tests of `describe.rs`: fixtures in the layouts of real
//! sentence-transformers models, and each refusal.

use std::path::Path;

use serde_json::{Value, json};

use super::{DescribeError, Description, Pooling, Problem, describe};

const TRANSFORMER: &str = "sentence_transformers.models.Transformer";
const POOLING: &str = "sentence_transformers.models.Pooling";
const NORMALIZE: &str = "sentence_transformers.models.Normalize";

const POOLING_CONFIG: &str = "1_Pooling/config.json";
const ST_CONFIG: &str = "config_sentence_transformers.json";
const BERT_CONFIG: &str = "sentence_bert_config.json";

fn modules(types: &[&str]) -> Value {
    let paths = ["", "1_Pooling", "2_Normalize", "3_Other"];
    let entries: Vec<Value> = types
        .iter()
        .enumerate()
        .map(|(i, kind)| json!({"idx": i, "name": i.to_string(), "path": paths[i], "type": kind}))
        .collect();
    Value::Array(entries)
}

/// A Pooling config with the flags sentence-transformers writes, `mode`
/// (`cls` or `mean`, else none) set.
fn pooling(mode: &str, dimension: usize) -> Value {
    json!({
        "word_embedding_dimension": dimension,
        "pooling_mode_cls_token": mode == "cls",
        "pooling_mode_mean_tokens": mode == "mean",
        "pooling_mode_max_tokens": false,
        "pooling_mode_mean_sqrt_len_tokens": false,
    })
}

/// all-MiniLM-L6-v2's `config.json`, with `layers` layers.
fn bert_config(layers: usize) -> Value {
    json!({
        "_name_or_path": "nreimers/MiniLM-L6-H384-uncased",
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": 384,
        "initializer_range": 0.02,
        "intermediate_size": 1536,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 512,
        "model_type": "bert",
        "num_attention_heads": 12,
        "num_hidden_layers": layers,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "transformers_version": "4.8.2",
        "type_vocab_size": 2,
        "use_cache": true,
        "vocab_size": 30522
    })
}

/// `bert_config(6)` with `key` set to `value`.
fn bert_with(key: &str, value: Value) -> Value {
    let mut config = bert_config(6);
    config[key] = value;
    config
}

/// A model directory in a temporary directory.
struct Model(tempfile::TempDir);

impl Model {
    /// The all-MiniLM-L6-v2 layout: mean pooling, Normalize, 256 tokens.
    fn minilm() -> Model {
        let model = Model(tempfile::tempdir().unwrap());
        model
            .set("modules.json", modules(&[TRANSFORMER, POOLING, NORMALIZE]))
            .set(POOLING_CONFIG, pooling("mean", 384))
            .set(
                BERT_CONFIG,
                json!({"max_seq_length": 256, "do_lower_case": false}),
            )
            .set("config.json", bert_config(6))
            .set(
                ST_CONFIG,
                json!({"__version__": {"sentence_transformers": "2.0.0"}}),
            )
            .set("tokenizer.json", json!({"version": "1.0"}));
        std::fs::create_dir_all(model.path().join("2_Normalize")).unwrap();
        model
    }

    fn path(&self) -> &Path {
        self.0.path()
    }

    /// Writes `value` as the file `name`.
    fn set(&self, name: &str, value: Value) -> &Self {
        self.set_text(name, &serde_json::to_string_pretty(&value).unwrap())
    }

    /// Writes `config_sentence_transformers.json` with these prompts.
    fn prompts(&self, prompts: Value, default: Option<&str>) -> &Self {
        let config = json!({"prompts": prompts, "default_prompt_name": default});
        self.set(ST_CONFIG, config)
    }

    fn set_text(&self, name: &str, text: &str) -> &Self {
        let path = self.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
        self
    }

    fn remove(&self, name: &str) -> &Self {
        std::fs::remove_file(self.path().join(name)).unwrap();
        self
    }

    fn describe(&self) -> Description {
        describe(self.path()).unwrap()
    }

    /// The refusal, which must name `file` (the model's directory for "")
    /// and each of `words`.
    fn refused(&self, file: &str, words: &[&str]) -> DescribeError {
        let error = describe(self.path()).expect_err("the model must be refused");
        let text = error.to_string();
        let path = if file.is_empty() {
            self.path().to_path_buf()
        } else {
            self.path().join(file)
        };
        assert_eq!(error.path, path, "{text}");
        assert!(text.contains(&format!("{path:?}")), "{text}");
        for word in words {
            assert!(text.contains(word), "{word:?} not in {text}");
        }
        error
    }
}

#[test]
fn all_minilm_l6_v2() {
    let model = Model::minilm();
    let d = model.describe();
    assert_eq!(d.pooling(), Pooling::Mean);
    assert!(d.normalize());
    assert_eq!(d.max_seq_length(), 256);
    assert_eq!(d.dimension(), 384);
    assert!(!d.do_lower_case());
    let shape = d.shape();
    let sizes = (shape.num_hidden_layers, shape.num_attention_heads);
    assert_eq!(sizes, (6, 12));
    assert_eq!((shape.intermediate_size, shape.vocab_size), (1536, 30522));
    let sizes = (shape.max_position_embeddings, shape.type_vocab_size);
    assert_eq!(sizes, (512, 2));
    assert_eq!(shape.layer_norm_eps, 1e-12);
    assert_eq!(d.transformer_dir(), model.path());
    assert_eq!(d.tokenizer(), model.path().join("tokenizer.json"));
    assert_eq!(d.prompt(true), None);
    assert_eq!(d.form().apply("hello".into(), true), "hello");
    assert_eq!(d.form().apply("hello".into(), false), "hello");
}

/// BGE (bge-small-en-v1.5): CLS pooling, Normalize, lowercased, 512 tokens.
#[test]
fn bge_style() {
    let model = Model::minilm();
    model
        .set(POOLING_CONFIG, pooling("cls", 384))
        .set(
            BERT_CONFIG,
            json!({"max_seq_length": 512, "do_lower_case": true}),
        )
        .set(
            ST_CONFIG,
            json!({"prompts": {}, "default_prompt_name": null}),
        );
    let d = model.describe();
    assert_eq!(d.pooling(), Pooling::Cls);
    assert!(d.normalize());
    assert_eq!(d.max_seq_length(), 512);
    assert!(d.do_lower_case());
}

/// E5: a query and a passage take different prefixes.
#[test]
fn e5_style_prompts() {
    let model = Model::minilm();
    let d = model
        .prompts(json!({"query": "query: ", "passage": "passage: "}), None)
        .describe();
    assert_eq!(d.form().apply("how far".into(), true), "query: how far");
    assert_eq!(
        d.form().apply("it is far".into(), false),
        "passage: it is far"
    );
    // "document" is preferred to "passage", as encode_document does.
    let prompts = json!({"query": "q: ", "passage": "p: ", "document": "d: "});
    let d = model.prompts(prompts, None).describe();
    assert_eq!(d.prompt(false), Some("d: "));
    model.set(ST_CONFIG, json!({"prompts": null}));
    assert_eq!(model.describe().prompt(true), None);
}

/// Without a prompt of its kind, a text takes `default_prompt_name`'s; an
/// empty prompt is none.
#[test]
fn default_prompt_name_fallback() {
    let model = Model::minilm();
    let prompts = json!({"query": "query: ", "retrieval": "passage: "});
    let d = model.prompts(prompts, Some("retrieval")).describe();
    assert_eq!(d.form().apply("x".into(), true), "query: x");
    assert_eq!(d.form().apply("x".into(), false), "passage: x");
    let prompts = json!({"query": "", "retrieval": "passage: "});
    let d = model.prompts(prompts, Some("retrieval")).describe();
    assert_eq!(d.prompt(true), None);
    assert_eq!(d.prompt(false), Some("passage: "));
}

/// paraphrase-MiniLM-L3-v2: mean pooling, no Normalize, 128 tokens.
#[test]
fn paraphrase_minilm_l3_v2_style() {
    let model = Model::minilm();
    model
        .set("modules.json", modules(&[TRANSFORMER, POOLING]))
        .set(
            BERT_CONFIG,
            json!({"max_seq_length": 128, "do_lower_case": false}),
        )
        .set("config.json", bert_config(3))
        .remove(ST_CONFIG);
    let d = model.describe();
    assert_eq!(d.pooling(), Pooling::Mean);
    assert!(!d.normalize());
    assert_eq!(d.max_seq_length(), 128);
    assert_eq!(d.shape().num_hidden_layers, 3);
}

/// Without `sentence_bert_config.json`, the transformer's positions, or
/// the tokenizer's `model_max_length` when smaller.
#[test]
fn max_seq_length_defaults() {
    let model = Model::minilm();
    model.remove(BERT_CONFIG);
    assert_eq!(model.describe().max_seq_length(), 512);
    model.set("tokenizer_config.json", json!({"model_max_length": 1e30}));
    assert_eq!(model.describe().max_seq_length(), 512);
    model.set("tokenizer_config.json", json!({"model_max_length": 128}));
    assert_eq!(model.describe().max_seq_length(), 128);
}

/// Pooling flags absent take sentence-transformers' defaults; the
/// `pooling_mode` string sets the flags.
#[test]
fn pooling_defaults_and_string() {
    let model = Model::minilm();
    model.set(POOLING_CONFIG, json!({"word_embedding_dimension": 384}));
    assert_eq!(model.describe().pooling(), Pooling::Mean);
    for (mode, pooling) in [
        ("lasttoken", Pooling::LastToken),
        ("WeightedMean", Pooling::WeightedMean),
        ("max", Pooling::Max),
    ] {
        let config = json!({"word_embedding_dimension": 384, "pooling_mode": mode, "pooling_mode_mean_tokens": true});
        model.set(POOLING_CONFIG, config);
        assert_eq!(model.describe().pooling(), pooling, "{mode}");
    }
}

#[test]
fn refuses_a_missing_tokenizer_naming_the_directory() {
    let model = Model::minilm();
    model
        .remove("tokenizer.json")
        .refused("", &["no tokenizer.json"]);
}

/// `pooling("none", 384)` with `key` set to `value`.
fn pooling_with(key: &str, value: Value) -> Value {
    let mut config = pooling("none", 384);
    config[key] = value;
    config
}

#[test]
fn refuses_two_pooling_modes_or_none_naming_them() {
    let model = Model::minilm();
    let mut two = pooling("cls", 384);
    two["pooling_mode_mean_tokens"] = json!(true);
    let error = model
        .set(POOLING_CONFIG, two)
        .refused(POOLING_CONFIG, &["cls + mean"]);
    assert!(matches!(error.problem, Problem::PoolingModes { .. }));
    let cases = [
        // Mean is on unless it says otherwise, as in sentence-transformers.
        (
            json!({"word_embedding_dimension": 384, "pooling_mode_max_tokens": true}),
            "mean + max",
        ),
        (pooling("none", 384), "no mode"),
        (
            pooling_with("pooling_mode_mean_sqrt_len_tokens", json!(true)),
            "asks for pooling mean_sqrt_len_tokens",
        ),
        (pooling_with("pooling_mode", json!("median")), "\"median\""),
    ];
    for (config, words) in cases {
        model
            .set(POOLING_CONFIG, config)
            .refused(POOLING_CONFIG, &[words]);
    }
}

#[test]
fn refuses_a_dense_module_naming_its_type() {
    let model = Model::minilm();
    let dense = "sentence_transformers.models.Dense";
    let error = model
        .set(
            "modules.json",
            modules(&[TRANSFORMER, POOLING, NORMALIZE, dense]),
        )
        .refused("modules.json", &[dense]);
    assert!(matches!(
        error.problem,
        Problem::UnsupportedModule { index: 3, .. }
    ));
}

#[test]
fn refuses_modules_out_of_order_or_leaving_the_directory() {
    let model = Model::minilm();
    let error = model
        .set("modules.json", modules(&[TRANSFORMER, NORMALIZE, POOLING]))
        .refused("modules.json", &["Normalize, sentence"]);
    assert!(matches!(error.problem, Problem::ModuleOrder { .. }));
    model
        .set("modules.json", modules(&[TRANSFORMER]))
        .refused("modules.json", &["optional Normalize"]);
    let mut escaping = modules(&[TRANSFORMER, POOLING]);
    escaping[1]["path"] = json!("../elsewhere");
    model
        .set("modules.json", escaping)
        .refused("modules.json", &["\"../elsewhere\"", "leaves"]);
}

#[test]
fn refuses_a_non_bert_architecture_naming_it() {
    let model = Model::minilm();
    let mut config = bert_with("model_type", json!("xlm-roberta"));
    config["architectures"] = json!(["XLMRobertaModel"]);
    let error = model
        .set("config.json", config)
        .refused("config.json", &["\"xlm-roberta\"", "XLMRobertaModel"]);
    assert!(matches!(error.problem, Problem::Architecture { .. }));
    // Named before its sizes are looked for (T5 has no hidden_size).
    let t5 = json!({"model_type": "t5", "architectures": null, "d_model": 512});
    model
        .set("config.json", t5)
        .refused("config.json", &["\"t5\"", "not bert"]);
    // A bert model_type with another head is refused too.
    model
        .set(
            "config.json",
            bert_with("architectures", json!(["RobertaModel"])),
        )
        .refused("config.json", &["RobertaModel"]);
}

#[test]
fn refuses_another_activation_or_position_embedding() {
    let model = Model::minilm();
    model
        .set("config.json", bert_with("hidden_act", json!("gelu_new")))
        .refused("config.json", &["hidden_act \"gelu_new\""]);
    let relative = bert_with("position_embedding_type", json!("relative_key"));
    model
        .set("config.json", relative)
        .refused("config.json", &["\"relative_key\""]);
    model
        .set("config.json", bert_with("num_attention_heads", json!(5)))
        .refused("config.json", &["hidden_size is 384"]);
}

#[test]
fn refuses_an_oversized_json_unread() {
    let model = Model::minilm();
    let limit = usize::try_from(crate::limits::MAX_MODEL_JSON_BYTES).unwrap();
    let mut text = serde_json::to_string(&modules(&[TRANSFORMER, POOLING])).unwrap();
    text.push_str(&" ".repeat(limit + 1 - text.len()));
    let error = model
        .set_text("modules.json", &text)
        .refused("modules.json", &["larger than 1048576 bytes"]);
    assert!(matches!(error.problem, Problem::TooLarge));
    // One byte less is read.
    text.pop();
    model.set_text("modules.json", &text).describe();
}

#[test]
fn refuses_malformed_json_naming_the_file() {
    let model = Model::minilm();
    let error = model
        .set_text(BERT_CONFIG, "{\"max_seq_length\": 256,")
        .refused(BERT_CONFIG, &["not valid JSON"]);
    assert!(matches!(error.problem, Problem::Malformed { line: 1, .. }));
    let mut config = bert_config(6);
    config.as_object_mut().unwrap().remove("vocab_size");
    model
        .set_text(BERT_CONFIG, "{}")
        .set("config.json", config)
        .refused("config.json", &["vocab_size"]);
}

#[test]
fn refuses_inconsistent_values() {
    let model = Model::minilm();
    model
        .set(BERT_CONFIG, json!({"max_seq_length": 513}))
        .refused(BERT_CONFIG, &["max_seq_length is 513"]);
    model
        .set(BERT_CONFIG, json!({}))
        .set(POOLING_CONFIG, pooling("mean", 768))
        .refused(POOLING_CONFIG, &["768", "384"]);
    model
        .set(POOLING_CONFIG, pooling("mean", 384))
        .prompts(json!({"query": "q: "}), Some("missing"))
        .refused(ST_CONFIG, &["\"missing\""]);
}

#[test]
fn refuses_excluding_the_prompt_from_pooling() {
    let model = Model::minilm();
    let mut config = pooling("mean", 384);
    config["include_prompt"] = json!(false);
    // Harmless without prompts.
    model.set(POOLING_CONFIG, config).describe();
    model
        .prompts(json!({"query": "q: "}), None)
        .refused(POOLING_CONFIG, &["include_prompt"]);
}

#[test]
fn quoted_text_is_escaped_and_cut() {
    let model = Model::minilm();
    let hostile = format!("evil\n\u{202e}{}", "x".repeat(10_000));
    let error = model
        .set("modules.json", modules(&[TRANSFORMER, hostile.as_str()]))
        .refused("modules.json", &["evil"]);
    let text = error.to_string();
    assert!(!text.contains('\n') && !text.contains('\u{202e}'), "{text}");
    assert!(text.len() < 1000, "{} bytes", text.len());
}

#[test]
fn a_json_error_quoting_the_file_is_escaped_and_cut() {
    let model = Model::minilm();
    let hostile = json!(format!("\u{1b}[31m{}", "x".repeat(100_000)));
    let error = model
        .set("config.json", bert_with("hidden_size", hostile))
        .refused("config.json", &["at line"]);
    let text = error.to_string();
    assert!(matches!(error.problem, Problem::Malformed { .. }), "{text}");
    assert!(!text.contains('\u{1b}'), "{text}");
    assert!(text.len() < 1000, "{} bytes", text.len());
}
