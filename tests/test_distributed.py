"""machinery/distributed.py as a specification: on several ranks a Hugging Face checkpoint is read
by every rank as its own slices, no rank building the whole model, and the sharded model holds
exactly the weights one process loads, whatever the checkpoint's dtype and however its files are
split; Meta checkpoints and --init, which rank 0 builds whole and broadcasts, too."""

import json
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from machinery.config import Config
from machinery.distributed import load_slices, read_model
from model import ModelArgs, Transformer
from machinery.tokenizer import GPT2_PATTERN, Tokenizer
from machinery.weights import hf_params

ROOT = Path(__file__).resolve().parent.parent

# run by torchrun on each rank: build, shard and fill as train.py does, then gather every tensor on
# rank 0
WORKER = """
import gc, json, os, sys
import torch, torch.distributed as dist
from dataclasses import asdict
from machinery.config import Config
from machinery.distributed import build_model, parallelize

dist.init_process_group("gloo")
world, rank = dist.get_world_size(), dist.get_rank()
for settings, out in zip(sys.argv[1::2], sys.argv[2::2]):
    cfg = Config(**json.loads(settings))
    model, _, cfg = build_model(cfg, world, rank)
    on_meta = [None] * world
    dist.all_gather_object(on_meta, model.tok_embeddings.weight.is_meta)
    parallelize(model, cfg, world, rank, torch.device("cpu"), torch.float32)
    full = {name: tensor.full_tensor() for name, tensor in model.state_dict().items()}
    if rank == 0:
        torch.save({"state": full, "args": asdict(model.args), "built_on_meta": on_meta}, out)
# rank 1 must not tear gloo down while rank 0 still writes (it aborted rank 0 once in CI)
dist.barrier()
del model, full
gc.collect()
dist.destroy_process_group()
# as train.py: gloo's threads can abort the interpreter's teardown (pytorch/pytorch#179291)
os._exit(0)
"""


def byte_tokenizer():
    return Tokenizer(
        {bytes([i]): i for i in range(256)},
        {"<s>": 256, "</s>": 257},
        GPT2_PATTERN,
        bos_id=256,
        eos_id=257,
        add_bos=False,
    )


def hf_checkpoint(directory, dtype, sharded, tied):
    """A tiny LLaMA (Lo = 32) as a Hugging Face directory; 259 vocabulary rows and 3 heads, so that
    the rows of most tensors do not split evenly over two ranks. Tied: the lm_head copy is stored
    too, as some do."""
    torch.manual_seed(0)
    args = ModelArgs(
        dim=24,
        n_layers=2,
        n_heads=3,
        n_kv_heads=1,
        vocab_size=259,
        hidden_dim=40,
        max_seq_len=32,
        tie_word_embeddings=tied,
    )
    Transformer(args).save_pretrained(directory, tokenizer=byte_tokenizer())
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "torch_dtype": str(dtype)[6:]}))
    state = {
        k: v.to(dtype).contiguous() for k, v in load_file(directory / "model.safetensors").items()
    }
    if tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    (directory / "model.safetensors").unlink()
    if not sharded:
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
        return
    names, weight_map = sorted(state), {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = {
        "metadata": {"total_size": sum(v.nbytes for v in state.values())},
        "weight_map": weight_map,
    }
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def meta_checkpoint(directory):
    """The tiny model as a Meta directory: params.json and one consolidated.00.pth, q/k rows
    interleaved."""
    torch.manual_seed(1)
    args = ModelArgs(
        dim=24, n_layers=2, n_heads=3, n_kv_heads=1, vocab_size=259, hidden_dim=40, max_seq_len=32
    )
    state = Transformer(args).state_dict()
    for name in [k for k in state if k.endswith(("wq.weight", "wk.weight"))]:
        w, heads = state[name], args.n_heads if "wq" in name else args.n_kv_heads
        # our half layout -> Meta's interleaved pairs (weights.interleaved_to_half undone)
        rows, cols = w.shape
        state[name] = w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)
    directory.mkdir()
    torch.save(state, directory / "consolidated.00.pth")
    params = {
        k: v for k, v in asdict(args).items() if k not in ("rope_scaling", "tie_word_embeddings")
    }
    (directory / "params.json").write_text(json.dumps(params))
    byte_tokenizer().save(directory)


