"""A passkey sweep that shares its filler: --trials trials at one length, ours against transformers'
generate trial by trial, on SmolLM2-135M in fp32.

    python bench/bench_prefix.py --threads 2 --length 4096 --trials 10

ours          eval_passkey.py's loop: the trials in token order, each run by run_trial from the KV
              cache of the prefix it shares with the one before (machinery/prefix.py).
transformers  LlamaForCausalLM(attn_implementation="sdpa").generate(do_sample=False,
              max_new_tokens=8) for each trial, its default DynamicCache built afresh each time.
The trials are eval_passkey.make_trial's (seed 0, random depths). Both sides load the same exported
directory, each in its own process (bench/harness.py); after a warm-up on two short prompts each
runs the sweep once. The answers must be equal, trial by trial; the tokens each side prefilled are
printed with the times.

    python bench/bench_prefix.py --threads 2 --attention

times instead where the time of a shared prefix goes: one layer's SDPA (SmolLM2's 9 query and 3 KV
heads of 64) for a fresh 4k prompt and for 2,048 new tokens after 2,048 cached (a (T, S) mask, the
cache and the new tokens apart merged by log-sum-exp as model.attend does, zero queries in front,
and no mask at all), then whole-model prefills of 4,096 tokens
fresh and of the last 2,048 and 1,024 after a cache.
"""
import argparse
import json
import time
from pathlib import Path

import torch

from bench import harness
from bench.bench_eval import load_model
from machinery.files import atomic_write
from machinery.prefix import common_prefix


def setup_sweep(impl, model_dir, trials, eos_id):
    """-> run(n_tokens=None): {trial: answer} for every trial (its prompt's first n tokens)."""
    import eval_passkey
    from machinery.prefix import SharedPrefix
    from machinery.tokenizer import load_tokenizer

    model, tokenizer = load_model(impl, model_dir), load_tokenizer(model_dir)

    @torch.inference_mode()
    def run(n_tokens=None):
        chosen = [t | {"tokens": t["tokens"][:n_tokens]} for t in trials]
        if impl == "ours":
            shared = SharedPrefix(model, "cpu")
            return {t["trial"]: eval_passkey.run_trial(model, tokenizer, t, "cpu",
                                                       shared=shared)["answer"]
                    for t in sorted(chosen, key=lambda t: t["tokens"])}
        answers = {}
        for t in chosen:
            x = torch.tensor([t["tokens"]])
            out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                 max_new_tokens=eval_passkey.MAX_NEW_TOKENS, eos_token_id=eos_id,
                                 pad_token_id=eos_id)
            answers[t["trial"]] = tokenizer.decode(out[0, x.shape[1]:].tolist())
        return answers

    return run


def best_ms(f, repeats=3):
    f()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - start)
    return best * 1000


