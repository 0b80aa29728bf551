"""The baseline a user would pick instead of embedhost: Python onnxruntime
with the Hugging Face tokenizer, on the same model files, the same texts and
the same thread count.

    python scripts/bench_python_ort.py [--sort] MODEL_DIR THREADS SECONDS < texts.json
    python scripts/bench_python_ort.py [--sort] MODEL_DIR THREADS once < texts.json
    python scripts/bench_python_ort.py [--sort] MODEL_DIR THREADS turns < texts.json

With `once`, the batches are embedded once, without a warm-up, and the
script exits: a whole run as a user's script would make one, timed from the
outside (interpreter start, imports, model load included).

With `turns`, the batches are one line of JSON on stdin, embedded once as a
warm-up; then each further line is a number of seconds: the script embeds
all the batches over and over (at least once) for about that long and
answers one line, {"sentences": N, "seconds": S}, until stdin ends. A
benchmark measuring several pipelines in turns keeps the model loaded
between its turns.

With `--sort`, the texts of all the batches are embedded as
sentence-transformers' `encode` does: ordered by length in characters,
longest first, cut into batches of the first batch's size, and put back in
the input order.

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


def by_length(batches):
    """The texts of `batches` as sentence-transformers' `encode` orders them
    (longest first), in batches of the first's size, and a function putting
    rows computed in that order back in the input order."""
    texts = [t for batch in batches for t in batch]
    size = max(len(batches[0]), 1) if batches else 1
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    sorted_batches = [[texts[i] for i in order[j:j + size]] for j in range(0, len(order), size)]
    back = np.argsort(order)
    return sorted_batches, lambda rows: rows[back]


def main():
    args = sys.argv[1:]
    sort = "--sort" in args
    args = [a for a in args if a != "--sort"]
    model_dir, threads, mode = args[0], int(args[1]), args[2]
    once, turns = mode == "once", mode == "turns"
    seconds = 0.0 if once or turns else float(mode)
    batches = json.loads(sys.stdin.readline()) if turns else json.load(sys.stdin)
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

    if sort:
        sorted_batches, put_back = by_length(batches)

        def embed_all():
            rows = put_back(np.concatenate([embed(batch) for batch in sorted_batches]))
            return len(rows)
    else:

        def embed_all():
            return sum(len(embed(batch)) for batch in batches)

    if once:
        print(json.dumps({"sentences": embed_all()}))
        return
    embed_all()
    if turns:
        for line in sys.stdin:
            print(json.dumps(run_for(embed_all, float(line))), flush=True)
        return
    print(json.dumps(run_for(embed_all, seconds)))


def run_for(embed_all, seconds):
    """Embeds all the batches again and again for about `seconds` (at least
    once): the texts and the time they took."""
    sentences, start = 0, time.perf_counter()
    while True:
        sentences += embed_all()
        if time.perf_counter() - start >= seconds:
            return {"sentences": sentences, "seconds": time.perf_counter() - start}


if __name__ == "__main__":
    main()
