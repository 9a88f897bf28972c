"""Conditioning dropout for classifier-free / InstructPix2Pix guidance (Brooks et al. 2023, §3.2).

The trainer applies it to every micro-batch's conditions, drawing from its own seeded generator.
"""

from __future__ import annotations

import torch
from torch import Tensor

from genperc.diffusion.conditioning import Conditioning


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
