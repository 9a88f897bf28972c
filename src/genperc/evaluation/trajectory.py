"""Per-step perception analysis (ADDP Fig. 1a, 3, 7): how the quality of the predicted x̂0 evolves
along the denoising trajectory.

:func:`step_metrics` runs the sampler once per batch; at every step a callback decodes the step's
x̂0 with the task codec and scores it with the task's per-sample metrics
(``task.metrics(task.decode(x̂0, batch), batch)``), so the analysis of N samples × S steps costs
one sampling run, not N×S — and nothing task-specific lives here. The result is an N×S matrix per
metric key, **columns in denoising order** (column 0 = the first, noisiest step; column S−1 = the
final prediction), with the timestep of each column.

The noise is drawn exactly as :func:`genperc.evaluation.evaluate.evaluate` draws it (one CPU
generator seeded with ``seed``, x_T per batch in order), so with the same seed, sampler, steps and
batch size the last column equals that evaluation's per-sample metric.

Files: :func:`write_step_csv` / :func:`read_step_csv` (rows = samples, first column the sample's
index, then one column per step in denoising order, headed ``<metric>@t=<timestep>``; plain integer
headers are read too), :func:`plot_step_metrics` (median and interquartile band against the
timestep, denoising progressing left to right).
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from genperc.errors import UserError

#: split-level summary names → the per-sample metric they aggregate
PER_SAMPLE_ALIASES = {"oIoU": "IoU", "mIoU": "IoU", "cIoU": "IoU", "gIoU": "IoU"}
#: metrics plotted next to the main one when a task reports them (the paper's figures: IoU, δ1, AbsRel)
PLOT_ALSO = ("IoU", "delta1", "AbsRel")


@dataclass
class StepMetrics:
    """Per-sample metrics at every denoising step."""

    timesteps: Tensor  # LongTensor [S], denoising order (first = noisiest)
    values: dict[str, Tensor]  # metric key → float [N, S]
    metric: str  # the main per-sample key
    indices: list[int]  # dataset index of each row
    labels: dict[str, list] = field(default_factory=dict)  # per-sample lists the task reports (e.g. family)

    @property
    def matrix(self) -> Tensor:
        """The main metric, [N, S]."""
        return self.values[self.metric]

    def summary(self) -> dict:
        out = {"metric": self.metric, "timesteps": [int(t) for t in self.timesteps], "n_samples": len(self.indices),
               "per_step": {}}
        for k, v in self.values.items():
            q = _quantiles(v)
            out["per_step"][k] = {"median": q[1].tolist(), "q25": q[0].tolist(), "q75": q[2].tolist(),
                                  "mean": v.float().nanmean(0).tolist()}
        return out


def per_sample_metric_key(task, keys, metric: str | None = None) -> str:
    """The per-sample metric to analyse: ``metric`` if given; else the task's ``step_metric``
    attribute; else its ``main_metric`` when that is per-sample; else the per-sample metric the
    summary aggregates (oIoU → IoU); else the first key."""
    keys = list(keys)
    for cand in (metric, getattr(task, "step_metric", None), getattr(task, "main_metric", None),
                 PER_SAMPLE_ALIASES.get(getattr(task, "main_metric", "") or "")):
        if cand and cand in keys:
            return cand
    if metric:
        raise UserError(f"metric '{metric}' is not a per-sample metric of task '{task.name}'",
                        "choose one of: " + ", ".join(keys))
    if not keys:
        raise UserError(f"task '{task.name}' returned no per-sample metrics", "check the task's metrics()")
    return keys[0]


@torch.no_grad()
def step_metrics(model, task, dataset, *, schedule, space, text_encoder, sample_cfg, samples: int | None = None,
                 steps: int | None = None, seed: int = 0, device="cpu", metric: str | None = None,
                 batch_size: int | None = None, progress: bool = False) -> StepMetrics:
    """Score the decoded x̂0 of every denoising step of the first ``samples`` items of ``dataset``
    (module doc). ``steps`` overrides ``sample_cfg.steps``; the sampler, guidance scales and η come
    from ``sample_cfg``."""
    from torch.utils.data import DataLoader

    from genperc.data.datasets import collate
    from genperc.diffusion.sampler import sample
    from genperc.evaluation.evaluate import make_guidance
    from genperc.models.conditioning import make_conditioning, null_conditioning

    count = len(dataset) if samples is None else min(int(samples), len(dataset))
    if count < 1:
        raise UserError("no samples to analyse", "pass --samples ≥ 1 and a non-empty split")
    num_steps = int(steps if steps is not None else sample_cfg.steps)
    if hasattr(model, "eval"):
        model.eval()
    loader = DataLoader(torch.utils.data.Subset(dataset, range(count)),
                        batch_size=batch_size or sample_cfg.batch_size, shuffle=False, collate_fn=collate)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    guidance = make_guidance(task, sample_cfg.text_scale, sample_cfg.image_scale)
    null = null_conditioning(text_encoder, device)
    rows: dict[str, list[Tensor]] = {}
    timesteps: list[int] | None = None
    indices: list[int] = []
    labels: dict[str, list] = {}
    iterator = loader
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(loader, desc="trajectory", unit="batch")
    for batch in iterator:
        task_batch = task.prepare(batch)
        cond = make_conditioning(task_batch, text_encoder, space, device)
        noise = torch.randn(space.latent_shape(task_batch.x0.shape), generator=generator).to(device)
        per_step: list[dict[str, Tensor]] = []
        seen: list[int] = []

        def score(step, batch=batch, per_step=per_step, seen=seen):
            x0 = space.decode(step.pred_x0).clamp(-1, 1).cpu()
            step_scores = task.metrics(task.decode(x0, batch), batch)
            if not per_step:  # lists do not change with the step: keep them once
                for k, v in step_scores.items():
                    if isinstance(v, list):
                        labels.setdefault(k, []).extend(v)
            per_step.append({k: v.detach().float().cpu() for k, v in step_scores.items()
                             if isinstance(v, Tensor) and v.ndim == 1})  # lists (e.g. family) are not per-step
            seen.append(step.timestep)

        sample(model, noise, cond, schedule=schedule, sampler=sample_cfg.sampler, num_steps=num_steps,
               guidance=guidance, null_cond=null, eta=sample_cfg.eta, generator=generator, callback=score)
        if timesteps is None:
            timesteps = seen
        for k in per_step[0]:
            rows.setdefault(k, []).append(torch.stack([s[k] for s in per_step], 1))  # [B, S]
        batch_indices = batch.get("index")
        if isinstance(batch_indices, Tensor):
            indices.extend(int(i) for i in batch_indices.flatten())
        else:
            indices.extend(range(len(indices), len(indices) + task_batch.x0.shape[0]))
    values = {k: torch.cat(v, 0) for k, v in rows.items()}
    key = per_sample_metric_key(task, values, metric)
    return StepMetrics(torch.tensor(timesteps, dtype=torch.long), values, key, [int(i) for i in indices], labels)


# ---------------------------------------------------------------------------------------------
# files


_HEADER = re.compile(r"^(?:(?P<metric>.*)@)?t\s*=\s*(?P<t>-?\d+)$|^(?P<bare>-?\d+)$")


def write_step_csv(path, matrix: Tensor, timesteps, metric: str, indices=None) -> Path:
    """Rows = samples (first column the sample's index), columns = steps in denoising order,
    headed ``<metric>@t=<timestep>``."""
    matrix = torch.as_tensor(matrix)
    ts = [int(t) for t in torch.as_tensor(timesteps).flatten()]
    if matrix.ndim != 2 or matrix.shape[1] != len(ts):
        raise UserError(f"matrix {tuple(matrix.shape)} does not match {len(ts)} timesteps", "one column per step")
    indices = list(range(matrix.shape[0])) if indices is None else [int(i) for i in indices]
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sample"] + [f"{metric}@t={t}" for t in ts])
        for i, row in zip(indices, matrix.tolist(), strict=True):
            w.writerow([i] + [repr(float(v)) for v in row])
    return p


def read_step_csv(path) -> tuple[Tensor, list[int], str]:
    """(matrix float64 [N, S], timesteps [S], metric name) from a CSV of :func:`write_step_csv`'s
    layout. A first column whose header is not a timestep is taken as the sample index."""
    from genperc.errors import require_path

    p = require_path(path, "metrics CSV", "pass the CSV written by 'genperc analyze trajectory'")
    with p.open(newline="") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if len(rows) < 2:
        raise UserError(f"{p} has no data rows", "pass a CSV with a header and one row per sample")
    header = [c.strip() for c in rows[0]]
    parsed = [_HEADER.match(c) for c in header]
    start = 0 if parsed[0] else 1
    if not all(parsed[start:]) or len(header) - start < 2:
        bad = next((c for c, m in zip(header[start:], parsed[start:], strict=True) if not m), header[0])
        raise UserError(f"{p}: cannot read a timestep from the column header '{bad}'",
                        "head the step columns 'METRIC@t=999' or '999', in denoising order")
    timesteps = [int(m.group("t") or m.group("bare")) for m in parsed[start:]]
    metric = next((m.group("metric") for m in parsed[start:] if m.group("metric")), "") or "metric"
    try:
        data = [[float(c) if c.strip() else float("nan") for c in r[start:]] for r in rows[1:]]
    except ValueError as e:
        raise UserError(f"{p}: non-numeric value ({e})", "every step column must hold numbers") from e
    if any(len(r) != len(timesteps) for r in data):
        raise UserError(f"{p}: rows have different lengths", "write one value per step in every row")
    return torch.tensor(data, dtype=torch.float64), timesteps, metric


def _quantiles(v: Tensor) -> Tensor:
    q = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    return torch.nanquantile(v.to(torch.float64), q, dim=0)


def plot_step_metrics(values: dict[str, Tensor] | Tensor, timesteps, path, metric: str = "metric",
                      title: str = "", max_panels: int = 4) -> Path:
    """Median and interquartile band against the timestep (x axis from T down to 0: denoising runs
    left to right). ``values``: one [N, S] matrix or {key: matrix}; panels: ``metric`` and those
    of :data:`PLOT_ALSO` present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if isinstance(values, Tensor):
        values = {metric: values}
    if metric not in values:
        metric = next(iter(values))
    keys = [metric] + [k for k in PLOT_ALSO if k in values and k != metric]
    keys = keys[:max_panels]
    ts = [int(t) for t in torch.as_tensor(timesteps).flatten()]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), dpi=120, squeeze=False)
    for ax, k in zip(axes[0], keys, strict=False):
        q = _quantiles(values[k])
        ax.fill_between(ts, q[0].tolist(), q[2].tolist(), color="#4C72B0", alpha=0.25, lw=0, label="IQR")
        ax.plot(ts, q[1].tolist(), "o-", color="#4C72B0", ms=3, lw=1.5, label="median")
        ax.set_xlim(max(ts) + 0.02 * (max(ts) - min(ts) + 1), min(ts) - 0.02 * (max(ts) - min(ts) + 1))
        ax.set_xlabel("timestep t (denoising →)")
        ax.set_ylabel(k)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    n = next(iter(values.values())).shape[0]
    fig.suptitle(title or f"per-step {metric} of the predicted x̂0 (N={n}, {len(ts)} steps)", fontsize=9)
    from genperc.images import save_figure

    return save_figure(fig, path)


