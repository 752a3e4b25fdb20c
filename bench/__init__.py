"""Speed and memory benchmarks: scripts (python bench/bench_train.py), importable as bench.*."""
