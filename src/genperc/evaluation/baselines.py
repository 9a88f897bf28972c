"""Trivial baselines: the anchors every table of a model's numbers is read against (issue 12).

A baseline is a named predictor that produces the task's *prediction* — what ``task.decode``
returns — for a collated batch of the evaluation set, without looking at the image beyond what
its name says. It is scored by the task's own :meth:`~genperc.tasks.base.Task.metrics` and
:meth:`~genperc.tasks.base.Task.summarize` on exactly the items the model is scored on
(:func:`score_baselines`, the same first ``limit`` items, at the same evaluation resolution).
Baselines that learn something (a mean map, a class prior, a box) are fitted on up to
``fit_items`` items of the run's *training* split at the model's resolution, spread evenly over
the split (:func:`fit_baselines`).

==============  ======================  ==========================================================
task            baseline                prediction
==============  ======================  ==========================================================
referring       ``empty mask``          nothing
                ``all objects``         every annotated object of the scene (the union of the
                                        instance masks)
                ``named shape``         every object of the shape the expression's head noun
                                        names (:func:`head_noun_mask`; "object" names every one)
depth           ``training mean map``   the per-pixel mean of the training split's depth maps
                                        (valid pixels; in disparity space the mean of −1/d)
                ``row ramp``            depth a linear function of the image row, far at the top
generalist      ``training mean map``,  on the depth items, as for depth
                ``row ramp``
                ``all background``      on the segment items: no pixel of the class (an empty
                                        mask, zero response, so every pixel is background)
                ``best constant box``   on the detect items: per class one box, score 1.0, on
                                        every scene — among the training split's boxes of that
                                        class, the one that overlaps (IoU ≥ 0.5) a box of the
                                        class in the most training scenes
classification  ``majority class``      the training split's class frequencies (add-one
                                        smoothed): top-1 is the majority class
==============  ======================  ==========================================================

Depth baselines go through the task's metric, which fits a least-squares scale and shift per
image before scoring: any affine map of a prediction scores the same, so the mean map's units and
the ramp's slope and offset (even its sign) do not matter. The best constant box: with one
detection of constant score per scene, the number of true positives fixes both precision
(hits / scenes) and recall (hits / ground-truth boxes), so the box with the most training hits is
the one that maximises them; AP@0.5 of a constant-score predictor also depends on how COCOeval
orders the tied detections. A generalist baseline answers only its own sub-task's items; its
summary holds that sub-task's numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_FIT_ITEMS = 500


@dataclass
class Baseline:
    """A named trivial predictor: ``predict(batch, dataset)`` → the task's prediction for a
    collated batch of ``dataset``'s items. ``subtask``: a generalist baseline answers only the
    items of that sub-task."""

    name: str
    description: str
    predict: Callable[[dict, Any], Any]
    subtask: str | None = None


def spread_indices(n: int, k: int) -> list[int]:
    """Up to ``k`` indices spread evenly over ``range(n)`` (all of them when n ≤ k)."""
    if n <= 0 or k <= 0:
        return []
    if n <= k:
        return list(range(n))
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, k)})


# --------------------------------------------------------------------------- referring


def head_noun_mask(record, text: str, plan) -> Tensor:
    """The trivial "named shape" prediction: every object of the shape the expression's head noun
    names (the first shape word or "object"; "object" — or no noun — selects every object)."""
    shapes = {o.category for o in record.objects}
    names = set(getattr(record, "categories", []) or []) | shapes
    head = None
    for word in text.lower().replace(",", " ").split():
        if word in names or word == "object":
            head = word
            break
    ids = [o.id for o in record.objects if head in (None, "object") or o.category == head]
    return torch.from_numpy(plan.labels(record.object_mask(ids)))[None, None]


def all_objects_mask(record, plan) -> Tensor:
    """[1, 1, H, W] bool: the union of every annotated object's instance mask."""
    return torch.from_numpy(plan.labels(record.object_mask([o.id for o in record.objects])))[None, None]


def _records(batch: dict, dataset):
    """(record, resize plan) of each item of a batch."""
    from genperc.data.transforms import plan_resize

    for meta in batch["meta"]:
        record = dataset.source[meta["record_index"]]
        yield record, plan_resize(record.image.shape[:2], dataset.resolution, getattr(dataset, "fit", "stretch"))


