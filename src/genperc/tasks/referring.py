"""Referring image segmentation as InstructPix2Pix-style editing (ADDP §2, §4.1).

Target = the input image with the referred object's pixels replaced by pure red (255, 0, 0),
opaque as in ADDP's released code (``alpha`` < 1 blends instead); text = the raw expression; the
input image is the concatenated condition. Decoding: a pixel is mask when its RGB distance to red
is below ``threshold`` (50 of 255 in ADDP). Metrics per expression k: I_k = |P∧G|, U_k = |P∨G|;
the split-level oIoU = ΣI/ΣU, mIoU = mean I_k/U_k (0 when U_k = 0), Prec@X = share with IoU ≥ X
(``strict=True`` uses >). Threshold, comparison and resolution are reported with the result.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from genperc.tasks.base import Task, TaskBatch

RED = (1.0, -1.0, -1.0)  # pure red in [-1, 1]
PREC_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


class ReferringTask(Task):
    name: ClassVar[str] = "referring"
    main_metric: ClassVar[str] = "oIoU"

    def __init__(self, threshold: float = 50.0, alpha: float = 1.0, strict: bool = False):
        self.threshold = threshold
        self.alpha = alpha
        self.strict = strict

    def dataset(self, source, resolution: int):
        from genperc.data.datasets import ReferringDataset

        return ReferringDataset(source, resolution=resolution)

    def encode_target(self, image: Tensor, mask: Tensor) -> Tensor:
        red = torch.tensor(RED, dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
        m = mask.to(image.dtype) * self.alpha
        return image * (1 - m) + red * m

    def prepare(self, batch: dict) -> TaskBatch:
        return TaskBatch(x0=self.encode_target(batch["image"], batch["mask"]), image=batch["image"],
                         texts=list(batch["text"]), extras={"mask": batch["mask"]})

    def decode(self, x0: Tensor, batch: dict | None = None) -> Tensor:
        """[B, 3, H, W] in [-1, 1] → bool mask [B, 1, H, W]."""
        red = torch.tensor(RED, dtype=x0.dtype, device=x0.device).view(1, 3, 1, 1)
        dist = ((x0 - red) * 127.5).pow(2).sum(1, keepdim=True).sqrt()  # in 0..255 units
        return dist < self.threshold

    def metrics(self, prediction: Tensor, batch: dict) -> dict[str, Tensor]:
        gt = batch["mask"].to(prediction.device).bool()
        inter = (prediction & gt).flatten(1).sum(1).float()
        union = (prediction | gt).flatten(1).sum(1).float()
        iou = torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(union))
        return {"I": inter, "U": union, "IoU": iou}

    def summarize(self, per_sample: dict[str, Tensor]) -> dict[str, float]:
        iou = per_sample["IoU"].float()
        out = {
            "oIoU": float(per_sample["I"].sum() / per_sample["U"].sum().clamp_min(1)),
            "mIoU": float(iou.mean()),
        }
        for x in PREC_THRESHOLDS:
            hit = iou > x if self.strict else iou >= x
            out[f"Prec@{x:.1f}"] = float(hit.float().mean())
        return out

    def settings(self) -> dict:
        return {"threshold": self.threshold, "comparison": ">" if self.strict else ">=", "alpha": self.alpha}
