//! Tests of `describe.rs`: fixtures in the layouts of real
//! sentence-transformers models, and each refusal.

use std::path::Path;

use serde_json::{Value, json};

use super::{DescribeError, Pooling, Problem, describe};

const TRANSFORMER: &str = "sentence_transformers.models.Transformer";
const POOLING: &str = "sentence_transformers.models.Pooling";
const NORMALIZE: &str = "sentence_transformers.models.Normalize";

fn write(dir: &Path, name: &str, value: &Value) {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, serde_json::to_vec_pretty(value).unwrap()).unwrap();
}

fn modules(types: &[&str]) -> Value {
    let paths = ["", "1_Pooling", "2_Normalize", "3_Other"];
    let entries: Vec<Value> = types
        .iter()
        .enumerate()
        .map(|(i, kind)| json!({"idx": i, "name": i.to_string(), "path": paths[i], "type": kind}))
        .collect();
    Value::Array(entries)
}

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

/// The all-MiniLM-L6-v2 layout: mean pooling, Normalize, 256 tokens.
fn minilm() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        d,
        "modules.json",
        &modules(&[TRANSFORMER, POOLING, NORMALIZE]),
    );
    write(d, "1_Pooling/config.json", &pooling("mean", 384));
    write(
        d,
        "sentence_bert_config.json",
        &json!({"max_seq_length": 256, "do_lower_case": false}),
    );
    write(d, "config.json", &bert_config(6));
    write(
        d,
        "config_sentence_transformers.json",
        &json!({"__version__": {"sentence_transformers": "2.0.0"}}),
    );
    write(d, "tokenizer.json", &json!({"version": "1.0"}));
    std::fs::create_dir_all(d.join("2_Normalize")).unwrap();
    dir
}

fn refused(dir: &Path) -> DescribeError {
    describe(dir).expect_err("the model must be refused")
}

/// The message names `file` (under the model's directory) and each of
/// `words`.
fn says(error: &DescribeError, dir: &Path, file: &str, words: &[&str]) {
    let text = error.to_string();
    let path = if file.is_empty() {
        dir.to_path_buf()
    } else {
        dir.join(file)
    };
    assert_eq!(error.path, path, "{text}");
    assert!(text.contains(&format!("{path:?}")), "{text}");
    for word in words {
        assert!(text.contains(word), "{word:?} not in {text}");
    }
}

#[test]
fn all_minilm_l6_v2() {
    let dir = minilm();
    let d = describe(dir.path()).unwrap();
    assert_eq!(d.pooling(), Pooling::Mean);
    assert!(d.normalize());
    assert_eq!(d.max_seq_length(), 256);
    assert_eq!(d.dimension(), 384);
    assert!(!d.do_lower_case());
    let shape = d.shape();
    assert_eq!(
        (shape.num_hidden_layers, shape.num_attention_heads),
        (6, 12)
    );
    assert_eq!((shape.intermediate_size, shape.vocab_size), (1536, 30522));
    assert_eq!(
        (shape.max_position_embeddings, shape.type_vocab_size),
        (512, 2)
    );
    assert_eq!(shape.layer_norm_eps, 1e-12);
    assert_eq!(d.tokenizer(), dir.path().join("tokenizer.json"));
    assert_eq!(d.prompt(true), None);
    assert_eq!(d.apply_prompt("hello", true), "hello");
    assert_eq!(d.apply_prompt("hello", false), "hello");
}

/// BGE (bge-small-en-v1.5): CLS pooling, Normalize, lowercased, 512 tokens.
#[test]
fn bge_style() {
    let dir = minilm();
    let d = dir.path();
    write(d, "1_Pooling/config.json", &pooling("cls", 384));
    write(
        d,
        "sentence_bert_config.json",
        &json!({"max_seq_length": 512, "do_lower_case": true}),
    );
    write(
        d,
        "config_sentence_transformers.json",
        &json!({"prompts": {}, "default_prompt_name": null}),
    );
    let model = describe(d).unwrap();
    assert_eq!(model.pooling(), Pooling::Cls);
    assert!(model.normalize());
    assert_eq!(model.max_seq_length(), 512);
    assert!(model.do_lower_case());
}

