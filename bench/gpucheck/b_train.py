"""Section b of bench/gpu_check.py: train.py itself, in fresh processes."""

import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time

import torch

from bench.gpucheck.common import ROOT, TOKENIZER, max_diff


# ---- b: train.py ---------------------------------------------------------------------------------

WORDS = (
    "the grass is green the sky is blue the sun is yellow here we go there and back again "
    "a long way from home in the quiet of the night we counted every star"
).split()


KILL_IN_STEP = """import os, signal, sys
import train
draw = train.draw_batch
def draw_or_die(docs, cfg, step):  # the job dies mid-run, as under a scheduler's kill
    if step == {step}:
        os.kill(os.getpid(), signal.SIGKILL)
    return draw(docs, cfg, step)
train.draw_batch = draw_or_die
train.main(sys.argv[1:])
"""


def write_documents(directory, n_docs, words):
    """Generated text (no network): n_docs documents of `words` words each."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(n_docs):
        (directory / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(words)))
    return directory


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_train(run, argv, out, *, rank_of_one=False, kill_at=None):
    """train.py in a fresh process -> {seconds, returncode, last log line, output tails}.
    rank_of_one: with the environment `torchrun --standalone --nproc_per_node 1` gives its worker,
    set here so that the run stays one process (torchrun puts its worker in a session of its own,
    which a timeout could not kill with it)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": "1"} if run.dry else {})}
    if rank_of_one:
        env.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),
        )
    if kill_at is not None:
        command = [sys.executable, "-c", KILL_IN_STEP.format(step=kill_at)]
    else:
        command = [sys.executable, "train.py"]
    start = time.monotonic()
    timeout = max(10.0, min(run.sizes["b"]["timeout"], run.left()))
    process = subprocess.Popen(
        command + argv + ["--out", str(out)],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )  # a group of its own, killed whole below
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # compile workers too: nothing left on the GPU
        process.communicate()
        raise
    log = out / "log.jsonl"
    log = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return {
        "seconds": round(time.monotonic() - start, 1),
        "returncode": process.returncode,
        "last_step": log[-1] if log else None,
        "stdout": stdout[-1500:],
        "stderr": stderr[-1500:],
    }


def compare_runs(a, b):
    """Two train.py outputs: the loss of every step and the final weights, max differences."""
    from safetensors.torch import load_file

    losses = [
        [json.loads(line)["loss"] for line in (d / "log.jsonl").read_text().splitlines()]
        for d in (a, b)
    ]
    wa, wb = (load_file(d / "final" / "model.safetensors") for d in (a, b))
    same_length = len(losses[0]) == len(losses[1])
    return {
        "steps": [len(losses[0]), len(losses[1])],
        "loss_max_abs_diff": max(abs(x - y) for x, y in zip(*losses)) if same_length else math.inf,
        "weights_max_abs_diff": max(max_diff(wa[k], wb[k]) for k in wa),
        "bitwise": losses[0] == losses[1] and all(torch.equal(wa[k], wb[k]) for k in wa),
    }


def section_b(run, record):
    """b. train.py: bf16 --compile --checkpointing, SIGKILL and --resume, FSDP2 at world size 1"""
    s = run.sizes["b"]
    work = run.tmp / "train"
    data = write_documents(work / "data", 16, 3 * s["train_len"])
    init = json.dumps({**s["init"], "max_seq_len": s["train_len"]})
    common = [
        "--init",
        init,
        "--tokenizer",
        str(TOKENIZER),
        "--data",
        str(data),
        "--train_len",
        str(s["train_len"]),
        "--target_len",
        str(8 * s["train_len"]),
        "--batch_size",
        str(s["batch_size"]),
        "--micro_batch_size",
        str(s["micro_batch_size"]),
        "--lr",
        "1e-3",
        "--warmup",
        "2",
        "--save_every",
        str(s["save_every"]),
    ]
    fast = (
        common
        + ["--steps", str(s["steps"]), "--dtype", "bfloat16", "--checkpointing"]
        + ["--compile"] * s["compile"]
    )
    name = f"uninterrupted (bf16,{' --compile,' * s['compile']} --checkpointing)"
    whole = run.attempt(record, name, lambda: run_train(run, fast, work / "whole"), need=20)
    cut = run.attempt(
        record,
        f"SIGKILL in step {s['kill_at']}",
        lambda: run_train(run, fast, work / "cut", kill_at=s["kill_at"]),
        need=20,
    )
    if cut and "returncode" in cut:
        checkpoint = work / "cut" / "checkpoint.pt"
        saved = torch.load(checkpoint, weights_only=True)["step"] if checkpoint.exists() else None
        cut.update(killed=cut["returncode"] == -9, checkpoint_step=saved)
    resumed = run.attempt(
        record, "--resume", lambda: run_train(run, fast + ["--resume"], work / "cut"), need=20
    )
    if whole and resumed and whole.get("returncode") == 0 == resumed.get("returncode"):

        def resume_check():
            result = compare_runs(work / "whole", work / "cut")
            # bitwise on the CPU; on a GPU some kernels (atomics in backward) are not deterministic
            result["ok"] = (
                bool(cut.get("killed"))
                and result["steps"] == [s["steps"]] * 2
                and result["loss_max_abs_diff"] <= 1e-3
                and result["weights_max_abs_diff"] <= 1e-3
            )
            return result

        run.attempt(record, "resumed equals uninterrupted", resume_check)
    plain = common + ["--steps", str(s["fsdp_steps"]), "--dtype", "float32", "--checkpointing"]
    one = run.attempt(
        record, "plain path (fp32)", lambda: run_train(run, plain, work / "plain"), need=10
    )
    fsdp = run.attempt(
        record,
        "FSDP2 at world size 1 (--fsdp, rank 0 of 1, fp32)",
        lambda: run_train(run, plain + ["--fsdp"], work / "fsdp", rank_of_one=True),
        need=10,
    )
    if one and fsdp and one.get("returncode") == 0 == fsdp.get("returncode"):

        def fsdp_check():
            result = compare_runs(work / "plain", work / "fsdp")
            result["fsdp_in_log"] = "(FSDP2)" in fsdp["stdout"]
            result["ok"] = (
                result["fsdp_in_log"]
                and result["loss_max_abs_diff"] <= 1e-5
                and result["weights_max_abs_diff"] <= 1e-5
            )
            return result

        run.attempt(record, "FSDP2 equals plain", fsdp_check)
    for value in record.values():  # a run that failed (and was not meant to die) fails its check
        if (
            isinstance(value, dict)
            and value.get("returncode") not in (None, 0)
            and not value.get("killed")
        ):
            value["ok"] = False
