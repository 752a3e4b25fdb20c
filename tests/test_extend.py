"""Checkpoints that already carry a RoPE scaling (Llama 3.1: llama3 x8 from 8192, window 131072; HF
configs with yarn or linear; GGUF scaling metadata) are extended on top of it: the window to extend
is theirs, a target within it is refused, a larger one keeps the type with the factor multiplied and
Lo unchanged, and what we export is the config transformers 5 loads without a warning and with the
same RoPE tables."""

import json
import logging

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import rope
import train
from model import ModelArgs, Transformer
from machinery.weights import with_scaling
from conftest import byte_tokenizer
from test_train import argv, tiny  # noqa: F401 (the fixture)

LLAMA31 = rope.llama31_scaling()


def hf_tables(head_dim, base, scaling, max_position_embeddings):
    """transformers' inv_freq and attention factor for a config holding `scaling`, as config.json
    would."""
    config = LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_theta": base, **scaling},
    )
    return ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu")


@pytest.mark.parametrize(
    "scaling,window",
    [
        (LLAMA31, 131072),
        # Qwen-style
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, 131072),
        ({"rope_type": "linear", "factor": 4.0, "original_max_position_embeddings": 4096}, 16384),
    ],
)
def test_extending_keeps_the_type_multiplies_the_factor_and_equals_transformers(scaling, window):
    new = rope.extend(scaling, window, 4 * window)
    assert new == {**scaling, "factor": 4 * scaling["factor"]}  # Lo and every other key unchanged
    ours, attention = rope.inv_freq(128, 500000.0, new)
    theirs, their_attention = hf_tables(128, 500000.0, new, 4 * window)
    torch.testing.assert_close(ours, theirs.double(), rtol=1e-6, atol=0)
    assert attention == pytest.approx(their_attention, rel=1e-12)
    plain, _ = rope.inv_freq(128, 500000.0)
    # the fast channels it was trained with unscaled stay unscaled
    if scaling["rope_type"] != "linear":
        torch.testing.assert_close(ours[:8], plain[:8], rtol=1e-12, atol=0)


def test_the_window_is_what_the_scaling_implies_when_max_position_embeddings_is_lo():
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert rope.window(yarn, 32768) == 131072 and rope.window(LLAMA31, 131072) == 131072
    assert rope.window(None, 4096) == 4096


def test_a_target_within_the_window_or_another_type_is_refused_with_a_sentence():
    with pytest.raises(
        ValueError, match="within the checkpoint's window of 131072 tokens.*nothing to extend"
    ):
        rope.extend(LLAMA31, 131072, 32768)
    with pytest.raises(ValueError, match="already llama3 x8 from 8192.*ask for llama3.*not linear"):
        rope.extend(LLAMA31, 131072, 262144, "linear")
    with pytest.raises(ValueError, match="ntk x2 from 64, which has no larger factor"):
        rope.extend(
            {"rope_type": "ntk", "factor": 2.0, "original_max_position_embeddings": 64}, 128, 512
        )


def test_meta_use_scaled_rope_and_an_eval_factor_stretch_the_131k_window():
    args = ModelArgs(
        dim=64,
        n_layers=1,
        n_heads=4,
        vocab_size=10,
        use_scaled_rope=True,
        max_seq_len=131072,
        rope_theta=500000.0,
    )
    # what eval's --rope_scaling llama3:2 asks
    stretched = with_scaling(args, {"rope_type": "llama3", "factor": 2.0})
    assert stretched.rope_scaling == {**LLAMA31, "factor": 16.0} and stretched.max_seq_len == 262144
    with pytest.raises(ValueError, match="already llama3 x8 from 8192"):
        with_scaling(args, {"rope_type": "yarn", "factor": 2.0})
    # a dict that states its own Lo replaces the checkpoint's scaling, as given
    replaced = with_scaling(
        args, {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8192}
    )
    assert replaced.rope_scaling["rope_type"] == "yarn" and replaced.max_seq_len == 16384


# ---- real checkpoints on disk --------------------------------------------------------------------


def hf_checkpoint(directory, scaling, max_position_embeddings):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=258,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_theta": 10000.0, **scaling},
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(8)  # sharp attention: positions change the logits
    model.save_pretrained(directory)
    byte_tokenizer().save(directory)
    return directory


