"""The prepared corpus as a specification: every format reads the same documents, prepare writes
exactly the tokens the raw path tokenizes (so train.py draws the same batches for the same seed), a
killed prepare leaves no corpus that looks whole and resumes to the same bytes, another tokenizer's
corpus is refused, and damaged input is counted and named, never a traceback. A byte-level
tokenizer and documents of a few hundred bytes: seconds on a CPU."""

import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard

from machinery import config
from machinery import data
from machinery import prepare
import train
from conftest import byte_tokenizer, save_tiny_model
from machinery.tokenizer import GPT2_PATTERN, Tokenizer

ROOT = Path(__file__).resolve().parent.parent
WORDS = "the grass is green the sky is blue the sun is yellow here we go there and back".split()
QUIET = {"log": lambda message: None}


def texts(n=40, seed=0):
    rng = random.Random(seed)
    words = [[rng.choice(WORDS) for _ in range(rng.randrange(0, 120))] for _ in range(n)]
    return [" ".join(w) + " é€😀" * (i % 3) for i, w in enumerate(words)]


def jsonl(records):
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def tiny_model(directory):
    save_tiny_model(directory, n_layers=1)
    return directory


@pytest.fixture
def corpus(tmp_path):
    """The same 40 documents as .txt files, and in .jsonl, .jsonl.gz and .jsonl.zst (two frames)."""
    docs = texts()
    (tmp_path / "txt").mkdir()
    for i, text in enumerate(docs):
        (tmp_path / "txt" / f"{i:02d}.txt").write_text(text)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.jsonl").write_bytes(jsonl({"text": t, "id": i} for i, t in enumerate(docs[:10])))
    (mixed / "b.jsonl.gz").write_bytes(gzip.compress(jsonl({"text": t} for t in docs[10:20])))
    frames = [
        zstandard.ZstdCompressor().compress(jsonl({"text": t} for t in part))
        for part in (docs[20:30], docs[30:])
    ]
    (mixed / "c.jsonl.zst").write_bytes(b"".join(frames))
    return tmp_path, docs


def today(docs, tokenizer, need):
    """train.py's documents before the token store: int32 tensors, those of >= need tokens."""
    tokenized = [torch.tensor(tokenizer.encode(t), dtype=torch.int32) for t in docs]
    return [d for d in tokenized if len(d) >= need]


def test_every_format_reads_the_same_documents(corpus):
    root, docs = corpus
    assert data.read_documents(root / "txt") == docs
    assert data.read_documents(root / "mixed") == docs  # a.jsonl, b.jsonl.gz, c.jsonl.zst: sorted


def test_batches_hold_every_line_once_and_resume_at_any_line(tmp_path):
    """read_batches cuts raw bytes at line ends: the lines, their numbers and every resume point
    must be those of bytes.split(b"\\n") (a final line end starts no line), whatever the batch."""
    for n, content in enumerate(
        [
            b"a\nbb\n\nccc\ndddd\n",
            b"a\nbb\n\nccc\ndddd",
            b"\n",
            b"x",
            b"",
            b"\n\n\nlong line here\n\n",
        ]
    ):
        path = tmp_path / f"{n}.jsonl"
        path.write_bytes(content)
        lines = content.split(b"\n")[:-1] if content.endswith(b"\n") else content.split(b"\n")
        lines = [] if content == b"" else lines
        for batch_bytes in (1, 3, 1 << 20):
            for skip in range(len(lines) + 1):
                got, at = [], skip
                for batch in data.read_batches([path], (0, skip), batch_bytes):
                    assert batch.first == at and batch.end == (0, at + len(batch.lines()))
                    got += batch.lines()
                    at = batch.end[1]
                assert got == lines[skip:], (content, batch_bytes, skip)


def test_prepared_tokens_equal_the_raw_path_with_one_and_two_processes(corpus, tmp_path):
    root, docs = corpus
    tokenizer = byte_tokenizer(add_bos=True)
    raw = data.load_corpus(root / "mixed", tokenizer)
    for workers in (1, 2):
        out = tmp_path / f"c{workers}"
        prepare.prepare([root / "mixed"], tokenizer, out, workers=workers, batch_bytes=500)
        store = data.load_corpus(out, tokenizer)
        assert isinstance(store.tokens, np.memmap) and store.tokens.dtype == np.uint16
        assert np.array_equal(store.offsets, raw.offsets)
        assert np.array_equal(store.tokens, raw.tokens)
        assert [list(d) for d in store] == [tokenizer.encode(t) for t in docs]
    meta = json.loads((tmp_path / "c2" / data.CORPUS_JSON).read_text())
    assert (meta["documents"], meta["tokens"]) == (len(docs), len(raw.tokens))
    assert meta["dtype"] == "uint16"
    files = sorted((root / "mixed").iterdir())
    assert [s["path"] for s in meta["sources"]] == [str(p) for p in files]
    assert meta["tokenizer"] == {**data.tokenizer_identity(tokenizer), "source": None}