/// E5: a query and a passage take different prefixes.
#[test]
fn e5_style_prompts() {
    let dir = minilm();
    let d = dir.path();
    write(
        d,
        "config_sentence_transformers.json",
        &json!({"prompts": {"query": "query: ", "passage": "passage: "}, "default_prompt_name": null}),
    );
    let model = describe(d).unwrap();
    assert_eq!(model.apply_prompt("how far", true), "query: how far");
    assert_eq!(model.apply_prompt("it is far", false), "passage: it is far");
    // "document" is preferred to "passage", as encode_document does.
    write(
        d,
        "config_sentence_transformers.json",
        &json!({"prompts": {"query": "q: ", "passage": "p: ", "document": "d: "}}),
    );
    assert_eq!(describe(d).unwrap().prompt(false), Some("d: "));
}

/// Without a prompt of its kind, a text takes `default_prompt_name`'s; an
/// empty prompt is none.
#[test]
fn default_prompt_name_fallback() {
    let dir = minilm();
    let d = dir.path();
    write(
        d,
        "config_sentence_transformers.json",
        &json!({"prompts": {"query": "query: ", "retrieval": "passage: "}, "default_prompt_name": "retrieval"}),
    );
    let model = describe(d).unwrap();
    assert_eq!(model.apply_prompt("x", true), "query: x");
    assert_eq!(model.apply_prompt("x", false), "passage: x");
    write(
        d,
        "config_sentence_transformers.json",
        &json!({"prompts": {"query": "", "retrieval": "passage: "}, "default_prompt_name": "retrieval"}),
    );
    let model = describe(d).unwrap();
    assert_eq!(model.prompt(true), None);
    assert_eq!(model.prompt(false), Some("passage: "));
}

/// paraphrase-MiniLM-L3-v2: mean pooling, no Normalize, 128 tokens.
#[test]
fn paraphrase_minilm_l3_v2_style() {
    let dir = minilm();
    let d = dir.path();
    write(d, "modules.json", &modules(&[TRANSFORMER, POOLING]));
    write(
        d,
        "sentence_bert_config.json",
        &json!({"max_seq_length": 128, "do_lower_case": false}),
    );
    write(d, "config.json", &bert_config(3));
    std::fs::remove_file(d.join("config_sentence_transformers.json")).unwrap();
    let model = describe(d).unwrap();
    assert_eq!(model.pooling(), Pooling::Mean);
    assert!(!model.normalize());
    assert_eq!(model.max_seq_length(), 128);
    assert_eq!(model.shape().num_hidden_layers, 3);
}

/// Without `sentence_bert_config.json`, the transformer's positions, or
/// the tokenizer's `model_max_length` when smaller.
#[test]
fn max_seq_length_defaults() {
    let dir = minilm();
    let d = dir.path();
    std::fs::remove_file(d.join("sentence_bert_config.json")).unwrap();
    assert_eq!(describe(d).unwrap().max_seq_length(), 512);
    write(
        d,
        "tokenizer_config.json",
        &json!({"model_max_length": 1e30}),
    );
    assert_eq!(describe(d).unwrap().max_seq_length(), 512);
    write(
        d,
        "tokenizer_config.json",
        &json!({"model_max_length": 128}),
    );
    assert_eq!(describe(d).unwrap().max_seq_length(), 128);
}

/// Pooling flags absent take sentence-transformers' defaults; the
/// `pooling_mode` string sets the flags.
#[test]
fn pooling_defaults_and_string() {
    let dir = minilm();
    let d = dir.path();
    write(
        d,
        "1_Pooling/config.json",
        &json!({"word_embedding_dimension": 384}),
    );
    assert_eq!(describe(d).unwrap().pooling(), Pooling::Mean);
    for (mode, pooling) in [
        ("lasttoken", Pooling::LastToken),
        ("WeightedMean", Pooling::WeightedMean),
        ("max", Pooling::Max),
    ] {
        write(
            d,
            "1_Pooling/config.json",
            &json!({"word_embedding_dimension": 384, "pooling_mode": mode, "pooling_mode_mean_tokens": true}),
        );
        assert_eq!(describe(d).unwrap().pooling(), pooling, "{mode}");
    }
}

#[test]
fn refuses_a_missing_tokenizer_naming_the_directory() {
    let dir = minilm();
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    says(&refused(dir.path()), dir.path(), "", &["no tokenizer.json"]);
}

