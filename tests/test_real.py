"""demo/real.py (SmolLM2-135M 8k -> 16k, hours on a CPU) kept from rotting: its first stages on the
tiny demo/base (Lo 256, Lc 64 -> Lt 512, 2 steps), the tables with the rest pending, a rerun that
skips what is done (also where only the results were kept, not the checkpoints), held-out texts
never trained on, and the reader of R data that gives the second held-out text (fetched once from
Debian into data/austen)."""

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from demo.real import HELD_OUT_PLAY, MODELS
from longrope import longrope_scaling
from machinery.texts import fetch_austen, read_r_data

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # left out by pytest -m "not slow"; make test runs it


def smoke(out, stages="4", *extra, code=0):
    command = [
        sys.executable,
        "demo/real.py",
        "--smoke",
        "--stages",
        stages,
        "--out",
        str(out),
        *extra,
    ]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == code, run.stdout + run.stderr
    return run.stdout + run.stderr


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    out = tmp_path_factory.mktemp("real")
    return out, smoke(out)


def test_first_stages_fill_their_cells_and_leave_the_rest_pending(done):
    out, _ = done
    table = json.loads((out / "results.json").read_text())
    for text in ("play", "austen"):
        for model in ("none", "pose-yarn"):
            assert sorted(table["ppl"][text][model], key=int) == ["128", "256", "512"]
        assert all(table["ppl"][text][m] == {} for m in MODELS if m not in ("none", "pose-yarn"))
    assert table["training"]["pose-yarn"]["steps"] == 2 and table["training"]["pose-yarn"]["done"]
    assert table["training"]["pose-yarn"]["tokens"] == 2 * 2 * 64
    assert sorted(table["passkey"]["pose-yarn"]) == ["256", "512"]
    assert table["training"]["noskip"] is None
    assert all(v == {} for m, v in table["passkey"].items() if m != "pose-yarn")
    assert "| noskip | pending | pending | pending |" in (out / "results.md").read_text()
    assert (out / "results.png").stat().st_size > 0


def test_a_rerun_skips_every_finished_stage(done):
    out, _ = done
    again = smoke(out)
    assert "\n$ " not in again, again  # no command was run again


def test_results_kept_without_checkpoints_are_not_trained_again(done, tmp_path):
    """What a machine that is not kept leaves behind (the results and the training logs, as
    docs/real/ holds them; no checkpoints) is enough: a model evaluated in full is not retrained."""
    out, _ = done
    kept = tmp_path / "real"
    (kept / "pose-yarn").mkdir(parents=True)
    for path in out.glob("*_*.json"):
        shutil.copy(path, kept)
    shutil.copy(out / "pose-yarn" / "log.jsonl", kept / "pose-yarn")
    again = smoke(kept)
    assert "\n$ " not in again, again
    record = json.loads((kept / "results.json").read_text())["training"]["pose-yarn"]
    assert record["done"] and record["steps"] == 2


def test_models_choose_the_stages_and_the_tables_rows(tmp_path):
    """--models none,yarn (as the runs toward 32k take a few models): their stages only, in order,
    and tables with their rows only; a name that is not a model is refused in one sentence."""
    out = smoke(tmp_path, "3", "--models", "yarn,none")
    assert [
        line.split(": ", 1)[1]
        for line in out.splitlines()
        if line.startswith("== stage") and ": " in line
    ] == ["ppl none", "passkey none", "ppl yarn"]
    table = json.loads((tmp_path / "results.json").read_text())
    assert list(table["ppl"]["play"]) == ["none", "yarn"] and table["ppl"]["play"]["yarn"]
    assert list(table["passkey"]) == ["none", "yarn"] and not table["passkey"]["yarn"]
    assert table["training"] == {}
    assert "pose-yarn" not in (tmp_path / "results.md").read_text()
    refused = smoke(tmp_path, "3", "--models", "none,pose", code=2)
    assert "unknown model 'pose'" in refused and "Traceback" not in refused


def test_a_stride_no_evaluation_accepts_is_refused_before_training(tmp_path):
    """eval_ppl refuses a stride >= its smallest length; real.py says so at once, not after the
    training."""
    command = [
        sys.executable,
        "demo/real.py",
        "--out",
        str(tmp_path / "r"),
        "--stride",
        "4096",
        "--ppl_lengths",
        "2048,8192",
    ]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (
        run.returncode == 2
        and "smaller than every --ppl_lengths (the smallest is 2048)" in run.stderr
    )
    assert "Traceback" not in run.stderr and not (tmp_path / "r").exists()


