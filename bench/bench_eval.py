"""Evaluation speed, ours against transformers on the same model: one passkey trial and
sliding-window perplexity.

    python bench/bench_eval.py --threads 1 --length 8192 --repeats 2

Both sides hold SmolLM2-135M's weights in fp32 (exported once with save_pretrained; our worker and
transformers' LlamaForCausalLM(attn_implementation="sdpa") load that directory), each in its own
process (bench/harness.py).

passkey  one trial of eval_passkey.py at --length tokens (make_trial: seed 0, trial 0), greedy,
         ≤ 8 new tokens.
         ours: model.generate (one prefill that keeps only the last position's logits, then the KV
         cache), as eval_passkey.run_trial does. transformers: model.generate(do_sample=False,
         max_new_tokens=8) with its default DynamicCache. The answers are printed: they must agree.
ppl      eval_ppl.py's sliding window over one document of --length + --stride tokens (two windows,
         the second scoring only its last --stride tokens).
         ours: eval_ppl.document_nll (hidden states, logits formed only for the scored positions,
         1024 at a time). transformers: the loop of its perplexity guide, model(window,
         labels=window with the unscored tokens set to -100), the same windows; both NLLs are
         printed.

After a warm-up on a short input, the two implementations alternate --repeats times; we report the
best time, the load average, and peak memory over the loaded model (the KV cache, activations and
logits count, weights do not).
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch

from bench import harness


def load_model(impl, model_dir):
    if impl == "ours":
        from model import Transformer

        return harness.resident(Transformer.from_pretrained(model_dir))
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return harness.resident(
        transformers.LlamaForCausalLM.from_pretrained(
            model_dir, attn_implementation="sdpa", dtype=torch.float32
        )
    ).eval()


def setup_passkey(impl, model_dir, tokens, eos_id, max_new_tokens):
    """-> run(n_tokens=None): the greedy answer (token ids) to the prompt's first n tokens (all by
    default)."""
    model = load_model(impl, model_dir)

    @torch.inference_mode()
    def run(n_tokens=None):
        x = torch.tensor([tokens[:n_tokens]])
        if impl == "ours":
            return model.generate(x, max_new_tokens, eos_id=eos_id)[0].tolist()
        out = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
        )
        return out[0, x.shape[1] :].tolist()

    return run


def setup_ppl(impl, model_dir, ids, length, stride):
    """-> run(n_tokens=None): (summed NLL, scored tokens) of eval_ppl's windows over the document's
    first n tokens."""
    import eval_ppl

    model = load_model(impl, model_dir)

    @torch.inference_mode()
    def run(n_tokens=None):
        doc = torch.tensor(ids[:n_tokens])
        # the warm-up's short document: two windows
        window, step = min(length, len(doc)), min(stride, len(doc) // 2)
        if impl == "ours":
            nll, scored, _ = eval_ppl.document_nll(model, doc, window, step)
            return nll, scored
        nll, scored = 0.0, 0
        for begin, end, first in eval_ppl.windows(len(doc), window, step):
            window = doc[None, begin:end]
            labels = window.clone()
            # scored: ids[first:end], each predicted from the token before it
            labels[:, : first - begin] = -100
            loss = model(window, labels=labels).loss  # the mean over the scored tokens
            nll += loss.item() * (end - first)
            scored += end - first
        return nll, scored

    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--threads", type=int, required=True, help="torch / OpenMP threads of every process"
    )
    ap.add_argument(
        "--length",
        type=int,
        default=8192,
        help="passkey prompt length and perplexity window, in tokens",
    )
    ap.add_argument(
        "--stride", type=int, default=1024, help="perplexity stride (eval_ppl.py's default)"
    )
    ap.add_argument(
        "--repeats", type=int, default=2, help="timed runs per implementation, alternating"
    )
    ap.add_argument("--tasks", default="passkey,ppl", help="passkey, ppl or both")
    ap.add_argument("--json", default=None, help="also write every record to this file")
    a = ap.parse_args(argv)
    harness.set_threads(a.threads)
    print(harness.machine(a.threads))
    print(harness.load_average(), flush=True)

    import eval_passkey

    # Lt = length <= Lo = 8192: the checkpoint as it is
    model, tokenizer = harness.smollm2_for(a.length)
    model_dir = harness.export(model)
    del model
    trial = eval_passkey.make_trial(tokenizer, a.length, 0, seed=0)
    doc = harness.long_text_tokens(tokenizer, a.length + a.stride)[: a.length + a.stride].tolist()
    jobs = {
        "passkey": (
            setup_passkey,
            dict(
                tokens=trial["tokens"],
                eos_id=tokenizer.eos_id,
                max_new_tokens=eval_passkey.MAX_NEW_TOKENS,
            ),
            f"one passkey trial: {trial['prompt_tokens']} prompt tokens, key {trial['key']} at "
            f"depth {trial['depth']:.2f}, greedy, <= {eval_passkey.MAX_NEW_TOKENS} new tokens",
        ),
        "ppl": (
            setup_ppl,
            dict(ids=doc, length=a.length, stride=a.stride),
            f"sliding-window perplexity: {len(doc)} tokens of Shakespeare, windows of {a.length}, "
            f"stride {a.stride}",
        ),
    }
    summary = {}
    for task in a.tasks.split(","):
        setup, kwargs, what = jobs[task]
        print(f"\n{task}: {what}", flush=True)
        workers, records = {}, {"ours": [], "transformers": []}
        for impl in records:
            workers[impl] = harness.Worker(
                setup, a.threads, impl=impl, model_dir=str(model_dir), **kwargs
            )
            # a short input: code paths, allocator, transformers' lazy set-up
            warm = workers[impl].run(256)
            workers[impl].reset_peak()
            print(
                f"  {impl:<13} warm-up on 256 tokens {warm.get('seconds', float('nan')):6.1f} s"
                + (f"  ERROR {warm['error']}" if "error" in warm else ""),
                flush=True,
            )
        for r in range(a.repeats):
            for impl in ("ours", "transformers") if r % 2 == 0 else ("transformers", "ours"):
                record = workers[impl].run()
                records[impl].append(record)
                shown = record.get("result")
                if task == "passkey" and shown is not None:
                    shown = repr(tokenizer.decode(shown))
                elif shown is not None:
                    nll, tokens = shown
                    shown = f"NLL {nll:.4f} over {tokens} tokens, ppl {math.exp(nll / tokens):.4f}"
                print(
                    f"  round {r + 1} {impl:<13} {record.get('seconds', float('nan')):7.1f} s  "
                    f"load {record.get('load', 0):4.1f}  peak "
                    f"{harness.fmt_mib(record.get('peak_mib') or 0)}  "
                    + (f"ERROR {record['error']}" if "error" in record else str(shown)),
                    flush=True,
                )
        for worker in workers.values():
            worker.close()
        summary[task] = {}
        for impl, runs in records.items():
            ok = [r for r in runs if "seconds" in r]
            if ok:
                best = min(r["seconds"] for r in ok)
                work = trial["prompt_tokens"] if task == "passkey" else ok[0]["result"][1]
                summary[task][impl] = {
                    "best_s": best,
                    "tokens_per_s": work / best,
                    "peak_mib": max(r["peak_mib"] for r in ok),
                    "loads": [r["load"] for r in ok],
                    "result": ok[0]["result"],
                }
    print(f"\n{harness.load_average()}")
    print(
        f"{'task':<8} {'implementation':<13} {'best s':>8} {'tokens/s':>9} {'speedup':>8} "
        f"{'peak mem':>9} {'mem vs tf':>9} {'loads':>10}"
    )
    for task, by_impl in summary.items():
        tf = by_impl.get("transformers")
        for impl, s in by_impl.items():
            speedup = f"{tf['best_s'] / s['best_s']:.2f}x" if tf else "n/a"
            mem = f"{s['peak_mib'] / tf['peak_mib']:.2f}x" if tf else "n/a"
            loads = "/".join(f"{x:.1f}" for x in s["loads"])
            print(
                f"{task:<8} {impl:<13} {s['best_s']:>8.1f} {s['tokens_per_s']:>9.1f} {speedup:>8} "
                f"{harness.fmt_mib(s['peak_mib']):>9} {mem:>9} {loads:>10}"
            )
            s["speedup_vs_transformers"] = tf["best_s"] / s["best_s"] if tf else None
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(
            json.dumps(
                {
                    "args": vars(a),
                    "machine": harness.machine(a.threads),
                    "summary": summary,
                    "time": time.ctime(),
                },
                indent=1,
            )
        )
    return summary


if __name__ == "__main__":
    main()
