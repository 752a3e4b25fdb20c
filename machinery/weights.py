"""Checkpoint formats: Meta, Hugging Face and GGUF readers, and the Hugging Face export.

    python -c "from machinery.weights import read_checkpoint as r; print(r('smollm2')[0])"

Every reader returns (params, state, source): params are ModelArgs' fields as the checkpoint states
them (a plain dict: this module never imports model.py, which builds ModelArgs from it), state the
tensors in our names, source the file that states the settings. model.py's module names are Meta's
(wq, w1, attention_norm …), so Hugging Face and GGUF names are mapped; our rotary channels use
Hugging Face's half layout, so Meta and GGUF q/k rows are permuted once here (interleaved_to_half).
Loading is strict (Transformer.load_weights names every mismatch) and never unpickles code
(weights_only). The model and its tokenizer in one call: machinery.checkpoint.load.
"""
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

import rope
from errors import UserError
from machinery.files import atomic_path, atomic_write
from machinery.ranks import is_rank0
from machinery.tokenizer import resolve


def checkpoint_format(path, context_len=None):
    """"meta", "gguf" or "hf": the format of a checkpoint path as `resolve` gives it. A
    `context_len` is refused but for Meta's, whose params.json states none."""
    if (path / "params.json").is_file():
        return "meta"
    if context_len is not None:
        raise UserError(f"{path} states its own context; the context length is given only for "
                        "Meta checkpoints, whose params.json has none.")
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if (path / "config.json").is_file():
        return "hf"
    raise UserError(f"{path} is neither a .gguf file nor a directory with params.json (Meta) "
                    "or config.json (Hugging Face).")


def read_checkpoint(path, context_len=None):
    """A checkpoint path or name (resolve) -> (params, state dict in our names, source) of any
    format; `context_len`: the trained context of a Meta checkpoint (its params.json has none)."""
    path = resolve(path)
    kind = checkpoint_format(path, context_len)
    if kind == "meta":
        return _read_meta(path, context_len)
    return _read_gguf(path) if kind == "gguf" else _read_hf(path)


