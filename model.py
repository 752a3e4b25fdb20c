"""A LLaMA Transformer that takes explicit position ids (what PoSE needs), in one file.

    python demo/generate.py --model smollm2 --prompt "The capital of France is"

Read it next to Meta's llama3 model.py: the same sections in the same order (ModelArgs, RMSNorm,
RoPE, Attention, FeedForward, TransformerBlock, Transformer) and Meta's module names (wq, w1,
attention_norm …), so a Meta state dict loads as it is. Where we differ: positions are a tensor
per token, not a start offset (PoSE's skipped positions, section 3.2); the RoPE angles come from
rope.py in Hugging Face's half layout; attend() picks flash-attn or an SDPA kernel linear in the
length; a KVCache serves generation; the loss never holds all logits (loss.py); checkpoints are
machinery/weights.py's."""
import contextlib
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right
from torch.utils.checkpoint import checkpoint

import rope
from errors import UserError
from loss import cross_entropy

try:  # optional, CUDA only: pip install flash-attn
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


@dataclass
class ModelArgs:
    """Meta's params.json names, so `ModelArgs(**params)` works; hidden_dim, rope_scaling and
    tie_word_embeddings are ours (Hugging Face's intermediate_size, rope_scaling, tied output)."""
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
    # where Hugging Face's other LLaMA-like families differ (machinery/weights.py maps their keys)
    head_dim: int | None = None  # dim / n_heads unless stated (Qwen3-0.6B: 128, dim 1024, 16 heads)
    qkv_bias: bool = False  # Qwen2: biases on wq, wk and wv (not wo)
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and of k, before RoPE
    model_type: str = "llama"  # the family (qwen2, qwen3, mistral) the export's config.json names

    def __post_init__(self):
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        if self.hidden_dim is None:  # Meta's rule: 2/3 of 4·dim, times the multiplier, rounded up
            m, hidden = self.multiple_of, int(2 * 4 * self.dim / 3)
            hidden = int((self.ffn_dim_multiplier or 1) * hidden)
            self.hidden_dim = m * ((hidden + m - 1) // m)
        if self.use_scaled_rope and self.rope_scaling is None:
            self.rope_scaling = rope.llama31_scaling()
        if self.n_heads % self.n_kv_heads or (self.head_dim is None and self.dim % self.n_heads):
            raise UserError(f"dim {self.dim}, n_heads {self.n_heads} and n_kv_heads "
                            f"{self.n_kv_heads} must divide evenly (dim by n_heads unless head_dim "
                            "is given, n_heads by n_kv_heads).")
        self.head_dim = self.head_dim or self.dim // self.n_heads

    @classmethod
    def from_params(cls, params, source):
        """ModelArgs from the settings a checkpoint states (machinery/weights.py reads them)."""
        if unknown := params.keys() - {f.name for f in fields(cls)}:
            raise UserError(f"{source} has keys ModelArgs does not know: {sorted(unknown)}.")
        return cls(**params)

    @property
    def original_max_seq_len(self):
        """Lo, the paper's original context window: the one pretrained, before any RoPE scaling."""
        return (self.rope_scaling or {}).get("original_max_position_embeddings", self.max_seq_len)

    @property
    def window(self):
        """The context the checkpoint is meant for now, its scaling included: what PoSE extends."""
        return rope.window(self.rope_scaling, self.max_seq_len)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()  # the mean of squares in fp32 even for bf16 activations, as Meta and HF do
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


# RoPE: Meta's precompute_freqs_cis and apply_rotary_emb are rope.inv_freq, rope.cos_sin and
# rope.apply_rope, which form the angles in float64 from each token's own position id.


class KVCache(nn.Module):
    """One layer's keys and values for generation: (B, max_len, H_kv, hd), filled left to right."""
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


def use_flash_attn(q):
    """flash-attn where its limits hold: CUDA half precision, sm80 or newer, head_dim <= 256 and a
    multiple of 8; elsewhere SDPA."""
    return (flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0
            and torch.cuda.get_device_capability(q.device)[0] >= 8)


def sdpa_plan(device_type, dtype, T, S, gqa, sm80=True):
    """-> (copy the KV heads?, mask: "causal", None, "lower_right", "split" or "bool"). On CUDA
    only SDPA kernels linear in T run (attend() bars the math kernel's fp32 T×S scores); flash
    (sm80+) takes GQA but no mask or fp32, memory-efficient (torch <= 2.11) no GQA: so copies, a
    causal bias."""
    cuda = device_type == "cuda"
    after_cache = "lower_right" if cuda else "split" if device_type == "cpu" else "bool"
    mask = "causal" if T == S else None if T == 1 else after_cache
    return gqa and cuda and (dtype == torch.float32 or mask == "lower_right" or not sm80), mask


def attend_split(q, k, v):
    """T new queries after S − T cached keys on the CPU, (B, H, ·, hd): every query sees the whole
    cache unmasked and the new keys causally, two calls of SDPA's CPU flash kernel whose softmaxes
    are merged by their log-sum-exps (as flash-decoding merges its pieces). One call with a (T, S)
    mask would cost the T×S rectangle and the mask; this costs T×(S−T) + T²/2 query-key pairs."""
    P = k.shape[2] - q.shape[2]
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # SDPA's, with its lse
    old, lse_old = flash(q, k[:, :, :P], v[:, :, :P])
    new, lse_new = flash(q, k[:, :, P:], v[:, :, P:], is_causal=True)
    w_old = torch.sigmoid(lse_old - lse_new).unsqueeze(-1)  # e^a / (e^a + e^b): the cache's share
    w_new = torch.sigmoid(lse_new - lse_old).unsqueeze(-1)
    return (old.float() * w_old + new.float() * w_new).type_as(q)


def attend(q, k, v):
    """Causal attention of q (B, T, H, hd) over k, v (B, S, H_kv, hd); query t sits at key S−T+t.
    flash-attn where use_flash_attn says, else SDPA as sdpa_plan says."""
    T, S = q.shape[1], k.shape[1]
    if use_flash_attn(q):
        return flash_attn_func(q, k, v, causal=True)  # GQA too; causal mask aligned bottom-right
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
    gqa = k.shape[1] != q.shape[1]  # each KV head serves n_heads / n_kv_heads query heads
    sm80 = not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] >= 8
    copies, mask = sdpa_plan("cuda" if q.is_cuda else q.device.type, q.dtype, T, S, gqa, sm80)
    if copies:
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    if mask == "split":  # several new tokens after a cache, on the CPU
        return attend_split(q, k, v).transpose(1, 2)
    if mask == "lower_right":  # the same on CUDA
        mask = causal_lower_right(T, S)
    elif mask == "bool":  # the same elsewhere (e.g. mps): a (T, S) mask
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    causal, mask = mask == "causal", None if mask == "causal" else mask
    linear = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
              SDPBackend.CUDNN_ATTENTION]  # never SDPBackend.MATH
    with sdpa_kernel(linear) if q.is_cuda else contextlib.nullcontext():
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=gqa and not copies)
    return y.transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, args.norm_eps) if args.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, args.norm_eps) if args.qk_norm else nn.Identity()

    def forward(self, x, cos, sin, cache=None):
        B, T, _ = x.shape
        q = self.q_norm(self.wq(x).view(B, T, self.n_heads, self.head_dim))  # autocast: fp32
        k = self.k_norm(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim))
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = rope.apply_rope(q, cos, sin).type_as(v), rope.apply_rope(k, cos, sin).type_as(v)
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
        self.output = (None if args.tie_word_embeddings
                       else nn.Linear(args.dim, args.vocab_size, bias=False))
        self.gradient_checkpointing = False  # recompute each block in backward: memory ∝ layers
        # θ is a plain CPU attribute, not a buffer, so model.to(torch.bfloat16) never rounds it
        with torch.device("cpu"):  # even when the model is built on the meta device
            self.theta, self.attention_factor = rope.inv_freq(args.head_dim, args.rope_theta,
                                                              args.rope_scaling)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):  # for training from scratch; from_pretrained skips it (meta device)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, tokens, position_ids=None, *, targets=None, cache=None, hidden_only=False):
        """tokens (B, T) at position_ids (B, T) or (T,), by default 0..T−1 after what the cache
        holds -> logits (B, T, vocab). With `targets` (B, T; −100 = ignore): the mean next-token
        loss, its (B·T, vocab) logits never whole (loss.py); `hidden_only`: the final normed states
        (B, T, dim), so callers can project only the positions they score."""
        B, T = tokens.shape
        if position_ids is None:
            start = cache[0].length if cache else 0
            position_ids = torch.arange(start, start + T, device=tokens.device)
        position_ids = position_ids.expand(B, T)
        h = self.tok_embeddings(tokens)
        theta, a = self.theta, self.args
        if rope.kind(a.rope_scaling) in rope.BY_LENGTH:  # θ for each sequence's L: its largest
            L = [cache[0].k.shape[1]] * B if cache else position_ids.amax(1) + 1  # id + 1, or
            theta = rope.per_length(a.head_dim, a.rope_theta, a.rope_scaling, L)  # a cache's size
        cos, sin = rope.cos_sin(position_ids, theta, self.attention_factor, dtype=h.dtype)
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training:
                h = checkpoint(layer, h, cos, sin, use_reentrant=False)
            else:
                h = layer(h, cos, sin, cache[i] if cache else None)
        h = self.norm(h)
        if targets is not None:
            return cross_entropy(h.flatten(0, 1), self.output_weight, targets.flatten())
        return h if hidden_only else self.logits(h)

    @property
    def output_weight(self):
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def logits(self, h):
        return F.linear(h, self.output_weight)

    def make_cache(self, batch_size, max_len):
        p, a = self.tok_embeddings.weight, self.args
        return [KVCache(batch_size, max_len, a.n_kv_heads, a.head_dim, p.dtype, p.device)
                for _ in self.layers]

    @torch.no_grad()
    def prefill(self, tokens, cache, chunk=None):
        """Feed tokens (B, T) into `cache`, `chunk` tokens at a time (None: all at once) -> the
        last position's final normed state (B, dim), as in one pass; only one piece's activations
        are alive at a time, so a long prompt needs memory for the weights and the KV cache."""
        step = chunk or tokens.shape[1]
        for start in range(0, tokens.shape[1], step):
            h = self(tokens[:, start:start + step], cache=cache, hidden_only=True)
        return h[:, -1]

    @torch.no_grad()
    def generate(self, tokens, max_new_tokens, *, eos_id=None, prefill_chunk=None):
        """Greedy decoding with a KV cache (prefilled `prefill_chunk` tokens at a time), one token
        a step -> (B, max_new_tokens)."""
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

    # ---- weights in and out: machinery/weights.py reads and writes the checkpoint formats ----

    @classmethod
    def from_pretrained(cls, path, *, rope_scaling=None, rope_theta=None, dtype=torch.float32,
                        device="cpu", context_len=None):
        """A Meta directory, a Hugging Face directory, a .gguf file or 'smollm2' -> Transformer
        (eval mode). `rope_scaling` (Hugging Face's keys), `rope_theta` (a new base): see
        weights.with_scaling; `context_len`: the trained context of a Meta checkpoint."""
        from machinery import weights

        params, state, source = weights.read_checkpoint(path, context_len)
        args = weights.with_scaling(ModelArgs.from_params(params, source), rope_scaling, rope_theta)
        with torch.device("meta"):  # no memory, no random init: load_weights assigns the tensors
            model = cls(args)
        model.load_weights(state, source=path)
        return model.to(device=device, dtype=dtype).eval()

    def load_weights(self, state, source="state dict"):
        """Load a state dict in our names, naming every mismatch (Meta's strict=False hides it)."""
        expected = {k: v.shape for k, v in self.state_dict().items()}
        missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
        if missing or unexpected:
            raise UserError(f"{source}: weights do not match the config: missing "
                            f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}.")
        for name, shape in expected.items():
            if state[name].shape != shape:
                raise UserError(f"{source}: {name} has shape {tuple(state[name].shape)}, the "
                                f"config implies {tuple(shape)}.")
        self.load_state_dict(state, strict=True, assign=True)

    def save_pretrained(self, directory, tokenizer=None):
        """A Hugging Face directory that transformers loads as the same family, same logits."""
        from machinery import weights

        weights.save_pretrained(self, directory, tokenizer)

