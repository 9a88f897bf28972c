"""The task losses of the discriminative counterpart (``model.mode: discriminative``).

Per-sample losses [B] (every one averaged over the pixels a ``mask`` marks valid, all pixels
without one), used by the task codecs' ``discriminative_loss``:

* :func:`bce_loss` — binary cross-entropy on logits (torch's ``binary_cross_entropy_with_logits``);
* :func:`dice_loss` — the soft Dice loss 1 − (2Σpg + 1)/(Σp + Σg + 1) on probabilities (Milletari
  et al. 2016, with the usual +1 smoothing: identical masks, empty ones included, give 0);
* :func:`ssi_loss` — the scale-and-shift-invariant depth loss of MiDaS (Ranftl et al., TPAMI 2020,
  Eq. 4: per image, align the prediction to the ground truth by least squares on the valid pixels)
  with the mean *absolute* error after the alignment, as Marigold-E2E-FT trains it (Garcia et al.,
  WACV 2025; their ``training/util/loss.py``, from Depth Anything). One deliberate difference: the
  least-squares scale enters by its magnitude, ŝ = |s|. For a prediction that correlates positively
  with the truth (s > 0) this is exactly the least-squares alignment s·p + t; a negatively
  correlated one is not flipped for free, so the loss is invariant to a positive scale and a shift
  of the prediction but not to its sign — which pins near = −1, the orientation the depth codec
  decodes and exports (a model trained from scratch would otherwise learn either orientation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _mask(mask: Tensor | None, like: Tensor) -> Tensor:
    if mask is None:
        return torch.ones_like(like)
    return mask.to(device=like.device, dtype=like.dtype).expand_as(like)


def _masked_mean(values: Tensor, m: Tensor) -> Tensor:
    return (values * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1.0)


def bce_loss(logits: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-sample binary cross-entropy [B] of ``logits`` against a {0, 1} ``target`` (same shape)."""
    logits = logits.float()
    target = target.to(logits)
    per_pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return _masked_mean(per_pixel, _mask(mask, logits))


def dice_loss(prob: Tensor, target: Tensor, mask: Tensor | None = None, smooth: float = 1.0) -> Tensor:
    """Per-sample soft Dice loss [B] of probabilities ``prob`` against a {0, 1} ``target``."""
    prob = prob.float()
    target = target.to(prob)
    m = _mask(mask, prob)
    inter = (prob * target * m).flatten(1).sum(1)
    total = (prob * m).flatten(1).sum(1) + (target * m).flatten(1).sum(1)
    return 1.0 - (2.0 * inter + smooth) / (total + smooth)


def align_scale_shift(prediction: Tensor, target: Tensor, mask: Tensor | None = None,
                      eps: float = 1e-6) -> Tensor:
    """The prediction aligned to the target per sample: |s|·(p − p̄) + ḡ, where s is the
    least-squares scale over the valid pixels (module doc; = the least-squares s·p + t when s > 0).
    A constant prediction (no variance) aligns to the target's mean."""
    p, g = prediction.float(), target.float()
    m = _mask(mask, p)
    count = m.flatten(1).sum(1).clamp_min(1.0)
    view = (-1,) + (1,) * (p.ndim - 1)
    p_mean = ((p * m).flatten(1).sum(1) / count).view(view)
    g_mean = ((g * m).flatten(1).sum(1) / count).view(view)
    pc, gc = (p - p_mean) * m, (g - g_mean) * m
    var = pc.pow(2).flatten(1).sum(1)
    cov = (pc * gc).flatten(1).sum(1)
    scale = (cov / var.clamp_min(eps)).abs().view(view)
    return scale * (p - p_mean) + g_mean


def ssi_loss(prediction: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-sample scale-and-shift-invariant loss [B]: the mean absolute error between the aligned
    prediction (:func:`align_scale_shift`) and the target over the valid pixels (module doc)."""
    aligned = align_scale_shift(prediction, target, mask)
    return _masked_mean((aligned - target.float()).abs(), _mask(mask, aligned))


def minmax_normalise(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Per sample, map [B, …] affinely (positive scale) onto [−1, 1]; a constant map → 0.
    Depth metrics align by least squares, so this changes no metric; export expects [−1, 1]."""
    flat = x.float().flatten(1)
    lo = flat.min(1).values.view((-1,) + (1,) * (x.ndim - 1))
    hi = flat.max(1).values.view((-1,) + (1,) * (x.ndim - 1))
    span = hi - lo
    out = (x.float() - lo) / span.clamp_min(eps) * 2 - 1
    return torch.where(span > eps, out, torch.zeros_like(out))
