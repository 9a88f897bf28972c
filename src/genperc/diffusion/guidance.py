"""Guidance: several conditional predictions, computed in one batched forward, combined into one.

A guidance object says which conditionings to evaluate (:meth:`Guidance.branches`) and how to
combine the model outputs (:meth:`Guidance.combine`). The sampler concatenates the branches into
one batch (``Conditioning.cat``), calls the denoiser once per step and hands the per-branch
outputs back to ``combine``; nothing here knows about the sampling loop.

Every combination here is affine with weights summing to 1: ŷ = Σ_k w_k·y_k, Σ_k w_k = 1. For a
fixed x_t and t, each conversion among ε, x0 and v is affine in the prediction, y' = α·x_t + γ·y
(:func:`genperc.diffusion.schedule.convert_prediction`), so
Σ w_k (α·x_t + γ·y_k) = α·x_t + γ·Σ w_k y_k: combining ε-, x0- or v-predictions gives the same
result. Guidance therefore works on the model's native output, whatever its parameterisation.

Conventions:

* ``null`` holds the "dropped" version of each condition a guidance may drop: the embedding of
  the empty prompt "" in ``text``/``text_mask`` (not zeros: InstructPix2Pix trains with ""), the
  null class in ``class_labels``, and optionally ``image`` (default: zeros, as InstructPix2Pix).
  A field of ``null`` with batch size 1 is broadcast to the batch.
* ``branches(...)[0]`` is always the fully conditional branch; the sampler takes a learned
  variance (if any) from it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from genperc.diffusion.conditioning import Conditioning
from genperc.errors import UserError


@runtime_checkable
class Guidance(Protocol):
    """A guidance function plugged into the sampler."""

    def branches(self, cond: Conditioning, null: Conditioning | None) -> list[Conditioning]:
        """The conditionings to evaluate, each of the batch size of ``cond``; [0] fully conditional."""
        ...

    def combine(self, preds: list[Tensor]) -> Tensor:
        """One prediction from the per-branch predictions (same order as ``branches``)."""
        ...


def _batch_size(cond: Conditioning) -> int:
    b = cond.batch_size
    if b is None:
        raise UserError("guidance needs a non-empty condition", "pass cond with text, image or class_labels")
    return b


def _require_null(null: Conditioning | None, what: str) -> Conditioning:
    if null is None:
        raise UserError(f"{what} needs a null condition", "pass null_cond (e.g. the embedding of \"\" as null text)")
    return null


def _null_text(null: Conditioning, what: str) -> dict:
    if null.text is None:
        raise UserError(f"{what} needs the null text", 'set null_cond.text/text_mask to the embedding of ""')
    mask = null.text_mask
    if mask is None:
        mask = torch.ones(null.text.shape[:2], dtype=torch.bool, device=null.text.device)
    return {"text": null.text, "text_mask": mask}


def _null_image(cond: Conditioning, null: Conditioning | None, what: str) -> Tensor:
    if cond.image is None:
        raise UserError(f"{what} needs an image condition", "pass cond.image (the condition image)")
    if null is not None and null.image is not None:
        return null.image
    return torch.zeros_like(cond.image)


def _check_branch_count(preds: list[Tensor], n: int, what: str):
    if len(preds) != n:
        raise ValueError(f"{what}.combine expects {n} predictions, got {len(preds)}")


@dataclass(frozen=True)
class NoGuidance:
    """The conditional prediction as is (one branch)."""

    def branches(self, cond: Conditioning, null: Conditioning | None = None) -> list[Conditioning]:
        return [cond]

    def combine(self, preds: list[Tensor]) -> Tensor:
        _check_branch_count(preds, 1, "NoGuidance")
        return preds[0]


@dataclass(frozen=True)
class ClassifierFreeGuidance:
    """Classifier-free guidance (Ho & Salimans 2022, Eq. 6): ε̂ = ε_u + s·(ε_c − ε_u).

    The unconditional branch replaces every field that ``null`` provides (null text and/or null
    class, or a null image) and keeps the others from ``cond`` (e.g. the image of an
    image-conditioned model). ``scale`` = 1 is the conditional prediction.
    Branches: [conditional, unconditional].
    """

    scale: float = 7.5

    def branches(self, cond: Conditioning, null: Conditioning | None) -> list[Conditioning]:
        b = _batch_size(cond)
        null = _require_null(null, "classifier-free guidance").broadcast_to_batch(b)
        drop = {f.name: getattr(null, f.name) for f in fields(Conditioning) if getattr(null, f.name) is not None}
        if not drop:
            raise UserError("classifier-free guidance got an empty null condition",
                            "set null_cond.text (embedding of \"\") and/or null_cond.class_labels")
        if "text" in drop and "text_mask" not in drop:
            drop.update(_null_text(null, "classifier-free guidance"))
        return [cond, cond.replace(**drop)]

    def combine(self, preds: list[Tensor]) -> Tensor:
        _check_branch_count(preds, 2, "ClassifierFreeGuidance")
        c, u = preds
        return u + self.scale * (c - u)


@dataclass(frozen=True)
class InstructPix2PixGuidance:
    """InstructPix2Pix 3-way guidance (Brooks et al. 2023, Eq. 3):

        ε̂ = ε(∅I,∅T) + s_T·[ε(cI,cT) − ε(cI,∅T)] + s_I·[ε(cI,∅T) − ε(∅I,∅T)].

    Null text = ``null.text`` (the embedding of ""), null image = ``null.image`` or zeros.
    Branches in diffusers' ``StableDiffusionInstructPix2PixPipeline`` order:
    [(cI,cT), (cI,∅T), (∅I,∅T)]. Scales (1, 1) give the fully conditional prediction.
    """

    text_scale: float = 7.5
    image_scale: float = 1.5

    def branches(self, cond: Conditioning, null: Conditioning | None) -> list[Conditioning]:
        b = _batch_size(cond)
        null = _require_null(null, "InstructPix2Pix guidance").broadcast_to_batch(b)
        no_text = _null_text(null, "InstructPix2Pix guidance")
        no_image = _null_image(cond, null, "InstructPix2Pix guidance")
        return [cond, cond.replace(**no_text), cond.replace(image=no_image, **no_text)]

    def combine(self, preds: list[Tensor]) -> Tensor:
        _check_branch_count(preds, 3, "InstructPix2PixGuidance")
        full, image_only, uncond = preds
        return uncond + self.text_scale * (full - image_only) + self.image_scale * (image_only - uncond)


@dataclass(frozen=True)
class CorrectionalGuidance:
    """ADDP correctional guidance (ADDP §3.3, Eq. 5), with null text φ_D, null image φ_I and a
    negative description D⁻ (e.g. an object a language model says may be confused with the referred one):

        ε̃ = ε(φ_D,φ_I) + w_I·[ε(φ_D,I) − ε(φ_D,φ_I)]
                       + w_D⁻·[ε(D⁻,I) − ε(φ_D,I)] + w_D·[ε(D,I) − ε(D⁻,I)].

    The paper *recommends* w_D > w_D⁻ ("by setting w_D > w_D⁻, Eq. 5 increases the margins between
    denoising from D and D⁻"); it is not a condition of the formula, and the other side is
    accepted without a warning so that ablations can cross it. At w_D = w_D⁻ the two D⁻ terms cancel,
    w·[ε(D⁻,I) − ε(φ_D,I)] + w·[ε(D,I) − ε(D⁻,I)] = w·[ε(D,I) − ε(φ_D,I)]: InstructPix2Pix guidance
    with s_T = w_D, whatever D⁻ is (the anchor a correction is measured against); w_D < w_D⁻ gives
    D⁻ a positive weight (w_D⁻ − w_D) and pulls towards it.
    ``negative`` carries D⁻ in ``text``/``text_mask`` (batch 1 or B; its token length may differ
    from D's — the branches are padded to one length when batched). With D⁻ = φ_D this is
    InstructPix2Pix guidance with s_T = w_D, s_I = w_I. The paper gives no weights (REFERENCE.md:
    unverified); the defaults are InstructPix2Pix's scales with w_D⁻ = 1.

    **Several negatives at once** (the paper uses one; a user may name several confusers in one
    round): ``negative`` may be a sequence of K conditionings D⁻_1…D⁻_K, each its own branch, and
    ε(D⁻,I) in Eq. 5 becomes their mean ε̄⁻ = (1/K)·Σ_j ε(D⁻_j,I). Each D⁻_j then carries weight
    (w_D⁻ − w_D)/K, so the weights still sum to 1, K = 1 is Eq. 5 exactly, and the total push away
    from the negatives does not grow with K.
    Branches: [(D,I), (D⁻_1,I), …, (D⁻_K,I), (φ_D,I), (φ_D,φ_I)].
    """

    image_scale: float = 1.5
    negative_scale: float = 1.0
    text_scale: float = 7.5
    negative: Conditioning | tuple[Conditioning, ...] | None = None

    def __post_init__(self):
        negatives = self.negatives
        if not negatives or any(n is None or n.text is None for n in negatives):
            raise UserError("correctional guidance needs a negative description",
                            "pass negative=Conditioning(text=..., text_mask=...) for D⁻ (or a list of them)")

    @property
    def negatives(self) -> tuple[Conditioning, ...]:
        """D⁻_1…D⁻_K (K = 1 for a single ``negative``)."""
        if self.negative is None:
            return ()
        return (self.negative,) if isinstance(self.negative, Conditioning) else tuple(self.negative)

    def branches(self, cond: Conditioning, null: Conditioning | None) -> list[Conditioning]:
        b = _batch_size(cond)
        null = _require_null(null, "correctional guidance").broadcast_to_batch(b)
        device = cond.text.device if cond.text is not None else "cpu"
        negs = [_null_text(n.to(device).broadcast_to_batch(b), "correctional guidance") for n in self.negatives]
        no_text = _null_text(null, "correctional guidance")
        no_image = _null_image(cond, null, "correctional guidance")
        return [cond, *(cond.replace(**n) for n in negs), cond.replace(**no_text),
                cond.replace(image=no_image, **no_text)]

    def combine(self, preds: list[Tensor]) -> Tensor:
        _check_branch_count(preds, len(self.negatives) + 3, "CorrectionalGuidance")
        return combine_weighted(preds, self.weights())

    def weights(self) -> list[float]:
        """The affine weights on the K + 3 branches (they sum to 1)."""
        k = len(self.negatives)
        return [self.text_scale, *[(self.negative_scale - self.text_scale) / k] * k,
                self.image_scale - self.negative_scale, 1 - self.image_scale]


def combine_weighted(preds: list[Tensor], weights: list[float]) -> Tensor:
    """Σ_k w_k·preds_k — the general affine combination every guidance here is an instance of."""
    out = preds[0] * weights[0]
    for p, w in zip(preds[1:], weights[1:], strict=True):
        out = out + p * w
    return out
