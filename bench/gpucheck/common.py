"""What the sections of bench/gpu_check.py share: the sizes of the GPU run and of its dry image,
the run (time budgets, isolation, records, the summary), devices and peak memory, random-init
models, and the training step that sections c and d time."""

import argparse
import gc
import json
import os
import platform
import tempfile
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import torch

import eval_passkey
import model as model_py
import pose
import train
from machinery import evaluation, weights
from machinery.files import atomic_write
from model import ModelArgs, Transformer

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "demo" / "base"  # 2,048 tokens: fits every model below
TINYLLAMA_1B = dict(
    dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632, vocab_size=32000
)
LLAMA_7B = dict(dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, vocab_size=32000)
TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=2048)
SIZES = {  # the GPU run and its dry image: the same steps, smaller
    "gpu": {
        "budgets": {"a": 40, "b": 165, "c": 85, "d": 70, "e": 90},  # 450 s in all
        "b": {
            "init": dict(dim=512, n_layers=4, n_heads=8, n_kv_heads=4, hidden_dim=1408),
            "train_len": 1024,
            "batch_size": 8,
            "micro_batch_size": 4,
            "steps": 20,
            "kill_at": 13,
            "save_every": 5,
            "fsdp_steps": 5,
            "timeout": 120,
            "compile": True,
        },
        "c": {"model": TINYLLAMA_1B, "train_len": 2048, "batch_size": 8, "warmup": 2, "steps": 5},
        "d": {
            "model": TINYLLAMA_1B,
            "train_len": 2048,
            "lengths": [2**k for k in range(11, 18)],
            "steps": {"pose": 3, "full": 1},
        },
        "e": {
            "model": LLAMA_7B,
            "length": 32768,
            "memory_lengths": [65536, 131072],
            "prefill_chunk": eval_passkey.PREFILL_CHUNK,
        },
    },
    "dry": {
        "budgets": dict.fromkeys("abcde", 600),  # the dry run checks that steps work, not how fast
        "b": {
            "init": dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64),
            "train_len": 32,
            "batch_size": 4,
            "micro_batch_size": 2,
            "steps": 6,
            "kill_at": 5,
            "save_every": 2,
            "fsdp_steps": 3,
            "timeout": 300,
            "compile": False,
        },  # section c compiles; three cold compilations cost minutes on CPU
        "c": {"model": TINY, "train_len": 64, "batch_size": 2, "warmup": 1, "steps": 2},
        "d": {
            "model": TINY,
            "train_len": 64,
            "lengths": [64, 128, 256],
            "steps": {"pose": 2, "full": 1},
        },
        "e": {"model": TINY, "length": 512, "memory_lengths": [1024, 2048], "prefill_chunk": 256},
    },
}


# ---- the run: budgets, isolation, records --------------------------------------------------------


class Run:
    def __init__(self, out, dry, budget):
        self.out, self.dry = Path(out), dry
        self.sizes = SIZES["dry" if dry else "gpu"]
        self.device = torch.device("cpu" if dry else "cuda")
        self.deadline = time.monotonic() + budget
        self.section_deadline = self.deadline
        self.tmp = Path(tempfile.mkdtemp(prefix="pose-gpu-check-"))
        self.results = {
            "mode": "dry (CPU, tiny sizes)" if dry else "gpu",
            "budget_s": budget,
            "environment": environment(self.device),
            "sections": {},
        }

    def left(self):
        return min(self.deadline, self.section_deadline) - time.monotonic()

    def section(self, name, function):
        start = time.monotonic()
        self.section_deadline = start + self.sizes["budgets"][name]
        title = function.__doc__.strip().splitlines()[0]
        record = self.results["sections"][name] = {"title": title}
        if self.left() <= 0:
            record["skipped"] = "the run's time budget is spent"
        else:
            try:
                function(self, record)
            except Exception as e:  # noqa: BLE001 — recorded, and the next section runs
                record["error"] = describe(e)
            free()
        record["seconds"] = round(time.monotonic() - start, 1)
        self.save()

    def attempt(self, record, key, function, need=0.0):
        """record[key] = function(), or its error; skipped when under `need` seconds are left."""
        if self.left() < need:
            left = f"{self.left():.0f} s left, {need:.0f} s needed"
            record[key] = {"skipped": f"time budget ({left})"}
            return None
        try:
            record[key] = function()
            return record[key]
        except Exception as e:  # noqa: BLE001 — out of memory included
            record[key] = {"error": describe(e)}
            return None
        finally:
            free()

    def save(self):
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write(self.out / "gpu_check.json", json.dumps(self.results, indent=1, default=str))
        atomic_write(self.out / "summary.txt", summary(self.results))


def describe(error):
    where = "".join(traceback.format_exception(error)[-6:])[-2000:]
    return {"type": type(error).__name__, "message": str(error).strip()[:2000], "where": where}


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def environment(device):
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    try:
        import flash_attn

        env["flash_attn"] = flash_attn.__version__
    except ImportError:
        env["flash_attn"] = "not installed (SDPA is used)"
    env["flash_attn_used_by_model_py"] = model_py.flash_attn_func is not None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=torch.cuda.get_device_name(),
            capability=torch.cuda.get_device_capability(),
            cuda=torch.version.cuda,
            gpu_memory_gib=props.total_memory / 2**30,
            sdp_enabled={
                k: getattr(torch.backends.cuda, f"{k}_sdp_enabled", lambda: None)()
                for k in ("flash", "mem_efficient", "math", "cudnn")
            },
        )
    else:
        env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    env["eval_dtype"] = str(eval_dtype(device))[6:]
    return env


