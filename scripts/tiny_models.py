"""Writes tiny random BERT sentence encoders in the sentence-transformers
layout, with reference vectors, for the tests of what no packaged model
covers.

    python scripts/tiny_models.py OUT_DIR

Each variant is a subdirectory of OUT_DIR holding what a model downloaded
from the Hugging Face hub holds: `config.json`, `model.safetensors`
(fp32, Hugging Face tensor names), `model.onnx` (from
`bert_to_onnx.build`, for the native engine), `tokenizer.json` (a
WordPiece tokenizer built with the `tokenizers` package), `modules.json`,
`1_Pooling/config.json`, `2_Normalize/` when the variant normalizes,
`sentence_bert_config.json` and, with prompts,
`config_sentence_transformers.json`; and `golden.json`, its reference
vectors.

The weights are random but fixed: numpy's generator seeded with `SEED`
plus the variant's index in `VARIANTS` (both recorded in golden.json), so
every run writes the same files.

The reference is computed here, independently of embedhost's Rust code:
the text is put in the model's form as sentence-transformers does (the
prompt for its kind first, then lowercased if `do_lower_case`), tokenized
by the `tokenizers` package from the variant's tokenizer.json (truncated
to `max_seq_length`, unpadded), run through the float64 numpy forward pass
of `bert_to_onnx.numpy_forward` over the same weights, pooled as
sentence-transformers' Pooling module defines the mode (`pool` below) and
L2-normalized only if the variant has a Normalize module.
"""

import json
import os
import struct
import sys

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bert_to_onnx import build, numpy_forward  # noqa: E402

SEED = 20261207

HIDDEN, LAYERS, HEADS, INNER = 32, 2, 4, 64

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PUNCTUATION = list(".,!?:;'-")
LOWER = [chr(c) for c in range(ord("a"), ord("z") + 1)]
UPPER = [c.upper() for c in LOWER]
WORDS = [
    "the", "an", "of", "and", "to", "in", "is", "on", "at", "for", "with", "query", "passage",
    "hello", "world", "cat", "dog", "sat", "mat", "log", "search", "meaning", "quick", "brown",
    "fox", "jumps", "over", "lazy", "model", "vector", "Hello", "World", "The",
]
# 5 + 8 + 26 + 26 + 26 + 33 = 124 entries before the "##" suffixes below.
SUFFIXES = ["##ing", "##ed", "##er", "##ly"]
# The other vocabulary's extra words.
EXTRA = [
    "river", "stone", "green", "house", "music", "light", "night", "water", "paper", "table",
    "chair", "window", "garden", "bread", "apple", "train", "cloud", "storm", "ocean", "forest",
    "city", "road", "bridge", "tower", "field", "snow", "fire", "gold", "iron",
]

# Per variant: pooling mode, Normalize module, the tokenizer lowercasing,
# do_lower_case, position table rows, max_seq_length, vocabulary size and
# prompts. Defaults are in `variant`.
VARIANTS = [
    ("cls", {"pooling": "cls", "normalize": True}),
    ("max", {"pooling": "max", "normalize": False}),
    ("lasttoken", {"pooling": "lasttoken", "normalize": False}),
    ("weightedmean", {"pooling": "weightedmean", "normalize": False}),
    ("e5", {"pooling": "mean", "normalize": True, "prompts": {"query": "query: ", "passage": "passage: "}}),
    ("cased", {"pooling": "mean", "normalize": False, "lowercase": False}),
    ("lowercased", {"pooling": "mean", "normalize": False, "lowercase": False, "do_lower_case": True}),
    ("pos512", {"pooling": "mean", "normalize": True, "positions": 512, "max_seq_length": 512}),
    ("vocab", {"pooling": "mean", "normalize": False, "vocab": 157}),
]

# Past 128 tokens it says something else, so a model that stops reading
# there gives another vector.
LONG = "the cat sat on the mat and the dog sat on the log. " * 9 + "Hello world, a quick brown fox jumps over a lazy model with meaning! " * 12

