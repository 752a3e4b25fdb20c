"""One PoSE training step, ours against transformers' LlamaForCausalLM on the same work: tokens/s,
peak memory, MFU.

    python bench/bench_train.py --threads 1 --repeats 2 --profile    # fp32, Lc 2048 -> Lt 16384
    python bench/bench_train.py --threads 1 --dtype bfloat16 --repeats 3 --profile   # bf16 autocast

bf16 is fast on a CPU only with AVX512-BF16 or AMX; without (AVX2), a bf16 matmul is ~70x slower
than fp32 and only a short step (--train_len 64) is affordable.

The same work for every implementation: SmolLM2-135M's weights (exported once with save_pretrained;
our worker and transformers both load that directory), RoPE scaled for Lt as train.py does (linear
PI, s = Lt / Lo), one PoSE batch (pose.make_example on Shakespeare, next-token targets with the
chunk-boundary label masked), the same dtype (fp32, or train.py's bf16 autocast over fp32 weights),
threads, AdamW (train.py's settings), clipping at 1.0. A step is what train.py does: forward and
backward per micro batch (loss summed, divided by the batch's target count), clip, AdamW step,
zero_grad. Implementations:

    ours            model(x, positions, targets=y): the loss over 256-row chunks, logits never
                    whole (model.py), as train.py computes its loss
    ours+compile    the same, each TransformerBlock compiled with torch.compile, as train.py
                    --compile does
    ours-logits     model(x, positions) -> (B, T, vocab) logits -> F.cross_entropy: the plain
                    loss, for comparison
    transformers    LlamaForCausalLM(attn_implementation="sdpa")(x, position_ids,
                    attention_mask=ones, labels=y, shift_labels=y, use_cache=False): its own loss
                    over the same targets

attention_mask=ones matters: with no mask and no cache, transformers reads a PoSE jump in
position_ids as the start of a new packed sequence and masks attention between chunks (wrong for
PoSE, and a (T, T) mask off the flash kernel).

Each implementation is a worker process (bench/harness.py): a warm-up step (compilation included,
timed apart), then --repeats rounds in which the implementations run one after another, in turn,
never at once. We report the best step of each (a shared machine only ever slows a step down), the
load average at each, peak memory over the weights, the ratio to transformers, and MFU: training
FLOPs (train.training_flops: 6 x params + causal attention) per second over the machine's
matmul ceiling, the fastest n x n matmul in the same dtype and thread count, measured in the same
run.
"""

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import harness
from train import training_flops

IMPLS = ("ours", "ours+compile", "ours-logits", "transformers")


OPERATOR_GROUPS = ("matmul", "attention", "log-softmax / NLL", "other")


def operator_group(name):
    """matmul (MKL GEMMs), attention (SDPA's flash kernel, forward and backward), the loss's
    log-softmax and NLL, and everything else: norms, RoPE, SwiGLU, residual adds, copies, AdamW and
    clipping."""
    if "scaled_dot_product" in name:
        return "attention"
    if name in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"):
        return "matmul"
    if "softmax" in name or "nll_loss" in name:
        return "log-softmax / NLL"
    return "other"


