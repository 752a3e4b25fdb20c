"""Reliability as a specification: a run killed anywhere resumes with nothing lost, a checkpoint is
untrusted input that never runs code, and every bad input in the catalogue of docs/RELIABILITY.md
ends in one sentence, a non-zero exit and every file as it was. Rows already covered in
test_train.py, test_eval.py and test_model.py are named in that table, not repeated here. Tiny
models, CPU fp32, one thread: the whole file takes about 80 s on a busy 2-core machine, most of it
starting processes to kill."""

import errno
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from machinery import checkpoint
import eval_passkey
import eval_ppl
import train
from errors import UserError
from conftest import WORDS, byte_tokenizer, save_tiny_model, write_documents

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# torchrun shares its rendezvous store with the workers' process group; after a restart gloo can
# read the address a killed worker left there and fail to connect (pytorch/pytorch#135712): a store
# per attempt instead
RESTARTABLE = {**ENV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
STEPS, SAVE_EVERY = 12, 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def save_model(directory, seed=0, **overrides):  # the tiny model, its tokenizer adding BOS
    return save_tiny_model(directory, seed, add_bos=True, **overrides)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """base: Lo = 32 with a 32k-row embedding (unused rows), so a checkpoint is ~25 MB and takes a
    while to write; data: six text documents of 60-800 bytes; whole: the uninterrupted run every
    resumed run must end equal to."""
    root = tmp_path_factory.mktemp("tiny")
    save_model(root / "base", vocab_size=32768, tie_word_embeddings=True)
    write_documents(root / "data")
    train.main(argv(root, root / "whole"))
    return root


def argv(tiny, out, *extra):
    return [
        "--model",
        str(tiny / "base"),
        "--data",
        str(tiny / "data"),
        "--train_len",
        "16",
        "--target_len",
        "128",
        "--steps",
        str(STEPS),
        "--batch_size",
        "2",
        "--lr",
        "1e-3",
        "--warmup",
        "2",
        "--save_every",
        str(SAVE_EVERY),
        "--peak_tflops",
        "1",
        "--save_dtype",
        "float32",
        "--out",
        str(out),
        *extra,
    ]


def losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def assert_equals_the_uninterrupted_run(tiny, out):
    assert losses(out) == losses(tiny / "whole")  # each step logged once, with the same loss
    whole, resumed = (
        load_file(tiny / "whole" / "final" / "model.safetensors"),
        load_file(out / "final" / "model.safetensors"),
    )
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(resumed[name], whole[name]), name  # bitwise: CPU fp32, one process


def checkpoint_step(out):
    """The step of OUT's newest checkpoint, after checking it is whole: checkpoint.pt (one process)
    as plain tensors, all finite; checkpoints/step-N (two ranks, DCP) with metadata and 2 files."""
    path = checkpoint.find_checkpoint(out)
    if path.is_dir():
        assert (path / ".metadata").is_file() and len(list(path.glob("*.distcp"))) == 2
        return checkpoint.read_info(path)[0]
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    return state["step"]


def logged_steps(out):
    path = out / "log.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def start(out, *args, env=ENV):
    """A script in its own process (and process group), its output in OUT/stdout.txt and
    OUT/stderr.txt."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "stdout.txt", "ab") as stdout, open(out / "stderr.txt", "ab") as stderr:
        return subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            env=env,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )


def process_tree(pid):
    """pid and all its descendants (torchrun starts each worker in a session of its own)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def kill_when(process, ready, out, after=0.0, tree=False, timeout=120):
    """SIGKILL `process` (with `tree`: all its descendants too, as a preempted node would) `after`
    seconds after ready() first holds; fails if it ended before."""
    deadline = time.monotonic() + timeout
    while not (reached := ready()) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.0002)
    time.sleep(after if reached else 0)
    for pid in process_tree(process.pid) if tree else [process.pid]:
        os.kill(pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, (
        f"ended before the kill:\n{(out / 'stderr.txt').read_text()}"
    )
    assert reached, (
        f"timed out waiting for the moment to kill:\n{(out / 'stderr.txt').read_text()}"
    )


def error_of(main, args, capsys):
    """Run a script's main in-process: it must exit non-zero with exactly one 'error: ' sentence, no
    traceback (any other exception escapes pytest.raises and fails the test)."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    code, err = exit_info.value.code, capsys.readouterr().err
    # eval scripts: sys.exit(message); train.py: print + exit 1
    text = code if isinstance(code, str) else err
    assert code not in (0, None) and "Traceback" not in err
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, text
    return errors[0]


# ---- 1. kill anywhere, resume, end where an uninterrupted run ends -------------------------------


def test_sigkill_at_a_random_step_then_resume_equals_the_uninterrupted_run(tiny, tmp_path):
    # each checkpoint follows its step's log line, so the first is on disk once step SAVE_EVERY + 1
    # is logged; several steps remain to be killed in
    kill_after = random.randint(SAVE_EVERY + 1, STEPS - 3)
    # and then anywhere in the next step: forward, backward, update or checkpoint
    delay = random.uniform(0, 0.05)
    print(f"killed {delay:.3f} s after step {kill_after} was logged")  # shown if the test fails
    run = start(tmp_path, "train.py", *argv(tiny, tmp_path))
    kill_when(run, lambda: logged_steps(tmp_path) >= kill_after, tmp_path, after=delay)
    step = checkpoint_step(tmp_path)  # the last good checkpoint is whole and loads as plain tensors
    assert step % SAVE_EVERY == 0 and step <= logged_steps(tmp_path) < STEPS
    assert not (tmp_path / "final").exists()
    train.main(argv(tiny, tmp_path, "--resume"))
    assert_equals_the_uninterrupted_run(tiny, tmp_path)


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(tiny, tmp_path, monkeypatch):
    """--save_every 1: a ~25 MB checkpoint every step. Killed once OUT/checkpoint.pt.tmp appears
    (after a first good checkpoint): checkpoint.pt is still the previous step's, whole; the resumed
    run ends equal to the uninterrupted, and holds no mapping of the checkpoint it resumed from once
    that is replaced (its disk space is given back)."""
    ckpt, tmp = tmp_path / "checkpoint.pt", tmp_path / "checkpoint.pt.tmp"
    # the kill lands a little late now and then, after the rename: try the next save
    for attempt in range(5):
        run = start(
            tmp_path,
            "train.py",
            *argv(tiny, tmp_path, "--save_every", "1", *(["--resume"] if attempt else [])),
        )
        kill_when(run, lambda: ckpt.exists() and tmp.exists(), tmp_path)
        if tmp.exists():
            break
    assert tmp.exists(), "five kills all landed after the rename"
    # killed writing step s's: checkpoint.pt holds s - 1
    assert checkpoint_step(tmp_path) == logged_steps(tmp_path) - 1
    save, held = train.save_checkpoint, []
    monkeypatch.setattr(
        train,
        "save_checkpoint",
        lambda *a, **k: (
            save(*a, **k)
            or held.extend(
                line
                for line in Path("/proc/self/maps").read_text().splitlines()
                if "checkpoint.pt" in line
            )
        ),
    )
    train.main(argv(tiny, tmp_path, "--save_every", "1", "--resume"))
    # torch.load(mmap=True) on resume: nothing may stay a view of the replaced file
    assert held == []
    assert not tmp.exists()  # the next save replaced the partial file
    assert_equals_the_uninterrupted_run(tiny, tmp_path)


def torchrun(*extra):  # --standalone: torchrun picks a free port itself
    return [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        *extra,
        "train.py",
    ]


def assert_within_1e5_of_the_uninterrupted_run(tiny, out):
    """FSDP's reductions round differently from one process's: 1e-5, not bitwise."""
    torch.testing.assert_close(losses(out), losses(tiny / "whole"), rtol=0, atol=1e-5)  # once each
    whole = load_file(tiny / "whole" / "final" / "model.safetensors")
    resumed = load_file(out / "final" / "model.safetensors")
    assert whole.keys() == resumed.keys()
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=0, atol=1e-5)


@pytest.mark.slow  # torchrun, two processes, killed and resumed
@pytest.mark.parametrize("killed,resumed", [(2, 2), (2, 1), (1, 2)])
def test_sigkill_then_resume_on_any_world_size_equals_one_process(tiny, tmp_path, killed, resumed):
    """1 process or torchrun with 2 CPU ranks (gloo, FSDP2), killed whole mid-run, resumed on 1 or
    2: 2 ranks write a DCP checkpoint (each its own part), 1 a plain checkpoint.pt; either is read
    on either world size, and the run ends within 1e-5 of the single-process uninterrupted run.
    The data of a step do not depend on the world size."""

    def command(world):
        return torchrun() if world == 2 else ["train.py"]

    kill_after = random.randint(SAVE_EVERY + 1, STEPS - 3)
    print(f"killed after step {kill_after} was logged")  # shown if the test fails
    run = start(tmp_path, *command(killed), *argv(tiny, tmp_path))
    kill_when(run, lambda: logged_steps(tmp_path) >= kill_after, tmp_path, tree=True)
    step = checkpoint_step(tmp_path)
    assert step % SAVE_EVERY == 0 and (tmp_path / "checkpoints").exists() == (killed == 2)
    again = subprocess.run(
        [sys.executable, *command(resumed), *argv(tiny, tmp_path, "--resume")],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr
    assert f"after step {step}" in again.stdout and f"world {resumed}" in again.stdout
    assert_within_1e5_of_the_uninterrupted_run(tiny, tmp_path)


@pytest.mark.slow  # torchrun, two processes, one restarted
def test_a_worker_killed_under_torchrun_max_restarts_is_restarted_and_resumes(tiny, tmp_path):
    """torchrun --max-restarts 1 with --auto_resume: one of the two workers SIGKILLed at a random
    step; torchrun stops the other and starts both again with the same arguments, which continue
    from the last complete checkpoint (a fresh start, had there been none) and end within 1e-5 of
    the uninterrupted run, each step logged once."""
    kill_after, victim = random.randint(SAVE_EVERY + 1, STEPS - 3), str(random.randint(0, 1))
    print(f"rank {victim} killed after step {kill_after} was logged")  # shown if the test fails
    run = start(
        tmp_path,
        *torchrun("--max-restarts", "1"),
        *argv(tiny, tmp_path, "--auto_resume"),
        env=RESTARTABLE,
    )
    deadline = time.monotonic() + 120
    while logged_steps(tmp_path) < kill_after and run.poll() is None:
        assert time.monotonic() < deadline, "timed out waiting for the step to kill after"
        time.sleep(0.001)
    workers = {}
    for pid in process_tree(run.pid)[1:]:
        try:
            environ = Path(f"/proc/{pid}/environ").read_text().split("\0")
            command = Path(f"/proc/{pid}/cmdline").read_text()
        except OSError:
            continue
        env = dict(v.split("=", 1) for v in environ if "=" in v)
        if "RANK" in env and "train.py" in command:
            workers[env["RANK"]] = pid
    stderr = tmp_path / "stderr.txt"
    assert run.poll() is None and set(workers) == {"0", "1"}, stderr.read_text()
    os.kill(workers[victim], signal.SIGKILL)
    before = checkpoint_step(tmp_path)
    assert run.wait(timeout=300) == 0, stderr.read_text()
    stdout = (tmp_path / "stdout.txt").read_text().splitlines()
    started = [line for line in stdout if line.startswith("pose: ")]
    resumed = [line for line in stdout if line.startswith("resumed from")]
    assert len(started) == 2 and len(resumed) == 1, "not restarted, or not resumed"
    assert resumed[0].endswith(f"checkpoints/step-{before:06d} after step {before}")
    assert_within_1e5_of_the_uninterrupted_run(tiny, tmp_path)


# ---- 2. evaluations keep every finished length ---------------------------------------------------


@pytest.fixture(scope="module")
def eval_model(tmp_path_factory):
    """Lo = 256, a byte tokenizer; and four pseudo-English documents of 300-450 words as .jsonl."""
    root = tmp_path_factory.mktemp("eval")
    save_model(root / "model", dim=64, max_seq_len=256, hidden_dim=128)
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(n)) for n in (400, 300, 350, 450)]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return root


def assert_a_rerun_skips_finished_lengths(script, work, args, monkeypatch, capsys):
    """What the interrupted run left in --out is kept as it is; a rerun with the same arguments
    computes only the missing lengths (`work`, whose 3rd argument tells the length, is called for no
    other)."""
    out, lengths = (
        Path(args[args.index("--out") + 1]),
        [int(n) for n in args[args.index("--lengths") + 1].split(",")],
    )
    kept = json.loads(out.read_text())["lengths"]
    assert str(lengths[0]) in kept and len(kept) < len(lengths)
    calls, original = [], getattr(script, work)
    monkeypatch.setattr(
        script,
        work,
        lambda *a, **k: (
            calls.append(a[2]["length"] if isinstance(a[2], dict) else a[2]) or original(*a, **k)
        ),
    )
    results = script.main(args)
    assert f"already holds lengths {[int(n) for n in kept]}: skipped" in capsys.readouterr().out
    assert set(calls) == set(lengths) - {int(n) for n in kept}
    for n, record in kept.items():
        assert results["lengths"][n] == record  # untouched, timings included
    assert (
        list(results["lengths"]) == [str(n) for n in lengths]
        and json.loads(out.read_text()) == results
    )


def test_a_killed_passkey_evaluation_keeps_finished_lengths_and_a_rerun_skips_them(
    eval_model, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "passkey.json"
    args = [
        "--model",
        str(eval_model / "model"),
        "--lengths",
        "400,1200,1600",
        "--trials",
        "4",
        "--out",
        str(out),
    ]
    run = start(tmp_path, "eval_passkey.py", *args)
    # SIGKILL once the first length is written (temp file + rename)
    kill_when(run, out.exists, tmp_path)
    assert_a_rerun_skips_finished_lengths(eval_passkey, "run_trial", args, monkeypatch, capsys)


def test_an_interrupted_perplexity_evaluation_keeps_finished_lengths_and_a_rerun_skips_them(
    eval_model, tmp_path, monkeypatch, capsys
):
    """In-process, stopped by an exception in the second length (eval_ppl shares eval_passkey's
    results file code, which the SIGKILL test above runs in a real process): every finished length
    stays."""
    args = [
        "--model",
        str(eval_model / "model"),
        "--data",
        str(eval_model / "docs.jsonl"),
        "--lengths",
        "256,384,512",
        "--stride",
        "128",
        "--min_tokens",
        "1000",
        "--docs",
        "2",
        "--out",
        str(tmp_path / "ppl.json"),
    ]
    document_nll = eval_ppl.document_nll

    def killed_at_384(model, ids, length, stride, **kwargs):
        if length == 384:
            raise KeyboardInterrupt
        return document_nll(model, ids, length, stride, **kwargs)

    monkeypatch.setattr(eval_ppl, "document_nll", killed_at_384)
    with pytest.raises(KeyboardInterrupt):
        eval_ppl.main(args)
    monkeypatch.undo()
    assert_a_rerun_skips_finished_lengths(eval_ppl, "document_nll", args, monkeypatch, capsys)


# ---- 3. the catalogue: one sentence, a non-zero exit, nothing lost -------------------------------


class Exploit:
    """A pickle that runs a shell command when loaded without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def meta_dir(path, params=None, weights=None):
    path.mkdir()
    (path / "params.json").write_text(
        params
        if isinstance(params, str)
        else json.dumps(
            params
            or {
                "dim": 32,
                "n_layers": 2,
                "n_heads": 4,
                "n_kv_heads": 2,
                "vocab_size": 258,
                "hidden_dim": 64,
                "max_seq_len": 32,
            }
        )
    )
    if weights is not None:
        torch.save(weights, path / "consolidated.00.pth")
    return path


def bad_model(case, tmp_path):
    """-> (a --model path, the sentence fragment expected)."""
    path = tmp_path / "model"
    if case == "no weights":
        save_model(path)
        (path / "model.safetensors").unlink()
        return path, f"{path} has config.json but no *.safetensors weights."
    if case == "cut safetensors":
        save_model(path)
        weights = path / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return path, f"{weights} is not a readable safetensors file"
    if case == "params.json without n_heads":
        state = save_model(tmp_path / "hf").state_dict()
        meta_dir(path, {"dim": 32, "n_layers": 2, "vocab_size": 258, "hidden_dim": 64}, state)
        return path, f"{path / 'params.json'} has no 'n_heads', which a Llama params.json needs."
    if case == "cut params.json":
        meta_dir(path, '{"dim": 32, "n_layers": 2, "n_he', save_model(tmp_path / "hf").state_dict())
        return path, f"{path / 'params.json'} is not readable JSON (Unterminated string"
    if case == "no .pth":
        meta_dir(path)
        return path, f"{path} has params.json but no consolidated.*.pth weights."
    if case == "vocabulary larger than the embedding":
        save_model(path, vocab_size=200)  # the byte tokenizer has 258 tokens
        return (
            path,
            f"{path}: the tokenizer has 258 tokens but the embedding only 200 rows; they do not "
            "belong together.",
        )
    raise KeyError(case)


MODEL_CASES = [
    "no weights",
    "cut safetensors",
    "params.json without n_heads",
    "cut params.json",
    "no .pth",
    "vocabulary larger than the embedding",
]


@pytest.mark.parametrize("case", MODEL_CASES)
def test_a_model_that_cannot_load_is_one_sentence(case, tiny, tmp_path, capsys):
    model, expected = bad_model(case, tmp_path)
    error = error_of(train.main, argv(tiny, tmp_path / "out", "--model", str(model)), capsys)
    assert error.startswith("error: " + expected), error
    assert not (tmp_path / "out" / "checkpoint.pt").exists()
    error = error_of(
        eval_passkey.main,
        ["--model", str(model), "--lengths", "400", "--out", str(tmp_path / "p.json")],
        capsys,
    )  # the evaluations say the same sentence inside theirs
    assert error.startswith(f"error: could not load the model {model}") and expected in error, error
    assert not (tmp_path / "p.json").exists()


def test_a_malicious_pickle_in_the_weights_is_refused_and_never_runs(tiny, tmp_path, capsys):
    """test_model checks the loader; here the command line. Had the pickle run, the marker file
    would exist."""
    marker = tmp_path / "PWNED"
    model = meta_dir(tmp_path / "model", weights={"tok_embeddings.weight": Exploit(marker)})
    error = error_of(train.main, argv(tiny, tmp_path / "out", "--model", str(model)), capsys)
    assert error.startswith(
        f"error: {model}: could not load 1 consolidated.*.pth as plain tensors (UnpicklingError: "
    ), error
    assert not marker.exists()


@pytest.mark.parametrize("case", ["malicious pickle", "cut file", "malicious DCP metadata"])
def test_a_bad_checkpoint_on_resume_is_refused_and_never_runs(case, tiny, tmp_path, capsys):
    """checkpoint.pt is read with weights_only=True; a DCP directory's .metadata (a pickle) by an
    unpickler that builds only DCP's metadata classes."""
    ckpt, marker = tmp_path / "checkpoint.pt", tmp_path / "PWNED"
    if case == "malicious pickle":
        torch.save({"model": Exploit(marker), "step": 3, "config": {}}, ckpt)
    elif case == "cut file":
        torch.save(torch.load(tiny / "whole" / "checkpoint.pt", weights_only=True), ckpt)
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 3])
    else:  # the settings match, so the metadata is read
        ckpt = tmp_path / "checkpoints" / "step-000003"
        ckpt.mkdir(parents=True)
        config = checkpoint.read_info(tiny / "whole" / "checkpoint.pt")[1]
        (ckpt / "train_state.json").write_text(json.dumps({"step": 3, "config": config}))
        (ckpt / ".metadata").write_bytes(pickle.dumps(Exploit(marker)))

    def contents():
        files = [ckpt] if ckpt.is_file() else ckpt.iterdir()
        return sorted((p.name, p.read_bytes()) for p in files)

    before = contents()
    error = error_of(train.main, argv(tiny, tmp_path, "--resume"), capsys)
    assert error.startswith(
        f"error: --resume: {ckpt} is not a checkpoint of plain tensors written by train.py ("
    ), error
    assert ("Error" if case == "cut file" else "UnpicklingError") in error
    if case == "malicious DCP metadata":
        assert "posix.system is not part of a checkpoint's metadata" in error
    assert not marker.exists()  # nothing ran, nothing changed
    assert contents() == before


