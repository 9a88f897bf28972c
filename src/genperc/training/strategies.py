"""Strategy objects the one trainer composes: conditioning dropout, objectives, gradient combiners.

The training step is ``t ~ sampler → x0' = task.augment(x0, t) → x_t = add_noise(x0', ε, t) →
groups = {objective.group: objective(ctx)} → combiner.backward(groups)``; each arrow is a strategy chosen by config
so that ADDP (timestep sampling, augmentation) and GenRep (extra objectives, symmetric gradient
alignment) plug in without editing the loop (DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from genperc.diffusion.conditioning import Conditioning
from genperc.diffusion.schedule import NoiseSchedule
from genperc.errors import UserError


def conditioning_dropout(
    cond: Conditioning, null: Conditioning, p: float, generator: torch.Generator
) -> Conditioning:
    """InstructPix2Pix dropout for guidance: one uniform r per sample (Brooks et al. 2023, §3.2).

    Text is replaced by the null text (the embedding of "", not zeros) when r < 2p, the image by
    zeros when p ≤ r < 3p — i.e. 5% text only, 5% both, 5% image only for p = 0.05. A class label
    is dropped to the null class (``null.class_labels``) with the text rule when there is no text.
    Prompt and null text are right-padded to a common length (``Conditioning.pad_text``).
    """
    if p <= 0:
        return cond
    b = cond.batch_size
    r = torch.rand(b, generator=generator, device=generator.device).to(_device_of(cond))
    drop_text = r < 2 * p
    drop_image = (r >= p) & (r < 3 * p)
    out = cond
    if cond.text is not None:
        out = out.replace(**_text_where(drop_text, Conditioning(text=null.text, text_mask=null.text_mask), cond))
    elif cond.class_labels is not None and null.class_labels is not None:
        out = out.replace(class_labels=torch.where(drop_text, null.class_labels.expand(b), cond.class_labels))
    if cond.image is not None:
        out = out.replace(image=cond.image * (~drop_image).to(cond.image.dtype)[:, None, None, None])
    return out


def _text_where(use_null: Tensor, null: Conditioning, cond: Conditioning) -> dict[str, Tensor]:
    """Per row: the null text where ``use_null``, else the prompt (both padded to one length)."""
    length = max(cond.text.shape[1], null.text.shape[1])
    null = null.broadcast_to_batch(len(use_null)).pad_text(length)
    cond = cond.pad_text(length)
    return {
        "text": torch.where(use_null[:, None, None], null.text.to(cond.text.dtype), cond.text),
        "text_mask": torch.where(use_null[:, None], null.text_mask, cond.text_mask),
    }


def _device_of(cond: Conditioning):
    for v in (cond.text, cond.image, cond.class_labels):
        if v is not None:
            return v.device
    return torch.device("cpu")


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
    batch: object = None  # the TaskBatch (labels, extras, loss_mask) for objectives that need ground truth


class DenoisingLoss(NamedTuple):
    """What :func:`denoising_loss` returns: the weighted loss and the two halves of the output."""

    loss: Tensor  # scalar mean_i(w_i·L_i)
    prediction: Tensor  # the first C output channels: ε, x0 or v as the schedule's prediction type says
    variance: Tensor | None  # the learned-range interpolation v (second C channels), None without


def denoising_loss(ctx: StepContext) -> DenoisingLoss:
    """The denoising loss of both diffusion objectives.

    The output has C channels (the prediction) or 2C (learned variance: the prediction is the first
    half, the variance interpolation of improved DDPM Eq. 15 the second), told apart here only, by
    :func:`split_output`; the objectives read the halves from the result. The target is computed
    from the *clean* x0 and the x_t the model actually saw: x0-prediction regresses x0; ε-prediction
    ε* = (x_t − √ᾱ_t·x0)/√(1−ᾱ_t); v-prediction v* = √ᾱ_t·ε* − √(1−ᾱ_t)·x0. Without augmentation
    ε* is the drawn noise; with ADDP augmentation (x_t made from a corrupted x0') the targets still
    point at the clean target, as ADDP §3.2 asks.

    Per sample, L_i is the squared error averaged over the valid elements of the task's
    ``loss_mask`` (:func:`masked_mean_squared_error`; all elements without one). The batch loss is
    ``mean_i(w_i·L_i)`` with the timestep strategy's weights used as given (ADDP §3.1 loss scaling,
    w = T·c_t²): they are normalised by their expectation under the sampling distribution, E[w] = 1,
    not by the batch's mean, so the expected loss is the c_t²-weighted one at every batch size and
    under gradient accumulation (:mod:`genperc.diffusion.timesteps`).
    """
    prediction, variance = split_output(ctx.output, ctx.x0.shape[1])
    target = ctx.schedule.convert(ctx.x0, "x0", ctx.schedule.config.prediction_type, ctx.x_t, ctx.t)
    mask = getattr(ctx.batch, "loss_mask", None)
    per_sample = masked_mean_squared_error(prediction.float(), target.float(), mask)
    if ctx.weights is not None:
        per_sample = per_sample * ctx.weights.to(per_sample)
    return DenoisingLoss(per_sample.mean(), prediction, variance)


def split_output(output: Tensor, channels: int) -> tuple[Tensor, Tensor | None]:
    """(prediction, learned-variance v or None) of a raw model output for a ``channels``-channel x0."""
    if output.shape[1] == channels:
        return output, None
    if output.shape[1] == 2 * channels:
        return output[:, :channels], output[:, channels:]
    raise UserError(f"the model outputs {output.shape[1]} channels for a {channels}-channel target",
                    f"give the model {channels} output channels, or {2 * channels} with diffusion.learned_variance")


def masked_mean_squared_error(prediction: Tensor, target: Tensor, mask: Tensor | None) -> Tensor:
    """Per-sample squared error [B], averaged over the elements the mask marks valid.

    ``mask``: [B, 1, H, W] at the pixel resolution of the task's x0, 1 = valid (None = all valid).
    It is resized to the prediction's h×w by :func:`valid_cells`; then
    L_i = Σ err²·m / (C·Σ m). A sample without a valid element contributes 0 (not NaN).
    """
    err = (prediction - target).pow(2)
    if mask is None:
        return err.flatten(1).mean(1)
    m = valid_cells(mask, err.shape[-2:]).to(err).expand_as(err)
    valid = m.flatten(1).sum(1)
    return (err * m).flatten(1).sum(1) / valid.clamp_min(torch.finfo(err.dtype).tiny)


def valid_cells(mask: Tensor, size) -> Tensor:
    """Min-pool a validity mask [B, 1, H, W] to ``size`` (h, w): a cell is valid only if every pixel
    it covers is (Marigold's rule for its 8× VAE latents); an equal size returns the mask unchanged.
    When h does not divide H the cells are adaptive pooling's (possibly overlapping) windows."""
    mask = mask.float()
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return -F.adaptive_max_pool2d(-mask, tuple(size))


class DiffusionObjective:
    """The denoising loss (:func:`denoising_loss`) under the name ``diffusion``."""

    name = "diffusion"
    group = "generation"

    def __call__(self, ctx: StepContext) -> dict[str, Tensor]:
        return {self.name: denoising_loss(ctx).loss}


class SumCombiner:
    """Backpropagate the sum of every loss of every group (the plain gradient); DDP reduces it."""

    reduces_gradients = False

    def backward(self, groups: dict[str, dict[str, Tensor]], accelerator, scale: float = 1.0) -> None:
        accelerator.backward(sum(loss for losses in groups.values() for loss in losses.values()) * scale)
