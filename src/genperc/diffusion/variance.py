"""The learned-range reverse variance of improved DDPM (Nichol & Dhariwal 2021, Eq. 15) — its one home.

The model outputs v ∈ [−1, 1] per element and the reverse variance interpolates, in log space,
between the two natural choices β_t (upper) and the posterior variance β̃_t (lower)::

    log Σ_θ(x_t, t) = frac·log β_t + (1 − frac)·log β̃_t,    frac = (v + 1)/2,
    β̃_t = (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · β_t.

β̃_0 = 0 makes log β̃_0 undefined; as improved DDPM we use the "clipped" log-variance that replaces
β̃_0 by β̃_1. The sampler (DDPM steps), the hybrid loss (L_vlb) and GenRep's variance factor
(Eq. 8) all read these functions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from genperc.diffusion.schedule import NoiseSchedule


def clipped_log_posterior_variance(schedule: NoiseSchedule) -> Tensor:
    """log β̃_t for every training t (float64), with β̃_0 replaced by β̃_1 (improved DDPM)."""
    ab = schedule.alphas_cumprod
    ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
    betas = schedule.betas
    post = betas * (1 - ab_prev) / (1 - ab)
    post = torch.cat([post[1:2], post[1:]])
    return post.log()


def learned_log_variance(schedule: NoiseSchedule, v: Tensor, t: Tensor) -> Tensor:
    """log Σ_θ = frac·log β_t + (1 − frac)·log β̃_t (clipped), frac = (v + 1)/2, per element."""
    t = torch.as_tensor(t, device=v.device).long().reshape(-1)
    max_log = schedule.betas.log()[t.cpu()].to(v.device, v.dtype).view(-1, *([1] * (v.ndim - 1)))
    min_log = clipped_log_posterior_variance(schedule)[t.cpu()].to(v.device, v.dtype).view(-1, *([1] * (v.ndim - 1)))
    return interpolate_log_variance(v, min_log, max_log)


def interpolate_log_variance(v: Tensor, min_log: Tensor, max_log: Tensor) -> Tensor:
    """Eq. 15 itself: frac·max_log + (1 − frac)·min_log with frac = (v + 1)/2.

    The bounds are log β̃ (lower) and log β (upper) of the step taken: per training t above; for
    a strided sampler step t → t' the sampler passes β = 1 − ᾱ_t/ᾱ_t' and its β̃ (diffusers'
    "learned_range").
    """
    frac = (v + 1) / 2
    return min_log + frac * (max_log - min_log)  # = frac·max + (1−frac)·min, without cancellation for large |v|


def log_beta_range(schedule) -> Tensor:
    """log β_t − log β̃_t for every training t (β̃_0 → β̃_1): the width of the learned-range interval."""
    return schedule.betas.log() - clipped_log_posterior_variance(schedule)
