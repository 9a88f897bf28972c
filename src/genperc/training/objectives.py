"""The training objectives: the one denoising loss, and improved DDPM's hybrid loss with a learned variance.

Every objective is a callable ``objective(ctx: StepContext) -> {name: loss}`` with a ``group``
attribute (the trainer hands the combiner ``{group: {name: loss}}``; GenRep's objectives live in
:mod:`genperc.training.genrep.objectives`). :class:`DiffusionObjective` is the denoising loss of
every task (:func:`denoising_loss`: target from the clean x0, ADDP loss weights, the task's loss
mask); :class:`HybridDiffusionObjective` adds the variational bound for learned-variance models.

Improved DDPM (Nichol & Dhariwal 2021, §3.1) lets the model output a per-dimension interpolation
v ∈ [−1, 1] between the two natural reverse variances (their Eq. 15)::

    log Σ_θ(x_t, t) = frac·log β_t + (1 − frac)·log β̃_t,      frac = (v + 1)/2,
    β̃_t = (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · β_t                     (posterior variance)

and trains it with L_hybrid = L_simple + λ·L_vlb (their Eq. 16), where L_vlb back-propagates into
the variance only: the mean in L_vlb uses a *detached* copy of the prediction ("stop-gradient on
μ", §3.1). The VLB of one sampled t is

    t > 0:  L_t = KL( q(x_{t−1} | x_t, x0) ‖ p_θ(x_{t−1} | x_t) )              (Gaussian KL)
    t = 0:  L_0 = −log p_θ(x0 | x_1), a Gaussian discretised to 256 bins of width 2/255 (8-bit data)

both in bits per dimension (mean over dimensions / log 2). L_vlb = Σ_t L_t is estimated as
T·L_t with uniformly sampled t, so λ·L_vlb = λ·T·L_t; with λ = 0.001 and T = 1000 the per-step
term enters with weight 1 — the same scale as improved DDPM's "rescaled" hybrid loss.

Conventions made explicit here:

* β̃_0 = 0 makes log β̃_0 undefined; as improved DDPM we use the "clipped" log-variance that
  replaces β̃_0 by β̃_1 (only the t = 0 decoder term sees it). diffusers' ``learned_range`` instead
  clamps β̃_0 to 1e-20; it adds no noise at t = 0, so sampling does not differ.
* The model output is ``[prediction (C), v (C)]`` as the diffusion core expects; the prediction may
  be ε, x0 or v-parameterised (x̂0 is recovered exactly with ``NoiseSchedule.to_x0``).
* x̂0 is not clipped inside L_vlb.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from genperc.diffusion.conditioning import Conditioning
from genperc.diffusion.schedule import NoiseSchedule
from genperc.diffusion.variance import clipped_log_posterior_variance, learned_log_variance
from genperc.errors import UserError


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
    clean_cond: Conditioning | None = None  # the conditions before conditioning dropout
    space: object = None  # the image space (pixels or VAE latents) x0 and the model live in
    autocast: object = None  # callable → the trainer's mixed-precision context, for an objective's own forward
    generator: torch.Generator | None = None  # the trainer's generator, for an objective's own random draws


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


class DiscriminativeObjective:
    """ADDP Table 2's discriminative counterpart (``model.mode: discriminative``): the task's own
    loss (``task.discriminative_loss``: referring BCE + Dice, depth the SSI loss, the generalist per
    prompt) of one deterministic forward — the denoiser at t = T−1 on x_T = 0 with the batch's
    conditions (Garcia et al., WACV 2025; :func:`genperc.models.discriminative.discriminative_forward`).

    It runs its own forward under the trainer's mixed precision (``ctx.autocast``) on the conditions
    *before* dropout (``ctx.clean_cond``), so it neither uses the noised forward (``uses_output``
    False) nor the trainer's noising (``uses_noise`` False): without another objective that does, the
    trainer draws no timestep, noise or dropout at all."""

    group = "discriminative"
    uses_output = False
    uses_noise = False

    def __init__(self, task):
        self.task = task

    def __call__(self, ctx: StepContext) -> dict[str, Tensor]:
        from genperc.models.discriminative import discriminative_forward

        cond = ctx.clean_cond if ctx.clean_cond is not None else ctx.cond
        output = discriminative_forward(ctx.model, cond, ctx.schedule, ctx.space, ctx.batch.x0.shape,
                                        device=ctx.batch.x0.device, autocast=ctx.autocast)
        return self.task.discriminative_loss(output, ctx.batch)


def default_objectives(cfg, task, model=None) -> list:
    """The objectives of a run when none are given: the denoising loss, or for
    ``model.mode: discriminative`` the task's own loss of the one-step forward; with
    ``train.contrastive.enabled`` also DDAE++'s contrastive self-distillation of ``model`` (the
    unwrapped denoiser, :mod:`genperc.training.contrastive`)."""
    if cfg.model.mode == "discriminative":
        return [DiscriminativeObjective(task)]
    objectives = [DiffusionObjective()]
    if cfg.train.contrastive.enabled:
        from genperc.training.contrastive import ContrastiveSelfDistillation

        objectives.append(ContrastiveSelfDistillation(model, cfg.train.contrastive))
    return objectives


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_var: Tensor, bins: int = 256) -> Tensor:
    """log P(x) per element for data in [−1, 1] quantised to ``bins`` levels, under N(mean, e^log_var)
    integrated over each bin (width 2/(bins−1)); the outermost bins extend to ±∞."""
    half = 1.0 / (bins - 1)
    inv_std = torch.exp(-0.5 * log_var)
    upper = (x - mean + half) * inv_std
    lower = (x - mean - half) * inv_std
    cdf_upper = torch.special.ndtr(upper)
    cdf_lower = torch.special.ndtr(lower)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_one_minus_cdf_lower = torch.special.log_ndtr(-lower)
    mid = torch.log((cdf_upper - cdf_lower).clamp(min=1e-12))
    edge = 1.0 - half  # the first / last bin
    return torch.where(x < -edge, log_cdf_upper, torch.where(x > edge, log_one_minus_cdf_lower, mid))


def vlb_terms(schedule: NoiseSchedule, x0: Tensor, x_t: Tensor, t: Tensor, pred_x0: Tensor,
              v: Tensor) -> Tensor:
    """The per-sample VLB term L_t in bits/dim for the single-step reverse transition t → t−1.

    ``pred_x0`` is the model's x̂0 (pass it detached for the hybrid loss), ``v`` its variance output.
    """
    t = t.long()
    mean_q, var_q = schedule.posterior_mean_variance(x0, x_t, t, t - 1)
    logvar_q = clipped_log_posterior_variance(schedule)[t.cpu()].to(x0.device, x0.dtype)
    logvar_q = logvar_q.view(-1, *([1] * (x0.ndim - 1)))
    mean_p, _ = schedule.posterior_mean_variance(pred_x0, x_t, t, t - 1)
    logvar_p = learned_log_variance(schedule, v, t)
    kl = normal_kl(mean_q.to(v.dtype), logvar_q.to(v.dtype), mean_p.to(v.dtype), logvar_p).flatten(1).mean(1)
    nll = -discretized_gaussian_log_likelihood(x0.to(v.dtype), mean_p.to(v.dtype), logvar_p).flatten(1).mean(1)
    return torch.where(t == 0, nll, kl) / math.log(2.0)


class HybridDiffusionObjective:
    """Improved DDPM's L_hybrid = L_simple + λ·L_vlb for a learned-variance model (module doc).

    Returns ``{"simple": L_simple, "vlb": λ·T·mean(L_t)}``; L_simple is the one denoising loss
    (:func:`~genperc.training.objectives.denoising_loss`: target from the clean x0, loss weights as
    given, the task's loss mask). Without learned variance (output has C channels) only ``simple``
    is returned. Open choices: L_vlb takes neither the loss weights nor the loss mask (improved DDPM
    has neither; GenRep's images have no invalid pixels). Both terms belong to the ``generation``
    group (GenRep's L_genera).
    """

    group = "generation"

    def __init__(self, vlb_weight: float = 0.001):
        self.vlb_weight = float(vlb_weight)

    def __call__(self, ctx: StepContext) -> dict[str, Tensor]:
        simple, prediction, variance = denoising_loss(ctx)
        losses = {"simple": simple}
        if variance is not None and self.vlb_weight > 0:
            schedule = ctx.schedule
            pred_x0 = schedule.to_x0(prediction.detach().float(), ctx.x_t.float(), ctx.t)
            terms = vlb_terms(schedule, ctx.x0.float(), ctx.x_t.float(), ctx.t, pred_x0, variance.float())
            losses["vlb"] = self.vlb_weight * schedule.num_train_timesteps * terms.mean()
        return losses
