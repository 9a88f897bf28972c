"""A contact sheet of one scene: RGB with boxes, colourised depth, instances, semantics, expressions."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from genperc.data.record import SceneRecord


def contact_sheet(record: SceneRecord, out, title: str | None = None,
                  categories: list[str] | None = None, max_expressions: int = 18) -> Path:
    """Write the contact sheet of ``record`` as a PNG at ``out``; returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Rectangle

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = plt.figure(figsize=(12, 7.5), dpi=100)
    grid = fig.add_gridspec(2, 3, height_ratios=[1, 1])
    panels = [fig.add_subplot(grid[0, k]) for k in range(3)] + [fig.add_subplot(grid[1, 0])]
    text_ax = fig.add_subplot(grid[1, 1:])
    for ax in panels + [text_ax]:
        ax.set_xticks([])
        ax.set_yticks([])

    ax = panels[0]
    ax.imshow(record.image, interpolation="nearest")
    palette = plt.get_cmap("tab10")
    for obj in record.objects:
        if obj.box is None:
            continue
        x0, y0, x1, y1 = obj.box
        color = palette((obj.id - 1) % 10)
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, lw=1.5, ec=color))
        ax.text(x0 - 0.5, y0 - 0.7, str(obj.id), color=color, fontsize=8, va="bottom")
    ax.set_title("RGB + boxes (id)")

    ax = panels[1]
    if record.depth is not None:
        valid = record.depth_valid if record.depth_valid is not None else record.depth > 0
        depth = np.ma.masked_where(~valid, record.depth)
        lo, hi = (np.percentile(record.depth[valid], [1, 95]) if valid.any() else (0.0, 1.0))
        im = ax.imshow(depth, cmap="magma_r", interpolation="nearest", vmin=lo, vmax=max(hi, lo + 1e-3))
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="metres")
    ax.set_title("planar depth (colours clipped at the 95th percentile)", fontsize=10)

    ax = panels[2]
    if record.instances is not None:
        colors = np.vstack([[0, 0, 0, 1]] + [palette(k % 10) for k in range(max(1, record.instances.max()))])
        ax.imshow(record.instances, cmap=ListedColormap(colors), vmin=0, vmax=len(colors) - 1,
                  interpolation="nearest")
    ax.set_title("instances")

    ax = panels[3]
    if record.semantic is not None:
        names = categories or [str(k) for k in range(int(record.semantic.max(initial=0)) + 1)]
        sem = np.ma.masked_less(record.semantic, 0)
        ax.imshow(sem, cmap=plt.get_cmap("Set2", max(2, len(names))), vmin=-0.5,
                  vmax=max(2, len(names)) - 0.5, interpolation="nearest")
        present = sorted(set(np.unique(record.semantic).tolist()) - {-1})
        ax.set_xlabel(", ".join(f"{k}={names[k]}" for k in present if k < len(names)), fontsize=8)
    ax.set_title("semantic")

    lines = []
    if record.class_label is not None:
        lines.append(f"class {record.class_label}: {record.meta.get('class_name', '')}")
    for obj in record.objects:
        a = obj.attributes
        lines.append(f"#{obj.id} {a.get('size', '')} {a.get('color', '')} {a.get('material', '')} "
                     f"{obj.category}, {a.get('pixels', '?')} px")
    lines.append("")
    for e in record.expressions[:max_expressions]:
        lines.append(textwrap.shorten(f"[{e.family}] {e.text} -> {e.object_ids}", 90))
    if len(record.expressions) > max_expressions:
        lines.append(f"... {len(record.expressions) - max_expressions} more expressions")
    text_ax.text(0.01, 0.99, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=8,
                 transform=text_ax.transAxes)
    text_ax.set_title("objects and referring expressions")
    text_ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def split_statistics(source, limit: int | None = None) -> dict:
    """What a camera design gives a model (issue 12): per scene the farthest valid depth, per
    object its visible pixels, per image the share of object pixels — over the first ``limit``
    scenes of a split. Medians / 90th percentiles as plain floats."""
    far, pixels, cover = [], [], []
    for i in range(len(source) if limit is None else min(limit, len(source))):
        record = source[i]
        valid = record.depth[record.depth_valid]
        far.append(float(valid.max()) if valid.size else float("nan"))
        pixels += [int((record.instances == o.id).sum()) for o in record.objects]
        cover.append(float((record.instances > 0).mean()))
    return {"scenes": len(far), "farthest_depth_median_m": float(np.nanmedian(far)),
            "farthest_depth_p90_m": float(np.nanpercentile(far, 90)), "object_pixels_median": float(np.median(pixels)),
            "object_pixels_p10": float(np.percentile(pixels, 10)), "object_cover_mean": float(np.mean(cover))}
