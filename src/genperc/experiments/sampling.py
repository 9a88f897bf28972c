"""``genperc experiment sampling``: few-step perception (issue 11) — each run's headline metrics
and wall time per image at every number of sampling steps × timestep spacing.

Why these defaults. Garcia et al. ("Fine-Tuning Image-Conditional Diffusion Models is Easier than
You Think", WACV 2025) traced Marigold's poor few-step results to the DDIM timestep spacing, not to
the model: with diffusers' "leading" spacing a single DDIM step evaluates the model at an almost
clean timestep (t = 0 here; 1 with Marigold's ``steps_offset``) on pure noise, whereas "trailing"
spacing puts it at t = T − 1, the timestep at which training showed the model (almost) pure noise;
so fixed, one deterministic step does about as well as the best multi-step ensemble reported
before. Marigold v1.1 samples depth with trailing DDIM in 1–4 steps. Hence this experiment's
defaults: DDIM (``--sampler``), η = 0 (deterministic, as Marigold), ensemble 1 (the claim is per
sample, and an ensemble multiplies the time), the run's guidance scales, and trailing against
leading spacing at 1, 4, 10 and 50 steps.

Every cell is one :func:`genperc.inference.evaluate_run` (its ``metrics.json`` and ``samples.csv`` in
``OUT/<run>/<spacing>-<steps>/``); the time per image is that evaluation's wall time (sampling,
decoding, scoring and reading the items; opening the split excluded) over its items, after one
untimed warm-up item per run. On a shared machine these times are noisy: note its load. Written: ``OUT/sampling.csv`` (one row per run × spacing × steps) and ``OUT/tables.md``
(one table per run: rows steps, columns per spacing its headline metrics and s/image).
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

from genperc.errors import UserError
from genperc.experiments.common import machine_line, parse_choices

DEFAULT_STEPS = "1,4,10,50"
DEFAULT_SPACINGS = "trailing,leading"


def parse_steps(steps: str) -> list[int]:
    """``"1,4,10,50"`` → [1, 4, 10, 50]: positive integers, in the order given, without repeats."""
    try:
        values = [int(v) for v in steps.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--steps {steps!r} is not a comma-separated list of integers", "e.g. --steps 1,4,10,50") from None
    if not values or any(v < 1 for v in values):
        raise UserError(f"--steps {steps!r} needs positive step counts", "e.g. --steps 1,4,10,50")
    return list(dict.fromkeys(values))


def parse_spacings(spacings: str) -> list[str]:
    """``"trailing,leading"`` → the timestep spacings, each one diffusers knows."""
    from genperc.diffusion.schedule import TIMESTEP_SPACINGS

    return parse_choices(spacings, TIMESTEP_SPACINGS, "timestep spacing")


def check_sampler(sampler: str) -> str:
    from genperc.diffusion.schedule import SCHEDULER_KINDS

    if sampler not in SCHEDULER_KINDS:
        raise UserError(f"unknown sampler {sampler!r}", f"use one of: {', '.join(SCHEDULER_KINDS)}")
    return sampler


def headline_metrics(task: str) -> list[str]:
    """The metric columns of a task (its codec's :meth:`~genperc.tasks.base.Task.headline_metrics`)."""
    from genperc.tasks import TASKS

    return TASKS[task].headline_metrics() if task in TASKS else []


def training_steps(checkpoint: Path) -> int:
    """The optimizer steps a checkpoint was written after (its ``state.json``, else its name)."""
    state = checkpoint / "state.json"
    if state.is_file():
        return int(json.loads(state.read_text())["step"])
    return int(checkpoint.name.rsplit("-", 1)[-1])


def run_labels(runs: list[Path]) -> list[str]:
    """A distinct folder name per run (its directory name; ``-2``, ``-3`` … for repeats)."""
    labels: list[str] = []
    for run in runs:
        name, k = Path(run).resolve().name or "run", 2
        label = name
        while label in labels:
            label, k = f"{name}-{k}", k + 1
        labels.append(label)
    return labels


def measure_run(run_dir: Path, label: str, out: Path, *, steps: list[int], spacings: list[str], sampler: str,
                split: str, limit: int | None, seed: int, log=print) -> list[dict]:
    """One row per spacing × steps for one run: its headline metrics and the seconds per image."""
    from genperc.inference import evaluate_run, load_run

    run = load_run(run_dir)
    if run.mode == "discriminative":
        raise UserError(f"{run_dir} is a discriminative run (model.mode): one forward, no sampler to measure",
                        "measure runs trained with model.mode=generative (genperc eval scores this one)")
    common = dict(sampler=sampler, eta=0.0, ensemble=1, seed=seed)
    evaluate_run(run, split, steps=steps[0], spacing=spacings[0], limit=1, **common)  # warm-up, untimed
    metrics = run.task.headline_metrics()
    rows = []
    for spacing in spacings:
        for n in steps:
            res = evaluate_run(run, split, steps=n, spacing=spacing, limit=limit, out=out / label / f"{spacing}-{n}",
                               **common)
            st = res.settings
            row = {"run": str(run_dir), "label": label, "task": run.task.name,
                   "train_steps": training_steps(run.checkpoint), "checkpoint": st["checkpoint"],
                   "weights": st["weights"], "split": split, "items": st["items"],
                   **{k: st[k] for k in ("sampler", "spacing", "steps", "eta", "ensemble", "text_scale",
                                         "image_scale", "batch_size", "seed", "prediction_type")},
                   "seconds": st["seconds"], "s_per_image": st["seconds"] / st["items"],
                   "main_metric": run.task.main_metric,
                   **{m: res.summary.get(m, math.nan) for m in metrics}}
            rows.append(row)
            log(f"  {label} {spacing} {n} steps: " + ", ".join(f"{m} {row[m]:.4f}" for m in metrics)
                + f", {row['s_per_image']:.3g} s/image")
    return rows


def write_csv(rows: list[dict], path: Path) -> Path:
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _arrow(metric: str) -> str:
    from genperc.metrics import LOWER_IS_BETTER

    return "↓" if metric.rsplit("/", 1)[-1] in LOWER_IS_BETTER else "↑"


def _name(metric: str) -> str:
    return metric.replace("delta", "δ")


def _cell(value: float, digits: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, digits)


def render_table(rows: list[dict], machine: str) -> str:
    """One run's markdown table: rows steps, columns per spacing its headline metrics and s/image."""
    first = rows[0]
    metrics = [m for m in headline_metrics(first["task"]) if any(m in r for r in rows)] or [first["main_metric"]]
    spacings = list(dict.fromkeys(r["spacing"] for r in rows))
    steps = list(dict.fromkeys(r["steps"] for r in rows))
    by = {(r["spacing"], r["steps"]): r for r in rows}
    head = ["steps"] + [h for s in spacings for h in [*(f"{s} {_name(m)} {_arrow(m)}" for m in metrics), f"{s} s/image"]]
    lines = [f"### {first['run']}", "",
             f"{first['task']}, {first['train_steps']} training steps ({first['checkpoint']}, {first['weights']} "
             f"weights); {first['split']} split, {first['items']} items; {first['sampler']}, η {first['eta']:g}, "
             f"ensemble {first['ensemble']}, guidance s_T {first['text_scale']:g} / s_I {first['image_scale']:g} "
             f"(the run's), batch {first['batch_size']}, seed {first['seed']}; {first['prediction_type']}-prediction.",
             f"Machine: {machine}.", "",
             "| " + " | ".join(head) + " |", "|" + " ---: |" * len(head)]
    for n in steps:
        cells = [str(n)]
        for s in spacings:
            row = by.get((s, n), {})
            cells += [_cell(row.get(m), ".4f") for m in metrics] + [_cell(row.get("s_per_image"), ".3g")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_tables(rows: list[dict], machine: str) -> str:
    labels = list(dict.fromkeys(r["label"] for r in rows))
    parts = ["## Few-step perception: metric and time per image by sampling steps and timestep spacing", "",
             "`genperc experiment sampling` (genperc.experiments.sampling); Marigold v1.1 / Garcia et al. 2025: "
             "trailing DDIM, η 0, ensemble 1.", ""]
    parts += [render_table([r for r in rows if r["label"] == label], machine) for label in labels]
    return "\n".join(parts)


def run_experiment(runs: list[Path], out: Path, *, steps: str = DEFAULT_STEPS, spacings: str = DEFAULT_SPACINGS,
                   sampler: str = "ddim", split: str = "val", limit: int | None = None, seed: int = 0,
                   log=print) -> str:
    """Measure every run (arguments checked first, before any run is loaded); write
    ``OUT/sampling.csv`` and ``OUT/tables.md``; return the tables' markdown."""
    from genperc.build import latest_checkpoint

    step_counts, spacing_names, sampler = parse_steps(steps), parse_spacings(spacings), check_sampler(sampler)
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit} is not positive", "use e.g. --limit 100, or leave it out for the whole split")
    if not runs:
        raise UserError("no run directory given", "pass one or more directories written by 'genperc train'")
    runs = [Path(r) for r in runs]
    for run in runs:
        latest_checkpoint(run)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start, rows = time.perf_counter(), []
    for run, label in zip(runs, run_labels(runs), strict=True):
        log(f"{run}: {', '.join(spacing_names)} × {', '.join(map(str, step_counts))} steps ({sampler})")
        rows += measure_run(run, label, out, steps=step_counts, spacings=spacing_names, sampler=sampler,
                            split=split, limit=limit, seed=seed, log=log)
        write_csv(rows, out / "sampling.csv")
    tables = render_tables(rows, machine_line())
    (out / "tables.md").write_text(tables)
    log(f"{len(rows)} evaluations in {time.perf_counter() - start:.0f} s")
    return tables
