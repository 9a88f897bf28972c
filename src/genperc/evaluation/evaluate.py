"""Evaluate a denoiser on a task: sample, decode with the task codec, score per sample.

One code path for every task: the sampler produces the generated target (optionally its whole
trajectory), the task decodes and scores it. Guidance is InstructPix2Pix 3-way when the task has
both text and an image condition, classifier-free otherwise, none at scales of 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader

from genperc.build import make_conditioning, null_conditioning


@dataclass
class EvalResult:
    summary: dict[str, float]
    per_sample: dict[str, torch.Tensor]
    predictions: list = field(default_factory=list)  # decoded predictions, when kept
    samples: list = field(default_factory=list)  # generated target images [-1, 1], when kept


def make_guidance(task, text_scale: float, image_scale: float):
    from genperc.diffusion import guidance as G

    if task.uses_text and task.cond_channels and (text_scale != 1 or image_scale != 1):
        return G.InstructPix2PixGuidance(text_scale=text_scale, image_scale=image_scale)
    if task.uses_text and text_scale != 1:
        return G.ClassifierFreeGuidance(text_scale)
    return None


@torch.no_grad()
def evaluate(model, task, dataset, *, schedule, space, text_encoder, sample_cfg, device="cpu",
             seed: int = 0, limit: int | None = None, keep: int = 0, progress: bool = False) -> EvalResult:
    """Sample every item of ``dataset`` (or the first ``limit``) and score it with the task."""
    from genperc.data.datasets import collate
    from genperc.diffusion.sampler import sample

    model.eval()
    n = len(dataset) if limit is None else min(limit, len(dataset))
    subset = torch.utils.data.Subset(dataset, range(n))
    loader = DataLoader(subset, batch_size=sample_cfg.batch_size, shuffle=False, collate_fn=collate)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    guidance = make_guidance(task, sample_cfg.text_scale, sample_cfg.image_scale)
    null = null_conditioning(text_encoder, device)
    per_sample: dict[str, list[torch.Tensor]] = {}
    result = EvalResult(summary={}, per_sample={})
    iterator = loader
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(loader, desc="eval", unit="batch")
    for batch in iterator:
        tb = task.prepare(batch)
        cond = make_conditioning(tb, text_encoder, space, device)
        shape = space.latent_shape(tb.x0.shape)
        noise = torch.randn(shape, generator=generator).to(device)
        out = sample(model, noise, cond, schedule=schedule, sampler=sample_cfg.sampler,
                     num_steps=sample_cfg.steps, guidance=guidance, null_cond=null, eta=sample_cfg.eta,
                     generator=generator)
        x0 = space.decode(out.sample).clamp(-1, 1).cpu()
        pred = task.decode(x0, batch)
        for k, v in task.metrics(pred, batch).items():
            per_sample.setdefault(k, []).append(v.cpu())
        if len(result.samples) < keep:
            result.samples.extend(list(x0[: keep - len(result.samples)]))
            result.predictions.extend(list(pred[: keep - len(result.predictions)]))
    result.per_sample = {k: torch.cat(v) for k, v in per_sample.items()}
    result.summary = task.summarize(result.per_sample)
    return result
