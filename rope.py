"""RoPE frequencies and their context-extension scalings (the paper's section 3.1), as pure
functions.

    python rope.py --head_dim 128 --base 10000 \
        --scaling '{"rope_type": "yarn", "factor": 16, "original_max_position_embeddings": 2048}'

RoPE rotates each pair of channels j of a query at position m by the angle m·θ_j,
θ_j = base^(−2j/d), so a query at m and a key at n interact through (m − n)·θ_j only. PoSE
(section 3.2) feeds positions up to Lt − 1 while the model was trained on < Lo; a scaling makes
those positions look familiar:

    linear (PI)    θ_j / s                                   every position squeezed by s = Lt / Lo
    ntk            base · s^(d/(d−2))                         the paper's static "NTK"
    dynamic        base · ((s·L/Lo) − (s−1))^(d/(d−2))        inference only, L = current length
    yarn           per-channel blend of θ_j/s and θ_j, cos/sin × (0.1·ln s + 1)
    llama3         Llama 3.1's blend by wavelength (use_scaled_rope)

`scaling` is None or a dict with Hugging Face's keys, so a config.json written by model.py gives
the same numbers in transformers. Everything is computed in float64; the caller casts the final
cos/sin.

A checkpoint may already carry a scaling (Llama 3.1: llama3 ×8 from Lo = 8192, window 131072).
Its window is what it was trained for; `extend` stretches that window on top of the scaling it has.
"""
import math

import torch

# The scalings by name: eval_*.py --rope_scaling TYPE:FACTOR, train.py --scaling (TRAINABLE).
SCALINGS = ("linear", "ntk", "dynamic", "yarn", "llama3")
TRAINABLE = tuple(s for s in SCALINGS if s != "dynamic")  # dynamic rescales per length: inference
ROPE_TYPES = ("default", *SCALINGS)
_REQUIRED = {"linear": ("factor",), "ntk": ("factor",),
             "dynamic": ("factor", "original_max_position_embeddings"),
             "yarn": ("factor", "original_max_position_embeddings"),
             "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor",
                        "high_freq_factor")}


def kind(scaling):
    """The rope_type of a scaling dict (also Hugging Face's legacy key "type"); None: "default"."""
    return (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))


def window(scaling, max_position_embeddings):
    """The context a checkpoint is meant for: max_position_embeddings, or factor × Lo where its
    scaling implies more (some configs keep max_position_embeddings = Lo)."""
    if kind(scaling) == "default":
        return max_position_embeddings
    stretched = round(scaling["factor"] * scaling["original_max_position_embeddings"])
    return max(max_position_embeddings, stretched)


def extend(scaling, current, target_len, rope_type=None):
    """The scaling that stretches a model with RoPE `scaling` and window `current` to Lt.

    Plain RoPE: `rope_type` (linear when None) with s = Lt / Lo, Lo = current. A checkpoint that
    already carries a scaling keeps it: the same rope_type, its factor multiplied by Lt / current,
    Lo and every other key unchanged, so the channels it was trained with unscaled (llama3's and
    yarn's fast ones) stay unscaled, in a config transformers loads. Anything else is refused
    with a sentence that says what would work."""
    have = kind(scaling)
    if target_len <= current:
        raise ValueError(f"the target length {target_len} is within the checkpoint's window of "
                         f"{current} tokens (RoPE {have}): nothing to extend; ask for more than "
                         f"{current}.")
    if have == "default":
        new = {"rope_type": rope_type or "linear", "factor": target_len / current,
               "original_max_position_embeddings": current}
        if new["rope_type"] == "llama3":  # Llama 3.1's blend (Meta's use_scaled_rope)
            new.update(low_freq_factor=1.0, high_freq_factor=4.0)
        return new
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
    already = f"the checkpoint's RoPE is already {have} x{factor:g} from {original}"
    if have not in ("linear", "yarn", "llama3", "dynamic"):
        raise ValueError(f"{already}, which has no larger factor to extend it by; start from a "
                         "checkpoint with plain, linear, yarn or llama3 RoPE.")
    if rope_type not in (None, have):
        raise ValueError(f"{already}; it is extended as {have} with a larger factor, so ask for "
                         f"{have} (or leave the scaling out), not {rope_type}.")
    # Lt / Lo when the window is factor · Lo: exact, so transformers' yarn finds max_position / Lo
    # equal to the factor (it warns otherwise)
    new = target_len / original if current == factor * original else factor * target_len / current
    return {**{k: v for k, v in scaling.items() if k != "type"}, "rope_type": have, "factor": new}


