"""Deterministic resize / crop helpers shared by the task datasets.

A :class:`ResizePlan` is computed once per record from its size and the requested resolution, and
then applied to every field of the record so that they stay aligned:

* RGB: bilinear with antialiasing (an area-like filter when shrinking), output float CHW in
  [-1, 1] (DESIGN.md, "Images inside the library are float tensors in [-1, 1]");
* labels (semantic, instance ids, masks): nearest, sampled at pixel centres, so no new values;
* depth: a normalised (masked) average, so invalid pixels never mix into valid ones — the output
  is the average of the *valid* input pixels under the filter, and a pixel is valid when the
  valid share under the filter reaches ``valid_threshold``; or nearest;
* boxes: the same affine map, clipped to the output.

``plan.to_json()`` goes into each item's ``meta["geometry"]`` and ``plan.restore(...)`` maps a
prediction back to the original pixel grid for evaluation at native resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from genperc.errors import UserError

FITS = ("stretch", "center_crop")


def parse_resolution(resolution) -> tuple[int, int] | None:
    """``None`` (keep), an int (square) or ``(height, width)``."""
    if resolution is None:
        return None
    if isinstance(resolution, int | np.integer):
        size = (int(resolution), int(resolution))
    elif isinstance(resolution, list | tuple) and len(resolution) == 2:
        size = (int(resolution[0]), int(resolution[1]))
    else:
        raise UserError(f"resolution must be an int or (height, width), got {resolution!r}",
                        "e.g. resolution=64 or resolution=(48, 64)")
    if min(size) < 1:
        raise UserError(f"resolution must be positive, got {resolution!r}", "e.g. resolution=64")
    return size


@dataclass(frozen=True)
class ResizePlan:
    """Crop ``crop = (x0, y0, x1, y1)`` of an ``in_hw`` image, then resize it to ``out_hw``."""

    in_hw: tuple[int, int]
    crop: tuple[int, int, int, int]
    out_hw: tuple[int, int]

    @property
    def identity(self) -> bool:
        h, w = self.in_hw
        return self.crop == (0, 0, w, h) and self.out_hw == self.in_hw

    def to_json(self) -> dict:
        return {"orig_hw": list(self.in_hw), "crop_xyxy": list(self.crop),
                "out_hw": list(self.out_hw)}

    # -- applying ---------------------------------------------------------------------------

    def _cropped(self, arr: np.ndarray) -> np.ndarray:
        if tuple(arr.shape[:2]) != tuple(self.in_hw):
            raise ValueError(f"array of shape {arr.shape} does not match plan {self.in_hw}")
        x0, y0, x1, y1 = self.crop
        return arr[y0:y1, x0:x1]

    def image(self, image: np.ndarray) -> torch.Tensor:
        """uint8 ``[H, W, 3]`` → float32 ``[3, h, w]`` in [-1, 1]."""
        x = torch.from_numpy(np.ascontiguousarray(self._cropped(image))).permute(2, 0, 1)
        x = x.to(torch.float32) / 127.5 - 1.0
        if tuple(x.shape[1:]) != self.out_hw:
            x = F.interpolate(x[None], size=self.out_hw, mode="bilinear", align_corners=False,
                              antialias=True)[0]
        return x.clamp_(-1.0, 1.0).contiguous()

    def labels(self, labels: np.ndarray) -> np.ndarray:
        """Nearest neighbour at output pixel centres; keeps dtype and values (bool, ints)."""
        arr = self._cropped(labels)
        ch, cw = arr.shape[:2]
        oh, ow = self.out_hw
        if (ch, cw) == (oh, ow):
            return np.ascontiguousarray(arr)
        rows = np.minimum(((np.arange(oh) + 0.5) * ch / oh).astype(np.int64), ch - 1)
        cols = np.minimum(((np.arange(ow) + 0.5) * cw / ow).astype(np.int64), cw - 1)
        return np.ascontiguousarray(arr[rows][:, cols])

    def depth(self, depth: np.ndarray, valid: np.ndarray, mode: str = "masked_average",
              valid_threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
        """Resize depth without mixing invalid pixels; returns (depth float32, valid bool) with
        depth 0 where invalid. ``mode`` is ``"masked_average"`` or ``"nearest"``."""
        d = self._cropped(depth).astype(np.float32)
        v = self._cropped(valid).astype(bool) & np.isfinite(d)
        d = np.where(v, d, 0.0).astype(np.float32)
        if tuple(d.shape) == self.out_hw:
            return d, v
        if mode == "nearest":
            v2 = self.labels(v)
            return np.where(v2, self.labels(d), 0.0).astype(np.float32), v2
        if mode != "masked_average":
            raise UserError(f"unknown depth resize mode '{mode}'", "use 'masked_average' or 'nearest'")
        stack = torch.from_numpy(np.stack([d * v, v.astype(np.float32)]))[None].double()
        out = F.interpolate(stack, size=self.out_hw, mode="bilinear", align_corners=False,
                            antialias=True)[0]
        num, den = out[0].numpy(), out[1].numpy()
        v2 = den >= max(valid_threshold, 1e-6)
        d2 = np.where(v2, num / np.where(v2, den, 1.0), 0.0).astype(np.float32)
        return d2, v2

    def boxes(self, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Map ``[N, 4]`` xyxy boxes; returns (boxes float32 clipped to the output, keep bool [N]:
        boxes that keep a positive area)."""
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        x0, y0, x1, y1 = self.crop
        sx = self.out_hw[1] / (x1 - x0)
        sy = self.out_hw[0] / (y1 - y0)
        out = np.empty_like(b)
        out[:, [0, 2]] = np.clip((b[:, [0, 2]] - x0) * sx, 0, self.out_hw[1])
        out[:, [1, 3]] = np.clip((b[:, [1, 3]] - y0) * sy, 0, self.out_hw[0])
        keep = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
        return out.astype(np.float32), keep

    # -- inverting --------------------------------------------------------------------------

    def restore(self, pred: np.ndarray, fill=0, nearest: bool = True) -> np.ndarray:
        """Map an ``out_hw`` prediction (``[h, w]`` or ``[h, w, C]``) back to ``in_hw``: resized to
        the crop (nearest for labels, bilinear otherwise), ``fill`` outside the crop."""
        x0, y0, x1, y1 = self.crop
        ch, cw = y1 - y0, x1 - x0
        if nearest:
            inv = ResizePlan(tuple(pred.shape[:2]), (0, 0, pred.shape[1], pred.shape[0]), (ch, cw))
            inner = inv.labels(pred)
        else:
            t = torch.from_numpy(np.ascontiguousarray(pred, dtype=np.float32))
            t = t[None, None] if t.ndim == 2 else t.permute(2, 0, 1)[None]
            t = F.interpolate(t, size=(ch, cw), mode="bilinear", align_corners=False,
                              antialias=True)[0]
            inner = t[0].numpy() if pred.ndim == 2 else t.permute(1, 2, 0).numpy()
        out = np.full(tuple(self.in_hw) + tuple(pred.shape[2:]), fill, dtype=inner.dtype)
        out[y0:y1, x0:x1] = inner
        return out