def setup_step(impl, model_dir, batch, dtype, micro_batch_size=1, checkpointing=False, lr=2e-5):
    """-> step(): one training step of `impl` on `batch` (tokens, positions, targets), returning its
    mean loss."""
    tokens, positions, targets = batch
    torch.manual_seed(0)
    if impl == "transformers":
        import transformers
        from transformers import LlamaForCausalLM

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        model = LlamaForCausalLM.from_pretrained(
            model_dir, attn_implementation="sdpa", dtype=torch.float32
        )
        if checkpointing:
            model.gradient_checkpointing_enable()

        def summed_loss(x, p, y):
            out = model(
                input_ids=x,
                position_ids=p,
                attention_mask=torch.ones_like(x),
                labels=y,
                shift_labels=y,
                use_cache=False,
            )
            return out.loss * (y != -100).sum()  # its loss is the mean over y's targets
    else:
        from model import Transformer

        model = Transformer.from_pretrained(model_dir)
        model.gradient_checkpointing = checkpointing
        if impl == "ours+compile":
            for block in model.layers:
                block.compile()  # in place; the blocks share one compiled graph

        def summed_loss(x, p, y):
            if impl == "ours-logits":
                logits = model(x, p)  # (B, T, vocab)
                return F.cross_entropy(
                    logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum"
                )
            return model(x, p, targets=y) * (y != -100).sum()

    harness.resident(model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    autocast = (
        torch.autocast("cpu", torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()
    )

    def step(n_tokens=None, profile=False):
        """n_tokens: the first n of every example only (a cheap warm-up that creates AdamW's state).
        -> {"loss": mean loss, seconds of "forward" (and loss), "backward", "optimizer" (clip, step,
        zero_grad)}, with `profile` also the self time of torch's operators in four groups
        (OPERATOR_GROUPS)."""
        x, p, y = (t[:, :n_tokens] for t in (tokens, positions, targets))
        n_targets = int((y != -100).sum())
        seconds = dict.fromkeys(("forward", "backward", "optimizer"), 0.0)
        total = 0.0
        with torch.profiler.profile() if profile else contextlib.nullcontext() as profiler:
            for start in range(0, len(x), micro_batch_size):
                rows = slice(start, start + micro_batch_size)
                begin = time.perf_counter()
                with autocast:
                    loss = summed_loss(x[rows], p[rows], y[rows])
                middle = time.perf_counter()
                (loss / n_targets).backward()
                total += loss.item()
                seconds["forward"] += middle - begin
                seconds["backward"] += time.perf_counter() - middle
            begin = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds["optimizer"] = time.perf_counter() - begin
        result = {"loss": total / n_targets, **seconds}
        if profile:
            result["operators"] = dict.fromkeys(OPERATOR_GROUPS, 0.0)
            for event in profiler.key_averages():
                # self time: nested operators are not counted twice
                if event.key.startswith("aten::"):
                    result["operators"][operator_group(event.key)] += (
                        event.self_cpu_time_total / 1e6
                    )
        return result

    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--threads", type=int, required=True, help="torch / OpenMP threads of every process"
    )
    ap.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="compute dtype; bf16 is autocast over fp32 weights, as train.py does",
    )
    ap.add_argument("--train_len", type=int, default=2048, help="Lc, tokens per example")
    ap.add_argument(
        "--target_len",
        type=int,
        default=16384,
        help="Lt: positions drawn from 0..Lt-1, RoPE scaled",
    )
    ap.add_argument("--batch_size", type=int, default=1, help="examples per step")
    ap.add_argument("--micro_batch_size", type=int, default=1, help="examples per forward pass")
    ap.add_argument(
        "--repeats", type=int, default=3, help="timed steps per implementation, after one warm-up"
    )
    ap.add_argument(
        "--impls", default=",".join(IMPLS), help=f"comma-separated subset of {', '.join(IMPLS)}"
    )
    ap.add_argument(
        "--profile", action="store_true", help="then one profiled step each: where the time goes"
    )
    ap.add_argument("--json", default=None, help="also write every record to this file")
    a = ap.parse_args(argv)
    impls = a.impls.split(",")
    if unknown := set(impls) - set(IMPLS):
        sys.exit(f"error: unknown --impls {sorted(unknown)}; choose from {', '.join(IMPLS)}")
    harness.set_threads(a.threads)
    print(harness.machine(a.threads))
    print(harness.load_average(), flush=True)

    model, tokenizer = harness.smollm2_for(a.target_len)
    args = model.args
    model_dir = harness.export(model)
    doc = harness.long_text_tokens(tokenizer, 4 * a.train_len)
    del model
    batch = harness.pose_batch(doc, "pose", a.batch_size, a.train_len, a.target_len)
    n_tokens = batch[0].numel()
    flops_per_step = training_flops(args, a.train_len) * n_tokens
    print(
        f"SmolLM2-135M, PoSE Lc={a.train_len} -> Lt={a.target_len} (RoPE "
        f"{args.rope_scaling or 'unscaled'}), {a.batch_size} x {a.train_len} tokens per step "
        f"(micro batch {a.micro_batch_size}), {a.dtype}, {flops_per_step / 1e12:.2f} TFLOP per "
        "step",
        flush=True,
    )

    # the ceiling first, in its own process with the same threads; again at the end, and the faster
    # one counts
    sizes = (512, 1024, 2048)
    ceilings = [harness.matmul_ceiling(a.dtype, a.threads, sizes)]

    workers, warm_ups = {}, {}
    for impl in impls:  # one at a time, so that a model's load does not slow another's warm-up
        workers[impl] = harness.Worker(
            setup_step,
            a.threads,
            impl=impl,
            model_dir=str(model_dir),
            batch=batch,
            dtype=a.dtype,
            micro_batch_size=a.micro_batch_size,
        )
        warm = workers[impl].run()
        workers[impl].reset_peak()
        warm_ups[impl] = warm
        print(
            f"  {impl:<13} warm-up step {warm.get('seconds', float('nan')):7.1f} s (load "
            f"{warm.get('load', 0):.1f})"
            + (
                f"  ERROR {warm['error']}"
                if "error" in warm
                else f", loss {warm['result']['loss']:.5f}"
            ),
            flush=True,
        )
    records = {impl: [] for impl in impls}
    for r in range(a.repeats):
        # rotate, so no one always follows the same
        order = impls[r % len(impls) :] + impls[: r % len(impls)]
        for impl in order:
            record = workers[impl].run()
            records[impl].append(record)
            print(
                f"  round {r + 1} {impl:<13} {record.get('seconds', float('nan')):7.1f} s  load "
                f"{record.get('load', 0):4.1f}"
                + (
                    f"  ERROR {record['error']}"
                    if "error" in record
                    else f"  loss {record['result']['loss']:.5f}"
                ),
                flush=True,
            )
    profiles = {}
    # one more step each, under torch.profiler (slower than the timed ones: not counted in them)
    if a.profile:
        for impl in impls:
            record = workers[impl].run(None, True)
            if "error" not in record:
                profiles[impl] = record["result"]
    for worker in workers.values():
        worker.close()
    ceilings.append(harness.matmul_ceiling(a.dtype, a.threads, sizes))
    ceiling = max(max(c.values()) for c in ceilings)

    print(
        f"\nmatmul ceiling ({a.dtype}, {a.threads} thread(s), GFLOP/s, measured at the start and "
        "at the end):"
    )
    for key in ceilings[0]:
        print(f"  {key:<16} " + " / ".join(f"{c[key] / 1e9:6.1f}" for c in ceilings))
    print(f"  ceiling = the fastest: {ceiling / 1e9:.1f} GFLOP/s")
    print(harness.load_average())
    header = (
        f"{'implementation':<14} {'best s/step':>11} {'median':>7} {'tokens/s':>9} "
        f"{'vs transformers':>15} {'peak mem':>9} {'mem vs tf':>9} {'GFLOP/s':>8} {'MFU':>6} "
        f"{'loads':>14} {'loss step 1':>12}"
    )
    print(header)
    summary = {}
    tf = records.get("transformers")
    tf_best = min(r["seconds"] for r in tf) if tf and all("seconds" in r for r in tf) else None
    tf_mem = max(r["peak_mib"] for r in tf) if tf_best else None
    for impl in impls:
        ok = [r for r in records[impl] if "seconds" in r]
        if len(ok) < len(records[impl]) or not ok:
            print(f"{impl:<14} failed: {workers[impl].info.get('error')}")
            continue
        best = min(r["seconds"] for r in ok)
        median = statistics.median(r["seconds"] for r in ok)
        mem = max(r["peak_mib"] for r in ok)
        flops = flops_per_step / best
        summary[impl] = {
            "best_s": best,
            "median_s": median,
            "tokens_per_s": n_tokens / best,
            "peak_mib": mem,
            "gflops": flops / 1e9,
            "mfu": flops / ceiling,
            "loads": [r["load"] for r in ok],
            "loss": warm_ups[impl]["result"]["loss"],
            "warm_up_s": warm_ups[impl]["seconds"],
            "speedup_vs_transformers": tf_best / best if tf_best else None,
            "mem_vs_transformers": mem / tf_mem if tf_mem else None,
        }
        s = summary[impl]
        speedup = f"{tf_best / best:.2f}x" if tf_best else "n/a"
        mem_ratio = f"{mem / tf_mem:.2f}x" if tf_mem else "n/a"
        loads = "/".join(f"{x:.1f}" for x in s["loads"])
        print(
            f"{impl:<14} {best:>11.2f} {median:>7.2f} {s['tokens_per_s']:>9.1f} {speedup:>15} "
            f"{harness.fmt_mib(mem):>9} {mem_ratio:>9} {flops / 1e9:>8.1f} {flops / ceiling:>6.1%} "
            f"{loads:>14} {s['loss']:>12.6f}"
        )
        s["phases_of_best"] = {
            k: v for k, v in min(ok, key=lambda r: r["seconds"])["result"].items() if k != "loss"
        }
    print(
        "\nthe best step by phase (s): "
        + "; ".join(
            f"{impl} " + ", ".join(f"{k} {v:.2f}" for k, v in s["phases_of_best"].items())
            for impl, s in summary.items()
        )
    )
    if profiles:
        print(
            "\none profiled step, self time of torch's operators by group (s, share of the step):"
        )
        print(
            f"{'implementation':<14} {'step':>7} " + " ".join(f"{g:>20}" for g in OPERATOR_GROUPS)
        )
        for impl, prof in profiles.items():
            step_s = sum(prof[k] for k in ("forward", "backward", "optimizer"))
            print(
                f"{impl:<14} {step_s:>7.2f} "
                + " ".join(
                    f"{prof['operators'][g]:>11.2f} ({prof['operators'][g] / step_s:>5.1%})"
                    for g in OPERATOR_GROUPS
                )
            )
            summary[impl]["profile"] = prof
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(
            json.dumps(
                {
                    "args": vars(a),
                    "machine": harness.machine(a.threads),
                    "ceilings": ceilings,
                    "summary": summary,
                    "records": records,
                    "time": time.ctime(),
                },
                indent=1,
                default=str,
            )
        )
    return summary


if __name__ == "__main__":
    main()
