"""eval_ppl.py and eval_passkey.py as specifications of the paper's protocols (Figure 2b, Table 1):
sliding windows that score every token once, perplexity equal to transformers' own loop, prompts
exactly as long as asked, the KV cache changing nothing, resumable result files, and one-sentence
errors. Tiny random models with a byte-level tokenizer, CPU, seconds."""

import argparse
import json
import math
import os
import random
import re
import subprocess
import sys

import pytest
import torch
from transformers import LlamaForCausalLM

import eval_passkey
import eval_ppl
import rope
from eval_passkey import INTRO, KEY_LINE, QUESTION, TOLERANCE, make_trial
from eval_ppl import windows
from machinery.evaluation import parse_scaling
from model import ModelArgs, Transformer
from machinery.tokenizer import SMOLLM2, resolve
from conftest import byte_tokenizer
from machinery.tokenizer import load_tokenizer

YARN2 = {"rope_type": "yarn", "factor": 2.0}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2-layer model (Lo = 256) with sharp attention, saved as a Hugging Face directory."""
    torch.manual_seed(0)
    model = Transformer(
        ModelArgs(
            dim=64,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            vocab_size=258,
            hidden_dim=128,
            max_seq_len=256,
            rope_theta=10000.0,
        )
    )
    with torch.no_grad():
        model.tok_embeddings.weight.normal_(0, 0.3)
        model.output.weight.normal_(0, 0.3)
        # sharp, strong attention, so positions and context change the predictions
        for layer in model.layers:
            for weight, scale in (
                (layer.attention.wq.weight, 8),
                (layer.attention.wk.weight, 8),
                (layer.attention.wv.weight, 3),
                (layer.attention.wo.weight, 3),
            ):
                weight.mul_(scale)
    directory = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(directory, tokenizer=byte_tokenizer(add_bos=True))
    return directory


def documents(path):
    """Pseudo-English documents of 1500, 300 (too short for --min_tokens 600), 900 and 1100 bytes,
    as .jsonl."""
    rng = random.Random(0)
    words = (
        "the grass is green and sky blue sun yellow here we go there back again pass key".split()
    )
    texts = [" ".join(rng.choice(words) for _ in range(n))[:n] for n in (1500, 300, 900, 1100)]
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path, texts


# ---- sliding windows -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n,length,stride",
    [
        (1000, 256, 128),
        (1000, 256, 255),
        (1000, 256, 1),
        (1000, 256, 100),
        (100, 256, 128),
        (256, 256, 128),
        (257, 256, 128),
        (5000, 2048, 1024),
        (2, 4, 1),
        (32768, 16384, 1024),
    ],
)
def test_every_token_after_the_first_is_scored_exactly_once(n, length, stride):
    spans = windows(n, length, stride)
    scored = [t for _, end, first in spans for t in range(first, end)]
    assert scored == list(range(1, n))  # once each, in order, and never token 0
    for i, (begin, end, first) in enumerate(spans):
        # a target sees ids[begin:target]
        assert 0 <= begin < first <= end <= n and end - begin <= length
        assert begin == i * stride
        if i > 0:
            # every later target has ≥ L − stride tokens of context
            assert first - begin >= length - stride
    assert spans[-1][1] == n


def test_a_stride_not_below_the_window_is_refused():
    with pytest.raises(ValueError, match="first token would go unscored"):
        windows(1000, 256, 256)


# ---- perplexity ----------------------------------------------------------------------------------


def transformers_ppl(model, docs, length, stride, bos=None):
    """The Hugging Face perplexity guide's loop (labels = -100 before the new tokens), summed over
    documents; with `bos`, the authors' loop (YaRN's compute_perplexity): BOS + L − 1 tokens a
    window, token 0 scored from BOS."""
    lead = [] if bos is None else [bos]
    nll, count = 0.0, 0
    for ids in docs:
        ids, previous_end = torch.tensor(ids), 0
        for begin in range(0, len(ids), stride):
            end = min(begin + length - len(lead), len(ids))
            inputs = torch.cat([torch.tensor(lead, dtype=ids.dtype), ids[begin:end]])[None]
            labels = inputs.clone()
            labels[:, : -(end - previous_end)] = -100
            with torch.no_grad():
                loss = model(inputs, labels=labels).loss  # mean over the labels after the shift
            valid = (labels[:, 1:] != -100).sum().item()
            nll, count = nll + loss.item() * valid, count + valid
            previous_end = end
            if end == len(ids):
                break
    return math.exp(nll / count)


@pytest.mark.parametrize("scaling", [None, YARN2], ids=["none", "yarn2"])
def test_perplexity_equals_transformers_and_is_token_weighted(tiny, tmp_path, scaling):
    data, texts = documents(tmp_path / "docs.jsonl")
    flags = ["--rope_scaling", json.dumps(scaling)] if scaling else []
    results = eval_ppl.main(
        [
            "--model",
            str(tiny),
            "--data",
            str(data),
            "--lengths",
            "256,512",
            "--stride",
            "128",
            "--min_tokens",
            "600",
            "--docs",
            "3",
            "--out",
            str(tmp_path / "ppl.json"),
            *flags,
        ]
    )
    tokenizer = byte_tokenizer(add_bos=True)
    # the 300-byte one is skipped
    docs = [tokenizer.encode(t) for t in texts if len(tokenizer.encode(t)) >= 600][:3]
    exported = tmp_path / "exported"  # the scaling as transformers reads it from config.json
    Transformer.from_pretrained(tiny, rope_scaling=scaling).save_pretrained(exported)
    theirs = LlamaForCausalLM.from_pretrained(exported).eval()
    for length in (256, 512):
        r = results["lengths"][str(length)]
        assert r["ppl"] == pytest.approx(transformers_ppl(theirs, docs, length, 128), rel=1e-3)
        assert r["scored_tokens"] == sum(len(d) - 1 for d in docs)
        assert [d["tokens"] for d in r["documents"]] == [len(d) for d in docs]
        assert r["ppl"] == pytest.approx(
            math.exp(sum(d["nll"] for d in r["documents"]) / r["scored_tokens"])
        )
        mean_of_documents = sum(d["ppl"] for d in r["documents"]) / len(docs)
        # token-weighted, not averaged: they differ
        assert abs(mean_of_documents - r["ppl"]) > 1e-3 * r["ppl"]
    ppl = [results["lengths"][n]["ppl"] for n in ("256", "512")]
    # context matters to this model, so the checks above have teeth
    assert abs(ppl[0] - ppl[1]) > 1e-2 * ppl[0]


def reference(tiny, rope_parameters, max_position_embeddings=256):
    """transformers' model of the tiny checkpoint with RoPE set here, from the test's own reading of
    each scaling."""
    from transformers import LlamaConfig

    config = LlamaConfig.from_pretrained(tiny)
    config.rope_parameters, config.max_position_embeddings = (
        rope_parameters,
        max_position_embeddings,
    )
    return LlamaForCausalLM.from_pretrained(tiny, config=config).eval()


@pytest.mark.parametrize("flag", ["yarn:2", "ntk:2", "dynamic:2", "linear:2", "none"])
def test_rope_scaling_type_factor_reaches_the_model(tiny, tmp_path, flag):
    """--rope_scaling TYPE:FACTOR end to end: the perplexity equals transformers' with that scaling
    on Lo = 256."""
    d = 16  # head dim of the tiny model
    expected = {
        "yarn:2": (
            {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 256},
            512,
        ),
        "ntk:2": ({"rope_type": "default", "rope_theta": 10000.0 * 2 ** (d / (d - 2))}, 256),
        "dynamic:2": ({"rope_type": "dynamic", "factor": 2.0}, 256),
        "linear:2": ({"rope_type": "linear", "factor": 2.0}, 512),
        "none": ({"rope_type": "default"}, 256),
    }[flag]
    data, texts = documents(tmp_path / "docs.jsonl")
    results = eval_ppl.main(
        [
            "--model",
            str(tiny),
            "--data",
            str(data),
            "--lengths",
            "512",
            "--stride",
            "256",
            "--min_tokens",
            "600",
            "--docs",
            "1",
            "--rope_scaling",
            flag,
            "--out",
            str(tmp_path / "ppl.json"),
            "--max_tokens",
            "1024",
        ]
    )
    theirs = reference(tiny, {"rope_theta": 10000.0, **expected[0]}, expected[1])
    tokenizer = byte_tokenizer(add_bos=True)
    # 1024 tokens: every window is 512 long (transformers' dynamic NTK keeps the frequencies of the
    # longest input seen so far, ours those of the window at hand; they agree when the windows are
    # alike)
    docs = [tokenizer.encode(t)[:1024] for t in texts if len(tokenizer.encode(t)) >= 600][:1]
    assert results["lengths"]["512"]["ppl"] == pytest.approx(
        transformers_ppl(theirs, docs, 512, 256), rel=1e-4
    )
    if flag != "none":  # and the scaling mattered: the plain model scores otherwise
        plain = transformers_ppl(
            reference(tiny, {"rope_theta": 10000.0, "rope_type": "default"}), docs, 512, 256
        )
        assert results["lengths"]["512"]["ppl"] != pytest.approx(plain, rel=1e-3)


def test_bos_before_every_window_is_the_authors_protocol(tiny, tmp_path):
    data, texts = documents(tmp_path / "docs.jsonl")
    argv = [
        "--model",
        str(tiny),
        "--data",
        str(data),
        "--lengths",
        "256",
        "--stride",
        "128",
        "--min_tokens",
        "600",
        "--docs",
        "2",
    ]
    with_bos = eval_ppl.main([*argv, "--bos_each_window", "--out", str(tmp_path / "bos.json")])[
        "lengths"
    ]["256"]
    plain = eval_ppl.main([*argv, "--out", str(tmp_path / "plain.json")])["lengths"]["256"]
    tokenizer = byte_tokenizer(add_bos=True)
    docs = [tokenizer.encode(t, bos=False) for t in texts if len(tokenizer.encode(t)) >= 600][:2]
    theirs = LlamaForCausalLM.from_pretrained(tiny).eval()
    assert with_bos["ppl"] == pytest.approx(
        transformers_ppl(theirs, docs, 256, 128, bos=256), rel=1e-4
    )
    assert with_bos["scored_tokens"] == sum(map(len, docs))  # every token, the first one from BOS
    # the tokenizer's own BOS + every token after it
    assert plain["scored_tokens"] == sum(map(len, docs))
    assert with_bos["ppl"] != pytest.approx(plain["ppl"], rel=1e-3)


def test_gpu_evaluation_defaults_to_bf16_and_fp32_gqa_copies_the_kv_heads(monkeypatch):
    from machinery.evaluation import default_device_and_dtype
    from model import attend, sdpa_plan

    assert default_device_and_dtype("cuda:1", None) == ("cuda:1", "bf16")
    assert default_device_and_dtype("cpu", None) == ("cpu", "fp32")
    assert default_device_and_dtype("cuda", "fp32") == ("cuda", "fp32")
    assert (
        sdpa_plan("cuda", torch.float32, 9, 9, True)[0]
        and not sdpa_plan("cuda", torch.bfloat16, 9, 9, True)[0]
    )
    # the CPU flash kernel takes enable_gqa in fp32
    assert not sdpa_plan("cpu", torch.float32, 9, 9, True)[0]
    q, k, v = torch.randn(1, 9, 4, 8), torch.randn(1, 9, 2, 8), torch.randn(1, 9, 2, 8)
    shared = attend(q, k, v)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    # the CUDA fp32 path, run on the CPU
    monkeypatch.setattr("model.sdpa_plan", lambda *a: (True, "causal"))
    monkeypatch.setattr(
        torch.nn.functional,
        "scaled_dot_product_attention",
        lambda *a, **k: calls.append(k.get("enable_gqa")) or sdpa(*a, **k),
    )
    torch.testing.assert_close(attend(q, k, v), shared)
    assert calls == [False]


def test_truncation_is_explicit(tiny, tmp_path, capsys):
    data, _ = documents(tmp_path / "docs.jsonl")
    results = eval_ppl.main(
        [
            "--model",
            str(tiny),
            "--data",
            str(data),
            "--lengths",
            "256",
            "--stride",
            "128",
            "--docs",
            "2",
            "--max_tokens",
            "700",
            "--min_tokens",
            "600",
            "--out",
            str(tmp_path / "p.json"),
        ]
    )
    assert "truncated to their first 700 tokens" in capsys.readouterr().out
    assert [d["tokens"] for d in results["lengths"]["256"]["documents"]] == [700, 700]


def test_a_prepared_corpus_gives_the_perplexity_of_the_raw_file(tiny, tmp_path):
    from machinery import prepare

    data, _ = documents(tmp_path / "docs.jsonl")
    prepare.prepare([data], byte_tokenizer(add_bos=True), tmp_path / "corpus", workers=2)
    common = [
        "--model",
        str(tiny),
        "--lengths",
        "256",
        "--stride",
        "128",
        "--min_tokens",
        "600",
        "--docs",
        "3",
    ]
    raw = eval_ppl.main([*common, "--data", str(data), "--out", str(tmp_path / "raw.json")])
    prepared = eval_ppl.main(
        [*common, "--data", str(tmp_path / "corpus"), "--out", str(tmp_path / "p.json")]
    )
    documents_of = [r["lengths"]["256"]["documents"] for r in (raw, prepared)]
    assert documents_of[0] == documents_of[1] and len(documents_of[0]) == 3


# ---- passkey prompts -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return load_tokenizer(resolve(SMOLLM2))


@pytest.mark.parametrize("length", [100, 333, 1000, 4096, 32768])
@pytest.mark.parametrize("which", ["bytes", "smollm2"])
def test_prompt_length_is_exact_in_the_models_tokens(which, length, smollm2_tokenizer):
    tokenizer = byte_tokenizer(add_bos=True) if which == "bytes" else smollm2_tokenizer
    if which == "bytes" and length == 100:
        length = 400  # the template alone is ~300 bytes
    for trial in range(3):
        t = make_trial(tokenizer, length, trial)
        assert t["prompt_tokens"] == len(tokenizer.encode(t["prompt"])) == len(t["tokens"])
        # ≤ 2 tokens per word
        assert 0 <= length - t["prompt_tokens"] <= (1 if which == "smollm2" else TOLERANCE)


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_the_key_has_five_digits_and_sits_at_the_requested_depth(depth, smollm2_tokenizer):
    tok = smollm2_tokenizer
    t = make_trial(tok, 4096, trial=0, seed=1, depths=[depth])
    key, prompt = t["key"], t["prompt"]
    assert 10000 <= key <= 99999 and re.fullmatch(r"\d{5}", str(key))
    key_line = KEY_LINE.format(key=key)
    assert (
        prompt.startswith(INTRO + "\n")
        and prompt.endswith("\n" + QUESTION)
        and prompt.count(key_line) == 1
    )
    before, after = prompt.split(key_line)
    n_before, n_after = (
        len(before.split()) - len(INTRO.split()),
        len(after.split()) - len(QUESTION.split()),
    )
    assert abs(n_before - depth * (n_before + n_after)) <= 0.5  # in filler words
    template = len(tok.encode(INTRO + "\n" + key_line + "\n" + QUESTION))
    filler_tokens_before = t["key_token"] - len(tok.encode(INTRO + "\n"))
    # in tokens too
    assert abs(filler_tokens_before / (t["prompt_tokens"] - template) - depth) < 0.01
    if depth == 1.0:
        assert prompt.endswith(key_line + "\n" + QUESTION)
    if depth == 0.0:
        assert prompt.startswith(INTRO + "\n" + key_line)


def test_max_key_distance_keeps_the_key_close_to_the_question(smollm2_tokenizer):
    for trial in range(10):
        t = make_trial(smollm2_tokenizer, 2048, trial, max_key_distance=40)
        after = t["prompt"].split(KEY_LINE.format(key=t["key"]))[1].removesuffix(QUESTION).strip()
        assert len(smollm2_tokenizer.encode(after, bos=False)) <= 40 and t["depth"] > 0.9


def test_max_key_distance_longer_than_the_prompt_leaves_room_for_the_rest(smollm2_tokenizer):
    """At a length the template nearly fills, the distance is capped by what fits, and every trial
    fits exactly."""
    for trial in range(20):
        t = make_trial(smollm2_tokenizer, 200, trial, max_key_distance=190)
        after = t["prompt"].split(KEY_LINE.format(key=t["key"]))[1].removesuffix(QUESTION).strip()
        assert (
            len(smollm2_tokenizer.encode(after, bos=False)) <= 190
            and 200 - TOLERANCE <= t["prompt_tokens"] <= 200
        )


def test_a_depth_sweep_cycles_through_the_depths(tiny, tmp_path):
    out = eval_passkey.main(
        [
            "--model",
            str(tiny),
            "--lengths",
            "400",
            "--trials",
            "6",
            "--depths",
            "0,0.5,1",
            "--out",
            str(tmp_path / "sweep.json"),
            "--plot",
            str(tmp_path / "sweep.png"),
        ]
    )
    trials = out["lengths"]["400"]["trials"]
    assert [t["depth"] for t in trials] == [0, 0.5, 1] * 2 and (
        tmp_path / "sweep.png"
    ).stat().st_size > 0
    assert all(400 - TOLERANCE <= t["prompt_tokens"] <= 400 for t in trials)


def test_trials_are_reproducible_from_the_seed(smollm2_tokenizer):
    a, b = (
        make_trial(smollm2_tokenizer, 1000, 3, seed=7),
        make_trial(smollm2_tokenizer, 1000, 3, seed=7),
    )
    assert a == b
    keys = {make_trial(smollm2_tokenizer, 1000, i, seed=7)["key"] for i in range(10)}
    assert len(keys) == 10


def test_kv_cache_answers_equal_full_recomputation(tiny):
    model = Transformer.from_pretrained(tiny)
    for trial in range(3):
        tokens = torch.tensor([make_trial(byte_tokenizer(add_bos=True), 500, trial)["tokens"]])
        cached = model.generate(tokens, eval_passkey.MAX_NEW_TOKENS)
        sequence = tokens
        # greedy, no cache: the whole sequence again for each token
        for _ in range(eval_passkey.MAX_NEW_TOKENS):
            with torch.no_grad():
                sequence = torch.cat([sequence, model(sequence)[:, -1:].argmax(-1)], dim=1)
        assert torch.equal(cached, sequence[:, tokens.shape[1] :])


# ---- result files --------------------------------------------------------------------------------


def test_a_rerun_skips_finished_lengths_and_refuses_other_settings(tiny, tmp_path, monkeypatch):
    out, plot = tmp_path / "passkey.json", tmp_path / "passkey.png"
    base = ["--model", str(tiny), "--trials", "3", "--out", str(out)]
    first = eval_passkey.main([*base, "--lengths", "400"])
    assert [t["trial"] for t in first["lengths"]["400"]["trials"]] == [0, 1, 2]
    calls = []
    run_trial = eval_passkey.run_trial
    monkeypatch.setattr(
        eval_passkey,
        "run_trial",
        lambda *a, **k: calls.append(a[2]["length"]) or run_trial(*a, **k),
    )
    second = eval_passkey.main([*base, "--lengths", "400,500", "--plot", str(plot)])
    assert calls == [500] * 3 and second["lengths"]["400"] == first["lengths"]["400"]
    assert json.loads(out.read_text()) == second and plot.stat().st_size > 0
    with pytest.raises(SystemExit, match="other settings \\(trials differ\\)"):
        eval_passkey.main([*base[:-3], "4", "--out", str(out), "--lengths", "400"])
    assert (
        eval_passkey.main([*base[:-3], "4", "--out", str(out), "--lengths", "400", "--overwrite"])[
            "config"
        ]["trials"]
        == 4
    )


def test_a_results_file_without_a_newer_default_setting_is_resumed(tiny, tmp_path):
    """A file written before a flag existed (the flag now at its default, None) holds the same
    settings: it is resumed, not refused with an empty list of differences."""
    out = tmp_path / "passkey.json"
    base = ["--model", str(tiny), "--trials", "2", "--out", str(out)]
    first = eval_passkey.main([*base, "--lengths", "400"])
    older = json.loads(out.read_text())
    del older["config"]["context_len"]
    out.write_text(json.dumps(older))
    second = eval_passkey.main([*base, "--lengths", "400"])
    assert second["lengths"]["400"] == first["lengths"]["400"]
    assert second["config"]["context_len"] is None


def bad_runs(tiny, tmp_path):
    data, _ = documents(tmp_path / "docs.jsonl")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    (tmp_path / "notes.json").write_text("[1, 2]")
    ppl = ["--data", str(data), "--stride", "128", "--out", str(tmp_path / "ppl.json")]
    return {
        "a length shorter than the template": (
            eval_passkey,
            ["--model", str(tiny), "--lengths", "100,400", "--out", str(tmp_path / "x.json")],
            "shorter than the prompt without filler",
        ),
        "no document long enough": (
            eval_ppl,
            ["--model", str(tiny), "--lengths", "256", "--min_tokens", "5000", *ppl],
            "none of the 4 documents has ≥ 5000 tokens \\(the longest has 1501\\)",
        ),
        "a model that does not load": (
            eval_ppl,
            ["--model", str(broken), "--lengths", "256", *ppl],
            "could not load the model",
        ),
        "a missing model": (
            eval_passkey,
            [
                "--model",
                str(tmp_path / "nothing"),
                "--lengths",
                "400",
                "--out",
                str(tmp_path / "x.json"),
            ],
            "could not load the model",
        ),
        "a stride as long as a window": (
            eval_ppl,
            ["--model", str(tiny), "--lengths", "128,256", *ppl],
            "smaller than every length",
        ),
        "an --out that is not a results file": (
            eval_ppl,
            ["--model", str(tiny), "--lengths", "256", *ppl[:-1], str(tmp_path / "notes.json")],
            "not a results file",
        ),
        "a missing data path": (
            eval_ppl,
            [
                "--model",
                str(tiny),
                "--lengths",
                "256",
                "--data",
                str(tmp_path / "none.jsonl"),
                *ppl[2:],
            ],
            "does not exist",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "a length shorter than the template",
        "no document long enough",
        "a model that does not load",
        "a missing model",
        "a stride as long as a window",
        "an --out that is not a results file",
        "a missing data path",
    ],
)
def test_bad_input_is_one_sentence_and_a_nonzero_exit(case, tiny, tmp_path):
    script, argv, message = bad_runs(tiny, tmp_path)[case]
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    text = str(exit_info.value.code)
    assert text.startswith("error: ") and "\n" not in text and re.search(message, text), text


def test_the_command_line_prints_no_traceback(tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            "eval_ppl.py",
            "--model",
            str(tmp_path / "missing"),
            "--data",
            str(tmp_path),
            "--lengths",
            "2048",
            "--out",
            str(tmp_path / "o.json"),
        ],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert (
        run.returncode != 0 and "Traceback" not in run.stderr and run.stderr.startswith("error: ")
    )


@pytest.mark.slow  # torchrun, two processes
def test_two_ranks_give_the_single_process_results(tiny, tmp_path):
    """torchrun: documents split across ranks (gloo), gathered on rank 0, the same numbers and file
    as one process."""
    data, _ = documents(tmp_path / "docs.jsonl")
    argv = [
        "--model",
        str(tiny),
        "--data",
        str(data),
        "--lengths",
        "256",
        "--stride",
        "128",
        "--min_tokens",
        "600",
    ]
    alone = eval_ppl.main([*argv, "--out", str(tmp_path / "one.json")])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "eval_ppl.py",
            *argv,
            "--out",
            str(tmp_path / "two.json"),
        ],
        capture_output=True,
        text=True,
        cwd=root,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr
    two = json.loads((tmp_path / "two.json").read_text())["lengths"]["256"]
    assert (
        two["world_size"] == 2 and two["scored_tokens"] == alone["lengths"]["256"]["scored_tokens"]
    )
    assert two["ppl"] == pytest.approx(alone["lengths"]["256"]["ppl"], rel=1e-6)
    assert [d["index"] for d in two["documents"]] == [0, 1, 2]


def test_the_rope_scaling_flag_takes_every_name_in_rope_scalings_and_names_them_when_wrong():
    for name in rope.SCALINGS:
        assert parse_scaling(f"{name}:2") == {"rope_type": name, "factor": 2.0}
    assert parse_scaling("none") is None
    for wrong in ("turbo:2", "yarn:x", "yarn"):
        with pytest.raises(argparse.ArgumentTypeError, match=", ".join(rope.SCALINGS)):
            parse_scaling(wrong)
