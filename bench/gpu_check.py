"""One prepared GPU check: the CUDA path validated and measured in one run of at most 8 minutes.

    python bench/gpu_check.py --out runs/gpu_check            # one GPU: sections a-e in <= 450 s
    python bench/gpu_check.py --dry --out runs/gpu_check_dry  # CPU, tiny sizes: what CI runs

a  correctness: logits of tiny models (MHA and GQA, tied and untied, every RoPE scaling) against
   transformers in fp32 and bf16; the KV cache at PoSE positions, filled in pieces, against one
   forward; the chunked prefill against one pass; the chunked loss against F.cross_entropy; the
   attention kernel each path ran
b  train.py: bf16, --compile, activation checkpointing, 20 steps; the same run SIGKILLed in step 13
   and resumed, against the uninterrupted one; FSDP2 forced at world size 1 (--fsdp, as rank 0 of
   1 with torchrun's environment) against the plain path, in fp32
c  throughput of a random-init 1.1B LLaMA (TinyLlama's shape) at Lc = 2048: ours eager and
   compiled against transformers (sdpa), same batch and weights: tokens/s, MFU, peak memory
d  Figure 3: one training step of that model, PoSE (Lc 2048) against Full-length, Lt 2k ... 128k:
   time and peak memory (Full-length until it runs out of memory or of time)
e  evaluation at length, a random-init LLaMA-7B shape in the eval scripts' dtype: a passkey trial
   and a perplexity window at 32k (time); a passkey trial's peak memory at 64k and 128k, the prompt
   prefilled in pieces and at once

Every section, and every step inside one, is isolated: an exception (out of memory included) is
recorded with its message and the rest runs on. Each section has a time budget, checked before each
step, and the run a global one. OUT/gpu_check.json and OUT/summary.txt are rewritten after every
section. The dry mode runs the same functions on the CPU at tiny sizes. Nothing comes from the
network: models are random-init (saved to a temporary directory where a file is needed), the
tokenizer is demo/base's, the training text is generated. Sections a and c need transformers;
flash_attn is optional and reported. Exit status 0 when every check passed; goals are reported only.
"""
import argparse
import gc
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import eval_passkey  # noqa: E402
import eval_ppl  # noqa: E402
from machinery import evaluation  # noqa: E402
import model as model_py  # noqa: E402
import pose  # noqa: E402
import train  # noqa: E402
from machinery import weights  # noqa: E402
from loss import IGNORE, ChunkedCrossEntropy  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from machinery.weights import with_scaling  # noqa: E402

TOKENIZER = ROOT / "demo" / "base"  # 2,048 tokens: fits every model below
TINYLLAMA_1B = dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632,
                    vocab_size=32000)
LLAMA_7B = dict(dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, vocab_size=32000)
TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=2048)
SIZES = {  # the GPU run and its dry image: the same steps, smaller
    "gpu": {
        "budgets": {"a": 40, "b": 165, "c": 85, "d": 70, "e": 90},  # 450 s in all
        "b": {"init": dict(dim=512, n_layers=4, n_heads=8, n_kv_heads=4, hidden_dim=1408),
              "train_len": 1024, "batch_size": 8, "micro_batch_size": 4, "steps": 20,
              "kill_at": 13, "save_every": 5, "fsdp_steps": 5, "timeout": 120, "compile": True},
        "c": {"model": TINYLLAMA_1B, "train_len": 2048, "batch_size": 8, "warmup": 2, "steps": 5},
        "d": {"model": TINYLLAMA_1B, "train_len": 2048, "lengths": [2**k for k in range(11, 18)],
              "steps": {"pose": 3, "full": 1}},
        "e": {"model": LLAMA_7B, "length": 32768, "memory_lengths": [65536, 131072],
              "prefill_chunk": eval_passkey.PREFILL_CHUNK}},
    "dry": {
        "budgets": dict.fromkeys("abcde", 600),  # the dry run checks that steps work, not how fast
        "b": {"init": dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64),
              "train_len": 32, "batch_size": 4, "micro_batch_size": 2, "steps": 6, "kill_at": 5,
              "save_every": 2, "fsdp_steps": 3, "timeout": 300,
              "compile": False},  # section c compiles; three cold compilations cost minutes on CPU
        "c": {"model": TINY, "train_len": 64, "batch_size": 2, "warmup": 1, "steps": 2},
        "d": {"model": TINY, "train_len": 64, "lengths": [64, 128, 256],
              "steps": {"pose": 2, "full": 1}},
        "e": {"model": TINY, "length": 512, "memory_lengths": [1024, 2048], "prefill_chunk": 256}},
}
WORDS = ("the grass is green the sky is blue the sun is yellow here we go there and back again "
         "a long way from home in the quiet of the night we counted every star").split()