def _slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key) or "metric"


def write_step_metrics(result: StepMetrics, out_dir, meta: dict | None = None) -> dict[str, Path]:
    """``steps_<key>.csv`` for every metric, ``trajectory.png`` and ``trajectory.json`` (summary:
    timesteps, per-step median / quartiles / mean, ``meta``). Returns the paths by name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for k, v in result.values.items():
        paths[k] = write_step_csv(out / f"steps_{_slug(k)}.csv", v, result.timesteps, k, result.indices)
    paths["csv"] = paths[result.metric]
    paths["plot"] = plot_step_metrics(result.values, result.timesteps, out / "trajectory.png", result.metric)
    summary = {**(meta or {}), **result.summary()}
    paths["json"] = out / "trajectory.json"
    paths["json"].write_text(json.dumps(summary, indent=1) + "\n")
    return paths


def plot_step_curves(panels: dict[str, dict], path, ylabel: str = "metric") -> Path:
    """Split-level metric against the denoising timestep for several runs, mean ± std over seeds:
    ``panels`` = {panel title: {curve label: (timesteps [S], values [seeds, S])}} (ADDP Fig. 7)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from genperc.images import save_figure

    panels = {k: v for k, v in panels.items() if v}
    if not panels:
        raise UserError("no curves to plot", "run at least one model first")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6), dpi=120, squeeze=False)
    for ax, (title, curves) in zip(axes[0], panels.items(), strict=True):
        for label, (ts, values) in curves.items():
            v = torch.as_tensor(values, dtype=torch.float64).reshape(-1, len(ts))
            mean = v.mean(0)
            ax.plot(ts, mean.tolist(), "o-", ms=3, lw=1.5, label=f"{label} (n={v.shape[0]})")
            if v.shape[0] > 1:
                std = v.std(0)
                ax.fill_between(ts, (mean - std).tolist(), (mean + std).tolist(), alpha=0.15, lw=0)
        ax.set_xlim(max(ts) + 20, min(ts) - 20)
        ax.set_xlabel("timestep t (denoising →)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)