def plan_resize(in_hw, resolution=None, fit: str = "stretch") -> ResizePlan:
    """Plan the resize of an ``in_hw`` image to ``resolution``.

    ``fit="stretch"`` resizes the whole image (aspect ratio may change);
    ``fit="center_crop"`` takes the largest centred window with the target aspect ratio and
    resizes it (the same as resizing the shorter side and centre-cropping, up to rounding).
    """
    h, w = int(in_hw[0]), int(in_hw[1])
    size = parse_resolution(resolution)
    if fit not in FITS:
        raise UserError(f"unknown fit '{fit}'", f"use one of {', '.join(FITS)}")
    if size is None:
        return ResizePlan((h, w), (0, 0, w, h), (h, w))
    oh, ow = size
    if fit == "stretch":
        return ResizePlan((h, w), (0, 0, w, h), (oh, ow))
    if w * oh > h * ow:  # too wide: crop columns
        cw = max(1, min(w, round(h * ow / oh)))
        x0 = (w - cw) // 2
        return ResizePlan((h, w), (x0, 0, x0 + cw, h), (oh, ow))
    ch = max(1, min(h, round(w * oh / ow)))
    y0 = (h - ch) // 2
    return ResizePlan((h, w), (0, y0, w, y0 + ch), (oh, ow))


def to_unit_range(image: np.ndarray) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` → float32 ``[3, H, W]`` in [-1, 1], no resizing."""
    return plan_resize(image.shape[:2]).image(image)
