"""PoSE Figure 3 in miniature: peak memory and time of one training step as Lt grows, PoSE vs
Full-length.

    python bench/bench_fig3.py --threads 1 --lengths 2048,4096,8192,16384,32768 \\
        --json runs/bench/fig3.json --plot docs/bench_fig3.png

SmolLM2-135M's shape and weights, our training step (bench_train.py's "ours": forward, backward,
clip, AdamW), one example per step. PoSE: Lc = --train_len tokens at PoSE positions drawn from
0..Lt-1; Full-length: Lt tokens at 0..Lt-1. RoPE is scaled for each Lt as train.py scales it (linear
PI when Lt > Lo = 8192), which changes no cost. Activation checkpointing is on by default
(train.py's --checkpointing): without it Full-length at 16k needs more memory than this 24 GiB
machine has. Every configuration runs in a fresh process (bench/harness.py): a warm-up step on the
first 64 tokens creates AdamW's state, then --repeats timed steps; memory is the process's peak
resident size during them over its size after loading the model (so AdamW's state, gradients and
activations count, the fp32 weights do not). PoSE runs first, then Full-length from short to long.
With --json, finished configurations are kept in the file and skipped by a rerun with the same
settings, so the long ones can be added later.
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from bench import harness
from bench.bench_train import setup_step

METHODS = {"pose": "PoSE", "full": "Full-length"}


def plot(results, train_len, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, sec) = plt.subplots(1, 2, figsize=(10, 3.8))
    for method, label in METHODS.items():
        done = sorted(
            (int(lt), r) for (m, lt), r in results.items() if m == method and "seconds" in r
        )
        if not done:
            continue
        xs = [lt for lt, _ in done]
        mem.plot(xs, [r["peak_mib"] / 1024 for _, r in done], marker="o", label=label)
        sec.plot(xs, [r["seconds"] for _, r in done], marker="o", label=label)
    for ax, ylabel, title in (
        (mem, "peak memory over the weights (GiB)", "(a) memory"),
        (sec, "seconds per training step", "(b) time"),
    ):
        ax.set(xscale="log", xlabel="target context Lt (tokens)", ylabel=ylabel, title=title)
        ticks = sorted({int(lt) for _, lt in results})
        ax.set_xticks(ticks, [f"{t // 1024}k" for t in ticks])
        ax.minorticks_off()
        ax.legend()
    fig.suptitle(
        f"SmolLM2-135M, one step, PoSE at Lc = {train_len} vs Full-length at Lt", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--threads", type=int, required=True, help="torch / OpenMP threads of every process"
    )
    ap.add_argument("--train_len", type=int, default=2048, help="Lc of PoSE")
    ap.add_argument(
        "--lengths", default="2048,4096,8192,16384,32768", help="the Lt values, comma-separated"
    )
    ap.add_argument("--methods", default="pose,full", help="pose, full or both")
    ap.add_argument(
        "--checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="activation checkpointing (recompute each block in backward), as train.py "
             "--checkpointing",
    )
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument(
        "--repeats", type=int, default=1, help="timed steps per configuration, after the warm-up"
    )
    ap.add_argument(
        "--json",
        default=None,
        help="results file: kept after each configuration, reused by a rerun",
    )
    ap.add_argument("--plot", default=None, help="a .png like Figure 3 (a, b)")
    a = ap.parse_args(argv)
    lengths = sorted(int(x) for x in a.lengths.split(","))
    methods = a.methods.split(",")
    settings = {
        "threads": a.threads,
        "train_len": a.train_len,
        "checkpointing": a.checkpointing,
        "dtype": a.dtype,
    }
    results = {}
    if a.json and Path(a.json).exists():
        stored = json.loads(Path(a.json).read_text())
        if stored["settings"] == settings:
            results = {tuple(k.split(":")): v for k, v in stored["results"].items()}
            print(f"{a.json}: {len(results)} configuration(s) already measured are kept")
        else:
            sys.exit(
                f"error: {a.json} holds results of other settings ({stored['settings']}); choose "
                "another --json"
            )
    harness.set_threads(a.threads)
    print(harness.machine(a.threads))
    print(harness.load_average(), flush=True)
    _, tokenizer = harness.smollm2_for(a.train_len)
    doc = harness.long_text_tokens(tokenizer, max(lengths) + 1)

    def save():
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(
                json.dumps(
                    {
                        "settings": settings,
                        "machine": harness.machine(a.threads),
                        "results": {f"{m}:{lt}": r for (m, lt), r in results.items()},
                    },
                    indent=1,
                )
            )

    todo = [
        (m, lt)
        for m in ("pose", "full")
        if m in methods
        for lt in lengths
        if (m, str(lt)) not in results
    ]
    for method, target_len in todo:
        model, _ = harness.smollm2_for(target_len)
        model_dir = harness.export(model)
        del model
        batch = harness.pose_batch(doc, method, 1, a.train_len, target_len)
        worker = harness.Worker(
            setup_step,
            a.threads,
            impl="ours",
            model_dir=str(model_dir),
            batch=batch,
            dtype=a.dtype,
            checkpointing=a.checkpointing,
        )
        warm = worker.run(64)
        runs = [worker.run() for _ in range(a.repeats)] if "error" not in warm else [warm]
        worker.close()
        shutil.rmtree(model_dir)
        ok = [r for r in runs if "seconds" in r]
        if len(ok) == len(runs):
            record = {
                "seconds": min(r["seconds"] for r in ok),
                "all_seconds": [r["seconds"] for r in ok],
                "peak_mib": max(r["peak_mib"] for r in ok),
                "base_mib": ok[0]["base_mib"],
                "loads": [r["load"] for r in ok],
                "tokens": batch[0].numel(),
                "loss": ok[0]["result"]["loss"],
                "time": time.ctime(),
            }
        else:
            record = {
                "error": runs[-1]["error"],
                "peak_mib": runs[-1].get("peak_mib"),
                "time": time.ctime(),
            }
        results[(method, str(target_len))] = record
        save()
        loads = "/".join(f"{x:.1f}" for x in record.get("loads", []))
        what = (
            f"{record['seconds']:8.1f} s/step  peak {harness.fmt_mib(record['peak_mib'])} over "
            f"{harness.fmt_mib(record['base_mib'])} after loading  load {loads}"
            if "seconds" in record
            else f"FAILED: {record['error']}"
        )
        print(
            f"  {METHODS[method]:<12} Lt={target_len:>6} {batch[0].numel():>6} tokens  {what}",
            flush=True,
        )

    print(
        f"\none training step of SmolLM2-135M ({a.dtype}, {a.threads} thread(s), activation "
        f"checkpointing {'on' if a.checkpointing else 'off'}); PoSE at Lc = {a.train_len}, "
        "Full-length at Lt"
    )
    print(harness.load_average())
    print(
        f"{'Lt':>6} | {'PoSE s/step':>11} {'PoSE mem':>9} | {'Full s/step':>11} {'Full mem':>9} | "
        f"{'time Full/PoSE':>14} {'mem Full/PoSE':>13}"
    )
    for lt in lengths:
        pose_r, full_r = results.get(("pose", str(lt)), {}), results.get(("full", str(lt)), {})

        def cells(r):
            if "seconds" in r:
                return f"{r['seconds']:>11.1f} {harness.fmt_mib(r['peak_mib']):>9}"
            return f"{('failed' if 'error' in r else '-'):>11} {'':>9}"

        both = "seconds" in pose_r and "seconds" in full_r
        ratios = (
            f"{full_r['seconds'] / pose_r['seconds']:>13.2f}x "
            f"{full_r['peak_mib'] / pose_r['peak_mib']:>12.2f}x"
            if both
            else ""
        )
        print(f"{lt:>6} | {cells(pose_r)} | {cells(full_r)} | {ratios}")
    pose_done = [r for (m, _), r in results.items() if m == "pose" and "seconds" in r]
    if len(pose_done) > 1:
        for key, name in (("seconds", "time"), ("peak_mib", "memory")):
            values = [r[key] for r in pose_done]
            spread = max(values) / min(values) - 1
            print(
                f"PoSE {name} across Lt: max / min - 1 = {spread:.1%} "
                f"({'flat within 10%: met' if spread <= 0.10 else 'NOT within 10%'})"
            )
    if a.plot:
        plot(results, a.train_len, a.plot)
    return results


if __name__ == "__main__":
    main()
