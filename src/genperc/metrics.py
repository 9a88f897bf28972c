"""Perception metrics, written from their definitions (REFERENCE.md) and shared by the task codecs.

* Depth (Marigold's evaluation protocol, Ke et al. 2024, §4.1): least-squares scale and shift of
  the affine-invariant prediction over the valid pixels — in depth space (``s·p + b ≈ d``) or, as
  an option, in disparity space (``s·p + b ≈ 1/d``, then depth = 1/disparity) — then clip to the
  data set's depth range and to ≥ 1e-6, then per image AbsRel, SqRel, RMSE, RMSE-log, log10,
  δ1/δ2/δ3 (strict ``<``) and SIlog; split-level numbers are the mean over images. The same
  numbers on object pixels only (``objects/…``): the alignment fitted on every valid pixel, the
  errors averaged over the valid pixels of the objects; images without object pixels are left out.
* Referring segmentation: per expression I = |P∧G|, U = |P∨G|; oIoU = ΣI/ΣU, mIoU = mean I/U
  (0 when U = 0), Prec@X = share of expressions with IoU ≥ X (or > X).
* Semantic segmentation: a C×C confusion matrix (rows ground truth, columns prediction, ignored
  pixels left out); IoU_c = TP/(TP+FP+FN); mIoU = mean over the classes with a non-empty union.
* Detection: COCO mAP@0.5 computed by pycocotools' ``COCOeval`` (101-point interpolated AP at IoU
  0.5, all areas, 100 detections per image); every detection carries a confidence score so that the
  ranking is defined.
* Calibration: expected calibration error (Guo et al. 2017) over equal-width confidence bins, and
  the per-bin numbers of a reliability diagram.
"""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import torch
from torch import Tensor

DEPTH_METRICS = ("AbsRel", "SqRel", "RMSE", "RMSE_log", "log10", "delta1", "delta2", "delta3", "SIlog")
# lower is better for these; higher for the δ's
LOWER_IS_BETTER = {"AbsRel", "SqRel", "RMSE", "RMSE_log", "log10", "SIlog"}


# --------------------------------------------------------------------------- depth


def fit_scale_shift(pred: Tensor, target: Tensor, valid: Tensor) -> tuple[float, float]:
    """Least-squares ``(s, b)`` minimising Σ_valid (s·pred + b − target)² (one image).

    Solved in float64 by the 2×2 normal equations; with a constant prediction the scale is 0 and
    the shift the mean target."""
    p = pred[valid].double()
    g = target[valid].double()
    n = p.numel()
    if n == 0:
        return 1.0, 0.0
    sp, sg = p.sum(), g.sum()
    spp, spg = (p * p).sum(), (p * g).sum()
    det = n * spp - sp * sp
    if det.abs() <= 1e-12 * max(1.0, float(n * spp)):
        return 0.0, float(sg / n)
    s = (n * spg - sp * sg) / det
    b = (sg - s * sp) / n
    return float(s), float(b)


def align_depth(pred: Tensor, gt: Tensor, valid: Tensor, *, alignment: str = "depth",
                min_depth: float = 1e-3, max_depth: float = 100.0) -> Tensor:
    """The metric-depth version of an affine-invariant prediction [H, W] (Marigold's protocol).

    ``alignment="depth"``: s·pred + b fitted to the ground-truth depth. ``"disparity"``: fitted to
    1/depth, the aligned disparity clipped to ≥ 1/max_depth and inverted. Then clip to
    [min_depth, max_depth] and to ≥ 1e-6."""
    if alignment == "depth":
        s, b = fit_scale_shift(pred, gt, valid)
        depth = pred.double() * s + b
    elif alignment == "disparity":
        disp_gt = torch.zeros_like(gt, dtype=torch.float64)
        disp_gt[valid] = 1.0 / gt[valid].double()
        s, b = fit_scale_shift(pred, disp_gt, valid)
        disp = (pred.double() * s + b).clamp_min(1.0 / max_depth)
        depth = 1.0 / disp
    else:
        raise ValueError(f"alignment must be 'depth' or 'disparity', got {alignment!r}")
    return depth.clamp(min_depth, max_depth).clamp_min(1e-6)


