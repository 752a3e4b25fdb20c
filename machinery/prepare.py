"""Prepare once, train many times: a corpus of any size tokenized into a memory-mapped token store
(nanoGPT's train.bin, plus document offsets) that train.py and eval_ppl.py memory-map,
on every rank and at every restart, without reading it.

    python -m machinery.prepare --data pile/train/00.jsonl.zst --tokenizer smollm2 --out corpus/
    python train.py --model smollm2 --data corpus/ ...     # memory-maps it; checks the tokenizer

OUT/ holds tokens.bin (every document's ids one after another: uint16 where the vocabulary fits,
else uint32), offsets.npy (int64: document d is tokens[offsets[d]:offsets[d + 1]]) and corpus.json
(the tokenizer's identity, counts, the source files, damaged input). The corpus is never held in
memory: the reading process streams batches of lines to --workers tokenizing processes and appends
their ids to the files. All is written in OUT.partial/ and renamed to OUT/ at the end, so a
directory named OUT is always whole. A killed prepare, rerun with the same files and tokenizer,
resumes from its last commit (every --commit_seconds); with other ones it starts clean.
"""
import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from errors import UserError, exit_on_user_error
from machinery import data
from machinery.data import CORPUS_JSON, OFFSETS, TOKENS
from machinery.files import atomic_write
from machinery.tokenizer import load_tokenizer, resolve

PROGRESS, ENDS = "progress.json", "ends.bin"  # in OUT.partial only: the last commit; document ends


