"""One writer per folder: an exclusive, non-blocking lock on ``FOLDER/.lock``.

``genperc train`` holds the lock of its run directory for the whole of training, so a second
trainer (or ``train --overwrite``) on the same run stops at once with one line naming the process
that holds it. ``genperc eval`` holds the lock of its own output folder (``RUN/eval/<split>-<step>``
by default), not the run's: evaluating reads only published checkpoints, which are complete by
construction (:mod:`genperc.atomic`), so a run may be evaluated while it trains; two evaluations
into one folder are refused.

The lock is ``fcntl.flock`` on an open file. The kernel releases it when the holding process
exits for any reason, ``kill -9`` included, so a ``.lock`` file left behind by a killed process is
harmless: it is never "stale", the next process simply takes it. The file is never deleted (deleting
it would let two processes lock two different files of one name); it holds the PID, host and
purpose of the last holder, read only to name the holder in the message. Locks are re-entrant
within a process (a trainer that evaluates its own run into it does not lock itself out). On a
network file system without ``flock`` support the lock is a no-op, as it is on platforms without
``fcntl``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from genperc.atomic import ensure_writable_dir
from genperc.errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock
    fcntl = None

LOCK_NAME = ".lock"

#: folders this process holds the lock of (resolved paths)
_HELD: set[Path] = set()


class RunLocked(UserError):
    """Another process holds the folder's lock."""


def holder(folder: str | os.PathLike) -> str:
    """What the lock file of ``folder`` says about its last holder ("" when nothing)."""
    try:
        return (Path(folder) / LOCK_NAME).read_text().strip()
    except OSError:
        return ""


@contextmanager
def locked(folder: str | os.PathLike, purpose: str) -> Iterator[Path]:
    """Hold the exclusive lock of ``folder`` (created if missing) for the block.

    Raises :class:`RunLocked` (a :class:`UserError`) at once when another process holds it, and a
    :class:`UserError` when the folder cannot be created or written
    (:func:`genperc.atomic.ensure_writable_dir`)."""
    folder = Path(folder)
    key = folder.resolve()
    if key in _HELD:  # this process holds it already (re-entrant)
        yield folder
        return
    ensure_writable_dir(folder)
    try:
        f = open(folder / LOCK_NAME, "a+")  # noqa: SIM115 - kept open while held; "a+" keeps the holder's note
    except OSError as e:
        raise UserError(f"cannot write the lock file {folder / LOCK_NAME} ({e.strerror or e})",
                        "choose a folder you may write to") from None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                note = holder(folder) or "another process"
                raise RunLocked(f"{folder} is in use by {note}",
                                "wait for it to finish or stop that process; the lock goes with it") from None
            except OSError:  # a file system without flock: no lock
                pass
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} ({purpose})\n")
        f.flush()
        _HELD.add(key)
        try:
            yield folder
        finally:
            _HELD.discard(key)
    finally:
        f.close()  # closing the file releases the lock