def depth_errors(pred: Tensor, gt: Tensor, valid: Tensor) -> dict[str, float]:
    """Marigold's per-image depth metrics of an aligned metric prediction over ``valid`` pixels."""
    p = pred[valid].double()
    g = gt[valid].double()
    if p.numel() == 0:
        return {k: float("nan") for k in DEPTH_METRICS}
    diff = p - g
    log_diff = torch.log(p) - torch.log(g)
    ratio = torch.maximum(p / g, g / p)
    out = {
        "AbsRel": float((diff.abs() / g).mean()),
        "SqRel": float((diff.pow(2) / g).mean()),
        "RMSE": float(diff.pow(2).mean().sqrt()),
        "RMSE_log": float(log_diff.pow(2).mean().sqrt()),
        "log10": float((torch.log10(p) - torch.log10(g)).abs().mean()),
    }
    for k in (1, 2, 3):
        out[f"delta{k}"] = float((ratio < 1.25**k).double().mean())
    var = log_diff.pow(2).mean() - log_diff.mean().pow(2)
    out["SIlog"] = float(100.0 * var.clamp_min(0).sqrt())
    return out


def depth_metrics(pred: Tensor, gt: Tensor, valid: Tensor, *, alignment: str = "depth",
                  min_depth: float = 1e-3, max_depth: float = 100.0,
                  objects: Tensor | None = None) -> dict[str, Tensor]:
    """Per-image metrics of a batch: ``pred`` affine-invariant [B, 1, H, W] (or [B, H, W]), ``gt``
    metric depth and ``valid`` of the same shape. Pixels count when valid and min < gt < max.

    ``objects`` (bool, the shape of ``valid``): also ``objects/<metric>`` for every metric, scored
    on the counted pixels inside that mask only, with the scale and shift fitted on all counted
    pixels as for the headline numbers (so the object numbers measure the same aligned map); NaN
    for an image without object pixels."""
    pred, gt, valid = (x.reshape(x.shape[0], *x.shape[-2:]).cpu() for x in (pred, gt, valid))
    regions = None if objects is None else objects.reshape(objects.shape[0], *objects.shape[-2:]).cpu().bool()
    rows = []
    for i, (p, g, v) in enumerate(zip(pred, gt, valid, strict=True)):
        v = v.bool() & (g > min_depth) & (g < max_depth)
        aligned = align_depth(p, g, v, alignment=alignment, min_depth=min_depth, max_depth=max_depth)
        row = depth_errors(aligned, g, v)
        if regions is not None:
            row.update({f"objects/{k}": x for k, x in depth_errors(aligned, g, v & regions[i]).items()})
        rows.append(row)
    keys = [*DEPTH_METRICS, *(f"objects/{k}" for k in DEPTH_METRICS)] if regions is not None else DEPTH_METRICS
    return {k: torch.tensor([r[k] for r in rows], dtype=torch.float64) for k in keys}


# --------------------------------------------------------------------------- masks


