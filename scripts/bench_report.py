#!/usr/bin/env python3
"""Runs every benchmark of the project in one go and writes BENCHMARKS.md.

Called by `./x bench-report [--heavy]`. Each benchmark measures its figures
against a baseline in the same run; the custom benchmarks append them as JSON
lines to the file named by EMBEDHOST_BENCH_REPORT (benches/common/mod.rs,
`figure`), and criterion's figures are read from target/criterion. Nothing is
edited by hand: the file is this script's output.

Usage: bench_report.py [--heavy] [--out BENCHMARKS.md] [--only NAME ...]

With --only, the sections those benchmarks write replace their namesakes in
the existing file (or are added before its run times), and the rest of the
file, with the date of its own run, is kept: a note under the title says
which sections came from which run.
"""

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (cargo bench name, what it covers), in the order they run.
BENCHES = [
    ("bus", "bus overhead: in-process, child process, CBOR, WIT shapes"),
    ("native", "the cost of the child-process boundary for the onnx engine"),
    ("recovery", "request and instance recovery after a crash, planned recycles under load"),
    ("throughput", "embedding throughput per backend against Python onnxruntime"),
    ("corpus", "a mixed corpus (the Rust book) as one job through the front door, against Python onnxruntime"),
    ("index", "search latency and recall, indexing rate against the raw embedder, the search command"),
    ("serve", "the service: dynamic batching by concurrency, a sentence beside the largest legal request, the openai client, search and embed against their baselines"),
    ("nats", "the NATS transport against the child transport, three members against one"),
    ("plugins", "plugins in Rust, Python and JavaScript through the encoder import against builtin:bert, and their restarts"),
]

# Criterion pairs: (group, measured, baseline, what, which is better).
CRITERION_PAIRS = [
    ("in-process", "bus-with-middleware", "raw-oneshot",
     "in-process bus round trip, middleware on vs a raw tokio spawn + oneshot", "lower"),
    ("child-process", "bus-health", "raw-pipe-echo",
     "child-process bus round trip (`embedder.health`) vs a raw pipe echo through `cat`", "lower"),
    ("cbor", "256x384-byte-string", "256x384-float-arrays",
     "CBOR encode+decode of 256x384 f32 as a byte string vs as float arrays", "lower"),
    ("embed", "stub-32-wasm", "stub-32-native",
     "`embed` of 32 sentences through WASM (stub) vs the same code natively", "lower"),
    ("wit-shape", "flat/32", "nested/32",
     "WIT `list<f32>` (flat) vs `list<list<f32>>`, 32 x 384", "lower"),
    ("wit-shape", "flat/256", "nested/256",
     "WIT `list<f32>` (flat) vs `list<list<f32>>`, 256 x 384", "lower"),
]


