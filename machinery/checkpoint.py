"""Checkpoints: any checkpoint loaded with its tokenizer (load, what every script calls), and the
checkpoints of a run on many ranks, no rank holding the whole model (after torchtitan).

    python -c "from machinery.checkpoint import load; print(load('smollm2')[0].args)"
    torchrun --nproc_per_node 8 train.py --model path/to/llama --data pile.jsonl --target_len 32768

(Loading the model into FSDP2 shards: distributed.py.)

Checkpoints: one process writes OUT/checkpoint.pt, a plain torch.save of the full state. With world
size > 1 each rank writes its own slice of the weights and AdamW moments with
torch.distributed.checkpoint (DCP) into OUT/checkpoints/step-N.tmp/; once every rank is done, rank 0
adds train_state.json (step, settings) and renames the directory to step-N. A directory without
.tmp is complete, so a kill mid-save leaves the previous one whole. DCP records each tensor's global
shape and offsets, so any world size resumes it, one process included; checkpoint.pt too is read on
any world size. The newest complete checkpoint of either kind is the one resumed.

Export: the final model is gathered one tensor at a time, cast (bf16 by default) and written by
rank 0 into safetensors files with model.safetensors.index.json, as transformers writes them.
"""
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from errors import UserError
from machinery.files import atomic_path, atomic_write
from machinery.ranks import is_rank0
from machinery.tokenizer import load_tokenizer, resolve
from machinery.weights import hf_config, to_hf_name
from model import Transformer

SHARDED = "checkpoints"  # OUT/checkpoints/step-N/: the DCP checkpoints of world size > 1
SHARD_BYTES = 2**31  # the largest safetensors file of an export (transformers' default is 5 GB)


def load(path, *, rope_scaling=None, rope_theta=None, dtype=torch.float32, device="cpu",
         context_len=None):
    """The model (eval mode) and its tokenizer from one path or name: Transformer.from_pretrained,
    then the tokenizer stored beside the weights, checked against the embedding."""
    model = Transformer.from_pretrained(path, rope_scaling=rope_scaling, rope_theta=rope_theta,
                                        dtype=dtype, device=device, context_len=context_len)
    return model, checkpoint_tokenizer(resolve(path), model.args)


def checkpoint_tokenizer(path, args):
    """The tokenizer stored with the checkpoint at `path`, checked against its embedding."""
    tokenizer = load_tokenizer(path)
    if tokenizer.n_vocab > args.vocab_size:
        raise UserError(f"{path}: the tokenizer has {tokenizer.n_vocab} tokens but the embedding "
                        f"only {args.vocab_size} rows; they do not belong together.")
    return tokenizer


def first_line(e):
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


# ---- checkpoints ---------------------------------------------------------------------------------

