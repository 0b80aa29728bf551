//! Fixtures the unit tests of several modules share.

/// A word-level `tokenizer.json`: lowercased, split at whitespace and
/// punctuation, `[CLS]` and `[SEP]` around each text; ids 0 to 3 are
/// `[PAD]`, `[CLS]`, `[SEP]` and `[UNK]`, then `words` in order.
pub(crate) fn word_level_tokenizer(words: &[&str]) -> String {
    let mut vocab = serde_json::Map::new();
    for (id, word) in ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]
        .iter()
        .chain(words)
        .enumerate()
    {
        vocab.insert((*word).to_string(), id.into());
    }
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "[SEP]", "type_id": 0}},
            ],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {
                "[CLS]": {"id": "[CLS]", "ids": [1], "tokens": ["[CLS]"]},
                "[SEP]": {"id": "[SEP]", "ids": [2], "tokens": ["[SEP]"]},
            },
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
    })
    .to_string()
}
