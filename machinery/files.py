"""Files written whole or not at all: every writer of the project goes through here.

A file is written to NAME.tmp beside its final name, flushed to disk (fsync), given the permissions
a new file gets from the user's umask (0644 by default: a temporary file's 0600 never survives the
rename), then renamed over the final name. A kill or a full disk leaves the old file as it was.
"""
import os
from contextlib import contextmanager
from pathlib import Path


def new_file_mode():
    """The mode open() gives a new file under the current umask (0o644 for umask 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path):
    """Yields PATH.tmp to write (by any library); then fsync, chmod and rename it over `path`. On an
    error the temporary file is removed and the error raised; `path` is untouched."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        fsync(tmp)  # on disk before the rename: after a power cut the old file or the new, whole
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # give back the space a partial file took
        raise


def atomic_write(path, data):
    """Write `data` (str or bytes) to `path` whole, as atomic_path does."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
