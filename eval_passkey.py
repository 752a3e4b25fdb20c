"""Passkey retrieval (Mohtashami & Jaggi 2023; PoSE Figure 2): fetch a 5-digit key from deep
inside a long prompt.

    python eval_passkey.py --model smollm2 --lengths 2048,4096,8192 --trials 5 \
        --out runs/passkey.json --plot runs/passkey.png
    python eval_passkey.py --model smollm2 --rope_scaling yarn:2 --lengths 16384 --trials 5 \
        --out runs/passkey_yarn2.json
    torchrun --nproc_per_node 2 eval_passkey.py ...  # trials split across ranks, gathered on rank 0

The prompt is Mohtashami & Jaggi's five lines (below) joined by newlines; an empty filler line is
left out. Lengths are counted in the model's own tokens: the filler is cut at a word boundary so
that the encoded prompt is the longest that fits in the requested length (a binary search on the
number of filler words, each check encodes the whole prompt), so it is at most TOLERANCE tokens
short (0–1 for SmolLM2), and that exact count is recorded. Depth d puts a fraction d of the filler
words before the key line: d=0 right after the instructions, d=1 right before the question.
Each trial draws its key (10000–99999) and depth from Random(f"{seed}:{length}:{trial}"), so it is
the same on any number of ranks and after a resume. Greedy decoding with the KV cache (a prefill
in pieces of PREFILL_CHUNK tokens, so a 128k prompt needs memory for the weights and the KV cache,
not its activations; ≤ 8 steps); correct when the first integer of the answer equals the key. The
trials of one length read the same filler up to their keys: in token order, each reuses the KV
cache of the prefix it shares with the one before (machinery/prefix.py), answers as from a fresh
prefill. The model flags, results file and ranks are machinery/evaluation.py's, as eval_ppl.py's.
"""
import argparse
import functools
import random
import re

from errors import UserError, exit_on_user_error
from machinery.evaluation import Session, add_common_args, parse_floats, pyplot, run, save
from machinery.prefix import SharedPrefix


INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
         "them. I will quiz you about the important information there.")
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again.").split()
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
TOLERANCE = 8  # tokens a prompt may fall short: the longest filler word in a byte-level tokenizer
MAX_NEW_TOKENS = 8
PREFILL_CHUNK = 4096  # prompt tokens per prefill piece (Transformer.prefill)


def filler(n_words):
    """The first `n_words` words of the filler sentences repeated, as one line."""
    return " ".join(FILLER[i % len(FILLER)] for i in range(n_words))


def build_prompt(key, before, after):
    lines = [INTRO, filler(before), KEY_LINE.format(key=key), filler(after), QUESTION]
    return "\n".join(line for line in lines if line)


def largest(fits, stop):
    """The largest n in [0, stop) with fits(n), for fits true up to some n, false after."""
    lo, hi = 0, stop
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def make_trial(tokenizer, length, trial, seed=0, depths=None, max_key_distance=None):
    """One trial's prompt, fitted to `length` tokens -> dict (prompt, key, depth, prompt_tokens,
    key_token …)."""
    rng = random.Random(f"{seed}:{length}:{trial}")
    key = rng.randint(10000, 99999)

    def count(before, after):  # tokens of the prompt, with the tokenizer's default BOS
        return len(tokenizer.encode(build_prompt(key, before, after)))

    if max_key_distance is not None:  # the filler after the key line: ≤ max_key_distance tokens
        most = largest(lambda n: len(tokenizer.encode(filler(n), bos=False)) <= max_key_distance,
                       max_key_distance + 1)
        fits = largest(lambda n: count(0, n) <= length, length + 1)  # and the prompt fits length
        after, depth = rng.randint(0, min(most, fits)), None
    else:
        depth = depths[trial % len(depths)] if depths else rng.random()

    def split(n):  # n filler words -> (words before the key line, words after it)
        if depth is None:
            return n, after
        return round(depth * n), n - round(depth * n)

    if count(*split(0)) > length:
        raise UserError(f"length {length} is shorter than the prompt without filler "
                        f"({count(*split(0))} tokens); ask for a longer length.")
    before, after = split(largest(lambda n: count(*split(n)) <= length, length + 1))
    prompt = build_prompt(key, before, after)
    tokens = tokenizer.encode(prompt)
    if length - len(tokens) > TOLERANCE:
        raise UserError(f"the tokenizer needs more than {TOLERANCE} tokens per filler word; "
                        f"cannot fit length {length}.")
    key_line_start = prompt.index(KEY_LINE.format(key=key))
    return {"length": length, "trial": trial, "key": key,
            "depth": before / max(before + after, 1) if depth is None else depth,
            "prompt_tokens": len(tokens),
            "key_token": len(tokenizer.encode(prompt[:key_line_start])),
            "prompt": prompt, "tokens": tokens}


def run_trial(model, tokenizer, trial, device, prefill_chunk=PREFILL_CHUNK, shared=None):
    """One trial's greedy answer; from the prefix that `shared` (a SharedPrefix) holds, if given."""
    shared = shared or SharedPrefix(model, device)
    generated = shared.generate(trial["tokens"], MAX_NEW_TOKENS, eos_id=tokenizer.eos_id,
                                prefill_chunk=prefill_chunk)
    answer = tokenizer.decode(generated.tolist())
    first_integer = re.search(r"\d+", answer)
    correct = first_integer is not None and int(first_integer.group()) == trial["key"]
    kept = {k: v for k, v in trial.items() if k not in ("prompt", "tokens")}
    return kept | {"answer": answer, "correct": correct}