def test_empty_data_is_one_sentence(tiny, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    error = error_of(
        train.main, argv(tiny, tmp_path / "out", "--data", str(tmp_path / "empty.txt")), capsys
    )
    assert (
        error == f"error: {tmp_path / 'empty.txt'} holds no text (1 file(s), 1 empty document(s))."
    )
    (tmp_path / "dir").mkdir()
    error = error_of(
        train.main, argv(tiny, tmp_path / "out", "--data", str(tmp_path / "dir")), capsys
    )
    assert (
        error == f"error: {tmp_path / 'dir'} holds no .txt, .jsonl, .jsonl.gz or .jsonl.zst files."
    )
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


def test_no_document_as_long_as_train_len_is_one_sentence(tiny, tmp_path, capsys):
    """Eq. 5 needs Lx >= Lc (test_train covers Lx >= Lt for full-length and aligned content)."""
    longest = max(
        len(byte_tokenizer(add_bos=True).encode(doc.read_text()))
        for doc in (tiny / "data").iterdir()
    )
    error = error_of(
        train.main, argv(tiny, tmp_path, "--train_len", "1000", "--target_len", "4000"), capsys
    )
    assert error == (
        f"error: no document in {tiny / 'data'} has the 1000 tokens an example needs: 6 "
        f"document(s), the longest has {longest} tokens."
    )


def test_text_that_is_not_utf8_is_replaced_counted_and_trained_on(tiny, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "ok.txt").write_text((tiny / "data" / "doc5.txt").read_text())
    # 3
    (data / "latin1.txt").write_bytes(
        (tiny / "data" / "doc4.txt").read_text().encode() + b" caf\xe9 \xff\xfe"
    )
    # no exception, no exit
    train.main(argv(tiny, tmp_path / "out", "--data", str(data), "--steps", "2"))
    out = capsys.readouterr().out
    assert (
        f"data: 3 invalid UTF-8 byte sequence(s) in 1 file(s) (first: {data / 'latin1.txt'}) were "
        "replaced with U+FFFD"
        in out
        and "data: 2 of 2 documents" in out
    )
    assert (
        checkpoint_step(tmp_path / "out") == 2
        and (tmp_path / "out" / "final" / "model.safetensors").is_file()
    )


def test_a_passkey_length_shorter_than_the_template_leaves_results_untouched(
    eval_model, tmp_path, capsys
):
    """test_eval checks the sentence; here: it comes before any work, so a results file keeps what
    it holds."""
    out = tmp_path / "passkey.json"
    common = ["--model", str(eval_model / "model"), "--trials", "1", "--out", str(out)]
    eval_passkey.main([*common, "--lengths", "400"])
    before = out.read_bytes()
    error = error_of(eval_passkey.main, [*common, "--lengths", "100,400"], capsys)
    assert (
        error.startswith("error: length 100 is shorter than the prompt without filler (")
        and "tokens); ask for a longer length." in error
    )
    assert out.read_bytes() == before


def test_nan_weights_stop_at_step_one_without_writing_anything(tiny, tmp_path, capsys):
    model = save_model(tmp_path / "model")
    with torch.no_grad():
        model.norm.weight[0] = float("nan")
    model.save_pretrained(tmp_path / "model", tokenizer=byte_tokenizer(add_bos=True))
    error = error_of(
        train.main, argv(tiny, tmp_path / "out", "--model", str(tmp_path / "model")), capsys
    )
    assert error == (
        "error: the loss is nan (gradient norm nan) at step 1; stopped before the update and no "
        "checkpoint was written yet: lower --lr or use --dtype float32."
    )
    assert (
        not (tmp_path / "out" / "checkpoint.pt").exists()
        and not (tmp_path / "out" / "final").exists()
    )


def test_a_nan_loss_keeps_the_last_good_checkpoint_whole(tiny, tmp_path, capsys):
    """test_train checks the sentence; here the file it names: that step, whole, plain tensors,
    finite."""
    error = error_of(
        train.main,
        argv(tiny, tmp_path, "--lr", "1e30", "--warmup", "0", "--save_every", "1"),
        capsys,
    )
    assert (
        error.startswith("error: the loss is ")
        and f"the last good checkpoint {tmp_path / 'checkpoint.pt'} (step " in error
    )
    step = int(error.split("(step ")[1].split(")")[0])
    assert (
        checkpoint_step(tmp_path) == step == logged_steps(tmp_path)
        and not (tmp_path / "final").exists()
    )


def no_space(fail_on_call):
    """torch.save that writes part of a file then fails like a full disk on its `fail_on_call`-th
    call."""
    real, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == fail_on_call:
            f.write(b"PK\x03\x04 part of a checkpoint") if hasattr(f, "write") else Path(
                f
            ).write_bytes(b"PK")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *args, **kwargs)

    return save