def test_held_out_texts_are_never_trained_on(done):
    out, _ = done
    train = [json.loads(line)["text"] for line in (out / "train.jsonl").read_text().splitlines()]
    for held in ("play", "austen"):
        text = (out / "held_out" / f"{held}.txt").read_text()
        assert all(text[1000:2000] not in doc for doc in train)
    play = (ROOT / "data" / "shakespeare" / HELD_OUT_PLAY).read_text()
    assert (out / "held_out" / "play.txt").read_text() == play
    assert len(train) == len(list((ROOT / "data" / "shakespeare").glob("*_gut.txt"))) - 1


def test_austen_is_pride_and_prejudice_whole():
    """janeaustenr's prideprejudice: a character vector of 13,030 lines (its documentation)."""
    lines = fetch_austen().read_text().split("\n")[:-1]
    assert len(lines) == 13030
    assert lines[0] == "PRIDE AND PREJUDICE"
    assert lines[9].startswith("It is a truth universally acknowledged")


def xdr(*parts):
    return b"".join(p if isinstance(p, bytes) else struct.pack(">i", p) for p in parts)


def test_r_reader_names_vectors_and_refuses_leftovers():
    """list(a = 1:2, b = c("x", NA)) as R 4 serializes it: version 3, the names attribute a
    pairlist tagged with the symbol `names`."""
    names = xdr(0x402, 1, 0x40009, 5, b"names", 16, 2, 0x40009, 1, b"a", 0x40009, 1, b"b", 254)
    header = xdr(3, 0x40201, 0x30500, 5, b"UTF-8")
    raw = b"X\n" + header + xdr(0x213, 2, 13, 2, 1, 2, 16, 2, 0x40009, 1, b"x", 9, -1, names)
    assert read_r_data(raw) == {"a": [1, 2], "b": ["x", None]}
    with pytest.raises(ValueError, match="left over"):
        read_r_data(raw + xdr(254))


def longrope_file(path, factor=2.0, original=256, pairs=16):
    """Per-channel factors for demo/base (head_dim 32), in transformers' longrope form."""
    long_factor = [1 + (factor - 1) * j / (pairs - 1) for j in range(pairs)]
    path.write_text(json.dumps(longrope_scaling(factor, original, long_factor)))
    return path, long_factor


def test_longrope_models_use_the_file_in_training_and_evaluation(tmp_path):
    """--models longrope,pose-longrope --longrope FILE: the training-free row evaluates the file's
    factors, PoSE trains with them (its final config carries them), and both rows fill in."""
    path, long_factor = longrope_file(tmp_path / "scaling.json")
    out = tmp_path / "r"
    log = smoke(out, "5", "--models", "none,longrope,pose-longrope", "--longrope", str(path))
    assert f"--rope_scaling {path}" in log and f"--scaling {path}" in log
    table = json.loads((out / "results.json").read_text())
    assert list(table["ppl"]["play"]) == ["none", "longrope", "pose-longrope"]
    for model in ("longrope", "pose-longrope"):
        assert sorted(table["ppl"]["play"][model], key=int) == ["128", "256", "512"]
    # beyond Lo the file's long factors are used, so the rows differ from the checkpoint's
    assert table["ppl"]["play"]["longrope"]["512"] != table["ppl"]["play"]["none"]["512"]
    config = json.loads((out / "pose-longrope" / "final" / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == "longrope"
    assert config["rope_scaling"]["long_factor"] == pytest.approx(long_factor)
    assert table["training"]["pose-longrope"]["done"]


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--models", "pose-longrope"], "--models pose-longrope needs --longrope FILE"),
        (["--models", "longrope", "--longrope", "{factor4}"], "extends by s = 4, this run by"),
        (["--models", "longrope", "--longrope", "{yarn}"], 'its rope_type is not "longrope"'),
        (["--models", "longrope", "--longrope", "{missing}"], "not a longrope scaling file"),
    ],
)
def test_a_longrope_file_that_cannot_serve_is_refused_before_anything(flags, says, tmp_path):
    files = {
        "factor4": longrope_file(tmp_path / "s4.json", factor=4.0)[0],
        "yarn": tmp_path / "yarn.json",
        "missing": tmp_path / "none.json",
    }
    yarn = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 256}
    files["yarn"].write_text(json.dumps(yarn))
    flags = [f.format(**files) if f.startswith("{") else f for f in flags]
    out = tmp_path / "r"
    refused = smoke(out, "1", *flags, code=2)
    assert says in refused and "Traceback" not in refused and not out.exists()
