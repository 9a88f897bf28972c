"""Diffusion objectives beyond plain MSE: the improved-DDPM hybrid loss with a learned variance.

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

import torch
from torch import Tensor

from genperc.diffusion.schedule import NoiseSchedule
from genperc.diffusion.variance import clipped_log_posterior_variance, learned_log_variance
from genperc.training.strategies import StepContext, denoising_loss


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
    (:func:`~genperc.training.strategies.denoising_loss`: target from the clean x0, loss weights as
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
