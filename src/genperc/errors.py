"""The one exception type for errors a user can cause.

DESIGN.md: paths, shapes, config keys and prompts a user hands us raise :class:`UserError`;
the CLI prints it as one line (the problem, then the fix) and exits with code 2.
Assertions are for internal invariants only.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user gave us, with the fix.

    ``str(err)`` is one line: ``"<problem> — <fix>"`` when a fix is given.
    """

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem.strip().replace("\n", " ")
        self.fix = fix.strip().replace("\n", " ") if fix else None
        super().__init__(self.problem if not self.fix else f"{self.problem} — {self.fix}")


def require_path(path, what: str, fix: str | None = None):
    """Return ``Path(path)`` if it exists, else raise a :class:`UserError` naming it."""
    from pathlib import Path

    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} not found: {p}", fix or "check the path")
    return p


_NOTED: set[str] = set()


def note_once(message: str, key: str | None = None) -> None:
    """Say on stderr, once per process, that genperc changed something silently otherwise (a prompt
    cut to the text encoder's length, 16-bit pixels reduced to 8 bits, damaged scenes skipped):
    one line, ``[genperc] note: …``, in the style of the other status lines. ``key`` (default: the
    message) is what counts as "the same note"."""
    import sys

    line = message.strip().replace("\n", " ")
    key = key or line
    if key in _NOTED:
        return
    _NOTED.add(key)
    print(f"[genperc] note: {line}", file=sys.stderr, flush=True)
