"""Ranks and devices: one plain process, or torchrun's world (RANK, WORLD_SIZE, LOCAL_RANK).

    torchrun --nproc_per_node 8 train.py ...        # or eval_passkey.py, eval_ppl.py

set_up() is the one start of train.py and the evaluation scripts (device, process group with a
timeout), is_rank0() the one "am I rank 0", leave() the one way out: every rank meets at a barrier
after a finished run, the group is destroyed while the interpreter is whole (close(), also before a
bug's traceback), and the process exits with its status.
"""
import contextlib
import gc
import os
import signal
import sys
import threading
from datetime import timedelta

import torch
import torch.distributed as dist

from errors import UserError


# Dense bf16 tensor TFLOP/s of one GPU, by the exact name torch.cuda.get_device_name reports, from
# NVIDIA's data sheets (the sparse figures halved): H100 SXM / PCIe / NVL, H200 SXM / NVL, GH200,
# A100 (every form), L40S, RTX 4090 (FP32 accumulate). Another name: no MFU rather than a wrong one.
PEAK_BF16_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989, "NVIDIA H100 PCIe": 756, "NVIDIA H100 NVL": 835,
    "NVIDIA H200": 989, "NVIDIA H200 NVL": 835, "NVIDIA GH200 480GB": 989, "NVIDIA H800": 989,
    "NVIDIA A100-SXM4-80GB": 312, "NVIDIA A100-SXM4-40GB": 312, "NVIDIA A100-PCIE-40GB": 312,
    "NVIDIA A100 80GB PCIe": 312, "NVIDIA A800-SXM4-80GB": 312,
    "NVIDIA L40S": 362, "NVIDIA GeForce RTX 4090": 165,
}


class Interrupted(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler, or torchrun stopping the other ranks after one
    failed), raised where the process stands; `code` is the shell's 128 + signal number."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.code = 128 + signum


@contextlib.contextmanager
def signals_raise():
    """Within: SIGINT and SIGTERM raise Interrupted (no KeyboardInterrupt traceback), so a script
    can say where it stands and exit with 130 or 143; the previous handlers after."""
    def interrupted(signum, frame):
        raise Interrupted(signum)

    if threading.current_thread() is not threading.main_thread():  # signals reach it alone
        yield
        return
    previous = {s: signal.signal(s, interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def world_size():
    return int(os.environ.get("WORLD_SIZE", 1))


def rank():
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def is_rank0():
    return rank() == 0


def log0(*args, **kwargs):
    """print on rank 0 only (flushed: torchrun interleaves the ranks' output)."""
    if is_rank0():
        print(*args, flush=True, **kwargs)


def set_up(device=None, timeout_minutes=30.0, group=False):
    """-> (world, rank, device). The device: `device` if given, else this rank's GPU when there is
    one, else the CPU. A process group (NCCL on GPU, gloo on CPU) when the world has several ranks
    or `group` asks for one, with `timeout_minutes` for every collective."""
    world, local_rank = world_size(), int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    elif device == "cuda":
        device = f"cuda:{local_rank}"
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 or group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(minutes=timeout_minutes))
    return world, rank(), device


def close(code):
    """Destroy the process group, if any, while the interpreter is whole: after a barrier when
    the run finished (`code` 0: every rank done writing before any tears the group down)."""
    if dist.is_initialized():
        if code == 0:
            dist.barrier()
        gc.collect()  # a sharded model's reference cycles, freed while the group lives
        dist.destroy_process_group()


def check_attention_dtype(device, dtype):
    """bf16 on a GPU before sm80 has no SDPA kernel with memory linear in the length (flash and
    cuDNN need sm80, the memory-efficient kernel has no bf16 there; model.attend bars the math
    kernel): one sentence instead of a "No available kernel" traceback mid-run."""
    if device.type == "cuda" and dtype == torch.bfloat16:
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            raise UserError(f"{torch.cuda.get_device_name(device)} (sm{major}{minor}) has no bf16 "
                            "attention kernel whose memory is linear in the length: use fp32 "
                            "(train.py --dtype float32, the eval scripts' --dtype fp32).")


def leave(code):
    """The one way out of a script: close() the group, then exit with status `code`. A process
    that had a group leaves with os._exit, as gloo's worker threads can abort the interpreter's
    own teardown after a finished run ("terminate called without an active exception",
    pytorch/pytorch#179291); everything is written and flushed by then."""
    had_group = dist.is_initialized()
    close(code)
    if had_group:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)