def step_dirs(out):
    """The complete DCP checkpoints in OUT, oldest first."""
    found = [(int(m.group(1)), p) for p in (Path(out) / SHARDED).glob("step-*")
             if (m := re.fullmatch(r"step-(\d+)", p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def read_plain(path):
    """OUT/checkpoint.pt as plain tensors (weights_only: a pickle that runs code is refused)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        state["config"], state["step"]
        return state
    except Exception as e:  # also a cut file, or one train.py did not write
        raise UserError(f"--resume: {path} is not a checkpoint of plain tensors written by "
                        f"train.py ({first_line(e)}).") from None


def read_info(path):
    """-> (step, settings) of a checkpoint, a file or a DCP directory."""
    if path.is_dir():
        try:
            info = json.loads((path / "train_state.json").read_text())
            return info["step"], info["config"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"--resume: {path} is not a checkpoint written by train.py "
                            f"({first_line(e)}).") from None
    state = read_plain(path)
    return state["step"], state["config"]


def find_checkpoint(out):
    """The newest complete checkpoint in OUT, checkpoint.pt or checkpoints/step-N, or None. (A kill
    between publishing one and deleting the older can leave both.)"""
    plain, dirs = Path(out) / "checkpoint.pt", step_dirs(out)
    if not dirs:
        return plain if plain.exists() else None
    if plain.exists() and read_info(plain)[0] > read_info(dirs[-1])[0]:
        return plain
    return dirs[-1]


def save_checkpoint(out, model, optimizer, step, config, previous=None):
    """Write the checkpoint of `step`; -> its path. `previous`: (path, step) of the last complete
    one, named if this fails. The older checkpoints are deleted once the new one is complete."""
    out = Path(out)
    if dist.is_initialized() and dist.get_world_size() > 1:
        path = _save_sharded(out, model, optimizer, step, config, previous)
    else:
        path = _save_plain(out / "checkpoint.pt", model, optimizer, step, config, previous)
    if is_rank0():
        for old in [out / "checkpoint.pt", *step_dirs(out)]:
            if old != path and old.is_dir():  # renamed first: a cut rmtree leaves only a .tmp
                gone = old.with_name(old.name + ".tmp")
                shutil.rmtree(gone, ignore_errors=True)
                os.replace(old, gone)
                shutil.rmtree(gone)
            elif old != path and old.exists():
                old.unlink()
    return path


def _failed(step, tmp, error, previous):
    kept = f"the previous checkpoint {previous[0]} (step {previous[1]}) is intact" if previous \
        else f"{tmp.with_suffix('')} is unchanged"
    return UserError(f"could not write the checkpoint of step {step} to {tmp} ({error}); {kept}: "
                      "free space, then rerun with --resume.")


def _save_plain(path, model, optimizer, step, config, previous):
    """One torch.save, written whole to a temporary file, then renamed over the previous one: a
    kill leaves the old file as it was; a failed write (a full disk) is one sentence, old kept."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = {"model": get_model_state_dict(model, options=options),
             "optimizer": get_optimizer_state_dict(model, optimizer, options=options),
             "step": step, "config": config,
             "rng": {"cpu": torch.get_rng_state()}}  # unused by the loop (data: per-step generator)
    if torch.cuda.is_available():
        state["rng"]["cuda"] = torch.cuda.get_rng_state()
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    except OSError as e:
        raise _failed(step, Path(str(path) + ".tmp"), e.strerror or e, previous) from None
    return path


def _save_sharded(out, model, optimizer, step, config, previous):
    """DCP: each rank writes its slice into step-N.tmp/, then rank 0 renames it to step-N."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = out / SHARDED / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if is_rank0():  # what a killed save left behind
        for stale in (out / SHARDED).glob("*.tmp"):
            shutil.rmtree(stale)
    dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)  # this rank's slices, no gather
    error = None
    try:
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp)
    except Exception as e:  # DCP raises on every rank when one rank's write failed
        error = e
    if error is None and is_rank0():
        try:
            atomic_write(tmp / "train_state.json", json.dumps({"step": step, "config": config}))
            if final.exists():  # the same step of a run that --overwrite replaces
                shutil.rmtree(final)
            os.replace(tmp, final)  # the publication: a complete step-N appears at once
        except OSError as e:
            error = e
    verdict = [str(getattr(error, "strerror", None) or error) if error else None]
    dist.broadcast_object_list(verdict, src=0)  # rank 0's, so that every rank stops or goes on
    if verdict[0] is not None or error is not None:
        if is_rank0():
            shutil.rmtree(tmp, ignore_errors=True)
        raise _failed(step, tmp, verdict[0] or error, previous)
    return final


def load_checkpoint(path, model, optimizer):
    """Restore model and optimizer from a checkpoint of either kind, from any world size."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                         set_model_state_dict,
                                                         set_optimizer_state_dict, set_state_dict)

    if path.is_dir():
        import torch.distributed.checkpoint as dcp

        model_state, optimizer_state = get_state_dict(model, optimizer)  # this world's slices
        state = {"model": model_state, "optimizer": optimizer_state}
        try:
            SafeReader(path).read_metadata()  # here first, for its own error, not DCP's summary
            dcp.load(state, storage_reader=SafeReader(path), no_dist=not dist.is_initialized())
        except Exception as e:
            raise UserError(f"--resume: {path} is not a checkpoint of plain tensors written by "
                            f"train.py ({first_line(e)}).") from None
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        return
    state = read_plain(path)
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state["model"], options=options)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)
    # copies: as views of the mmapped file, the AdamW states would keep the replaced checkpoint.pt
    # on disk (deleted, not freed) for the whole run
    for values in optimizer.state.values():
        for key, value in values.items():
            if torch.is_tensor(value):
                values[key] = value.clone()
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"])


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's .metadata is a pickle: only DCP's metadata classes, torch.Size, dtypes, layouts and a
    path may be built from it, so that a checkpoint, untrusted input, never runs code."""
    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath")}

    def find_class(self, module, name):
        dcp = "torch.distributed.checkpoint."
        if "." not in name and (module.startswith(dcp) or module == "torch"
                                or (module, name) in self.ALLOWED):
            found = super().find_class(module, name)
            if (module, name) in self.ALLOWED or isinstance(found, torch.dtype) or (
                    isinstance(found, type) and found.__module__.startswith(dcp)):
                return found
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def SafeReader(path):  # noqa: N802 (a FileSystemReader, its class made on use: imports stay cheap)
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with open(Path(self.path) / ".metadata", "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata
    return Reader(path)


# ---- export --------------------------------------------------------------------------------------

def save_final(directory, model, args, tokenizer, dtype, last=None):
    """A Hugging Face directory (config.json with the scaled RoPE, tokenizer, safetensors), built in
    DIR.tmp, then moved into place. One tensor gathered at a time; rank 0 casts it to `dtype` and
    writes a file whenever SHARD_BYTES are pending: no optimizer state and never the whole model.
    `last`: the path of the last checkpoint, named if this fails."""
    from safetensors.torch import save_file

    state = model.state_dict()  # this rank's slices (DTensors under FSDP2), one process's names
    names, files, size = list(state), [[]], 0
    for name in names:  # the layout, from the global shapes alone: whole tensors, in order
        nbytes = state[name].numel() * dtype.itemsize
        if files[-1] and size + nbytes > SHARD_BYTES:
            files.append([])
            size = 0
        files[-1].append(name)
        size += nbytes
    n = len(files)
    file_names = ["model.safetensors"] if n == 1 else \
        [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    tmp = directory.with_name(directory.name + ".tmp")
    error = None
    if is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    for file_name, group in zip(file_names, files):
        pending = {}
        for name in group:  # every rank joins each gather, even after rank 0 failed to write
            tensor = state[name]
            full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
            if is_rank0():
                pending[to_hf_name(name)] = full.detach().to("cpu", dtype).contiguous()
            del full
        if is_rank0() and error is None:
            try:
                with atomic_path(tmp / file_name) as part:  # fsynced, 0644 (safetensors: 0600)
                    save_file(pending, part, metadata={"format": "pt"})
            except OSError as e:
                error = e
    if is_rank0() and error is None:
        try:
            if n > 1:
                total = sum(state[k].numel() for k in names) * dtype.itemsize
                weight_map = {to_hf_name(k): f for f, ks in zip(file_names, files) for k in ks}
                index = {"metadata": {"total_size": total}, "weight_map": weight_map}
                atomic_write(tmp / "model.safetensors.index.json", json.dumps(index, indent=2))
            config = hf_config(args, dtype=str(dtype).removeprefix("torch."))
            if tokenizer is not None:
                config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
                tokenizer.save(tmp)
            atomic_write(tmp / "config.json", json.dumps(config, indent=2))
            shutil.rmtree(directory, ignore_errors=True)
            os.replace(tmp, directory)
        except OSError as e:
            error = e
    verdict = [str(error.strerror or error) if error else None]
    if dist.is_initialized():
        dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        if is_rank0():
            shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not write {tmp} ({verdict[0]}); {last} holds the last step: free "
                        "space, then rerun with --resume to write the final model.")
