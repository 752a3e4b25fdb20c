"""The prepared corpus against today's path: tokenization throughput with 1 and 2 processes, and
train.py's start-up time and peak memory with a 10M- and a 100M-token corpus, raw vs prepared.
Generated text (Zipf-distributed pseudo-words in sentences and paragraphs, documents of 200-6,000
words), written once into runs/bench_data/.

    nice -n 19 python bench/bench_data.py             # all; results in runs/bench_data/results.json
    nice -n 19 python bench/bench_data.py --redo "100M tokenize"     # measure those again
    python bench/bench_data.py --profile runs/bench_data/text10M.jsonl   # CPU time of each part

Each measurement runs in a fresh process (its peak RSS is that process's ru_maxrss, its CPU time
user + system of it and its children) and is skipped when results.json already holds it, so a
killed run resumes. "today" is train.py and data.py of commit cbbc2ad (before the token store),
exported into runs/bench_data/today/: every rank read all text into Python strings, then kept one
int32 tensor per document. The 1-minute load average is recorded before and after each run: on a
shared machine other jobs slow the 2-process figure most.
"""

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "runs" / "bench_data"
TODAY = "cbbc2ad"
TRAIN = [
    "--model",
    "demo/base",
    "--train_len",
    "256",
    "--target_len",
    "2048",
    "--steps",
    "1",
    "--batch_size",
    "1",
    "--save_every",
    "0",
    "--peak_tflops",
    "1",
    "--overwrite",
]
WRAPPER = """import resource, subprocess, sys, time
start = time.perf_counter()
run = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
seconds = time.perf_counter() - start
assert run.returncode == 0, run.stderr[-3000:]
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(seconds, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime)"""
# today's path, run with the working directory runs/bench_data/today (the first entry of a -c
# process's path): cbbc2ad's data.py and tokenizer.py read every text, then encode each
TODAY_TOKENIZE = """import sys, torch
from data import read_documents
from tokenizer import load_tokenizer
tokenizer = load_tokenizer(sys.argv[2])
docs = [torch.tensor(tokenizer.encode(t), dtype=torch.int32) for t in read_documents(sys.argv[1])]
print(sum(map(len, docs)), file=sys.stderr)"""


def generate(path, n_tokens, tokenizer):
    """A .jsonl of generated documents with about `n_tokens` tokens of `tokenizer`."""
    if path.exists():
        return
    rng = random.Random(0)
    syllables = [a + b for a in "bcdfghklmnprstvwz" for b in ("a", "e", "i", "o", "u", "ai", "ou")]
    vocabulary = sorted(
        {
            "".join(rng.choices(syllables, k=rng.choice((1, 1, 2, 2, 2, 3, 3, 4))))
            for _ in range(30000)
        }
    )
    weights = [1 / (rank + 1) for rank in range(len(vocabulary))]  # Zipf, like words in text

    def document():
        words = rng.choices(vocabulary, weights, k=rng.randint(200, 6000))
        for i in range(0, len(words), 12):
            words[i] = words[i].capitalize()
            words[min(i + 11, len(words) - 1)] += "." if i % 96 else ".\n\n"
        return " ".join(words)

    sample = "".join(document() for _ in range(20))  # characters per token, measured
    chars = int(n_tokens * len(sample) / len(tokenizer.encode(sample)))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        while chars > 0:
            text = document()
            f.write(json.dumps({"text": text}) + "\n")
            chars -= len(text)
    os.replace(tmp, path)


