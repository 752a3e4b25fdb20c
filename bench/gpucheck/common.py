"""What the sections of bench/gpu_check.py share: the sizes of the GPU run and of its dry image,
the run (time budgets and slots, isolation, limits, records, the summary), devices and peak memory,
random-init models, and the training step that sections c and d time."""

import argparse
import gc
import json
import os
import platform
import tempfile
import time
import traceback
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

import eval_passkey
import model as model_py
import pose
import train
from bench.gpucheck import fit
from machinery import evaluation, ranks, weights
from machinery.files import atomic_write
from model import ModelArgs, Transformer

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "demo" / "base"  # 2,048 tokens: fits every model below
TINYLLAMA_1B = dict(
    dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632, vocab_size=32000
)
LLAMA_7B = dict(dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, vocab_size=32000)
LLAMA3_8B = dict(  # GQA: 8 key/value heads for 32 query heads, head_dim 128
    dim=4096,
    n_layers=32,
    n_heads=32,
    n_kv_heads=8,
    hidden_dim=14336,
    vocab_size=128256,
    rope_theta=500000.0,
)
TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=2048)
SIZES = {  # the GPU run and its dry image: the same steps, smaller
    "gpu": {
        "budgets": {"a": 35, "b": 180, "c": 70, "d": 55, "e": 110},  # 450 s in all
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
            "slots": {"train": 100, "fsdp": 80},  # kill and resume; then the FSDP2 runs, NCCL
        },
        "c": {"model": TINYLLAMA_1B, "train_len": 2048, "batch_size": 8, "warmup": 2, "steps": 5},
        "d": {
            "model": TINYLLAMA_1B,
            "train_len": 2048,
            "lengths": [2**k for k in range(11, 18)],
            "steps": {"pose": 3, "full": 1},
        },
        "e": {
            "models": {"LLaMA-7B (MHA)": LLAMA_7B, "Llama-3-8B (GQA)": LLAMA3_8B},
            "slot": 55,  # seconds of section e for each model
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
            "slots": {"train": 300, "fsdp": 300},
        },  # section c compiles; three cold compilations cost minutes on CPU
        "c": {"model": TINY, "train_len": 64, "batch_size": 2, "warmup": 1, "steps": 2},
        "d": {
            "model": TINY,
            "train_len": 64,
            "lengths": [64, 128, 256],
            "steps": {"pose": 2, "full": 1},
        },
        "e": {
            "models": {"tiny MHA": dict(TINY, n_kv_heads=4), "tiny GQA": TINY},
            "memory_gib": 24 / 1024,  # a pretended card, where 8192 tokens at once do not fit
            "slot": 300,
            "length": 512,
            "memory_lengths": [1024, 8192],
            "prefill_chunk": 256,
        },
    },
}


# ---- the run: budgets, isolation, limits, records ------------------------------------------------


class OutOfTime(Exception):
    """A step stopped at its slot's end: skipped for time, not failed (a hang meets its own,
    shorter limit first, and that is an error)."""