def test_no_space_left_for_a_checkpoint_keeps_the_previous_one(tiny, tmp_path, monkeypatch, capsys):
    # and the good one was on disk (fsync) before its rename
    ckpt, events = tmp_path / "checkpoint.pt", []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(
        os,
        "fsync",
        lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or fsync(fd),
    )
    monkeypatch.setattr(
        os, "replace", lambda a, b: events.append(("replace", str(a))) or replace(a, b)
    )
    monkeypatch.setattr(torch, "save", no_space(fail_on_call=2))  # the checkpoint of step 6
    error = error_of(train.main, argv(tiny, tmp_path), capsys)
    assert error == (
        f"error: could not write the checkpoint of step 6 to {ckpt}.tmp (No space left on device); "
        f"the previous checkpoint {ckpt} (step 3) is intact: free space, then rerun with --resume."
    )
    # the partial file is removed
    assert checkpoint_step(tmp_path) == 3 and not Path(f"{ckpt}.tmp").exists()
    assert events == [("fsync", f"{ckpt}.tmp"), ("replace", f"{ckpt}.tmp")]
    monkeypatch.undo()
    # a full disk may cut the log's last line as well
    with (tmp_path / "log.jsonl").open("a") as log:
        log.write('{"step": 6, "lo')
    train.main(argv(tiny, tmp_path, "--resume"))
    assert_equals_the_uninterrupted_run(tiny, tmp_path)


