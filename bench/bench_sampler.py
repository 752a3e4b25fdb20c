"""Samples per second of pose.make_example at Lc=2048, Lt=32768 on one CPU thread, for every method.

    python bench/bench_sampler.py --n 10000

Each setting runs 5 rounds of n/5 calls and reports the best round, so that other work on a shared
machine disturbs the number less.
"""

import argparse
import time

import torch

import pose

ap = argparse.ArgumentParser(description="samples/s of pose.make_example, one CPU thread")
ap.add_argument("--n", type=int, default=10000, help="calls per setting (N = Lc runs n/50)")
ap.add_argument("--train_len", type=int, default=2048, help="Lc")
ap.add_argument("--target_len", type=int, default=32768, help="Lt (and Lx, the document length)")
args = ap.parse_args()
torch.set_num_threads(1)
settings = [(m, 2, "random") for m in pose.METHODS]
settings += [
    ("pose", 2, "contiguous"),
    ("pose", 2, "aligned"),
    ("pose", 3, "random"),
    ("pose", args.train_len, "random"),
]
print(
    f"torch {torch.__version__}, 1 thread, Lc={args.train_len}, Lt=Lx={args.target_len}, best of 5 "
    "rounds"
)
for method, chunks, content in settings:
    g = torch.Generator().manual_seed(0)
    calls = max((args.n if chunks <= 8 else args.n // 50) // 5, 1)  # N = Lc is App. B's extreme
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            pose.make_example(
                method,
                args.target_len,
                args.train_len,
                args.target_len,
                chunks=chunks,
                content=content,
                generator=g,
            )
        best = max(best, calls / (time.perf_counter() - start))
    label = method + (f" N={chunks} content={content}" if method == "pose" else "")
    print(f"{label:<36} {best:>10,.0f} samples/s")
