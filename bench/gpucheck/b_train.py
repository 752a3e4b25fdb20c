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
from pathlib import Path

import torch

from bench.gpucheck.common import ROOT, TOKENIZER, OutOfTime, max_diff


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


def children(pid):
    """The ids of the processes whose parent is `pid` (Linux's /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def stop(process, torchrun):
    """End a timed-out run and everything it started: its process group (compile workers too:
    nothing left on the GPU). torchrun puts its worker in a session of its own, so torchrun is
    asked first (SIGTERM: it stops its worker), then the worker's group is killed by its id."""
    if torchrun:
        workers = children(process.pid)
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        for worker in workers:
            try:
                os.killpg(worker, signal.SIGKILL)
            except ProcessLookupError:
                pass  # torchrun stopped it
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.communicate()


def run_train(run, argv, out, *, rank_of_one=False, torchrun=False, kill_at=None):
    """train.py in a fresh process -> {seconds, returncode, last log line, output tails}, killed
    at the time left to its slot. torchrun: as users start it, `torchrun --standalone
    --nproc_per_node 1 train.py`; rank_of_one: the environment torchrun gives its worker, set
    here, so that the run stays one process."""
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
    elif torchrun:
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
        command = [sys.executable, *launcher, "train.py"]
    else:
        command = [sys.executable, "train.py"]
    start = time.monotonic()
    hang = run.sizes["b"]["timeout"]  # longer than any run should take: past it, an error
    timeout = max(10.0, min(hang, run.left()))
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
        stop(process, torchrun)
        if timeout < hang:
            raise OutOfTime(f"killed at its slot's end, after {timeout:.0f} s") from None
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
    pairs = list(zip(*losses)) if same_length else []
    return {
        "steps": [len(losses[0]), len(losses[1])],
        "loss_max_abs_diff": max(abs(x - y) for x, y in pairs) if pairs else math.inf,
        "loss_max_rel_diff": max(abs(x - y) / abs(y) for x, y in pairs) if pairs else math.inf,
        "first_loss_rel_diff": abs(pairs[0][0] - pairs[0][1]) / abs(pairs[0][1])
        if pairs
        else math.inf,
        "weights_max_abs_diff": max(max_diff(wa[k], wb[k]) for k in wa),
        "bitwise": losses[0] == losses[1] and all(torch.equal(wa[k], wb[k]) for k in wa),
    }


# Against the plain path, bf16: FSDP2's policy holds the parameters in bf16 throughout (the
# residual stream and the norms' weights too), where the plain path autocasts over fp32 weights.
# The step losses differ by rounding: within FSDP_BF16_TOLERANCE, relative (each step's loss;
# the first, before any update, within a tenth of it). The dry run on a CPU: 7e-5 over 6 steps,
# 1.3e-7 for the first; no GPU has measured it.
FSDP_BF16_TOLERANCE = 1e-2


def section_b(run, record):
    """b. train.py: bf16 --compile --checkpointing, SIGKILL and --resume, FSDP2 (torchrun) too"""
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
    compiled = " --compile," * s["compile"]
    with run.slot(s["slots"]["train"]):
        whole, _ = train_kill_resume(run, record, s, fast, work, compiled)
    with run.slot(s["slots"]["fsdp"]):  # its own time, whatever the runs before it took
        fsdp_runs(run, record, s, common, fast, work, compiled, whole)
    for value in record.values():  # a run that failed (and was not meant to die) fails its check
        if (
            isinstance(value, dict)
            and value.get("returncode") not in (None, 0)
            and not value.get("killed")
        ):
            value["ok"] = False


def train_kill_resume(run, record, s, fast, work, compiled):
    """The uninterrupted run; the same SIGKILLed in step kill_at, then --resume; -> (whole, cut)."""
    name = f"uninterrupted (bf16,{compiled} --checkpointing)"
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
    return whole, cut


def fsdp_runs(run, record, s, common, fast, work, compiled, whole):
    """FSDP2 at world size 1: as most users run it (torchrun, --fsdp and the uninterrupted run's
    settings: bf16, --compile on a GPU, --checkpointing) against the uninterrupted run; and in fp32
    (rank 0 of 1 in torchrun's environment) against the plain path, which it must equal closely."""
    name = f"torchrun --fsdp (bf16,{compiled} --checkpointing)"
    fsdp = run.attempt(
        record,
        name,
        lambda: run_train(run, fast + ["--fsdp"], work / "fsdp-bf16", torchrun=True),
        need=45 if s["compile"] else 20,  # a cold compilation: FSDP2's bf16 parameters
    )
    if fsdp and whole and whole.get("returncode") == 0 == fsdp.get("returncode"):

        def fsdp_bf16_check():
            result = compare_runs(work / "whole", work / "fsdp-bf16")
            result["fsdp_in_log"] = "(FSDP2)" in fsdp["stdout"]
            result["tolerance_rel"] = FSDP_BF16_TOLERANCE
            result["ok"] = (
                result["fsdp_in_log"]
                and result["steps"] == [s["steps"]] * 2
                and result["first_loss_rel_diff"] <= FSDP_BF16_TOLERANCE / 10
                and result["loss_max_rel_diff"] <= FSDP_BF16_TOLERANCE
            )
            return result

        flag = " --compile" * s["compile"]
        run.attempt(record, f"FSDP2{flag} equals plain{flag} (bf16)", fsdp_bf16_check)
    plain = common + ["--steps", str(s["fsdp_steps"]), "--dtype", "float32", "--checkpointing"]
    one = run.attempt(
        record, "plain path (fp32)", lambda: run_train(run, plain, work / "plain"), need=15
    )
    fsdp = run.attempt(
        record,
        "FSDP2 at world size 1 (--fsdp, rank 0 of 1, fp32)",
        lambda: run_train(run, plain + ["--fsdp"], work / "fsdp", rank_of_one=True),
        need=15,
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
