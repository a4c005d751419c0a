"""Atomic output directories: a crash never leaves a half-written result under the final name.

    with atomic_output_dir(out, force=False) as tmp:   # tmp = "<out>.tmp-<pid>"
        write everything under tmp
    # renamed to ``out`` only here, after the body finished without an exception

With ``force``, an existing ``out`` is moved aside (``<out>.old-<pid>``) and removed only after the
new directory is in place, so even a crash during the swap keeps one complete copy on disk.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator


def check_output_dir(out: str | os.PathLike, *, force: bool) -> Path:
    """ValueError if ``out`` exists and is non-empty (or is a file) and ``force`` is not set."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"output directory {out} is not empty; pass --force (force=True) to overwrite it")
    return out


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write ``path`` through ``write(tmp_path)``, fsync it, then rename it into place.

    Readers (and a job resumed after a crash) see the old file or the complete new one, never a part;
    the temporary file is removed if ``write`` fails.
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or new entry in directory ``path`` durable (best effort where the OS refuses)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory of ``out``; rename it to ``out`` when the body succeeds."""
    out = check_output_dir(out, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():  # left by a crashed process that had our pid
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.rename(out, old)
    os.rename(tmp, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

