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

from genperc.errors import UserError


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
                f.name: (None if getattr(self, f.name) is None else _move_tensor(getattr(self, f.name), *args, **kwargs))
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

    def broadcast_to_batch(self, batch: int) -> Conditioning:
        """Expand every field of batch size 1 to ``batch`` (a view); fields of size ``batch`` stay."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None and v.shape[0] != batch:
                if v.shape[0] != 1:
                    raise UserError(
                        f"condition field '{f.name}' has batch size {v.shape[0]}, expected {batch} or 1",
                        "give the null / negative condition one row or one row per sample",
                    )
                v = v.expand(batch, *v.shape[1:])
            out[f.name] = v
        return Conditioning(**out)

    def pad_text(self, length: int) -> Conditioning:
        """Right-pad ``text`` and ``text_mask`` with zeros (mask False) to ``length`` tokens.

        The one home of text padding: concatenating branches of different prompt lengths
        (:meth:`cat`) and swapping in the null text (training's conditioning dropout) both use it.
        A model that honours ``text_mask`` gives the same output before and after padding; the
        tokenizers used here pad on the right as well. A text without a mask gets one (all its
        own tokens real). No text, or ``length`` tokens and a mask already: returned unchanged.
        """
        if self.text is None or (self.text.shape[1] == length and self.text_mask is not None):
            return self
        if self.text.shape[1] > length:
            raise ValueError(f"cannot pad {self.text.shape[1]} tokens to {length}")
        mask = self.text_mask
        if mask is None:
            mask = torch.ones(self.text.shape[:2], dtype=torch.bool, device=self.text.device)
        return self.replace(text=_pad_tokens(self.text, length), text_mask=_pad_tokens(mask, length))

    @staticmethod
    def cat(conds: list[Conditioning]) -> Conditioning:
        """Concatenate along the batch axis; text of different lengths is right-padded
        (:meth:`pad_text`) to the longest. A field must be present in all or none of the parts.
        """
        length = max((c.text.shape[1] for c in conds if c.text is not None), default=0)
        conds = [c.pad_text(length) for c in conds]
        out = {}
        for f in fields(Conditioning):
            vals = [getattr(c, f.name) for c in conds]
            present = [v is not None for v in vals]
            if not any(present):
                out[f.name] = None
                continue
            if not all(present):
                raise ValueError(f"Conditioning.cat: field '{f.name}' is missing in some parts")
            out[f.name] = torch.cat(vals, dim=0)
        return Conditioning(**out)


def _move_tensor(v: Tensor, *args, **kwargs) -> Tensor:
    # Masks, labels keep their dtype; only floating tensors follow a dtype change.
    if not v.is_floating_point():
        kwargs = {k: a for k, a in kwargs.items() if k != "dtype"}
        args = tuple(a for a in args if not isinstance(a, torch.dtype))
    return v.to(*args, **kwargs)


def _pad_tokens(v: Tensor, length: int) -> Tensor:
    """Zeros (False for a mask) appended along the token axis 1 up to ``length``."""
    pad_shape = (v.shape[0], length - v.shape[1], *v.shape[2:])
    return torch.cat([v, v.new_zeros(pad_shape)], dim=1)
