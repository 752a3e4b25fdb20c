"""GPU checks, apart from the CPU suite (tests/conftest.py hides CUDA unless POSE_TEST_CUDA=1):

    POSE_TEST_CUDA=1 python -m pytest tests/test_cuda.py

Skipped on machines without a GPU, which is every machine this was developed on: written, not yet
run."""

import os

import pytest
import torch

from model import ModelArgs, Transformer, attend

pytestmark = pytest.mark.skipif(
    os.environ.get("POSE_TEST_CUDA") != "1" or not torch.cuda.is_available(),
    reason="needs a CUDA GPU and POSE_TEST_CUDA=1 (the CPU suite hides CUDA so its exact "
    "comparisons run on the CPU)",
)


def kernels_of(fn):
    """The CUDA kernel names one call launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return " ".join(e.key.lower() for e in prof.key_averages())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# one pass, the last prefill piece after a cache, decoding
@pytest.mark.parametrize("T", [16384, 4096, 1])
def test_gqa_attention_at_16k_stays_linear_in_memory_and_off_the_math_kernel(dtype, T):
    """32 query heads over 8 KV heads (Llama-3-8B's shape), S = 16k keys: the fp32 T×S scores of the
    math kernel would be 8-32 GiB; attend() stays far below and never launches it."""
    S, hd = 16384, 128
    q = torch.randn(1, T, 32, hd, device="cuda", dtype=dtype)
    k, v = (torch.randn(1, S, 8, hd, device="cuda", dtype=dtype) for _ in range(2))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    y = attend(q, k, v)
    assert y.shape == q.shape
    # copies of K and V are 0.5 GiB in fp32
    assert torch.cuda.max_memory_allocated() - before < 2 * 2**30
    names = kernels_of(lambda: attend(q, k, v))
    assert any(key in names for key in ("flash", "fmha", "efficient", "cudnn", "cutlass")), names
    assert "softmax" not in names, names  # the math kernel's explicit softmax over T×S scores


def test_bf16_and_fp32_on_cuda_agree_with_the_cpu():
    """fp32 on CUDA equals the CPU to 1e-4; bf16 is within what bf16 rounding of the activations
    allows, judged against the fp32 logits' own spread (the old check's atol 0.1 passed a wrong
    attention)."""
    torch.manual_seed(0)
    model = Transformer(
        ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, max_seq_len=256)
    )
    x = torch.randint(0, 100, (1, 200))
    with torch.no_grad():
        cpu = model(x)
        gpu = model.to("cuda")(x.cuda()).cpu()
        half = model.to(torch.bfloat16)(x.cuda()).float().cpu()
    torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-4)
    error = (half - cpu).abs().max() / cpu.std()
    assert error < 0.05, f"bf16 logits off by {error:.3f} of the logits' spread"
    assert (half.argmax(-1) == cpu.argmax(-1)).float().mean() > 0.95