def _at_task_resolution(task, mask: Tensor) -> Tensor:
    size = getattr(task, "eval_resolution", None)
    if size is not None and mask.shape[-1] != size:
        mask = F.interpolate(mask.float(), size=(size, size), mode="nearest") > 0.5
    return mask.bool()


def referring_baselines(task) -> list[Baseline]:
    def empty(batch, dataset):
        return _at_task_resolution(task, torch.zeros_like(batch["mask"], dtype=torch.bool))

    def every(batch, dataset):
        return _at_task_resolution(task, torch.cat([all_objects_mask(r, p) for r, p in _records(batch, dataset)]))

    def named(batch, dataset):
        masks = [head_noun_mask(r, text, p) for (r, p), text in zip(_records(batch, dataset), batch["text"], strict=True)]
        return _at_task_resolution(task, torch.cat(masks))

    return [Baseline("empty mask", "predicts nothing", empty),
            Baseline("all objects", "every annotated object of the scene", every),
            Baseline("named shape", "every object of the shape the expression's head noun names", named)]


# --------------------------------------------------------------------------- depth


def mean_depth_map(dataset, fit_items: int = DEFAULT_FIT_ITEMS, space: str = "depth") -> Tensor:
    """[1, H, W]: the per-pixel mean over up to ``fit_items`` items of a depth dataset (items with
    ``depth`` / ``valid`` [1, H, W]) of their valid depth (``space="disparity"``: of −1/d, the
    depth task's orientation in disparity space); pixels never valid take the overall mean."""
    total = count = None
    for i in spread_indices(len(dataset), fit_items):
        item = dataset[i]
        d = item["depth"].double()
        v = item["valid"].bool() & (d > 0) & torch.isfinite(d)
        x = d if space == "depth" else -1.0 / d.clamp_min(1e-6)
        if total is None:
            total, count = torch.zeros_like(d), torch.zeros_like(d)
        total += torch.where(v, x, torch.zeros_like(x))
        count += v.double()
    if total is None or count.sum() == 0:
        from genperc.errors import UserError

        raise UserError("no valid training depth to fit the mean-map baseline on",
                        "check data.train_split of the run's data")
    overall = total.sum() / count.sum()
    return torch.where(count > 0, total / count.clamp_min(1), overall).float()


def row_ramp(h: int, w: int) -> Tensor:
    """[1, H, W]: depth linear in the row, +1 (far) at the top row to −1 (near) at the bottom."""
    return torch.linspace(1.0, -1.0, h).view(1, h, 1).expand(1, h, w).contiguous()


def _fit_to(depth_map: Tensor, hw) -> Tensor:
    if tuple(depth_map.shape[-2:]) != tuple(hw):
        depth_map = F.interpolate(depth_map[None], size=tuple(hw), mode="bilinear", align_corners=False)[0]
    return depth_map


def depth_baselines(mean_map: Tensor | None, generalist: bool = False) -> list[Baseline]:
    def wrap(batch, maps: Tensor):
        if generalist:
            return [{"subtask": "depth", "depth": m, "label": ""} for m in maps]
        return maps

    def mean(batch, dataset):
        b, _, h, w = batch["image"].shape
        return wrap(batch, _fit_to(mean_map, (h, w)).expand(b, -1, -1, -1).clone())

    def ramp(batch, dataset):
        b, _, h, w = batch["image"].shape
        return wrap(batch, row_ramp(h, w).expand(b, -1, -1, -1).clone())

    sub = "depth" if generalist else None
    out = []
    if mean_map is not None:
        out.append(Baseline("training mean map", "the per-pixel mean of the training split's depth maps", mean, sub))
    out.append(Baseline("row ramp", "depth linear in the image row, far at the top (scale and shift are "
                        "fitted by the metric, so the ramp's slope and offset do not matter)", ramp, sub))
    return out


