"""rope.py against transformers' RoPE functions, and the identities RoPE must satisfy."""

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

import rope

FACTORS = [2, 4, 8, 16, 32, 64]
HEAD_DIMS = [64, 128]


def hf_inv_freq(head_dim, base, scaling, original, seq_len=None):
    config = LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=original,
        rope_parameters={"rope_theta": base, **scaling},
    )
    return ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu", seq_len=seq_len)


def scalings(factor, original):
    return {
        "linear": {"rope_type": "linear", "factor": factor},
        "dynamic": {
            "rope_type": "dynamic",
            "factor": factor,
            "original_max_position_embeddings": original,
        },
        "yarn": {
            "rope_type": "yarn",
            "factor": factor,
            "original_max_position_embeddings": original,
        },
        "yarn_betas": {
            "rope_type": "yarn",
            "factor": factor,
            "original_max_position_embeddings": original,
            "beta_fast": 16,
            "beta_slow": 2,
        },
        "yarn_mscale": {
            "rope_type": "yarn",
            "factor": factor,
            "original_max_position_embeddings": original,
            "mscale": 0.707,
            "mscale_all_dim": 1.0,
        },
        "llama3": {
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": original,
        },
    }


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("factor", FACTORS)
@pytest.mark.parametrize(
    "kind", ["linear", "dynamic", "yarn", "yarn_betas", "yarn_mscale", "llama3"]
)
@pytest.mark.parametrize("base,original", [(10000.0, 2048), (500000.0, 8192), (100000.0, 8192)])
def test_inv_freq_equals_transformers(kind, factor, head_dim, base, original):
    scaling = scalings(factor, original)[kind]
    seq_len = original * 3 if kind == "dynamic" else None  # dynamic only changes past Lo
    ours, ours_attention = rope.inv_freq(head_dim, base, scaling, seq_len=seq_len)
    theirs, their_attention = hf_inv_freq(head_dim, base, scaling, original, seq_len=seq_len)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, theirs.double(), rtol=1e-6, atol=0)
    assert ours_attention == pytest.approx(their_attention, rel=1e-12)


def test_default_is_the_rope_formula():
    theta, attention = rope.inv_freq(8, 10000.0)
    expected = torch.tensor([10000.0 ** (-2 * j / 8) for j in range(4)], dtype=torch.float64)
    torch.testing.assert_close(theta, expected, rtol=1e-15, atol=0)
    assert attention == 1.0


def test_ntk_is_the_papers_static_formula():
    d, base, s = 128, 10000.0, 8.0
    theta, _ = rope.inv_freq(d, base, {"rope_type": "ntk", "factor": s})
    expected, _ = rope.inv_freq(d, base * s ** (d / (d - 2)))
    torch.testing.assert_close(theta, expected, rtol=1e-14, atol=0)
    # the point of the d/(d-2) exponent: the slowest channel is interpolated by exactly s
    plain, _ = rope.inv_freq(d, base)
    assert (plain[-1] / theta[-1]).item() == pytest.approx(s, rel=1e-12)
    assert theta[0].item() == plain[0].item()  # the fastest channel is untouched


def test_dynamic_is_default_within_the_original_context():
    plain, _ = rope.inv_freq(64, 10000.0)
    scaling = {"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 2048}
    for seq_len in (None, 100, 2048):
        torch.testing.assert_close(rope.inv_freq(64, 10000.0, scaling, seq_len=seq_len)[0], plain)


def test_yarn_attention_factor_and_channel_ends():
    d, base, s, original = 64, 10000.0, 16.0, 2048
    theta, attention = rope.inv_freq(
        d, base, {"rope_type": "yarn", "factor": s, "original_max_position_embeddings": original}
    )
    plain, _ = rope.inv_freq(d, base)
    assert attention == pytest.approx(0.1 * math.log(s) + 1)
    assert theta[0] == plain[0]  # high frequencies extrapolate
    assert theta[-1] == pytest.approx(plain[-1].item() / s)  # low frequencies interpolate


def test_llama31_scaling_keeps_short_and_divides_long_wavelengths():
    theta, _ = rope.inv_freq(128, 500000.0, rope.llama31_scaling())
    plain, _ = rope.inv_freq(128, 500000.0)
    wavelen = 2 * math.pi / plain
    short, long = wavelen < 8192 / 4, wavelen > 8192
    torch.testing.assert_close(theta[short], plain[short])
    torch.testing.assert_close(theta[long], plain[long] / 8)


@pytest.mark.parametrize(
    "bad",
    [
        {"rope_type": "bogus", "factor": 2},
        {"rope_type": "yarn", "factor": 2},
        {"rope_type": "linear"},
    ],
)
def test_bad_scaling_is_a_value_error(bad):
    with pytest.raises(ValueError, match="rope_type"):
        rope.inv_freq(64, 10000.0, bad)


def pose_positions():
    return torch.cat([torch.arange(0, 100), torch.arange(5000, 5100)])[None]


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048},
    ],
)
def test_rotation_equals_transformers_at_pose_positions(scaling):
    head_dim, heads, base = 64, 2, 10000.0
    config = LlamaConfig(
        hidden_size=head_dim * heads,
        num_attention_heads=heads,
        head_dim=head_dim,
        max_position_embeddings=2048,
        rope_parameters={"rope_theta": base, **(scaling or {"rope_type": "default"})},
    )
    position_ids = pose_positions()
    q = torch.randn(
        1, heads, position_ids.shape[1], head_dim, generator=torch.Generator().manual_seed(0)
    )
    k = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    hf_cos, hf_sin = LlamaRotaryEmbedding(config)(q, position_ids)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, hf_cos, hf_sin)  # (B, H, T, hd)

    cos, sin = rope.cos_sin(position_ids, *rope.inv_freq(head_dim, base, scaling))
    ours_q = rope.apply_rope(q.transpose(1, 2), cos, sin).transpose(1, 2)
    ours_k = rope.apply_rope(k.transpose(1, 2), cos, sin).transpose(1, 2)
    # transformers forms angles in float32 (error ~ position · 6e-8 rad); ours are float64
    torch.testing.assert_close(ours_q, hf_q, rtol=0, atol=2e-3)
    torch.testing.assert_close(ours_k, hf_k, rtol=0, atol=2e-3)


def test_scores_depend_only_on_relative_position():
    """The property PoSE relies on: q_m·k_n is a function of m − n, so skipped positions teach
    distances."""
    d = 64
    theta, _ = rope.inv_freq(d, 10000.0)
    q, k = torch.randn(2, 1, 1, 1, d, dtype=torch.float64)

    def score(m, n):
        cos, sin = rope.cos_sin(torch.tensor([[m, n]]), theta, dtype=torch.float64)
        rotated = rope.apply_rope(torch.cat([q, k], dim=1)[0], cos, sin)  # (1, 2, 1, d)
        return (rotated[0, 0, 0] @ rotated[0, 1, 0]).item()

    assert score(10, 3) == pytest.approx(score(30007, 30000), abs=1e-9)
    assert score(10, 3) != pytest.approx(score(11, 3), abs=1e-6)


def test_angles_keep_precision_at_large_positions():
    theta, _ = rope.inv_freq(128, 500000.0)
    position = 131071
    cos, _ = rope.cos_sin(torch.tensor([[position]]), theta)
    exact = torch.cos(torch.tensor(position, dtype=torch.float64) * theta).float()
    torch.testing.assert_close(cos[0, 0], exact, rtol=0, atol=1e-6)
