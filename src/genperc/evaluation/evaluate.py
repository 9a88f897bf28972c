"""Evaluate a denoiser on a task: sample, decode with the task codec, score per sample.

One code path for every task: the sampler produces the generated target (optionally several per
item, a test-time ensemble), the task decodes and scores it. Guidance is InstructPix2Pix 3-way
when the task has both text and an image condition, classifier-free otherwise, none at scales of 1.
The result holds the split-level summary, the per-sample values (and a row per item for a CSV),
the settings that produced it, and optionally the first generated images and predictions.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from genperc.errors import UserError
from genperc.models.conditioning import make_conditioning, null_conditioning


@dataclass
class EvalResult:
    summary: dict[str, float]
    per_sample: dict[str, torch.Tensor | list]
    predictions: list = field(default_factory=list)  # decoded predictions, when kept
    samples: list = field(default_factory=list)  # generated target images [-1, 1], when kept
    rows: list[dict] = field(default_factory=list)  # one per item: identifiers + scalar metrics
    settings: dict = field(default_factory=dict)  # sampler, steps, guidance, ensemble, task settings
    baselines: dict = field(default_factory=dict)  # {name: summary} of trivial baselines on the same items

    def write_csv(self, path: str | Path) -> Path:
        """The per-sample rows as CSV (NaN where a metric does not apply to the item)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fields: list[str] = []
        for row in self.rows:
            fields += [k for k in row if k not in fields]
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            for row in self.rows:
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) and not math.isnan(v) else v)
                            for k, v in row.items()})
        return path


def make_guidance(task, text_scale: float, image_scale: float):
    from genperc.diffusion.guidance import ClassifierFreeGuidance, InstructPix2PixGuidance

    if task.uses_text and task.cond_channels and (text_scale != 1 or image_scale != 1):
        return InstructPix2PixGuidance(text_scale=text_scale, image_scale=image_scale)
    if task.uses_text and text_scale != 1:
        return ClassifierFreeGuidance(text_scale)
    return None


def check_ensemble(ensemble, mode: str = "generative") -> None:
    """A positive ensemble size; a discriminative run (one deterministic forward) takes 1 only."""
    if not isinstance(ensemble, int) or ensemble < 1:
        raise UserError(f"ensemble must be a positive integer, got {ensemble!r}", "use --ensemble 1 (no ensemble) or more")
    if mode == "discriminative" and ensemble > 1:
        raise UserError(f"--ensemble {ensemble}: a discriminative run makes one deterministic prediction per item",
                        "drop --ensemble (or use --ensemble 1)")


def sample_targets(model, task, task_batch, *, schedule, space, text_encoder, sample_cfg, generator, device="cpu",
                   ensemble: int = 1, mode: str = "generative", guidance=None, callback=None) -> list[torch.Tensor]:
    """Generate ``ensemble`` target images per item of a TaskBatch, in one sampler call.

    Returns a list of ``ensemble`` tensors [B, C, H, W] on the CPU, clamped to [-1, 1] unless the
    task clamps after its own decoding (``task.clamps_own_decode``, depth: Marigold's order). The
    noise of member e is rows e·B … (e+1)·B of one draw from ``generator`` (so ``ensemble=1`` draws
    exactly [B, …]).

    ``mode="discriminative"`` (the run's ``model.mode``): no sampler — one forward at t = T−1 on
    x_T = 0 (:func:`genperc.models.discriminative.discriminative_forward`), the one member being
    the unclamped estimate x̂0 that ``task.decode_discriminative`` reads; nothing is drawn from
    ``generator`` and ``sample_cfg`` is not used.

    ``guidance``: a :class:`~genperc.diffusion.guidance.Guidance` in place of the one the sample
    settings imply (:func:`make_guidance`), e.g. ADDP's correctional guidance (Eq. 5);
    ``callback``: passed to the sampler, called with every
    :class:`~genperc.diffusion.sampler.TrajectoryStep` (the interactive session streams x̂0 with it)."""
    from genperc.diffusion.sampler import sample

    check_ensemble(ensemble, mode)
    cond = make_conditioning(task_batch, text_encoder, space, device)
    if mode == "discriminative":
        from genperc.models.discriminative import discriminative_forward

        x0 = discriminative_forward(model, cond, schedule, space, task_batch.x0.shape, device=device)
        return [x0.detach().float().cpu()]
    b = task_batch.x0.shape[0]
    if ensemble > 1:
        cond = cond.repeat(ensemble)
    shape = space.latent_shape((b * ensemble, *task_batch.x0.shape[1:]))
    noise = torch.randn(shape, generator=generator).to(device)
    if guidance is None:
        guidance = make_guidance(task, sample_cfg.text_scale, sample_cfg.image_scale)
    out = sample(model, noise, cond, schedule=schedule, sampler=sample_cfg.sampler, num_steps=sample_cfg.steps,
                 guidance=guidance, null_cond=null_conditioning(text_encoder, device), eta=sample_cfg.eta,
                 generator=generator, callback=callback)
    x0 = space.decode(out.sample, clamp=False).float().cpu()
    if not getattr(task, "clamps_own_decode", False):
        x0 = x0.clamp(-1, 1)
    return list(x0.chunk(ensemble, dim=0))


NOT_APPLICABLE = "n/a"


