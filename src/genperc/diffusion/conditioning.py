"""What a denoiser is conditioned on, as one batched, task-agnostic value.

Every condition the three papers use fits here: token-level text states with their attention mask
(cross-attention, InstructPix2Pix / ADDP), an image concatenated on the channel axis (Marigold,
InstructPix2Pix) and a class label (GenRep, DDAE++). (GenRep's semantic representation x_sem is an
argument of its own model, not a condition of the diffusion core.) Guidance builds several variants of one Conditioning and concatenates them into
a single batch so that all conditional predictions cost one forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


@dataclass
class Conditioning:
    """A batch of conditions. Every field is optional; present tensors share batch size B.

    text:        [B, L, D] token hidden states for cross-attention.
    text_mask:   [B, L] bool, True for real tokens (required when ``text`` is given).
    image:       [B, C, H, W] image (or latent) concatenated to the noisy input.
    class_labels:[B] long class indices.
    """

    text: Tensor | None = None
    text_mask: Tensor | None = None
    image: Tensor | None = None
    class_labels: Tensor | None = None

    @property
    def batch_size(self) -> int | None:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:
                return v.shape[0]
        return None

    def replace(self, **changes) -> Conditioning:
        return replace(self, **changes)

    def to(self, *args, **kwargs) -> Conditioning:
        return Conditioning(
            **{
                f.name: (None if getattr(self, f.name) is None else _to(getattr(self, f.name), *args, **kwargs))
                for f in fields(self)
            }
        )

    def index(self, idx) -> Conditioning:
        """Select rows (an index, slice, bool mask or index tensor) of every field."""
        return Conditioning(
            **{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[idx]) for f in fields(self)}
        )

    def repeat(self, n: int) -> Conditioning:
        """Repeat the whole batch ``n`` times along the batch axis (``[a, b] -> [a, b, a, b]``)."""
        def rep(v: Tensor) -> Tensor:
            return v.repeat(n, *([1] * (v.ndim - 1)))

        return Conditioning(
            **{f.name: (None if getattr(self, f.name) is None else rep(getattr(self, f.name))) for f in fields(self)}
        )

    @staticmethod
    def cat(conds: list[Conditioning]) -> Conditioning:
        """Concatenate along the batch axis; text of different lengths is right-padded (mask False).

        A field must be present in all or none of the parts.
        """
        out = {}
        for f in fields(Conditioning):
            vals = [getattr(c, f.name) for c in conds]
            present = [v is not None for v in vals]
            if not any(present):
                out[f.name] = None
                continue
            if not all(present):
                raise ValueError(f"Conditioning.cat: field '{f.name}' is missing in some parts")
            if f.name in ("text", "text_mask"):
                length = max(v.shape[1] for v in vals)
                vals = [_pad_tokens(v, length) for v in vals]
            out[f.name] = torch.cat(vals, dim=0)
        return Conditioning(**out)


def _to(v: Tensor, *args, **kwargs) -> Tensor:
    # Masks, labels keep their dtype; only floating tensors follow a dtype change.
    if not v.is_floating_point():
        kwargs = {k: a for k, a in kwargs.items() if k != "dtype"}
        args = tuple(a for a in args if not isinstance(a, torch.dtype))
    return v.to(*args, **kwargs)


def _pad_tokens(v: Tensor, length: int) -> Tensor:
    if v.shape[1] == length:
        return v
    pad_shape = (v.shape[0], length - v.shape[1], *v.shape[2:])
    return torch.cat([v, v.new_zeros(pad_shape)], dim=1)
