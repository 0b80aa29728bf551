"""The baseline a user would pick instead of embedhost: Python onnxruntime
with the Hugging Face tokenizer, on the same model files, the same texts and
the same thread count.

    python scripts/bench_python_ort.py MODEL_DIR THREADS SECONDS < texts.json
    python scripts/bench_python_ort.py MODEL_DIR THREADS once < texts.json

With `once`, the batches are embedded once, without a warm-up, and the
script exits: a whole run as a user's script would make one, timed from the
outside (interpreter start, imports, model load included).

`texts.json` is a JSON list of batches (each a list of strings). The script
tokenizes each batch as sentence-transformers does (truncation at
max_seq_length, padding to the longest in the batch), runs model.onnx, mean-
pools and normalizes, repeating the batches for about SECONDS after a
warm-up, and prints one JSON object: {"sentences": N, "seconds": S}.
"""

import json
import os
import sys
import time

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


def main():
    model_dir, threads = sys.argv[1], int(sys.argv[2])
    once = sys.argv[3] == "once"
    seconds = 0.0 if once else float(sys.argv[3])
    batches = json.load(sys.stdin)
    with open(os.path.join(model_dir, "sentence_bert_config.json")) as f:
        max_len = json.load(f)["max_seq_length"]
    tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tokenizer.enable_truncation(max_length=max_len)
    tokenizer.enable_padding()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(os.path.join(model_dir, "model.onnx"), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}

    def embed(texts):
        encodings = tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        (hidden,) = session.run(None, {k: v for k, v in feeds.items() if k in names})
        m = mask[:, :, None].astype(np.float32)
        pooled = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)

    if once:
        n = sum(len(embed(batch)) for batch in batches)
        print(json.dumps({"sentences": n}))
        return
    for batch in batches:
        embed(batch)
    sentences, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for batch in batches:
            embed(batch)
            sentences += len(batch)
    print(json.dumps({"sentences": sentences, "seconds": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
