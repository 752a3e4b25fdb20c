"""What eval_passkey.py and eval_ppl.py share: the model flags, the resumable results file, ranks.

A run loads the model once (machinery.checkpoint.load: Hugging Face dir, Meta dir, .gguf, or
smollm2), evaluates
each requested length in turn and rewrites its --out JSON after every length (temp file + rename),
so a killed run keeps what it finished and a rerun with the same settings skips it. Under torchrun
the work is split across ranks and gathered on rank 0, which alone writes and prints.
"""
import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

import rope
from errors import UserError
from machinery import ranks
from machinery.checkpoint import load
from machinery.files import atomic_write
from machinery.weights import read_scaling


def parse_floats(text):
    try:
        return [float(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0,0.5,1, "
                                         f"got {text!r}")


def parse_lengths(text):
    try:
        lengths = sorted({int(x) for x in text.split(",") if x})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts such as "
                                         f"2048,4096, got {text!r}")
    if not lengths or lengths[0] < 1:
        raise argparse.ArgumentTypeError(f"expected positive token counts, got {text!r}")
    return lengths


def parse_scaling(text):
    """"TYPE:FACTOR" (yarn:2, linear:4 …), "none", a JSON dict with Hugging Face's keys, or a
    .json file holding one (longrope.py's factors)."""
    if text.lower() in ("none", "default"):
        return None
    if text.endswith(".json"):
        return read_scaling(text)
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"--rope_scaling is not valid JSON ({e})")
    kind, _, factor = text.partition(":")
    try:
        if kind in rope.SCALINGS:
            return {"rope_type": kind, "factor": float(factor)}
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected TYPE:FACTOR with TYPE one of "
                                     f"{', '.join(rope.SCALINGS)} (e.g. yarn:2), or a JSON dict, "
                                     f"got {text!r}")


def add_common_args(p):
    p.add_argument("--model", required=True,
                   help="Hugging Face dir, Meta dir, .gguf file, or smollm2")
    p.add_argument("--rope_scaling", type=parse_scaling, default=None,
                   help="a training-free scaling: TYPE:FACTOR (TYPE one of "
                        f"{', '.join(rope.SCALINGS)}; e.g. yarn:2) stretches the checkpoint's "
                        "window by FACTOR (on a checkpoint that already carries a scaling: its "
                        "own type, factor multiplied); a JSON dict with Hugging Face's keys and "
                        "an original_max_position_embeddings, or a .json file of one (longrope.py "
                        "writes its factors so), replaces the checkpoint's scaling")
    p.add_argument("--rope_theta", type=float, default=None,
                   help="ABF training-free: a new RoPE base, e.g. 1e6, applied before "
                        "--rope_scaling (default: the checkpoint's; a model trained with train.py "
                        "--rope_theta states its base in config.json already)")
    p.add_argument("--lengths", type=parse_lengths, required=True,
                   help="comma-separated lengths in tokens")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                   help="default: bf16 on CUDA (as train.py), fp32 on CPU")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--context_len", type=int, default=None,
                   help="the trained context of a Meta checkpoint, whose params.json does not "
                        "state it (default: a guess from its settings, printed)")
    p.add_argument("--out", required=True,
                   help="results JSON, rewritten after each length; a rerun skips done lengths")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="minutes a rank waits for the others at the end of a length before the "
                        "run stops with an error (torchrun; default: 30)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh when --out holds results of other settings")
    p.add_argument("--plot", default=None, help="also draw a figure to this .png")


def default_device_and_dtype(device, dtype):
    """(device, dtype) with the defaults filled in: CUDA when present, and there bf16 as in
    train.py (in fp32, SDPA's GQA has only the math kernel, a T×S score matrix; model.attend then
    copies the KV heads instead)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, dtype or ("bf16" if device.startswith("cuda") else "fp32")


def machine():
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"{os.cpu_count()}-core CPU ({platform.machine()}), torch {torch.__version__}"


def pyplot():
    """matplotlib's pyplot drawing to files, or None (and a line saying so) when not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install matplotlib); no figure written.")
        return None
    return plt


