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
    transformers.LlamaForCausalLM loads with the same logits. Each file is written whole, then
    renamed, so a crash never leaves half a file under the final name."""
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
    dynamic = (scaling or {}).get("rope_type") == "dynamic"
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": args.dim, "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
        "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps,
        "rope_theta": theta, "rope_scaling": scaling,
        # transformers' dynamic NTK reads its Lo from max_position_embeddings
        "max_position_embeddings": (args.original_max_seq_len if dynamic else args.max_seq_len),
        "tie_word_embeddings": args.tie_word_embeddings,
        "attention_bias": False, "mlp_bias": False,
        "torch_dtype": dtype, **extra,
    }


def hf_params(path):
    """A Hugging Face directory's ModelArgs fields, from config.json alone (no weights read)."""
    config = _read_json(path / "config.json")
    if config.get("model_type") != "llama":
        raise UserError(f"{path / 'config.json'}: model_type is {config.get('model_type')!r}, "
                        "expected 'llama'.")
    params = config.get("rope_parameters") or {}  # transformers 5: rope_theta and the scaling
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
            tie_word_embeddings=config.get("tie_word_embeddings", False))
    except KeyError as e:
        raise UserError(f"{path / 'config.json'} has no {e.args[0]!r}, which a Llama config "
                        "needs.") from None
    if config.get("head_dim", params["dim"] // params["n_heads"]) != \
            params["dim"] // params["n_heads"]:
        raise UserError(f"{path / 'config.json'}: head_dim {config['head_dim']} != "
                        "hidden_size / heads.")
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
              "attn_norm": "attention_norm", "ffn_norm": "ffn_norm"}
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

    arch = field("general.architecture")
    if arch != "llama":
        raise UserError(f"{path}: general.architecture is {arch!r}, expected 'llama'.")
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
    n_heads = field("llama.attention.head_count")
    scaling, kind = None, field("llama.rope.scaling.type", "none")
    if kind in ("linear", "yarn"):  # llama.cpp's keys; no original context: Lo = the context, as HF
        original = (field("llama.rope.scaling.original_context_length")
                    or field("llama.context_length"))
        scaling = {"rope_type": kind, "factor": float(field("llama.rope.scaling.factor")),
                   "original_max_position_embeddings": original}
    elif kind != "none":
        raise UserError(f"{path}: llama.rope.scaling.type {kind!r} is not supported "
                        "(none, linear, yarn).")
    params = dict(
        dim=field("llama.embedding_length"), n_layers=field("llama.block_count"), n_heads=n_heads,
        n_kv_heads=field("llama.attention.head_count_kv", n_heads),
        vocab_size=state["tok_embeddings.weight"].shape[0],
        hidden_dim=field("llama.feed_forward_length"),
        norm_eps=field("llama.attention.layer_norm_rms_epsilon"),
        rope_theta=field("llama.rope.freq_base", 10000.0),
        rope_scaling=scaling, max_seq_len=field("llama.context_length"),
        tie_word_embeddings="output.weight" not in state)
    for i in range(params["n_layers"]):  # llama.cpp stores q/k rows interleaved, like Meta
        for key, heads in (("wq", n_heads), ("wk", params["n_kv_heads"])):
            name = f"layers.{i}.attention.{key}.weight"
            state[name] = interleaved_to_half(state[name], heads)
    return params, state, path