TEXTS = [
    "hello",
    "Hello World",
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "HELLO, WORLD!",
    "Grüße aus Köln",
    "",
    LONG,
]


def variant(spec):
    v = {
        "lowercase": True,
        "do_lower_case": False,
        "positions": 128,
        "max_seq_length": 128,
        "vocab": 128,
        "prompts": None,
    }
    v.update(spec)
    return v


def vocabulary(size):
    words = SPECIALS + PUNCTUATION + LOWER + ["##" + c for c in LOWER] + UPPER + WORDS + SUFFIXES + EXTRA
    assert len(words) == len(set(words)), "a word is listed twice"
    if size > len(words):
        sys.exit(f"tiny_models: no vocabulary of {size} words (at most {len(words)})")
    return words[:size]


def tokenizer(words, lowercase):
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.BertProcessing(("[SEP]", vocab["[SEP]"]), ("[CLS]", vocab["[CLS]"]))
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def weights(rng, vocab, positions):
    t = {}

    def normal(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def layer_norm(prefix):
        t[prefix + ".weight"] = (1.0 + normal(HIDDEN, scale=0.1)).astype(np.float32)
        t[prefix + ".bias"] = normal(HIDDEN, scale=0.1)

    def linear(prefix, outputs, inputs):
        t[prefix + ".weight"] = normal(outputs, inputs)
        t[prefix + ".bias"] = normal(outputs, scale=0.05)

    t["embeddings.word_embeddings.weight"] = normal(vocab, HIDDEN, scale=1.0)
    t["embeddings.position_embeddings.weight"] = normal(positions, HIDDEN, scale=0.5)
    t["embeddings.token_type_embeddings.weight"] = normal(2, HIDDEN, scale=0.5)
    layer_norm("embeddings.LayerNorm")
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        for n in ("query", "key", "value"):
            linear(p + "attention.self." + n, HIDDEN, HIDDEN)
        linear(p + "attention.output.dense", HIDDEN, HIDDEN)
        layer_norm(p + "attention.output.LayerNorm")
        linear(p + "intermediate.dense", INNER, HIDDEN)
        linear(p + "output.dense", HIDDEN, INNER)
        layer_norm(p + "output.LayerNorm")
    return t


def write_safetensors(path, tensors):
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        data = np.ascontiguousarray(tensors[name], dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for chunk in chunks:
            f.write(chunk)


def pool(hidden, mask, mode):
    """sentence-transformers' Pooling module over one text's states
    (`tokens x hidden`) and attention mask, in float64."""
    m = mask[:, None]
    if mode == "cls":
        return hidden[0]
    if mode == "mean":
        return (hidden * m).sum(0) / max(mask.sum(), 1e-9)
    if mode == "max":
        return np.where(m > 0, hidden, -1e9).max(0)
    if mode == "lasttoken":
        return hidden[int(mask.sum()) - 1]
    if mode == "weightedmean":
        w = np.arange(1, len(mask) + 1, dtype=np.float64)[:, None] * m
        return (hidden * w).sum(0) / max(w.sum(), 1e-9)
    raise ValueError(mode)


def write_json(path, value):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(value, f, ensure_ascii=False, indent=1)
        f.write("\n")


def write_variant(out, index, name, spec):
    v = variant(spec)
    seed = SEED + index
    rng = np.random.default_rng(seed)
    d = os.path.join(out, name)
    os.makedirs(d, exist_ok=True)
    words = vocabulary(v["vocab"])
    config = {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "intermediate_size": INNER,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": v["positions"],
        "position_embedding_type": "absolute",
        "type_vocab_size": 2,
        "vocab_size": len(words),
        "pad_token_id": 0,
    }
    write_json(os.path.join(d, "config.json"), config)
    tensors = weights(rng, len(words), v["positions"])
    write_safetensors(os.path.join(d, "model.safetensors"), tensors)
    import onnx

    onnx.save(build(tensors, config), os.path.join(d, "model.onnx"))
    tok = tokenizer(words, v["lowercase"])
    assert tok.get_vocab_size() == len(words)
    tok.save(os.path.join(d, "tokenizer.json"))

    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if v["normalize"]:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        os.makedirs(os.path.join(d, "2_Normalize"), exist_ok=True)
    write_json(os.path.join(d, "modules.json"), modules)
    modes = {"cls": "cls_token", "mean": "mean_tokens", "max": "max_tokens", "lasttoken": "lasttoken", "weightedmean": "weightedmean_tokens"}
    pooling = {"word_embedding_dimension": HIDDEN}
    pooling.update({"pooling_mode_" + m: v["pooling"] == k for k, m in modes.items()})
    pooling["pooling_mode_mean_sqrt_len_tokens"] = False
    pooling["include_prompt"] = True
    write_json(os.path.join(d, "1_Pooling", "config.json"), pooling)
    write_json(os.path.join(d, "sentence_bert_config.json"), {"max_seq_length": v["max_seq_length"], "do_lower_case": v["do_lower_case"]})
    if v["prompts"]:
        write_json(os.path.join(d, "config_sentence_transformers.json"), {"prompts": v["prompts"], "default_prompt_name": None})

    # The reference.
    long_untruncated = len(tok.encode(LONG).ids)
    tok.enable_truncation(max_length=v["max_seq_length"])
    tok.no_padding()
    kinds = ["query", "passage"] if v["prompts"] else ["passage"]
    rows = []
    for text in TEXTS:
        for kind in kinds:
            formed = (v["prompts"] or {}).get(kind, "") + text
            if v["do_lower_case"]:
                formed = formed.lower()
            enc = tok.encode(formed)
            ids = np.array([enc.ids], dtype=np.int64)
            mask = np.array([enc.attention_mask], dtype=np.float64)
            types = np.array([enc.type_ids], dtype=np.int64)
            hidden = numpy_forward(tensors, config, ids, mask, types)[0]
            vector = pool(hidden, mask[0], v["pooling"])
            if v["normalize"]:
                vector = vector / max(np.linalg.norm(vector), 1e-12)
            rows.append({"text": text, "kind": kind, "tokens": len(enc.ids), "vector": [float(f"{x:.9g}") for x in vector]})

    tokens = {(r["text"], r["kind"]): r["tokens"] for r in rows}
    long_tokens = tokens[(LONG, kinds[0])]
    assert long_tokens == min(v["max_seq_length"], long_untruncated), "the long text is not cut at max_seq_length"
    if v["max_seq_length"] > 128:
        assert long_tokens > 128, f"the long text has only {long_tokens} tokens"
    cased = tok.encode("Hello World").ids != tok.encode("hello world").ids
    assert cased == (not v["lowercase"]), f"{name}: capitals tokenized {'apart' if cased else 'alike'}"
    write_json(
        os.path.join(d, "golden.json"),
        {
            "variant": name,
            "made_by": "scripts/tiny_models.py (tokenizers + float64 numpy BERT over model.safetensors)",
            "seed": seed,
            "shape": {"hidden": HIDDEN, "layers": LAYERS, "heads": HEADS, "intermediate": INNER, "vocab": len(words), "positions": v["positions"]},
            "pooling": v["pooling"],
            "normalized": v["normalize"],
            "max_seq_length": v["max_seq_length"],
            "do_lower_case": v["do_lower_case"],
            "prompts": v["prompts"],
            "rows": rows,
        },
    )
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)
    print(f"tiny_models: {name}: seed {seed}, {len(words)} words, {v['positions']} positions, {v['pooling']}, {size} bytes", file=sys.stderr)


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: tiny_models.py OUT_DIR")
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    for index, (name, spec) in enumerate(VARIANTS):
        write_variant(out, index, name, spec)


if __name__ == "__main__":
    main()
