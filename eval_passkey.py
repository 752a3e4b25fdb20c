"""Passkey retrieval (Mohtashami & Jaggi 2023; PoSE Figure 2): fetch a 5-digit key from deep inside a long prompt.

    python eval_passkey.py --model smollm2 --lengths 2048,4096,8192 --trials 5 --out runs/passkey.json --plot runs/passkey.png
    python eval_passkey.py --model smollm2 --rope_scaling yarn:2 --lengths 16384 --trials 5 --out runs/passkey_yarn2.json
    torchrun --nproc_per_node 2 eval_passkey.py ...      # trials split across ranks, gathered on rank 0

The prompt is Mohtashami & Jaggi's five lines (below) joined by newlines; an empty filler line is left out. Lengths are counted in
the model's own tokens: the filler is cut at a word boundary so that the encoded prompt is the longest that fits
in the requested length (a binary search on the number of filler words, each check encodes the whole prompt), so
it is at most TOLERANCE tokens short (0–1 for SmolLM2), and that exact count is recorded. Depth d puts a fraction
d of the filler words before the key line: d=0 right after the instructions, d=1 right before the question.
Each trial draws its key (10000–99999) and depth from Random(f"{seed}:{length}:{trial}"), so it is the same on
any number of ranks and after a resume. Greedy decoding with the KV cache (`model.generate`: a
prefill in pieces of PREFILL_CHUNK tokens, ≤ 8 steps, logits for the last position only); correct
when the first integer of the answer equals the key. The pieces give the one-pass logits and keep
activations to one piece's: a 128k prompt needs memory for the weights and the KV cache, not for
128k tokens of activations.
The bottom of this file (model flags, the resumable results file, ranks) is shared with eval_ppl.py.
"""
import argparse
import json
import os
import platform
import random
import re
import sys
import time
from pathlib import Path

import torch

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
         "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.".split()
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
TOLERANCE = 8  # tokens a prompt may fall short of its length: the longest filler word in a byte-level tokenizer
MAX_NEW_TOKENS = 8
PREFILL_CHUNK = 4096  # prompt tokens per prefill piece (Transformer.prefill)


def filler(n_words):
    """The first `n_words` words of the filler sentences repeated, as one line."""
    return " ".join(FILLER[i % len(FILLER)] for i in range(n_words))


def build_prompt(key, before, after):
    lines = [INTRO, filler(before), KEY_LINE.format(key=key), filler(after), QUESTION]
    return "\n".join(line for line in lines if line)


def largest(fits, stop):
    """The largest n in [0, stop) with fits(n), for fits true up to some n and false after (binary search)."""
    lo, hi = 0, stop
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def make_trial(tokenizer, length, trial, seed=0, depths=None, max_key_distance=None):
    """One trial's prompt, fitted to `length` tokens -> dict (prompt, key, depth, prompt_tokens, key_token …)."""
    rng = random.Random(f"{seed}:{length}:{trial}")
    key = rng.randint(10000, 99999)
    count = lambda text: len(tokenizer.encode(text))  # noqa: E731 (with the tokenizer's default BOS)
    if max_key_distance is not None:  # the filler after the key line holds at most max_key_distance tokens
        most = largest(lambda n: len(tokenizer.encode(filler(n), bos=False)) <= max_key_distance, max_key_distance + 1)
        fits = largest(lambda n: count(build_prompt(key, 0, n)) <= length, length + 1)  # and the prompt fits length
        after = rng.randint(0, min(most, fits))
        split, depth = (lambda n: (n, after)), None  # noqa: E731
    else:
        depth = depths[trial % len(depths)] if depths else rng.random()
        split = lambda n: (round(depth * n), n - round(depth * n))  # noqa: E731
    if count(build_prompt(key, *split(0))) > length:
        raise ValueError(f"length {length} is shorter than the prompt without filler "
                         f"({count(build_prompt(key, *split(0)))} tokens); ask for a longer length.")
    before, after = split(largest(lambda n: count(build_prompt(key, *split(n))) <= length, length + 1))
    prompt = build_prompt(key, before, after)
    tokens = tokenizer.encode(prompt)
    if length - len(tokens) > TOLERANCE:
        raise ValueError(f"the tokenizer needs more than {TOLERANCE} tokens per filler word; cannot fit length {length}.")
    key_line_start = prompt.index(KEY_LINE.format(key=key))
    return {"length": length, "trial": trial, "key": key, "depth": before / max(before + after, 1) if depth is None else depth,
            "prompt_tokens": len(tokens), "key_token": len(tokenizer.encode(prompt[:key_line_start])),
            "prompt": prompt, "tokens": tokens}