def inv_freq(head_dim, base, scaling=None, *, seq_len=None):
    """-> (θ of shape (head_dim/2,) in float64, attention_factor that multiplies cos and sin).

    `seq_len` is only read by "dynamic": the current length L. Under PoSE the token count and the
    largest position disagree; we use the largest position id + 1 (what the rotation actually
    sees, and what transformers does), so callers pass max(position_ids) + 1.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {head_dim}.")
    scaling = dict(scaling or {})
    rope_type = kind(scaling)
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"Unknown rope_type {rope_type!r}; expected one of "
                         f"{', '.join(ROPE_TYPES)}.")
    missing = [key for key in _REQUIRED.get(rope_type, ()) if scaling.get(key) is None]
    if missing:
        raise ValueError(f"rope_type {rope_type!r} needs {', '.join(missing)} in its scaling dict, "
                         f"got {scaling}.")
    d = head_dim
    exponent = torch.arange(0, d, 2, dtype=torch.float64) / d  # 2j/d
    theta = base ** -exponent
    if rope_type == "default":
        return theta, 1.0
    factor = float(scaling["factor"])
    if rope_type == "linear":  # PI: m → m/s is the same as θ_j → θ_j/s
        return theta / factor, 1.0
    if rope_type == "ntk":  # static NTK-aware: the lowest frequency is interpolated by exactly s
        return (base * factor ** (d / (d - 2))) ** -exponent, 1.0
    original = scaling["original_max_position_embeddings"]
    if rope_type == "dynamic":  # NTK recomputed for the current length; no change up to Lo
        length = max(seq_len or original, original)
        dynamic_base = base * ((factor * length / original) - (factor - 1)) ** (d / (d - 2))
        return dynamic_base ** -exponent, 1.0
    if rope_type == "yarn":
        return _yarn(theta, d, base, factor, original, scaling)
    return _llama3(theta, factor, original, scaling)


def _yarn(theta, d, base, factor, original, scaling):
    """YaRN (Peng et al. 2023, Eqs. 18-20), with Hugging Face's `rope_type: "yarn"` conventions."""
    def correction_dim(rotations):  # the channel that turns `rotations` times over Lo tokens
        return d * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = correction_dim(scaling.get("beta_fast") or 32)
    high = correction_dim(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # avoid 0/0 in the ramp
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # fast channels (j < low) keep θ_j, slow ones (j > high) get θ_j / s
    blended = (theta / factor) * (1 - extrapolate) + theta * extrapolate

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = scaling.get("attention_factor")
    if attention is None:
        if scaling.get("mscale") and scaling.get("mscale_all_dim"):
            attention = (mscale(factor, scaling["mscale"])
                         / mscale(factor, scaling["mscale_all_dim"]))
        else:
            attention = mscale(factor)  # sqrt(1/t) = 0.1·ln(s) + 1
    return blended, float(attention)


def _llama3(theta, factor, original, scaling):
    """Llama 3.1: wavelengths longer than Lo/low_freq_factor are divided by s, shorter than
    Lo/high_freq_factor kept, and a smooth blend in between."""
    low_freq_factor, high_freq_factor = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / theta
    smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * theta / factor + smooth * theta
    out = torch.where(wavelen > original / low_freq_factor, theta / factor, theta)
    medium = (wavelen >= original / high_freq_factor) & (wavelen <= original / low_freq_factor)
    return torch.where(medium, blended, out), 1.0


def cos_sin(position_ids, theta, attention_factor=1.0, dtype=torch.float32):
    """Position ids (B, T), any integers (PoSE jumps included) -> cos, sin of shape
    (B, T, head_dim/2).

    Angles m·θ_j are formed in float64 (float32 on MPS, which has no float64) and only then cast,
    so a position of 100k keeps its last digits; the table has the size of the batch, not of the
    largest position.
    """
    wide = torch.float32 if position_ids.device.type == "mps" else torch.float64
    angles = position_ids.to(wide)[..., None] * theta.to(position_ids.device, wide)
    return (angles.cos() * attention_factor).to(dtype), (angles.sin() * attention_factor).to(dtype)


def apply_rope(x, cos, sin):
    """Rotate x (B, T, n_heads, head_dim) in Hugging Face's half layout: channel j pairs with
    j + d/2."""
    x1, x2 = x.chunk(2, dim=-1)
    # broadcast over heads; in x's dtype, so autocast's bf16 q/k stay bf16 (flash-attn eligible)
    cos, sin = cos[:, :, None, :].to(x.dtype), sin[:, :, None, :].to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def llama31_scaling():
    """What Meta's `use_scaled_rope: true` means (Llama 3.1 reference code)."""
    return {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}


if __name__ == "__main__":
    import argparse
    import json

    p = argparse.ArgumentParser(
        description="Print RoPE wavelengths per channel pair for a scaling.")
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--base", type=float, default=10000.0)
    p.add_argument("--scaling", type=json.loads, default=None,
                   help="JSON dict with Hugging Face's keys")
    args = p.parse_args()
    try:
        plain, _ = inv_freq(args.head_dim, args.base)
        scaled, attention = inv_freq(args.head_dim, args.base, args.scaling)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    print(f"attention factor {attention:.4f}\n  j   wavelength   scaled wavelength   ratio")
    for j in range(len(plain)):
        w0, w1 = 2 * math.pi / plain[j], 2 * math.pi / scaled[j]
        print(f"{j:3d} {w0:12.1f} {w1:19.1f} {w1 / w0:7.3f}")
