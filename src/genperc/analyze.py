"""``genperc analyze``: ADDP's analyses — per-step perception curves, contribution factors c_t² and
pictures of the diffusion-tailored augmentation. Thin: parse, call the library, print.

* ``trajectory RUN``   → ``steps_<metric>.csv`` (N×S, denoising order), ``trajectory.png``,
  ``trajectory.json`` (:mod:`genperc.evaluation.trajectory`; ADDP Fig. 1a, 3, 7)
* ``contributions``    → ``c.json`` + bar plot from such a CSV, or from a run directly
  (:mod:`genperc.evaluation.contributions`; ADDP §3.1). Train with it:
  ``train.timesteps=prob-scaling train.contributions=PATH/c.json``.
* ``augment``          → a grid of augmented targets at several t (the kernels are in
  :mod:`genperc.tasks.augment`, the figure here: :func:`augmentation_figure`; ADDP Fig. 4)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from genperc.errors import UserError

if TYPE_CHECKING:
    from torch import Tensor

app = typer.Typer(help="ADDP analyses: per-step perception curves, contribution factors c_t², augmentation figures.",
                  no_args_is_help=True, add_completion=False)


def _trajectory(run_dir: Path, split: str, samples: int, steps: int | None, sampler: str | None, seed: int,
                metric: str | None, batch_size: int | None, weights: str, device: str | None, overrides, out: Path):
    from dataclasses import replace

    from genperc.data.sources import open_scene_source
    from genperc.evaluation.trajectory import step_metrics, write_step_metrics
    from genperc.inference import load_run

    run = load_run(run_dir, weights=weights, device=device, overrides=list(overrides or []))
    if run.mode == "discriminative":
        raise UserError(f"{run_dir} is a discriminative run (model.mode): one forward, no denoising trajectory",
                        "analyze a run trained with model.mode=generative")
    sample_cfg = run.cfg.sample
    if sampler is not None:
        sample_cfg = replace(sample_cfg, sampler=sampler, eta=sample_cfg.eta if sampler == "ddim" else 0.0)
    dataset = run.task.dataset(open_scene_source(run.cfg.data, split), run.cfg.data.resolution)
    result = step_metrics(run.model, run.task, dataset, schedule=run.schedule, space=run.space,
                          text_encoder=run.text_encoder, sample_cfg=sample_cfg, samples=samples, steps=steps,
                          seed=seed, device=run.device, metric=metric, batch_size=batch_size, progress=True)
    meta = {"run": str(run_dir), "checkpoint": run.checkpoint.name, "weights": run.weights, "split": split,
            "task": run.task.name, "sampler": sample_cfg.sampler, "steps": len(result.timesteps), "seed": seed,
            "T": run.schedule.num_train_timesteps}
    return result, write_step_metrics(result, out, meta), run


@app.command()
def trajectory(
    run_dir: Path = typer.Argument(..., help="A run directory written by `genperc train`."),
    split: str = typer.Option("val", help="Split of the run's data."),
    samples: int = typer.Option(64, help="Number of samples N (the first N of the split)."),
    steps: int = typer.Option(None, help="Denoising steps S (default: the run's sample.steps)."),
    sampler: str = typer.Option(None, help="ddim | euler-a | ddpm (default: the run's sample.sampler)."),
    seed: int = typer.Option(0, help="Seed of the sampling noise (same draws as `genperc eval`)."),
    metric: str = typer.Option(None, help="Per-sample metric to analyse (default: the task's main one, e.g. IoU, AbsRel)."),
    batch_size: int = typer.Option(None, help="Items per sampler call (default: the run's sample.batch_size)."),
    weights: str = typer.Option("ema", help="ema (falls back to model) | model."),
    device: str = typer.Option(None, help="cpu | cuda (default: cuda when available)."),
    out: Path = typer.Option(None, help="Output folder (default RUN/analysis/trajectory-<split>)."),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides of the run's config, e.g. data.path=…"),
):
    """Score the predicted x̂0 of every denoising step: N×S CSVs and the median/IQR curve (ADDP Fig. 1a)."""
    out = out or run_dir / "analysis" / f"trajectory-{split}"
    result, paths, _ = _trajectory(run_dir, split, samples, steps, sampler, seed, metric, batch_size, weights,
                                   device, overrides, out)
    import torch

    med = torch.nanquantile(result.matrix.double(), 0.5, dim=0)
    pairs = ", ".join(f"t={int(t)}:{float(m):.3f}" for t, m in zip(result.timesteps, med, strict=True))
    typer.echo(f"median {result.metric} by step (N={result.matrix.shape[0]}): {pairs}")
    typer.echo(f"wrote {paths['csv']}, {paths['plot']} and {paths['json']}")


def _num_timesteps(csv_path: Path, given: int | None) -> int:
    if given is not None:
        return given
    meta = csv_path.parent / "trajectory.json"
    if meta.is_file():
        try:
            return int(json.loads(meta.read_text())["T"])
        except (KeyError, ValueError, json.JSONDecodeError):
            pass
    return 1000


def _compare_tables(names: list[str], schedule, bins: int) -> dict:
    from genperc.diffusion.timesteps import AUTHOR_TABLES, bins_to_timesteps, diffusion_contributions, timesteps_to_bins

    out = {}
    for name in names:
        if name == "diffusion":
            if schedule is None:
                raise UserError("--compare diffusion needs the noise schedule", "pass --run RUN")
            out["diffusion c²"] = diffusion_contributions(schedule, bins=bins)
        elif name in AUTHOR_TABLES:
            if len(AUTHOR_TABLES[name]) == bins:
                out[name] = AUTHOR_TABLES[name]
            else:
                out[name] = timesteps_to_bins(bins_to_timesteps(AUTHOR_TABLES[name], 1000), bins)
        else:
            raise UserError(f"unknown table to compare with: {name}", "use diffusion, " + ", ".join(AUTHOR_TABLES))
    return out


@app.command()
def contributions(
    metrics: Path = typer.Option(None, "--metrics", help="N×S per-step metric CSV (from `analyze trajectory`)."),
    run_dir: Path = typer.Option(None, "--run", help="Compute the metric matrix from this run first."),
    out: Path = typer.Option(Path("c.json"), help="Output c.json (usable as train.contributions=PATH)."),
    bins: int = typer.Option(10, help="Number of timestep bins (bin 0 = least noise)."),
    num_train_timesteps: int = typer.Option(None, "--T", help="Training timesteps T (default: the run's, else 1000)."),
    within_bin: str = typer.Option("mean", help="Regressor of a bin with several steps: mean | last | all."),
    final: str = typer.Option("exclude", help="The final step: exclude (response only) | residual (its bin gets 1 − R²)."),
    floor: float = typer.Option(0.01, help="Minimum share of each bin (the authors' tables never go below 1%)."),
    adjusted: bool = typer.Option(False, help="Use adjusted R² (against over-fitting with few samples)."),
    compare: list[str] = typer.Option(None, help="Tables to draw for comparison: diffusion, addp-depth, addp-referring."),
    split: str = typer.Option("val", help="With --run: the split."),
    samples: int = typer.Option(64, help="With --run: number of samples."),
    steps: int = typer.Option(None, help="With --run: denoising steps."),
    seed: int = typer.Option(0, help="With --run: seed of the sampling noise."),
    metric: str = typer.Option(None, help="With --run: per-sample metric (default: the task's main one)."),
):
    """Contribution factors c_t² from per-step metrics by cumulative R² (ADDP §3.1): c.json and a bar plot."""
    from genperc.evaluation.contributions import perception_contributions, plot_contributions, write_contributions
    from genperc.evaluation.trajectory import read_step_csv

    if (metrics is None) == (run_dir is None):
        raise UserError("give exactly one of --metrics FILE.csv and --run RUN", "e.g. --metrics runs/x/analysis/trajectory-val/steps_IoU.csv")
    schedule = None
    if run_dir is not None:
        result, paths, run = _trajectory(run_dir, split, samples, steps, None, seed, metric, None, "ema", None, [],
                                         out.parent / f"{out.stem}-trajectory")
        matrix, timesteps, name = result.matrix, result.timesteps.tolist(), result.metric
        schedule = run.schedule
        T = num_train_timesteps or schedule.num_train_timesteps
        source = str(paths["csv"])
        typer.echo(f"per-step {name} of {matrix.shape[0]} samples → {paths['csv']}")
    else:
        matrix, timesteps, name = read_step_csv(metrics)
        T = _num_timesteps(metrics, num_train_timesteps)
        source = str(metrics)
    res = perception_contributions(matrix, timesteps, bins=bins, T=T, within_bin=within_bin, final=final,
                                   floor=floor, adjusted=adjusted)
    path = write_contributions(res, out, source=source, metric=name)
    plot = plot_contributions(res, out.with_suffix(".png"), compare=_compare_tables(list(compare or []), schedule, bins))
    typer.echo("c² per bin (bin 0 = least noise, %): " + " ".join(f"{100 * float(v):.1f}" for v in res.factors))
    typer.echo(f"cumulative R² {res.explained:.3f} from {res.n_samples} samples"
               + (f" ({res.dropped_samples} dropped)" if res.dropped_samples else ""))
    for note in res.notes:
        typer.echo(f"note: {note}")
    typer.echo(f"wrote {path} and {plot}; train with train.timesteps=prob-scaling train.contributions={path}")


@app.command()
def augment(
    task: str = typer.Option("referring", help="referring | depth."),
    out: Path = typer.Option(Path("augment.png"), help="Output PNG."),
    source: str = typer.Option("toy", help="Data source: toy | world | … (see data.source)."),
    path: Path = typer.Option(None, help="Data path for sources other than toy."),
    split: str = typer.Option("val", help="Split to take samples from."),
    resolution: int = typer.Option(64, help="Image resolution."),
    samples: int = typer.Option(4, help="Rows: number of samples."),
    timesteps: str = typer.Option("0,250,500,750,999", help="Columns: comma-separated timesteps."),
    intensity: float = typer.Option(1.0, help="Augmentation intensity multiplier (train.augment)."),
    num_train_timesteps: int = typer.Option(1000, "--T", help="Training timesteps T."),
    seed: int = typer.Option(0, help="Seed (the same draws in every column, scaled by t)."),
):
    """A grid of diffusion-tailored augmentations of the targets at several t (ADDP Fig. 4)."""
    try:
        ts = [int(v) for v in timesteps.split(",") if v.strip()]
    except ValueError as e:
        raise UserError(f"--timesteps {timesteps!r} is not a comma-separated list of integers", "e.g. 0,500,999") from e
    figure = augmentation_figure(task, out, source=source, path=path, split=split, resolution=resolution,
                            samples=samples, timesteps=ts, intensity=intensity, T=num_train_timesteps, seed=seed)
    typer.echo(f"wrote {figure}")


# ---------------------------------------------------------------------------------------------
# the augmentation figure (ADDP Fig. 4)


def augmentation_grid(task, batch, timesteps, seed: int = 0) -> Tensor:
    """[K, B, C, H, W]: the task batch's target augmented (``task.augment``) at each of the K
    ``timesteps``, every column with the same seed (the same random directions, scaled by t)."""
    import torch

    out = []
    for t in timesteps:
        generator = torch.Generator().manual_seed(seed)
        t_batch = torch.full((batch.x0.shape[0],), int(t), dtype=torch.long)
        out.append(task.augment(batch, t_batch, generator).detach().float().cpu())
    return torch.stack(out)


def _display(image: Tensor):
    """[C, H, W] in [−1, 1] → an array for imshow and its colormap (RGB, or viridis for one channel
    or replicated channels such as a depth target)."""
    import torch

    image = ((image.float() + 1) / 2).clamp(0, 1)
    if image.shape[0] == 3 and not (torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])):
        return image.permute(1, 2, 0).numpy(), None
    return image.mean(0).numpy(), "viridis"


def _figure_batch(task, source: str, path, split: str, resolution: int, samples: int):
    """The first ``samples`` items of the split as a prepared task batch."""
    from genperc.config import DataConfig
    from genperc.data.datasets import collate
    from genperc.data.sources import open_scene_source

    scenes = open_scene_source(DataConfig(source=source, path=str(path) if path else None, resolution=resolution),
                               split)
    dataset = task.dataset(scenes, resolution)
    count = min(samples, len(dataset))
    if count == 0:
        raise UserError(f"the {split} split of {source} is empty", "check --source / --path / --split")
    return task.prepare(collate([dataset[i] for i in range(count)]))


def augmentation_figure(task_name: str, out, *, source: str = "toy", path=None, split: str = "val",
                        resolution: int = 64, samples: int = 4, timesteps=(0, 250, 500, 750, 999),
                        intensity: float = 1.0, T: int = 1000, seed: int = 0) -> Path:
    """Save a grid (rows = samples, columns = clean target then x0' at each t) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from genperc.images import save_figure
    from genperc.tasks import create_task

    if samples < 1:
        raise UserError(f"samples must be ≥ 1, got {samples}", "use e.g. --samples 4")
    if not timesteps or any(not 0 <= int(t) < T for t in timesteps):
        raise UserError(f"timesteps must lie in [0, {T}), got {list(timesteps)}", "e.g. --timesteps 0,500,999")
    task = create_task(task_name)
    task.augment_intensity = float(intensity)
    task.num_train_timesteps = int(T)
    batch = _figure_batch(task, source, path, split, resolution, samples)
    grid = augmentation_grid(task, batch, timesteps, seed)
    rows, cols = batch.x0.shape[0], len(timesteps) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows + 0.4), dpi=120, squeeze=False)
    for r in range(rows):
        for c in range(cols):
            image, cmap = _display(batch.x0[r].cpu() if c == 0 else grid[c - 1, r])
            ax = axes[r][c]
            ax.imshow(image, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("clean x0" if c == 0 else f"t={int(timesteps[c - 1])}", fontsize=8)
    fig.suptitle(f"ADDP diffusion-tailored augmentation: {task_name}, intensity {intensity:g}", fontsize=9)
    return save_figure(fig, out)
