"""RoPE and the scalings that extend its context (the paper's section 3.1), as pure functions;
`python demo/wavelengths.py --scaling yarn:16` prints what a scaling does to each channel pair.

RoPE turns channel pair j at position m by the angle m·θ_j, θ_j = base^(−2j/d): a query at m and a
key at n interact through (m − n)·θ_j only. PoSE (section 3.2) feeds positions up to Lt − 1 to a
model trained on < Lo; a scaling, None or a dict with Hugging Face's keys (so a config.json written
by machinery/weights.py reads the same in transformers), makes them look familiar (s = Lt / Lo):

    linear (PI)    θ_j / s                                   every position squeezed by s
    ntk            base · s^(d/(d−2))                         the paper's static "NTK"
    dynamic        base · ((s·L/Lo) − (s−1))^(d/(d−2))        inference only, L = current length
    yarn           per-channel blend of θ_j/s and θ_j, cos/sin × (0.1·ln s + 1)   (YaRN paper)
    llama3         Llama 3.1's blend by wavelength (Meta's use_scaled_rope)
    longrope       θ_j / λ_j, λ_j per channel searched by longrope.py (LongRoPE, Ding et al. 2024)

LongRoPE as transformers (Phi-3) has it: λ = long_factor once the largest position id + 1 passes
Lo, else short_factor; cos, sin × attention_factor or sqrt(1 + ln s / ln Lo). Under PoSE an example
past Lo trains the long factors, one within it the short (Lc = Lo/4, Lt = 2·Lo: 43% of examples);
per sequence (per_length; transformers takes a batch's largest), so micro batches change nothing.
"""
import math

import torch

from errors import UserError

SCALINGS = ("linear", "ntk", "dynamic", "yarn", "llama3", "longrope")  # eval_*.py --rope_scaling
TRAINABLE = tuple(s for s in SCALINGS if s != "dynamic")  # dynamic rescales per length: inference
BY_LENGTH = ("dynamic", "longrope")  # θ depends on the current length (model.py recomputes it)
LO = "original_max_position_embeddings"
REQUIRED = {"linear": ("factor",), "ntk": ("factor",), "dynamic": ("factor", LO),
            "yarn": ("factor", LO), "llama3": ("factor", LO, "low_freq_factor", "high_freq_factor"),
            "longrope": ("factor", LO, "short_factor", "long_factor")}


def inv_freq(head_dim, base, scaling=None, *, seq_len=None):
    """-> (θ of shape (head_dim/2,) in float64, attention_factor that multiplies cos and sin).
    `seq_len`, read by "dynamic" and "longrope" only, is the current length L: under PoSE, the
    largest position id + 1 (what the rotation sees, as in transformers), not the token count."""
    if head_dim % 2:
        raise UserError(f"RoPE needs an even head dimension, got {head_dim}.")
    scaling, rope_type, d = dict(scaling or {}), kind(scaling), head_dim
    if rope_type not in ("default", *SCALINGS):
        raise UserError(f"Unknown rope_type {rope_type!r}; expected one of default, "
                        f"{', '.join(SCALINGS)}.")
    if missing := [key for key in REQUIRED.get(rope_type, ()) if scaling.get(key) is None]:
        raise UserError(f"rope_type {rope_type!r} needs {', '.join(missing)} in its scaling dict, "
                        f"got {scaling}.")
    exponent = torch.arange(0, d, 2, dtype=torch.float64) / d  # 2j/d
    theta = base ** -exponent
    if rope_type == "default":
        return theta, 1.0
    factor, original = float(scaling["factor"]), scaling.get(LO)
    if rope_type == "linear":  # PI: m → m/s is the same as θ_j → θ_j/s
        return theta / factor, 1.0
    if rope_type == "ntk":  # static NTK-aware: the lowest frequency is interpolated by exactly s
        return (base * factor ** (d / (d - 2))) ** -exponent, 1.0
    if rope_type == "dynamic":  # NTK recomputed for the current length; no change up to Lo
        length = max(seq_len or original, original)
        dynamic_base = base * ((factor * length / original) - (factor - 1)) ** (d / (d - 2))
        return dynamic_base ** -exponent, 1.0
    if rope_type == "yarn":
        return _yarn(theta, d, base, factor, original, scaling)
    if rope_type == "longrope":
        return _longrope(theta, factor, original, scaling, seq_len)
    # llama3: θ_j/s for wavelengths over Lo/low_freq_factor, θ_j under Lo/high_freq_factor, a blend
    low_freq_factor, high_freq_factor = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / theta
    smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * theta / factor + smooth * theta
    out = torch.where(wavelen > original / low_freq_factor, theta / factor, theta)
    medium = (wavelen >= original / high_freq_factor) & (wavelen <= original / low_freq_factor)
    return torch.where(medium, blended, out), 1.0


def _yarn(theta, d, base, factor, original, scaling):
    """YaRN (Peng et al. 2023, Eqs. 18-20) with Hugging Face's conventions."""
    # the channels that turn beta_fast and beta_slow times over Lo tokens bound the ramp
    low, high = (d * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))
                 for rotations in (scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1))
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # avoid 0/0 in the ramp
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # fast channels (j < low) keep θ_j, slow ones (j > high) get θ_j / s
    blended = (theta / factor) * (1 - extrapolate) + theta * extrapolate

    def mscale(scale, m=1.0):  # sqrt(1/t) = 0.1·ln(s) + 1, DeepSeek's m = mscale(_all_dim)
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    attention = scaling.get("attention_factor")
    if attention is None and scaling.get("mscale") and scaling.get("mscale_all_dim"):
        attention = mscale(factor, scaling["mscale"]) / mscale(factor, scaling["mscale_all_dim"])
    return blended, float(mscale(factor) if attention is None else attention)