# ---- the run: budgets, isolation, records --------------------------------------------------------

class Run:
    def __init__(self, out, dry, budget):
        self.out, self.dry = Path(out), dry
        self.sizes = SIZES["dry" if dry else "gpu"]
        self.device = torch.device("cpu" if dry else "cuda")
        self.deadline = time.monotonic() + budget
        self.section_deadline = self.deadline
        self.tmp = Path(tempfile.mkdtemp(prefix="pose-gpu-check-"))
        self.results = {"mode": "dry (CPU, tiny sizes)" if dry else "gpu", "budget_s": budget,
                        "environment": environment(self.device), "sections": {}}

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
        for name, text in (("gpu_check.json", json.dumps(self.results, indent=1, default=str)),
                           ("summary.txt", summary(self.results))):
            tmp = self.out / (name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, self.out / name)


def describe(error):
    where = "".join(traceback.format_exception(error)[-6:])[-2000:]
    return {"type": type(error).__name__, "message": str(error).strip()[:2000], "where": where}


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def environment(device):
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
           "cpu_count": os.cpu_count(), "time": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
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
        env.update(gpu=torch.cuda.get_device_name(), capability=torch.cuda.get_device_capability(),
                   cuda=torch.version.cuda, gpu_memory_gib=props.total_memory / 2**30,
                   sdp_enabled={k: getattr(torch.backends.cuda, f"{k}_sdp_enabled", lambda: None)()
                                for k in ("flash", "mem_efficient", "math", "cudnn")})
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
    names = {"fp32": torch.float32, "float32": torch.float32,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
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


# ---- which attention kernel ran ------------------------------------------------------------------

KERNELS = {"aten::_scaled_dot_product_flash_attention": "sdpa-flash",
           "aten::_scaled_dot_product_flash_attention_for_cpu": "sdpa-flash-cpu",
           "aten::_scaled_dot_product_efficient_attention": "sdpa-efficient",
           "aten::_scaled_dot_product_cudnn_attention": "sdpa-cudnn",
           "aten::_scaled_dot_product_attention_math": "sdpa-math",
           "aten::_scaled_dot_product_fused_attention_overrideable": "sdpa-overrideable"}


def kernels_used(function):
    """Run function() under the profiler -> (its result, the attention kernels that ran)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        result = function()
        sync(torch.device("cuda" if cuda else "cpu"))
    names = {e.key for e in prof.key_averages()}
    found = {label for op, label in KERNELS.items() if op in names}
    found |= {f"flash_attn ({n[:60]})" for n in names  # the package: its op or its CUDA kernel
              if ("flash_attn" in n or "flash_fwd" in n) and not n.startswith(("aten", "pytorch"))}
    found |= {f"backward: {n}" for n in names
              if "attention_backward" in n or "flash_attn_backward" in n}
    return result, sorted(found)


# ---- a: correctness ------------------------------------------------------------------------------

SCALINGS = {"none": None,
            "linear": {"rope_type": "linear", "factor": 4.0},
            "ntk": {"rope_type": "ntk", "factor": 4.0},
            "dynamic": {"rope_type": "dynamic", "factor": 4.0},
            "yarn": {"rope_type": "yarn", "factor": 4.0},
            "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0}}
LOGIT_CASES = [  # (scaling, n_kv_heads of 4 heads, tied): MHA and GQA, tied and untied
    ("none", 4, False), ("none", 2, True), ("linear", 2, False), ("ntk", 2, True),
    ("dynamic", 1, False), ("yarn", 2, True), ("llama3", 2, False)]
SMALL = dict(dim=256, n_layers=2, n_heads=4, hidden_dim=512, vocab_size=512, max_seq_len=256)


def small_hf_dir(run, scaling, kv_heads, tied):
    """A random-init small model (head_dim 64) with `scaling`, saved by our exporter. -> path"""
    torch.manual_seed(0)
    base = Transformer(ModelArgs(**SMALL, n_kv_heads=kv_heads, tie_word_embeddings=tied))
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "norm" in name:  # away from 1, so a mixed-up norm weight cannot pass
                p.uniform_(0.5, 1.5)
            if ".wq." in name or ".wk." in name:  # sharp attention: positions matter to logits
                p.mul_(8)
    model = base
    if scaling is not None:
        with torch.device("meta"):
            model = Transformer(with_scaling(base.args, scaling))
        model.load_weights(base.state_dict())
    directory = run.tmp / f"hf-{len(list(run.tmp.glob('hf-*')))}"
    model.save_pretrained(directory)
    return directory


def random_tokens(shape, seed, device):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, SMALL["vocab_size"], shape, generator=g).to(device)


def transformers_model(directory, dtype, device):
    """LlamaForCausalLM loaded in `dtype` as users load it (its RoPE buffer stays fp32)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(directory, dtype=dtype)
    if model.dtype != dtype:  # transformers before 4.56 calls it torch_dtype
        model = LlamaForCausalLM.from_pretrained(directory, torch_dtype=dtype)
    return model.eval().to(device)


def check_logits(run, case):
    kind, kv_heads, tied = case
    directory, device = small_hf_dir(run, SCALINGS[kind], kv_heads, tied), run.device
    x = random_tokens((2, 200), 1, device)
    positions = torch.cat([torch.arange(0, 100), torch.arange(900, 1000)]).to(device)  # a skip
    with torch.no_grad():
        reference, theirs_bf16 = (
            transformers_model(directory, dtype, device)(x, position_ids=positions.expand(2, -1))
            .logits.float() for dtype in (torch.float32, torch.bfloat16))
        ours = {dtype: Transformer.from_pretrained(directory, dtype=dtype, device=device)(
            x, positions) for dtype in (torch.float32, torch.bfloat16)}
        on_cpu = Transformer.from_pretrained(directory)(x.cpu(), positions.cpu())
    fp32, scale = max_diff(ours[torch.float32], reference), float(reference.abs().max())
    bf16, bf16_theirs = max_diff(ours[torch.bfloat16], reference), max_diff(theirs_bf16, reference)
    device_vs_cpu = max_diff(ours[torch.float32].cpu(), on_cpu)
    # transformers forms RoPE angles in fp32 (we in fp64): near position 1000 that alone moves the
    # logits by ~1e-4. Our device against our CPU is the tight check.
    ok = fp32 <= 3e-4 * scale and device_vs_cpu <= 1e-5 * scale and \
        bf16 <= max(1.5 * bf16_theirs, 0.05)
    return {"max_abs_logit": scale, "fp32_max_abs_diff": fp32,
            "fp32_device_vs_cpu_max_abs_diff": device_vs_cpu, "bf16_max_abs_diff_vs_fp32": bf16,
            "transformers_bf16_max_abs_diff_vs_fp32": bf16_theirs, "ok": ok}


def check_cache(run, dtype):
    """Logits at PoSE positions through the KV cache in pieces of every shape attend() handles,
    against one forward: a first piece (T == S, causal), single decoded tokens (T == 1) and pieces
    after a cache (T < S, a mask). bf16: both against the fp32 forward."""
    device = run.device
    model = Transformer.from_pretrained(small_hf_dir(run, None, 2, False), dtype=dtype,
                                        device=device)
    x = random_tokens((1, 120), 2, device)
    positions = torch.cat([torch.arange(0, 50), torch.arange(700, 770)]).to(device)
    pieces = {"first piece (T == S)": (0, 40), "decode (T == 1)": (40, 41),
              "piece after a cache (T < S)": (41, 60), "decode again": (60, 61),
              "last piece": (61, 120)}
    cache, logits, kernels = model.make_cache(1, 120), [], {}
    with torch.no_grad():
        whole, kernels["one forward"] = kernels_used(lambda: model(x, positions))
        for name, (a, b) in pieces.items():
            out, kernels[name] = kernels_used(lambda: model(x[:, a:b], positions[a:b], cache=cache))
            logits.append(out)
        reference = whole if dtype == torch.float32 else model.float()(x, positions)
    cached, one = max_diff(torch.cat(logits, dim=1), reference), max_diff(whole, reference)
    ok = cached <= 2e-5 * float(reference.abs().max()) if dtype == torch.float32 else \
        cached <= max(1.5 * one, 0.05)
    return {"cache_max_abs_diff": cached, "one_forward_max_abs_diff": one, "kernels": kernels,
            "ok": ok}


def check_prefill(run, dtype):
    """Transformer.prefill in pieces against one pass: every layer's cache and the last position's
    logits (bf16: both against the fp32 one pass; the pieces may run another attention kernel)."""
    device = run.device
    model = Transformer.from_pretrained(small_hf_dir(run, SCALINGS["linear"], 2, False),
                                        dtype=dtype, device=device)
    x = random_tokens((1, 300), 3, device)
    caches = [model.make_cache(1, 300) for _ in range(2)]
    whole = model.logits(model.prefill(x, caches[0]))
    pieces, kernels = kernels_used(lambda: model.logits(model.prefill(x, caches[1], chunk=64)))
    cache = max(max(max_diff(a.k, b.k), max_diff(a.v, b.v)) for a, b in zip(*caches))
    result = {"cache_max_abs_diff": cache, "logits_max_abs_diff": max_diff(pieces, whole),
              "kernels": kernels}
    if dtype == torch.float32:
        scale = float(whole.abs().max())
        return result | {"ok": result["logits_max_abs_diff"] <= 2e-5 * scale and cache < 1e-4}
    model.float()
    reference = model.logits(model.prefill(x, model.make_cache(1, 300)))
    result.update(pieces_vs_fp32=max_diff(pieces, reference),
                  one_pass_vs_fp32=max_diff(whole, reference))
    return result | {"ok": result["pieces_vs_fp32"] <= max(1.5 * result["one_pass_vs_fp32"], 0.05)}


def check_loss(run, autocast_bf16):
    """ChunkedCrossEntropy against F.cross_entropy(F.linear(h, w).float()): loss, both gradients."""
    device = run.device
    g = torch.Generator().manual_seed(4)
    h0, w0 = torch.randn(600, 256, generator=g), torch.randn(1000, 256, generator=g) * 0.05
    targets = torch.randint(0, 1000, (600,), generator=g)
    targets[::37] = IGNORE
    targets = targets.to(device)
    autocast = torch.autocast(device.type, torch.bfloat16) if autocast_bf16 else nullcontext()
    results = []
    for chunked in (True, False):
        h, w = (t.to(device).requires_grad_() for t in (h0, w0))
        with autocast:
            if chunked:
                loss = ChunkedCrossEntropy.apply(h, w, targets, True)
            else:
                loss = F.cross_entropy(F.linear(h, w).float(), targets, ignore_index=IGNORE)
        loss.backward()
        results.append((loss.item(), h.grad, w.grad))
    (ours, dh, dw), (plain, dh_ref, dw_ref) = results
    rel = abs(ours - plain) / abs(plain)
    grads = max(max_diff(dh, dh_ref) / float(dh_ref.abs().max()),
                max_diff(dw, dw_ref) / float(dw_ref.abs().max()))
    tolerance = (1e-3, 1e-2) if autocast_bf16 else (1e-6, 1e-4)
    return {"loss": ours, "reference": plain, "loss_rel_diff": rel, "grad_max_rel_diff": grads,
            "ok": rel <= tolerance[0] and grads <= tolerance[1]}


def check_training_kernels(run):
    """The attention kernels of a training step, forward and backward, in train.py's dtype."""
    model = random_model(dict(SMALL, n_kv_heads=2), run.device, torch.float32).train()
    x = torch.randint(0, SMALL["vocab_size"], (2, 256), device=run.device)
    dtype = torch.bfloat16 if run.device.type == "cuda" else torch.float32  # train.py's default
    autocast = torch.autocast(run.device.type, dtype) if dtype != torch.float32 else nullcontext()

    def step():
        with autocast:
            loss = model(x, targets=x)
        loss.backward()
    return {"dtype": str(dtype)[6:], "kernels": kernels_used(step)[1]}


def section_a(run, record):
    """a. correctness: logits, KV cache, chunked prefill, chunked loss, attention kernels"""
    for case in LOGIT_CASES:
        name = f"logits {case[0]} kv_heads={case[1]} {'tied' if case[2] else 'untied'}"
        run.attempt(record, name, lambda: check_logits(run, case), need=2)
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype)[6:]
        run.attempt(record, f"kv cache at PoSE positions {name}", lambda: check_cache(run, dtype))
        run.attempt(record, f"chunked prefill {name}", lambda: check_prefill(run, dtype))
    run.attempt(record, "chunked loss fp32", lambda: check_loss(run, False))
    run.attempt(record, "chunked loss bf16 autocast", lambda: check_loss(run, True))
    run.attempt(record, "training step kernels", lambda: check_training_kernels(run))


