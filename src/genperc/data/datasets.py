"""PyTorch datasets for the perception tasks, over any :class:`~genperc.data.record.SceneSource`.

Every item is a dict. Common keys:

* ``image``: float32 ``[3, H, W]`` in [-1, 1] (DESIGN.md, "Conventions");
* ``index``: the item's index in the dataset (int);
* ``meta``: a JSON-able dict: the record's meta plus ``geometry`` (the
  :class:`~genperc.data.transforms.ResizePlan` as JSON, to map predictions back to the original
  pixels) and ``record_index``.

Task keys:

==========================  ===================================================================
dataset                     keys
==========================  ===================================================================
:class:`DepthDataset`       ``depth`` float32 [1,H,W] metres (0 where invalid), ``valid`` bool [1,H,W];
                            ``objects`` bool [1,H,W] (every annotated object's pixels) when the
                            record has an instance map
:class:`ReferringDataset`   ``mask`` bool [1,H,W], ``text`` str, ``family`` str, ``expression_id`` str
:class:`SemanticDataset`    ``semantic`` int64 [H,W], −1 = ignore
:class:`DetectionDataset`   ``boxes`` float32 [N,4] xyxy output pixels, ``labels`` int64 [N]
:class:`ClassificationDataset`  ``label`` int64 scalar
==========================  ===================================================================

Resizing (``resolution``: None, an int, or ``(H, W)``; ``fit``: ``"stretch"`` or
``"center_crop"``) follows :mod:`genperc.data.transforms`: bilinear with antialiasing for RGB,
nearest for labels and masks, a masked average for depth. There is no randomness: the same
index gives the same item (augmentation belongs to the task codecs, ADDP §3.2).
:func:`collate` batches items for a ``DataLoader``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from genperc.data.record import SceneRecord
from genperc.data.transforms import ResizePlan, plan_resize
from genperc.errors import UserError

#: keys whose values differ in size between items: collated as lists, never stacked
LIST_KEYS = frozenset({"boxes", "labels", "object_ids", "meta", "text", "family",
                       "expression_id"})


def collate(batch: list[dict]) -> dict:
    """Batch items: tensors of equal shape are stacked, Python numbers become a tensor, and
    strings, dicts and the variable-size keys in :data:`LIST_KEYS` (detection ``boxes``/``labels``)
    stay lists."""
    if not batch:
        return {}
    out = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        if key in LIST_KEYS:
            out[key] = values
        elif all(isinstance(v, torch.Tensor) for v in values):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise UserError(f"cannot batch '{key}' of different shapes {sorted(shapes)}",
                                "give the dataset a resolution so that all items share one size, "
                                "or use batch_size=1")
            out[key] = torch.stack(values)
        elif all(isinstance(v, bool | int | float) for v in values):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out


def _check_image(record: SceneRecord, where: str) -> None:
    img = record.image
    if not (isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3
            and img.shape[2] == 3):
        raise UserError(f"{where}: image must be uint8 [H, W, 3], got "
                        f"{getattr(img, 'dtype', type(img))} {getattr(img, 'shape', '')}",
                        "fix the data source")


class SceneDataset(Dataset):
    """Base class: a SceneSource, a resolution and a fit; one item per record."""

    def __init__(self, source, resolution=None, fit: str = "stretch"):
        self.source = source
        self.resolution = resolution
        self.fit = fit
        plan_resize((1, 1), resolution, fit)  # validate the arguments now
        self.categories = list(getattr(source, "categories", []))

    def __len__(self) -> int:
        return len(self.source)

    def _where(self, record_index: int) -> str:
        return f"{type(self.source).__name__}[{record_index}]"

    def _load(self, record_index: int):
        record = self.source[record_index]
        _check_image(record, self._where(record_index))
        plan = plan_resize(record.image.shape[:2], self.resolution, self.fit)
        return record, plan

    def _base(self, index: int, record_index: int, record: SceneRecord, plan) -> dict:
        meta = dict(record.meta)
        meta["geometry"] = plan.to_json()
        meta["record_index"] = record_index
        return {"image": plan.image(record.image), "index": index, "meta": meta}

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        record, plan = self._load(index)
        item = self._base(index, index, record, plan)
        item.update(self._targets(index, record, plan))
        return item

    def _targets(self, record_index: int, record: SceneRecord, plan) -> dict:
        return {}


class DepthDataset(SceneDataset):
    """Image and metric depth: ``depth`` float32 [1,H,W] (0 where invalid), ``valid`` bool.

    ``depth_resize="masked_average"`` (default) averages only valid pixels and marks an output
    pixel valid when at least ``valid_threshold`` of its filter weight is valid; ``"nearest"``
    samples at pixel centres. A record without ``depth_valid`` counts finite, positive depth valid.
    ``ground_truth=True`` also gives ``gt_depth`` / ``gt_valid`` [1, h, w]: the same crop at the
    record's own resolution, for evaluation at the ground truth's resolution (Marigold's protocol).
    ``object_mask=True`` (default) adds ``objects`` bool [1, H, W], the union of the annotated
    objects' pixels (nearest-neighbour resized; ``gt_objects`` at the ground truth's resolution),
    for records with an instance map (the shapes world, the toy source) — the depth metrics on
    object pixels. Records without one carry no ``objects`` (a source is assumed to be uniform).
    """

    def __init__(self, source, resolution=None, fit: str = "stretch",
                 depth_resize: str = "masked_average", valid_threshold: float = 0.5,
                 ground_truth: bool = False, object_mask: bool = True):
        super().__init__(source, resolution, fit)
        if depth_resize not in ("masked_average", "nearest"):
            raise UserError(f"unknown depth_resize '{depth_resize}'",
                            "use 'masked_average' or 'nearest'")
        self.depth_resize = depth_resize
        self.valid_threshold = float(valid_threshold)
        self.ground_truth = bool(ground_truth)
        self.object_mask = bool(object_mask)

    def _targets(self, record_index, record, plan):
        if record.depth is None:
            raise UserError(f"{self._where(record_index)} has no depth",
                            "use a source with depth for DepthDataset")
        depth = np.asarray(record.depth, dtype=np.float32)
        valid = (np.asarray(record.depth_valid, dtype=bool) if record.depth_valid is not None
                 else np.isfinite(depth) & (depth > 0))
        d, v = plan.depth(depth, valid, self.depth_resize, self.valid_threshold)
        out = {"depth": torch.from_numpy(d)[None], "valid": torch.from_numpy(v)[None]}
        if self.ground_truth:
            x0, y0, x1, y1 = plan.crop
            native = ResizePlan(plan.in_hw, plan.crop, (y1 - y0, x1 - x0))
            gd, gv = native.depth(depth, valid)
            out.update({"gt_depth": torch.from_numpy(gd)[None], "gt_valid": torch.from_numpy(gv)[None]})
        if getattr(self, "object_mask", False) and record.instances is not None:
            pixels = record.object_mask([o.id for o in record.objects])
            out["objects"] = torch.from_numpy(plan.labels(pixels))[None]
            if self.ground_truth:
                out["gt_objects"] = torch.from_numpy(native.labels(pixels))[None]
        return out


class SemanticDataset(SceneDataset):
    """Image and semantic labels ``semantic`` int64 [H,W] (category index, −1 = ignore).

    A record without a semantic map but with an instance map gets one from its objects' categories;
    unlabelled pixels become ``categories.index("background")`` if the source has that category,
    else −1.
    """

    ignore_index = -1

    def _targets(self, record_index, record, plan):
        sem = record.semantic
        if sem is None:
            if record.instances is None:
                raise UserError(f"{self._where(record_index)} has no semantic or instance map",
                                "use a source with segmentation labels for SemanticDataset")
            bg = self.categories.index("background") if "background" in self.categories else -1
            sem = np.full(record.instances.shape, bg, dtype=np.int64)
            for obj in record.objects:
                sem[record.instances == obj.id] = obj.category_id
        return {"semantic": torch.from_numpy(plan.labels(np.asarray(sem)).astype(np.int64))}


class DetectionDataset(SceneDataset):
    """Image, ``boxes`` float32 [N,4] (xyxy in output pixels) and ``labels`` int64 [N].

    Objects without a box take the tight box of their instance pixels; boxes left without area
    after cropping are dropped. Batch with :func:`collate` (boxes and labels stay lists).
    """

    collate_fn = staticmethod(collate)

    def __init__(self, source, resolution=None, fit: str = "stretch",
                 include_crowd: bool = False):
        super().__init__(source, resolution, fit)
        self.include_crowd = include_crowd

    def _targets(self, record_index, record, plan):
        from genperc.data.formats.common import mask_to_box

        boxes, labels = [], []
        for obj in record.objects:
            if obj.attributes.get("iscrowd") and not self.include_crowd:
                continue
            box = obj.box
            if box is None and record.instances is not None:
                box = mask_to_box(record.instances == obj.id)
            if box is None:
                continue
            boxes.append(box)
            labels.append(obj.category_id)
        b, keep = plan.boxes(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))
        return {"boxes": torch.from_numpy(b[keep]),
                "labels": torch.as_tensor(np.asarray(labels, dtype=np.int64)[keep])}


class ClassificationDataset(SceneDataset):
    """Image and ``label`` (int64 scalar); also the data for class-conditional generation.

    ``classes`` are the source's ``classes`` if it has them, else its ``categories``.
    """

    def __init__(self, source, resolution=None, fit: str = "stretch"):
        super().__init__(source, resolution, fit)
        self.classes = list(getattr(source, "classes", None) or self.categories)

    def _targets(self, record_index, record, plan):
        if record.class_label is None:
            raise UserError(f"{self._where(record_index)} has no class label",
                            "use a source with class labels for ClassificationDataset")
        return {"label": torch.tensor(int(record.class_label), dtype=torch.int64)}


class ReferringDataset(SceneDataset):
    """One item per referring expression: image, ``mask`` bool [1,H,W] (the union of the referred
    objects' pixels), ``text``, ``family``, ``expression_id`` (as str).

    The index of (record, expression) pairs is built once; sources with an
    ``expressions_at(i)`` method (RefCOCO, the folder layout) build it without reading images.
    ``families`` keeps only those template families.
    """

    def __init__(self, source, resolution=None, fit: str = "stretch", families=None):
        super().__init__(source, resolution, fit)
        self.families = None if families is None else {str(f) for f in families}
        lister = getattr(source, "expressions_at", None)
        pairs = []
        for r in range(len(source)):
            exprs = lister(r) if lister is not None else source[r].expressions
            for e, expr in enumerate(exprs):
                if self.families is None or expr.family in self.families:
                    pairs.append((r, e))
        self._pairs = pairs

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        r, e = self._pairs[index]
        record, plan = self._load(r)
        if e >= len(record.expressions):
            raise UserError(f"{self._where(r)} has {len(record.expressions)} expressions, "
                            f"expected more than {e}", "the source changed since the index was built")
        expr = record.expressions[e]
        if record.instances is None:
            raise UserError(f"{self._where(r)} has no instance map for its expressions",
                            "use a source with instance masks for ReferringDataset")
        mask = plan.labels(record.object_mask(expr.object_ids))
        item = self._base(index, r, record, plan)
        item.update({"mask": torch.from_numpy(mask)[None], "text": expr.text,
                     "family": str(expr.family),
                     "expression_id": "" if expr.id is None else str(expr.id)})
        item["meta"]["expression_index"] = e
        return item
