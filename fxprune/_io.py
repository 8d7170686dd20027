"""Atomic file writes: every file fxprune writes goes through :func:`atomic_write`.

A write that fails half-way (disk full, a file-size limit, an exception in the writer, a killed
process) must never leave a truncated file behind or destroy the previous one. The data goes to a
temporary file in the *same directory* (so the final rename never crosses a filesystem), is
flushed and ``fsync``-ed, gets the permissions a plain ``open(path, "w")`` would have given it
(``0o666`` minus the umask, or the mode of the file it replaces), and is renamed over the target
with ``os.replace``, which is atomic on POSIX and Windows. On any error the temporary file is
removed and the target is untouched.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Callable, Iterator

__all__ = ["atomic_write", "atomic_path", "check_writable", "default_file_mode"]


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666`` minus the process umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _final_mode(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return default_file_mode()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically.

    For writers that need a file name rather than a file object (``onnx.save``, ``zipfile``).
    The temporary file exists (empty) when the block starts.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp_path, _final_mode(path))
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise
    _fsync_dir(directory)


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[IO[bytes]], None]) -> Path:
    """Write ``data`` (bytes, text as UTF-8, or a callback given a binary file) to ``path`` atomically.

    Returns the path written. Raises ``OSError`` (the target untouched) when the write fails.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            if callable(data):
                data(fh)
            elif isinstance(data, str):
                fh.write(data.encode("utf-8"))
            else:
                fh.write(data)
    return path


def check_writable(path: str | os.PathLike, what: str = "output") -> str | None:
    """Why ``path`` cannot be written (a message), or ``None`` when it can.

    Checks before an expensive job that the directory exists and is writable and that the path is
    not a directory, without creating anything.
    """
    p = Path(path)
    if str(path).endswith(os.sep) or p.is_dir():
        return f"{what} {str(path)!r} is a directory; give a file name such as {str(p / ('out' + (p.suffix or '.json')))!r}"
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        return f"{what} {str(path)!r}: the directory {str(parent)!r} does not exist; create it first"
    if not parent.is_dir():
        return f"{what} {str(path)!r}: {str(parent)!r} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{what} {str(path)!r}: the directory {str(parent)!r} is not writable"
    if p.exists() and not os.access(p, os.W_OK):
        return f"{what} {str(path)!r} exists and is not writable"
    return None


def _fsync_dir(directory: Path) -> None:
    """Persist the rename (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
