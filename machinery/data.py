"""Text for training and evaluation: one streaming reader for every corpus format, and the token
store that train.py and eval_ppl.py draw documents from.

    python -m machinery.prepare --data pile/ --tokenizer smollm2 --out corpus/   # once (prepare.py)

A corpus is .txt files (each file one document), .jsonl, .jsonl.gz or .jsonl.zst files (one JSON
object per line, its "text" field a document: the Pile's format), or directories holding them at
any depth, read in sorted path order so that every machine and every rank sees the same documents
in the same order. Damaged input never stops a read and never raises: invalid UTF-8 becomes
U+FFFD, a line that is not JSON or has no string "text" is skipped, a compressed file cut short
keeps the documents before the cut; each kind is counted and its first place named.
"""
import gzip
import hashlib
import itertools
import json
import multiprocessing
import sys
from collections import deque
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from errors import UserError

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst")
BATCH_BYTES = 1 << 20  # raw text per batch of lines handed to a tokenizing process
CORPUS_JSON, TOKENS, OFFSETS = "corpus.json", "tokens.bin", "offsets.npy"  # a prepared corpus


# ---- reading: files -> batches of raw lines (reading process) -> texts (tokenizing process) ----

def source_files(paths) -> list[Path]:
    """The corpus files of `paths`: files and directories in order given, a directory's sorted."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))
            if not found:
                raise UserError(f"{path} holds no .txt, .jsonl, .jsonl.gz or .jsonl.zst files.")
            files += found
        elif path.is_file():
            if not path.name.endswith(SUFFIXES):
                raise UserError(f"{path}: unsupported file type {''.join(path.suffixes[-2:])!r}; "
                                "expected .jsonl, .jsonl.gz or .jsonl.zst (a \"text\" field per "
                                "line), .txt (one document per file), or a directory of them.")
            files.append(path)
        else:
            raise UserError(f"{path} does not exist.")
    return files


def decompressed(raw, name):
    """The bytes of the open file `raw`, decompressed by its suffix, a piece at a time. A stream
    that ends inside a frame raises EOFError (gzip does so itself; zstandard's readers do not)."""
    if name.endswith(".gz"):
        with gzip.GzipFile(fileobj=raw) as f:
            while piece := f.read1(1 << 20):  # what is decompressed so far: a cut loses the rest
                yield piece
    elif name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise UserError(f"reading {name} needs the zstandard package: pip install zstandard") \
                from None
        decompressor = zstandard.ZstdDecompressor()
        frame, inside = decompressor.decompressobj(), False  # inside: a frame begun, not ended
        while piece := raw.read(1 << 20):
            while piece:
                yield frame.decompress(piece)
                inside, piece = not frame.eof, b""
                if frame.eof:  # the Pile's files are one frame; concatenated .zst files are several
                    piece, frame = frame.unused_data, decompressor.decompressobj()
        if inside:
            raise EOFError("the file ends inside a zstd frame (cut short)")
    else:
        while piece := raw.read(1 << 20):
            yield piece


class Batch(NamedTuple):
    file: str
    first: int  # lines of the file before this batch
    text: bytes | None  # whole lines joined by b"\n" (None: no line); a .txt file is one line
    problems: list  # [(kind, count, file, first place)] found while reading
    end: tuple  # (file number, lines done in it): where a resumed prepare starts after this batch
    read: int  # bytes of the corpus files read so far (compressed), for progress

    def lines(self):  # split where they are parsed, in a tokenizing process
        if self.text is None:
            return []
        return [self.text] if self.file.endswith(".txt") else self.text.split(b"\n")


def read_batches(files, start=(0, 0), batch_bytes=BATCH_BYTES):
    """Batches of about `batch_bytes` of whole raw lines, in order, from `start` = (file number,
    lines to skip in it). The reading process only finds line ends and counts them (in C), so it
    never holds the tokenizing processes up. A file that cannot be read to its end gives a last
    batch that names the damage and keeps the whole lines before it."""
    done_bytes = sum(f.stat().st_size for f in files[:start[0]])
    for number in range(start[0], len(files)):
        file = files[number]
        name, txt = str(file), file.name.endswith(".txt")
        skip = start[1] if number == start[0] else 0
        if txt and skip:
            continue
        first, buffer = skip, bytearray()

        def take(end):  # a Batch of the lines of buffer[:end] (none: end < 0), cut out of it
            nonlocal first
            text = bytes(buffer[:end]) if end >= 0 else None
            del buffer[:end + 1]  # and the line end after them
            n_lines = 0 if text is None else 1 if txt else text.count(b"\n") + 1
            first += n_lines
            return Batch(name, first - n_lines, text, [], (number, first), done_bytes + raw.tell())

        try:
            raw = open(file, "rb")
        except OSError as e:  # gone or unreadable since source_files listed it
            raise UserError(f"cannot read {name}: {e.strerror or e}.") from None
        with raw:
            try:
                for piece in decompressed(raw, name):
                    buffer += piece
                    at = 0
                    while skip and (newline := buffer.find(b"\n", at)) >= 0:  # resuming mid-file
                        skip, at = skip - 1, newline + 1
                    del buffer[:at]
                    if not txt and not skip and len(buffer) >= batch_bytes \
                            and (end := buffer.rfind(b"\n")) >= 0:
                        yield take(end)
            except Exception as e:  # a cut or corrupt compressed file: keep the whole lines before
                reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                batch = take(-1 if txt else buffer.rfind(b"\n"))
                damage = ("file", 1, name, f"{name}, after line {first}: {reason}")
                yield batch._replace(problems=[damage], end=(number + 1, 0))  # the next file next
            else:
                if txt:  # one document, even an empty one
                    yield take(len(buffer))
                elif buffer and not skip:  # the last lines; a final line end starts no new line
                    yield take(len(buffer) - buffer.endswith(b"\n"))
        done_bytes += file.stat().st_size


def parse_lines(name, first, lines):
    """Raw lines of the file `name` -> (texts, problems); a .txt file's one line is its text."""
    texts, problems = [], []
    for number, raw in enumerate(lines, first + 1):
        text = raw.decode("utf-8", errors="replace")  # one U+FFFD per invalid byte sequence
        bad = text.count("\ufffd") - raw.count("\ufffd".encode())  # minus the file's own U+FFFDs
        if bad:
            problems.append(("utf8", bad, name, name))
        if name.endswith(".txt"):
            texts.append(text)
            continue
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            problems.append(("json", 1, name, f"{name}, line {number}: not valid JSON ({e.msg})"))
            continue
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            problems.append(("text", 1, name, f"{name}, line {number}: expected an object with a "
                                              "string \"text\" field"))
            continue
        texts.append(record["text"])
    return texts, problems


class Report:
    """Damaged input, counted per kind with the files it was in and its first place."""
    WHAT = {"utf8": ("invalid UTF-8 byte sequence(s)", "were replaced with U+FFFD"),
            "json": ("line(s) that are not valid JSON", "were skipped"),
            "text": ("line(s) without a string \"text\" field", "were skipped"),
            "file": ("file(s) cut short or corrupt", "were read up to the damage")}

    def __init__(self, counts=None, files=None, first=None):
        self.counts, self.files, self.first = counts or {}, files or {}, first or {}

    def add(self, kind, count, file, first):
        self.counts[kind] = self.counts.get(kind, 0) + count
        self.files.setdefault(kind, [])
        if file not in self.files[kind][-1:]:  # a file's problems come together, in order
            self.files[kind].append(file)
        self.first.setdefault(kind, first)

    def lines(self):
        return [f"data: {n} {self.WHAT[kind][0]} in {len(self.files[kind])} file(s) "
                f"(first: {self.first[kind]}) {self.WHAT[kind][1]}"
                for kind, n in self.counts.items()]

    def state(self):
        return {"counts": self.counts, "files": self.files, "first": self.first}


# ---- tokenizing: in this process, or in several at once ----------------------------------------

class Encoded(NamedTuple):
    tokens: np.ndarray  # every document's ids, one after another
    lengths: np.ndarray  # int64, tokens per document
    characters: int
    problems: list
    end: tuple
    read: int


def token_dtype(tokenizer):
    return np.uint16 if tokenizer.n_vocab <= 1 << 16 else np.uint32


def tokenizer_identity(tokenizer) -> dict:
    """What decides the ids of a text, hashed: the vocabulary with its ranks (which fix tiktoken's
    merges), special tokens, pre-tokenizer and BOS, or a SentencePiece model's bytes and BOS."""
    h = hashlib.sha256()
    if hasattr(tokenizer, "processor"):
        h.update(tokenizer.processor.serialized_model_proto())
    else:
        h.update(json.dumps([tokenizer.pattern, sorted(tokenizer.special_tokens.items())]).encode())
        for token, rank in sorted(tokenizer.ranks.items(), key=lambda item: item[1]):
            h.update(rank.to_bytes(4, "little") + len(token).to_bytes(2, "little") + token)
    h.update(json.dumps([tokenizer.add_bos, tokenizer.bos_id]).encode())
    return {"sha256": h.hexdigest(), "n_vocab": tokenizer.n_vocab, "add_bos": tokenizer.add_bos}


_tokenizer = None  # of this process: set by start_worker


def start_worker(tokenizer):
    global _tokenizer
    _tokenizer = tokenizer


def encode_batch(batch: Batch) -> Encoded:
    texts, problems = parse_lines(batch.file, batch.first, batch.lines())
    ids = [_tokenizer.encode(text) for text in texts]  # with BOS when the tokenizer adds one
    count = sum(map(len, ids))
    tokens = np.fromiter(itertools.chain.from_iterable(ids), token_dtype(_tokenizer), count)
    return Encoded(tokens, np.array([len(i) for i in ids], np.int64), sum(map(len, texts)),
                   batch.problems + problems, batch.end, batch.read)


def encode_batches(batches, tokenizer, workers=1):
    """encode_batch over `batches`, results in order, in `workers` processes (1: this one). At most
    two batches a process are in flight, so memory stays flat however large the corpus (Pool.imap
    would read ahead without bound)."""
    if workers <= 1:
        start_worker(tokenizer)
        yield from map(encode_batch, batches)
        return
    fork = "fork" in multiprocessing.get_all_start_methods()  # the tokenizer inherited, not pickled
    context = multiprocessing.get_context("fork" if fork else None)
    with context.Pool(workers, start_worker, (tokenizer,)) as pool:
        pending = deque()
        for batch in batches:
            pending.append(pool.apply_async(encode_batch, (batch,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ---- the token store ---------------------------------------------------------------------------

class TokenStore:
    """Documents as one token array and their offsets: document d is
    tokens[offsets[d]:offsets[d + 1]]. Memory-mapped from a prepared corpus (pages are read when
    touched, and shared by every process) or built in memory from raw files. `index` picks the
    documents this view holds, in order (None: all)."""

    def __init__(self, tokens, offsets, index=None):
        self.tokens, self.offsets, self.index = tokens, offsets, index

    def __len__(self):
        return len(self.offsets) - 1 if self.index is None else len(self.index)

    def __getitem__(self, i):  # a view, never a copy
        d = i if self.index is None else self.index[i]
        return self.tokens[self.offsets[d]:self.offsets[d + 1]]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def lengths(self):
        lengths = np.diff(self.offsets)
        return lengths if self.index is None else lengths[self.index]

    def at_least(self, n_tokens):
        """The documents with at least `n_tokens` tokens, in their order."""
        return TokenStore(self.tokens, self.offsets, np.flatnonzero(self.lengths() >= n_tokens))


def log_stderr(message):
    print(message, file=sys.stderr)


def load_corpus(path, tokenizer, log=log_stderr, progress=False):
    """`path` as a TokenStore: a prepared corpus (a directory with corpus.json), memory-mapped once
    it is known to be made with `tokenizer`; or raw files, tokenized here, into memory, by the code
    prepare runs."""
    path = Path(path)
    if (path / CORPUS_JSON).is_file():
        return open_prepared(path, tokenizer)
    if (path / TOKENS).exists():
        raise UserError(f"{path} is an unfinished prepare: rerun python -m machinery.prepare to "
                        "complete it.")
    files, report = source_files([path]), Report()
    parts, lengths, characters = [], [], 0
    bar = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True,
               desc="tokenizing", disable=not progress)
    for encoded in encode_batches(read_batches(files), tokenizer):
        parts.append(encoded.tokens)
        lengths.append(encoded.lengths)
        characters += encoded.characters
        for problem in encoded.problems:
            report.add(*problem)
        bar.update(encoded.read - bar.n)
    bar.close()
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    for line in report.lines():
        log(line)
    if not characters:
        raise UserError(f"{path} holds no text ({len(files)} file(s), {len(lengths)} empty "
                        "document(s)).")
    return TokenStore(np.concatenate(parts), np.concatenate([[0], np.cumsum(lengths)]))


def open_prepared(path, tokenizer):
    """The memory-mapped store in `path`; refused if another tokenizer made it, or not whole."""
    try:
        meta = json.loads((path / CORPUS_JSON).read_text())
        made_by, mine = meta["tokenizer"], tokenizer_identity(tokenizer)
        if made_by["sha256"] != mine["sha256"]:
            def says(t):
                return (f"{t['n_vocab']} tokens, BOS {'added' if t['add_bos'] else 'not added'}, "
                        f"sha256 {t['sha256'][:12]}")
            raise UserError(f"{path} was prepared with another tokenizer "
                            f"({made_by.get('source')}: {says(made_by)}) than the model's "
                            f"({says(mine)}): prepare it again with this model's tokenizer.")
        tokens = np.memmap(path / TOKENS, dtype=meta["dtype"], mode="r")
        offsets = np.load(path / OFFSETS, mmap_mode="r")  # an .npy file: no pickle is ever loaded
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not a whole prepared corpus ({type(e).__name__}: {e}).") \
            from None
    if not (len(tokens) == offsets[-1] == meta["tokens"] and len(offsets) == meta["documents"] + 1):
        raise UserError(f"{path} is not a whole prepared corpus: {TOKENS} and {OFFSETS} disagree "
                        f"with {CORPUS_JSON}; prepare it again.")
    return TokenStore(tokens, offsets)


def read_documents(path, log=log_stderr) -> list[str]:
    """The texts of the corpus `path` (a file or a directory), read as train.py reads them."""
    files, report, texts = source_files([path]), Report(), []
    for batch in read_batches(files):
        found, problems = parse_lines(batch.file, batch.first, batch.lines())
        texts += found
        for problem in batch.problems + problems:
            report.add(*problem)
    for line in report.lines():
        log(line)
    if not any(texts):
        raise UserError(f"{path} holds no text ({len(files)} file(s), {len(texts)} empty "
                        "document(s)).")
    return texts