@torch.inference_mode()
def run_trial(model, tokenizer, trial, device, prefill_chunk=PREFILL_CHUNK):
    tokens = torch.tensor([trial["tokens"]], device=device)
    generated = model.generate(tokens, MAX_NEW_TOKENS, eos_id=tokenizer.eos_id,
                               prefill_chunk=prefill_chunk)
    answer = tokenizer.decode(generated[0].tolist())
    first_integer = re.search(r"\d+", answer)
    correct = first_integer is not None and int(first_integer.group()) == trial["key"]
    return {k: v for k, v in trial.items() if k not in ("prompt", "tokens")} | {"answer": answer, "correct": correct}


def plot(lengths, path, sweep=False):
    """Accuracy vs length, and a depth × length heatmap: one row per --depths value, else 5 bins of random depths."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return print("--plot needs matplotlib (pip install matplotlib); no figure written.")
    xs = sorted(lengths, key=int)
    trials = [t for x in xs for t in lengths[x]["trials"]]
    depths = sorted({t["depth"] for t in trials})
    rows = [f"{d:.2f}" for d in depths] if sweep else [f"{i / 5:.1f}–{(i + 1) / 5:.1f}" for i in range(5)]
    row = lambda d: depths.index(d) if sweep else min(int(d * 5), 4)  # noqa: E731
    grid = [[[] for _ in xs] for _ in rows]
    for t in trials:
        grid[row(t["depth"])][xs.index(str(t["length"]))].append(t["correct"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([int(x) for x in xs], [lengths[x]["accuracy"] for x in xs], marker="o")
    left.set(xscale="log", xlabel="prompt length (tokens)", ylabel="passkey accuracy", ylim=(-0.05, 1.05))
    left.set_xticks([int(x) for x in xs], xs)
    left.minorticks_off()
    image = right.imshow([[sum(c) / len(c) if c else float("nan") for c in r] for r in grid], vmin=0, vmax=1,
                         cmap="RdYlGn", aspect="auto", origin="lower")
    right.set(xticks=range(len(xs)), xticklabels=xs, yticks=range(len(rows)), yticklabels=rows,
              xlabel="prompt length (tokens)", ylabel="depth of the key")
    fig.colorbar(image, ax=right, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description="Passkey retrieval accuracy per prompt length (PoSE Figure 2b).")
    add_common_args(p)
    p.add_argument("--trials", type=int, default=50, help="trials per length (the paper: 50)")
    p.add_argument("--seed", type=int, default=0, help="keys and depths are drawn from (seed, length, trial)")
    p.add_argument("--depths", type=parse_floats, default=None,
                   help="sweep these depths instead of random ones, trial i at depths[i %% len]: 0=right after the "
                        "instructions, 1=right before the question; e.g. 0,0.25,0.5,0.75,1")
    p.add_argument("--max_key_distance", type=int, default=None,
                   help="instead of a depth, put at most this many filler tokens between the key line and the question")
    args = p.parse_args(argv)
    if args.trials < 1 or (args.depths and not all(0 <= d <= 1 for d in args.depths)) or (args.max_key_distance or 0) < 0:
        fail("--trials must be ≥ 1, every --depths value between 0 and 1, and --max_key_distance ≥ 0.")
    if args.depths and args.max_key_distance is not None:
        fail("--depths and --max_key_distance both place the key; give one of them.")
    config = {"script": "eval_passkey", **{k: getattr(args, k) for k in (
        "model", "rope_scaling", "context_len", "dtype", "trials", "seed", "depths",
        "max_key_distance")}}
    session = Session(args, config)
    trial = lambda length, i: make_trial(session.tokenizer, length, i, args.seed, args.depths, args.max_key_distance)  # noqa: E731
    try:
        [trial(length, 0) for length in args.lengths]  # a length that cannot hold the template fails before any work
    except ValueError as e:
        fail(str(e))
    for length in session.todo():
        records = [run_trial(session.model, session.tokenizer, trial(length, i), session.device)
                   for i in session.progress(f"passkey {length}", iterable=range(session.rank, args.trials, session.world))]
        records = sorted(session.gather(records), key=lambda r: r["trial"])
        accuracy = sum(r["correct"] for r in records) / len(records)
        session.finish(length, {"accuracy": accuracy, "trials": records})
    if session.rank == 0:
        print(f"\npasskey retrieval, {args.model}, rope_scaling {args.rope_scaling}, {args.dtype}")
        print(f"{'length':>8} {'tokens':>8} {'accuracy':>9} {'correct':>8} {'seconds':>8}")
        for length in args.lengths:
            r = session.results["lengths"][str(length)]
            tokens = sum(t["prompt_tokens"] for t in r["trials"]) / len(r["trials"])
            print(f"{length:>8} {tokens:>8.0f} {r['accuracy']:>9.2f} {sum(t['correct'] for t in r['trials']):>4}/"
                  f"{len(r['trials']):<3} {r['seconds']:>8.0f}")
        if args.plot:
            plot({str(n): session.results["lengths"][str(n)] for n in args.lengths}, args.plot, sweep=bool(args.depths))
    return session.results


# ---- shared with eval_ppl.py: model flags, the resumable results file, ranks ----------------------------------

def fail(message):
    sys.exit(f"error: {message}")


def parse_floats(text):
    return [float(x) for x in text.split(",") if x]


def parse_lengths(text):
    try:
        lengths = sorted({int(x) for x in text.split(",") if x})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts such as 2048,4096, got {text!r}")
    if not lengths or lengths[0] < 1:
        raise argparse.ArgumentTypeError(f"expected positive token counts, got {text!r}")
    return lengths


def parse_scaling(text):
    """"TYPE:FACTOR" (yarn:2, linear:4 …), "none", or a JSON dict with Hugging Face's rope_scaling keys."""
    if text.lower() in ("none", "default"):
        return None
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"--rope_scaling is not valid JSON ({e})")
    kind, _, factor = text.partition(":")
    try:
        assert kind in ("linear", "ntk", "dynamic", "yarn")
        return {"rope_type": kind, "factor": float(factor)}
    except (AssertionError, ValueError):
        raise argparse.ArgumentTypeError(f"expected TYPE:FACTOR with TYPE linear, ntk, dynamic or yarn (e.g. yarn:2), "
                                         f"or a JSON dict, got {text!r}")