def test_no_space_left_for_the_final_model_keeps_the_last_checkpoint(
    tiny, tmp_path, monkeypatch, capsys
):
    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    error = error_of(train.main, argv(tiny, tmp_path), capsys)
    assert error == (
        f"error: could not write {tmp_path / 'final.tmp'} (No space left on device); "
        f"{tmp_path / 'checkpoint.pt'} holds the last step: free space, then rerun with --resume "
        "to write the final model."
    )
    assert checkpoint_step(tmp_path) == STEPS and not (tmp_path / "final.tmp").exists()
    monkeypatch.undo()
    train.main(argv(tiny, tmp_path, "--resume"))  # no step left to train: writes final/
    assert_equals_the_uninterrupted_run(tiny, tmp_path)


# ---- 4. a user's mistake is one sentence; a bug keeps its traceback ------------------------------


def a_bug(*args, **kwargs):
    raise ValueError("a bug, not the user's mistake")


def a_mistake(*args, **kwargs):
    raise UserError("the user's mistake.")


def mains():
    """name -> (main, arguments it accepts, a function it calls with them, to break)."""
    from demo import figure1, wavelengths
    from machinery import prepare

    evals = ["--model", "m", "--lengths", "2048", "--out", "r.json"]
    # inside Session's catch
    return {
        "eval_passkey": (eval_passkey.main, evals, "machinery.evaluation.load"),
        "eval_ppl": (eval_ppl.main, [*evals, "--data", "d"], "machinery.evaluation.load"),
        "prepare": (
            prepare.main,
            ["--data", "d", "--tokenizer", "t", "--out", "o"],
            "machinery.prepare.resolve",
        ),
        "figure1": (figure1.main, ["--samples", "1"], "demo.figure1.make_example"),
        "wavelengths": (wavelengths.main, ["--scaling", "yarn:4"], "rope.inv_freq"),
    }