# ---- b: train.py ---------------------------------------------------------------------------------

KILL_IN_STEP = """import os, signal, sys
sys.path.insert(0, {root!r})
import train
draw = train.draw_batch
def draw_or_die(docs, cfg, step):  # the job dies mid-run, as under a scheduler's kill
    if step == {step}:
        os.kill(os.getpid(), signal.SIGKILL)
    return draw(docs, cfg, step)
train.draw_batch = draw_or_die
train.main(sys.argv[1:])
"""


def write_documents(directory, n_docs, words):
    """Generated text (no network): n_docs documents of `words` words each."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(n_docs):
        (directory / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(words)))
    return directory


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_train(run, argv, out, *, rank_of_one=False, kill_at=None):
    """train.py in a fresh process -> {seconds, returncode, last log line, output tails}.
    rank_of_one: with the environment `torchrun --standalone --nproc_per_node 1` gives its worker,
    set here so that the run stays one process (torchrun puts its worker in a session of its own,
    which a timeout could not kill with it)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": "1"} if run.dry else {})}
    if rank_of_one:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if kill_at is not None:
        command = [sys.executable, "-c", KILL_IN_STEP.format(root=str(ROOT), step=kill_at)]
    else:
        command = [sys.executable, "train.py"]
    start = time.monotonic()
    timeout = max(10.0, min(run.sizes["b"]["timeout"], run.left()))
    process = subprocess.Popen(command + argv + ["--out", str(out)], cwd=ROOT, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)  # a group of its own, killed whole below
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # compile workers too: nothing left on the GPU
        process.communicate()
        raise
    log = out / "log.jsonl"
    log = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return {"seconds": round(time.monotonic() - start, 1), "returncode": process.returncode,
            "last_step": log[-1] if log else None,
            "stdout": stdout[-1500:], "stderr": stderr[-1500:]}