def save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def read_results(path):
    """The results dict stored at path, or None when it is not a results file."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(stored, dict) and isinstance(stored.get("lengths"), dict):
        return stored
    return None


class Session:
    """The model, this process's rank, and the results file: resumed when its settings match,
    else refused."""

    def __init__(self, args, config):
        self.args, self.out = args, Path(args.out)
        device, args.dtype = default_device_and_dtype(args.device, args.dtype)
        config["dtype"], config["rope_theta"] = args.dtype, args.rope_theta
        if not (math.isfinite(args.timeout) and args.timeout > 0):
            raise UserError(f"--timeout {args.timeout} cannot work: give a positive number of "
                            "minutes.")
        self.world, self.rank, device = ranks.set_up(device, timeout_minutes=args.timeout)
        self.device = str(device)
        self.config = json.loads(json.dumps(config))  # as it will read back from the file
        self.results = {"config": self.config, "lengths": {}}
        if self.out.exists() and not args.overwrite:
            stored = read_results(self.out)
            if stored is None:
                raise UserError(f"{self.out} exists but is not a results file; pass --overwrite to "
                                "replace it or choose another --out.")
            theirs = stored.get("config") or {}
            # a setting the file does not name is at its default (None): it was added later
            differ = sorted(k for k in self.config.keys() | theirs.keys()
                            if self.config.get(k) != theirs.get(k))
            if differ:
                raise UserError(f"{self.out} holds results for other settings "
                                f"({', '.join(differ)} differ); pass --overwrite to replace them "
                                "or choose another --out.")
            self.results = {**stored, "config": self.config}
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
        ranks.check_attention_dtype(torch.device(self.device), dtype)
        try:
            self.model, self.tokenizer = load(args.model, rope_scaling=args.rope_scaling,
                                              rope_theta=args.rope_theta, dtype=dtype,
                                              device=self.device, context_len=args.context_len)
        except (UserError, OSError) as e:  # the user's path or file; anything else is a bug
            reason = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            first_line = reason.strip().split("\n")[0]
            raise UserError(f"could not load the model {args.model}: {first_line}") from None
        self.started = time.time()

    def todo(self):
        """The requested lengths not already in the results file, printing the ones skipped."""
        done = [n for n in self.args.lengths if str(n) in self.results["lengths"]]
        if done and self.rank == 0:
            print(f"{self.out} already holds lengths {done}: skipped.")
        return [n for n in self.args.lengths if str(n) not in self.results["lengths"]]

    def progress(self, description, **kwargs):
        from tqdm import tqdm
        return tqdm(desc=description, disable=self.rank != 0, **kwargs)

    def rope(self):
        """The RoPE the model runs with: the checkpoint's scaling with any asked for on top."""
        a = self.model.args
        asked = f"; --rope_scaling {self.args.rope_scaling}" if self.args.rope_scaling else ""
        return f"RoPE {a.rope_scaling or 'plain'} (base {a.rope_theta:g}{asked})"

    def gather(self, records):
        """Every rank's records, on every rank. A rank that failed or lags past --timeout: one
        sentence, the finished lengths kept."""
        if self.world == 1:
            return records
        everything = [None] * self.world
        try:
            torch.distributed.all_gather_object(everything, records)
        except RuntimeError as e:  # DistBackendError, a peer's closed connection, a timeout
            raise UserError(f"rank {self.rank}: the other ranks did not all answer within "
                            f"--timeout {self.args.timeout:g} minutes, or one failed (its message "
                            f"is above; {type(e).__name__}); {self.out} keeps the finished "
                            "lengths and the same command continues.") from None
        return [r for part in everything for r in part]

    def finish(self, length, record):
        """Store one length's results and rewrite the file whole (temp file + rename): a killed
        run keeps them."""
        seconds = round(time.time() - self.started, 1)
        lengths = self.results["lengths"] | {str(length): record | {
            "seconds": seconds, "machine": machine(), "world_size": self.world}}
        self.results["lengths"] = dict(sorted(lengths.items(), key=lambda item: int(item[0])))
        self.started = time.time()
        if self.rank == 0:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.out, json.dumps(self.results, indent=1))

    def lengths(self):
        """{str(length): record} of the requested lengths, in order (for the table and the plot)."""
        return {str(n): self.results["lengths"][str(n)] for n in self.args.lengths}


def deal(sizes, world, rank):
    """The indices of `sizes` (work per item) that rank `rank` of `world` takes: the largest item
    first to the least loaded rank, so the ranks finish together (round-robin left one rank with
    the longest documents). -> this rank's indices, in order."""
    load, mine = [0] * world, []
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        load[r] += sizes[i]
        if r == rank:
            mine.append(i)
    return sorted(mine)


def run(main):
    """An evaluation script's entry on every rank: main(), then ranks.leave (group closed, status).
    Ctrl-C or SIGTERM (also torchrun stopping the ranks after one failed) ends with one line: the
    results file keeps every finished length, and the same command continues from it."""
    code = 0
    try:
        with ranks.signals_raise():
            main()
    except ranks.Interrupted as e:
        code = e.code
        if ranks.is_rank0():
            print(f"\ninterrupted ({e}): the --out results file keeps every finished length; "
                  "rerun the same command to continue.", file=sys.stderr)
    except SystemExit as e:  # --help, argparse's usage errors, exit_on_user_error's sentence
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else 1 if e.code else 0
    except BaseException:  # a bug, whose traceback follows: the group closed first
        ranks.close(1)
        raise
    ranks.leave(code)
