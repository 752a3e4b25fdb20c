"""model.py against transformers' LlamaForCausalLM: loading every format, every scaling, PoSE
positions, the export round trip, the KV cache, and the errors users get for bad checkpoints."""

import json
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import rope
from model import ModelArgs, Transformer
from machinery.weights import interleaved_to_half

SCALINGS = {
    "none": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256,
    },
}


def hf_model(tmp_path, *, kv_heads=2, tie=False, scaling=None, seed=0, vocab=320):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        rope_parameters={"rope_theta": 10000.0, **(scaling or {"rope_type": "default"})},
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # away from 1, so a mixed-up norm weight cannot pass
                p.uniform_(0.5, 1.5)
            # sharp attention, so positions matter to the logits
            if "q_proj" in name or "k_proj" in name:
                p.mul_(8)
    directory = tmp_path / "hf"
    model.save_pretrained(directory)
    return model, directory


def pose_positions(batch=2):
    return torch.cat([torch.arange(0, 100), torch.arange(5000, 5100)]).expand(batch, 200)


def tokens(batch=2, length=200, vocab=320, seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_same_logits(ours, theirs, position_ids=None, atol=1e-4):
    x = tokens()
    with torch.no_grad():
        expected = theirs(x, position_ids=position_ids).logits
        got = ours(x, position_ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)


@pytest.mark.parametrize("kind", list(SCALINGS))
@pytest.mark.parametrize("kv_heads,tie", [(4, False), (2, True), (1, False)])
def test_hf_directory_gives_transformers_logits(tmp_path, kind, kv_heads, tie):
    theirs, directory = hf_model(tmp_path, kv_heads=kv_heads, tie=tie, scaling=SCALINGS[kind])
    ours = Transformer.from_pretrained(directory)
    assert ours.args.rope_scaling == (
        None if kind == "none" else {"original_max_position_embeddings": 256, **SCALINGS[kind]}
    )
    assert_same_logits(ours, theirs)
    # PoSE-style jumps: 0..99 then 5000..5099 (transformers' float32 angles are ~3e-4 rad off at 5k)
    assert_same_logits(ours, theirs, pose_positions())


def test_tied_model_shares_one_matrix(tmp_path):
    _, directory = hf_model(tmp_path, tie=True)
    ours = Transformer.from_pretrained(directory)
    assert ours.output is None and "output.weight" not in ours.state_dict()


def to_meta(state, args, directory, shards=1, vocab_parallel=False):
    """Write our state dict as Meta's checkpoint: interleaved q/k rows, model-parallel shards."""
    directory.mkdir()
    meta = {}
    for name, w in state.items():
        if name.endswith(("wq.weight", "wk.weight")):
            heads = args.n_heads if "wq" in name else args.n_kv_heads
            hd = args.head_dim
            # inverse of interleaved_to_half
            w = w.view(heads, 2, hd // 2, -1).transpose(1, 2).reshape(w.shape)
        meta[name] = w
    meta["rope.freqs"] = torch.zeros(args.head_dim // 2)  # present in real Llama 1/2 files
    for rank in range(shards):
        part = {}
        for name, w in meta.items():
            if w.ndim == 1:
                part[name] = w.clone()
            else:
                split = 1 if name.endswith(("wo.weight", "w2.weight")) else 0
                if name == "tok_embeddings.weight" and not vocab_parallel:
                    split = 1
                part[name] = w.chunk(shards, dim=split)[rank].clone()
        torch.save(part, directory / f"consolidated.{rank:02d}.pth")
    params = {
        "dim": args.dim,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "n_kv_heads": args.n_kv_heads,
        "vocab_size": -1,
        "multiple_of": 32,
        "ffn_dim_multiplier": 0.57,
        "norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "max_seq_len": args.max_seq_len,
    }
    (directory / "params.json").write_text(json.dumps(params))


@pytest.mark.parametrize("shards,vocab_parallel", [(1, False), (2, False), (2, True)])
def test_meta_checkpoint_gives_transformers_logits(tmp_path, shards, vocab_parallel):
    theirs, directory = hf_model(tmp_path, kv_heads=2)
    ours = Transformer.from_pretrained(directory)
    to_meta(ours.state_dict(), ours.args, tmp_path / "meta", shards, vocab_parallel)
    from_meta = Transformer.from_pretrained(tmp_path / "meta")
    # Meta's rule: int(0.57 · int(2/3 · 4 · 64)) = 96, a multiple of 32
    assert from_meta.args.hidden_dim == 96
    assert_same_logits(from_meta, theirs, pose_positions())


def test_meta_ffn_width_rule():
    # Llama-2-7B: 4096 → 11008; Llama-3-8B: multiplier 1.3, multiple_of 1024 → 14336
    assert ModelArgs(dim=4096, multiple_of=256).hidden_dim == 11008
    assert (
        ModelArgs(dim=4096, multiple_of=1024, ffn_dim_multiplier=1.3, n_kv_heads=8).hidden_dim
        == 14336
    )


def test_use_scaled_rope_means_llama31():
    args = ModelArgs(dim=128, n_heads=2, use_scaled_rope=True, rope_theta=500000.0)
    assert args.rope_scaling == rope.llama31_scaling()


def test_interleaved_to_half_rotates_the_same_pairs():
    """Rotating interleaved pairs with permuted-back rows equals rotating halves: the permutation is
    right."""
    heads, hd, dim = 2, 8, 16
    w = torch.randn(heads * hd, dim)
    x = torch.randn(dim)
    half = (interleaved_to_half(w, heads) @ x).view(heads, hd)
    inter = (w @ x).view(heads, hd)
    # channel pair j of the interleaved layout is (2j, 2j+1); of the half layout (j, j + hd/2)
    torch.testing.assert_close(half[:, : hd // 2], inter[:, 0::2])
    torch.testing.assert_close(half[:, hd // 2 :], inter[:, 1::2])


@pytest.mark.parametrize("kind", ["linear", "yarn", "ntk", "llama3"])
def test_export_round_trip_through_transformers(tmp_path, kind):
    _, directory = hf_model(tmp_path, kv_heads=2, tie=kind == "yarn")
    scaling = {"rope_type": kind, "factor": 8.0}
    if kind == "llama3":
        scaling.update(low_freq_factor=1.0, high_freq_factor=4.0)
    ours = Transformer.from_pretrained(directory, rope_scaling=scaling)
    assert ours.args.max_seq_len == 8 * 256 and ours.args.original_max_seq_len == 256
    ours.save_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    if kind == "ntk":  # no ntk rope_type in transformers: exactly a larger base
        assert config["rope_scaling"] is None and config["rope_theta"] == pytest.approx(
            10000 * 8 ** (16 / 14)
        )
    else:
        assert config["rope_scaling"]["factor"] == 8.0
        # transformers' linear takes no Lo
        where = config if kind == "linear" else config["rope_scaling"]
        assert where["original_max_position_embeddings"] == 256
        assert config["max_position_embeddings"] == 2048
    theirs = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert_same_logits(ours, theirs, pose_positions())
    again = Transformer.from_pretrained(tmp_path / "out")
    x, pos = tokens(), pose_positions()
    with torch.no_grad():
        torch.testing.assert_close(again(x, pos), ours(x, pos), rtol=0, atol=1e-6)


def test_scaling_changes_logits_at_long_positions(tmp_path):
    """A guard for the tests above: if scaling were ignored everywhere, they would still agree."""
    _, directory = hf_model(tmp_path)
    plain = Transformer.from_pretrained(directory)
    scaled = Transformer.from_pretrained(
        directory, rope_scaling={"rope_type": "linear", "factor": 4.0}
    )
    x, pos = tokens(), pose_positions()
    with torch.no_grad():
        assert (plain(x, pos) - scaled(x, pos)).abs().max() > 0.1  # ≫ the 1e-4 tolerance above


def test_kv_cache_decoding_equals_full_recomputation(tmp_path):
    _, directory = hf_model(tmp_path, kv_heads=2)
    model = Transformer.from_pretrained(directory)
    prompt = tokens(length=40)
    generated = model.generate(prompt, 12)
    sequence = prompt
    for _ in range(12):  # no cache: recompute the whole sequence for each token
        with torch.no_grad():
            next_token = model(sequence)[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(generated, sequence[:, 40:])


def test_cache_prefill_in_pieces_equals_one_pass(tmp_path):
    _, directory = hf_model(tmp_path, kv_heads=2)
    model = Transformer.from_pretrained(directory)
    x = tokens(length=50)
    cache = model.make_cache(2, 50)
    with torch.no_grad():
        pieces = torch.cat(
            [
                model(x[:, :20], cache=cache),
                model(x[:, 20:45], cache=cache),
                model(x[:, 45:], cache=cache),
            ],
            dim=1,
        )
        whole = model(x)
    torch.testing.assert_close(pieces, whole, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_chunked_prefill_fills_the_cache_and_gives_the_logits_of_one_pass(tmp_path, kv_heads):
    """Transformer.prefill in pieces (as eval_passkey does for long prompts): every layer's keys
    and values, the last position's logits and the greedy continuation are the one-pass ones."""
    _, directory = hf_model(tmp_path, kv_heads=kv_heads)
    model = Transformer.from_pretrained(directory)
    x = tokens(length=70)
    caches = [model.make_cache(2, 70) for _ in range(2)]
    whole = model.prefill(x, caches[0])
    pieces = model.prefill(x, caches[1], chunk=16)  # 16 + 16 + 16 + 16 + 6 tokens
    for one, chunked in zip(*caches):
        assert chunked.length == one.length == 70
        torch.testing.assert_close(chunked.k, one.k, rtol=0, atol=1e-5)
        torch.testing.assert_close(chunked.v, one.v, rtol=0, atol=1e-5)
    torch.testing.assert_close(model.logits(pieces), model.logits(whole), rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model.logits(whole), model(x)[:, -1], rtol=0, atol=1e-5)
    assert torch.equal(model.generate(x, 6, prefill_chunk=16), model.generate(x, 6))


def test_loss_is_next_token_cross_entropy_with_ignored_labels(tmp_path):
    _, directory = hf_model(tmp_path)
    model = Transformer.from_pretrained(directory)
    x = tokens(length=30)
    targets = x.roll(-1, dims=1)
    targets[:, -1] = -100
    with torch.no_grad():
        logits = model(x)
        expected = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()
        )
        assert model(x, targets=targets).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_chunked_loss_equals_the_plain_cross_entropy_and_its_gradients(tmp_path, tie):
    """The targets path never builds the (B·T, vocab) logits; loss and every gradient are the plain
    computation's."""
    from loss import LOSS_CHUNK

    _, directory = hf_model(tmp_path, tie=tie)
    x = tokens(length=200)  # 400 rows: one full LOSS_CHUNK of 256 and a partial one
    targets = x.roll(-1, dims=1)
    targets[:, ::37] = -100  # ignored labels, as at PoSE chunk boundaries
    assert x.numel() > LOSS_CHUNK
    runs = []
    for chunked in (False, True):
        model = Transformer.from_pretrained(directory).train()
        if chunked:
            loss = model(x, pose_positions(), targets=targets)
        else:
            logits = model(x, pose_positions())
            loss = torch.nn.functional.cross_entropy(
                logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100
            )
        loss.backward()
        runs.append((loss.item(), {n: p.grad for n, p in model.named_parameters()}))
    (plain, plain_grads), (chunked, chunked_grads) = runs
    assert chunked == pytest.approx(plain, rel=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():  # evaluation: the same loss, no gradient work
        assert model(x, pose_positions(), targets=targets).item() == pytest.approx(plain, rel=1e-6)


def test_chunked_loss_under_bf16_autocast_matches_the_plain_one(tmp_path):
    _, directory = hf_model(tmp_path)
    model = Transformer.from_pretrained(directory).train()
    x = tokens(length=200)
    with torch.autocast("cpu", torch.bfloat16):
        chunked = model(x, targets=x)
        plain = torch.nn.functional.cross_entropy(model(x).float().flatten(0, 1), x.flatten())
    assert chunked.dtype == torch.float32
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-6)
    chunked.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    _, directory = hf_model(tmp_path)
    grads = []
    for checkpointing in (False, True):
        model = Transformer.from_pretrained(directory).train()
        model.gradient_checkpointing = checkpointing
        x = tokens(length=30)
        model(x, pose_positions()[:, :30], targets=x).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-6)


def test_bf16_is_close_to_fp32(tmp_path):
    _, directory = hf_model(tmp_path)
    fp32 = Transformer.from_pretrained(directory)
    bf16 = Transformer.from_pretrained(directory, dtype=torch.bfloat16)
    assert bf16.tok_embeddings.weight.dtype == torch.bfloat16 and bf16.theta.dtype == torch.float64
    x = tokens()
    with torch.no_grad():
        assert (bf16(x).float() - fp32(x)).abs().max() < 0.05


# ---- bad input: one sentence naming the file and what was expected -------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Transformer.from_pretrained(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(ValueError, match="neither a .gguf file nor a directory with params.json"):
        Transformer.from_pretrained(tmp_path)


def test_shape_mismatch_names_the_weight(tmp_path):
    _, directory = hf_model(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["intermediate_size"] = 128
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"feed_forward.w1.weight has shape \(96, 64\).*\(128, 64\)"
    ):
        Transformer.from_pretrained(directory)


def test_missing_weight_is_named(tmp_path):
    _, directory = hf_model(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing.*layers.2"):
        Transformer.from_pretrained(directory)


def test_missing_config_key(tmp_path):
    _, directory = hf_model(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    del config["hidden_size"]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json has no 'hidden_size'"):
        Transformer.from_pretrained(directory)


def test_truncated_safetensors(tmp_path):
    _, directory = hf_model(tmp_path)
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        Transformer.from_pretrained(directory)


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_malicious_pickle_is_refused_and_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    directory = tmp_path / "meta"
    directory.mkdir()
    (directory / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4}))
    torch.save({"tok_embeddings.weight": Exploit()}, directory / "consolidated.00.pth")
    with pytest.raises(ValueError, match="could not load 1 consolidated"):
        Transformer.from_pretrained(directory)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_unknown_params_key(tmp_path):
    directory = tmp_path / "meta"
    directory.mkdir()
    params = {"dim": 64, "n_layers": 1, "n_heads": 4, "vocab_size": 8, "bogus": 1}
    (directory / "params.json").write_text(json.dumps(params))
    torch.save({}, directory / "consolidated.00.pth")  # the settings are checked before the weights
    with pytest.raises(
        ValueError, match="params.json has keys ModelArgs does not know: \\['bogus'\\]"
    ):
        Transformer.from_pretrained(directory)


@pytest.mark.parametrize(
    "params,guess",
    [
        ({"rope_theta": 1000000.0}, 16384),  # Code Llama
        ({"norm_eps": 1e-6}, 2048),
        ({"norm_eps": 1e-5}, 4096),
        ({"rope_theta": 500000.0}, 8192),
    ],
)
def test_meta_context_is_a_guess_said_out_loud_and_the_user_can_state_it(
    tmp_path, capsys, params, guess
):
    _, directory = hf_model(tmp_path, kv_heads=2)
    ours = Transformer.from_pretrained(directory)
    to_meta(ours.state_dict(), ours.args, tmp_path / "meta")
    written = json.loads((tmp_path / "meta" / "params.json").read_text())
    del written["max_seq_len"]  # as in Meta's own downloads
    (tmp_path / "meta" / "params.json").write_text(json.dumps({**written, **params}))
    assert Transformer.from_pretrained(tmp_path / "meta").args.max_seq_len == guess
    err = capsys.readouterr().err
    assert f"guessed {guess} tokens" in err and "pass --context_len if wrong" in err
    assert Transformer.from_pretrained(tmp_path / "meta", context_len=4096).args.max_seq_len == 4096
    with pytest.raises(ValueError, match="only for Meta checkpoints"):
        Transformer.from_pretrained(directory, context_len=4096)
