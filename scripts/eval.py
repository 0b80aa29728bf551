#!/usr/bin/env python3
"""Search quality on real documents: `./x eval [--backend native|wasm|both] [--model ID]...`.

Indexes The Rust Reference as the toolchain ships it (eval/rust-reference.toml
says which pages, and lists the questions and identifiers with the pages that
answer them), then asks every query in each mode (keyword, semantic, hybrid)
of a running `embedhost serve`, on each backend, and prints recall@5 and
MRR@10 per query class, with the issue's targets checked:

- hybrid at or above the better of keyword and semantic on every class;
- identifiers at recall@5 >= 0.9 in hybrid mode;
- questions in hybrid no worse than semantic alone.

Metrics, per query, over the distinct pages of the results in order:
recall@5 is the share of the query's answer pages among the first five;
MRR@10 is 1/rank of the first answer page among the first ten (0 if none).

Everything is kept under target/eval: the copied documents, each backend's
index (reused, so a second run only re-checks the files), the per-query
results (`<model>-<backend>-details.jsonl`) and the table (`results.md`).
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ["keyword", "semantic", "hybrid"]
# Chunks asked per query: enough for ten distinct pages in nearly every case
# (a page gives several chunks).
RESULTS_PER_QUERY = 50
# Indexing the Reference takes under a minute natively and a few minutes on
# the WASM pool on this project's 2-core machine class; a stall past this is
# a failure, not patience.
INDEX_TIMEOUT_S = 1800


def reference_dir() -> Path:
    sysroot = subprocess.run(
        ["rustc", "--print", "sysroot"], capture_output=True, text=True, check=True
    ).stdout.strip()
    path = Path(sysroot) / "share/doc/rust/html/reference"
    if not (path / "introduction.html").is_file():
        sys.exit(
            f"eval: The Rust Reference is not at {path}; it ships in rustup's "
            "`rust-docs` component (rustup component add rust-docs)"
        )
    return path


def copy_documents(source: Path, dest: Path, exclude: list[str]) -> int:
    """The HTML pages of `source` but `exclude`, mirrored into `dest`
    (unchanged files keep their times, so the index sees no change)."""
    wanted = {
        p.relative_to(source)
        for p in source.rglob("*.html")
        if str(p.relative_to(source)) not in exclude
    }
    for old in [p for p in dest.rglob("*.html")] if dest.exists() else []:
        if old.relative_to(dest) not in wanted:
            old.unlink()
    for rel in wanted:
        src, dst = source / rel, dest / rel
        if dst.exists() and dst.stat().st_size == src.stat().st_size and \
                dst.read_bytes() == src.read_bytes():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    return len(wanted)


class Service:
    """`embedhost serve` in `workdir`, on a free loopback port."""

    def __init__(self, binary: Path, workdir: Path):
        self.proc = subprocess.Popen(
            [str(binary), "serve", "--listen", "127.0.0.1:0"],
            cwd=workdir,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        urls = [w for w in line.split() if w.startswith("http://")]
        if not urls:
            self.stop()
            sys.exit(f"eval: `embedhost serve` did not start: {line!r}")
        self.url = urls[0].rstrip("/")
        deadline = time.monotonic() + 600
        while self.request("GET", "/ready")[0] != 200:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                sys.exit("eval: the service never became ready")
            time.sleep(0.2)

    def request(self, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path, data=data, method=method,
            headers={"content-type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")
        except (urllib.error.URLError, ConnectionError):
            return 0, None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def pages(results, docs: Path) -> list[str]:
    """The distinct pages of `results`, in order, relative to `docs`."""
    out = []
    for r in results:
        try:
            rel = str(Path(r["path"]).relative_to(docs))
        except ValueError:
            continue
        if rel not in out:
            out.append(rel)
    return out


def score(found: list[str], answers: list[str]) -> tuple[float, float]:
    recall = len(set(found[:5]) & set(answers)) / len(answers)
    rank = next((i + 1 for i, p in enumerate(found[:10]) if p in answers), None)
    return recall, (1.0 / rank if rank else 0.0)


# The built-in models (`models/*.toml`), each evaluated unless --model names
# some.
MODELS = ["all-minilm-l6-v2", "paraphrase-minilm-l3-v2"]


def run_backend(binary, model, backend, docs, evalset, out_dir) -> dict:
    workdir = out_dir / model / backend
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "embedhost.toml").write_text(
        f'backend = "{backend}"\n'
        "[model]\n"
        f'id = "{model}"\n'
        "[index]\n"
        'dir = "index"\n'
        "[serve]\n"
        f"index_roots = [{json.dumps(str(docs))}]\n"
        "watch = false\n"
    )
    service = Service(binary, workdir)
    try:
        started = time.monotonic()
        status, job = service.request("POST", "/index", {"paths": [str(docs)]})
        if status != 202:
            sys.exit(f"eval: POST /index answered {status}: {job}")
        while True:
            _, p = service.request("GET", "/index")
            jobs = p["jobs"] if p else []
            state = jobs[0]["state"] if jobs else "?"
            if state == "failed":
                sys.exit(f"eval: indexing failed: {jobs[0].get('error')}")
            if state == "queued" and p["queued"] == 0 and p["processing"] == 0:
                break
            if p and p.get("stalled"):
                sys.exit(f"eval: indexing stalled: {p['stalled']}")
            if time.monotonic() - started > INDEX_TIMEOUT_S:
                sys.exit("eval: indexing took too long")
            time.sleep(0.5)
        _, stats = service.request("GET", "/stats")
        print(
            f"eval: {model}, {backend}: {stats['indexed']} pages, {stats['chunks']} chunks "
            f"indexed in {time.monotonic() - started:.0f} s",
            file=sys.stderr,
        )
        scores = {}
        details = []
        for kind in ["question", "identifier"]:
            for item in evalset[kind]:
                for mode in MODES:
                    status, results = service.request(
                        "POST", "/search",
                        {"query": item["query"], "limit": RESULTS_PER_QUERY, "mode": mode},
                    )
                    if status != 200:
                        sys.exit(f"eval: search answered {status}: {results}")
                    found = pages(results, docs)
                    r, m = score(found, item["answers"])
                    scores.setdefault((kind, mode), []).append((r, m))
                    details.append({
                        "kind": kind, "mode": mode, "query": item["query"],
                        "answers": item["answers"], "found": found[:10],
                        "recall@5": r, "mrr@10": m,
                    })
        with open(out_dir / f"{model}-{backend}-details.jsonl", "w") as f:
            for d in details:
                f.write(json.dumps(d) + "\n")
        return {
            k: (sum(r for r, _ in v) / len(v), sum(m for _, m in v) / len(v))
            for k, v in scores.items()
        }
    finally:
        service.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["native", "wasm", "both"], default="both")
    parser.add_argument(
        "--model", action="append",
        help="a model id (repeatable; default: every built-in model, "
        + ", ".join(MODELS) + ")",
    )
    parser.add_argument("--bin", default="target/release/embedhost")
    parser.add_argument("--set", default=str(ROOT / "eval/rust-reference.toml"))
    args = parser.parse_args()
    evalset = tomllib.loads(Path(args.set).read_text())
    out_dir = ROOT / "target/eval"
    docs = out_dir / "docs" / evalset["source"]
    source = reference_dir()
    n = copy_documents(source, docs, evalset.get("exclude", []))
    for kind in ["question", "identifier"]:
        for item in evalset[kind]:
            for a in item["answers"]:
                if not (docs / a).is_file():
                    sys.exit(f"eval: the answer `{a}` of {item['query']!r} is not in {source}")
    rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
    backends = ["native", "wasm"] if args.backend == "both" else [args.backend]
    models = args.model or MODELS
    lines = [
        f"Search quality (`./x eval`): The Rust Reference of {rustc}, {n} pages; "
        f"{len(evalset['question'])} questions and {len(evalset['identifier'])} identifier "
        "queries (eval/rust-reference.toml).",
        "",
        "| model | backend | queries | mode | recall@5 | MRR@10 |",
        "|---|---|---|---|---|---|",
    ]
    checks = []
    for model, backend in [(m, b) for m in models for b in backends]:
        s = run_backend(Path(args.bin).resolve(), model, backend, docs, evalset, out_dir)
        who = f"{model} on {backend}"
        for kind in ["question", "identifier"]:
            for mode in MODES:
                r, m = s[(kind, mode)]
                lines.append(f"| {model} | {backend} | {kind}s | {mode} | {r:.3f} | {m:.3f} |")
            (kr, km), (sr, sm), (hr, hm) = (s[(kind, m)] for m in MODES)
            checks.append((
                f"{who}, {kind}s: hybrid at or above the better of keyword and semantic",
                hr >= max(kr, sr) and hm >= max(km, sm),
                f"recall@5 {hr:.3f} vs {max(kr, sr):.3f}, MRR@10 {hm:.3f} vs {max(km, sm):.3f}",
            ))
        hr, _ = s[("identifier", "hybrid")]
        checks.append((f"{who}, identifiers: hybrid recall@5 >= 0.9", hr >= 0.9, f"{hr:.3f}"))
        (hr, hm), (sr, sm) = s[("question", "hybrid")], s[("question", "semantic")]
        checks.append((
            f"{who}, questions: hybrid no worse than semantic",
            hr >= sr and hm >= sm,
            f"recall@5 {hr:.3f} vs {sr:.3f}, MRR@10 {hm:.3f} vs {sm:.3f}",
        ))
    lines.append("")
    for what, ok, detail in checks:
        lines.append(f"- {'met' if ok else 'NOT MET'}: {what} ({detail})")
    table = "\n".join(lines)
    print(table)
    (out_dir / "results.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