class Run:
    """The run's records and clocks: a budget for the run, one for each section, and slots inside
    a section that a step before them cannot eat into. A step is skipped when less time is left
    than it needs, and recorded as a limit, not run, when its memory estimate exceeds the card."""

    clock = staticmethod(time.monotonic)

    def __init__(self, out, dry, budget):
        self.out, self.dry = Path(out), dry
        self.sizes = SIZES["dry" if dry else "gpu"]
        self.device = torch.device("cpu" if dry else "cuda")
        self.deadline = self.clock() + budget
        self.section_deadline = self.slot_deadline = self.deadline
        self.current = None  # the section running
        self.tmp = Path(tempfile.mkdtemp(prefix="pose-gpu-check-"))
        self.results = {
            "mode": "dry (CPU, tiny sizes)" if dry else "gpu",
            "budget_s": budget,
            "environment": environment(self.device),
            "sections": {},
        }

    def left(self):
        return min(self.deadline, self.section_deadline, self.slot_deadline) - self.clock()

    @contextmanager
    def slot(self, seconds):
        """Within: steps see at most `seconds` from now, so that the steps after the slot keep
        theirs (subprocesses are killed at the slot's end, bench/gpucheck/b_train.py)."""
        previous, self.slot_deadline = self.slot_deadline, self.clock() + seconds
        try:
            yield
        finally:
            self.slot_deadline = previous

    def section(self, name, function):
        self.current, start = name, self.clock()
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
        record["seconds"] = round(self.clock() - start, 1)
        self.save()

    def attempt(self, record, key, function, need=0.0, estimate=None, oom_is_limit=False):
        """record[key] = function(), or its error; skipped when under `need` seconds are left; a
        limit (not run, not a failure) when `estimate` (bench/gpucheck/fit.py) exceeds what the
        card can give. Out of memory within the estimate is an error, unless `oom_is_limit`: the
        step measures where memory runs out (Full-length training in section d)."""
        if self.left() < need:
            left = f"{self.left():.0f} s left, {need:.0f} s needed"
            record[key] = {"skipped": f"time budget ({left})"}
            return None
        memory = {}
        if estimate is not None:
            usable = fit.usable_gib(self)
            memory = {**estimate, "usable_gib": usable}
            if why := fit.verdict(estimate, usable):
                record[key] = {"limit": why, **memory}
                return None
        try:
            record[key] = result = function()
            if memory and isinstance(result, dict):
                result["estimate_gib"] = estimate["total_gib"]
                if "peak_gib" in result and not self.dry:  # the CPU's peak is the process's
                    result["peak_over_estimate"] = result["peak_gib"] / estimate["total_gib"]
            return result
        except OutOfTime as e:
            record[key] = {"skipped": f"time budget ({e})"}
            return None
        except torch.cuda.OutOfMemoryError as e:
            if not oom_is_limit:
                record[key] = {"error": describe(e), **memory}
            else:
                record[key] = {"limit": "out of memory (measured) within the estimate", **memory}
            return None
        except Exception as e:  # noqa: BLE001 — recorded, and the next step runs
            record[key] = {"error": describe(e), **memory}
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
    name = torch.cuda.get_device_name() if device.type == "cuda" else None
    env = {
        "device_name": name or f"CPU ({torch.backends.cpu.get_cpu_capability()}, no GPU)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        # MFU's peak: the exact name in machinery.ranks' table, else none (train.peak_flops)
        "peak_bf16_tflops": ranks.PEAK_BF16_TFLOPS.get(name) if name else None,
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
            gpu=name,
            capability=torch.cuda.get_device_capability(),
            cuda=torch.version.cuda,
            gpu_memory_gib=props.total_memory / 2**30,
            gpu_free_gib_at_start=torch.cuda.mem_get_info()[0] / 2**30,
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


def dtype_keyword(version=None):
    """from_pretrained's dtype keyword in transformers `version` (default: the installed one):
    `dtype` from 4.56, `torch_dtype` before, where an unknown keyword reaches the model's
    __init__ and raises."""
    if version is None:
        import transformers

        version = transformers.__version__
    from packaging.version import Version

    return "dtype" if Version(version).release[:2] >= (4, 56) else "torch_dtype"


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

        def loss_of(x, p, y):  # the loss of its logits as its ForCausalLMLoss takes it (fp32), y
            # already shifted: no labels= / shift_labels= keywords, whose meaning varies by release
            logits = model(
                input_ids=x, position_ids=p, attention_mask=torch.ones_like(x), use_cache=False
            ).logits
            return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100)
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
    peak = env.get("peak_bf16_tflops")
    lines = [
        f"gpu_check ({results['mode']}) on {env['device_name']}, torch {env['torch']}, "
        f"transformers {env['transformers']}, flash_attn {env['flash_attn']}, "
        f"eval dtype {env['eval_dtype']}, {env['time']}",
        f"MFU against {peak} TFLOP/s (bf16, machinery.ranks.PEAK_BF16_TFLOPS)"
        if peak
        else "no MFU: the device is not in machinery.ranks.PEAK_BF16_TFLOPS",
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
            mark = "limit " if "limit" in value else mark
            details = ", ".join(f"{k} {fmt(v)}" for k, v in value.items() if k not in hidden)
            lines.append(f"  {mark}{key}: {details}")
    bad = failures(results)
    verdict = f"{len(bad)} failed or errored: {bad}" if bad else "all passed, no errors"
    limits = sum(
        isinstance(v, dict) and "limit" in v
        for s in results["sections"].values()
        for v in s.values()
    )
    lines.append(f"\n{len(checks(results))} checks, {verdict}; {limits} sizes beyond the card")
    return "\n".join(lines) + "\n"
