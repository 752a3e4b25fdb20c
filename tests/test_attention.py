"""attend()'s kernel choice: on CUDA no path may reach SDPA's math kernel (fp32 T×S scores per
head), so the plan is checked for every case with the device decision mocked, and the CUDA plan's
arithmetic (copied KV heads, the lower-right causal bias) is run on the CPU against the plain
path."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import model
from model import attend, sdpa_plan

CASES = list(
    itertools.product(
        ("cuda", "cpu", "mps"),
        (torch.float32, torch.bfloat16, torch.float16),
        ((9, 9), (1, 9), (4, 9)),
        (True, False),
    )
)


@pytest.mark.parametrize("device, dtype, shape, gqa", CASES)
def test_the_plan_on_cuda_only_asks_what_the_linear_memory_kernels_take(device, dtype, shape, gqa):
    """Flash takes enable_gqa but neither a mask nor fp32; memory-efficient takes fp32 and masks but
    not enable_gqa (torch <= 2.11): so on CUDA GQA reaches SDPA only as copies when fp32 or masked,
    and a mask is the lower-right causal bias, never a (T, S) tensor."""
    T, S = shape
    copies, mask = sdpa_plan(device, dtype, T, S, gqa)
    after_cache = {"cuda": "lower_right", "cpu": "split"}.get(device, "bool")
    assert mask == ("causal" if T == S else None if T == 1 else after_cache)
    shared_gqa = gqa and not copies
    if device == "cuda":
        assert not (shared_gqa and dtype == torch.float32), (
            "fp32 GQA without copies: the math kernel"
        )
        assert not (shared_gqa and mask is not None and mask != "causal"), (
            "GQA under a mask: the math kernel"
        )
        assert mask != "bool"
    else:
        assert not copies  # the CPU flash kernel takes masks, fp32 and GQA as they are


def test_cuda_runs_sdpa_with_the_math_kernel_excluded(monkeypatch):
    """attend() restricts SDPA to the flash, memory-efficient and cuDNN kernels on CUDA (mocked
    here)."""
    seen = []
    monkeypatch.setattr(
        model, "sdpa_kernel", lambda backends: seen.append(backends) or torch.no_grad()
    )
    q = torch.randn(1, 5, 4, 8)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    monkeypatch.setattr(model, "use_flash_attn", lambda q: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    attend(q, torch.randn(1, 9, 2, 8), torch.randn(1, 9, 2, 8))
    assert seen and torch.nn.attention.SDPBackend.MATH not in seen[0]
    assert set(seen[0]) == {
        torch.nn.attention.SDPBackend.FLASH_ATTENTION,
        torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION,
        torch.nn.attention.SDPBackend.CUDNN_ATTENTION,
    }


@pytest.mark.parametrize("T, S", [(9, 9), (1, 9), (4, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_the_cuda_plan_gives_the_cpu_plans_attention(T, S, dtype, device, monkeypatch):
    """Copied KV heads and the lower-right causal bias (CUDA's plan), or the (T, S) boolean mask
    (another device's), compute what the CPU path computes (and what the reference, a dense causal
    mask aligned bottom-right over repeated KV heads, computes)."""
    torch.manual_seed(0)
    q, k, v = (
        torch.randn(2, T, 4, 8, dtype=dtype),
        torch.randn(2, S, 2, 8, dtype=dtype),
        torch.randn(2, S, 2, 8, dtype=dtype),
    )
    cpu = attend(q, k, v)
    plan = sdpa_plan
    monkeypatch.setattr(model, "sdpa_plan", lambda _, *a: plan(device, *a))
    cuda_plan = attend(q, k, v)
    mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)
    ref = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.repeat_interleave(2, 2).transpose(1, 2),
        v.repeat_interleave(2, 2).transpose(1, 2),
        attn_mask=mask,
    )
    tol = {} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(cuda_plan, cpu, **tol)
    torch.testing.assert_close(cpu, ref.transpose(1, 2), **tol)


def test_flash_attn_only_where_its_limits_hold(monkeypatch):
    """flash-attn needs CUDA half precision, sm80+, head_dim <= 256 and a multiple of 8; elsewhere
    SDPA."""
    monkeypatch.setattr(model, "flash_attn_func", object())
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    assert model.use_flash_attn(torch.zeros(1, 1, 1, 128, dtype=torch.bfloat16))
    assert not model.use_flash_attn(torch.zeros(1, 1, 1, 128))  # fp32
    # not a multiple of 8
    assert not model.use_flash_attn(torch.zeros(1, 1, 1, 96 + 4, dtype=torch.bfloat16))
    assert not model.use_flash_attn(torch.zeros(1, 1, 1, 512, dtype=torch.bfloat16))  # > 256
    capability[0] = (7, 5)  # a T4
    assert not model.use_flash_attn(torch.zeros(1, 1, 1, 128, dtype=torch.bfloat16))


def test_before_sm80_gqa_always_copies_and_bf16_is_one_sentence(monkeypatch):
    """Before sm80 SDPA has no flash kernel: GQA reaches the memory-efficient kernel only as copies,
    and bf16, which no linear-memory kernel takes there, is refused before the run in a sentence."""
    from errors import UserError
    from machinery import ranks

    for dtype in (torch.float32, torch.float16):
        for T, S in ((9, 9), (1, 9), (4, 9)):
            assert sdpa_plan("cuda", dtype, T, S, True, sm80=False)[0]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(UserError, match="Tesla T4 \\(sm75\\) has no bf16 attention kernel"):
        ranks.check_attention_dtype(torch.device("cuda"), torch.bfloat16)
    ranks.check_attention_dtype(torch.device("cuda"), torch.float32)  # fp32 runs
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    ranks.check_attention_dtype(torch.device("cuda"), torch.bfloat16)


def test_q_and_k_reach_attention_in_vs_dtype_under_autocast(monkeypatch):
    """Qwen3's q/k RMSNorm returns fp32 under autocast; attend() must still see one dtype, or CUDA
    would lose flash-attn and copy KV heads as for fp32."""
    from model import ModelArgs, Transformer

    seen = []
    real = model.attend
    monkeypatch.setattr(model, "attend", lambda q, k, v: seen.append((q.dtype, k.dtype, v.dtype))
                        or real(q, k, v))
    net = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=50,
                                hidden_dim=32, qk_norm=True))
    with torch.autocast("cpu", torch.bfloat16):
        net(torch.randint(0, 50, (1, 8)))
    assert seen == [(torch.bfloat16,) * 3]


@pytest.mark.parametrize("T, S", [(2, 9), (5, 9), (8, 9), (64, 200)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_new_tokens_after_a_cache_split_on_the_cpu_equal_one_masked_pass(T, S, dtype, kv_heads):
    """On the CPU, T new queries after S − T cached keys attend in two unmasked-or-causal pieces
    merged by their log-sum-exps (model.attend_split): equal to one pass under the bottom-right
    causal mask over repeated KV heads, for a batch and for the cache's non-contiguous views."""
    torch.manual_seed(0)
    q = torch.randn(2, T, 4, 8, dtype=dtype)
    cache = torch.randn(2, 2, S + 3, kv_heads, 8, dtype=dtype)  # a cache longer than its length
    k, v = cache[0, :, :S], cache[1, :, :S]
    mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)
    ref = F.scaled_dot_product_attention(
        q.transpose(1, 2).float(),
        k.repeat_interleave(4 // kv_heads, 2).transpose(1, 2).float(),
        v.repeat_interleave(4 // kv_heads, 2).transpose(1, 2).float(),
        attn_mask=mask,
    ).transpose(1, 2)
    out = attend(q, k, v)
    assert out.dtype == dtype
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(out.float(), ref, **tol)


def test_the_cpu_never_gives_sdpa_a_mask_after_a_cache(monkeypatch):
    """A (T, S) mask makes the CPU kernel compute the whole rectangle and read the mask: attend()
    must reach the split instead, for every T between 1 and S."""
    masks = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(
        F,
        "scaled_dot_product_attention",
        lambda *a, attn_mask=None, **kw: masks.append(attn_mask) or sdpa(*a, **kw),
    )
    split = []
    real_split = model.attend_split
    monkeypatch.setattr(model, "attend_split", lambda *a: split.append(1) or real_split(*a))
    for T in range(1, 10):
        attend(torch.randn(1, T, 4, 8), torch.randn(1, 9, 2, 8), torch.randn(1, 9, 2, 8))
    assert masks and all(m is None for m in masks)
    assert len(split) == 7  # T = 2..8; T = 1 (no mask needed) and T = S (is_causal) are SDPA's
