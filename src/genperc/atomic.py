"""Atomic directory writes: a crash mid-write never leaves a half-written checkpoint.

``with atomic_directory(target) as tmp:`` fills a temporary sibling directory; only when the
block succeeds does it replace ``target`` (an existing directory is swapped out only after the new
one is complete). On any error the temporary directory is removed and ``target`` is untouched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from genperc.errors import UserError


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary sibling and one rename: a reader (or a crash)
    sees the old file or the new one, never half of it. The parent folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def ensure_writable_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Create ``path`` (and its parents) if needed and check that files can be written in it; a
    one-line :class:`UserError` naming ``what`` otherwise (a file in the way, no permission, a
    read-only disk). Called before long work, so that nothing is computed only to be lost."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} exists and is not a folder", "choose another path or remove that file")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to {what} {path} ({e.strerror or e})",
                        "choose a folder you may write to") from None
    return path
