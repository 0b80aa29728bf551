"""Writes a tiny BERT-shaped ONNX model and its tokenizer, for tests.

    python scripts/tiny_bert_onnx.py OUT_DIR [DIMENSION]

The graph has a real sentence-transformer's interface (inputs `input_ids`,
`attention_mask`, `token_type_ids`, int64 [batch, sequence]; output
`last_hidden_state`, float [batch, sequence, dimension]) and computes

    last_hidden_state = (word[input_ids] + type[token_type_ids]) * attention_mask

with tables given by a formula the Rust tests repeat (see `word_value`), so
a test can compute the pooled vectors it expects without ONNX Runtime.
"""

import json
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

VOCAB = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "hello", "world", "cats", "dogs", "search", "meaning"]


def word_value(token, j):
    # Small integers: exact in f32, so every engine computes the same sums.
    return float((token * 31 + j * 7) % 17) - 8.0


def type_value(kind, j):
    return float(kind)


def main():
    out = sys.argv[1]
    dim = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    os.makedirs(out, exist_ok=True)
    word = np.array([[word_value(t, j) for j in range(dim)] for t in range(len(VOCAB))], dtype=np.float32)
    kind = np.array([[type_value(k, j) for j in range(dim)] for k in range(2)], dtype=np.float32)
    nodes = [
        helper.make_node("Gather", ["word_table", "input_ids"], ["words"]),
        helper.make_node("Gather", ["type_table", "token_type_ids"], ["types"]),
        helper.make_node("Add", ["words", "types"], ["summed"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "last_axis"], ["mask_3d"]),
        helper.make_node("Mul", ["summed", "mask_3d"], ["last_hidden_state"]),
    ]
    ids = ["batch", "sequence"]
    graph = helper.make_graph(
        nodes,
        "tiny_bert",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ids),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ids),
            helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ids),
        ],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ids + [dim])],
        initializer=[
            numpy_helper.from_array(word, "word_table"),
            numpy_helper.from_array(kind, "type_table"),
            numpy_helper.from_array(np.array([-1], dtype=np.int64), "last_axis"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="embedhost-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, os.path.join(out, "model.onnx"))
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
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
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": {w: i for i, w in enumerate(VOCAB)}, "unk_token": "[UNK]"},
    }
    with open(os.path.join(out, "tokenizer.json"), "w") as f:
        json.dump(tokenizer, f)


if __name__ == "__main__":
    main()
