"""Section d of bench/gpu_check.py: the paper's Figure 3, PoSE against Full-length."""

import torch

from bench.gpucheck import fit
from bench.gpucheck.common import batch_for, make_step, random_model, timed
from model import ModelArgs


def section_d(run, record):
    """d. Figure 3: a training step, PoSE (Lc 2048) against Full-length, Lt 2k ... 128k"""
    s, device = run.sizes["d"], run.device
    shape = s["model"]
    args = ModelArgs(**{"max_seq_len": 2048, **shape})
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # make_step's autocast
    state = random_model(shape, device, torch.float32).state_dict()
    n_params = sum(v.numel() for v in state.values())
    step = make_step("ours", shape, state, device, checkpointing=True)  # train.py's GPU default
    del state
    step(batch_for("pose", 1, 64, 128, shape["vocab_size"]))  # AdamW's state, before any timing
    record["note"] = (
        "one model for every Lt (its RoPE scaling changes no cost); activation "
        "checkpointing; one example per step; time: the best of the steps (PoSE 3, "
        "Full-length 1); peak: the allocator's (weights, AdamW state, activations); "
        "Full-length stops at the first Lt whose estimate exceeds the card, or that runs out of "
        "memory (a limit, not a failure), or that the time left cannot hold"
    )
    last = {}
    for method in ("pose", "full"):
        for target_len in s["lengths"]:
            tokens = s["train_len"] if method == "pose" else target_len
            need = 4.5 * last.get(method, 0) if method == "full" else 1  # ~4x per doubling
            batch = batch_for(
                method, 1, min(s["train_len"], target_len), target_len, shape["vocab_size"]
            )
            estimate = fit.training_step(args, n_params, tokens, device.type, dtype)
            result = run.attempt(
                record,
                f"{method} Lt={target_len}",
                lambda: timed(step, batch, device, s["steps"][method]) | {"tokens": tokens},
                need=need,
                estimate=estimate,
                oom_is_limit=method == "full",
            )
            if result is None and method == "full":
                break  # beyond the card or the time left: longer ones would be too
            if result is not None:
                last[method] = min(result["seconds"])
    pose_runs = [v for k, v in record.items() if k.startswith("pose Lt=") and "seconds" in v]
    if len(pose_runs) > 1:
        times, mems = [min(r["seconds"]) for r in pose_runs], [r["peak_gib"] for r in pose_runs]
        record["pose_spread"] = {
            "time": max(times) / min(times) - 1,
            "memory": max(mems) / min(mems) - 1,
        }
        record["goal"] = {"pose_flat_within_10%": max(record["pose_spread"].values()) <= 0.10}
