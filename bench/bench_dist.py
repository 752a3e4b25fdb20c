"""Host memory and checkpoint I/O of train.py on two ranks (torchrun, gloo, FSDP2).

    nice -n 19 python bench/bench_dist.py --work runs/bench_dist/after --json after.json
    nice -n 19 python bench/bench_dist.py --dtype bfloat16 --work runs/bench_dist/after-bf16 \
        --json after-bf16.json                      # a bf16 checkpoint, as LLaMAs are published
    nice -n 19 python bench/bench_dist.py --repo /tmp/old --work runs/bench_dist/before \
        --json before.json                                  # another checkout, e.g. before a change

A random-init LLaMA (--dim 1280, 16 layers, vocab 32000: 0.40B parameters, 1.6 GB in fp32) is
written once as a Hugging Face directory (safetensors in --dtype, a byte tokenizer) with a few
documents.
Then `torchrun --nproc_per_node 2` runs this file as its worker: it imports train.py from --repo,
wraps train.draw_batch, train.save_checkpoint, train.save_final and train.load_checkpoint (names
both versions share) and runs train.main twice: one step with a checkpoint and the export, then
--resume (reads the checkpoint, trains nothing, exports again). Each rank reports its peak resident
memory (VmHWM, reset through /proc/self/clear_refs before each phase) for: load (process start to
the first step's batch), save (the checkpoint), export (final/); and the wall time of the save and
of the read. The checkpoint's files and their sizes are listed; load_sum_over_fp32 is the load
peaks summed over the ranks, each less its runtime, over the model's fp32 bytes.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def hwm_gib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # kB


def reset_hwm():
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak restarts from the current size


def make_model(directory, dim, layers, dtype):
    import torch

    from machinery.tokenizer import GPT2_PATTERN, Tokenizer
    from model import ModelArgs, Transformer

    if (directory / "config.json").exists():
        return
    torch.manual_seed(0)
    args = ModelArgs(
        dim=dim,
        n_layers=layers,
        n_heads=dim // 128,
        n_kv_heads=dim // 128,
        vocab_size=32000,
        hidden_dim=int(dim * 2.7) // 128 * 128,
        max_seq_len=64,
    )
    tokenizer = Tokenizer(
        {bytes([i]): i for i in range(256)},
        {"<s>": 256, "</s>": 257},
        GPT2_PATTERN,
        bos_id=256,
        eos_id=257,
        add_bos=False,
    )
    Transformer(args).to(getattr(torch, dtype)).save_pretrained(directory, tokenizer=tokenizer)
    (directory.parent / "data").mkdir(exist_ok=True)
    for i in range(4):
        text = " ".join(f"word{j % 97}" for j in range(300 + i))
        (directory.parent / "data" / f"doc{i}.txt").write_text(text)


def worker(args):
    """Runs under torchrun: train.main of --repo (first on PYTHONPATH) with each phase measured."""
    import train

    rank, report = int(os.environ["RANK"]), {"runtime_gib": hwm_gib()}  # torch, train.py imported
    draw, save, final = train.draw_batch, train.save_checkpoint, train.save_final
    load = train.load_checkpoint

    def first_draw(*a, **k):
        report.setdefault("load_gib", hwm_gib())
        return draw(*a, **k)

    def measured(name, function):
        def run(*a, **k):
            reset_hwm()
            start = time.perf_counter()
            result = function(*a, **k)
            report[f"{name}_s"], report[f"{name}_gib"] = time.perf_counter() - start, hwm_gib()
            return result

        return run

    train.draw_batch, train.save_checkpoint = first_draw, measured("save", save)
    train.save_final, train.load_checkpoint = measured("export", final), measured("read", load)
    common = [
        "--model",
        str(args.work / f"model-{args.dtype}"),
        "--data",
        str(args.work / "data"),
        "--train_len",
        "32",
        "--target_len",
        "128",
        "--batch_size",
        "2",
        "--steps",
        "1",
        "--peak_tflops",
        "1",
        "--out",
        str(args.work / "out"),
    ]
    train.main(common + (["--resume"] if args.resume else ["--overwrite"]))
    phase = "resume" if args.resume else "train"
    Path(args.work / f"rank{rank}-{phase}.json").write_text(json.dumps(report))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", type=Path, default=ROOT, help="the checkout whose train.py runs")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_dist")
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="the dtype of the checkpoint's safetensors",
    )
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    make_model(args.work / f"model-{args.dtype}", args.dim, args.layers, args.dtype)
    # the worker's `import train` finds --repo's train.py (and the modules it imports) first
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(args.repo)}
    for resume in (False, True):
        run = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            __file__,
            "--worker",
            "--repo",
            str(args.repo),
            "--work",
            str(args.work),
            "--dtype",
            args.dtype,
            *(["--resume"] if resume else []),
        ]
        subprocess.run(run, cwd=args.repo, env=env, check=True, stdout=subprocess.DEVNULL)
    out = args.work / "out"
    files = sorted(
        p for p in out.rglob("*") if p.is_file() and "final" not in p.parts and p.suffix != ".jsonl"
    )
    result = {
        "repo": str(args.repo),
        "params": None,
        "ranks": [],
        "checkpoint_files": {str(p.relative_to(out)): p.stat().st_size for p in files},
    }
    config = json.loads((args.work / f"model-{args.dtype}" / "config.json").read_text())
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    n = config["num_hidden_layers"]
    result["params"] = 2 * v * d + n * (4 * d * d + 3 * d * f + 2 * d) + d
    for rank in (0, 1):
        r = {
            **json.loads((args.work / f"rank{rank}-train.json").read_text()),
            **{
                k: v
                for k, v in json.loads((args.work / f"rank{rank}-resume.json").read_text()).items()
                if k.startswith("read")
            },
        }
        r["load_over_runtime_gib"] = r["load_gib"] - r["runtime_gib"]
        result["ranks"].append(r)
    result["dtype"], result["fp32_gib"] = args.dtype, result["params"] * 4 / 2**30
    result["load_sum_over_fp32"] = (
        sum(r["load_over_runtime_gib"] for r in result["ranks"]) / result["fp32_gib"]
    )
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
