"""Which attention kernel ran (torch.profiler) and which one model.attend() should run for that
shape and dtype (model.use_flash_attn, model.sdpa_plan): bench/gpu_check.py fails a check whose
recorded kernel is not the expected one, so a path that falls to SDPA's math kernel is caught."""

import re
from types import SimpleNamespace

import torch

import model as model_py

SDPA = {  # the ops torch.profiler records, forward (BACKWARD: their backward)
    "aten::_scaled_dot_product_flash_attention": "sdpa-flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "sdpa-flash-cpu",
    "aten::_scaled_dot_product_efficient_attention": "sdpa-efficient",
    "aten::_efficient_attention_forward": "sdpa-efficient",  # the lower-right causal bias calls it
    "aten::_scaled_dot_product_cudnn_attention": "sdpa-cudnn",
    "aten::_scaled_dot_product_attention_math": "sdpa-math",
    "aten::_scaled_dot_product_fused_attention_overrideable": "sdpa-overrideable",
}
BACKWARD = {op + "_backward": k for op, k in SDPA.items()} | {
    "aten::_efficient_attention_backward": "sdpa-efficient",  # the backward of the forward op
    "aten::_flash_attention_backward": "sdpa-flash",
}
# the flash-attn package: its ops, or its CUDA kernels (namespace flash::, not PyTorch's own copy
# of them in pytorch_flash::, which \b leaves out)
PACKAGE = re.compile(
    r"flash_attn::_flash_attn_(forward|backward)|\bflash::flash_(fwd|bwd)|FlashAttnFuncBackward"
)


def label(name):
    """A profiler event's name -> its attention kernel's label, or None."""
    if name in SDPA:
        return SDPA[name]
    if name in BACKWARD:
        return "backward: " + BACKWARD[name]
    if match := PACKAGE.search(name):
        return (
            "backward: flash_attn"
            if re.search("bwd|backward", match.group(), re.I)
            else "flash_attn"
        )
    return None


def kernels_used(function):
    """Run function() under the profiler -> (its result, the attention kernels that ran)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        result = function()
        if cuda:
            torch.cuda.synchronize()
    found = {label(e.key) for e in prof.key_averages()} - {None}
    return result, sorted(found)


def expected(device, dtype, T, S, n_heads, n_kv_heads, head_dim):
    """The kernels attend() may run for q (B, T, n_heads, head_dim) over S keys on `device` in
    `dtype` -> a set of labels, any of which is right (never "sdpa-math")."""
    q = SimpleNamespace(
        is_cuda=device.type == "cuda", dtype=dtype, device=device, shape=(1, T, n_heads, head_dim)
    )
    if model_py.use_flash_attn(q):
        return {"flash_attn"}
    if device.type != "cuda":  # the CPU's flash kernel takes masks, GQA and fp32
        return {"sdpa-flash-cpu"}
    _, mask = model_py.sdpa_plan("cuda", dtype, T, S, n_kv_heads != n_heads)
    flash = (
        dtype in (torch.float16, torch.bfloat16)
        and head_dim <= 256
        and head_dim % 8 == 0
        and torch.cuda.get_device_capability(device)[0] >= 8
    )
    if not flash:  # fp32 (or a head flash cannot take): the memory-efficient kernel
        return {"sdpa-efficient"}
    if mask == "lower_right":  # torch.nn.attention.bias calls the flash op itself, never cuDNN
        return {"sdpa-flash"}
    return {"sdpa-flash", "sdpa-cudnn"}  # SDPA puts flash first; a release may prefer cuDNN


def verdict(seen, calls, backward=False):
    """seen: the labels kernels_used() recorded over `calls`, [(device, dtype, T, S, n_heads,
    n_kv_heads, head_dim)] -> {seen, expected, as_expected}: as expected when something was
    recorded, every label is one a call may run (and its backward, when `backward`), and some
    forward label was recorded."""
    allowed = set().union(*(expected(*call) for call in calls))
    if backward:
        allowed |= {"backward: " + k for k in allowed}
    forward = [k for k in seen if not k.startswith("backward: ")]
    ok = bool(forward) and set(seen) <= allowed
    if backward:
        ok = ok and len(forward) < len(seen)  # a backward kernel was recorded too
    return {"seen": list(seen), "expected": sorted(allowed), "as_expected": ok}
