"""Writes the int8 variant of a sentence encoder's fp32 ONNX graph.

    python scripts/quantize_int8.py MODEL_DIR OUT

Reads MODEL_DIR/model.onnx (and the layer count from MODEL_DIR/config.json)
and writes onnxruntime's dynamic quantization of it: the weights of the
MatMuls as int8, one scale per output channel (per-channel keeps cosine to
the fp32 vectors near 0.99; per-tensor loses more), activations quantized at
run time. The first encoder layer's MatMuls stay fp32: measured on the
golden sentences, quantizing them costs the most (one-word texts fell to
cosine 0.981, against 0.990 with them kept), and keeping them costs no
measurable speed. Other operators (the embedding tables, LayerNorm, Softmax)
stay fp32. Deterministic: the same onnxruntime gives the same bytes, so the
model manifest can pin its sha256.

The script then runs both graphs on a few token sequences and fails if any
mean-pooled vector's cosine to the fp32 one is below 0.98, so a broken
quantization never reaches a model directory. The vectors pool the token
states: `last_hidden_state`, or the one float output of that shape under an
exporter's name (paraphrase-MiniLM-L3-v2's graph first outputs its inputs).
"""

import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from onnx_to_safetensors import hidden_states_output  # noqa: E402

MIN_COSINE = 0.98


def pooled(session, ids, hidden_size):
    mask = np.ones_like(ids)
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    names = {i.name for i in session.get_inputs()}
    output = hidden_states_output(session, hidden_size)
    (hidden,) = session.run([output], {k: v for k, v in feeds.items() if k in names})
    v = hidden.mean(axis=1)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    model_dir, out = sys.argv[1], sys.argv[2]
    src = os.path.join(model_dir, "model.onnx")
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    layers = config["num_hidden_layers"]
    model = onnx.load(src)
    weights = {i.name for i in model.graph.initializer}
    # Exclusion is by node name: name the unnamed nodes (bert_to_onnx's).
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    # The MatMuls by a weight, in graph order: the first layer's come first.
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    if len(matmuls) % layers:
        sys.exit(f"{len(matmuls)} weight MatMuls do not split into {layers} layers")
    first_layer = [n.name for n in matmuls[: len(matmuls) // layers]]
    named = out + ".named.onnx"
    onnx.save(model, named)
    try:
        quantize_dynamic(
            named,
            out,
            per_channel=True,
            op_types_to_quantize=["MatMul"],
            weight_type=QuantType.QInt8,
            nodes_to_exclude=first_layer,
        )
    finally:
        os.remove(named)
    rng = np.random.default_rng(7)
    # [CLS] ... [SEP] with ordinary word-piece ids.
    ids = np.concatenate(
        [np.full((4, 1), 101), rng.integers(1000, 20000, (4, 30)), np.full((4, 1), 102)], axis=1
    ).astype(np.int64)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    fp32 = pooled(ort.InferenceSession(src, options), ids, config["hidden_size"])
    int8 = pooled(ort.InferenceSession(out, options), ids, config["hidden_size"])
    cosine = (fp32 * int8).sum(axis=1)
    if cosine.min() < MIN_COSINE:
        sys.exit(f"int8 graph drifts from fp32: cosine {cosine.min():.4f} < {MIN_COSINE}")


if __name__ == "__main__":
    main()