def measure(command, cwd=ROOT):
    """Run `command` in a fresh process: seconds, peak RSS, CPU seconds, load before and after."""
    before = os.getloadavg()[0]
    run = subprocess.run(
        [sys.executable, "-c", WRAPPER, *command],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    if run.returncode:
        sys.exit(f"failed: {' '.join(map(str, command))}\n{run.stderr[-3000:]}")
    seconds, rss, cpu = map(float, run.stdout.split())
    return {
        "seconds": round(seconds, 2),
        "peak_rss_mib": round(rss),
        "cpu_seconds": round(cpu, 2),
        "load_before": round(before, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }


def profile(path):
    """CPU seconds of each part of one pass over `path`, in this process: what the reading process
    does (read, split lines, pickle the batches) against what a tokenizing process does."""
    import pickle
    import time

    from machinery import data
    from machinery.tokenizer import load_tokenizer

    data.start_worker(load_tokenizer(ROOT / "demo" / "base"))
    parts, start = {}, time.process_time()
    batches = list(data.read_batches([Path(path)]))
    parts["read and split lines"] = time.process_time() - start
    start = time.process_time()
    sent = [pickle.dumps(batch) for batch in batches]
    parts["pickle the batches"] = time.process_time() - start
    start = time.process_time()
    encoded = [data.encode_batch(batch) for batch in batches]
    parts["parse, encode, pack (tokenizing process)"] = time.process_time() - start
    start = time.process_time()
    received = [pickle.loads(pickle.dumps(e)) for e in encoded]
    parts["pickle the tokens there and back"] = time.process_time() - start
    print(
        json.dumps(
            {
                **{k: round(v, 3) for k, v in parts.items()},
                "batches": len(sent),
                "tokens": sum(len(e.tokens) for e in received),
            },
            indent=1,
        )
    )


def commands(size, text, corpus):
    """name -> command, in order: the corpus that the prepared start needs is made first."""
    py, prepare = (
        sys.executable,
        [
            sys.executable,
            "-m",
            "machinery.prepare",
            "--data",
            str(text),
            "--tokenizer",
            "demo/base",
        ],
    )
    return {
        "tokenize: prepare, 2 processes": [*prepare, "--out", str(corpus), "--workers", "2"],
        "tokenize: prepare, 1 process": [*prepare, "--out", str(OUT / "scratch"), "--workers", "1"],
        "tokenize: today": [py, "-c", TODAY_TOKENIZE, str(text), str(ROOT / "demo" / "base")],
        "train.py start: today": [
            py,
            str(OUT / "today" / "train.py"),
            *TRAIN,
            "--data",
            str(text),
            "--out",
            str(OUT / "train"),
        ],
        "train.py start: raw": [
            py,
            "train.py",
            *TRAIN,
            "--data",
            str(text),
            "--out",
            str(OUT / "train"),
        ],
        "train.py start: prepared": [
            py,
            "train.py",
            *TRAIN,
            "--data",
            str(corpus),
            "--out",
            str(OUT / "train"),
        ],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10,100", help="corpus sizes, millions of tokens (10,100)")
    ap.add_argument("--redo", default=None, help="measure again the results whose names start so")
    args = ap.parse_args()
    from machinery.tokenizer import load_tokenizer

    OUT.mkdir(parents=True, exist_ok=True)
    if not (OUT / "today").is_dir():
        (OUT / "today").mkdir()
        subprocess.run(
            f"git archive {TODAY} data.py train.py tokenizer.py model.py pose.py rope.py"
            f" | tar -x -C {OUT / 'today'}",
            shell=True,
            cwd=ROOT,
            check=True,
        )
    path = OUT / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results = {k: v for k, v in results.items() if not (args.redo and k.startswith(args.redo))}
    results["machine"] = (
        f"{os.cpu_count()} CPUs, {os.uname().machine}, Python {sys.version.split()[0]}"
    )
    tokenizer = load_tokenizer(ROOT / "demo" / "base")
    sizes = [int(s) for s in args.sizes.split(",")]
    for size in sizes:
        text, corpus = OUT / f"text{size}M.jsonl", OUT / f"corpus{size}M"
        generate(text, size * 10**6, tokenizer)
        for name, command in commands(size, text, corpus).items():
            key = f"{size}M {name}"
            if key in results or (
                size < max(sizes) and name.startswith("tokenize") and "2 processes" not in name
            ):  # throughput: the largest only
                continue
            stale = [OUT / "scratch", OUT / "scratch.partial"]
            if "2 processes" in name:
                stale += [corpus, corpus.with_name(corpus.name + ".partial")]
            subprocess.run(["rm", "-rf", *map(str, stale)], check=True)
            results[key] = measure(
                command, cwd=OUT / "today" if name == "tokenize: today" else ROOT
            )
            if name.startswith("tokenize"):  # the same text and tokenizer: the corpus's count
                tokens = json.loads((corpus / "corpus.json").read_text())["tokens"]
                results[key].update(
                    tokens=tokens, tokens_per_s=round(tokens / results[key]["seconds"])
                )
            print(key, results[key], flush=True)
            path.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--profile"]:
        profile(sys.argv[2])
    else:
        main()