#[test]
fn refuses_two_pooling_modes_naming_them() {
    let dir = minilm();
    let d = dir.path();
    let mut config = pooling("cls", 384);
    config["pooling_mode_mean_tokens"] = json!(true);
    write(d, "1_Pooling/config.json", &config);
    let error = refused(d);
    assert!(matches!(error.problem, Problem::PoolingModes { .. }));
    says(&error, d, "1_Pooling/config.json", &["cls + mean"]);
    // Mean is on unless it says otherwise, as in sentence-transformers.
    write(
        d,
        "1_Pooling/config.json",
        &json!({"word_embedding_dimension": 384, "pooling_mode_max_tokens": true}),
    );
    says(&refused(d), d, "1_Pooling/config.json", &["mean + max"]);
}

#[test]
fn refuses_no_pooling_mode_and_mean_sqrt_len() {
    let dir = minilm();
    let d = dir.path();
    write(d, "1_Pooling/config.json", &pooling("none", 384));
    says(&refused(d), d, "1_Pooling/config.json", &["no mode"]);
    let mut config = pooling("none", 384);
    config["pooling_mode_mean_sqrt_len_tokens"] = json!(true);
    write(d, "1_Pooling/config.json", &config);
    says(
        &refused(d),
        d,
        "1_Pooling/config.json",
        &["mean_sqrt_len_tokens"],
    );
    let mut config = pooling("none", 384);
    config["pooling_mode"] = json!("median");
    write(d, "1_Pooling/config.json", &config);
    says(&refused(d), d, "1_Pooling/config.json", &["\"median\""]);
}

#[test]
fn refuses_a_dense_module_naming_its_type() {
    let dir = minilm();
    let d = dir.path();
    let dense = "sentence_transformers.models.Dense";
    write(
        d,
        "modules.json",
        &modules(&[TRANSFORMER, POOLING, NORMALIZE, dense]),
    );
    let error = refused(d);
    assert!(matches!(
        error.problem,
        Problem::UnsupportedModule { index: 3, .. }
    ));
    says(&error, d, "modules.json", &[dense]);
}

#[test]
fn refuses_modules_out_of_order_or_leaving_the_directory() {
    let dir = minilm();
    let d = dir.path();
    write(
        d,
        "modules.json",
        &modules(&[TRANSFORMER, NORMALIZE, POOLING]),
    );
    let error = refused(d);
    assert!(matches!(error.problem, Problem::ModuleOrder { .. }));
    says(&error, d, "modules.json", &["Normalize, sentence"]);
    write(d, "modules.json", &modules(&[TRANSFORMER]));
    says(&refused(d), d, "modules.json", &["optional Normalize"]);
    let mut escaping = modules(&[TRANSFORMER, POOLING]);
    escaping[1]["path"] = json!("../elsewhere");
    write(d, "modules.json", &escaping);
    says(
        &refused(d),
        d,
        "modules.json",
        &["\"../elsewhere\"", "leaves"],
    );
}

#[test]
fn refuses_a_non_bert_architecture_naming_it() {
    let dir = minilm();
    let d = dir.path();
    let mut config = bert_config(6);
    config["model_type"] = json!("xlm-roberta");
    config["architectures"] = json!(["XLMRobertaModel"]);
    write(d, "config.json", &config);
    let error = refused(d);
    assert!(matches!(error.problem, Problem::Architecture { .. }));
    says(
        &error,
        d,
        "config.json",
        &["\"xlm-roberta\"", "XLMRobertaModel"],
    );
    // A bert model_type with another head is refused too.
    let mut config = bert_config(6);
    config["architectures"] = json!(["RobertaModel"]);
    write(d, "config.json", &config);
    says(&refused(d), d, "config.json", &["RobertaModel"]);
}

#[test]
fn refuses_another_activation_or_position_embedding() {
    let dir = minilm();
    let d = dir.path();
    let mut config = bert_config(6);
    config["hidden_act"] = json!("gelu_new");
    write(d, "config.json", &config);
    says(&refused(d), d, "config.json", &["hidden_act \"gelu_new\""]);
    let mut config = bert_config(6);
    config["position_embedding_type"] = json!("relative_key");
    write(d, "config.json", &config);
    says(&refused(d), d, "config.json", &["\"relative_key\""]);
    let mut config = bert_config(6);
    config["num_attention_heads"] = json!(5);
    write(d, "config.json", &config);
    says(&refused(d), d, "config.json", &["hidden_size is 384"]);
}

