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
(torchtitan): each rank reads its slices of Hugging Face safetensors, or rank 0 reads --model and
sends them (machinery/distributed.py); fp32 master weights, bf16 compute, gloo on CPU, NCCL on GPU
(written, untested: no GPU where this was developed). One process checkpoints into
OUT/checkpoint.pt, several into OUT/checkpoints/step-N/; either resumes on any world size
(machinery/checkpoint.py). On several nodes put --data and --out on a shared filesystem.
"""
import json
import math
import os
import resource
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import pose
from errors import UserError
from loss import IGNORE
from machinery import ranks
from machinery.checkpoint import (find_checkpoint, load_checkpoint, read_info, save_checkpoint,
                                  save_final)
from machinery.config import Config, demo_args, parse_args
from machinery.data import load_corpus
from machinery.distributed import build_model, parallelize
from machinery.files import atomic_write
from machinery.ranks import log0


def load_documents(cfg, tokenizer, rank):
    """The documents long enough for one example (a view of the token store); the rest counted."""
    if cfg.data is None:
        raise UserError("--data is required: a corpus from python -m machinery.prepare, or "
                        ".jsonl / .txt files.")
    corpus = load_corpus(cfg.data, tokenizer, log=log0, progress=rank == 0)  # prepared: mmapped
    need = pose.min_doc_len(cfg.method, cfg.train_len, cfg.target_len, cfg.content)
    kept = corpus.at_least(need)
    if not len(kept):
        raise UserError(f"no document in {cfg.data} has the {need} tokens an example needs: "
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
    """Peak FLOP/s of one device for MFU: the flag, or a GPU the table names exactly, in bf16;
    else None (no MFU rather than a wrong one)."""
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    if device.type == "cuda" and dtype == torch.bfloat16:
        tflops = ranks.PEAK_BF16_TFLOPS.get(torch.cuda.get_device_name(device))
        return tflops * 1e12 if tflops else None
    return None


def training_flops(args, seq_len):
    """Training FLOPs per token of ModelArgs `args` (forward + backward = 3 × forward): 6·params +
    attention (PaLM, appendix B)."""
    d, q, kv = args.dim, args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    per_layer = d * (2 * q + 2 * kv) + 3 * d * args.hidden_dim
    params = args.n_layers * per_layer + args.vocab_size * d  # + the output projection
    return 6 * params + 6 * args.n_layers * q * seq_len  # causal attention: half of 12·L·q·T


def memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


MUST_MATCH = ("model", "init", "data", "method", "train_len", "target_len", "scaling", "chunks",
              "content", "keep_boundary", "batch_size", "lr", "warmup", "lr_decay", "weight_decay",
              "grad_clip", "seed", "dtype", "warmup_type", "context_len", "rope_theta")


def logged_step(line):
    """The step of a log.jsonl line; a line cut short by a kill counts as not logged."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def set_up_processes(cfg):
    """-> (world, rank, device): machinery.ranks.set_up, after the settings that depend on the
    world size are checked. torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain python is rank 0
    of 1."""
    world = ranks.world_size()
    if cfg.fsdp and "RANK" not in os.environ:
        raise UserError("--fsdp needs torchrun's environment: "
                        "torchrun --standalone --nproc_per_node 1 train.py ...")
    if cfg.batch_size % (world * cfg.micro_batch_size):
        raise UserError(f"--batch_size {cfg.batch_size} must be divisible by world size {world} "
                        f"x --micro_batch_size {cfg.micro_batch_size}.")
    return ranks.set_up(timeout_minutes=cfg.timeout, group=cfg.fsdp)


