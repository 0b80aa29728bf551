"""Writes a BERT sentence encoder's ONNX graph from its safetensors weights.

    python scripts/bert_to_onnx.py MODEL_DIR OUT.onnx

MODEL_DIR holds a Hugging Face BERT checkpoint (`config.json` and
`model.safetensors`, fp32), such as all-MiniLM-L6-v2. The graph (opset 17)
takes `input_ids`, `attention_mask` and `token_type_ids` (int64,
[batch, sequence]) and returns `last_hidden_state` (float,
[batch, sequence, hidden]); pooling and normalization are the engine's.

Position embeddings are a slice of the position table (rows 0..sequence):
computing positions with Shape/Range/Gather broke ONNX Runtime's full graph
optimisation at run time.

The script checks its graph against a plain numpy forward pass of the same
weights (`--check`, on by default) and fails if they differ by more than
1e-4, so a wrongly wired graph never reaches a model directory.
"""

import argparse
import json
import math
import os
import struct
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DTYPES = {"F32": np.float32, "I64": np.int64, "F16": np.float16}


def read_safetensors(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = DTYPES[info["dtype"]]
        tensors[name] = np.frombuffer(data[start:end], dtype=dtype).reshape(info["shape"]).astype(
            np.float32 if dtype != np.int64 else np.int64
        )
    return tensors


def weight(tensors, name):
    # Checkpoints are saved with or without the `bert.` prefix.
    for key in (name, "bert." + name):
        if key in tensors:
            return tensors[key]
    raise KeyError(f"weight {name} is not in the checkpoint")


class Graph:
    def __init__(self):
        self.nodes, self.inits, self.count = [], [], 0

    def name(self, base):
        self.count += 1
        return f"{base}_{self.count}"

    def const(self, array, base="c"):
        n = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(array), n))
        return n

    def op(self, kind, inputs, base=None, **attrs):
        out = self.name(base or kind.lower())
        self.nodes.append(helper.make_node(kind, inputs, [out], **attrs))
        return out


def build(tensors, config):
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head = hidden // heads
    eps = config.get("layer_norm_eps", 1e-12)
    g = Graph()

    def linear(x, prefix):
        w = g.const(weight(tensors, prefix + ".weight").T.copy(), "w")
        b = g.const(weight(tensors, prefix + ".bias"), "b")
        return g.op("Add", [g.op("MatMul", [x, w]), b])

    def layer_norm(x, prefix):
        scale = g.const(weight(tensors, prefix + ".weight"), "ln_w")
        bias = g.const(weight(tensors, prefix + ".bias"), "ln_b")
        return g.op("LayerNormalization", [x, scale, bias], axis=-1, epsilon=eps)

    # Embeddings.
    words = g.op("Gather", [g.const(weight(tensors, "embeddings.word_embeddings.weight"), "word"), "input_ids"])
    kinds = g.op("Gather", [g.const(weight(tensors, "embeddings.token_type_embeddings.weight"), "type"), "token_type_ids"])
    length = g.op("Shape", ["input_ids"], start=1, end=2)
    positions = g.op(
        "Slice",
        [g.const(weight(tensors, "embeddings.position_embeddings.weight"), "pos"), g.const(np.array([0], np.int64)), length, g.const(np.array([0], np.int64))],
    )
    x = g.op("Add", [g.op("Add", [words, kinds]), positions])
    x = layer_norm(x, "embeddings.LayerNorm")

    # Additive attention mask: 0 for tokens, a large negative for padding.
    mask = g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    mask = g.op("Unsqueeze", [mask, g.const(np.array([1, 2], np.int64))])
    mask = g.op("Mul", [g.op("Sub", [g.const(np.array(1.0, np.float32)), mask]), g.const(np.array(-10000.0, np.float32))])

    split = g.const(np.array([0, 0, heads, head], np.int64))
    merge = g.const(np.array([0, 0, hidden], np.int64))
    scale = g.const(np.array(1.0 / math.sqrt(head), np.float32))
    half = g.const(np.array(0.5, np.float32))
    one = g.const(np.array(1.0, np.float32))
    root2 = g.const(np.array(math.sqrt(2.0), np.float32))
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q = g.op("Transpose", [g.op("Reshape", [linear(x, p + "attention.self.query"), split])], perm=[0, 2, 1, 3])
        k = g.op("Transpose", [g.op("Reshape", [linear(x, p + "attention.self.key"), split])], perm=[0, 2, 3, 1])
        v = g.op("Transpose", [g.op("Reshape", [linear(x, p + "attention.self.value"), split])], perm=[0, 2, 1, 3])
        scores = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, k]), scale]), mask])
        probs = g.op("Softmax", [scores], axis=-1)
        context = g.op("Reshape", [g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3]), merge])
        x = layer_norm(g.op("Add", [linear(context, p + "attention.output.dense"), x]), p + "attention.output.LayerNorm")
        inner = linear(x, p + "intermediate.dense")
        # Exact GELU, as BERT's `gelu`: 0.5 x (1 + erf(x / sqrt 2)).
        gelu = g.op("Mul", [g.op("Mul", [inner, half]), g.op("Add", [one, g.op("Erf", [g.op("Div", [inner, root2])])])])
        x = layer_norm(g.op("Add", [linear(gelu, p + "output.dense"), x]), p + "output.LayerNorm")
    g.nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"]))

    ids = ["batch", "sequence"]
    graph = helper.make_graph(
        g.nodes,
        "bert",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ids) for n in ("input_ids", "attention_mask", "token_type_ids")],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ids + [hidden])],
        initializer=g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="embedhost")
    model.ir_version = 8
    return model