def compare_runs(a, b):
    """Two train.py outputs: the loss of every step and the final weights, max differences."""
    from safetensors.torch import load_file

    losses = [[json.loads(line)["loss"] for line in (d / "log.jsonl").read_text().splitlines()]
              for d in (a, b)]
    wa, wb = (load_file(d / "final" / "model.safetensors") for d in (a, b))
    same_length = len(losses[0]) == len(losses[1])
    return {"steps": [len(losses[0]), len(losses[1])],
            "loss_max_abs_diff": max(abs(x - y) for x, y in zip(*losses)) if same_length
            else math.inf,
            "weights_max_abs_diff": max(max_diff(wa[k], wb[k]) for k in wa),
            "bitwise": losses[0] == losses[1] and all(torch.equal(wa[k], wb[k]) for k in wa)}


def section_b(run, record):
    """b. train.py: bf16 --compile --checkpointing, SIGKILL and --resume, FSDP2 at world size 1"""
    s = run.sizes["b"]
    work = run.tmp / "train"
    data = write_documents(work / "data", 16, 3 * s["train_len"])
    init = json.dumps({**s["init"], "max_seq_len": s["train_len"]})
    common = ["--init", init, "--tokenizer", str(TOKENIZER), "--data", str(data),
              "--train_len", str(s["train_len"]), "--target_len", str(8 * s["train_len"]),
              "--batch_size", str(s["batch_size"]),
              "--micro_batch_size", str(s["micro_batch_size"]),
              "--lr", "1e-3", "--warmup", "2", "--save_every", str(s["save_every"])]
    fast = common + ["--steps", str(s["steps"]), "--dtype", "bfloat16", "--checkpointing"] + \
        ["--compile"] * s["compile"]
    name = f"uninterrupted (bf16,{' --compile,' * s['compile']} --checkpointing)"
    whole = run.attempt(record, name, lambda: run_train(run, fast, work / "whole"), need=20)
    cut = run.attempt(record, f"SIGKILL in step {s['kill_at']}",
                      lambda: run_train(run, fast, work / "cut", kill_at=s["kill_at"]), need=20)
    if cut and "returncode" in cut:
        checkpoint = work / "cut" / "checkpoint.pt"
        saved = torch.load(checkpoint, weights_only=True)["step"] if checkpoint.exists() else None
        cut.update(killed=cut["returncode"] == -9, checkpoint_step=saved)
    resumed = run.attempt(record, "--resume",
                          lambda: run_train(run, fast + ["--resume"], work / "cut"), need=20)
    if whole and resumed and whole.get("returncode") == 0 == resumed.get("returncode"):
        def resume_check():
            result = compare_runs(work / "whole", work / "cut")
            # bitwise on the CPU; on a GPU some kernels (atomics in backward) are not deterministic
            result["ok"] = bool(cut.get("killed")) and result["steps"] == [s["steps"]] * 2 and \
                result["loss_max_abs_diff"] <= 1e-3 and result["weights_max_abs_diff"] <= 1e-3
            return result
        run.attempt(record, "resumed equals uninterrupted", resume_check)
    plain = common + ["--steps", str(s["fsdp_steps"]), "--dtype", "float32", "--checkpointing"]
    one = run.attempt(record, "plain path (fp32)",
                      lambda: run_train(run, plain, work / "plain"), need=10)
    fsdp = run.attempt(record, "FSDP2 at world size 1 (--fsdp, rank 0 of 1, fp32)",
                       lambda: run_train(run, plain + ["--fsdp"], work / "fsdp", rank_of_one=True),
                       need=10)
    if one and fsdp and one.get("returncode") == 0 == fsdp.get("returncode"):
        def fsdp_check():
            result = compare_runs(work / "plain", work / "fsdp")
            result["fsdp_in_log"] = "(FSDP2)" in fsdp["stdout"]
            result["ok"] = result["fsdp_in_log"] and result["loss_max_abs_diff"] <= 1e-5 and \
                result["weights_max_abs_diff"] <= 1e-5
            return result
        run.attempt(record, "FSDP2 equals plain", fsdp_check)
    for value in record.values():  # a run that failed (and was not meant to die) fails its check
        if isinstance(value, dict) and value.get("returncode") not in (None, 0) and \
                not value.get("killed"):
            value["ok"] = False


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
            {weights.to_hf_name(k): v for k, v in state.items()}, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        if checkpointing:
            model.gradient_checkpointing_enable()

        def loss_of(x, p, y):
            return model(input_ids=x, position_ids=p, attention_mask=torch.ones_like(x), labels=y,
                         shift_labels=y, use_cache=False).loss
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
    examples = [pose.make_example(method, len(doc), train_len, target_len, generator=g)
                for _ in range(n_examples)]
    token_index = torch.stack([t for t, _ in examples])
    tokens = doc[token_index]
    targets = pose.next_token_targets(tokens, token_index)
    return tokens, torch.stack([p for _, p in examples]), targets


