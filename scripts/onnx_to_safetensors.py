"""Writes a BERT checkpoint's weights (model.safetensors, fp32) from the
initializers of a sentence-transformers BERT exported to ONNX.

    python scripts/onnx_to_safetensors.py MODEL_DIR OUT.safetensors

MODEL_DIR holds `model.onnx` (the exported graph), `config.json` (the
Hugging Face BERT config the graph matches) and `tokenizer.json`. The
tensors get the names a Hugging Face BertModel checkpoint uses
(`embeddings.word_embeddings.weight`, `encoder.layer.0.attention.self.query.weight`,
...), which the BERT plugin and scripts/bert_to_onnx.py read.

Exporters name most initializers after the module they come from (with a
prefix such as `model.0.auto_model.`), but a Linear layer's weight often
becomes a generic `onnx::MatMul_470`, stored as MatMul's right operand:
[in, out], the transpose of the checkpoint's [out, in]. Such a weight is
named by following the graph: the MatMul it feeds (directly, or through a
Transpose) is followed by the Add of the layer's bias, whose name gives the
layer.

Every tensor's shape is checked against config.json, every tensor the
config implies must be found and every float initializer used. Then the
script checks the result: it runs the graph in onnxruntime on a padded batch
of a few texts (tokenized with tokenizer.json) and compares the graph's
token states with a float64 numpy forward pass over the written file
(scripts/bert_to_onnx.py's), failing if they differ by more than 1e-4.
Deterministic: the same graph gives the same bytes.
"""

import json
import os
import struct
import sys

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bert_to_onnx import numpy_forward, read_safetensors  # noqa: E402

# Where a checkpoint's own names start within an exporter's names.
ROOTS = ("embeddings.", "encoder.", "pooler.")
TOLERANCE = 1e-4
TEXTS = [
    "A man is eating food.",
    "hello",
    "Semantic search finds documents by what they mean rather than by the words they share.",
]


def fail(message):
    sys.exit(f"onnx_to_safetensors: {message}")


def checkpoint_name(name):
    """The checkpoint name inside an exporter's name, or None."""
    for root in ROOTS:
        at = name.find(root)
        if at == 0 or (at > 0 and name[at - 1] == "."):
            return name[at:]
    return None


def expected_shapes(config):
    """Every tensor of a BertModel (without its pooler) and its shape."""
    h, inner = config["hidden_size"], config["intermediate_size"]
    shapes = {
        "embeddings.word_embeddings.weight": [config["vocab_size"], h],
        "embeddings.position_embeddings.weight": [config["max_position_embeddings"], h],
        "embeddings.token_type_embeddings.weight": [config["type_vocab_size"], h],
        "embeddings.LayerNorm.weight": [h],
        "embeddings.LayerNorm.bias": [h],
    }
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        linears = {
            "attention.self.query": (h, h),
            "attention.self.key": (h, h),
            "attention.self.value": (h, h),
            "attention.output.dense": (h, h),
            "intermediate.dense": (inner, h),
            "output.dense": (h, inner),
        }
        for name, (out, inp) in linears.items():
            shapes[p + name + ".weight"] = [out, inp]
            shapes[p + name + ".bias"] = [out]
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[p + norm + ".weight"] = [h]
            shapes[p + norm + ".bias"] = [h]
    return shapes


