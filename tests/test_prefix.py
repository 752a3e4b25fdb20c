"""machinery/prefix.py: prompts that share a beginning share its KV cache, and nothing else changes.
Each prompt's answer and the keys and values left in the cache equal those of a fresh prefill;
the shared tokens are fed once. A tiny random model with sharp attention, CPU, seconds."""

import pytest
import torch

import eval_passkey
from conftest import byte_tokenizer
from machinery.prefix import SharedPrefix, common_prefix
from model import ModelArgs, Transformer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(
        ModelArgs(
            dim=64,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            vocab_size=258,
            hidden_dim=128,
            max_seq_len=1024,
        )
    )
    with torch.no_grad():  # sharp attention: a changed key or value changes the answer
        for layer in m.layers:
            layer.attention.wq.weight.mul_(8)
            layer.attention.wk.weight.mul_(8)
    return m.eval()


def fed_tokens(model, monkeypatch):
    """Record how many prompt tokens each prefill is given."""
    fed, prefill = [], model.prefill
    monkeypatch.setattr(
        model, "prefill", lambda tokens, *a: fed.append(tokens.shape[1]) or prefill(tokens, *a)
    )
    return fed


def fresh(model, tokens, max_new_tokens):
    """The answer of a fresh prefill, and the cache it leaves (prompt positions only)."""
    cache = model.make_cache(1, len(tokens) + max_new_tokens)
    model.prefill(torch.tensor([tokens]), cache)
    answer = model.generate(torch.tensor([tokens]), max_new_tokens)[0]
    return answer, [(c.k[:, : len(tokens)], c.v[:, : len(tokens)]) for c in cache]


def test_common_prefix_counts_the_leading_ids_two_lists_share():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2 and common_prefix([], [1]) == 0
    assert common_prefix([7], [8]) == 0


def test_a_passkey_sweep_gives_fresh_prefill_answers_and_feeds_the_shared_filler_once(
    model, monkeypatch
):
    tokenizer = byte_tokenizer(add_bos=True)
    trials = sorted(
        (
            eval_passkey.make_trial(tokenizer, 600, i, depths=[0.9, 0.1, 0.5, 0.3, 0.7])
            for i in range(5)
        ),
        key=lambda t: t["tokens"],
    )
    fed = fed_tokens(model, monkeypatch)
    shared = SharedPrefix(model, "cpu")
    for t in trials:
        answer = shared.generate(t["tokens"], 8)
        expected, cache = fresh(model, t["tokens"], 8)
        assert torch.equal(answer, expected)
        for layer, (k, v) in zip(shared.cache, cache):
            n = len(t["tokens"])
            torch.testing.assert_close(layer.k[:, :n], k, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(layer.v[:, :n], v, rtol=1e-5, atol=1e-5)
    shared_fed = fed[0::3]  # each trial: ours, then fresh() prefills twice
    # every trial after the first reads again only what follows the filler it shares
    prefixes = [common_prefix(a["tokens"], b["tokens"]) for a, b in zip(trials, trials[1:])]
    assert shared_fed == [len(trials[0]["tokens"])] + [
        len(t["tokens"]) - p for t, p in zip(trials[1:], prefixes)
    ]
    assert min(prefixes) > 50 and sum(shared_fed) < 0.75 * sum(len(t["tokens"]) for t in trials)


@pytest.mark.parametrize(
    "order",
    ["same prompt twice", "a prefix of the last", "longer than the cache", "nothing shared"],
)
def test_every_rewind_gives_the_fresh_answer(order, model):
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 256, (120,), generator=g).tolist()
    second = {
        "same prompt twice": a,
        "a prefix of the last": a[:70],
        "longer than the cache": a + torch.randint(0, 256, (200,), generator=g).tolist(),
        "nothing shared": torch.randint(0, 256, (90,), generator=g).tolist(),
    }[order]
    shared = SharedPrefix(model, "cpu")
    for tokens in (a, second):
        answer = shared.generate(tokens, 6)
        expected, cache = fresh(model, tokens, 6)
        assert torch.equal(answer, expected)
        for layer, (k, v) in zip(shared.cache, cache):
            torch.testing.assert_close(layer.k[:, : len(tokens)], k, rtol=1e-5, atol=1e-5)


def test_decoding_stops_at_eos_as_generate_does(model):
    tokens = list(range(40, 100))
    first = fresh(model, tokens, 5)[0][0].item()
    out = SharedPrefix(model, "cpu").generate(tokens, 5, eos_id=first)
    assert out.tolist() == [first]