def sh(*args):
    try:
        return subprocess.run(args, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine():
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "unknown"
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
            mem = f"{kb / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    lock = open(os.path.join(ROOT, "Cargo.lock")).read()

    def locked(name):
        m = re.search(r'name = "%s"\nversion = "([^"]+)"' % re.escape(name), lock)
        return m.group(1) if m else "unknown"

    deps = os.environ.get("EMBEDHOST_DEPS", os.path.join(ROOT, "target", "embedhost-deps"))
    ort_lib = "unknown"
    ort_dir = os.path.join(deps, "onnxruntime")
    if os.path.isdir(ort_dir):
        libs = sorted(n for n in os.listdir(ort_dir) if n.startswith("libonnxruntime.so."))
        if libs:
            ort_lib = libs[-1].removeprefix("libonnxruntime.so.")
    return [
        ("CPU", cpu),
        ("cores", str(os.cpu_count())),
        ("memory", mem),
        ("OS", f"{platform.system()} {platform.release()}"),
        ("rustc", sh("rustc", "--version")),
        ("wasmtime", locked("wasmtime")),
        ("ort (crate)", locked("ort")),
        ("ONNX Runtime", ort_lib),
        ("Python", platform.python_version()),
    ]


def criterion_median(group, bench):
    path = os.path.join(ROOT, "target", "criterion", group, bench, "new", "estimates.json")
    try:
        with open(path) as f:
            return json.load(f)["median"]["point_estimate"]  # nanoseconds
    except (OSError, KeyError, ValueError):
        return None


def human_ns(ns):
    if ns < 1e3:
        return f"{ns:.0f} ns"
    if ns < 1e6:
        return f"{ns / 1e3:.1f} µs"
    if ns < 1e9:
        return f"{ns / 1e6:.2f} ms"
    return f"{ns / 1e9:.2f} s"


def human(value, unit):
    if unit == "ms":
        return human_ns(value * 1e6)
    if unit == "":
        return f"{value:.3f}"
    if value >= 100:
        return f"{value:,.0f} {unit}"
    return f"{value:.1f} {unit}"


def ratio_text(value, baseline, better):
    """The figure as a multiple of its baseline, and whether that is the good
    direction (`better` says which way is)."""
    if not baseline or value is None:
        return "-"
    ratio = value / baseline
    good = ratio >= 1 if better == "higher" else ratio <= 1
    verdict = "better" if good else "worse"
    if value == 0:
        return f"none ({verdict})"
    if ratio < 0.1:
        return f"1/{1 / ratio:.0f} of the baseline ({verdict})"
    return f"{ratio:.2f}x the baseline ({verdict})"


def split(text):
    """The title part and the `## ` sections of a report, in order."""
    parts = re.split(r"(?m)^(?=## )", text)
    return parts[0], [(p.splitlines()[0], p) for p in parts[1:]]


def merged(old, new, only):
    """`old` with the benchmark sections of `new` in place of their namesakes
    (new ones before the run times), and a note saying which run wrote them."""
    head, sections = split(old)
    _, fresh = split(new)
    fresh = [(t, p) for t, p in fresh if t not in ("## Machine", "## Run time")]
    titles = [t for t, _ in sections]
    for title, part in fresh:
        if title in titles:
            sections[titles.index(title)] = (title, part)
        else:
            at = titles.index("## Run time") if "## Run time" in titles else len(sections)
            sections.insert(at, (title, part))
            titles.insert(at, title)
    note = "Sections of `%s` are from `./x bench-report --only %s` on %s, on the same machine.\n" % (
        "`, `".join(only), " ".join(only), datetime.date.today().isoformat())
    head = head.rstrip("\n") + "\n\n" + note + "\n"
    return head + "".join(p if p.endswith("\n") else p + "\n" for _, p in sections)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--heavy", action="store_true", help="add the largest sizes")
    ap.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    ap.add_argument("--only", nargs="*", help="run only these benchmarks")
    args = ap.parse_args()

    env = dict(os.environ)
    records_file = tempfile.NamedTemporaryFile(prefix="embedhost-bench-", suffix=".jsonl", delete=False)
    records_file.close()
    env["EMBEDHOST_BENCH_REPORT"] = records_file.name
    env["EMBEDHOST_BENCH_HEAVY"] = "1" if args.heavy else "0"

    timings = []
    started = time.time()
    # Build first, so each benchmark's time below is its own run.
    print("bench-report: building the benchmarks", file=sys.stderr, flush=True)
    t = time.time()
    build = ["cargo", "bench", "--locked", "-p", "embedhost", "--no-run"]
    if subprocess.run(build, cwd=ROOT, env=env).returncode != 0:
        sys.exit("bench-report: building the benchmarks failed")
    timings.append(("(building them)", time.time() - t))
    for name, what in BENCHES:
        if args.only and name not in args.only:
            continue
        print(f"bench-report: cargo bench --bench {name} ({what})", file=sys.stderr, flush=True)
        t = time.time()
        cmd = ["cargo", "bench", "--locked", "-p", "embedhost", "--bench", name]
        if name == "bus":
            # Criterion's shorter schedule: minutes instead of a quarter hour.
            cmd += ["--", "--warm-up-time", "1", "--measurement-time", "3"]
        result = subprocess.run(cmd, cwd=ROOT, env=env)
        if result.returncode != 0:
            sys.exit(f"bench-report: `{' '.join(cmd)}` failed ({result.returncode})")
        timings.append((name, time.time() - t))

    records = []
    with open(records_file.name) as f:
        records = [json.loads(line) for line in f if line.strip()]
    os.unlink(records_file.name)

    out = []
    out.append("# Benchmarks\n")
    out.append(
        "Written by `./x bench-report`%s on %s, in %.0f minutes. Every figure is measured "
        "against its baseline in the same run on the same machine; the ratio is the figure "
        "divided by its baseline, and says whether that is the good direction. Re-run the "
        "command to reproduce; each section names the benchmark that measures it. Figures "
        "move between runs on a shared 2-core machine (throughput by about 10%%).\n"
        % (" --heavy" if args.heavy else "",
           datetime.date.today().isoformat(), (time.time() - started) / 60)
    )
    out.append("## Machine\n")
    out.append("| | |\n|---|---|")
    for k, v in machine():
        out.append(f"| {k} | {v} |")
    out.append("")

    if not args.only or "bus" in args.only:
        out.append("## Bus overhead (`cargo bench --bench bus`, criterion medians)\n")
        out.append("| what | figure | baseline | ratio |\n|---|---|---|---|")
        for group, measured, baseline, what, _ in CRITERION_PAIRS:
            m, b = criterion_median(group, measured), criterion_median(group, baseline)
            if m is None or b is None:
                out.append(f"| {what} | not measured | | |")
                continue
            out.append(f"| {what} | {human_ns(m)} | {human_ns(b)} | {ratio_text(m, b, 'lower')} |")
        out.append("")

    sections = []
    for r in records:
        if r["section"] not in sections:
            sections.append(r["section"])
    for section in sections:
        rows = [r for r in records if r["section"] == section]
        command = rows[0]["command"]
        out.append(f"## {section} (`{command}`)\n")
        out.append("| what | figure | baseline (same run) | ratio |\n|---|---|---|---|")
        for r in rows:
            out.append(
                "| %s | %s | %s: %s | %s |"
                % (r["name"], human(r["value"], r["unit"]), r["baseline"],
                   human(r["baseline_value"], r["unit"]),
                   ratio_text(r["value"], r["baseline_value"], r["better"]))
            )
        out.append("")

    out.append("## Run time\n")
    out.append("| benchmark | minutes |\n|---|---|")
    for name, secs in timings:
        label = name if name.startswith("(") else f"`cargo bench --bench {name}`"
        out.append(f"| {label} | {secs / 60:.1f} |")
    out.append("")
    text = "\n".join(out)
    if args.only and os.path.exists(args.out):
        with open(args.out) as f:
            text = merged(f.read(), text, args.only)
    with open(args.out, "w") as f:
        f.write(text)
    print(f"bench-report: wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
