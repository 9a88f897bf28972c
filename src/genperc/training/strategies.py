"""Strategy objects the one trainer composes: conditioning dropout, objectives, gradient combiners.

The training step is ``t ~ sampler → x0' = task.augment(x0, t) → x_t = add_noise(x0', ε, t) →
groups = {objective.group: objective(ctx)} → combiner.backward(groups)``; each arrow is a strategy chosen by config
so that ADDP (timestep sampling, augmentation) and GenRep (extra objectives, symmetric gradient
alignment) plug in without editing the loop (DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from genperc.diffusion.conditioning import Conditioning
from genperc.diffusion.schedule import NoiseSchedule


def conditioning_dropout(
    cond: Conditioning, null: Conditioning, p: float, generator: torch.Generator
) -> Conditioning:
    """InstructPix2Pix dropout for guidance: one uniform r per sample (Brooks et al. 2023, §3.2).

    Text is replaced by the null text (the embedding of "", not zeros) when r < 2p, the image by
    zeros when p ≤ r < 3p — i.e. 5% text only, 5% both, 5% image only for p = 0.05. A class label
    is dropped to the null class (``null.class_labels``) with the text rule when there is no text.
    """
    if p <= 0:
        return cond
    b = cond.batch_size
    r = torch.rand(b, generator=generator, device=generator.device).to(_device(cond))
    drop_text = r < 2 * p
    drop_image = (r >= p) & (r < 3 * p)
    out = cond
    if cond.text is not None:
        n = null.text.expand(b, -1, -1)
        nm = null.text_mask.expand(b, -1)
        length = max(cond.text.shape[1], n.shape[1])
        text, mask = _pad(cond.text, cond.text_mask, length)
        ntext, nmask = _pad(n, nm, length)
        keep = ~drop_text
        out = out.replace(
            text=torch.where(keep[:, None, None], text, ntext.to(text.dtype)),
            text_mask=torch.where(keep[:, None], mask, nmask),
        )
    elif cond.class_labels is not None and null.class_labels is not None:
        out = out.replace(class_labels=torch.where(drop_text, null.class_labels.expand(b), cond.class_labels))
    if cond.image is not None:
        out = out.replace(image=cond.image * (~drop_image).to(cond.image.dtype)[:, None, None, None])
    return out


def _device(cond: Conditioning):
    for v in (cond.text, cond.image, cond.class_labels):
        if v is not None:
            return v.device
    return torch.device("cpu")


def _pad(text: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    extra = length - text.shape[1]
    if extra == 0:
        return text, mask
    return (
        torch.cat([text, text.new_zeros(text.shape[0], extra, text.shape[2])], 1),
        torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], 1),
    )


@dataclass
class StepContext:
    """Everything an objective may read in one training step."""

    output: Tensor | None  # raw model output (None when no objective uses it: Trainer skips the forward)
    x0: Tensor  # the clean target (after space encoding), never the augmented one
    x_t: Tensor
    noise: Tensor
    t: Tensor
    weights: Tensor | None  # per-sample loss weights from the timestep strategy
    schedule: NoiseSchedule
    cond: Conditioning
    model: torch.nn.Module
    batch: object = None  # the TaskBatch (labels, extras) for objectives that need ground truth


class DiffusionObjective:
    """The denoising loss: MSE between the model output and the target of its parameterization.

    The target is computed from the *clean* x0 and the x_t the model actually saw:
    x0-prediction regresses x0; ε-prediction regresses ε* = (x_t − √ᾱ_t·x0)/√(1−ᾱ_t) and
    v-prediction v* = √ᾱ_t·ε* − √(1−ᾱ_t)·x0. Without augmentation ε* equals the drawn noise; with
    ADDP augmentation (x_t made from a corrupted x0') the targets still point at the clean target,
    which is what ADDP §3.2 asks of the loss. Per-sample weights (ADDP loss scaling) multiply the
    per-sample loss, renormalised to mean 1 over the batch.
    """

    name = "diffusion"

    def __call__(self, ctx: StepContext) -> dict[str, Tensor]:
        pred = ctx.output
        c = ctx.x0.shape[1]
        if pred.shape[1] != c:  # learned variance: the prediction is the first half
            pred = pred[:, :c]
        target = ctx.schedule.convert(ctx.x0, "x0", ctx.schedule.config.prediction_type, ctx.x_t, ctx.t)
        per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
        if ctx.weights is not None:
            w = ctx.weights.to(per_sample)
            per_sample = per_sample * w / w.mean().clamp_min(1e-12)
        return {self.name: per_sample.mean()}


class SumCombiner:
    """Backpropagate the sum of every loss of every group (the plain gradient); DDP reduces it."""

    reduces_gradients = False

    def backward(self, groups: dict[str, dict[str, Tensor]], accelerator, scale: float = 1.0) -> None:
        accelerator.backward(sum(loss for losses in groups.values() for loss in losses.values()) * scale)
