"""GPU checks, apart from the CPU suite (tests/conftest.py hides CUDA unless POSE_TEST_CUDA=1):

    POSE_TEST_CUDA=1 python -m pytest tests/test_cuda.py

Skipped on machines without a GPU, which is every machine this was developed on: these are written, not yet run."""
import os

import pytest
import torch

from model import ModelArgs, Transformer, attend

pytestmark = pytest.mark.skipif(
    os.environ.get("POSE_TEST_CUDA") != "1" or not torch.cuda.is_available(),
    reason="needs a CUDA GPU and POSE_TEST_CUDA=1 (the CPU suite hides CUDA so its exact comparisons run on the CPU)")


def test_fp32_gqa_attention_at_16k_never_builds_the_score_matrix():
    """32 query heads over 8 KV heads, 16k tokens, fp32: the T×S scores alone would be 32 GiB; we stay far below."""
    q = torch.randn(1, 16384, 32, 64, device="cuda")
    k, v = (torch.randn(1, 16384, 8, 64, device="cuda") for _ in range(2))
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    y = attend(q, k, v)
    assert y.shape == q.shape
    assert torch.cuda.max_memory_allocated() - before < 2 * 2**30


def test_bf16_and_fp32_on_cuda_agree_with_the_cpu():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, max_seq_len=256))
    x = torch.randint(0, 100, (1, 200))
    with torch.no_grad():
        cpu = model(x)
        gpu = model.to("cuda")(x.cuda()).cpu()
        half = model.to(torch.bfloat16)(x.cuda()).float().cpu()
    torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-4)
    torch.testing.assert_close(half, cpu, rtol=0, atol=0.1)