def sample_settings(sample_cfg, schedule, ensemble: int, seed: int, mode: str = "generative") -> dict:
    """Every setting that decides what the sampler draws, as used: the run's mode, sampler, steps,
    the timestep spacing of ``schedule`` (the one the sampler received), η, guidance scales,
    ensemble, items per sampler call, seed and the model's prediction type. A discriminative run
    has no sampler: its one forward is recorded (``forward``), the sampler's settings as "n/a"."""
    if mode == "discriminative":
        from genperc.models.discriminative import discriminative_timestep

        na = NOT_APPLICABLE
        return {"mode": mode, "forward": f"one step at t = {discriminative_timestep(schedule)} on x_T = 0 "
                                         "(Garcia et al. 2025)",
                "sampler": na, "steps": 1, "spacing": na, "eta": na, "text_scale": na, "image_scale": na,
                "ensemble": ensemble, "batch_size": sample_cfg.batch_size, "seed": na,
                "prediction_type": schedule.config.prediction_type}
    return {"mode": mode, "sampler": sample_cfg.sampler, "steps": sample_cfg.steps,
            "spacing": schedule.config.timestep_spacing, "eta": sample_cfg.eta, "text_scale": sample_cfg.text_scale,
            "image_scale": sample_cfg.image_scale, "ensemble": ensemble, "batch_size": sample_cfg.batch_size,
            "seed": seed, "prediction_type": schedule.config.prediction_type}


def decode_members(task, members: list[torch.Tensor], batch, mode: str = "generative"):
    """The prediction of :func:`sample_targets`' members: ``task.decode`` (one member),
    ``task.decode_ensemble`` (several), or ``task.decode_discriminative`` for a discriminative run."""
    if mode == "discriminative":
        return task.decode_discriminative(members[0], batch)
    return task.decode(members[0], batch) if len(members) == 1 else task.decode_ensemble(members, batch)


RESOLUTIONS = ("model", "ground-truth")


def check_resolution(resolution: str) -> str:
    if resolution not in RESOLUTIONS:
        raise UserError(f"unknown evaluation resolution {resolution!r}", f"use one of {', '.join(RESOLUTIONS)}")
    return resolution


def resolution_setting(resolution: str, dataset) -> str:
    """The line printed with every result: where the metrics were computed."""
    if resolution == "ground-truth":
        return "ground truth's own (prediction upsampled bilinearly; Marigold's protocol)"
    return f"model's ({getattr(dataset, 'resolution', None) or 'native'})"


@torch.no_grad()
def evaluate(model, task, dataset, *, schedule, space, text_encoder, sample_cfg, device="cpu",
             seed: int = 0, limit: int | None = None, keep: int = 0, progress: bool = False,
             ensemble: int = 1, resolution: str | None = None, mode: str = "generative") -> EvalResult:
    """Sample every item of ``dataset`` (or the first ``limit``) and score it with the task.

    ``ensemble`` > 1 generates that many targets per item from independent noise and combines them
    with ``task.decode_ensemble`` (Marigold's scale-and-shift ensemble for depth, Marigold §3.4).
    ``resolution`` (default: ``task.evaluation_resolution``) is where the metrics are computed:
    ``"model"`` (the dataset's resolution) or ``"ground-truth"`` (the prediction resized to the
    ground truth's own resolution, :meth:`Task.at_ground_truth_resolution`; the dataset must be
    built after setting ``task.evaluation_resolution = "ground-truth"``).
    ``keep`` keeps the first generated images and predictions (for figures). ``mode`` is the run's
    ``model.mode``: "discriminative" replaces the sampler by the one forward and ``task.decode`` by
    ``task.decode_discriminative`` (:func:`sample_targets`); the metrics are the same."""
    from genperc.data.datasets import collate

    check_ensemble(ensemble, mode)
    resolution = check_resolution(resolution or task.evaluation_resolution)
    if limit is not None and limit < 1:
        raise UserError(f"limit must be positive, got {limit}", "use e.g. --limit 100")
    model.eval()
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n == 0:
        raise UserError("the evaluation set is empty", "check data.source / data.path / data.val_split")
    subset = torch.utils.data.Subset(dataset, range(n))
    loader = DataLoader(subset, batch_size=sample_cfg.batch_size, shuffle=False, collate_fn=collate)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    per_sample: dict[str, list] = {}
    result = EvalResult(summary={}, per_sample={})
    iterator = loader
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(loader, desc="eval", unit="batch")
    for batch in iterator:
        task_batch = task.prepare(batch)
        members = sample_targets(model, task, task_batch, schedule=schedule, space=space, text_encoder=text_encoder,
                                 sample_cfg=sample_cfg, generator=generator, device=device, ensemble=ensemble,
                                 mode=mode)
        pred = decode_members(task, members, batch, mode)
        scored, truth = task.at_ground_truth_resolution(pred, batch) if resolution == "ground-truth" else (pred, batch)
        values = task.metrics(scored, truth)
        rows = task.describe(batch)
        for k, v in values.items():
            if isinstance(v, torch.Tensor):
                v = v.detach().cpu()
                per_sample.setdefault(k, []).append(v)
                if v.ndim == 1:
                    for row, x in zip(rows, v.tolist(), strict=True):
                        row[k] = float(x)
            else:
                per_sample.setdefault(k, []).extend(list(v))
        result.rows.extend(rows)
        if len(result.samples) < keep:
            result.samples.extend(list(members[0][: keep - len(result.samples)]))
            result.predictions.extend(list(pred[: keep - len(result.predictions)]))
    result.per_sample = {k: torch.cat(v) if v and isinstance(v[0], torch.Tensor) else v for k, v in per_sample.items()}
    result.summary = task.summarize(result.per_sample)
    result.settings = {**sample_settings(sample_cfg, schedule, ensemble, seed, mode), "limit": limit, "items": n,
                       "resolution": resolution_setting(resolution, dataset), "task": task.name, "task_settings": task.settings()}
    return result