def test_a_vocabulary_beyond_uint16_is_stored_as_uint32():
    assert data.token_dtype(byte_tokenizer()) == np.uint16
    big = byte_tokenizer()
    big.n_vocab = 65537
    assert data.token_dtype(big) == np.uint32


def test_ids_beyond_uint16_are_prepared_whole(corpus, tmp_path):
    """BOS = 70000 in every document: stored as uint16 it would wrap to 4464."""
    root, docs = corpus
    tokenizer = Tokenizer(
        {bytes([i]): i for i in range(256)},
        {"<s>": 70000, "</s>": 70001},
        GPT2_PATTERN,
        bos_id=70000,
        eos_id=70001,
        add_bos=True,
    )
    prepare.prepare([root / "mixed"], tokenizer, tmp_path / "big", workers=2, **QUIET)
    store, raw = (data.load_corpus(p, tokenizer) for p in (tmp_path / "big", root / "mixed"))
    assert store.tokens.dtype == np.uint32 and store.tokens.max() == 70000
    assert np.array_equal(store.tokens, raw.tokens) and np.array_equal(store.offsets, raw.offsets)
    assert [list(d) for d in store] == [tokenizer.encode(t) for t in docs]


def test_batches_from_a_prepared_corpus_equal_todays_for_the_same_documents_and_seed(
    corpus, tmp_path
):
    root, docs = corpus
    tokenizer = byte_tokenizer()
    prepare.prepare([root / "mixed"], tokenizer, tmp_path / "c", workers=2, batch_bytes=700)
    lengths = sorted(len(tokenizer.encode(t)) for t in docs)
    train_len, target_len = lengths[10], lengths[25]  # documents of exactly these lengths qualify
    for method, content in (("pose", "random"), ("pose", "aligned"), ("full", "random")):
        cfg = config.Config(
            data=str(tmp_path / "c"),
            train_len=train_len,
            target_len=target_len,
            batch_size=16,
            seed=3,
            method=method,
            content=content,
        )
        need = target_len if method == "full" or content == "aligned" else train_len
        kept = train.load_documents(cfg, tokenizer, rank=0)
        reference = today(docs, tokenizer, need)
        assert len(kept) == len(reference) and 0 < len(kept) < len(docs)
        for step in (1, 2, 7):
            ours, theirs = train.draw_batch(kept, cfg, step), train.draw_batch(reference, cfg, step)
            for a, b in zip(ours, theirs):  # tokens, positions, targets
                assert torch.equal(a, b)


def test_training_on_the_prepared_corpus_equals_training_on_the_raw_files(corpus, tmp_path):
    root, _ = corpus
    base = tiny_model(tmp_path / "base")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "machinery.prepare",
            "--data",
            str(root / "txt"),
            "--tokenizer",
            str(base),
            "--out",
            str(tmp_path / "c"),
            "--workers",
            "2",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    losses = {}
    for name, source in (("raw", root / "txt"), ("prepared", tmp_path / "c")):
        train.main(
            [
                "--model",
                str(base),
                "--data",
                str(source),
                "--target_len",
                "128",
                "--steps",
                "3",
                "--batch_size",
                "4",
                "--lr",
                "1e-3",
                "--warmup",
                "1",
                "--peak_tflops",
                "1",
                "--out",
                str(tmp_path / name),
            ]
        )
        log = (tmp_path / name / "log.jsonl").read_text().splitlines()
        losses[name] = [json.loads(line)["loss"] for line in log]
    assert losses["raw"] == losses["prepared"] and len(losses["raw"]) == 3


def test_a_corpus_of_another_tokenizer_is_refused_with_a_sentence(corpus, tmp_path):
    root, _ = corpus
    prepare.prepare(
        [root / "txt"], byte_tokenizer(add_bos=True), tmp_path / "c", tokenizer_name="bytes+bos"
    )
    refusal = (
        r"prepared with another tokenizer \(bytes\+bos: 258 tokens, BOS added, sha256 "
        r"\w{12}\) than the model's \(258 tokens, BOS not added"
    )
    with pytest.raises(ValueError, match=refusal):
        data.load_corpus(tmp_path / "c", byte_tokenizer(add_bos=False))
    base = tiny_model(tmp_path / "base")
    run = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--model",
            str(base),
            "--data",
            str(tmp_path / "c"),
            "--target_len",
            "128",
            "--steps",
            "1",
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "prepare it again with this model's tokenizer" in run.stderr.splitlines()[-1]


