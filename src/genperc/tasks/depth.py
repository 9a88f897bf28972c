"""Monocular depth as image generation, Marigold style (Ke et al. 2024, §3; ADDP §2, §4.2).

* **Target**: per-sample normalisation of the valid depth by its 2% and 98% percentiles,
  d̃ = clip((d − q2)/(q98 − q2)·2 − 1, −1, 1), replicated to 3 channels (Marigold §3.2). Invalid
  pixels hold +1 (the far end) in the target but are left out of the loss: the task batch's
  ``loss_mask`` is the valid mask, as in Marigold's training (with the shapes world every pixel
  is valid). ``space="disparity"`` normalises 1/d instead
  (and evaluates with disparity alignment) — for models that predict affine-invariant disparity.
* **Conditions**: the RGB image, concatenated to the noisy target (a pretrained ``conv_in`` is
  widened by tiling ×0.5, Marigold §3.3); the text is Marigold's null prompt "" (with
  ``model.text_encoder=none`` the denoiser has no cross-attention at all; a pretrained Stable
  Diffusion UNet needs its CLIP text encoder, ``model.text_encoder=<dir>``).
* **Parameterisation**: the CPU presets use x0-prediction (the one ADDP recommends with its
  augmentation, ADDP §3.2); Marigold uses v-prediction — ``diffusion.prediction_type=v``.
* **Decode**: the channel mean of the unclamped generated image, clipped to [−1, 1] (Marigold's
  order), an affine-invariant depth (near = −1).
* **Test-time ensemble** (Marigold §3.4): each of N members gets its own scale and shift;
  minimise the sum over member pairs of their RMSE plus 0.02·(|min m| + |1 − max m|) on their
  per-pixel median m (members initialised to span [0, 1]), by Marigold's early-stopped BFGS (diffusers' implementation); the
  result is the median, renormalised to [0, 1].
* **Metrics** (Marigold's evaluation): :func:`genperc.metrics.depth_metrics` — LSQ scale
  and shift over valid pixels, clip to ``[min_depth, max_depth]`` and ≥ 1e-6, AbsRel, SqRel,
  RMSE, RMSE-log, log10, δ1–3 (strict), SIlog, per image then averaged. On sources with instance
  maps (the shapes world, the toy source) also ``objects/…``: the same metrics on the object
  pixels only, with the alignment fitted on every valid pixel; averaged over the images that
  have object pixels (``objects/n``).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from genperc.errors import UserError
from genperc.metrics import depth_metrics
from genperc.tasks.base import Task, TaskBatch


def normalise_depth(depth: Tensor, valid: Tensor, low: float = 0.02, high: float = 0.98,
                    space: str = "depth") -> Tensor:
    """[B, 1, H, W] metric depth → [B, 1, H, W] in [−1, 1] by per-sample percentiles over valid
    pixels (Marigold §3.2); invalid pixels → +1 (far). ``space="disparity"`` normalises −1/d, so
    that near is −1 in both spaces."""
    out = torch.ones_like(depth, dtype=torch.float32)
    for i in range(depth.shape[0]):
        v = valid[i].bool() & (depth[i] > 0) & torch.isfinite(depth[i])
        if not v.any():
            continue
        d = depth[i].float()
        x = d if space == "depth" else -1.0 / d.clamp_min(1e-6)
        vals = x[v]
        lo, hi = torch.quantile(vals, low), torch.quantile(vals, high)
        norm = ((x - lo) / (hi - lo).clamp_min(1e-6) * 2 - 1).clamp(-1, 1)
        out[i] = torch.where(v, norm, out[i])
    return out


DEFAULT_DEPTH_RANGE = (1e-3, 100.0)


class DepthRange:
    """The valid depth range [m] that metrics clip aligned predictions to (Marigold's evaluation).

    A value set by the user (``task_options.min_depth`` / ``max_depth``) wins; an unset one comes
    from the data source's ``depth_range`` (NYUv2: (1e-3, 10) m) when a dataset is built over it
    (:meth:`adopt`), else from :data:`DEFAULT_DEPTH_RANGE`."""

    def __init__(self, min_depth: float | None = None, max_depth: float | None = None):
        self.requested = (min_depth, max_depth)
        self.adopt(None)

    def adopt(self, source) -> None:
        """Take the unset bounds from ``source.depth_range`` (or the defaults if it has none)."""
        source_range = getattr(source, "depth_range", None)
        fallback = source_range or DEFAULT_DEPTH_RANGE
        low, high = (float(fallback[k] if asked is None else asked) for k, asked in enumerate(self.requested))
        if not 0 < low < high:
            raise UserError(f"depth task: need 0 < min_depth < max_depth, got {low}, {high}",
                            "set task_options.min_depth / max_depth to the data set's valid range")
        self.min_depth, self.max_depth = low, high
        if None not in self.requested:
            self.origin = "task_options"
        else:
            self.origin = "data source" if source_range else "default"

    def as_list(self) -> list[float]:
        return [self.min_depth, self.max_depth]


def ensemble_depth(members: Tensor, reg: float = 0.02, max_iter: int = 50, tol: float = 1e-6,
                   max_res: int | None = 1024) -> Tensor:
    """Marigold's test-time ensemble (Ke et al. 2024, §3.4) of affine-invariant predictions
    ``members`` [N, H, W] (any range) → [H, W] in [0, 1], by diffusers'
    ``MarigoldDepthPipeline.ensemble_depth``.

    Each member gets a scale and shift (initialised to span [0, 1]) minimising the sum over member
    pairs of their RMSE plus ``reg``·(|min m| + |1 − max m|) on the per-pixel median m, by scipy's
    BFGS stopped early — at most ``max_iter`` iterations, tolerance ``tol`` (the Marigold
    repository's 50 / 1e-6; diffusers' pipeline defaults to 2 / 1e-3), the fit on members resized to
    ``max_res`` on the long side. The early stop is part of the method: the objective's global
    minimum is the degenerate scale 0 (one flat map, cost ``reg``). The result is the median of the
    aligned members, renormalised to [0, 1]; N = 1 returns the member normalised."""
    from diffusers import MarigoldDepthPipeline

    if members.shape[0] == 1:
        m = members[0].float()
        return (m - m.min()) / (m.max() - m.min()).clamp_min(1e-6)
    depth, _ = MarigoldDepthPipeline.ensemble_depth(members.float()[:, None], regularizer_strength=reg,
                                                    max_iter=max_iter, tol=tol, max_res=max_res)
    return depth[0, 0]


class DepthTask(Task):
    name: ClassVar[str] = "depth"
    main_metric: ClassVar[str] = "AbsRel"
    headline: ClassVar[tuple[str, ...]] = ("delta1", "objects/AbsRel", "objects/delta1")
    needs_prompt: ClassVar[bool] = False
    clamps_own_decode: ClassVar[bool] = True
    widen_mode: ClassVar[str] = "tile"  # Marigold: a pretrained conv_in tiled over image + depth, ×0.5

    def __init__(self, min_depth: float | None = None, max_depth: float | None = None, space: str = "depth",
                 percentiles: tuple[float, float] | list = (0.02, 0.98), ensemble_reg: float = 0.02):
        if space not in ("depth", "disparity"):
            raise UserError(f"depth task: space={space!r} is not valid", "use task_options.space=depth or disparity")
        self.depth_range = DepthRange(min_depth, max_depth)
        self.space = space
        self.percentiles = (float(percentiles[0]), float(percentiles[1]))
        self.ensemble_reg = float(ensemble_reg)

    @property
    def min_depth(self) -> float:
        return self.depth_range.min_depth

    @property
    def max_depth(self) -> float:
        return self.depth_range.max_depth

    def dataset(self, source, resolution: int):
        from genperc.data.datasets import DepthDataset

        self.depth_range.adopt(source)
        return DepthDataset(source, resolution=resolution, ground_truth=self.evaluation_resolution == "ground-truth")

    def encode_target(self, depth: Tensor, valid: Tensor) -> Tensor:
        d = normalise_depth(depth, valid, *self.percentiles, space=self.space)
        return d.expand(-1, 3, -1, -1).contiguous()

    def prepare(self, batch: dict) -> TaskBatch:
        image, valid = batch["image"], batch["valid"]
        return TaskBatch(x0=self.encode_target(batch["depth"], valid).to(image.device), image=image,
                         texts=[""] * image.shape[0], extras={"valid": valid},
                         loss_mask=valid.to(device=image.device, dtype=torch.float32))

    def augment(self, batch: TaskBatch, t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """ADDP §3.2 diffusion-tailored augmentation (``genperc.tasks.augment``); identity at intensity 0."""
        from genperc.tasks.augment import augment_depth_batch

        return augment_depth_batch(self, batch, t, generator)

    def request(self, image: Tensor, prompts: list[str] | None = None) -> tuple[TaskBatch, dict]:
        return TaskBatch(x0=torch.zeros_like(image), image=image, texts=[""] * image.shape[0]), {}

    def decode(self, x0: Tensor, batch: dict | None = None) -> Tensor:
        """[B, 3, H, W] → affine-invariant depth [B, 1, H, W]: the channel mean, clipped to [−1, 1]
        (Marigold's order: the VAE's output is averaged first, then clipped)."""
        return x0.float().mean(1, keepdim=True).clamp(-1, 1)

    def decode_ensemble(self, members: list[Tensor], batch: dict | None = None) -> Tensor:
        """N generated images per item → the Marigold ensemble, mapped back to [−1, 1]."""
        decoded = torch.stack([self.decode(m) for m in members])  # [N, B, 1, H, W]
        out = [ensemble_depth(decoded[:, b, 0], reg=self.ensemble_reg) * 2 - 1 for b in range(decoded.shape[1])]
        return torch.stack(out)[:, None]

    # -- the discriminative counterpart ------------------------------------------------------

    def discriminative_loss(self, output: Tensor, batch: TaskBatch) -> dict[str, Tensor]:
        """The scale-and-shift-invariant loss (:func:`genperc.tasks.losses.ssi_loss`: MiDaS's
        least-squares alignment, then the mean absolute error, as Marigold-E2E-FT) of the channel
        mean of x̂0 against the normalised ground truth, on the valid pixels (``loss_mask``)."""
        from genperc.tasks.losses import ssi_loss

        prediction = output.float().mean(1, keepdim=True)
        target = batch.x0.to(prediction.device).float().mean(1, keepdim=True)
        return {"ssi": ssi_loss(prediction, target, batch.loss_mask).mean()}

    def decode_discriminative(self, output: Tensor, batch: dict | None = None) -> Tensor:
        """The one-step estimate → affine-invariant depth [B, 1, H, W]: the channel mean, mapped per
        image onto [−1, 1] by its minimum and maximum (an SSI-trained output has no fixed range; the
        map is affine, so the least-squares-aligned metrics do not change, and export gets its range)."""
        from genperc.tasks.losses import minmax_normalise

        return minmax_normalise(output.float().mean(1, keepdim=True))

    def at_ground_truth_resolution(self, prediction: Tensor, batch: dict) -> tuple[Tensor, dict]:
        """Marigold's protocol: the affine-invariant prediction upsampled bilinearly to the ground
        truth's own resolution (``gt_depth`` / ``gt_valid`` of a dataset built with
        ``evaluation_resolution="ground-truth"``), then aligned and scored there."""
        if "gt_depth" not in batch:
            raise UserError("the depth batch has no full-resolution ground truth (gt_depth)",
                            "set task.evaluation_resolution = 'ground-truth' before building the dataset")
        size = batch["gt_depth"].shape[-2:]
        upsampled = F.interpolate(prediction.float(), size=size, mode="bilinear", align_corners=False)
        truth = {k: v for k, v in batch.items() if k != "objects"}
        if "gt_objects" in batch:
            truth["objects"] = batch["gt_objects"]
        return upsampled, {**truth, "depth": batch["gt_depth"], "valid": batch["gt_valid"]}

    def metrics(self, prediction: Tensor, batch: dict) -> dict[str, Tensor]:
        """Marigold's metrics per image; with an ``objects`` mask in the batch (sources with
        instance maps) also ``objects/…`` on the object pixels, aligned on every valid pixel."""
        # in disparity space the prediction is affine in −1/d: the least-squares scale takes the sign
        return depth_metrics(prediction, batch["depth"], batch["valid"], alignment=self.space,
                             min_depth=self.min_depth, max_depth=self.max_depth, objects=batch.get("objects"))

    def summarize(self, per_sample: dict) -> dict[str, float]:
        """The mean over images; ``objects/…`` over the images with object pixels (``objects/n``)."""
        out = {k: float(v.float().mean()) for k, v in per_sample.items()
               if isinstance(v, Tensor) and v.ndim == 1 and not k.startswith("objects/")}
        if "objects/AbsRel" in per_sample:
            has = ~torch.isnan(per_sample["objects/AbsRel"])
            for k, v in per_sample.items():
                if k.startswith("objects/") and isinstance(v, Tensor) and v.ndim == 1:
                    out[k] = float(v[has].double().mean()) if has.any() else float("nan")
            out["objects/n"] = float(has.sum())
        return out

    def settings(self) -> dict:
        return {"alignment": "least squares in " + self.space + " space", "depth_range": self.depth_range.as_list(),
                "depth_range_from": self.depth_range.origin,
                "normalisation_percentiles": list(self.percentiles), "delta": "strict <",
                "ensemble": f"Marigold (per-member scale+shift, median, reg {self.ensemble_reg:g})"}

    # -- prediction files -------------------------------------------------------------------

    def export(self, prediction: Tensor, out_dir: Path, image: np.ndarray, stem: str = "prediction") -> list[Path]:
        """16-bit PNG of the affine-invariant depth (0 = near, 65535 = far) and a colourised PNG."""
        from genperc.images import colorize_depth, resize_float, save_png16, save_rgb

        d = prediction.reshape(prediction.shape[-2:]).float()
        d01 = ((d + 1) / 2).clamp(0, 1)
        d01 = resize_float(d01, image.shape[:2])
        paths = [save_png16(d01, out_dir / f"{stem}_depth16.png"),
                 save_rgb(colorize_depth(d01), out_dir / f"{stem}_depth_color.png")]
        return paths
