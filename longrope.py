"""LongRoPE's search (Ding et al. 2024, section 3.2): one interpolation factor λ_j per RoPE channel
pair, found by evolution with the perplexity at the target length as the fitness.

    python -m machinery.texts --milton   # Paradise Lost: a text no evaluation reads
    OMP_NUM_THREADS=1 python longrope.py --model demo/base --data data/milton --target_len 2048 \
        --tokens 16384 --out runs/longrope/demo
    python eval_ppl.py --model demo/base --rope_scaling runs/longrope/demo/scaling.json ...
    python train.py --model demo/base --scaling runs/longrope/demo/scaling.json --target_len 2048

The space (section 3.2): λ_j in [1, s] on a 0.01 grid, s = Lt / Lo, non-decreasing in j (a slower
channel interpolated at least as much as a faster one); past Lo channel j turns by θ_j / λ_j, within
Lo by θ_j (short factors 1: the checkpoint as trained). The first --population: PI (λ_j = s), NTK
(s^(2j/(d-2))), YaRN (θ_j over transformers' yarn θ'_j) and mutations of them. Then each generation
the --parents best of all scored breed --mutations mutants (each λ_j redrawn with p = 0.3 on the
grid between its neighbours, as the authors' evolution/ code) and --crossovers children (each λ_j
from either parent, kept if non-decreasing; after 20 tries a mutant); no vector is scored twice.
Fitness: eval_ppl's sliding-window perplexity at Lt (token-weighted, every token once) over the
first --tokens tokens of the first --docs documents of --data. Defaults: LongRoPE's 64 / 40 / 16 /
16 / 32, about 1,300 evaluations. Every candidate, the seeds too, has longrope's cos/sin
temperature sqrt(1 + ln s / ln Lo).

OUT/search.json (settings, every candidate with score and origin, the best per generation, the
random state at the current generation's start) is rewritten after each generation and every
--save_every seconds: a rerun resumes exactly, reusing a half-done generation's scores (a larger
--generations searches on). OUT/scaling.json: the best in transformers' longrope form;
OUT/search.png: the curve, and the factors against PI, NTK and YaRN.

Left out: LongRoPE's n̂ (the first tokens kept unscaled): transformers' longrope has no key for it,
so a model exported with it would not reload with the same logits.
"""
import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import rope
from errors import UserError, exit_on_user_error
from eval_ppl import document_nll, select_documents
from machinery import data, search_files
from machinery.checkpoint import load
from machinery.evaluation import default_device_and_dtype, machine
from machinery.files import atomic_write

GRID = 0.01  # LongRoPE's step between factor values
P_MUTATE = 0.3  # the authors' probability that a mutation redraws a factor
CROSSOVER_TRIES = 20  # the authors' max_crossover_try
SETTINGS = ("model", "data", "target_len", "docs", "tokens", "stride", "population", "mutations",
            "crossovers", "parents", "seed", "dtype")  # a resumed search must share them


def on_grid(factors, s):
    return np.clip(np.round(np.asarray(factors, dtype=float) / GRID) * GRID, 1.0, s).round(2)


def seeds(head_dim, base, s, original):
    """PI, NTK and YaRN as factor vectors λ_j = θ_j / θ'_j, on the grid."""
    plain, _ = rope.inv_freq(head_dim, base)
    return {name: on_grid(plain / rope.inv_freq(head_dim, base, {
        "rope_type": kind, "factor": s, rope.LO: original})[0], s)
        for name, kind in (("PI", "linear"), ("NTK", "ntk"), ("YaRN", "yarn"))}


def mutate(factors, s, rng, seen):
    """Each λ_j, with p = 0.3, redrawn on the grid between its (new) left and right neighbours, 1
    and s at the ends: the vector stays non-decreasing. Tried until new; None if none is found."""
    for _ in range(1000):
        new = factors.copy()
        for j in range(len(new)):
            if rng.random() < P_MUTATE:
                low, high = new[j - 1] if j else 1.0, new[j + 1] if j + 1 < len(new) else s
                new[j] = low + GRID * rng.integers(0, round((high - low) / GRID) + 1)
        if tuple(new.round(2)) not in seen:
            return new.round(2)
    return None