@pytest.mark.slow  # torchrun, two processes
def test_two_ranks_hold_exactly_what_one_process_loads(tmp_path):
    """Under torchrun (2 CPU ranks, gloo) a Hugging Face checkpoint, fp32 or bf16, one file or a
    sharded index, untied or tied, is built on the meta device by every rank, which fills its FSDP2
    shards from its own rows of the files; a Meta checkpoint and --init are built whole by rank 0
    alone and broadcast. Either way the gathered weights equal the single-process load bit for bit
    (bf16 -> fp32 is exact), RoPE scaling included."""
    hf = {
        "fp32-single": (torch.float32, False, False),
        "bf16-sharded": (torch.bfloat16, True, True),
        "bf16-single": (torch.bfloat16, False, False),
        "fp32-sharded-tied": (torch.float32, True, True),
    }
    cases = {}  # name -> (settings, built on the meta device by rank 0 and rank 1)
    for name, (dtype, sharded, tied) in hf.items():
        hf_checkpoint(tmp_path / name, dtype, sharded, tied)
        cases[name] = {"model": str(tmp_path / name), "target_len": 128}, [True, True]
    meta_checkpoint(tmp_path / "meta")
    cases["meta"] = {"model": str(tmp_path / "meta"), "target_len": 128}, [False, True]
    init = json.dumps({"dim": 24, "n_layers": 1, "n_heads": 3, "hidden_dim": 40, "max_seq_len": 32})
    cases["init"] = (
        {"init": init, "tokenizer": str(tmp_path / "meta"), "target_len": 128, "seed": 3},
        [False, True],
    )
    argv = []
    for name, (settings, _) in cases.items():
        argv += [json.dumps(settings), str(tmp_path / f"{name}.pt")]
    (tmp_path / "worker.py").write_text(WORKER)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(tmp_path / "worker.py"),
            *argv,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr
    for name, (settings, built_on_meta) in cases.items():
        sharded = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        assert sharded["built_on_meta"] == built_on_meta, name  # HF: no rank read the whole model
        one, _, _ = read_model(Config(**settings))
        assert sharded["args"] == asdict(one.args) and one.args.rope_scaling["factor"] == 4, name
        assert sharded["state"].keys() == one.state_dict().keys(), name
        for key, tensor in one.state_dict().items():
            assert tensor.dtype == torch.float32 and torch.equal(sharded["state"][key], tensor), (
                name,
                key,
            )


@pytest.fixture
def group_of_one():
    """A gloo process group of one rank in this process: FSDP2's DTensors without starting
    processes."""
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield
    dist.destroy_process_group()


def sharded_on_meta(args):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with torch.device("meta"):
        model = Transformer(args)
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    return model.to_empty(device="cpu")


def test_slices_of_a_checkpoint_that_does_not_match_are_refused_by_name(tmp_path, group_of_one):
    """load_slices is as strict as Transformer.load_weights: a tensor missing from the files, one
    the model has no place for, or one of another shape is named in one sentence, before anything is
    half-filled."""
    hf_checkpoint(tmp_path / "ok", torch.bfloat16, sharded=False, tied=False)
    args = ModelArgs(**hf_params(tmp_path / "ok"))
    model = sharded_on_meta(args)
    load_slices(model, tmp_path / "ok")  # a world of one: the whole tensor is this rank's slice
    one, _, _ = read_model(Config(model=str(tmp_path / "ok"), method="noskip"))
    for key, tensor in one.state_dict().items():
        assert torch.equal(model.state_dict()[key].full_tensor(), tensor), key
    state = load_file(tmp_path / "ok" / "model.safetensors")
    broken = {
        "missing": {k: v for k, v in state.items() if k != "model.norm.weight"},
        "unexpected": {
            **state,
            "model.layers.9.mlp.up_proj.weight": state["model.norm.weight"].clone(),
        },
        "shape": {**state, "model.norm.weight": state["model.norm.weight"][:-1].clone()},
    }
    said = {
        "missing": "missing ['norm.weight']",
        "unexpected": "unexpected ['layers.9.feed_forward.w3.weight']",
        "shape": "norm.weight has shape (23,), the config implies (24,)",
    }
    for name, tensors in broken.items():
        save_file(tensors, tmp_path / "ok" / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(ValueError, match=re.escape(said[name])):
            load_slices(sharded_on_meta(args), tmp_path / "ok")
