"""A newcomer's first hour: every value that cannot work is one sentence and leaves nothing behind,
Ctrl-C and SIGTERM end a run with one line and a way on, files get the user's permissions, and
--help only helps."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import eval_ppl
import train
import test_train

ROOT = Path(__file__).resolve().parent.parent


tiny = test_train.tiny  # the fixture: a 2-layer model with Lo = 32, six documents
args = test_train.argv  # its run: 4 steps of 4 examples, Lc = 32 -> Lt = 128


BAD_TRAINING = {  # flags -> what the one sentence must say
    "--batch_size 0": "--batch_size 0 cannot work",
    "--micro_batch_size 0": "--micro_batch_size 0 cannot work",
    "--lr -1": "--lr -1.0 cannot work",
    "--lr nan": "--lr nan cannot work",
    "--warmup -1": "--warmup -1 cannot work",
    "--grad_clip 0": "--grad_clip 0.0 cannot work",
    "--chunks 0": "--chunks 0 cannot work",
    "--train_len 0": "--train_len 0 cannot work",
    "--target_len 1": "--target_len 1 cannot work",
    "--save_every -5": "--save_every -5 cannot work",
    "--timeout 0": "--timeout 0.0 cannot work",
    "--steps 0": "--steps 0 cannot work",
    "--data nowhere": "does not exist",
}


@pytest.mark.parametrize("flags", BAD_TRAINING)
def test_a_value_that_cannot_work_is_one_sentence_and_creates_nothing(
    flags, tiny, tmp_path, capsys
):
    out = tmp_path / "run"
    extra = flags.split()
    if extra[0] == "--data":
        extra[1] = str(tmp_path / extra[1])
    with pytest.raises(SystemExit) as e:
        train.main(args(tiny, out) + extra)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert e.value.code == 1 and len(errors) == 1 and BAD_TRAINING[flags] in errors[0], errors
    assert not out.exists(), "a refused run left its --out folder behind"


def test_an_out_that_is_a_file_is_refused_and_kept(tiny, tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    with pytest.raises(SystemExit):
        train.main(args(tiny, out))
    assert "is a file; give a directory" in capsys.readouterr().err and out.read_text() == "mine"


def test_a_model_name_that_is_almost_right_is_suggested(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(["--model", "smollm", *args(tiny, tmp_path / "run")[2:]])
    assert "(did you mean 'smollm2'?)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(args(tiny, tmp_path / "run", "--method", "poes"))
    assert "did you mean 'pose'?" in capsys.readouterr().err


def test_a_finished_run_asked_for_more_steps_says_how_to_go_on(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(args(tiny, out))
    with pytest.raises(SystemExit):
        train.main(args(tiny, out, "--resume", "--steps", "8"))
    err = capsys.readouterr().err
    assert "finished all 4 of its steps" in err and f"--model {out / 'final'}" in err


def test_every_file_a_run_writes_has_the_users_permissions(tiny, tmp_path):
    """safetensors writes 0600; the export, checkpoint and log follow the umask (0644 under 022)."""
    old = os.umask(0o022)
    try:
        train.main(args(tiny, tmp_path / "run"))
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in files)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {
        p.name: "0o644" for p in files
    }


def test_eval_ppl_names_a_missing_path_once(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        eval_ppl.main(
            [
                "--model",
                str(tiny / "base"),
                "--data",
                str(tmp_path / "nope.txt"),
                "--lengths",
                "64",
                "--stride",
                "32",
                "--out",
                str(tmp_path / "r.json"),
            ]
        )
    assert str(e.value.code).count("nope.txt") == 1 and not (tmp_path / "r.json").exists()


def started(command, tmp_path, wait_for, timeout=120):
    """A subprocess whose stderr goes to a file, once `wait_for` (a path) exists."""
    err = open(tmp_path / "stderr.txt", "w")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
    }  # tiny tensors: a second thread only spins under load
    process = subprocess.Popen(
        [sys.executable, *command], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, env=env
    )
    deadline = time.time() + timeout
    while not wait_for() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert wait_for(), (tmp_path / "stderr.txt").read_text()
    return process


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_run_says_where_it_stands_and_the_command_resumes_it(
    signum, code, tiny, tmp_path
):
    out = tmp_path / "run"
    command = ["train.py", *args(tiny, out, "--steps", "1000", "--save_every", "2")]
    process = started(command, tmp_path, lambda: (out / "checkpoint.pt").exists())
    process.send_signal(signum)
    assert process.wait(timeout=60) == code
    err = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    line = next(line for line in err.splitlines() if line.startswith("interrupted"))
    assert f"{out / 'checkpoint.pt'} (step" in line and "is the last complete checkpoint" in line, (
        line
    )
    again = line.split("continue with: python ")[1].split(" (torchrun")[0].split()
    assert again[0] == "train.py" and again[-1] == "--resume"
    assert train.parse_args(again[1:]) == train.parse_args(
        command[1:] + ["--resume"]
    )  # the same run
    done = json.loads((out / "log.jsonl").read_text().splitlines()[-1])["step"]

    def further():
        return json.loads((out / "log.jsonl").read_text().splitlines()[-1])["step"] > done + 2

    process = started(again, tmp_path, further)  # the printed command, as printed: it continues
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 143
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))  # continued where it stood, not started again


@pytest.mark.slow
def test_an_interrupted_evaluation_keeps_finished_lengths_and_a_rerun_continues(tiny, tmp_path):
    out = tmp_path / "ppl.json"
    (tmp_path / "doc.txt").write_text(" ".join(["the grass is green"] * 300))  # 5,700 byte tokens
    command = [
        "eval_ppl.py",
        "--model",
        str(tiny / "base"),
        "--data",
        str(tmp_path / "doc.txt"),
        "--stride",
        "16",
        "--lengths",
        "32,64,96,128",
        "--out",
        str(out),
    ]

    def one_length():
        try:
            return len(json.loads(out.read_text())["lengths"]) >= 1
        except (OSError, ValueError):
            return False

    process = started(command, tmp_path, one_length)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130
    err = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in err and "keeps every finished length" in err, err
    kept = json.loads(out.read_text())["lengths"]
    rerun = subprocess.run(
        [sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr
    assert f"already holds lengths {[int(n) for n in kept]}" in rerun.stdout
    assert len(json.loads(out.read_text())["lengths"]) == 4


HELP = [
    ["train.py"],
    ["eval_ppl.py"],
    ["eval_passkey.py"],
    ["-m", "machinery.prepare"],
    ["-m", "machinery.texts"],
    ["-m", "machinery.tokenizer"],
    ["demo/run.py"],
    ["demo/real.py"],
    ["demo/build_base.py"],
    ["demo/generate.py"],
    ["demo/figure1.py"],
    ["demo/wavelengths.py"],
    ["demo/probe_base.py"],
]


@pytest.mark.slow
@pytest.mark.parametrize("entry", HELP, ids=" ".join)
def test_help_prints_help_and_does_nothing_else(entry, tmp_path):
    env = {**os.environ, "POSE_DATA_DIR": str(tmp_path / "data")}
    run = subprocess.run(
        [sys.executable, *[str(ROOT / e) if e.endswith(".py") else e for e in entry], "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert run.returncode == 0 and "usage:" in run.stdout, run.stderr
    assert list(tmp_path.iterdir()) == [], "--help wrote files"


@pytest.mark.parametrize("flags", [["--workers", "0"], ["--commit_seconds", "0"]])
def test_prepare_refuses_a_value_that_cannot_work_and_creates_nothing(flags, tiny, tmp_path):
    from machinery import prepare

    out = tmp_path / "corpus"
    with pytest.raises(SystemExit) as e:
        prepare.main(["--data", str(tiny / "data"), "--tokenizer", str(tiny / "base"), "--out",
                      str(out), *flags])
    assert "cannot work" in str(e.value.code) and not out.exists()
    assert not out.with_name("corpus.partial").exists()


def test_a_refused_resume_creates_nothing(tiny, tmp_path, capsys):
    out = tmp_path / "new"
    with pytest.raises(SystemExit):
        train.main(args(tiny, out, "--resume"))
    assert "holds no checkpoint" in capsys.readouterr().err and not out.exists()


def test_an_interrupt_before_an_overwrite_run_saves_offers_no_other_runs_checkpoint(
    tiny, tmp_path, monkeypatch, capsys
):
    """The checkpoint left by another run (other settings) in --out is not offered for --resume."""
    from machinery import ranks

    out = tmp_path / "run"
    train.main(args(tiny, out))  # a finished run with lr 1e-3
    capsys.readouterr()

    def interrupted(*a, **k):
        raise ranks.Interrupted(signal.SIGINT)

    monkeypatch.setattr(train, "save_checkpoint", interrupted)  # Ctrl-C before the first save
    with pytest.raises(SystemExit) as e:
        train.main(args(tiny, out, "--overwrite", "--lr", "1e-4"))
    err = capsys.readouterr().err
    assert e.value.code == 130 and "no checkpoint of this run was written yet" in err, err
    assert "--resume" not in err


def test_an_infinite_timeout_is_refused(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(args(tiny, tmp_path / "run", "--timeout", "inf"))
    assert "--timeout inf cannot work" in capsys.readouterr().err


def test_a_cut_clean_up_of_an_older_checkpoint_never_blocks_resume(tmp_path, monkeypatch):
    """After a save, an older step-N directory is renamed before it is deleted: a kill inside the
    deletion leaves step-N.tmp, which no resume reads, not a step-N without train_state.json."""
    import torch

    from machinery import checkpoint
    from model import ModelArgs, Transformer

    old = tmp_path / "checkpoints" / "step-000001"
    old.mkdir(parents=True)
    (old / "train_state.json").write_text(json.dumps({"step": 1, "config": {}}))
    model = Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=10, hidden_dim=16))
    optimizer = torch.optim.AdamW(model.parameters())
    rmtree = checkpoint.shutil.rmtree

    def killed(path, *a, **k):  # the deletion gets as far as train_state.json, then the kill
        if Path(path).exists() and not k.get("ignore_errors"):
            (Path(path) / "train_state.json").unlink()
            raise KeyboardInterrupt
        return rmtree(path, *a, **k)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(tmp_path, model, optimizer, 2, {})
    assert checkpoint.find_checkpoint(tmp_path) == tmp_path / "checkpoint.pt"