def crossover(a, b, rng, seen):
    """Each λ_j from parent a or b (p = 1/2), kept when non-decreasing and new."""
    for _ in range(CROSSOVER_TRIES):
        child = np.where(rng.random(len(a)) < 0.5, a, b)
        if np.all(np.diff(child) >= 0) and tuple(child) not in seen:
            return child
    return None


def children(generation, pool, args, s, rng, seen, seed_factors):
    """The new vectors of a generation, (origin, factors): the seeds and their mutations first (0),
    then mutants and crossovers of the --parents best in `pool`."""
    if generation == 0:
        for name, factors in seed_factors.items():
            if tuple(factors) not in seen:
                yield name, factors
        while len(seen) < args.population:
            child = mutate(list(seed_factors.values())[rng.integers(3)], s, rng, seen)
            if child is None:
                return
            yield "mutation", child
        return
    parents = [np.array(c["factors"]) for c in sorted(pool, key=lambda c: c["ppl"])[:args.parents]]
    for _ in range(args.mutations):
        yield "mutation", mutate(parents[rng.integers(len(parents))], s, rng, seen)
    for _ in range(args.crossovers):
        i, j = sorted(rng.choice(len(parents), 2, replace=False))
        child = crossover(parents[i], parents[j], rng, seen)
        yield ("crossover", child) if child is not None else ("mutation", mutate(
            parents[i], s, rng, seen))


def longrope_scaling(s, original, long_factor):
    """transformers' longrope form: short factors 1 (plain RoPE within Lo), long ones searched."""
    return {"rope_type": "longrope", "factor": s, rope.LO: original, "short_factor":
            [1.0] * len(long_factor), "long_factor": [float(x) for x in long_factor]}


def perplexity(model, docs, length, stride, long_factor):
    model.args.rope_scaling["long_factor"] = [float(x) for x in long_factor]  # read by forward
    parts = [document_nll(model, ids, length, stride)[:2] for ids in docs]
    return math.exp(sum(p[0] for p in parts) / sum(p[1] for p in parts))


def evolve(state, args, s, seed_factors, score, save, generation_done):
    """Runs the generations state["generation"] .. --generations, each replayed from the random
    state at its start, so a rerun after a kill draws the same children and reuses their scores."""
    total = args.population + args.generations * (args.mutations + args.crossovers)
    bar = tqdm(total=total, initial=len(state["candidates"]), unit="candidate", desc="search")
    rng, last_save = np.random.default_rng(), time.monotonic()
    while state["generation"] <= args.generations:
        g, rng.bit_generator.state = state["generation"], state["rng"]
        pool = [c for c in state["candidates"] if c["generation"] < g]
        seen = {tuple(c["factors"]) for c in pool}
        done = {tuple(c["factors"]) for c in state["candidates"] if c["generation"] == g}
        for origin, factors in children(g, pool, args, s, rng, seen, seed_factors):
            if factors is None:  # the space around a parent is exhausted
                continue
            seen.add(tuple(factors))
            if tuple(factors) in done:  # scored before a kill
                continue
            start = time.monotonic()
            ppl = score(factors)
            state["candidates"].append({"factors": factors.tolist(), "ppl": ppl, "generation": g,
                                        "origin": origin, "seconds": time.monotonic() - start})
            bar.update()
            bar.set_postfix(best=min(c["ppl"] for c in state["candidates"]), generation=g)
            if time.monotonic() - last_save > args.save_every:
                save()
                last_save = time.monotonic()
        state["best"].append(min(c["ppl"] for c in state["candidates"]))
        state.update(generation=g + 1, rng=rng.bit_generator.state)
        save()
        generation_done()
    bar.close()


