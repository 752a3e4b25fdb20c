"""Section c of bench/gpu_check.py: training throughput, ours against transformers."""

import time
from types import SimpleNamespace

import torch

import train
from bench.gpucheck.common import batch_for, free, make_step, random_model, sync, timed
from model import ModelArgs


def section_c(run, record):
    """c. throughput at Lc = 2048: ours eager and compiled against transformers (sdpa)"""
    s, device = run.sizes["c"], run.device
    shape = s["model"]
    args = ModelArgs(**{"max_seq_len": 2048, **shape})
    flops_per_token = train.training_flops(args, s["train_len"])
    state = random_model(shape, device, torch.float32).state_dict()
    state = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}  # one copy, off the GPU
    free()
    batch = batch_for(
        "pose", s["batch_size"], s["train_len"], 8 * s["train_len"], shape["vocab_size"]
    )
    tokens = batch[0].numel()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = train.peak_flops(SimpleNamespace(peak_tflops=None), device, dtype)
    record.update(
        parameters=sum(v.numel() for v in state.values()),
        tokens_per_step=tokens,
        dtype=str(dtype)[6:],
        peak_tflops=peak / 1e12 if peak else None,
        flops_per_token=flops_per_token,
        checkpointing=False,
    )

    def measure(impl):
        start = time.perf_counter()
        step = make_step(impl, shape, state, device)
        for _ in range(s["warmup"]):  # compilation, cuBLAS's choices, AdamW's state
            step(batch)
        sync(device)
        warm = time.perf_counter() - start
        result = timed(step, batch, device, s["steps"])
        median = sorted(result["seconds"])[len(result["seconds"]) // 2]
        return {
            "warm_up_s": warm,
            "best_s": min(result["seconds"]),
            "median_s": median,
            "tokens_per_s": tokens / median,
            "mfu": tokens / median * flops_per_token / peak if peak else None,
            "peak_gib": result["peak_gib"],
            "loss_after_warm_up": result["loss"],
            "all_s": result["seconds"],
        }

    for impl in ("ours", "ours+compile", "transformers"):
        run.attempt(record, impl, lambda: measure(impl), need=10)
    tf = record.get("transformers", {})
    for impl in ("ours", "ours+compile"):
        if "tokens_per_s" in record.get(impl, {}) and "tokens_per_s" in tf:
            record[impl]["vs_transformers"] = record[impl]["tokens_per_s"] / tf["tokens_per_s"]
    best = record.get("ours+compile", {})
    record["goal"] = {
        "compiled_mfu_45%": (best.get("mfu") or 0) >= 0.45,
        "compiled_1.2x_transformers": best.get("vs_transformers", 0) >= 1.2,
        "note": "goals of the 1.1B on a GPU; meaningless in the dry mode",
    }