def add_common_args(p):
    p.add_argument("--model", required=True, help="Hugging Face dir, Meta dir, .gguf file, or smollm2")
    p.add_argument("--rope_scaling", type=parse_scaling, default=None,
                   help="a training-free scaling: TYPE:FACTOR (linear:2, ntk:2, dynamic:2, "
                        "yarn:2) stretches the checkpoint's window by FACTOR (on a checkpoint "
                        "that already carries a scaling: its own type, factor multiplied); a "
                        "JSON dict with Hugging Face's keys and an "
                        "original_max_position_embeddings replaces the checkpoint's scaling")
    p.add_argument("--lengths", type=parse_lengths, required=True, help="comma-separated lengths in tokens")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                   help="default: bf16 on CUDA (as train.py), fp32 on CPU")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--context_len", type=int, default=None,
                   help="the trained context of a Meta checkpoint, whose params.json does not "
                        "state it (default: a guess from its settings, printed)")
    p.add_argument("--out", required=True, help="results JSON, rewritten after each length; a rerun skips done lengths")
    p.add_argument("--overwrite", action="store_true", help="start afresh when --out holds results of other settings")
    p.add_argument("--plot", default=None, help="also draw a figure to this .png")


def default_device_and_dtype(device, dtype):
    """(device, dtype) with the defaults filled in: CUDA when present, and there bf16 as in
    train.py (in fp32, SDPA's GQA has only the math kernel, a T×S score matrix; model.attend then
    copies the KV heads instead)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, dtype or ("bf16" if device.startswith("cuda") else "fp32")


def machine():
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"{os.cpu_count()}-core CPU ({platform.machine()}), torch {torch.__version__}"


class Session:
    """The model, this process's rank, and the results file: resumed when its settings match, else refused."""

    def __init__(self, args, config):
        self.args, self.out = args, Path(args.out)
        self.world, self.rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
        self.device, args.dtype = default_device_and_dtype(args.device, args.dtype)
        config["dtype"] = args.dtype
        if self.world > 1:
            if self.device == "cuda":
                self.device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
                torch.cuda.set_device(self.device)
            torch.distributed.init_process_group("nccl" if self.device.startswith("cuda") else "gloo")
        self.config = json.loads(json.dumps(config))  # as it will read back from the file
        self.results = {"config": self.config, "lengths": {}}
        if self.out.exists() and not args.overwrite:
            try:
                stored = json.loads(self.out.read_text())
                assert isinstance(stored, dict) and isinstance(stored.get("lengths"), dict)
            except (OSError, ValueError, AssertionError):
                fail(f"{self.out} exists but is not a results file; pass --overwrite to replace it or choose another --out.")
            if stored.get("config") != self.config:
                differ = sorted(k for k in self.config.keys() | (stored.get("config") or {}).keys()
                                if self.config.get(k) != (stored.get("config") or {}).get(k))
                fail(f"{self.out} holds results for other settings ({', '.join(differ)} differ); "
                     "pass --overwrite to replace them or choose another --out.")
            self.results = stored
        try:
            from model import load
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
            self.model, self.tokenizer = load(args.model, rope_scaling=args.rope_scaling,
                                              dtype=dtype, device=self.device,
                                              context_len=args.context_len)
        except Exception as e:  # noqa: BLE001 — any failure to load is the user's path or file: one sentence
            reason = str(e).strip().split("\n")[0] if isinstance(e, ValueError) else f"{type(e).__name__}: {e}".split("\n")[0]
            fail(f"could not load the model {args.model}: {reason}")
        self.started = time.time()

    def todo(self):
        """The requested lengths not already in the results file, printing the ones skipped."""
        done = [n for n in self.args.lengths if str(n) in self.results["lengths"]]
        if done and self.rank == 0:
            print(f"{self.out} already holds lengths {done}: skipped.")
        return [n for n in self.args.lengths if str(n) not in self.results["lengths"]]

    def progress(self, description, **kwargs):
        from tqdm import tqdm
        return tqdm(desc=description, disable=self.rank != 0, **kwargs)

    def gather(self, records):
        if self.world == 1:
            return records
        everything = [None] * self.world
        torch.distributed.all_gather_object(everything, records)
        return [r for part in everything for r in part]

    def finish(self, length, record):
        """Store one length's results and rewrite the file whole (temp file + rename): a killed run keeps them."""
        lengths = self.results["lengths"] | {str(length): record | {
            "seconds": round(time.time() - self.started, 1), "machine": machine(), "world_size": self.world}}
        self.results["lengths"] = dict(sorted(lengths.items(), key=lambda item: int(item[0])))
        self.started = time.time()
        if self.rank == 0:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.out.with_name(self.out.name + ".tmp")
            tmp.write_text(json.dumps(self.results, indent=1))
            os.replace(tmp, self.out)


if __name__ == "__main__":
    main()