def plot(lengths, path, sweep=False):
    """Accuracy vs length, and the depth × length map of needle-in-a-haystack papers (depth 0% on
    top, correct/trials in each cell): a row per --depths value, else 5 bins of random depths."""
    plt = pyplot()
    if plt is None:
        return
    xs = sorted(lengths, key=int)
    trials = [t for x in xs for t in lengths[x]["trials"]]
    depths = sorted({t["depth"] for t in trials})
    rows = [f"{d:.0%}" for d in depths] if sweep else [f"{20 * i}–{20 * i + 20}%" for i in range(5)]
    grid = [[[] for _ in xs] for _ in rows]
    for t in trials:
        row = depths.index(t["depth"]) if sweep else min(int(t["depth"] * 5), 4)
        grid[row][xs.index(str(t["length"]))].append(t["correct"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([int(x) for x in xs], [lengths[x]["accuracy"] for x in xs], marker="o")
    left.set(xscale="log", xlabel="prompt length (tokens)", ylabel="passkey accuracy",
             ylim=(-0.05, 1.05))
    left.set_xticks([int(x) for x in xs], xs)
    left.minorticks_off()
    accuracy = [[sum(c) / len(c) if c else float("nan") for c in r] for r in grid]
    image = right.imshow(accuracy, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for r, row in enumerate(grid):
        for c, cell in enumerate(row):
            right.text(c, r, f"{sum(cell)}/{len(cell)}" if cell else "–", ha="center", va="center")
    right.set(xticks=range(len(xs)), xticklabels=xs, yticks=range(len(rows)), yticklabels=rows,
              xlabel="prompt length (tokens)", ylabel="depth of the key in the filler")
    fig.colorbar(image, ax=right, label="accuracy")
    save(fig, path)


@exit_on_user_error
def main(argv=None):
    p = argparse.ArgumentParser(
        description="Passkey retrieval accuracy per prompt length (PoSE Figure 2b).")
    add_common_args(p)
    p.add_argument("--trials", type=int, default=50, help="trials per length (the paper: 50)")
    p.add_argument("--seed", type=int, default=0,
                   help="keys and depths are drawn from (seed, length, trial)")
    p.add_argument("--depths", type=parse_floats, default=None,
                   help="sweep these depths instead of random ones, trial i at depths[i %% len]: "
                        "0=right after the instructions, 1=right before the question; "
                        "e.g. 0,0.25,0.5,0.75,1")
    p.add_argument("--max_key_distance", type=int, default=None,
                   help="instead of a depth, put at most this many filler tokens between the "
                        "key line and the question")
    args = p.parse_args(argv)
    depths_ok = not args.depths or all(0 <= d <= 1 for d in args.depths)
    if args.trials < 1 or not depths_ok or (args.max_key_distance or 0) < 0:
        raise UserError("--trials must be ≥ 1, every --depths value between 0 and 1, and "
                        "--max_key_distance ≥ 0.")
    if args.depths and args.max_key_distance is not None:
        raise UserError("--depths and --max_key_distance both place the key; give one of them.")
    config = {"script": "eval_passkey", **{k: getattr(args, k) for k in (
        "model", "rope_scaling", "context_len", "dtype", "trials", "seed", "depths",
        "max_key_distance")}}
    session = Session(args, config)
    trial = functools.partial(make_trial, session.tokenizer, seed=args.seed, depths=args.depths,
                              max_key_distance=args.max_key_distance)
    for length in args.lengths:  # a length that cannot hold the template fails before any work
        trial(length, 0)
    for length in session.todo():
        shared = SharedPrefix(session.model, session.device)  # in token order: prefixes shared
        mine = sorted((trial(length, i) for i in range(session.rank, args.trials, session.world)),
                      key=lambda t: t["tokens"])
        records = [run_trial(session.model, session.tokenizer, t, session.device, shared=shared)
                   for t in session.progress(f"passkey {length}", iterable=mine)]
        records = sorted(session.gather(records), key=lambda r: r["trial"])
        accuracy = sum(r["correct"] for r in records) / len(records)
        session.finish(length, {"accuracy": accuracy, "trials": records})
    if session.rank == 0:
        print(f"\npasskey retrieval, {args.model}, {session.rope()}, {args.dtype}")
        print(f"{'length':>8} {'tokens':>8} {'accuracy':>9} {'correct':>8} {'seconds':>8}")
        for length in args.lengths:
            r = session.results["lengths"][str(length)]
            tokens = sum(t["prompt_tokens"] for t in r["trials"]) / len(r["trials"])
            correct = sum(t["correct"] for t in r["trials"])
            print(f"{length:>8} {tokens:>8.0f} {r['accuracy']:>9.2f} {correct:>4}/"
                  f"{len(r['trials']):<3} {r['seconds']:>8.0f}")
        if args.plot:
            plot(session.lengths(), args.plot, sweep=bool(args.depths))
    return session.results


if __name__ == "__main__":
    run(main)