@exit_on_user_error
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", required=True, help="a checkpoint with plain RoPE (Lo: its window)")
    p.add_argument("--data", required=True, help="long text to search on (.txt/.jsonl, directory, "
                   "prepared corpus), kept out of every evaluation")
    p.add_argument("--target_len", type=int, required=True, help="Lt; s = Lt / Lo")
    p.add_argument("--docs", type=int, default=1, help="documents scored per candidate")
    p.add_argument("--tokens", type=int, default=None,
                   help="the first N tokens of each document (default: Lt, one window)")
    p.add_argument("--stride", type=int, default=None, help="between windows (default: Lt / 2)")
    for name, default, what in (("population", 64, "the first generation's size"),
                                ("generations", 40, "generations after the first"),
                                ("mutations", 16, "mutants a generation"),
                                ("crossovers", 16, "crossover children a generation"),
                                ("parents", 32, "best candidates that breed")):
        p.add_argument(f"--{name}", type=int, default=default, help=f"{what} (default: {default})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                   help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--save_every", type=float, default=60, help="seconds between state writes "
                   "within a generation (default: 60)")
    p.add_argument("--out", type=Path, required=True, help="directory for the search's files")
    p.add_argument("--overwrite", action="store_true", help="start afresh over another search")
    args = p.parse_args(argv)
    device, args.dtype = default_device_and_dtype(args.device, args.dtype)
    args.tokens = args.tokens or args.target_len
    args.stride = args.stride or args.target_len // 2
    counts = (args.docs, args.population - 3, args.parents - 1, args.mutations, args.crossovers,
              args.generations + 1, args.population - args.parents + 1,
              args.tokens - args.target_len + 1)
    if min(counts) < 1:
        raise UserError("--docs, --mutations and --crossovers must be >= 1, --population >= 4, "
                        "--parents between 2 and --population, --generations >= 0, and --tokens "
                        ">= --target_len.")
    plain, tokenizer = load(args.model, device=device)
    a = plain.args
    if a.rope_scaling or args.target_len <= a.window:
        raise UserError(f"{args.model} has RoPE {rope.kind(a.rope_scaling)} and a window of "
                        f"{a.window}: the search needs plain RoPE and a --target_len beyond its "
                        f"window (got {args.target_len}).")
    original, s, half = a.window, args.target_len / a.window, a.head_dim // 2
    seed_factors = seeds(a.head_dim, a.rope_theta, s, original)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model, _ = load(args.model, rope_scaling=longrope_scaling(s, original, [s] * half),
                    dtype=dtype, device=device)
    del plain
    corpus = data.load_corpus(args.data, tokenizer, progress=True)
    if (corpus.lengths() >= args.tokens).sum() < args.docs:
        raise UserError(f"{args.data} has fewer than --docs {args.docs} documents of --tokens "
                        f"{args.tokens} tokens (the longest has {corpus.lengths().max()}).")
    docs = [torch.tensor(d, device=device) for d in
            select_documents(corpus, args.tokens, args.docs, args.tokens)]

    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                if k in SETTINGS}
    path = args.out / "search.json"
    state = search_files.resume(path, args.overwrite, {
        "settings": settings, "Lo": original, "Lt": args.target_len, "generation": 0,
        "rng": np.random.default_rng(args.seed).bit_generator.state, "candidates": [],
        "best": [], "machine": machine()})

    def score(factors):
        return perplexity(model, docs, args.target_len, args.stride, factors)

    def generation_done():
        best = min(state["candidates"], key=lambda c: c["ppl"])
        atomic_write(args.out / "scaling.json", json.dumps(
            longrope_scaling(s, original, best["factors"]), indent=1))
        search_files.plot(state, seed_factors, args.out / "search.png")

    evolve(state, args, s, seed_factors, score, lambda: atomic_write(path, json.dumps(state)),
           generation_done)
    scores = {c["origin"]: c["ppl"] for c in state["candidates"] if c["origin"] in seed_factors}
    minutes = sum(c["seconds"] for c in state["candidates"]) / 60
    print(f"{len(state['candidates'])} candidates scored ({minutes:.1f} min); perplexity at "
          f"{args.target_len}: searched {state['best'][-1]:.3f}, "
          + ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
          + f" (longrope temperature)\nwrote {args.out / 'scaling.json'}, {path}, "
          f"{args.out / 'search.png'}")
    return state


if __name__ == "__main__":
    main()