def numpy_forward(tensors, config, ids, mask, types):
    """BERT's forward pass in plain numpy: the reference the graph is checked against."""
    from math import erf

    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head = hidden // heads
    eps = config.get("layer_norm_eps", 1e-12)
    w = lambda n: weight(tensors, n).astype(np.float64)

    def ln(x, p):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w(p + ".weight") + w(p + ".bias")

    def lin(x, p):
        return x @ w(p + ".weight").T + w(p + ".bias")

    b, s = ids.shape
    x = w("embeddings.word_embeddings.weight")[ids] + w("embeddings.token_type_embeddings.weight")[types] + w("embeddings.position_embeddings.weight")[:s]
    x = ln(x, "embeddings.LayerNorm")
    ext = (1.0 - mask[:, None, None, :]) * -10000.0
    verf = np.vectorize(erf)
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        split = lambda t: t.reshape(b, s, heads, head).transpose(0, 2, 1, 3)
        q, k, v = (split(lin(x, p + "attention.self." + n)) for n in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head) + ext
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(b, s, hidden)
        x = ln(lin(ctx, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
        inner = lin(x, p + "intermediate.dense")
        x = ln(lin(0.5 * inner * (1.0 + verf(inner / math.sqrt(2.0))), p + "output.dense") + x, p + "output.LayerNorm")
    return x


def check(model, tensors, config):
    """Runs the graph with onnx's reference evaluator on a padded batch and
    compares it with the numpy forward pass."""
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(7)
    ids = rng.integers(1000, 2000, size=(2, 7)).astype(np.int64)
    ids[:, 0], ids[0, 6], ids[1, 4] = 101, 102, 102
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    ids[1, 5:] = 0
    types = np.zeros_like(ids)
    (got,) = ReferenceEvaluator(model).run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    want = numpy_forward(tensors, config, ids, mask.astype(np.float64), types)
    real = mask.astype(bool)
    err = float(np.abs(got[real] - want[real]).max())
    if not err < 1e-4:
        sys.exit(f"bert_to_onnx: the graph differs from the numpy forward pass by {err}")
    print(f"bert_to_onnx: graph matches the numpy forward pass (max difference {err:.2e})", file=sys.stderr)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("out")
    parser.add_argument("--no-check", action="store_true")
    args = parser.parse_args()
    with open(os.path.join(args.model_dir, "config.json")) as f:
        config = json.load(f)
    if config.get("model_type") != "bert":
        sys.exit(f"bert_to_onnx: {args.model_dir} is a {config.get('model_type')} model, not bert")
    tensors = read_safetensors(os.path.join(args.model_dir, "model.safetensors"))
    model = build(tensors, config)
    onnx.checker.check_model(model, full_check=True)
    if not args.no_check:
        check(model, tensors, config)
    tmp = args.out + ".tmp"
    onnx.save(model, tmp)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
