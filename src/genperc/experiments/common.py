"""What the experiment runners share: comma-separated choices, mean ± std cells and the machine line of their tables."""

from __future__ import annotations

import math
import statistics

from genperc.errors import UserError


def fmt_mean_std(values, scale: float = 1.0, digits: int = 1) -> str:
    """``mean ± sample std`` of the finite values (× ``scale``); one value alone; "–" for none."""
    vals = [v * scale for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def machine_line() -> str:
    """The machine a table was measured on, in words (CPU model, cores, GPU, torch)."""
    from genperc.inference import machine_info

    m = machine_info()
    return f"{m['cpu']}, {m['cores']} cores, " + (f"GPU {m['gpu']}" if m["gpu"] else "no GPU") + f", torch {m['torch']}"


def parse_choices(text: str, valid, what: str) -> list[str]:
    """``"a,b"`` → the named choices in order without repeats; a one-line error names the first
    one not in ``valid`` (``what``: "mode", "timestep spacing", …)."""
    names = list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    bad = [s for s in names if s not in valid]
    if bad or not names:
        raise UserError(f"unknown {what} {bad[0] if bad else text!r}", f"use any of {', '.join(valid)}, comma-separated")
    return names
