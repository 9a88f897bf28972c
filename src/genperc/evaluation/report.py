"""Self-contained HTML reports: metric tables, image grids and the training curve.

Pieces are plain functions returning HTML strings (escaped), so a report is assembled by the
caller (``genperc.demo``) and written next to its images (relative links, no server needed).
"""

from __future__ import annotations

import csv
import html
import math
import statistics
from pathlib import Path


def fmt_mean_std(values, scale: float = 1.0, digits: int = 1) -> str:
    """``mean ± sample std`` of the finite values (× ``scale``); one value alone; "–" for none."""
    vals = [v * scale for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def fmt(v, digits: int = 3) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if v.is_integer() and abs(v) >= 1:
            return str(int(v))
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def table(rows: list[dict], columns: list[str] | None = None, header: dict | None = None, bold_best: dict | None = None) -> str:
    """An HTML table of ``rows`` (dicts). ``bold_best``: {column: "max" | "min"} marks the best row."""
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    header = header or {}
    best = {}
    for col, how in (bold_best or {}).items():
        vals = [r.get(col) for r in rows if isinstance(r.get(col), float) and not math.isnan(r.get(col))]
        if vals:
            best[col] = max(vals) if how == "max" else min(vals)
    out = ["<table>", "<tr>" + "".join(f"<th>{html.escape(header.get(c, c))}</th>" for c in columns) + "</tr>"]
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c, "")
            s = fmt(v)
            if c in best and v == best[c]:
                s = f"<b>{s}</b>"
            cells.append(f"<td>{s}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def settings_list(settings: dict) -> str:
    items = "".join(f"<li><code>{html.escape(str(k))}</code>: {html.escape(str(v))}</li>" for k, v in settings.items())
    return f"<ul class='settings'>{items}</ul>"


def read_metrics_csv(path: Path) -> dict[str, list[float]]:
    cols: dict[str, list[float]] = {}
    with Path(path).open() as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                try:
                    cols.setdefault(k, []).append(float(v))
                except (TypeError, ValueError):
                    cols.setdefault(k, []).append(float("nan"))
    return cols


def training_curve(metrics_csv: Path, out_png: Path, smooth: int = 10) -> Path | None:
    """Loss against step from a run's ``metrics.csv`` (raw and a running mean), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not Path(metrics_csv).exists():
        return None
    cols = read_metrics_csv(metrics_csv)
    if not cols.get("step"):
        return None
    step, loss = np.asarray(cols["step"]), np.asarray(cols["loss"])
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    ax.plot(step, loss, color="#9ab", lw=0.8, label="loss (logged)")
    if len(loss) >= smooth:
        k = np.ones(smooth) / smooth
        ax.plot(step[smooth - 1:], np.convolve(loss, k, mode="valid"), color="#135", lw=1.6,
                label=f"running mean ({smooth})")
    ax.set_xlabel("step")
    ax.set_ylabel("diffusion loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    from genperc.images import save_figure

    return save_figure(fig, out_png)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; }
th, td { border: 1px solid #ccc; padding: 3px 9px; text-align: right; }
th { background: #f2f4f6; } td:first-child, th:first-child { text-align: left; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(250px, 1fr)); gap: 14px; }
.card { border: 1px solid #ddd; padding: 6px; font-size: 0.85em; }
.card img { width: 76px; height: 76px; image-rendering: pixelated; margin-right: 2px; }
.muted { color: #666; font-size: 0.9em; } code { background: #f4f4f4; padding: 0 3px; }
ul.settings { columns: 2; font-size: 0.9em; }
"""


def page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")