def section_c(run, record):
    """c. throughput at Lc = 2048: ours eager and compiled against transformers (sdpa)"""
    s, device = run.sizes["c"], run.device
    shape = s["model"]
    flops_per_token = ModelArgs(**{"max_seq_len": 2048, **shape}).flops_per_token(s["train_len"])
    state = random_model(shape, device, torch.float32).state_dict()
    state = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}  # one copy, off the GPU
    free()
    batch = batch_for("pose", s["batch_size"], s["train_len"], 8 * s["train_len"],
                      shape["vocab_size"])
    tokens = batch[0].numel()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = train.peak_flops(SimpleNamespace(peak_tflops=None), device, dtype)
    record.update(parameters=sum(v.numel() for v in state.values()), tokens_per_step=tokens,
                  dtype=str(dtype)[6:], peak_tflops=peak / 1e12 if peak else None,
                  flops_per_token=flops_per_token, checkpointing=False)

    def measure(impl):
        start = time.perf_counter()
        step = make_step(impl, shape, state, device)
        for _ in range(s["warmup"]):  # compilation, cuBLAS's choices, AdamW's state
            step(batch)
        sync(device)
        warm = time.perf_counter() - start
        result = timed(step, batch, device, s["steps"])
        median = sorted(result["seconds"])[len(result["seconds"]) // 2]
        return {"warm_up_s": warm, "best_s": min(result["seconds"]), "median_s": median,
                "tokens_per_s": tokens / median,
                "mfu": tokens / median * flops_per_token / peak if peak else None,
                "peak_gib": result["peak_gib"], "loss_after_warm_up": result["loss"],
                "all_s": result["seconds"]}

    for impl in ("ours", "ours+compile", "transformers"):
        run.attempt(record, impl, lambda: measure(impl), need=10)
    tf = record.get("transformers", {})
    for impl in ("ours", "ours+compile"):
        if "tokens_per_s" in record.get(impl, {}) and "tokens_per_s" in tf:
            record[impl]["vs_transformers"] = record[impl]["tokens_per_s"] / tf["tokens_per_s"]
    best = record.get("ours+compile", {})
    record["goal"] = {"compiled_mfu_45%": (best.get("mfu") or 0) >= 0.45,
                      "compiled_1.2x_transformers": best.get("vs_transformers", 0) >= 1.2,
                      "note": "goals of the 1.1B on a GPU; meaningless in the dry mode"}


def section_d(run, record):
    """d. Figure 3: a training step, PoSE (Lc 2048) against Full-length, Lt 2k ... 128k"""
    s, device = run.sizes["d"], run.device
    shape = s["model"]
    state = random_model(shape, device, torch.float32).state_dict()
    step = make_step("ours", shape, state, device, checkpointing=True)  # train.py's GPU default
    del state
    step(batch_for("pose", 1, 64, 128, shape["vocab_size"]))  # AdamW's state, before any timing
    record["note"] = ("one model for every Lt (its RoPE scaling changes no cost); activation "
                      "checkpointing; one example per step; time: the best of the steps (PoSE 3, "
                      "Full-length 1); peak: the allocator's (weights, AdamW state, activations)")
    last = {}
    for method in ("pose", "full"):
        for target_len in s["lengths"]:
            tokens = s["train_len"] if method == "pose" else target_len
            need = 4.5 * last.get(method, 0) if method == "full" else 1  # ~4x per doubling
            batch = batch_for(method, 1, min(s["train_len"], target_len), target_len,
                              shape["vocab_size"])
            result = run.attempt(record, f"{method} Lt={target_len}", lambda: timed(
                step, batch, device, s["steps"][method]) | {"tokens": tokens}, need=need)
            if result is None and method == "full":
                break  # out of memory or of time: longer ones would be too
            if result is not None:
                last[method] = min(result["seconds"])
    pose_runs = [v for k, v in record.items() if k.startswith("pose Lt=") and "seconds" in v]
    if len(pose_runs) > 1:
        times, mems = [min(r["seconds"]) for r in pose_runs], [r["peak_gib"] for r in pose_runs]
        record["pose_spread"] = {"time": max(times) / min(times) - 1,
                                 "memory": max(mems) / min(mems) - 1}
        record["goal"] = {"pose_flat_within_10%": max(record["pose_spread"].values()) <= 0.10}


# ---- e: evaluation at length ---------------------------------------------------------------------

def section_e(run, record):
    """e. evaluation at length: passkey and perplexity at 32k; passkey memory at 64k and 128k"""
    from machinery.tokenizer import load_tokenizer

    s, device = run.sizes["e"], run.device
    dtype = eval_dtype(device)
    tokenizer = load_tokenizer(TOKENIZER)
    model = random_model(s["model"], device, dtype).eval()
    assert model.theta.dtype == torch.float64  # RoPE angles are never built in bf16
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    record.update(dtype=str(dtype)[6:], parameters=sum(p.numel() for p in model.parameters()),
                  weights_gib=weights / 2**30, prefill_chunk=s["prefill_chunk"])

    def passkey(length, chunk):
        trial = eval_passkey.make_trial(tokenizer, length, 0)
        reset_peak(device)
        start = time.perf_counter()
        result = eval_passkey.run_trial(model, tokenizer, trial, device, prefill_chunk=chunk)
        sync(device)
        return {"seconds": time.perf_counter() - start, "peak_gib": peak_gib(device),
                "prompt_tokens": result["prompt_tokens"], "answer": result["answer"]}

    def perplexity_window(length):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, tokenizer.n_vocab, (length,), generator=g).to(device)
        reset_peak(device)
        start = time.perf_counter()
        nll, scored, windows = eval_ppl.document_nll(model, ids, length, min(1024, length // 2))
        sync(device)
        return {"seconds": time.perf_counter() - start, "peak_gib": peak_gib(device),
                "windows": windows, "scored_tokens": scored, "ppl": math.exp(nll / scored)}

    length = s["length"]
    run.attempt(record, f"passkey trial {length}", lambda: passkey(length, s["prefill_chunk"]),
                need=5)
    run.attempt(record, f"perplexity window {length}", lambda: perplexity_window(length), need=5)
    first = record.get(f"passkey trial {length}", {}).get("seconds", 1)
    last = {"in pieces": first, "at once": first}
    for length in s["memory_lengths"]:  # a doubled length costs up to 4x (attention is quadratic)
        for label, chunk in (("in pieces", s["prefill_chunk"]), ("at once", None)):
            result = run.attempt(record, f"passkey {length} prefill {label}",
                                 lambda: passkey(length, chunk), need=2 * last[label])
            ran = result is not None and "seconds" in result
            last[label] = result["seconds"] if ran else 4 * last[label]


# ---- the summary ---------------------------------------------------------------------------------

def checks(results):
    """[(section, name, ok)] of every check."""
    return [(name, key, value["ok"]) for name, section in results["sections"].items()
            for key, value in section.items() if isinstance(value, dict) and "ok" in value]


def failures(results):
    errors = [f"{name}: {key}" for name, section in results["sections"].items()
              for key, value in section.items()
              if key == "error" or isinstance(value, dict) and "error" in value]
    return errors + [f"{name}: {key}" for name, key, ok in checks(results) if not ok]


def fmt(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and value and isinstance(value[0], float):
        return "[" + ", ".join(f"{v:.4g}" for v in value) + "]"
    return str(value)


def summary(results):
    env = results["environment"]
    lines = [f"gpu_check ({results['mode']}), {env.get('gpu', 'CPU')}, torch {env['torch']}, "
             f"transformers {env['transformers']}, flash_attn {env['flash_attn']}, "
             f"eval dtype {env['eval_dtype']}, {env['time']}"]
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


def main(argv=None):
    head, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=head, epilog=rest,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for gpu_check.json and summary.txt")
    p.add_argument("--dry", action="store_true",
                   help="CPU, tiny sizes: every step of the GPU run, to catch rot (a few minutes)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole run (default: 450; dry: 3000, never cut short)")
    p.add_argument("--sections", default="abcde", help="which sections to run, e.g. ab")
    a = p.parse_args(argv)
    if not a.dry and not torch.cuda.is_available():
        sys.exit("error: no CUDA device here; run with --dry for the CPU rehearsal.")
    if unknown := set(a.sections) - set("abcde"):
        sys.exit(f"error: --sections takes letters of abcde, not {''.join(sorted(unknown))}.")
    if a.dry:  # tiny matrices: more threads only wait
        torch.set_num_threads(1)
    run = Run(a.out, a.dry, a.budget or (3000 if a.dry else 450))
    functions = {"a": section_a, "b": section_b, "c": section_c, "d": section_d, "e": section_e}
    try:
        for name in a.sections:
            print(f"[{name}] {functions[name].__doc__.strip()}", flush=True)
            run.section(name, functions[name])
            print(f"[{name}] done in {run.results['sections'][name]['seconds']} s", flush=True)
    finally:
        shutil.rmtree(run.tmp, ignore_errors=True)
        run.save()
    print(summary(run.results))
    print(f"wrote {run.out / 'gpu_check.json'} and {run.out / 'summary.txt'}")
    return 1 if failures(run.results) else 0


if __name__ == "__main__":
    sys.exit(main())
