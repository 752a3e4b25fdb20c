"""The model on a world of ranks: built once with its final RoPE, sharded with FSDP2, filled without
any rank holding the whole model (after torchtitan).

    torchrun --nproc_per_node 8 train.py --model path/to/llama --data pile.jsonl --target_len 32768

One process reads the checkpoint, builds the model with final_settings (the scaled RoPE) and
loads the weights into it once. With world size > 1 each TransformerBlock, then the root, is
wrapped in FSDP2 `fully_shard` on a model built on the meta device, and each rank fills its shards:
- Hugging Face safetensors: every rank reads only its own rows of each tensor
  (safe_open(...).get_slice), so the host memory summed over ranks is one model, not one per rank;
- Meta .pth shards (concatenated, q/k rows permuted) and GGUF (dequantized) need whole tensors, and
  --init draws them: rank 0 builds the model, broadcast_weights sends it one tensor at a time, each
  rank keeping its slice, then rank 0 shards its own copy in place.
"""
import contextlib
import json
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

import rope
from errors import UserError
from machinery.checkpoint import checkpoint_tokenizer
from machinery.ranks import log0
from machinery.tokenizer import load_tokenizer, resolve
from machinery.weights import (check_family, checkpoint_format, from_hf_name, hf_files,
                               hf_params, read_checkpoint, read_scaling, to_hf_name, with_scaling)
from model import ModelArgs, Transformer


def final_settings(cfg, args):
    """-> (cfg with Lc and Lt filled in, the ModelArgs training sees): Lc defaults to the
    checkpoint's window; the RoPE base raised to --rope_theta (ABF), then RoPE scaled by s = Lt / Lo
    on top of the checkpoint's own scaling (noskip, --scaling none: unchanged), after checking Lc
    and Lt against that window."""
    check_family(args, "--init" if cfg.init else cfg.model)  # refused now, not at the export
    window = args.window  # the context the checkpoint has now: Lo, or what its RoPE scaling reaches
    if cfg.train_len is None and args.rope_scaling:
        raise UserError(f"{cfg.model} already carries RoPE {args.rope_scaling} (window {window}): "
                        f"give --train_len, e.g. {args.original_max_seq_len}, the length it was "
                        "pretrained at.")
    train_len = cfg.train_len or window
    target_len = cfg.target_len
    if cfg.method == "noskip":
        if target_len not in (None, train_len):
            raise UserError(f"--method noskip trains at positions 0..Lc-1 and keeps the RoPE: "
                            f"leave --target_len out or set it to --train_len "
                            f"({train_len}), not {target_len}.")
        target_len = train_len
    elif target_len is None or target_len <= train_len:
        raise UserError(f"--method {cfg.method} extends the window, so --target_len (Lt) must be "
                        f"larger than --train_len (Lc = {train_len}); got {target_len}.")
    if train_len > window:
        log0(f"warning: train_len {train_len} exceeds the model's context {window}; "
             "PoSE assumes Lc <= Lo.")
    cfg = replace(cfg, train_len=train_len, target_len=target_len)
    if cfg.rope_theta is not None:  # ABF: the new base first, any interpolation on top of it
        args = with_scaling(args, None, cfg.rope_theta)
    if cfg.method == "noskip":
        return cfg, args
    if cfg.scaling == "none":  # the checkpoint's RoPE (with --rope_theta: ABF alone) up to Lt
        return cfg, replace(args, max_seq_len=cfg.target_len)
    if (cfg.scaling or "").endswith(".json"):  # longrope.py's factors, searched for Lo -> Lt
        scaling = read_scaling(cfg.scaling)
        searched = (scaling[rope.LO], round(scaling.get("factor", 0) * scaling[rope.LO]))
        if args.rope_scaling or searched != (window, cfg.target_len):
            raise UserError(f"{cfg.scaling} was searched for {searched[0]} -> {searched[1]} "
                            f"tokens on plain RoPE; {cfg.model} has RoPE "
                            f"{rope.kind(args.rope_scaling)} at {window} and --target_len is "
                            f"{cfg.target_len}: search again with longrope.py.")
    else:
        scaling = rope.extend(args.rope_scaling, window, cfg.target_len, cfg.scaling)
    return cfg, replace(with_scaling(args, scaling), max_seq_len=cfg.target_len)


def read_model(cfg):
    """-> (model fp32 on CPU with its final RoPE, tokenizer, cfg completed): the checkpoint read
    once into the model built with final_settings, or --init's fresh model."""
    if cfg.init is None:
        params, state, source = read_checkpoint(cfg.model, cfg.context_len)
        cfg, args = final_settings(cfg, ModelArgs.from_params(params, source))
        with torch.device("meta"):  # no memory, no random init: load_weights assigns the tensors
            model = Transformer(args)
        model.load_weights(state, source=resolve(cfg.model))
        return model.float(), checkpoint_tokenizer(resolve(cfg.model), args), cfg
    if cfg.tokenizer is None:
        raise UserError("--init builds a fresh model, which needs --tokenizer too.")
    tokenizer = load_tokenizer(resolve(cfg.tokenizer))
    try:
        text = cfg.init if cfg.init.lstrip().startswith("{") else Path(cfg.init).read_text()
        args = ModelArgs(**{"vocab_size": tokenizer.n_vocab, **json.loads(text)})
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise UserError(f"--init {cfg.init}: expected a JSON object of ModelArgs fields ({e}).") \
            from None
    if tokenizer.n_vocab > args.vocab_size:
        raise UserError(f"--init: vocab_size {args.vocab_size} is smaller than the tokenizer's "
                        f"{tokenizer.n_vocab} tokens.")
    torch.manual_seed(cfg.seed)
    cfg, args = final_settings(cfg, args)
    return Transformer(args), tokenizer, cfg


