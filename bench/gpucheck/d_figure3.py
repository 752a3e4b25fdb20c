"""Section d of bench/gpu_check.py: the paper's Figure 3, PoSE against Full-length."""

import torch

from bench.gpucheck.common import batch_for, make_step, random_model, timed


def section_d(run, record):
    """d. Figure 3: a training step, PoSE (Lc 2048) against Full-length, Lt 2k ... 128k"""
    s, device = run.sizes["d"], run.device
    shape = s["model"]
    state = random_model(shape, device, torch.float32).state_dict()
    step = make_step("ours", shape, state, device, checkpointing=True)  # train.py's GPU default
    del state
    step(batch_for("pose", 1, 64, 128, shape["vocab_size"]))  # AdamW's state, before any timing
    record["note"] = (
        "one model for every Lt (its RoPE scaling changes no cost); activation "
        "checkpointing; one example per step; time: the best of the steps (PoSE 3, "
        "Full-length 1); peak: the allocator's (weights, AdamW state, activations)"
    )
    last = {}
    for method in ("pose", "full"):
        for target_len in s["lengths"]:
            tokens = s["train_len"] if method == "pose" else target_len
            need = 4.5 * last.get(method, 0) if method == "full" else 1  # ~4x per doubling
            batch = batch_for(
                method, 1, min(s["train_len"], target_len), target_len, shape["vocab_size"]
            )
            result = run.attempt(
                record,
                f"{method} Lt={target_len}",
                lambda: timed(step, batch, device, s["steps"][method]) | {"tokens": tokens},
                need=need,
            )
            if result is None and method == "full":
                break  # out of memory or of time: longer ones would be too
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
