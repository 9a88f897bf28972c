"""Referring image segmentation as InstructPix2Pix-style editing (ADDP §2, §4.1).

Target = the input image with the referred object's pixels replaced by pure red (255, 0, 0),
opaque as in ADDP's released code (``alpha`` < 1 blends instead); text = the raw expression; the
input image is the concatenated condition. Decoding: a pixel is mask when its RGB distance to red
is below ``threshold`` (50 of 255 in ADDP). Metrics per expression k: I_k = |P∧G|, U_k = |P∨G|;
the split-level oIoU = ΣI/ΣU, mIoU = mean I_k/U_k (0 when U_k = 0), Prec@X = share with IoU ≥ X
(``strict=True`` uses >). ``eval_resolution`` scores at another resolution: the generated image
is resized bilinearly before thresholding and the ground-truth mask by nearest neighbour (ADDP
evaluates at 512×512; None = the generation resolution). Threshold, comparison, alpha and
resolution are reported with every result (:meth:`ReferringTask.settings`), and the summary is
split by expression template family (``attribute`` / ``relation`` / ``ordinal`` on the world).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from genperc.errors import UserError
from genperc.metrics import iou_from, mask_intersection_union, referring_summary
from genperc.tasks.base import Task, TaskBatch

RED = (1.0, -1.0, -1.0)  # pure red (255, 0, 0) in [-1, 1]
PREC_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def overlay_colour(image: Tensor, mask: Tensor, colour=RED, alpha: float = 1.0) -> Tensor:
    """ADDP's referring target (§2, released code): (1 − α·m)·image + α·m·colour.

    ``image`` [B, 3, H, W] in [-1, 1]; ``mask`` [B, 1, H, W] or [B, H, W] (bool or float in
    [0, 1]); ``colour`` an RGB triple in [-1, 1] or one per sample [B, 3] (the augmentation's
    jittered colours); ``alpha`` 1 = opaque, as in the released code. The one home of the overlay:
    :meth:`ReferringTask.encode_target` and :mod:`genperc.tasks.augment` both call it."""
    colour = torch.as_tensor(colour, dtype=image.dtype, device=image.device).reshape(-1, 3, 1, 1)
    weight = mask.to(device=image.device, dtype=image.dtype) * alpha
    if weight.ndim == 3:
        weight = weight[:, None]
    return image * (1 - weight) + colour * weight


class ReferringTask(Task):
    name: ClassVar[str] = "referring"
    main_metric: ClassVar[str] = "oIoU"
    headline: ClassVar[tuple[str, ...]] = ("mIoU", "Prec@0.5")

    def __init__(self, threshold: float = 50.0, alpha: float = 1.0, strict: bool = False,
                 eval_resolution: int | None = None):
        if not 0 < float(threshold) <= 442:
            raise UserError(f"referring task: threshold={threshold} is not an RGB distance in (0, 442]",
                            "use e.g. task_options.threshold=50 (ADDP)")
        if not 0 < float(alpha) <= 1:
            raise UserError(f"referring task: alpha={alpha} must lie in (0, 1]", "use 1 for ADDP's opaque red")
        if eval_resolution is not None and int(eval_resolution) < 1:
            raise UserError(f"referring task: eval_resolution={eval_resolution} must be positive or null",
                            "e.g. task_options.eval_resolution=512")
        self.threshold = float(threshold)
        self.alpha = float(alpha)
        self.strict = bool(strict)
        self.eval_resolution = None if eval_resolution is None else int(eval_resolution)

    def dataset(self, source, resolution: int):
        from genperc.data.datasets import ReferringDataset

        return ReferringDataset(source, resolution=resolution)

    def encode_target(self, image: Tensor, mask: Tensor) -> Tensor:
        return overlay_colour(image, mask, RED, self.alpha)

    def prepare(self, batch: dict) -> TaskBatch:
        return TaskBatch(x0=self.encode_target(batch["image"], batch["mask"]), image=batch["image"],
                         texts=list(batch["text"]), extras={"mask": batch["mask"]})

    def augment(self, batch: TaskBatch, t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """ADDP §3.2 diffusion-tailored augmentation (``genperc.tasks.augment``); identity at intensity 0."""
        from genperc.tasks.augment import augment_referring_batch  # augment imports this module's overlay

        return augment_referring_batch(self, batch, t, generator)

    def request(self, image: Tensor, prompts: list[str] | None = None) -> tuple[TaskBatch, dict]:
        prompts = [p.strip() for p in (prompts or [])]
        if len(prompts) != image.shape[0] or not all(prompts):
            raise UserError("referring segmentation needs a non-empty referring expression",
                            'pass --prompt "the red cube left of the sphere"')
        return TaskBatch(x0=torch.zeros_like(image), image=image, texts=prompts), {"text": prompts}

    def red_distance(self, x0: Tensor) -> Tensor:
        """[B, 3, H, W] in [-1, 1] → RGB distance to pure red in 0..255 units, [B, 1, H, W]."""
        red = torch.tensor(RED, dtype=x0.dtype, device=x0.device).view(1, 3, 1, 1)
        return ((x0 - red) * 127.5).pow(2).sum(1, keepdim=True).sqrt()

    def decode(self, x0: Tensor, batch: dict | None = None) -> Tensor:
        """[B, 3, H, W] in [-1, 1] → bool mask [B, 1, H, W] (at ``eval_resolution`` if set)."""
        x0 = x0.float()
        if self.eval_resolution is not None and x0.shape[-1] != self.eval_resolution:
            x0 = F.interpolate(x0, size=(self.eval_resolution, self.eval_resolution), mode="bilinear",
                               align_corners=False)
        return self.red_distance(x0) < self.threshold

    def decode_ensemble(self, members: list[Tensor], batch: dict | None = None) -> Tensor:
        """Majority vote of the members' masks (a tie counts as mask)."""
        votes = torch.stack([self.decode(m, batch) for m in members]).float().mean(0)
        return votes >= 0.5

    # -- the discriminative counterpart ------------------------------------------------------

    @staticmethod
    def discriminative_logits(output: Tensor) -> Tensor:
        """The mask logits [B, 1, H, W] of a one-step estimate: the channel mean of x̂0. The mean
        rather than one channel, so that every output channel is trained (channel 0 alone would
        leave two thirds of the output layer without gradient) and the same rule as the channel
        mean that depth and the generalist's masks decode; mask = logit > 0."""
        return output.float().mean(1, keepdim=True)

    def discriminative_loss(self, output: Tensor, batch: TaskBatch) -> dict[str, Tensor]:
        """BCE + soft Dice (:mod:`genperc.tasks.losses`) of the mask logits against the referred
        object's mask, each averaged over pixels, then over the batch."""
        from genperc.tasks.losses import bce_loss, dice_loss

        logits = self.discriminative_logits(output)
        target = batch.extras["mask"].to(logits.device).float().reshape(logits.shape)
        return {"bce": bce_loss(logits, target).mean(), "dice": dice_loss(torch.sigmoid(logits), target).mean()}

    def decode_discriminative(self, output: Tensor, batch: dict | None = None) -> Tensor:
        """The one-step estimate → bool mask [B, 1, H, W]: logit > 0 (probability > 0.5), the logits
        resized bilinearly to ``eval_resolution`` first when it is set (as :meth:`decode` resizes)."""
        logits = self.discriminative_logits(output)
        if self.eval_resolution is not None and logits.shape[-1] != self.eval_resolution:
            logits = F.interpolate(logits, size=(self.eval_resolution, self.eval_resolution), mode="bilinear",
                                   align_corners=False)
        return logits > 0

    def metrics(self, prediction: Tensor, batch: dict) -> dict[str, Tensor | list]:
        gt = batch["mask"].to(prediction.device).bool()
        if gt.shape[-2:] != prediction.shape[-2:]:
            gt = F.interpolate(gt.float(), size=prediction.shape[-2:], mode="nearest") > 0.5
        inter, union = mask_intersection_union(prediction, gt)
        n = prediction.shape[0]
        return {"I": inter, "U": union, "IoU": iou_from(inter, union),
                "family": list(batch.get("family", ["unknown"] * n))}

    def summarize(self, per_sample: dict) -> dict[str, float]:
        inter, union = per_sample["I"], per_sample["U"]
        out = referring_summary(inter, union, PREC_THRESHOLDS, self.strict)
        out["n"] = float(inter.numel())
        families = per_sample.get("family")
        if families:
            for fam in sorted(set(families)):
                idx = torch.tensor([f == fam for f in families])
                for k, v in referring_summary(inter[idx], union[idx], PREC_THRESHOLDS, self.strict).items():
                    out[f"{fam}/{k}"] = v
                out[f"{fam}/n"] = float(idx.sum())
        return out

    def settings(self) -> dict:
        return {"threshold": self.threshold, "threshold_units": "RGB distance to (255,0,0), 0..255",
                "comparison": ">" if self.strict else ">=", "alpha": self.alpha,
                "eval_resolution": self.eval_resolution or "generation resolution"}

    def export(self, prediction: Tensor, out_dir: Path, image: np.ndarray, stem: str = "prediction") -> list[Path]:
        """Binary mask PNG (0/255) at the image's size and a red overlay."""
        from genperc.images import overlay_mask, resize_mask, save_mask, save_rgb, upscale

        mask = resize_mask(prediction.reshape(prediction.shape[-2:]), image.shape[:2])
        return [save_mask(mask, out_dir / f"{stem}_mask.png"),
                save_rgb(upscale(overlay_mask(image, mask), 256), out_dir / f"{stem}_overlay.png")]
