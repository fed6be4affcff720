"""Durable, atomic file writes: what every writer of the package that must never leave a half-written file uses
(training checkpoints and result files, the output repository, pictures)."""

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def fsync_file(path: str | os.PathLike) -> None:
    """Flushes the contents of the file `path` to disk."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_directory(path: str | os.PathLike) -> None:
    """Flushes the entries of the folder `path` (new, renamed and deleted files) to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Calls `write(file)` on a temporary file in the folder of `path`, flushes it to disk and renames it over `path`
    (then flushes the folder): `path` holds the previous file (or none) until the new one is complete, never a part of
    it. On any error the temporary file is removed and the error raised. Returns the path."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """`write_atomically` of `text` (UTF-8)."""
    return write_atomically(path, lambda handle: handle.write(text.encode("utf-8")))


__all__ = ["fsync_directory", "fsync_file", "write_atomically", "write_text_atomically"]