def resume(cfg, out, model, optimizer, rank):
    """-> (steps done, (path, step) of the last complete checkpoint or None): OUT's checkpoint
    (from any world size, same settings) with --resume / --auto_resume, else a fresh log."""
    found, log_path = find_checkpoint(out), out / "log.jsonl"
    if found is None or not (cfg.resume or cfg.auto_resume):
        if cfg.resume:
            raise UserError(f"--resume: {out} holds no checkpoint (checkpoint.pt or checkpoints/"
                            "step-N); run without --resume to start, or point --out at the run.")
        if found is not None and not cfg.overwrite:  # forgetting --resume must not cost the run
            raise UserError(f"{found} holds a run already: add --resume to continue it, or "
                            "--overwrite to start afresh.")
        out.mkdir(parents=True, exist_ok=True)  # only now: a refused run leaves nothing behind
        if rank == 0:
            log_path.write_text("")
        return 0, None
    step, saved = read_info(found)
    must_match = MUST_MATCH + (("steps",) if cfg.lr_decay else ())
    changed = [k for k in must_match if saved.get(k) != getattr(cfg, k)]
    if changed == ["steps"] and step == saved["steps"]:  # more steps for a run that has ended
        raise UserError(f"--resume: {found} finished all {step} of its steps (its learning-rate "
                        f"schedule ended there), so --steps {cfg.steps} cannot continue it: train "
                        f"further as a new run from its weights (--model {out / 'final'} with "
                        "another --out), or start this one afresh with --overwrite.")
    if changed:
        raise UserError(f"--resume: {found} was trained with different settings: " + ", ".join(
            f"--{k} {saved.get(k)} (now {getattr(cfg, k)})" for k in changed) + ".")
    load_checkpoint(found, model, optimizer)
    log0(f"resumed from {found} after step {step}")
    if rank == 0 and log_path.exists():  # drop log lines of steps that will be trained again
        lines = [ln for ln in log_path.read_text().splitlines() if logged_step(ln) <= step]
        atomic_write(log_path, "".join(ln + "\n" for ln in lines))
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
    ranks.check_attention_dtype(device, dtype)
    out = Path(cfg.out)

    # ---- build: the model with its final RoPE, the tokenizer, the documents. Lc and Lt left
    # open by the flags are completed from the checkpoint's window here (final_settings)
    model, tokenizer, cfg = build_model(cfg, world, rank)
    args = model.args
    # the flags, once Lc and Lt are known: a document of Lt tokens is long enough for any method
    pose.check(cfg.method, cfg.target_len, cfg.train_len, cfg.target_len, cfg.chunks, cfg.content)
    docs = load_documents(cfg, tokenizer, rank)
    if cfg.checkpointing is None:  # activation checkpointing: on by default where memory is dear
        model.gradient_checkpointing = device.type == "cuda"
    else:
        model.gradient_checkpointing = cfg.checkpointing
    example_len = cfg.target_len if cfg.method == "full" else cfg.train_len
    log0(f"{cfg.method}: Lc={cfg.train_len} -> Lt={cfg.target_len} (Lo="
         f"{args.original_max_seq_len}, RoPE {args.rope_scaling or 'unchanged'}, base "
         f"{args.rope_theta:g}), N={cfg.chunks}, "
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
    flops_per_token = training_flops(args, example_len)
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
        tokens, position_ids, targets = batch = draw_batch(docs, cfg, step)
        loss_sum = forward_backward(model, batch, mine, cfg, world, device, autocast)
        if world > 1:
            dist.all_reduce(loss_sum)
        loss = loss_sum.item() / int((targets != IGNORE).sum())
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        grad_norm = float(grad_norm)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            kept = f"the last good checkpoint {saved[0]} (step {saved[1]}) is kept" if saved else \
                "no checkpoint was written yet"
            raise UserError(f"the loss is {loss} (gradient norm {grad_norm}) at step {step}; "
                            f"stopped before the update and {kept}: lower --lr or use --dtype "
                            "float32.")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        n_tokens = tokens.numel()
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
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
            path = save_checkpoint(out, model, optimizer, step, asdict(cfg), previous=saved)
            saved = (path, step)
            if rank == 0:
                bar.write(f"checkpoint: {path} after step {step} ({size_gib(path):.2f} GiB)")
    bar.close()

    # ---- save the extended model (Hugging Face)
    save_final(out / "final", model, args, tokenizer, getattr(torch, cfg.save_dtype),
               last=saved[0])
    log0(f"saved {out / 'final'} (Hugging Face, {cfg.save_dtype}; RoPE "
         f"{args.rope_scaling or 'unchanged'}, max_position_embeddings {args.max_seq_len}) "
         f"and {saved[0]}")


def size_gib(path):
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**30


def standing(cfg, argv):
    """Where an interrupted run stands: its last complete checkpoint and the command that resumes
    it, or that nothing of it was written yet (OUT's checkpoint, if any, is another run's unless
    it has every setting given here)."""
    if cfg is None:
        return "nothing was started."
    found = find_checkpoint(Path(cfg.out)) if Path(cfg.out).is_dir() else None
    saved = read_info(found)[1] if found else {}
    if found is None or any(saved.get(k) != getattr(cfg, k) for k in MUST_MATCH + ("steps",)
                            if getattr(cfg, k) is not None):
        return "no checkpoint of this run was written yet; rerun the same command to start again."
    again = " ".join(shlex.quote(a) for a in argv if a not in ("--overwrite", "--resume"))
    return (f"{found} (step {read_info(found)[0]}) is the last complete checkpoint; continue "
            f"with: python train.py {again} --resume (torchrun: the same, on any world size).")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg, parsed, code = Config(), None, 1
    try:
        with ranks.signals_raise():  # Ctrl-C and SIGTERM: one line below, no traceback
            argv = argv or demo_args()
            cfg = parsed = parse_args(argv, __doc__)
            train(cfg)
        code = 0
    except ranks.Interrupted as e:
        code = e.code
        if ranks.is_rank0():
            print(f"\ninterrupted ({e}): {standing(parsed, argv)}", file=sys.stderr)
    except UserError as e:  # a user's mistake, or a run that cannot go on: one sentence
        if ranks.is_rank0():
            print(f"error: {e}", file=sys.stderr)
    except (torch.OutOfMemoryError, MemoryError):  # may strike one rank only: every rank says it
        length = cfg.target_len if cfg.method == "full" else cfg.train_len
        print(f"error: out of memory with {cfg.micro_batch_size} example(s) of {length} tokens per "
              "forward pass; lower --micro_batch_size or turn on --checkpointing.", file=sys.stderr)
    except BaseException:  # a bug, whose traceback follows: the group closed first
        ranks.close(1)
        raise
    ranks.leave(code)


if __name__ == "__main__":
    main()
