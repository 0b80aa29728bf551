"""Writes reference vectors of a BERT sentence encoder, computed without
ONNX Runtime, for the parity tests.

    python scripts/golden_vectors.py MODEL_DIR OUT.json
    python scripts/golden_vectors.py --from-onnx --no-normalize \
        --name sentence-transformers/paraphrase-MiniLM-L3-v2 MODEL_DIR OUT.json

The reference is independent of the runtime the native engine uses and of
the Rust tokenizer binding: the Python `tokenizers` package tokenizes (with
the model's tokenizer.json, truncated to sentence_bert_config.json's
max_seq_length and unpadded, as sentence-transformers does), a float64 numpy
forward pass computes the hidden states, then mean pooling and (unless
--no-normalize: a model without a Normalize module) L2 normalization, in
float64. The weights are the safetensors checkpoint's, or with --from-onnx
the initializers of MODEL_DIR/model.onnx read with the `onnx` package (named
as scripts/onnx_to_safetensors.py names them, by following the graph),
for a model published only as an ONNX graph.
"""

import argparse
import json
import os
import sys

import numpy as np
from tokenizers import Tokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bert_to_onnx import numpy_forward, read_safetensors  # noqa: E402

LONG = (
    "Semantic search finds documents by what they mean rather than by the words they share. "
    "An embedding model turns every passage into a vector, and passages about the same thing "
    "end up close together even when they use different words. "
)

SENTENCES = [
    "hello",
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "Rust is a systems programming language.",
    "How do I bake sourdough bread at home?",
    "The stock market fell sharply today.",
    "SEARCH BY MEANING, NOT BY KEYWORDS",
    "Grüße aus Köln!",
    "東京は日本の首都です。",
    "Ça va très bien, merci.",
    "Привет, как дела?",
    "emoji 🎉 party 🚀",
    "",
    "   ",
    "?!",
    'fn main() { println!("hi"); }',
    "Version 2.0.0-rc.15 was released on 2026-11-28.",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    LONG * 8,
    "Numbers: " + " ".join(str(i) for i in range(400)),
]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("out")
    parser.add_argument("--from-onnx", action="store_true", help="weights from model.onnx's initializers")
    parser.add_argument("--no-normalize", action="store_true", help="the model has no Normalize module")
    parser.add_argument("--name", default="sentence-transformers/all-MiniLM-L6-v2")
    args = parser.parse_args()
    model_dir = args.model_dir
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(model_dir, "sentence_bert_config.json")) as f:
        max_len = json.load(f)["max_seq_length"]
    tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tokenizer.enable_truncation(max_length=max_len)
    tokenizer.no_padding()
    if args.from_onnx:
        import onnx
        from onnx_to_safetensors import checkpoint_tensors

        tensors = checkpoint_tensors(onnx.load(os.path.join(model_dir, "model.onnx")), config)
        weights = "the initializers of model.onnx, read with the onnx package"
    else:
        tensors = read_safetensors(os.path.join(model_dir, "model.safetensors"))
        weights = "model.safetensors"
    rows = []
    for text in SENTENCES:
        enc = tokenizer.encode(text)
        ids = np.array([enc.ids], dtype=np.int64)
        mask = np.array([enc.attention_mask], dtype=np.float64)
        types = np.array([enc.type_ids], dtype=np.int64)
        hidden = numpy_forward(tensors, config, ids, mask, types)[0]
        pooled = (hidden * mask[0][:, None]).sum(0) / max(mask[0].sum(), 1e-9)
        vector = pooled if args.no_normalize else pooled / max(np.linalg.norm(pooled), 1e-12)
        rows.append({"text": text, "tokens": len(enc.ids), "vector": [float(f"{v:.9g}") for v in vector]})
        print(f"{len(enc.ids):4d} tokens  {text[:50]!r}", file=sys.stderr)
    doc = {
        "model": args.name,
        "made_by": f"scripts/golden_vectors.py (tokenizers + float64 numpy BERT over {weights})",
        "max_seq_length": max_len,
        "sentences": rows,
    }
    if args.no_normalize:
        doc["normalized"] = False
    with open(args.out, "w") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