@torch.inference_mode()
def attention_times(length=4096):
    """Print where the time of the tokens after a shared prefix goes (see the docstring)."""
    from model import attend_split

    sdpa = torch.nn.functional.scaled_dot_product_attention
    new, heads, kv_heads, head_dim = length // 2, 9, 3, 64
    q = torch.randn(1, heads, new, head_dim)
    k, v = torch.randn(2, 1, kv_heads, length, head_dim)
    fresh_q = torch.randn(1, heads, length, head_dim)
    mask = torch.ones(new, length, dtype=torch.bool).tril(length - new)
    padded = torch.cat([q.new_zeros(1, heads, length - new, head_dim), q], dim=2)
    for what, f in (
            (f"fresh {length}-token prompt, is_causal",
             lambda: sdpa(fresh_q, k, v, is_causal=True, enable_gqa=True)),
            (f"{new} new after {length - new} cached, bool mask",
             lambda: sdpa(q, k, v, attn_mask=mask, enable_gqa=True)),
            (f"{new} new after {length - new} cached, split and merged (model.attend_split)",
             lambda: attend_split(q, k, v)),
            (f"{new} new after {length - new} cached, zero queries in front, is_causal",
             lambda: sdpa(padded, k, v, is_causal=True, enable_gqa=True)),
            (f"{new} x {length}, no mask", lambda: sdpa(q, k, v, enable_gqa=True))):
        print(f"  one layer's attention, {what}: {best_ms(f):.0f} ms", flush=True)
    model, _ = harness.smollm2_for(length)
    ids = torch.randint(0, 40000, (1, length), generator=torch.Generator().manual_seed(0))

    def prefill_after(cached):
        cache = model.make_cache(1, length)
        if cached:
            model.prefill(ids[:, :cached], cache)
        start = time.perf_counter()
        model.prefill(ids[:, cached:], cache)
        return time.perf_counter() - start

    prefill_after(length - 256)  # warm-up
    for cached in (0, length // 2, 3 * length // 4):
        print(f"  whole-model prefill of {length - cached} tokens after {cached} cached: "
              f"{prefill_after(cached):.1f} s", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, required=True, help="torch / OpenMP threads")
    ap.add_argument("--length", type=int, default=4096, help="prompt length in tokens")
    ap.add_argument("--trials", type=int, default=10, help="trials in the sweep")
    ap.add_argument("--json", default=None, help="also write the records to this file")
    ap.add_argument("--attention", action="store_true",
                    help="time attention and prefills after a cache instead (see above)")
    a = ap.parse_args(argv)
    harness.set_threads(a.threads)
    print(harness.machine(a.threads))
    print(harness.load_average(), flush=True)
    if a.attention:
        attention_times(a.length)
        print(harness.load_average())
        return 0

    import eval_passkey

    model, tokenizer = harness.smollm2_for(a.length)
    model_dir = harness.export(model, tokenizer)
    del model
    trials = [eval_passkey.make_trial(tokenizer, a.length, i) for i in range(a.trials)]
    ordered = sorted(trials, key=lambda t: t["tokens"])
    total = sum(len(t["tokens"]) for t in trials)
    shared = len(ordered[0]["tokens"]) + sum(
        len(t["tokens"]) - min(common_prefix(before["tokens"], t["tokens"]), len(t["tokens"]) - 1)
        for before, t in zip(ordered, ordered[1:]))
    depths = ", ".join(f"{t['depth']:.2f}" for t in trials)
    print(f"{a.trials} trials of {a.length} tokens, depths {depths}: {total} prompt tokens; "
          f"prefilled with the shared prefix: {shared} ({total / shared:.2f}x fewer)", flush=True)
    records = {}
    for impl in ("ours", "transformers"):  # one after the other, each in its own process
        worker = harness.Worker(setup_sweep, a.threads, impl=impl, model_dir=str(model_dir),
                                trials=trials, eos_id=tokenizer.eos_id)
        worker.run(256)  # warm-up on the prompts' first 256 tokens: code paths, allocator
        worker.reset_peak()
        records[impl] = worker.run()
        worker.close()
        r = records[impl]
        print(f"  {impl:<13} {r.get('seconds', float('nan')):7.1f} s  load {r.get('load', 0):4.1f}"
              f"  peak {harness.fmt_mib(r.get('peak_mib') or 0)}"
              + (f"  ERROR {r['error']}" if "error" in r else ""), flush=True)
    ours, theirs = records["ours"], records["transformers"]
    equal = ours.get("result") == theirs.get("result")
    speedup = theirs["seconds"] / ours["seconds"]
    print(f"\nanswers equal: {equal}; speed-up {speedup:.2f}x; answers "
          f"{json.dumps(ours.get('result'))}")
    print(harness.load_average())
    if a.json:
        path = Path(a.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps({"length": a.length, "trials": a.trials, "speedup": speedup,
                                       "answers_equal": equal, "prompt_tokens": total,
                                       "prefilled_shared": shared, "records": records}, indent=1))
    return 0 if equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