def mask_intersection_union(pred: Tensor, gt: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample |P∧G| and |P∨G| of bool masks [B, ...] (float64)."""
    pred, gt = pred.bool(), gt.bool().to(pred.device)
    inter = (pred & gt).flatten(1).sum(1).double()
    union = (pred | gt).flatten(1).sum(1).double()
    return inter, union


def iou_from(inter: Tensor, union: Tensor) -> Tensor:
    """I/U per sample, 0 where the union is empty (REFERENCE.md, referring segmentation)."""
    return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(union))


def referring_summary(inter: Tensor, union: Tensor, thresholds=(0.5, 0.6, 0.7, 0.8, 0.9),
                      strict: bool = False) -> dict[str, float]:
    """oIoU = ΣI/ΣU, mIoU = mean I_k/U_k, Prec@X (IoU ≥ X, or > X with ``strict``)."""
    inter, union = inter.double(), union.double()
    if inter.numel() == 0:
        return {"oIoU": float("nan"), "mIoU": float("nan"), **{f"Prec@{x:.1f}": float("nan") for x in thresholds}}
    iou = iou_from(inter, union)
    total = float(union.sum())
    out = {"oIoU": float(inter.sum()) / total if total > 0 else 0.0, "mIoU": float(iou.mean())}
    for x in thresholds:
        hit = iou > x if strict else iou >= x
        out[f"Prec@{x:.1f}"] = float(hit.double().mean())
    return out


def confusion_matrix(pred: Tensor, gt: Tensor, num_classes: int, ignore_index: int = -1) -> Tensor:
    """C×C counts, rows = ground truth, columns = prediction; ``gt == ignore_index`` is left out."""
    pred, gt = pred.reshape(-1).long(), gt.reshape(-1).long()
    keep = (gt != ignore_index) & (gt >= 0) & (gt < num_classes)
    idx = gt[keep] * num_classes + pred[keep].clamp(0, num_classes - 1)
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def semantic_summary(conf: Tensor, class_names: list[str] | None = None) -> dict[str, float]:
    """mIoU (mean over classes with a non-empty union), pixel accuracy and per-class IoU."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    total = conf.sum()
    out = {"mIoU": float(iou[present].mean()) if present.any() else float("nan"),
           "pixel_acc": float(tp.sum() / total) if total > 0 else float("nan")}
    names = class_names or [str(i) for i in range(conf.shape[0])]
    for name, v in zip(names, iou.tolist(), strict=True):
        out[f"IoU[{name}]"] = v
    return out


# --------------------------------------------------------------------------- detection


def coco_map50(ground_truth: list[dict], detections: list[dict], categories: list[int]) -> dict[str, float]:
    """mAP@0.5 (and mAP@[.5:.95]) with pycocotools' COCOeval.

    ``ground_truth``: ``{"image_id", "category_id", "box": (x0, y0, x1, y1)}``;
    ``detections``: the same plus ``"score"``. Every image that appears in ``ground_truth`` or
    ``detections`` is evaluated for every category in ``categories``. Returns NaN when there is no
    ground-truth box at all (COCOeval's −1)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    image_ids = sorted({int(g["image_id"]) for g in ground_truth} | {int(d["image_id"]) for d in detections})
    if not ground_truth or not image_ids:
        return {"mAP@0.5": float("nan"), "mAP@[.5:.95]": float("nan")}

    def xywh(box):
        x0, y0, x1, y1 = (float(v) for v in box)
        return [x0, y0, max(x1 - x0, 0.0), max(y1 - y0, 0.0)]

    anns = []
    for k, g in enumerate(ground_truth, start=1):
        bb = xywh(g["box"])
        anns.append({"id": k, "image_id": int(g["image_id"]), "category_id": int(g["category_id"]),
                     "bbox": bb, "area": bb[2] * bb[3], "iscrowd": 0})
    dataset = {"images": [{"id": i} for i in image_ids], "annotations": anns,
               "categories": [{"id": int(c)} for c in categories]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        dets = [{"image_id": int(d["image_id"]), "category_id": int(d["category_id"]), "bbox": xywh(d["box"]),
                 "score": float(d["score"])} for d in detections]
        dt = gt.loadRes(dets) if dets else COCO()
        if not dets:
            dt.dataset = {"images": dataset["images"], "annotations": [], "categories": dataset["categories"]}
            dt.createIndex()
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.imgIds = image_ids
        ev.params.catIds = [int(c) for c in categories]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ap, ap50 = float(ev.stats[0]), float(ev.stats[1])
    return {"mAP@0.5": ap50 if ap50 >= 0 else float("nan"), "mAP@[.5:.95]": ap if ap >= 0 else float("nan")}


def nanmean(values) -> float:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(vals)) if vals else float("nan")


def expected_calibration_error(confidence: Tensor, correct: Tensor, bins: int = 15) -> float:
    """ECE (Guo et al. 2017): Σ_b |B_b|/N · |acc(B_b) − conf(B_b)| over ``bins`` equal-width bins
    of (0, 1]; a confidence of exactly 0 falls in the first bin."""
    conf = confidence.double().reshape(-1)
    corr = correct.double().reshape(-1)
    n = conf.numel()
    if n == 0:
        return float("nan")
    idx = (conf * bins).ceil().long().clamp(1, bins) - 1
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += float(m.sum()) / n * abs(float(corr[m].mean()) - float(conf[m].mean()))
    return total


def reliability_bins(confidence: Tensor, correct: Tensor, bins: int = 15) -> dict[str, list]:
    """Per-bin count, mean confidence and accuracy (for a reliability diagram)."""
    conf = confidence.double().reshape(-1)
    corr = correct.double().reshape(-1)
    idx = (conf * bins).ceil().long().clamp(1, bins) - 1
    out = {"lower": [], "upper": [], "count": [], "confidence": [], "accuracy": []}
    for b in range(bins):
        m = idx == b
        out["lower"].append(b / bins)
        out["upper"].append((b + 1) / bins)
        out["count"].append(int(m.sum()))
        out["confidence"].append(float(conf[m].mean()) if m.any() else float("nan"))
        out["accuracy"].append(float(corr[m].mean()) if m.any() else float("nan"))
    return out