@pytest.mark.parametrize("name", ["eval_passkey", "eval_ppl", "prepare", "figure1", "wavelengths"])
def test_a_main_says_a_users_mistake_in_one_sentence_and_lets_a_bugs_value_error_through(
    name, tmp_path, monkeypatch, capsys
):
    main, args, target = mains()[name]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").write_text("a document")  # eval_ppl checks --data before loading the model
    monkeypatch.setattr(target, a_mistake)
    assert error_of(main, args, capsys).endswith("the user's mistake.")
    monkeypatch.setattr(target, a_bug)
    with pytest.raises(ValueError, match="a bug, not the user's mistake"):  # not a SystemExit
        main(args)


def test_the_wavelength_table_divides_what_a_scaling_divides_and_refuses_an_odd_head_in_a_sentence(
    capsys,
):
    from demo import wavelengths

    assert all(
        w1 / w0 == pytest.approx(4) for _, w0, w1 in wavelengths.main(["--scaling", "linear:4"])
    )
    # fast pairs kept, slow ones / s
    rows = wavelengths.main(["--scaling", "yarn:16", "--head_dim", "64"])
    assert rows[0][2] == rows[0][1] and rows[-1][2] / rows[-1][1] == pytest.approx(16)
    assert (
        error_of(wavelengths.main, ["--head_dim", "7"], capsys)
        == "error: RoPE needs an even head dimension, got 7."
    )
