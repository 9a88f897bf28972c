"""What the experiment runners share: comma-separated choices, mean ± std cells and the machine line of their tables."""

from __future__ import annotations

from genperc.errors import UserError
from genperc.evaluation.report import fmt_mean_std  # noqa: F401  (shared with genperc.interactive)
from genperc.inference import machine_line  # noqa: F401


def parse_choices(text: str, valid, what: str) -> list[str]:
    """``"a,b"`` → the named choices in order without repeats; a one-line error names the first
    one not in ``valid`` (``what``: "mode", "timestep spacing", …)."""
    names = list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    bad = [s for s in names if s not in valid]
    if bad or not names:
        raise UserError(f"unknown {what} {bad[0] if bad else text!r}", f"use any of {', '.join(valid)}, comma-separated")
    return names