# --------------------------------------------------------------------------- generalist


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """[N, M] IoU of xyxy boxes ``a`` [N, 4] and ``b`` [M, 4]."""
    a, b = a.double(), b.double()
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp_min(0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp_min(0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(union))


def best_constant_box(boxes_per_scene: list[Tensor], iou_threshold: float = 0.5) -> tuple[Tensor | None, int]:
    """The one box to predict on every scene: among the boxes of ``boxes_per_scene`` (one [N, 4]
    xyxy tensor per training scene, the boxes of one class), the one that overlaps a box of its
    scene with IoU ≥ ``iou_threshold`` in the most scenes (the first such box on a tie).
    Returns (box [4] or None when there is no box, the number of scenes it hits)."""
    scenes = [b.reshape(-1, 4).float() for b in boxes_per_scene]
    candidates = torch.cat(scenes) if scenes else torch.zeros(0, 4)
    if len(candidates) == 0:
        return None, 0
    hits = torch.zeros(len(candidates), dtype=torch.int64)
    for boxes in scenes:
        if len(boxes):
            hits += (box_iou(candidates, boxes) >= iou_threshold).any(1).long()
    best = int(torch.argmax(hits))  # the first maximum
    return candidates[best], int(hits[best])


def generalist_baselines(task, train_source, resolution, fit_items: int = DEFAULT_FIT_ITEMS) -> list[Baseline]:
    from genperc.data.datasets import DepthDataset, DetectionDataset, SceneDataset

    subtasks = set(task.subtasks)
    out: list[Baseline] = []
    if "depth" in subtasks:
        has_depth = len(train_source) > 0 and train_source[0].depth is not None
        mean_map = mean_depth_map(DepthDataset(train_source, resolution, object_mask=False), fit_items) if has_depth else None
        out += depth_baselines(mean_map, generalist=True)  # without depth: the ramp alone
    per_class: dict[int, list[Tensor]] = {}
    if "detect" in subtasks:
        base, det_ds = SceneDataset(train_source, resolution), DetectionDataset(train_source, resolution)
        for r in spread_indices(len(train_source), fit_items):
            record, plan = base._load(r)
            if not record.objects:
                continue  # a scene without boxes hits nothing
            det = det_ds._targets(r, record, plan)
            for c in sorted({int(x) for x in det["labels"].tolist()}):
                per_class.setdefault(c, []).append(det["boxes"][det["labels"] == c])
    if "segment" in subtasks:
        def background(batch, dataset):
            h, w = batch["image"].shape[-2:]
            return [{"subtask": "segment", "response": torch.zeros(h, w), "mask": torch.zeros(1, h, w, dtype=torch.bool),
                     "label": name} for name in batch["class_name"]]

        out.append(Baseline("all background", "no pixel of the class: every pixel is background", background, "segment"))
    if "detect" in subtasks:
        boxes = {c: best_constant_box(scenes)[0] for c, scenes in per_class.items()}

        def constant(batch, dataset):
            h, w = batch["image"].shape[-2:]
            preds = []
            for c, name in zip(batch["class_id"].tolist(), batch["class_name"], strict=True):
                box = boxes.get(int(c))
                b = box[None].clone() if box is not None else torch.zeros(0, 4)
                preds.append({"subtask": "detect", "boxes": b, "scores": torch.ones(len(b)), "size": (h, w),
                              "label": name})
            return preds

        out.append(Baseline("best constant box", "per class the training box that matches (IoU ≥ 0.5) a box of "
                            "its class in the most training scenes, score 1, on every scene", constant, "detect"))
    return out


# --------------------------------------------------------------------------- classification


def class_prior(labels, num_classes: int) -> Tensor:
    """[K] add-one smoothed class frequencies of ``labels`` (argmax: the majority class, the
    smallest index on a tie)."""
    counts = torch.bincount(torch.as_tensor(list(labels), dtype=torch.int64), minlength=num_classes)[:num_classes]
    return (counts.double() + 1) / (counts.sum() + num_classes)


def classification_baselines(task, train_dataset, fit_items: int = DEFAULT_FIT_ITEMS) -> list[Baseline]:
    labels = [int(train_dataset[i]["label"]) for i in spread_indices(len(train_dataset), fit_items)]
    prior = class_prior(labels, task.num_classes or (max(labels) + 1 if labels else 1)).float()

    def majority(batch, dataset):
        return prior.expand(len(batch["label"]), -1).clone()

    return [Baseline("majority class", "the training split's class frequencies (add-one smoothed); top-1 = the "
                     f"majority class ({int(prior.argmax())})", majority)]


# --------------------------------------------------------------------------- fitting and scoring


def fit_baselines(task, train_source, resolution, fit_items: int = DEFAULT_FIT_ITEMS) -> list[Baseline]:
    """The task's baselines, those that learn fitted on up to ``fit_items`` items of
    ``train_source`` (the run's training split) at ``resolution`` (the model's)."""
    from genperc.errors import UserError

    if fit_items < 1:
        raise UserError(f"the baselines need at least one training item, got fit_items={fit_items}",
                        "use e.g. --baseline-fit-items 500")
    if task.name == "referring":
        return referring_baselines(task)
    if task.name == "depth":
        from genperc.data.datasets import DepthDataset

        dataset = DepthDataset(train_source, resolution, object_mask=False)
        return depth_baselines(mean_depth_map(dataset, fit_items, getattr(task, "space", "depth")))
    if task.name == "generalist":
        return generalist_baselines(task, train_source, resolution, fit_items)
    if task.name == "classification":
        return classification_baselines(task, task.dataset(train_source, resolution), fit_items)
    raise UserError(f"the {task.name} task has no trivial baselines", "evaluate without --baselines")


def _append(per_sample: dict, values: dict) -> None:
    for k, v in values.items():
        if isinstance(v, Tensor):
            per_sample.setdefault(k, []).append(v.detach().cpu())
        else:
            per_sample.setdefault(k, []).extend(list(v))


@torch.no_grad()
def score_baselines(task, dataset, baselines: list[Baseline], *, limit: int | None = None,
                    resolution: str | None = None, batch_size: int = 16,
                    indices: Sequence[int] | None = None) -> dict[str, dict]:
    """Score each baseline with the task's metrics on the first ``limit`` items of ``dataset`` (the
    items :func:`~genperc.evaluation.evaluate.evaluate` scores), at ``resolution`` ("model" or
    "ground-truth", default the task's). ``indices``: score these items of ``dataset`` instead of
    its first ones (in this order; ``limit`` then keeps the first ``limit`` of them) — a baseline
    reads ``dataset.source``, so the items are picked here rather than by a ``Subset``. Returns
    {name: summary}; every summary also holds ``items``, the number of evaluated items (a
    generalist baseline scores its sub-task's among them)."""
    from genperc.data.datasets import collate
    from genperc.evaluation.evaluate import check_resolution

    resolution = check_resolution(resolution or task.evaluation_resolution)
    positions = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    if any(not 0 <= i < len(dataset) for i in positions):
        raise IndexError(f"baseline indices out of range for a dataset of {len(dataset)} items")
    if limit is not None:
        positions = positions[:limit]
    n = len(positions)
    per_sample: dict[str, dict[str, list]] = {b.name: {} for b in baselines}
    for start in range(0, n, batch_size):
        items = [dataset[i] for i in positions[start:start + batch_size]]
        for baseline in baselines:
            chosen = [it for it in items if baseline.subtask is None or it.get("subtask") == baseline.subtask]
            if not chosen:
                continue
            batch = collate(chosen)
            pred = baseline.predict(batch, dataset)
            scored, truth = task.at_ground_truth_resolution(pred, batch) if resolution == "ground-truth" else (pred, batch)
            _append(per_sample[baseline.name], task.metrics(scored, truth))
    out = {}
    for baseline in baselines:
        values = {k: torch.cat(v) if v and isinstance(v[0], Tensor) else v for k, v in per_sample[baseline.name].items()}
        summary = task.summarize(values) if values else {}
        out[baseline.name] = {**summary, "items": n}
    return out


def trivial_baselines(dataset, task, limit: int | None = None) -> dict[str, dict[str, float]]:
    """The referring baselines (empty mask, all objects, named shape) on the first ``limit`` items
    of a referring ``dataset`` (``genperc demo``'s table)."""
    return score_baselines(task, dataset, referring_baselines(task), limit=limit, resolution="model")