def test_a_killed_prepare_leaves_no_corpus_and_a_rerun_resumes_to_the_same_bytes(
    corpus, tmp_path, monkeypatch
):
    root, _ = corpus
    tokenizer = byte_tokenizer()
    prepare.prepare([root / "mixed"], tokenizer, tmp_path / "whole", batch_bytes=300)
    commit, commits = prepare.commit, []

    def killed_at_the_fourth_commit(*args):  # batch 4 is in tokens.bin but never committed
        commits.append(1)
        if len(commits) == 4:
            raise KeyboardInterrupt
        commit(*args)

    monkeypatch.setattr(prepare, "commit", killed_at_the_fourth_commit)
    cut, partial = tmp_path / "cut", tmp_path / "cut.partial"
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare([root / "mixed"], tokenizer, cut, batch_bytes=300, commit_seconds=0)
    monkeypatch.setattr(prepare, "commit", commit)
    assert not cut.exists() and (partial / prepare.PROGRESS).is_file()
    with pytest.raises(ValueError, match="unfinished prepare"):
        data.load_corpus(partial, tokenizer)
    done = json.loads((partial / prepare.PROGRESS).read_text())
    assert (partial / data.TOKENS).stat().st_size > done["tokens"]  # more written than committed
    messages = []
    prepare.prepare([root / "mixed"], tokenizer, cut, batch_bytes=300, log=messages.append)
    assert messages[0].startswith(f"resuming {partial} at file") and not messages[1:]
    for name in (data.TOKENS, data.OFFSETS):
        assert (cut / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert not partial.exists()
    prepare.prepare([root / "mixed"], tokenizer, cut, log=messages.append)
    assert "already prepared" in messages[-1]
    with pytest.raises(ValueError, match="prepared from other files or with another tokenizer"):
        prepare.prepare([root / "txt"], tokenizer, cut)


@pytest.mark.parametrize("kill_before", [1, 2, 3, 4])
def test_a_prepare_killed_while_finishing_ends_whole_on_rerun(
    corpus, tmp_path, monkeypatch, kill_before
):
    """finish() renames or removes 4 times (corpus.json, progress.json, ends.bin, OUT.partial ->
    OUT): a kill before any of them must leave a rerun that ends with the uninterrupted bytes."""
    root, _ = corpus
    tokenizer = byte_tokenizer()
    prepare.prepare([root / "mixed"], tokenizer, tmp_path / "whole", **QUIET)
    finish, steps = prepare.finish, []

    def killed_in_finish(*args):
        def step(real):
            def counted(*a, **k):
                steps.append(1)
                if len(steps) == kill_before:
                    raise KeyboardInterrupt
                return real(*a, **k)

            return counted

        with monkeypatch.context() as m:
            m.setattr(os, "replace", step(os.replace))
            m.setattr(Path, "unlink", step(Path.unlink))
            return finish(*args)

    monkeypatch.setattr(prepare, "finish", killed_in_finish)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare([root / "mixed"], tokenizer, cut, **QUIET)
    monkeypatch.setattr(prepare, "finish", finish)
    prepare.prepare([root / "mixed"], tokenizer, cut, **QUIET)
    for name in (data.TOKENS, data.OFFSETS):
        assert (cut / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    whole, store = (data.load_corpus(d, tokenizer) for d in (tmp_path / "whole", cut))
    assert len(store) == len(whole) > 0


def test_a_partial_missing_committed_bytes_is_started_clean(corpus, tmp_path, monkeypatch):
    root, _ = corpus
    tokenizer = byte_tokenizer()
    prepare.prepare([root / "mixed"], tokenizer, tmp_path / "whole", **QUIET)

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "finish", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare([root / "mixed"], tokenizer, tmp_path / "cut", **QUIET)
    monkeypatch.undo()
    (tmp_path / "cut.partial" / prepare.ENDS).write_bytes(b"")  # lost, yet progress.json claims it
    messages = []
    prepare.prepare([root / "mixed"], tokenizer, tmp_path / "cut", log=messages.append)
    assert messages[0].startswith("starting clean")
    for name in (data.TOKENS, data.OFFSETS):
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_an_unfinished_prepare_of_other_files_is_started_clean(corpus, tmp_path):
    root, docs = corpus
    (tmp_path / "c.partial").mkdir()
    (tmp_path / "c.partial" / data.TOKENS).write_bytes(b"stale")
    messages = []
    prepare.prepare([root / "txt"], byte_tokenizer(), tmp_path / "c", log=messages.append)
    assert messages[0].startswith("starting clean")
    store = data.load_corpus(tmp_path / "c", byte_tokenizer())
    assert [bytes(d.astype(np.uint8)).decode() for d in store] == docs


def test_damaged_input_is_counted_and_named_never_a_traceback(tmp_path):
    good = [{"text": t} for t in texts(6)]
    d = tmp_path / "damaged"
    d.mkdir()
    (d / "a.jsonl").write_bytes(
        jsonl(good[:2])
        + b"{oops\n"
        + jsonl([{"body": "x"}, {"text": 3}])
        + b"\n"
        + b'{"text": "caf\xe9 \xff"}\n'
    )
    many = texts(3000, seed=1)  # 1 MB: zstd blocks of 128 KB, the first ones whole before the cut
    whole = zstandard.ZstdCompressor().compress(jsonl({"text": t} for t in many))
    (d / "b.jsonl.zst").write_bytes(whole[: len(whole) // 2])  # cut mid-frame: a broken download
    (d / "c.jsonl.gz").write_bytes(gzip.compress(jsonl({"text": t} for t in many))[:-30])
    (d / "d.txt").write_bytes(b"\xef\xbf\xbd genuine, \xc3 not")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "machinery.prepare",
            "--data",
            str(d),
            "--tokenizer",
            str(ROOT / "demo" / "base"),
            "--out",
            str(tmp_path / "c"),
            "--workers",
            "2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    lines = [line for line in run.stdout.splitlines() if line.startswith("data: ")]
    kept = {name: data.read_documents(d / name, **QUIET) for name in ("b.jsonl.zst", "c.jsonl.gz")}
    assert lines == [
        f"data: 1 line(s) that are not valid JSON in 1 file(s) (first: {d / 'a.jsonl'}, line 3: "
        "not valid JSON (Expecting property name enclosed in double quotes)) were skipped",
        f'data: 2 line(s) without a string "text" field in 1 file(s) (first: {d / "a.jsonl"}, '
        'line 4: expected an object with a string "text" field) were skipped',
        f"data: 3 invalid UTF-8 byte sequence(s) in 2 file(s) (first: {d / 'a.jsonl'}) were "
        "replaced with U+FFFD",
        f"data: 2 file(s) cut short or corrupt in 2 file(s) (first: {d / 'b.jsonl.zst'}, after "
        f"line {len(kept['b.jsonl.zst'])}: EOFError: the file ends inside a zstd frame (cut "
        "short)) were read up to the damage",
    ], run.stdout
    meta = json.loads((tmp_path / "c" / data.CORPUS_JSON).read_text())
    assert meta["damaged"]["counts"] == {"json": 1, "text": 2, "utf8": 3, "file": 2}
    assert meta["damaged"]["files"]["file"] == [str(d / "b.jsonl.zst"), str(d / "c.jsonl.gz")]
    for name, texts_kept in kept.items():  # the documents before the cut, and only those
        assert 0 < len(texts_kept) < len(many) and texts_kept == many[: len(texts_kept)], name
    assert meta["documents"] == 2 + 1 + len(kept["b.jsonl.zst"]) + len(kept["c.jsonl.gz"]) + 1


def test_unusable_paths_are_one_sentence(tmp_path):
    (tmp_path / "x.csv").write_text("text\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank.txt").write_text("")
    for path, message in (
        (tmp_path / "x.csv", "unsupported file type '.csv'"),
        (tmp_path / "missing", "does not exist"),
        (tmp_path / "empty", "holds no .txt, .jsonl, .jsonl.gz or .jsonl.zst"),
        (tmp_path / "blank.txt", "hold(s) no text"),
    ):
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "machinery.prepare",
                "--data",
                str(path),
                "--tokenizer",
                str(ROOT / "demo" / "base"),
                "--out",
                str(tmp_path / "c"),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        error = run.stderr.splitlines()[-1]  # after the progress bar, if reading began
        assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
        assert error.startswith("error: ") and message in error, run.stderr
        assert not (tmp_path / "c").exists() and not (tmp_path / "c.partial").exists()


def test_prepare_never_imports_torch(corpus, tmp_path):
    """Importing torch costs ~2 CPU seconds of one process before any work: a prepare needs none."""
    code = (
        "import sys; from machinery import prepare; prepare.main(['--data', "
        f"{str(corpus[0] / 'txt')!r}, '--tokenizer', 'demo/base', '--out', "
        f"{str(tmp_path / 'c')!r}, '--workers', '1']); print('torch' in sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.splitlines()[-1] == "False", run.stderr