#[test]
fn refuses_an_oversized_json_unread() {
    let dir = minilm();
    let d = dir.path();
    let limit = usize::try_from(crate::limits::MAX_MODEL_JSON_BYTES).unwrap();
    let mut text = serde_json::to_string(&modules(&[TRANSFORMER, POOLING])).unwrap();
    text.push_str(&" ".repeat(limit + 1 - text.len()));
    std::fs::write(d.join("modules.json"), &text).unwrap();
    let error = refused(d);
    assert!(matches!(error.problem, Problem::TooLarge));
    says(&error, d, "modules.json", &["larger than 1048576 bytes"]);
    // One byte less is read.
    text.pop();
    std::fs::write(d.join("modules.json"), &text).unwrap();
    describe(d).unwrap();
}

#[test]
fn refuses_malformed_json_naming_the_file() {
    let dir = minilm();
    let d = dir.path();
    std::fs::write(
        d.join("sentence_bert_config.json"),
        "{\"max_seq_length\": 256,",
    )
    .unwrap();
    let error = refused(d);
    assert!(matches!(error.problem, Problem::Malformed { line: 1, .. }));
    says(&error, d, "sentence_bert_config.json", &["not valid JSON"]);
    std::fs::write(d.join("sentence_bert_config.json"), "{}").unwrap();
    let mut config = bert_config(6);
    config.as_object_mut().unwrap().remove("vocab_size");
    write(d, "config.json", &config);
    says(&refused(d), d, "config.json", &["vocab_size"]);
}

#[test]
fn refuses_inconsistent_values() {
    let dir = minilm();
    let d = dir.path();
    write(
        d,
        "sentence_bert_config.json",
        &json!({"max_seq_length": 513}),
    );
    says(
        &refused(d),
        d,
        "sentence_bert_config.json",
        &["max_seq_length is 513"],
    );
    write(d, "sentence_bert_config.json", &json!({}));
    write(d, "1_Pooling/config.json", &pooling("mean", 768));
    says(&refused(d), d, "1_Pooling/config.json", &["768", "384"]);
    write(d, "1_Pooling/config.json", &pooling("mean", 384));
    write(
        d,
        "config_sentence_transformers.json",
        &json!({"prompts": {"query": "q: "}, "default_prompt_name": "missing"}),
    );
    says(
        &refused(d),
        d,
        "config_sentence_transformers.json",
        &["\"missing\""],
    );
}

#[test]
fn refuses_excluding_the_prompt_from_pooling() {
    let dir = minilm();
    let d = dir.path();
    let mut config = pooling("mean", 384);
    config["include_prompt"] = json!(false);
    write(d, "1_Pooling/config.json", &config);
    // Harmless without prompts.
    describe(d).unwrap();
    write(
        d,
        "config_sentence_transformers.json",
        &json!({"prompts": {"query": "q: "}}),
    );
    says(&refused(d), d, "1_Pooling/config.json", &["include_prompt"]);
}

#[test]
fn quoted_text_is_escaped_and_cut() {
    let dir = minilm();
    let d = dir.path();
    let hostile = format!("evil\n\u{202e}{}", "x".repeat(10_000));
    write(
        d,
        "modules.json",
        &modules(&[TRANSFORMER, hostile.as_str()]),
    );
    let text = refused(d).to_string();
    assert!(!text.contains('\n') && !text.contains('\u{202e}'), "{text}");
    assert!(text.len() < 1000, "{} bytes", text.len());
}

#[test]
fn a_json_error_quoting_the_file_is_escaped_and_cut() {
    let dir = minilm();
    let d = dir.path();
    let mut config = bert_config(6);
    config["hidden_size"] = json!(format!("\u{1b}[31m{}", "x".repeat(100_000)));
    write(d, "config.json", &config);
    let error = refused(d);
    let text = error.to_string();
    assert!(matches!(error.problem, Problem::Malformed { .. }), "{text}");
    assert!(!text.contains('\u{1b}'), "{text}");
    assert!(text.len() < 1000, "{} bytes", text.len());
    assert!(text.contains("at line"), "{text}");
}