def transformers_warnings(directory):
    """Everything transformers logs at warning level while it loads `directory`."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        model = LlamaForCausalLM.from_pretrained(directory).eval()
    finally:
        logger.removeHandler(handler)
    return model, [r.getMessage() for r in records]


def same_logits(ours, theirs, length=300):
    x = torch.randint(0, 258, (1, 40), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(20), torch.arange(length - 20, length)])[None]
    with torch.no_grad():
        torch.testing.assert_close(
            ours(x, positions), theirs(x, position_ids=positions).logits, rtol=0, atol=1e-4
        )


LLAMA3_TINY = {
    "rope_type": "llama3",
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


@pytest.mark.parametrize(
    "scaling,max_position",
    [
        (LLAMA3_TINY, 128),  # Llama 3.1 in miniature: x4 from 32, window 128
        # window only implied
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}, 32),
    ],
)
def test_training_a_scaled_checkpoint_extends_its_own_scaling(
    tiny, tmp_path, scaling, max_position  # noqa: F811
):
    base = hf_checkpoint(tmp_path / "base", scaling, max_position)
    flags = ["--model", str(base), "--steps", "1", "--batch_size", "2", "--train_len", "32"]
    train.main(argv(tiny, tmp_path / "out", *flags, "--target_len", "512"))
    config = json.loads((tmp_path / "out" / "final" / "config.json").read_text())
    assert (
        config["rope_scaling"] == {**scaling, "factor": 16.0}
        and config["max_position_embeddings"] == 512
    )
    theirs, warnings = transformers_warnings(tmp_path / "out" / "final")
    assert warnings == []
    same_logits(Transformer.from_pretrained(tmp_path / "out" / "final"), theirs, length=500)


@pytest.mark.parametrize(
    "case,flags,message",
    [
        (
            "within the window",
            ["--train_len", "32", "--target_len", "128"],
            "within the checkpoint's window of 128",
        ),
        (
            "another type",
            ["--train_len", "32", "--target_len", "512", "--scaling", "yarn"],
            "ask for llama3",
        ),
        ("no train_len", ["--target_len", "512"], "give --train_len, e.g. 32"),
    ],
)
def test_a_scaled_checkpoint_refuses_what_it_cannot_do_in_one_sentence(
    tiny,  # noqa: F811
    tmp_path,
    capsys,
    case,
    flags,
    message,
):
    base = hf_checkpoint(tmp_path / "base", LLAMA3_TINY, 128)
    with pytest.raises(SystemExit) as e:
        train.main(argv(tiny, tmp_path / "out", "--model", str(base), *flags))
    err = capsys.readouterr().err
    assert e.value.code == 1 and message in err and err.count("error:") == 1


@pytest.mark.parametrize("kind", ["linear", "yarn", "llama3", "dynamic", "ntk"])
def test_exported_configs_load_in_transformers_without_a_warning(tmp_path, kind):
    base = hf_checkpoint(tmp_path / "base", {"rope_type": "default"}, 64)
    scaling = {"rope_type": kind, "factor": 4.0}
    if kind == "llama3":
        scaling.update(low_freq_factor=1.0, high_freq_factor=4.0)
    ours = Transformer.from_pretrained(base, rope_scaling=scaling)
    ours.save_pretrained(tmp_path / "out")
    theirs, warnings = transformers_warnings(tmp_path / "out")
    assert warnings == []
    # dynamic: within Lo, where it is exact
    same_logits(ours, theirs, length=250 if kind != "dynamic" else 60)
    again = Transformer.from_pretrained(tmp_path / "out")  # and we read back the same Lo and window
    # static NTK is a new base: a plain RoPE model whose window is 256
    lo = 256 if kind == "ntk" else 64
    assert (again.args.original_max_seq_len, again.args.window) == (lo, 256)


def half_to_interleaved(w, n_heads):
    """The inverse of weights.interleaved_to_half: HF's half layout back to llama.cpp's interleaved
    rows."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def test_gguf_scaling_metadata_is_read_and_extended(tmp_path):
    import gguf

    base = hf_checkpoint(
        tmp_path / "base",
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
        256,
    )
    hf = Transformer.from_pretrained(base)
    writer = gguf.GGUFWriter(tmp_path / "m.gguf", "llama")
    a = hf.args
    for key, value in (
        ("block_count", a.n_layers),
        ("embedding_length", a.dim),
        ("feed_forward_length", a.hidden_dim),
        ("attention.head_count", a.n_heads),
        ("attention.head_count_kv", a.n_kv_heads),
        ("context_length", 256),
        ("rope.scaling.original_context_length", 64),
    ):
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", a.norm_eps)
    writer.add_float32("llama.rope.freq_base", a.rope_theta)
    writer.add_string("llama.rope.scaling.type", "yarn")
    writer.add_float32("llama.rope.scaling.factor", 4.0)
    names = {
        "attention.wq": "attn_q",
        "attention.wk": "attn_k",
        "attention.wv": "attn_v",
        "attention.wo": "attn_output",
        "feed_forward.w1": "ffn_gate",
        "feed_forward.w2": "ffn_down",
        "feed_forward.w3": "ffn_up",
        "attention_norm": "attn_norm",
        "ffn_norm": "ffn_norm",
    }
    for name, w in hf.state_dict().items():
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            module, param = rest.rsplit(".", 1)
            if module in ("attention.wq", "attention.wk"):
                w = half_to_interleaved(w, a.n_heads if module == "attention.wq" else a.n_kv_heads)
            name = f"blk.{i}.{names[module]}.{param}"
        else:
            name = {
                "tok_embeddings.weight": "token_embd.weight",
                "norm.weight": "output_norm.weight",
            }.get(name, name)
        writer.add_tensor(name, np.ascontiguousarray(w.numpy()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = Transformer.from_pretrained(tmp_path / "m.gguf")
    assert ours.args.rope_scaling == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    assert ours.args.window == 256
    x, positions = (
        torch.arange(40)[None],
        torch.cat([torch.arange(20), torch.arange(230, 250)])[None],
    )
    with torch.no_grad():
        torch.testing.assert_close(ours(x, positions), hf(x, positions), rtol=0, atol=1e-5)
    stretched = Transformer.from_pretrained(
        tmp_path / "m.gguf", rope_scaling={"rope_type": "yarn", "factor": 2.0}
    )
    assert stretched.args.rope_scaling["factor"] == 8.0 and stretched.args.max_seq_len == 512