def save_pretrained(model, directory, tokenizer=None):
    """A Hugging Face directory (config.json, model.safetensors, tokenizer files) that
    transformers loads as its family's class (hf_config) with the same logits. Each file is
    written whole, then renamed, so a crash never leaves half a file under the final name."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {to_hf_name(k): v.detach().to("cpu").contiguous()
             for k, v in model.state_dict().items()}
    with atomic_path(directory / "model.safetensors") as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    dtype = str(model.tok_embeddings.weight.dtype).removeprefix("torch.")
    config = hf_config(model.args, dtype=dtype)
    if tokenizer is not None:
        config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
        tokenizer.save(directory)
    atomic_write(directory / "config.json", json.dumps(config, indent=2))


def with_scaling(args, scaling, theta=None):
    """ModelArgs with a new RoPE base `theta` (ABF, "adjusted base frequency": Llama-2-Long, Code
    Llama), then RoPE `scaling` (Hugging Face's keys) on top, applied to a loaded checkpoint; None
    leaves either as the checkpoint has it (the window too: ABF alone does not say how far).

    rope_type default/none: plain RoPE at Lo. With original_max_position_embeddings: in place of
    the checkpoint's scaling, as given, context = factor · original. With only a type and a
    factor: the checkpoint's window W stretched by the factor on top of the scaling it has
    (rope.extend), context = factor · W."""
    if theta is not None:
        if not 0 < theta < float("inf"):
            raise UserError(f"the RoPE base (rope_theta) must be a positive number, got {theta}.")
        args = replace(args, rope_theta=float(theta))
        rope.inv_freq(args.head_dim, args.rope_theta, args.rope_scaling)  # rope.py's sentences
    if scaling is None:
        return args
    scaling, kind = dict(scaling), rope.kind(scaling)
    if kind in ("default", "none"):
        plain = {"rope_scaling": None, "use_scaled_rope": False,
                 "max_seq_len": args.original_max_seq_len}
        return replace(args, **plain)
    original = scaling.get("original_max_position_embeddings")
    if original is None:
        if scaling.get("factor") is None:
            raise UserError(f"rope_type {kind!r} needs a factor, got {scaling}.")
        context = round(scaling["factor"] * args.window)
        scaling = {**scaling, **rope.extend(args.rope_scaling, args.window, context, kind)}
    else:
        context = round(original * scaling.get("factor", 1))
    rope.inv_freq(args.head_dim, args.rope_theta, scaling)  # validate now, with rope.py's message
    scaled = {"rope_scaling": scaling, "use_scaled_rope": False, "max_seq_len": context}
    return replace(args, **scaled)


def read_scaling(path):
    """A RoPE scaling from a JSON file, as longrope.py writes it: Hugging Face's keys, rope_type
    and original_max_position_embeddings among them (--rope_scaling FILE, train.py --scaling)."""
    scaling = _read_json(Path(path))
    if rope.kind(scaling) == "default" or scaling.get(rope.LO) is None:
        raise UserError(f"{path} holds no RoPE scaling: expected Hugging Face's keys with a "
                        "rope_type and an original_max_position_embeddings, as longrope.py "
                        "writes them.")
    return scaling


def _read_json(file):
    """A checkpoint's JSON object, or one sentence naming the file (a cut or hand-edited config
    is common)."""
    try:
        value = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{file} is not readable JSON ({e}).") from None
    if not isinstance(value, dict):
        raise UserError(f"{file} holds a JSON {type(value).__name__}, not an object of settings.")
    return value


# ---- Hugging Face -------------------------------------------------------------------------

HF_NAMES = {  # ours -> Hugging Face, per block and global
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attention.q_norm": "self_attn.q_norm", "attention.k_norm": "self_attn.k_norm",  # Qwen3
}
HF_GLOBAL = {"tok_embeddings.weight": "model.embed_tokens.weight",
             "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def to_hf_name(name):  # ours -> HF
    if name in HF_GLOBAL:
        return HF_GLOBAL[name]
    _, i, rest = name.split(".", 2)
    module, param = rest.rsplit(".", 1)
    return f"model.layers.{i}.{HF_NAMES[module]}.{param}"


def from_hf_name(name):  # HF -> ours
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
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
    "longrope": ("factor", "original_max_position_embeddings", "short_factor", "long_factor",
                 "attention_factor")}


# The families whose attention differs from LLaMA's in a named ModelArgs option (transformers'
# modeling files): Mistral not at all once its sliding window is off, Qwen2 by biases on q, k and
# v, Qwen3 by an RMSNorm of q and k per head before RoPE; Qwen3 and Mistral state head_dim.
FAMILIES = {  # model_type -> (transformers' class, qkv_bias, qk_norm)
    "llama": ("LlamaForCausalLM", False, False), "mistral": ("MistralForCausalLM", False, False),
    "qwen2": ("Qwen2ForCausalLM", True, False), "qwen3": ("Qwen3ForCausalLM", False, True)}
# what each family's config.json says of the features it does not use here
HF_FAMILY_KEYS = {"llama": {"attention_bias": False, "mlp_bias": False},
                  "mistral": {"sliding_window": None},
                  "qwen2": {"use_sliding_window": False, "sliding_window": None},
                  "qwen3": {"attention_bias": False, "use_sliding_window": False,
                            "sliding_window": None}}


def family(model_type, source):
    """-> the ModelArgs options of a family: model_type, qkv_bias, qk_norm; or one sentence."""
    if model_type not in FAMILIES:
        raise UserError(f"{source}: model_type is {model_type!r}; this code computes exactly "
                        f"{', '.join(FAMILIES)} (LLaMA's architecture and its few variants).")
    _, qkv_bias, qk_norm = FAMILIES[model_type]
    return {"model_type": model_type, "qkv_bias": qkv_bias, "qk_norm": qk_norm}


def check_family(args, source):
    """Refuse ModelArgs that their family's transformers class cannot hold (an --init config that
    names qwen2 without its biases, say), before any training."""
    expected = family(args.model_type, source)
    wrong = {k: v for k, v in expected.items() if getattr(args, k) != v}
    if wrong:
        raise UserError(f"{source}: model_type {args.model_type!r} has " + ", ".join(
            f"{k} {v}" for k, v in wrong.items()) + "; set them so, or choose its model_type.")


def sliding_window(config):
    """The attention window transformers applies to some layer of a config.json, or None."""
    if config.get("model_type") == "mistral":  # every layer, 4096 when the key is missing
        return config.get("sliding_window", 4096)
    if config.get("model_type") in ("qwen2", "qwen3") and config.get("use_sliding_window"):
        # windowed: the layers layer_types names, or those from max_window_layers on
        layers = config.get("layer_types") or ["sliding_attention"] * max(
            0, config.get("num_hidden_layers", 0) - config.get("max_window_layers", 28))
        return config.get("sliding_window", 4096) if "sliding_attention" in layers else None
    return None


def hf_config(args, dtype="float32"):
    """config.json for transformers' class of the model's family (FAMILIES: LlamaForCausalLM for
    Meta's and GGUF's llama). NTK has no rope_type there: it is exactly a new base. Linear and
    dynamic take no Lo in rope_scaling: dynamic reads it from max_position_embeddings; linear's is
    kept beside, as a top-level original_max_position_embeddings (Phi-3's field), for us to read
    back."""
    scaling, theta, extra = args.rope_scaling, args.rope_theta, {}
    if rope.kind(scaling) == "ntk":
        d, s = args.head_dim, scaling["factor"]
        scaling, theta = None, theta * s ** (d / (d - 2))
    if scaling:
        scaling = {"rope_type": rope.kind(scaling),
                   **{k: v for k, v in scaling.items() if k in HF_KEYS[rope.kind(scaling)]}}
        if scaling["rope_type"] == "linear":
            extra = {"original_max_position_embeddings": args.original_max_seq_len}
    dynamic = (scaling or {}).get("rope_type") == "dynamic"
    check_family(args, "the exported model")
    return {
        "architectures": [FAMILIES[args.model_type][0]], "model_type": args.model_type,
        "hidden_act": "silu",
        "hidden_size": args.dim, "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
        "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps,
        "rope_theta": theta, "rope_scaling": scaling,
        # transformers' dynamic NTK reads its Lo from max_position_embeddings
        "max_position_embeddings": (args.original_max_seq_len if dynamic else args.max_seq_len),
        "tie_word_embeddings": args.tie_word_embeddings,
        **HF_FAMILY_KEYS[args.model_type], "torch_dtype": dtype, **extra,
    }


def hf_params(path):
    """A Hugging Face directory's ModelArgs fields, from config.json alone (no weights read)."""
    file = path / "config.json"
    config = _read_json(file)
    kind = family(config.get("model_type"), file)
    params = config.get("rope_parameters") or {}  # transformers 5: rope_theta and the scaling
    computed = [  # (key, the value this code computes, what another value means)
        ("hidden_act", "silu", "another activation in SwiGLU"),
        ("attention_bias", False, "biases on q, k, v and o"),
        ("mlp_bias", False, "biases in the feed-forward"),
        ("partial_rotary_factor", 1.0, "RoPE on a part of each head's channels")]
    for key, expected, meaning in computed:
        value = config.get(key, params.get(key, expected))
        if value != expected:
            raise UserError(f"{file}: {key} is {value!r} ({meaning}), which this code does not "
                            "compute; it computes LLaMA, Mistral, Qwen2 and Qwen3 as released.")
    window = sliding_window(config)
    if window is not None:
        raise UserError(f"{file}: sliding_window {window} is in force (a layer attends to the "
                        f"last {window} tokens only), which this code does not compute: for full "
                        "attention, as Mistral v0.2 and later were trained, set sliding_window "
                        "to null (Qwen: use_sliding_window to false) in config.json, knowing "
                        f"that its outputs beyond {window} tokens then differ.")
    stated = config.get("rope_scaling") or params
    scaling = {k: v for k, v in stated.items() if k not in ("rope_theta", "type")}
    if rope.kind(stated) == "default":
        scaling = None
    else:  # Lo: in the scaling, beside it (Phi-3, our linear), or max_position_embeddings (HF)
        scaling["rope_type"] = rope.kind(stated)
        scaling.setdefault("original_max_position_embeddings",
                           config.get("original_max_position_embeddings")
                           or config.get("max_position_embeddings"))
        if scaling["rope_type"] == "longrope" and scaling.get("factor") is None:  # Phi-3's
            scaling["factor"] = (config.get("max_position_embeddings", 0)  # transformers' default
                                 / scaling["original_max_position_embeddings"])
    try:
        params = dict(
            dim=config["hidden_size"], n_layers=config["num_hidden_layers"],
            n_heads=config["num_attention_heads"], n_kv_heads=config.get("num_key_value_heads"),
            vocab_size=config["vocab_size"], hidden_dim=config["intermediate_size"],
            norm_eps=config["rms_norm_eps"], rope_scaling=scaling,
            rope_theta=params.get("rope_theta", config.get("rope_theta", 10000.0)),
            max_seq_len=config["max_position_embeddings"],
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            # Qwen3Config's head_dim is 128 when unstated, the others' hidden_size / heads
            head_dim=config.get("head_dim") or (128 if kind["model_type"] == "qwen3" else None),
            **kind)
    except KeyError as e:
        raise UserError(f"{file} has no {e.args[0]!r}, which a {kind['model_type']} config "
                        "needs.") from None
    return params


def hf_files(path):
    """The safetensors files of a Hugging Face directory: those its index names, or all."""
    index = path / "model.safetensors.index.json"
    if index.exists():  # sharded: the index names the files
        files = sorted(set(_read_json(index)["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path} has config.json but no *.safetensors weights.")
    return [path / name for name in files]


def _read_hf(path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    params, state = hf_params(path), {}
    for file in hf_files(path):
        try:
            state.update({from_hf_name(k): v for k, v in load_file(file).items()})
        except (SafetensorError, OSError) as e:
            raise UserError(f"{file} is not a readable safetensors file ({e}).") from None
    if params["tie_word_embeddings"]:
        state.pop("output.weight", None)  # some tied checkpoints store the copy too
    return params, state, path / "config.json"


# ---- Meta ---------------------------------------------------------------------------------

def interleaved_to_half(w, n_heads):
    """Meta/GGUF rotate pairs (x0,x1),(x2,x3)…; HF and we rotate (x_j, x_{j+d/2}): permute the
    rows per head."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _read_meta(path, context_len=None):
    params = _read_json(path / "params.json")
    # every Meta params.json states these; the defaults are Llama-7B's
    for key in ("dim", "n_layers", "n_heads"):
        if key not in params:
            raise UserError(f"{path / 'params.json'} has no {key!r}, which a Llama params.json "
                            "needs.")
    shards = sorted(path.glob("consolidated.*.pth"))
    if not shards:
        raise UserError(f"{path} has params.json but no consolidated.*.pth weights.")
    try:
        parts = [torch.load(p, map_location="cpu", weights_only=True, mmap=True) for p in shards]
    except Exception as e:  # a pickle that wants to run code lands here: weights_only refuses it
        raise UserError(f"{shards[0].parent}: could not load {len(shards)} consolidated.*.pth as "
                        f"plain tensors ({type(e).__name__}: {str(e).splitlines()[0]}).") from None
    dim = params["dim"]
    state = {}
    for name in parts[0]:
        if name == "rope.freqs":  # a cache of θ in Llama 1/2 checkpoints; rope.py computes it
            continue
        tensors = [p[name] for p in parts]
        if len(tensors) == 1 or tensors[0].ndim == 1:  # norms: alike on every model-parallel rank
            state[name] = tensors[0]
        elif name == "tok_embeddings.weight":  # Llama 1/2 split the embedding dim, 3 the vocabulary
            state[name] = torch.cat(tensors, dim=0 if tensors[0].shape[1] == dim else 1)
        else:  # row-parallel layers (wo, w2) split their input dim, the others their output dim
            row_parallel = name.endswith(("wo.weight", "w2.weight"))
            state[name] = torch.cat(tensors, dim=1 if row_parallel else 0)
    if params.get("vocab_size", -1) == -1:  # Llama 1/2 params.json leave it to the tokenizer
        params["vocab_size"] = state["tok_embeddings.weight"].shape[0]
    if context_len is not None:
        params["max_seq_len"] = context_len
    elif "max_seq_len" not in params:  # Meta states it in code, not in params.json: a guess, said
        theta = params.get("rope_theta")  # Llama 3.1 / 3 / Code Llama / 1 (norm_eps 1e-6) / 2
        params["max_seq_len"] = (131072 if params.get("use_scaled_rope")
                                 else 8192 if theta == 500000 else 16384 if theta == 1000000
                                 else 2048 if params.get("norm_eps") == 1e-6 else 4096)
        if is_rank0():
            print(f"note: {path / 'params.json'} states no context; guessed "
                  f"{params['max_seq_len']} tokens from its settings (early Llama-2-chat files "
                  "look like Llama 1's 2048): pass --context_len if wrong.",
                  file=sys.stderr, flush=True)
    n_heads = params["n_heads"]
    for i in range(params["n_layers"]):
        for key, heads in (("wq", n_heads), ("wk", params.get("n_kv_heads") or n_heads)):
            name = f"layers.{i}.attention.{key}.weight"
            if name in state:
                state[name] = interleaved_to_half(state[name], heads)
    if params.get("tie_word_embeddings"):
        state.pop("output.weight", None)
    return params, state, path / "params.json"


# ---- GGUF ---------------------------------------------------------------------------------

GGUF_NAMES = {"attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
              "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1",
              "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
              "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
              "attn_q_norm": "attention.q_norm", "attn_k_norm": "attention.k_norm"}
GGUF_GLOBAL = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
               "output.weight": "output.weight"}


def _read_gguf(path):
    try:
        from gguf import GGUFReader
        from gguf.quants import dequantize
    except ImportError:
        raise UserError(f"reading {path} needs the gguf package: pip install gguf") from None
    try:
        reader = GGUFReader(path)
    except Exception as e:
        raise UserError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}).") from None

    def field(key, default=None):
        return reader.fields[key].contents() if key in reader.fields else default

    def own(key, default=None):  # the architecture's keys: llama.block_count, qwen2.block_count …
        return field(f"{arch}.{key}", default)

    arch = field("general.architecture")
    if arch not in ("llama", "qwen2", "qwen3"):
        raise UserError(f"{path}: general.architecture is {arch!r}; expected llama (Mistral's "
                        "too), qwen2 or qwen3.")
    if own("attention.sliding_window"):
        raise UserError(f"{path}: {arch}.attention.sliding_window is set (windowed attention), "
                        "which this code does not compute; convert the checkpoint without it "
                        "for full attention.")
    state = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            raise UserError(f"{path} carries rope_freqs (Llama 3.1 scaling); pass "
                            "rope_scaling=rope.llama31_scaling() or another scaling explicitly.")
        name = GGUF_GLOBAL.get(t.name)
        if name is None and t.name.startswith("blk."):
            _, i, module, param = t.name.split(".")
            name = f"layers.{i}.{GGUF_NAMES.get(module, module)}.{param}"
        state[name or t.name] = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())
    n_heads, dim = own("attention.head_count"), own("embedding_length")
    head_dim = own("attention.key_length", dim // n_heads)
    if own("rope.dimension_count", head_dim) != head_dim:
        raise UserError(f"{path}: {arch}.rope.dimension_count is "
                        f"{own('rope.dimension_count')}, not the head dimension {head_dim} "
                        "(RoPE on a part of each head), which this code does not compute.")
    scaling, kind = None, own("rope.scaling.type", "none")
    if kind in ("linear", "yarn"):  # llama.cpp's keys; no original context: Lo = the context, as HF
        original = (own("rope.scaling.original_context_length")
                    or own("context_length"))
        scaling = {"rope_type": kind, "factor": float(own("rope.scaling.factor")),
                   "original_max_position_embeddings": original}
    elif kind != "none":
        raise UserError(f"{path}: {arch}.rope.scaling.type {kind!r} is not supported "
                        "(none, linear, yarn).")
    params = dict(
        dim=dim, n_layers=own("block_count"), n_heads=n_heads,
        n_kv_heads=own("attention.head_count_kv", n_heads), head_dim=head_dim,
        vocab_size=state["tok_embeddings.weight"].shape[0],
        hidden_dim=own("feed_forward_length"),
        norm_eps=own("attention.layer_norm_rms_epsilon"),
        rope_theta=own("rope.freq_base", 10000.0),
        rope_scaling=scaling, max_seq_len=own("context_length"),
        tie_word_embeddings="output.weight" not in state, **family(arch, path))
    # llama.cpp stores llama's q/k rows interleaved, like Meta; qwen2's and qwen3's as HF does
    for i in range(params["n_layers"] if arch == "llama" else 0):
        for key, heads in (("wq", n_heads), ("wk", params["n_kv_heads"])):
            name = f"layers.{i}.attention.{key}.weight"
            state[name] = interleaved_to_half(state[name], heads)
    return params, state, path

