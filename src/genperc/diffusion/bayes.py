"""Bayes' rule over per-state Gaussian-mixture log-densities (GenRep Eq. 2–3) — pure arithmetic on
log-densities, shared by training (the distillation target) and evaluation (the teacher's accuracy).

For per-state log-densities ℓ_{y,s} = log N(x; μ_{s,y}, σ²_{s,y}) of the kept states s = 1…S::

    log p(x|y) = logsumexp_s ℓ_{y,s} − log S                 (Eq. 2, the mixture's mean)
    p(y|x)     = softmax_y(log p(x|y) / τ)                    (Eq. 3, uniform prior; τ = 1 in the paper)

Algorithm 1 (line 29) divides the mixture by T//k instead of the number of kept states; the
constant is the same for every class and cancels in p(y|x).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def posterior_from_log_densities(log_densities: Tensor, kept: Tensor | None = None,
                                 temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """(log p(x|y) [..., K], log p(y|x) [..., K]) from per-state log-densities [..., K, S]."""
    ld = log_densities if kept is None else log_densities.index_select(-1, kept.to(log_densities.device))
    log_lik = torch.logsumexp(ld, dim=-1) - math.log(ld.shape[-1])
    # uniform prior: log p(y) is the same for every y and cancels in the softmax
    log_post = torch.log_softmax(log_lik / temperature, dim=-1)
    return log_lik, log_post