def sliced(cfg, world):
    """Whether every rank reads its own slices (Hugging Face safetensors on several ranks)."""
    return world > 1 and cfg.init is None and \
        checkpoint_format(resolve(cfg.model), cfg.context_len) == "hf"


def build_model(cfg, world, rank):
    """-> (model fp32 with its final RoPE, tokenizer, cfg with Lc and Lt completed). One process:
    read_model's. Several: on the meta device, for parallelize to fill once sharded; but where
    tensors must be converted whole, rank 0's is read_model's, the only rank that reads weights."""
    if world == 1:
        return read_model(cfg)
    if sliced(cfg, world):  # every rank reads config.json alone, with the same result
        path = resolve(cfg.model)
        cfg, args = final_settings(cfg, ModelArgs.from_params(hf_params(path), path))
        with torch.device("meta"):
            return Transformer(args), checkpoint_tokenizer(path, args), cfg
    found = [None, None, None]  # rank 0's args, completed settings or error, for every rank
    if rank == 0:
        try:
            model, tokenizer, cfg = read_model(cfg)
            found[:2] = [model.args, cfg]
        except UserError as e:  # a bug keeps its traceback (torchrun then stops every rank)
            found[2] = str(e)
    dist.broadcast_object_list(found, src=0)
    if found[2] is not None:
        raise UserError(found[2])
    args, cfg = found[:2]
    if rank == 0:
        return model, tokenizer, cfg
    tokenizer = load_tokenizer(resolve(cfg.tokenizer if cfg.init is not None else cfg.model))
    with torch.device("meta"):
        return Transformer(args), tokenizer, cfg


def parallelize(model, cfg, world, rank, device, dtype):
    """Compile and shard the unchanged model as torchtitan does (each block, then the root), then
    fill the shards of a model built on the meta device; -> the autocast context of a forward."""
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
    whole = not model.tok_embeddings.weight.is_meta  # rank 0 holding what it broadcasts
    if whole:  # before sharding, while it holds them whole
        broadcast_weights(model, device)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)  # embeddings, final norm, output
    if not whole:
        model.to_empty(device=device)  # this rank's slices, uninitialized
        if sliced(cfg, world):
            load_slices(model, resolve(cfg.model))
        else:
            broadcast_weights(model, device)  # filled from rank 0's weights
    return contextlib.nullcontext()  # FSDP's policy casts the parameters for compute


def broadcast_weights(model, device):
    """Rank 0 sends its whole, unsharded weights, one tensor at a time; every other rank, its model
    already sharded by FSDP2 (and materialized from meta), keeps its slice of each. torchtitan's
    set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True), but rank 0 shards its
    model in place afterwards, so it never holds its full weights and its shards at once."""
    from torch.distributed.tensor import distribute_tensor

    with torch.no_grad():
        for tensor in model.state_dict().values():  # the same names in the same order everywhere
            if dist.get_rank() == 0:
                dist.broadcast(tensor.to(device), src=0)
                continue
            full = torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)
            dist.broadcast(full, src=0)
            # src_data_rank=None: each rank cuts its slice from the tensor it holds, no more traffic
            tensor.copy_(distribute_tensor(full, tensor.device_mesh, tensor.placements,
                                           src_data_rank=None))
            del full


def load_slices(model, path):
    """Fill this rank's FSDP2 shards from the Hugging Face checkpoint at `path`, reading only their
    rows. FSDP2 shards every parameter on dim 0 as torch.chunk does: with c = ceil(rows / world),
    rank r holds rows r·c .. r·c + its length. Each slice is cast to the model's dtype (bf16 ->
    fp32) alone, and each tensor's file is opened (memory-mapped) and closed again, so a rank's
    host memory is its shards plus one slice. Names and shapes are checked as strictly as
    Transformer.load_weights does; Hugging Face's q/k rows are in our layout already."""
    from safetensors import SafetensorError, safe_open
    from torch.distributed.tensor import Shard

    files = {}  # Hugging Face name -> its file
    for file in hf_files(path):
        try:
            with safe_open(file, "pt") as f:
                files.update(dict.fromkeys(f.keys(), file))
        except (SafetensorError, OSError) as e:
            raise UserError(f"{file} is not a readable safetensors file ({e}).") from None
    if model.args.tie_word_embeddings:
        files.pop("lm_head.weight", None)  # some tied checkpoints store the copy too
    state = model.state_dict()  # DTensors: this rank's shards
    missing = [k for k in state if to_hf_name(k) not in files]
    unexpected = [from_hf_name(k) for k in files.keys() - {to_hf_name(k) for k in state}]
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match the config: missing {sorted(missing)[:5]}, "
                        f"unexpected {sorted(unexpected)[:5]}.")
    with torch.no_grad():
        for name, tensor in state.items():
            assert tensor.placements == (Shard(0),), (name, tensor.placements)
            local, rows, mesh = tensor.to_local(), tensor.shape[0], tensor.device_mesh
            per_rank = -(-rows // mesh.size())  # torch.chunk's chunk size: ceil(rows / world)
            start = min(mesh.get_local_rank() * per_rank, rows)
            with safe_open(files[to_hf_name(name)], "pt") as f:
                part = f.get_slice(to_hf_name(name))
                if tuple(part.get_shape()) != tuple(tensor.shape):
                    raise UserError(f"{path}: {name} has shape {tuple(part.get_shape())}, the "
                                    f"config implies {tuple(tensor.shape)}.")
                if local.numel():
                    local.copy_(part[start:start + local.shape[0]])
