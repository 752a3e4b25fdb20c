"""LongRoPE (Ding et al. 2024) as a specification: rope.py's longrope equals transformers' (Phi-3's)
inside and beyond the original window, in the table, the logits and the export; PoSE trains with
searched factors; the search (longrope.py) keeps LongRoPE's constraints, resumes, and writes factors
the other scripts take."""

import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import rope
import train
from errors import UserError
from machinery.evaluation import parse_scaling
from model import Transformer
from conftest import save_tiny_model, write_documents

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny matrices, one thread
LO = "original_max_position_embeddings"


def factors(n, top, seed):
    """n non-decreasing factors in [1, top] on LongRoPE's 0.01 grid."""
    g = torch.Generator().manual_seed(seed)
    return sorted(round(1 + (top - 1) * x, 2) for x in torch.rand(n, generator=g).tolist())


def longrope(head_dim, s, original, seed=0, **extra):
    return {
        "rope_type": "longrope",
        "factor": s,
        LO: original,
        "short_factor": factors(head_dim // 2, 1.5, seed),
        "long_factor": factors(head_dim // 2, s, seed + 1),
        **extra,
    }


def hf_inv_freq(head_dim, base, scaling, max_position_embeddings, seq_len):
    config = LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_theta": base, **scaling},
    )
    return ROPE_INIT_FUNCTIONS["longrope"](config, "cpu", seq_len=seq_len)


@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize(
    "s,base,original", [(8.0, 10000.0, 256), (2.0, 100000.0, 8192), (4.0, 500000.0, 4096)]
)
@pytest.mark.parametrize("where", ["no length", "inside", "at Lo", "just past", "far past"])
@pytest.mark.parametrize("attention", [None, 1.3])
def test_inv_freq_and_attention_factor_equal_transformers(
    head_dim, s, base, original, where, attention
):
    seq_len = {
        "no length": None,
        "inside": original // 2,
        "at Lo": original,
        "just past": original + 1,
        "far past": int(s * original),
    }[where]
    extra = {} if attention is None else {"attention_factor": attention}
    scaling = longrope(head_dim, s, original, **extra)
    ours, ours_attention = rope.inv_freq(head_dim, base, scaling, seq_len=seq_len)
    theirs, their_attention = hf_inv_freq(head_dim, base, scaling, int(s * original), seq_len)
    torch.testing.assert_close(ours, theirs.double(), rtol=1e-6, atol=0)
    assert ours_attention == pytest.approx(their_attention, rel=1e-6)
    # the long factors exactly when the current length passes Lo; the paper's temperature by default
    chosen = scaling["long_factor" if where in ("just past", "far past") else "short_factor"]
    plain, _ = rope.inv_freq(head_dim, base)
    torch.testing.assert_close(
        plain / ours, torch.tensor(chosen, dtype=torch.float64), rtol=1e-12, atol=0
    )
    assert ours_attention == (attention or math.sqrt(1 + math.log(s) / math.log(original)))


def test_factor_one_keeps_the_attention_unscaled():
    scaling = longrope(32, 1.0, 256)
    assert (
        rope.inv_freq(32, 10000.0, scaling, seq_len=300)[1]
        == 1.0
        == hf_inv_freq(32, 10000.0, scaling, 256, 300)[1]
    )


@pytest.mark.parametrize(
    "bad",
    [
        {"long_factor": [2.0] * 15},
        {"short_factor": [1.0] * 15 + [0.0]},
        {"long_factor": "2.0"},
        {"short_factor": None},
    ],
)
def test_malformed_factor_lists_are_one_sentence(bad):
    with pytest.raises(UserError, match="longrope|needs"):
        rope.inv_freq(32, 10000.0, {**longrope(32, 8.0, 256), **bad})


def hf_model(tmp_path, scaling=None, max_position_embeddings=256, seed=0):
    """A random 2-layer transformers Llama (head dim 16) saved as a directory; sharp attention, so
    positions matter."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_theta": 10000.0, **(scaling or {"rope_type": "default"})},
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(8)
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def tokens(length, seed=1):
    return torch.randint(0, 320, (2, length), generator=torch.Generator().manual_seed(seed))


# inside Lo (short factors), contiguous past it, and PoSE's jumps (0..99 then 1500..1599: long
# factors)
POSITIONS = {
    "inside": torch.arange(200),
    "past": torch.arange(400),
    "pose": torch.cat([torch.arange(100), torch.arange(1500, 1600)]),
}


def assert_same_logits(ours, theirs, atol=1e-4):
    for name, positions in POSITIONS.items():
        x, pos = tokens(len(positions)), positions.expand(2, -1)
        with torch.no_grad():
            torch.testing.assert_close(
                ours(x, pos),
                theirs(x, position_ids=pos).logits,
                rtol=0,
                atol=atol,
                msg=lambda m: f"{name}: {m}",
            )


def test_a_longrope_checkpoint_gives_transformers_logits(tmp_path):
    theirs, directory = hf_model(tmp_path, longrope(16, 8.0, 256), max_position_embeddings=2048)
    ours = Transformer.from_pretrained(directory)
    assert ours.args.rope_scaling == longrope(16, 8.0, 256) and ours.args.window == 2048
    assert_same_logits(ours, theirs)
    plain = Transformer.from_pretrained(directory, rope_scaling={"rope_type": "default"})
    x, pos = tokens(200), POSITIONS["pose"].expand(2, -1)
    with torch.no_grad():  # a guard: the factors matter beyond Lo
        assert (plain(x, pos) - ours(x, pos)).abs().max() > 0.1


def test_phi3s_config_without_a_factor_takes_transformers_default(tmp_path):
    """Phi-3 states Lo beside rope_scaling and no factor: s = max_position_embeddings / Lo, as
    transformers."""
    scaling = {k: v for k, v in longrope(16, 8.0, 256).items() if k not in ("factor", LO)}
    theirs, directory = hf_model(tmp_path, scaling, max_position_embeddings=2048)
    config = json.loads((directory / "config.json").read_text())
    config[LO] = 256
    for key in ("rope_parameters", "rope_scaling"):
        if config.get(key):
            config[key] = {k: v for k, v in config[key].items() if k not in ("factor", LO)}
    (directory / "config.json").write_text(json.dumps(config))
    theirs = LlamaForCausalLM.from_pretrained(directory).eval()
    ours = Transformer.from_pretrained(directory)
    assert ours.args.rope_scaling["factor"] == 8.0 and ours.args.original_max_seq_len == 256
    assert_same_logits(ours, theirs)


def test_export_round_trip_through_transformers(tmp_path):
    """--rope_scaling FILE.json on a plain checkpoint, saved: transformers reloads the same logits,
    and so do we."""
    _, directory = hf_model(tmp_path)
    (tmp_path / "factors.json").write_text(json.dumps(longrope(16, 8.0, 256)))
    ours = Transformer.from_pretrained(
        directory, rope_scaling=parse_scaling(str(tmp_path / "factors.json"))
    )
    assert ours.args.max_seq_len == 2048 and ours.args.original_max_seq_len == 256
    ours.save_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (
        config["rope_scaling"] == longrope(16, 8.0, 256)
        and config["max_position_embeddings"] == 2048
    )
    assert_same_logits(ours, LlamaForCausalLM.from_pretrained(tmp_path / "out").eval())
    again = Transformer.from_pretrained(tmp_path / "out")
    x, pos = tokens(200), POSITIONS["pose"].expand(2, -1)
    with torch.no_grad():
        torch.testing.assert_close(again(x, pos), ours(x, pos), rtol=0, atol=1e-6)


def test_a_generation_past_lo_rotates_every_cached_key_with_the_long_factors(tmp_path):
    """A prefill in pieces that starts inside Lo gives the logits of one pass over the whole prompt:
    the choice is made once for the cache's length, not per piece (a piece within Lo would otherwise
    cache short-factor keys beside long-factor ones)."""
    _, directory = hf_model(tmp_path, longrope(16, 8.0, 256), max_position_embeddings=2048)
    model = Transformer.from_pretrained(directory)
    x = tokens(400)
    cache = model.make_cache(2, 400)
    with torch.no_grad():
        pieces = torch.cat([model(x[:, :200], cache=cache), model(x[:, 200:], cache=cache)], dim=1)
        torch.testing.assert_close(pieces, model(x), rtol=0, atol=1e-4)


def test_longrope_is_extended_only_by_a_new_search():
    """A factor cannot rescale searched factors: extending a longrope checkpoint, or plain RoPE with
    longrope and no factor lists, is refused with a sentence that names longrope.py."""
    with pytest.raises(UserError, match="run longrope.py for 4096"):
        rope.extend(longrope(16, 8.0, 256), 2048, 4096)
    with pytest.raises(UserError, match="run longrope.py for 2048"):
        rope.extend(None, 256, 2048, "longrope")
    assert parse_scaling("longrope:8") == {
        "rope_type": "longrope",
        "factor": 8.0,
    }  # then refused by extend


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    save_tiny_model(root / "base")  # Lo = 32, head dim 8
    write_documents(root / "data")
    return root


def train_argv(tiny, out, *extra):
    return [
        "--model",
        str(tiny / "base"),
        "--data",
        str(tiny / "data"),
        "--target_len",
        "128",
        "--steps",
        "2",
        "--batch_size",
        "4",
        "--lr",
        "1e-3",
        "--warmup",
        "1",
        "--save_dtype",
        "float32",
        "--out",
        str(out),
        *extra,
    ]


def test_pose_trains_with_searched_factors_and_transformers_reloads_them(tiny, tmp_path):
    scaling = longrope(8, 4.0, 32)
    (tmp_path / "factors.json").write_text(json.dumps(scaling))
    train.main(train_argv(tiny, tmp_path / "run", "--scaling", str(tmp_path / "factors.json")))
    config = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert config["rope_scaling"] == scaling and config["max_position_embeddings"] == 128
    ours = Transformer.from_pretrained(tmp_path / "run" / "final")
    theirs = LlamaForCausalLM.from_pretrained(tmp_path / "run" / "final").eval()
    x = torch.randint(0, 258, (1, 40), generator=torch.Generator().manual_seed(0))
    for positions in (torch.arange(20), torch.cat([torch.arange(20), torch.arange(100, 120)])):
        with torch.no_grad():
            torch.testing.assert_close(
                ours(x[:, : len(positions)], positions[None]),
                theirs(x[:, : len(positions)], position_ids=positions[None]).logits,
                rtol=0,
                atol=1e-4,
            )


@pytest.mark.parametrize("case", ["other target", "other Lo", "no file", "no scaling"])
def test_train_refuses_factors_searched_for_another_extension(tiny, tmp_path, capsys, case):
    scaling = {
        "other target": longrope(8, 8.0, 32),
        "other Lo": longrope(8, 2.0, 64),
        "no file": None,
        "no scaling": {"factor": 4.0},
    }[case]
    if scaling is not None:
        (tmp_path / "factors.json").write_text(json.dumps(scaling))
    with pytest.raises(SystemExit) as e:
        train.main(train_argv(tiny, tmp_path / "run", "--scaling", str(tmp_path / "factors.json")))
    err = capsys.readouterr().err
    assert e.value.code != 0 and err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def search_argv(tiny, out, *extra):
    """A tiny search: Lo = 32 -> Lt = 128 (s = 4, head dim 8: 4 factors), 6 + 3 x 4 candidates."""
    return [
        "--model",
        str(tiny / "base"),
        "--data",
        str(tiny / "data"),
        "--target_len",
        "128",
        "--tokens",
        "192",
        "--stride",
        "64",
        "--population",
        "6",
        "--generations",
        "3",
        "--mutations",
        "2",
        "--crossovers",
        "2",
        "--parents",
        "3",
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def searched(tiny, tmp_path_factory):
    import longrope

    out = tmp_path_factory.mktemp("search")
    return longrope.main(search_argv(tiny, out)), out


def test_the_search_keeps_longropes_space_and_scores_each_vector_once(searched):
    import longrope

    state, out = searched
    candidates = state["candidates"]
    assert (
        len(candidates) == 6 + 3 * (2 + 2) and state["generation"] == 4 and len(state["best"]) == 4
    )
    vectors = [tuple(c["factors"]) for c in candidates]
    assert len(set(vectors)) == len(vectors)  # each scored once
    for factors in vectors:  # non-decreasing, in [1, s], on the 0.01 grid
        assert (
            len(factors) == 4
            and all(1 <= x <= 4 for x in factors)
            and list(factors) == sorted(factors)
        )
        assert all(abs(100 * x - round(100 * x)) < 1e-9 for x in factors)
    # seeded with PI, NTK and YaRN: the frequencies of rope.py's own scalings, as factors θ_j / θ'_j
    plain, _ = rope.inv_freq(8, 10000.0)
    for origin, kind in (("PI", "linear"), ("NTK", "ntk"), ("YaRN", "yarn")):
        theta, _ = rope.inv_freq(8, 10000.0, {"rope_type": kind, "factor": 4.0, LO: 32})
        seed = next(c for c in candidates if c["origin"] == origin)
        assert seed["generation"] == 0 and seed["factors"] == pytest.approx(
            (plain / theta).tolist(), abs=0.005
        )
    assert state["best"] == sorted(
        state["best"], reverse=True
    )  # elitist: the best never gets worse
    assert (
        state["best"][-1]
        == min(c["ppl"] for c in candidates)
        <= min(c["ppl"] for c in candidates[:3])
    )
    best = min(candidates, key=lambda c: c["ppl"])
    assert json.loads((out / "scaling.json").read_text()) == longrope.longrope_scaling(
        4.0, 32, best["factors"]
    )
    assert (out / "search.png").stat().st_size > 0


def test_the_written_factors_score_what_the_search_scored(tiny, searched):
    """scaling.json through --rope_scaling gives the model the search scored: eval_ppl's perplexity
    is its best."""
    import eval_ppl

    state, out = searched
    results = eval_ppl.main(
        [
            "--model",
            str(tiny / "base"),
            "--data",
            str(tiny / "data"),
            "--lengths",
            "128",
            "--stride",
            "64",
            "--docs",
            "1",
            "--min_tokens",
            "192",
            "--max_tokens",
            "192",
            "--rope_scaling",
            str(out / "scaling.json"),
            "--out",
            str(out / "ppl.json"),
        ]
    )
    assert results["lengths"]["128"]["ppl"] == pytest.approx(state["best"][-1], rel=1e-9)


def test_a_killed_search_resumes_to_the_same_result(tiny, searched, tmp_path, monkeypatch):
    """Killed in the middle of a generation (state written after every candidate), then rerun: the
    same candidates, scores and factors as the uninterrupted search; a half-done generation's scores
    are reused."""
    import longrope

    state, _ = searched
    scored, real = [], longrope.perplexity

    def killed_after_nine(*args):
        if len(scored) == 9:
            raise KeyboardInterrupt
        scored.append(1)
        return real(*args)

    monkeypatch.setattr(longrope, "perplexity", killed_after_nine)
    with pytest.raises(KeyboardInterrupt):
        longrope.main(search_argv(tiny, tmp_path, "--save_every", "0"))
    assert (
        len(json.loads((tmp_path / "search.json").read_text())["candidates"]) == 9
    )  # gen 1 half done
    again = []
    monkeypatch.setattr(longrope, "perplexity", lambda *args: again.append(1) or real(*args))
    resumed = longrope.main(search_argv(tiny, tmp_path))
    assert len(again) == 18 - 9  # nothing scored twice

    def scores(s):
        return [{k: v for k, v in c.items() if k != "seconds"} for c in s["candidates"]]

    assert scores(resumed) == scores(state) and resumed["best"] == state["best"]
    with pytest.raises(SystemExit, match="other settings"):
        longrope.main(search_argv(tiny, tmp_path, "--seed", "1"))


@pytest.mark.parametrize(
    "case", ["within Lo", "scaled checkpoint", "few parents", "short text", "bad state"]
)
def test_search_mistakes_are_one_sentence_and_write_nothing(tiny, tmp_path, capsys, case):
    import longrope

    model = tiny / "base"
    extra = {
        "within Lo": ["--target_len", "32"],
        "few parents": ["--parents", "1"],
        "short text": ["--tokens", "100000"],
        "scaled checkpoint": [],
        "bad state": [],
    }[case]
    if case == "scaled checkpoint":
        model = tmp_path / "scaled"
        Transformer.from_pretrained(
            tiny / "base", rope_scaling={"rope_type": "yarn", "factor": 2.0}
        ).save_pretrained(model, tokenizer=None)
        (model / "tokenizer.json").write_bytes((tiny / "base" / "tokenizer.json").read_bytes())
    if case == "bad state":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "search.json").write_text("{cut")
    argv = [
        a if a != str(tiny / "base") else str(model)
        for a in search_argv(tiny, tmp_path / "out", *extra)
    ]
    with pytest.raises(SystemExit) as e:
        longrope.main(argv)
    message = str(e.value.code)  # exit_on_user_error: sys.exit("error: ..."), status 1
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message, (
        message
    )
    assert sorted(p.name for p in (tmp_path / "out").glob("*")) == (
        ["search.json"] if case == "bad state" else []
    )


def test_each_example_takes_its_own_factors_so_micro_batches_change_nothing(tiny, tmp_path):
    """The short or long factors are chosen per sequence, by its own largest position id + 1: at Lc
    = 8, Lt = 48 from Lo = 32 some PoSE examples stay within Lo, and a micro batch of 4 trains what
    4 of 1 train (the batch's largest position, transformers' rule for a batch, would give its
    examples within Lo the long factors)."""
    import pose

    g = torch.Generator().manual_seed(0)
    within = sum(int(pose.sample(1000, 8, 48, generator=g)[1].max()) + 1 <= 32 for _ in range(400))
    assert 0.1 < within / 400 < 0.9  # both kinds of examples are common
    (tmp_path / "factors.json").write_text(json.dumps(longrope(8, 1.5, 32)))
    for name, micro in (("a", "1"), ("b", "4")):
        train.main(
            train_argv(
                tiny,
                tmp_path / name,
                "--scaling",
                str(tmp_path / "factors.json"),
                "--train_len",
                "8",
                "--target_len",
                "48",
                "--micro_batch_size",
                micro,
                "--steps",
                "3",
            )
        )
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / name / "final" / "model.safetensors") for name in ("a", "b"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5)