def eval_dtype(device):
    """The dtype eval_passkey and eval_ppl run in by default on `device`: their --dtype default
    (bf16 on CUDA, fp32 on CPU when that default is left to the device)."""
    p = argparse.ArgumentParser()
    evaluation.add_common_args(p)
    default = p.get_default("dtype")
    if isinstance(default, torch.dtype):
        return default
    names = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
    }
    return names.get(default) or (torch.bfloat16 if device.type == "cuda" else torch.float32)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device):
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device):
    """CUDA: the allocator's peak since reset_peak; CPU: the process's peak resident size."""
    return train.memory_gib(device)


def random_model(shape, device, dtype, seed=0):
    """A random-init Transformer built on `device` directly in `dtype` (a bf16 7B never exists
    in fp32); RoPE's θ stays float64 whatever the default dtype."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return Transformer(ModelArgs(**{"max_seq_len": 2048, **shape}))
    finally:
        torch.set_default_dtype(previous)


def max_diff(a, b):
    return float((a.float() - b.float()).abs().max())


# ---- c, d: training steps in this process --------------------------------------------------------


def make_step(impl, shape, state, device, checkpointing=False):
    """One step as train.py takes it (bf16 autocast on GPU, fp32 on CPU; AdamW; clipping at 1.0) of
    ours, ours+compile, or transformers' LlamaForCausalLM (sdpa), all with the weights `state`.
    -> step(batch) -> loss"""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if impl == "transformers":
        from transformers import LlamaConfig, LlamaForCausalLM

        args = ModelArgs(**{"max_seq_len": 2048, **shape})
        config = LlamaConfig.from_dict(weights.hf_config(args))
        config._attn_implementation = "sdpa"
        with torch.device(device):
            model = LlamaForCausalLM(config)
        missing, unexpected = model.load_state_dict(
            {weights.to_hf_name(k): v for k, v in state.items()}, strict=False
        )
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        if checkpointing:
            model.gradient_checkpointing_enable()

        def loss_of(x, p, y):
            return model(
                input_ids=x,
                position_ids=p,
                attention_mask=torch.ones_like(x),
                labels=y,
                shift_labels=y,
                use_cache=False,
            ).loss
    else:
        model = random_model(shape, device, torch.float32)
        model.load_state_dict(state)
        model.gradient_checkpointing = checkpointing
        if impl == "ours+compile":
            for block in model.layers:
                block.compile()

        def loss_of(x, p, y):
            return model(x, p, targets=y)

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, betas=(0.9, 0.999), weight_decay=0.0)
    autocast = torch.autocast(device.type, dtype) if dtype != torch.float32 else nullcontext()

    def step(batch):
        x, p, y = (t.to(device) for t in batch)
        with autocast:
            loss = loss_of(x, p, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def timed(step, batch, device, repeats):
    """Seconds of each of `repeats` steps and the peak memory over them (GiB)."""
    reset_peak(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss = step(batch)
        sync(device)
        seconds.append(time.perf_counter() - start)
    return {"seconds": seconds, "peak_gib": peak_gib(device), "loss": loss}


def batch_for(method, n_examples, train_len, target_len, vocab, seed=0):
    """(tokens, position_ids, targets) drawn as train.py draws them (pose.make_example), from a
    document of random tokens."""
    g = torch.Generator().manual_seed(seed)
    doc = torch.randint(0, vocab, (max(target_len, train_len) + 1,), generator=g)
    examples = [
        pose.make_example(method, len(doc), train_len, target_len, generator=g)
        for _ in range(n_examples)
    ]
    token_index = torch.stack([t for t, _ in examples])
    tokens = doc[token_index]
    targets = pose.next_token_targets(tokens, token_index)
    return tokens, torch.stack([p for _, p in examples]), targets


# ---- the summary ---------------------------------------------------------------------------------


def checks(results):
    """[(section, name, ok)] of every check."""
    return [
        (name, key, value["ok"])
        for name, section in results["sections"].items()
        for key, value in section.items()
        if isinstance(value, dict) and "ok" in value
    ]


def failures(results):
    errors = [
        f"{name}: {key}"
        for name, section in results["sections"].items()
        for key, value in section.items()
        if key == "error" or isinstance(value, dict) and "error" in value
    ]
    return errors + [f"{name}: {key}" for name, key, ok in checks(results) if not ok]


def fmt(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and value and isinstance(value[0], float):
        return "[" + ", ".join(f"{v:.4g}" for v in value) + "]"
    return str(value)


def summary(results):
    env = results["environment"]
    lines = [
        f"gpu_check ({results['mode']}), {env.get('gpu', 'CPU')}, torch {env['torch']}, "
        f"transformers {env['transformers']}, flash_attn {env['flash_attn']}, "
        f"eval dtype {env['eval_dtype']}, {env['time']}"
    ]
    if "sdp_enabled" in env:
        lines.append(f"SDPA backends enabled: {env['sdp_enabled']}")
    hidden = {"stdout", "stderr", "where", "all_s", "ok"}
    for name, section in results["sections"].items():
        lines.append(f"\n[{name}] {section.get('title', '')} ({section.get('seconds', '?')} s)")
        for key, value in section.items():
            if key in ("title", "seconds"):
                continue
            if not isinstance(value, dict):
                lines.append(f"  {key}: {fmt(value)}")
                continue
            mark = "" if "ok" not in value else ("ok    " if value["ok"] else "FAIL  ")
            mark = "ERROR " if "error" in value else "skip  " if "skipped" in value else mark
            details = ", ".join(f"{k} {fmt(v)}" for k, v in value.items() if k not in hidden)
            lines.append(f"  {mark}{key}: {details}")
    bad = failures(results)
    verdict = f"{len(bad)} failed or errored: {bad}" if bad else "all passed, no errors"
    lines.append(f"\n{len(checks(results))} checks, {verdict}")
    return "\n".join(lines) + "\n"