def _longrope(theta, factor, original, scaling, seq_len):
    """LongRoPE (Ding et al. 2024, section 3): θ_j / λ_j, λ chosen by the current length."""
    for key, values in ((k, scaling[k]) for k in ("short_factor", "long_factor")):
        if not (isinstance(values, (list, tuple)) and len(values) == len(theta)
                and all(isinstance(v, (int, float)) and v > 0 for v in values)):
            raise UserError(f"longrope's {key} must be {len(theta)} positive numbers (head_dim/2).")
    factors = scaling["long_factor"] if seq_len and seq_len > original else scaling["short_factor"]
    default = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    attention = default if scaling.get("attention_factor") is None else scaling["attention_factor"]
    return theta / torch.tensor(factors, dtype=torch.float64), float(attention)


def per_length(d, base, scaling, lengths):
    """θ of each sequence for its current length L (B,) -> (B, 1, head_dim/2), for cos_sin."""
    return torch.stack([inv_freq(d, base, scaling, seq_len=int(n))[0] for n in lengths])[:, None]


def cos_sin(position_ids, theta, attention_factor=1.0, dtype=torch.float32):
    """Position ids (B, T), any integers (PoSE jumps included), and θ (head_dim/2,) or one per
    sequence (B, 1, head_dim/2) -> cos, sin (B, T, head_dim/2). Angles m·θ_j are formed in
    float64 (float32 on MPS, which has none), then cast: a position of 100k keeps its last digits;
    the table has the batch's size, not the largest position's."""
    wide = torch.float32 if position_ids.device.type == "mps" else torch.float64
    angles = position_ids.to(wide)[..., None] * theta.to(position_ids.device, wide)
    return (angles.cos() * attention_factor).to(dtype), (angles.sin() * attention_factor).to(dtype)


def apply_rope(x, cos, sin):
    """Rotate x (B, T, n_heads, head_dim) in Hugging Face's half layout: j pairs with j + d/2."""
    x1, x2 = x.chunk(2, dim=-1)
    # broadcast over heads; in x's dtype, so autocast's bf16 q/k stay bf16 (flash-attn eligible)
    cos, sin = cos[:, :, None, :].to(x.dtype), sin[:, :, None, :].to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# A checkpoint's own scaling (Llama 3.1: llama3 ×8 from Lo = 8192), its window, and beyond it.
def kind(scaling):
    """The rope_type of a scaling dict (also Hugging Face's legacy key "type"); None: "default"."""
    return (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))


def llama31_scaling():
    """What Meta's `use_scaled_rope: true` means (Llama 3.1 reference code)."""
    return {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            LO: 8192}


def window(scaling, max_position_embeddings):
    """The context a checkpoint is meant for: max_position_embeddings, or factor × Lo where its
    scaling implies more (some configs keep max_position_embeddings = Lo)."""
    stretched = 0 if kind(scaling) == "default" else round(scaling["factor"] * scaling[LO])
    return max(max_position_embeddings, stretched)


def extend(scaling, current, target_len, rope_type=None):
    """The scaling that stretches a model with RoPE `scaling` and window `current` to Lt: plain
    RoPE gets `rope_type` (linear when None), s = Lt / current; a scaled one keeps every key but
    its factor, multiplied by Lt / current, so channels it trained unscaled (yarn's, llama3's
    fast ones) stay so, in a config transformers loads."""
    have = kind(scaling)
    if target_len <= current:
        raise UserError(f"the target length {target_len} is within the checkpoint's window of "
                        f"{current} tokens (RoPE {have}): nothing to extend; ask for more than "
                        f"{current}.")
    if "longrope" in (have, rope_type):  # λ_j fit one Lo → Lt: a factor cannot rescale them
        raise UserError(f"longrope's factors are searched for one Lo → Lt (RoPE now {have} at "
                        f"{current}): run longrope.py for {target_len} and pass its JSON file.")
    if have == "default":
        new = {"rope_type": rope_type or "linear", "factor": target_len / current, LO: current}
        if new["rope_type"] == "llama3":  # Llama 3.1's blend (Meta's use_scaled_rope)
            new.update(low_freq_factor=1.0, high_freq_factor=4.0)
        return new
    factor, original = scaling["factor"], scaling[LO]
    already = f"the checkpoint's RoPE is already {have} x{factor:g} from {original}"
    if have not in ("linear", "yarn", "llama3", "dynamic"):
        raise UserError(f"{already}, which has no larger factor to extend it by; start from a "
                        "checkpoint with plain, linear, yarn or llama3 RoPE.")
    if rope_type not in (None, have):
        raise UserError(f"{already}; it is extended as {have} with a larger factor, so ask for "
                        f"{have} (or leave the scaling out), not {rope_type}.")
    # exactly Lt / Lo when the window is factor · Lo (transformers' yarn warns otherwise)
    new = target_len / original if current == factor * original else factor * target_len / current
    return {**{k: v for k, v in scaling.items() if k != "type"}, "rope_type": have, "factor": new}