def prepare(sources, tokenizer, out, *, workers=1, tokenizer_name=None,
            batch_bytes=data.BATCH_BYTES, commit_seconds=60.0, log=print):
    """Tokenize the files of `sources` into the prepared corpus `out`; -> its corpus.json."""
    files, out = data.source_files(sources), Path(out)
    partial = out.with_name(out.name + ".partial")
    identity = {**data.tokenizer_identity(tokenizer), "source": tokenizer_name}
    job = {"tokenizer": identity["sha256"], "dtype": np.dtype(data.token_dtype(tokenizer)).name,
           "sources": [{"path": str(f), "bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns}
                       for f in files]}
    if (out / CORPUS_JSON).is_file():
        meta = json.loads((out / CORPUS_JSON).read_text())
        if meta.get("job") == job:
            log(f"{out} is already prepared from these files with this tokenizer: nothing to do.")
            return meta
        raise UserError(f"{out} holds a corpus prepared from other files or with another "
                        "tokenizer: remove it or choose another --out.")
    if out.exists():
        raise UserError(f"{out} exists and is not a prepared corpus: choose another --out.")
    state = read_progress(partial)
    if state and state["job"] == job and holds(partial, state, np.dtype(job["dtype"])):
        log(f"resuming {partial} at file {state['end'][0] + 1} of {len(files)}, line "
            f"{state['end'][1]} ({state['tokens']:,} tokens of {state['documents']:,} documents "
            "done)")
    else:
        if partial.exists():
            log(f"starting clean: {partial} holds an unfinished prepare of other files or another "
                "tokenizer, or one that lost what it had written")
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        state = {"job": job, "end": [0, 0], "tokens": 0, "documents": 0, "characters": 0,
                 "report": {}}
    report, started = data.Report(**state["report"]), time.monotonic()
    dtype = np.dtype(job["dtype"])
    with open(partial / TOKENS, "ab") as tokens, open(partial / ENDS, "ab") as ends:
        tokens.truncate(state["tokens"] * dtype.itemsize)  # drop what came after the last commit
        ends.truncate(state["documents"] * 8)
        bar = tqdm(total=sum(s["bytes"] for s in job["sources"]), unit="B", unit_scale=True,
                   desc=f"preparing ({workers} processes)", dynamic_ncols=True)
        committed = time.monotonic()
        batches = data.read_batches(files, tuple(state["end"]), batch_bytes)
        for encoded in data.encode_batches(batches, tokenizer, workers):
            encoded.tokens.tofile(tokens)
            (state["tokens"] + np.cumsum(encoded.lengths)).tofile(ends)
            state["tokens"] += len(encoded.tokens)
            state["documents"] += len(encoded.lengths)
            state["characters"] += encoded.characters
            state["end"] = list(encoded.end)
            for problem in encoded.problems:
                report.add(*problem)
            bar.update(encoded.read - bar.n)
            bar.set_postfix(documents=f"{state['documents']:,}", tokens=f"{state['tokens']:,}",
                            refresh=False)
            if time.monotonic() - committed >= commit_seconds:
                commit(partial, tokens, ends, state, report)
                committed = time.monotonic()
        bar.close()
        commit(partial, tokens, ends, state, report)
    for line in report.lines():
        log(line)
    if not state["characters"]:
        shutil.rmtree(partial)
        raise UserError(f"{', '.join(map(str, sources))} hold(s) no text ({len(files)} file(s), "
                        f"{state['documents']} empty document(s)); nothing was written.")
    return finish(partial, out, state, identity, report, time.monotonic() - started, workers)


def read_progress(partial):
    try:
        return json.loads((partial / PROGRESS).read_text())
    except (OSError, ValueError):  # none yet (it is always replaced whole)
        return None


def holds(partial, state, dtype):
    """Whether OUT.partial still has every byte its last commit recorded (then it can resume)."""
    try:
        return ((partial / TOKENS).stat().st_size >= state["tokens"] * dtype.itemsize
                and (partial / ENDS).stat().st_size >= state["documents"] * 8)
    except OSError:
        return False


def commit(partial, tokens, ends, state, report):
    """Make what is written so far durable, then say so: a kill after this resumes from here."""
    for f in (tokens, ends):
        f.flush()
        os.fsync(f.fileno())  # on disk before progress.json claims it
    write_json(partial / PROGRESS, {**state, "report": report.state()})


def write_json(path, value):
    atomic_write(path, json.dumps(value, indent=1))


def finish(partial, out, state, identity, report, seconds, workers):
    """offsets.npy from the document ends, corpus.json last, then OUT.partial renamed to OUT."""
    n, chunk = state["documents"], 1 << 24  # 128 MB of offsets at a time, however many documents
    ends = np.memmap(partial / ENDS, dtype=np.int64, mode="r", shape=(n,))
    offsets = np.lib.format.open_memmap(partial / OFFSETS, mode="w+", dtype=np.int64,
                                        shape=(n + 1,))
    offsets[0] = 0
    for start in range(0, n, chunk):
        offsets[1 + start:1 + start + chunk] = ends[start:start + chunk]
    offsets.flush()
    del offsets, ends
    meta = {"format": 1, "tokenizer": identity, "dtype": state["job"]["dtype"], "documents": n,
            "tokens": state["tokens"], "characters": state["characters"],
            "sources": state["job"]["sources"], "damaged": report.state(), "job": state["job"],
            "seconds": round(seconds, 1), "workers": workers}
    write_json(partial / CORPUS_JSON, meta)
    (partial / PROGRESS).unlink()  # first: a kill after it starts clean, never resumes without ENDS
    (partial / ENDS).unlink()
    os.replace(partial, out)
    return meta


@exit_on_user_error
def main(argv=None):
    first, *rest = __doc__.split("\n\n")
    p = argparse.ArgumentParser(prog="python -m machinery.prepare", description=first,
                                epilog="\n\n".join(rest),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", required=True, help="files or directories: .txt (one "
                   "document per file), .jsonl, .jsonl.gz, .jsonl.zst (a 'text' field per line); "
                   "directories are read in sorted order")
    p.add_argument("--tokenizer", required=True, help="the model whose tokenizer to use: a Hugging "
                   "Face or Meta directory, a .gguf, tokenizer.json or tokenizer.model file, or "
                   "'smollm2'")
    p.add_argument("--out", required=True, help="the corpus directory (OUT.partial/ until whole)")
    p.add_argument("--workers", type=int, default=os.cpu_count(),
                   help="tokenizing processes (default: one per CPU)")
    p.add_argument("--commit_seconds", type=float, default=60.0, help="make the work durable this "
                   "often: a killed prepare loses at most this much (default: 60)")
    args = p.parse_args(argv)
    if args.workers < 1 or not args.commit_seconds > 0:
        raise UserError(f"--workers {args.workers} and --commit_seconds {args.commit_seconds} "
                        "cannot work: give at least 1 worker and a positive number of seconds.")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a file; give a directory for the corpus.")
    try:
        tokenizer = load_tokenizer(resolve(args.tokenizer))
        meta = prepare(args.data, tokenizer, args.out, workers=args.workers,
                       tokenizer_name=args.tokenizer, commit_seconds=args.commit_seconds)
    except KeyboardInterrupt:
        sys.exit(f"interrupted: rerun the same command to resume from {args.out}.partial.")
    print(f"{args.out}: {meta['documents']:,} documents, {meta['tokens']:,} tokens "
          f"({meta['dtype']}) from {len(meta['sources'])} file(s)")


if __name__ == "__main__":
    main()
