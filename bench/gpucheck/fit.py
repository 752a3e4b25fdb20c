"""What fits the card, computed before a step runs, so that bench/gpu_check.py records a size the
card cannot hold as the limit it is, with its estimate, and never as an out-of-memory failure.

An estimate is the weights, the KV cache and the activations of the largest prefill piece (one
layer's, without autograd: each layer's are freed before the next runs), or for a training step the
weights with their gradients and AdamW's moments, the checkpointed block inputs and one block's
recomputation. Each term is an upper bound of what the code allocates, not a measurement: a size
is tried when its estimate is under HEADROOM of what the process can allocate.
"""

import math

import torch

import model as model_py
from loss import LOSS_CHUNK

HEADROOM = 0.95  # of the memory free to the process: the allocator's rounding, cuBLAS's workspace


def gib(n_bytes):
    return n_bytes / 2**30


def usable_gib(run):
    """What this process can allocate: the device's free memory and the allocator's own cached
    blocks (torch.cuda.mem_get_info, memory_reserved); in the dry mode, the card that the section
    running pretends (none: no limit)."""
    if run.dry:
        return run.sizes[run.current].get("memory_gib", math.inf)
    free, _ = torch.cuda.mem_get_info()
    return gib(free + torch.cuda.memory_reserved())


def layer_bytes(args, piece, context, device_type, dtype):
    """One layer's activations for `piece` new tokens attending to `context` keys: the residual,
    its norm (and RMSNorm's fp32 squares), q, k, v and the attention output, the FFN's three
    (piece, hidden_dim) states, and the key/value heads attend() copies for GQA (sdpa_plan)."""
    b, d, q = dtype.itemsize, args.dim, args.n_heads * args.head_dim
    residual = piece * (2 * d + 4 * q) * b + 2 * piece * d * 4
    ffn = 3 * piece * args.hidden_dim * b
    copies, _ = model_py.sdpa_plan(
        device_type, dtype, piece, context, args.n_kv_heads != args.n_heads
    )
    return residual + ffn + (2 * context * q * b if copies else 0)


def prefill(args, weights_bytes, tokens, chunk, device_type, dtype, cache_tokens=None, logits=1):
    """A forward over `tokens` prompt tokens, `chunk` at a time (None: at once), into a KV cache of
    `cache_tokens` (default: tokens; 0: none, as eval_ppl's window), then `logits` fp32 rows of the
    vocabulary. -> {weights, kv_cache, activations, total} in GiB"""
    piece = min(chunk or tokens, tokens)  # the last piece is the widest: it attends to them all
    cache_tokens = tokens if cache_tokens is None else cache_tokens
    kv = 2 * args.n_layers * cache_tokens * args.n_kv_heads * args.head_dim * dtype.itemsize
    activations = layer_bytes(args, piece, tokens, device_type, dtype)
    activations += logits * args.vocab_size * (dtype.itemsize + 4)
    total = weights_bytes + kv + activations
    return {
        "weights_gib": gib(weights_bytes),
        "kv_cache_gib": gib(kv),
        "activations_gib": gib(activations),
        "total_gib": gib(total),
    }


def training_step(args, n_params, tokens, device_type, dtype):
    """One training step of one example of `tokens` tokens as train.py takes it: fp32 weights, their
    gradients and AdamW's two moments (16 bytes a parameter), autocast's half-precision copy of the
    weights, each block's fp32 input kept by activation checkpointing, one block recomputed with its
    gradients, the loss's logits in chunks. -> {weights_and_optimizer, activations, total} in GiB"""
    states = (16 + (dtype.itemsize if dtype != torch.float32 else 0)) * n_params
    checkpoints = args.n_layers * tokens * args.dim * 4
    activations = checkpoints + 2 * layer_bytes(args, tokens, tokens, device_type, dtype)
    activations += 3 * LOSS_CHUNK * args.vocab_size * 4 + tokens * args.dim * 4  # the loss, dh
    return {
        "weights_and_optimizer_gib": gib(states),
        "activations_gib": gib(activations),
        "total_gib": gib(states + activations),
    }


def verdict(estimate, usable):
    """-> None when `estimate` fits `usable` GiB, else the sentence that records the limit."""
    if estimate["total_gib"] <= HEADROOM * usable:
        return None
    return (
        f"does not fit: estimated {estimate['total_gib']:.3g} GiB > {HEADROOM:.0%} of the "
        f"{usable:.3g} GiB this process can allocate; not run"
    )
