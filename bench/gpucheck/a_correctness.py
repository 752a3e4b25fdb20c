"""Section a of bench/gpu_check.py: correctness against transformers and against ourselves."""

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from bench.gpucheck.common import dtype_keyword, max_diff, random_model
from bench.gpucheck.kernels import kernels_used, verdict
from loss import IGNORE, ChunkedCrossEntropy
from machinery.weights import with_scaling
from model import ModelArgs, Transformer


# ---- a: correctness ------------------------------------------------------------------------------

SCALINGS = {
    "none": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "ntk": {"rope_type": "ntk", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
    },
}
LOGIT_CASES = [  # (scaling, n_kv_heads of 4 heads, tied): MHA and GQA, tied and untied
    ("none", 4, False),
    ("none", 2, True),
    ("linear", 2, False),
    ("ntk", 2, True),
    ("dynamic", 1, False),
    ("yarn", 2, True),
    ("llama3", 2, False),
]
SMALL = dict(dim=256, n_layers=2, n_heads=4, hidden_dim=512, vocab_size=512, max_seq_len=256)


def call(run, dtype, T, S):
    """An attention call of the small GQA model (4 heads, 2 KV heads, head_dim 64), as
    kernels.verdict takes it."""
    return run.device, dtype, T, S, SMALL["n_heads"], 2, SMALL["dim"] // SMALL["n_heads"]


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
    """LlamaForCausalLM loaded in `dtype` as users load it (its RoPE buffer stays fp32), with the
    keyword the installed release takes (dtype_keyword)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(directory, **{dtype_keyword(): dtype})
    assert model.dtype == dtype, (model.dtype, dtype)
    return model.eval().to(device)


def check_logits(run, case):
    kind, kv_heads, tied = case
    directory, device = small_hf_dir(run, SCALINGS[kind], kv_heads, tied), run.device
    x = random_tokens((2, 200), 1, device)
    positions = torch.cat([torch.arange(0, 100), torch.arange(900, 1000)]).to(device)  # a skip
    with torch.no_grad():
        reference, theirs_bf16 = (
            transformers_model(directory, dtype, device)(
                x, position_ids=positions.expand(2, -1)
            ).logits.float()
            for dtype in (torch.float32, torch.bfloat16)
        )
        ours = {
            dtype: Transformer.from_pretrained(directory, dtype=dtype, device=device)(x, positions)
            for dtype in (torch.float32, torch.bfloat16)
        }
        on_cpu = Transformer.from_pretrained(directory)(x.cpu(), positions.cpu())
    fp32, scale = max_diff(ours[torch.float32], reference), float(reference.abs().max())
    bf16, bf16_theirs = max_diff(ours[torch.bfloat16], reference), max_diff(theirs_bf16, reference)
    device_vs_cpu = max_diff(ours[torch.float32].cpu(), on_cpu)
    # transformers forms RoPE angles in fp32 (we in fp64): near position 1000 that alone moves the
    # logits by ~1e-4. Our device against our CPU is the tight check.
    ok = (
        fp32 <= 3e-4 * scale
        and device_vs_cpu <= 1e-5 * scale
        and bf16 <= max(1.5 * bf16_theirs, 0.05)
    )
    return {
        "max_abs_logit": scale,
        "fp32_max_abs_diff": fp32,
        "fp32_device_vs_cpu_max_abs_diff": device_vs_cpu,
        "bf16_max_abs_diff_vs_fp32": bf16,
        "transformers_bf16_max_abs_diff_vs_fp32": bf16_theirs,
        "ok": ok,
    }


def check_cache(run, dtype):
    """Logits at PoSE positions through the KV cache in pieces of every shape attend() handles,
    against one forward: a first piece (T == S, causal), single decoded tokens (T == 1) and pieces
    after a cache (T < S, a mask), each piece's attention kernel the expected one. bf16: both
    against the fp32 forward."""
    device = run.device
    model = Transformer.from_pretrained(
        small_hf_dir(run, None, 2, False), dtype=dtype, device=device
    )
    x = random_tokens((1, 120), 2, device)
    positions = torch.cat([torch.arange(0, 50), torch.arange(700, 770)]).to(device)
    pieces = {
        "first piece (T == S)": (0, 40),
        "decode (T == 1)": (40, 41),
        "piece after a cache (T < S)": (41, 60),
        "decode again": (60, 61),
        "last piece": (61, 120),
    }
    cache, logits, kernels = model.make_cache(1, 120), [], {}
    with torch.no_grad():
        whole, seen = kernels_used(lambda: model(x, positions))
        kernels["one forward"] = verdict(seen, [call(run, dtype, 120, 120)])
        for name, (a, b) in pieces.items():
            out, seen = kernels_used(lambda: model(x[:, a:b], positions[a:b], cache=cache))
            kernels[name] = verdict(seen, [call(run, dtype, b - a, b)])
            logits.append(out)
        reference = whole if dtype == torch.float32 else model.float()(x, positions)
    cached, one = max_diff(torch.cat(logits, dim=1), reference), max_diff(whole, reference)
    ok = (
        cached <= 2e-5 * float(reference.abs().max())
        if dtype == torch.float32
        else cached <= max(1.5 * one, 0.05)
    )
    as_expected = all(k["as_expected"] for k in kernels.values())
    return {
        "cache_max_abs_diff": cached,
        "one_forward_max_abs_diff": one,
        "kernels_as_expected": as_expected,
        "kernels": kernels,
        "ok": ok and as_expected,
    }


def check_prefill(run, dtype):
    """Transformer.prefill in pieces against one pass: every layer's cache and the last position's
    logits (bf16: both against the fp32 one pass; the pieces may run another attention kernel),
    and the pieces' attention kernels the expected ones."""
    device = run.device
    model = Transformer.from_pretrained(
        small_hf_dir(run, SCALINGS["linear"], 2, False), dtype=dtype, device=device
    )
    x = random_tokens((1, 300), 3, device)
    caches = [model.make_cache(1, 300) for _ in range(2)]
    whole = model.logits(model.prefill(x, caches[0]))
    pieces, seen = kernels_used(lambda: model.logits(model.prefill(x, caches[1], chunk=64)))
    kernels = verdict(seen, [call(run, dtype, 64, 64), call(run, dtype, 64, 300)])
    cache = max(max(max_diff(a.k, b.k), max_diff(a.v, b.v)) for a, b in zip(*caches))
    result = {
        "cache_max_abs_diff": cache,
        "logits_max_abs_diff": max_diff(pieces, whole),
        "kernels": kernels,
    }
    if dtype == torch.float32:
        scale = float(whole.abs().max())
        ok = result["logits_max_abs_diff"] <= 2e-5 * scale and cache < 1e-4
        return result | {"ok": ok and kernels["as_expected"]}
    model.float()
    reference = model.logits(model.prefill(x, model.make_cache(1, 300)))
    result.update(
        pieces_vs_fp32=max_diff(pieces, reference), one_pass_vs_fp32=max_diff(whole, reference)
    )
    ok = result["pieces_vs_fp32"] <= max(1.5 * result["one_pass_vs_fp32"], 0.05)
    return result | {"ok": ok and kernels["as_expected"]}


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
    grads = max(
        max_diff(dh, dh_ref) / float(dh_ref.abs().max()),
        max_diff(dw, dw_ref) / float(dw_ref.abs().max()),
    )
    tolerance = (1e-3, 1e-2) if autocast_bf16 else (1e-6, 1e-4)
    return {
        "loss": ours,
        "reference": plain,
        "loss_rel_diff": rel,
        "grad_max_rel_diff": grads,
        "ok": rel <= tolerance[0] and grads <= tolerance[1],
    }


def check_training_kernels(run):
    """The attention kernels of a training step, forward and backward, in train.py's dtype: the
    expected ones."""
    model = random_model(dict(SMALL, n_kv_heads=2), run.device, torch.float32).train()
    x = torch.randint(0, SMALL["vocab_size"], (2, 256), device=run.device)
    dtype = torch.bfloat16 if run.device.type == "cuda" else torch.float32  # train.py's default
    autocast = torch.autocast(run.device.type, dtype) if dtype != torch.float32 else nullcontext()

    def step():
        with autocast:
            loss = model(x, targets=x)
        loss.backward()

    kernels = verdict(kernels_used(step)[1], [call(run, dtype, 256, 256)], backward=True)
    return {"dtype": str(dtype)[6:], "kernels": kernels, "ok": kernels["as_expected"]}


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
