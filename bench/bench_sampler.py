"""Samples per second of pose.make_example at Lc=2048, Lt=32768 on one CPU thread, per method.

    python bench/bench_sampler.py [--n 10000]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import pose  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--n", type=int, default=10000, help="calls per setting")
ap.add_argument("--train_len", type=int, default=2048)
ap.add_argument("--target_len", type=int, default=32768)
args = ap.parse_args()
torch.set_num_threads(1)
settings = [(m, 2, "random") for m in pose.METHODS]
settings += [("pose", 2, "contiguous"), ("pose", 2, "aligned"), ("pose", 3, "random"),
             ("pose", args.train_len, "random")]
print(f"torch {torch.__version__}, 1 thread, Lc={args.train_len}, Lt={args.target_len}, Lx={args.target_len}")
for method, chunks, content in settings:
    g = torch.Generator().manual_seed(0)
    n = args.n if chunks < 64 else max(args.n // 20, 1)  # N = Lc is Appendix B's extreme; fewer calls
    start = time.perf_counter()
    for _ in range(n):
        pose.make_example(method, args.target_len, args.train_len, args.target_len, chunks=chunks,
                          content=content, generator=g)
    rate = n / (time.perf_counter() - start)
    label = f"{method}" + (f" N={chunks} content={content}" if method == "pose" else "")
    print(f"{label:<36} {rate:>10,.0f} samples/s")