def matmul_weights(graph, inits):
    """Checkpoint name -> [out, in] weight, for each MatMul whose weight is
    an initializer, named by the bias Add that follows it."""
    consumers, producer = {}, {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
        for name in node.output:
            producer[name] = node
    found = {}
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2:
            continue
        right = node.input[1]
        if right in inits:
            # x @ W: W is [in, out].
            weight = inits[right].T
        elif right in producer and producer[right].op_type == "Transpose" and producer[right].input[0] in inits:
            weight = inits[producer[right].input[0]]
            right = producer[right].input[0]
        else:
            continue  # attention's activations times activations
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [checkpoint_name(i) for a in adds for i in a.input if i in inits and i != node.output[0]]
        biases = [b for b in biases if b and b.endswith(".bias")]
        if len(biases) != 1:
            fail(f"MatMul `{node.name}` of `{right}` is not followed by one bias Add ({biases})")
        name = biases[0][: -len(".bias")] + ".weight"
        if name in found:
            fail(f"two MatMuls feed `{name}`")
        found[name] = (right, np.ascontiguousarray(weight))
    return found


def checkpoint_tensors(model, config):
    """The checkpoint's tensors (float32), named and shape-checked."""
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    tensors, used = {}, set()
    for raw, array in inits.items():
        name = checkpoint_name(raw)
        if name is not None and not name.startswith("pooler."):
            tensors[name] = array
            used.add(raw)
    for name, (raw, weight) in matmul_weights(graph, inits).items():
        if name in tensors:
            fail(f"`{name}` is both an initializer and a MatMul's weight")
        tensors[name] = weight
        used.add(raw)
    unused = [n for n, a in inits.items() if n not in used and a.dtype == np.float32 and a.ndim >= 1 and a.size > 1]
    if unused:
        fail(f"initializers not placed in the checkpoint: {unused[:5]}")
    want = expected_shapes(config)
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    if missing or extra:
        fail(f"the graph does not match config.json: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, shape in want.items():
        if list(tensors[name].shape) != shape:
            fail(f"`{name}` has shape {list(tensors[name].shape)}, config.json implies {shape}")
        if tensors[name].dtype != np.float32:
            fail(f"`{name}` is {tensors[name].dtype}, not float32")
    return tensors


def write_safetensors(tensors, path):
    """A safetensors file, tensors in name order, header padded to 8 bytes."""
    header, offset = {}, 0
    for name in sorted(tensors):
        size = tensors[name].nbytes
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in sorted(tensors):
            f.write(np.ascontiguousarray(tensors[name], dtype="<f4").tobytes())


def hidden_states_output(session, hidden):
    """The graph's token states: `last_hidden_state`, else its one float
    output of shape [batch, sequence, hidden]."""
    outputs = session.get_outputs()
    named = [o.name for o in outputs if o.name == "last_hidden_state"]
    states = [o.name for o in outputs if o.type == "tensor(float)" and len(o.shape) == 3 and o.shape[2] == hidden]
    if named or len(states) == 1:
        return (named or states)[0]
    fail(f"no single token-state output among {[(o.name, o.shape) for o in outputs]}")


def check(model_dir, graph_path, out, config):
    """The graph in onnxruntime against numpy over the written file."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tokenizer.enable_truncation(max_length=128)
    tokenizer.no_padding()
    encodings = [tokenizer.encode(t) for t in TEXTS]
    length = max(len(e.ids) for e in encodings)
    ids = np.zeros((len(TEXTS), length), np.int64)
    mask = np.zeros_like(ids)
    for row, e in enumerate(encodings):
        ids[row, : len(e.ids)] = e.ids
        mask[row, : len(e.ids)] = 1
    types = np.zeros_like(ids)
    session = ort.InferenceSession(graph_path, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    feeds = {i.name: feeds[i.name] for i in session.get_inputs()}
    (got,) = session.run([hidden_states_output(session, config["hidden_size"])], feeds)
    want = numpy_forward(read_safetensors(out), config, ids, mask.astype(np.float64), types)
    real = mask.astype(bool)
    err = float(np.abs(got[real] - want[real]).max())
    if not err < TOLERANCE:
        fail(f"the weights written differ from the graph: token states differ by {err}")
    print(f"onnx_to_safetensors: the weights give the graph's token states (max difference {err:.2e})", file=sys.stderr)


def main():
    if len(sys.argv) != 3:
        fail("usage: onnx_to_safetensors.py MODEL_DIR OUT.safetensors")
    model_dir, out = sys.argv[1], sys.argv[2]
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    if config.get("model_type") != "bert":
        fail(f"{model_dir} is a {config.get('model_type')} model, not bert")
    graph_path = os.path.join(model_dir, "model.onnx")
    tensors = checkpoint_tensors(onnx.load(graph_path), config)
    tmp = out + ".tmp"
    write_safetensors(tensors, tmp)
    check(model_dir, graph_path, tmp, config)
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
