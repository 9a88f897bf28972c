"""One model for depth, segmentation and detection prompts, InstructCV style (Gan et al. 2023;
ADDP §2 "generalist", §4.3), as InstructPix2Pix editing of the input image.

Every item of :class:`GeneralistDataset` is one (scene, subtask, class) triple with a natural
language prompt in one of several phrasings (:data:`PROMPTS`):

=========  =====================================  ===========================================
subtask    prompt (one of, e.g.)                  target image
=========  =====================================  ===========================================
depth      "estimate the depth of this image"     gray normalised depth, 3 channels (Marigold's
                                                  2%/98% normalisation, near = black)
segment    "segment the cube"                     white mask of that class on black
detect     "detect the cube"                      the input image with the boxes of that class
                                                  drawn as outlines in a fixed colour (or filled:
                                                  ``box_style: fill``)
=========  =====================================  ===========================================

Decoding: depth = channel mean (affine-invariant); segment = white response (mean of the
channels mapped to [0, 1]) above 0.5; detect = pixels within ``box_threshold`` (RGB distance) of
the box colour, external contours by OpenCV, each contour's bounding rectangle a box whose
confidence is the mean box-colour response on that rectangle's outline — InstructCV's decoder
gives no scores, which leaves AP's ranking undefined (REFERENCE.md). Touching boxes of one class
merge into one contour (a limitation of decoding boxes from drawn outlines).

Metrics, grouped per subtask in the summary: ``depth/…`` Marigold's depth metrics (and
``depth/objects/…`` on object pixels, when the source has instance maps); ``segment/…``
the standard per-class mIoU from a confusion matrix, where each scene's semantic map is assembled
from its ``segment`` items (a pixel takes the class with the strongest response above 0.5, else
background; classes whose item was not evaluated, e.g. cut by ``--limit``, do not compete), plus
the mean binary IoU of the items; ``detect/…`` mAP@0.5 by pycocotools' COCOeval over the
(scene, class) pairs evaluated.
"""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from genperc.errors import UserError
from genperc.metrics import (
    DEPTH_METRICS,
    coco_map50,
    confusion_matrix,
    depth_metrics,
    mask_intersection_union,
    nanmean,
    semantic_summary,
)
from genperc.tasks.base import Task, TaskBatch
from genperc.tasks.depth import DepthRange, ensemble_depth, normalise_depth

SUBTASKS = ("depth", "segment", "detect")
PROMPTS = {
    "depth": ("estimate the depth of this image", "predict the depth map", "what is the depth of this scene",
              "make a depth map of this image"),
    "segment": ("segment the {c}", "segment every {c}", "show the mask of the {c}", "highlight the {c} pixels"),
    "detect": ("detect the {c}", "detect every {c}", "draw boxes around the {c}", "find the {c} and box it"),
}
OBJECT_METRICS = tuple(f"objects/{k}" for k in DEPTH_METRICS)  # depth on object pixels (depth_metrics)
BOX_COLOUR = (0, 255, 0)  # pure green: far from every CLEVR colour (≥ 150 RGB units)
#: how a detect target draws its boxes: InstructCV's outlines, or filled rectangles (issue 12: at
#: 32 px a 1-pixel outline is a hard target; decoding is the same — a filled box's external contour
#: is its outline — and a box's confidence is the mean response over the drawn pixels)
BOX_STYLES = ("outline", "fill")


def _prompt_patterns():
    pats = []
    for sub in ("segment", "detect"):
        for p in PROMPTS[sub]:
            pats.append((sub, re.compile("^" + re.escape(p).replace(re.escape("{c}"), "(?P<c>.+?)") + r"\W*$")))
    return pats


_PATTERNS = _prompt_patterns()


def parse_prompt(prompt: str) -> tuple[str, str]:
    """(subtask, class name) of a generalist prompt; a :class:`UserError` when it fits none."""
    p = " ".join(prompt.strip().lower().split())
    if not p:
        raise UserError("the generalist needs a prompt", 'pass --prompt "segment the cube" (or "detect the …", '
                        '"estimate the depth of this image")')
    for sub, pat in _PATTERNS:
        m = pat.match(p)
        if m:
            return sub, m.group("c")
    if "depth" in p:
        return "depth", ""
    if re.match(r"^(detect|box|find)\b", p):
        return "detect", p.split()[-1]
    if re.match(r"^(segment|mask)\b", p):
        return "segment", p.split()[-1]
    examples = "; ".join([PROMPTS["depth"][0], PROMPTS["segment"][0].format(c="cube"),
                          PROMPTS["detect"][0].format(c="cube")])
    raise UserError(f"cannot tell the subtask of the prompt {prompt!r}", f"phrase it like: {examples}")


class GeneralistDataset(torch.utils.data.Dataset):
    """(record, subtask, class) items over a scene source, enumerated deterministically.

    For each record: one ``depth`` item, then one ``segment`` and one ``detect`` item per class
    (``classes``: names, default every source category but "background"), including classes absent
    from the scene (target: nothing) unless ``absent_classes=False`` (which reads every record once
    to list its classes). The phrasing of each item's prompt is fixed by (record, subtask, class)
    (``phrasing``: "vary" or the index of one phrasing).

    Item keys: ``image``, ``index``, ``meta``, ``text``, ``subtask``, ``class_id`` (−1 for depth),
    ``class_name``, ``depth``/``valid`` [1, H, W], ``mask`` [1, H, W] (the class's pixels),
    ``semantic`` [H, W] (−1 = ignore), ``boxes`` [N, 4] of the class (xyxy output pixels).
    """

    def __init__(self, source, resolution=None, fit: str = "stretch", subtasks=SUBTASKS, classes=None,
                 absent_classes: bool = True, phrasing="vary"):
        from genperc.data.datasets import DepthDataset, DetectionDataset, SceneDataset, SemanticDataset

        self.source = source
        self.resolution = resolution
        self.fit = fit
        self.base = SceneDataset(source, resolution, fit)
        self.categories = list(getattr(source, "categories", []))
        bad = [s for s in subtasks if s not in SUBTASKS]
        if bad or not subtasks:
            raise UserError(f"generalist: unknown subtask(s) {bad or subtasks}", f"use some of {', '.join(SUBTASKS)}")
        self.subtasks = tuple(subtasks)
        names = [c for c in self.categories if c != "background"] if classes is None else list(classes)
        unknown = [c for c in names if c not in self.categories]
        if unknown:
            raise UserError(f"generalist: class(es) {unknown} are not categories of the source",
                            f"choose among: {', '.join(self.categories)}")
        if not names and set(self.subtasks) - {"depth"}:
            raise UserError("generalist: the source has no classes for segment/detect items",
                            "use a source with categories or task_options.subtasks=[depth]")
        self.class_ids = [self.categories.index(c) for c in names]
        self.phrasing = phrasing
        self._depth = DepthDataset(source, resolution, fit)
        self._semantic = SemanticDataset(source, resolution, fit)
        self._detect = DetectionDataset(source, resolution, fit)
        items = []
        for r in range(len(source)):
            present = None
            if not absent_classes:
                rec = source[r]
                present = {o.category_id for o in rec.objects}
            for sub in self.subtasks:
                if sub == "depth":
                    items.append((r, sub, -1))
                    continue
                for c in self.class_ids:
                    if present is None or c in present:
                        items.append((r, sub, c))
        self._items = items

    def __len__(self) -> int:
        return len(self._items)

    def prompt(self, record_index: int, subtask: str, class_id: int) -> str:
        options = PROMPTS[subtask]
        if self.phrasing == "vary":
            k = zlib.crc32(f"{record_index}/{subtask}/{class_id}".encode()) % len(options)
        else:
            k = int(self.phrasing) % len(options)
        name = self.categories[class_id] if class_id >= 0 else ""
        return options[k].format(c=name)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        r, sub, c = self._items[index]
        record, plan = self.base._load(r)
        item = self.base._base(index, r, record, plan)
        h, w = item["image"].shape[-2:]
        if record.depth is not None:
            item.update(self._depth._targets(r, record, plan))
        else:
            if sub == "depth":
                raise UserError(f"{type(self.source).__name__}[{r}] has no depth", "drop 'depth' from the subtasks")
            item.update({"depth": torch.zeros(1, h, w), "valid": torch.zeros(1, h, w, dtype=torch.bool)})
        if record.semantic is not None or record.instances is not None:
            sem = self._semantic._targets(r, record, plan)["semantic"]
        else:
            sem = torch.full((h, w), -1, dtype=torch.int64)
        det = self._detect._targets(r, record, plan) if record.objects else {
            "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
        keep = det["labels"] == c
        item.update({
            "text": self.prompt(r, sub, c), "subtask": sub, "class_id": c,
            "class_name": self.categories[c] if c >= 0 else "",
            "mask": (sem == c)[None] if c >= 0 else torch.zeros(1, h, w, dtype=torch.bool),
            "semantic": sem, "boxes": det["boxes"][keep], "labels": det["labels"][keep],
        })
        return item


def draw_box_outlines(image: Tensor, boxes: Tensor, colour: Tensor, width: int = 1) -> Tensor:
    """[3, H, W] image with the outlines of ``boxes`` (xyxy, right/bottom exclusive) in ``colour``."""
    out = image.clone()
    h, w = out.shape[-2:]
    c = colour.view(3, 1).to(out)
    for x0, y0, x1, y1 in boxes.tolist():
        ix0, iy0 = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
        ix1, iy1 = min(w, int(np.ceil(x1))), min(h, int(np.ceil(y1)))
        if ix1 <= ix0 or iy1 <= iy0:
            continue
        k = min(width, ix1 - ix0, iy1 - iy0)
        for ys, xs in ((slice(iy0, iy0 + k), slice(ix0, ix1)), (slice(iy1 - k, iy1), slice(ix0, ix1)),
                       (slice(iy0, iy1), slice(ix0, ix0 + k)), (slice(iy0, iy1), slice(ix1 - k, ix1))):
            region = out[:, ys, xs]
            out[:, ys, xs] = c.view(3, 1, 1).expand_as(region)
    return out


def outline_mask(h: int, w: int, box, width: int) -> np.ndarray:
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    k = width
    if x1 - x0 > 2 * k and y1 - y0 > 2 * k:
        m[y0 + k:y1 - k, x0 + k:x1 - k] = False
    return m


class GeneralistTask(Task):
    name: ClassVar[str] = "generalist"
    main_metric: ClassVar[str] = "segment/mIoU"
    headline: ClassVar[tuple[str, ...]] = ("depth/AbsRel", "depth/delta1", "depth/objects/AbsRel", "depth/objects/delta1", "detect/mAP@0.5")

    def __init__(self, subtasks=SUBTASKS, classes=None, absent_classes: bool = True, phrasing="vary",
                 box_width: int | None = None, box_threshold: float = 80.0, min_box: int = 2,
                 min_depth: float | None = None, max_depth: float | None = None, segment_threshold: float = 0.5,
                 box_style: str = "outline"):
        self.subtasks = tuple(subtasks)
        self.classes = None if classes is None else list(classes)
        self.absent_classes = bool(absent_classes)
        self.phrasing = phrasing
        self.box_width = box_width
        if box_style not in BOX_STYLES:
            raise UserError(f"task_options.box_style={box_style!r} is not a box style", f"use one of {', '.join(BOX_STYLES)}")
        self.box_style = box_style
        self.box_threshold = float(box_threshold)
        self.min_box = int(min_box)
        self.depth_range = DepthRange(min_depth, max_depth)
        self.segment_threshold = float(segment_threshold)
        self.categories: list[str] = []

    def dataset(self, source, resolution: int):
        ds = GeneralistDataset(source, resolution, subtasks=self.subtasks, classes=self.classes,
                               absent_classes=self.absent_classes, phrasing=self.phrasing)
        self.categories = ds.categories
        self.depth_range.adopt(source)
        return ds

    def _width(self, h: int) -> int:
        """The drawn outline's width; a filled box is an outline as wide as the image."""
        if self.box_style == "fill":
            return h
        return int(self.box_width) if self.box_width else max(1, h // 32)

    @property
    def box_colour(self) -> Tensor:
        return torch.tensor(BOX_COLOUR, dtype=torch.float32) / 127.5 - 1

    def encode_target(self, batch: dict) -> Tensor:
        image = batch["image"]
        h = image.shape[-2]
        depth = normalise_depth(batch["depth"], batch["valid"]).to(image).expand(-1, 3, -1, -1)
        seg = batch["mask"].to(image).expand(-1, 3, -1, -1) * 2 - 1
        out = []
        for i, sub in enumerate(batch["subtask"]):
            if sub == "depth":
                out.append(depth[i])
            elif sub == "segment":
                out.append(seg[i])
            else:
                out.append(draw_box_outlines(image[i], batch["boxes"][i], self.box_colour, self._width(h)))
        return torch.stack(out)

    def prepare(self, batch: dict) -> TaskBatch:
        return TaskBatch(x0=self.encode_target(batch), image=batch["image"], texts=list(batch["text"]),
                         extras={"subtask": list(batch["subtask"]), "valid": batch["valid"]},
                         loss_mask=self.loss_mask(batch))

    @staticmethod
    def loss_mask(batch: dict) -> Tensor:
        """[B, 1, H, W]: depth items count their valid pixels only (Marigold), the others every pixel."""
        valid = batch["valid"].to(device=batch["image"].device, dtype=torch.float32)
        is_depth = torch.tensor([sub == "depth" for sub in batch["subtask"]], device=valid.device)
        return torch.where(is_depth.view(-1, 1, 1, 1), valid, torch.ones_like(valid))

    def request(self, image: Tensor, prompts: list[str] | None = None) -> tuple[TaskBatch, dict]:
        prompts = list(prompts or [])
        if len(prompts) != image.shape[0]:
            raise UserError("the generalist needs one prompt per image",
                            'pass --prompt "segment the cube" (or "detect the …", "estimate the depth of this image")')
        parsed = [parse_prompt(p) for p in prompts]
        batch = {"subtask": [s for s, _ in parsed], "class_name": [c for _, c in parsed], "text": prompts}
        return TaskBatch(x0=torch.zeros_like(image), image=image, texts=[p.strip() for p in prompts]), batch

    # -- decoding ---------------------------------------------------------------------------

    def _decode_boxes(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        import cv2

        h, w = x0.shape[-2:]
        dist = ((x0.float() - self.box_colour.view(3, 1, 1).to(x0.device)) * 127.5).pow(2).sum(0).sqrt()
        response = (1 - dist / self.box_threshold).clamp(0, 1).cpu().numpy()
        binary = (dist < self.box_threshold).cpu().numpy().astype(np.uint8)
        contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        boxes, scores = [], []
        for cnt in contours:
            x, y, bw, bh = cv2.boundingRect(cnt)
            if bw < self.min_box or bh < self.min_box:
                continue
            box = (x, y, x + bw, y + bh)
            ring = outline_mask(h, w, box, self._width(h))
            boxes.append(box)
            scores.append(float(response[ring].mean()))
        order = np.argsort(-np.asarray(scores)) if scores else []
        b = torch.tensor([boxes[i] for i in order], dtype=torch.float32).reshape(-1, 4)
        s = torch.tensor([scores[i] for i in order], dtype=torch.float32)
        return b, s

    def _decode_one(self, x0: Tensor, subtask: str) -> dict:
        if subtask == "depth":
            return {"subtask": "depth", "depth": x0.float().mean(0, keepdim=True)}
        if subtask == "segment":
            response = ((x0.float().mean(0) + 1) / 2).clamp(0, 1)
            return {"subtask": "segment", "response": response, "mask": (response > self.segment_threshold)[None]}
        boxes, scores = self._decode_boxes(x0)
        return {"subtask": "detect", "boxes": boxes, "scores": scores, "size": tuple(x0.shape[-2:])}

    def decode(self, x0: Tensor, batch: dict) -> list[dict]:
        labels = batch.get("class_name") or [""] * len(batch["subtask"])
        return [{**self._decode_one(x0[i], sub), "label": labels[i]} for i, sub in enumerate(batch["subtask"])]

    def decode_ensemble(self, members: list[Tensor], batch: dict) -> list[dict]:
        """Depth items: Marigold's ensemble; the others: decode the per-pixel median image."""
        out = self.decode(torch.stack(members).median(0).values, batch)
        for i, sub in enumerate(batch["subtask"]):
            if sub == "depth":
                stack = torch.stack([m[i].float().mean(0) for m in members])
                out[i]["depth"] = (ensemble_depth(stack) * 2 - 1)[None]
        return out

    # -- the discriminative counterpart ------------------------------------------------------

    def discriminative_loss(self, output: Tensor, batch: TaskBatch) -> dict[str, Tensor]:
        """Each item by its prompt, every loss summed over its items and divided by the batch size
        (so the total is the mean over items of each item's loss; absent kinds give 0):

        * ``ssi`` — depth prompts: the depth task's scale-and-shift-invariant loss on the channel
          mean, valid pixels only;
        * ``bce`` + ``dice`` — segment prompts: the referring task's loss on the channel-mean logits
          against the class mask (read back from the white-on-black target, exact as it is ±1);
        * ``box_mse`` — detect prompts: the mean squared error of x̂0 to the box-outline target
          image, which is then decoded exactly as the generative path decodes its sample (clamped
          to [−1, 1], box-colour contours). The outlines are a picture, not a dense label; the
          image-space regression keeps the generative decoder and its confidences.
        """
        from genperc.tasks.losses import bce_loss, dice_loss, ssi_loss

        out = output.float()
        x0 = batch.x0.to(out.device).float()
        subtasks = batch.extras["subtask"]
        b = out.shape[0]
        zero = out.sum() * 0.0
        losses = {"ssi": zero, "bce": zero, "dice": zero, "box_mse": zero}
        mask = batch.loss_mask.to(out.device) if batch.loss_mask is not None else None
        for kind in ("depth", "segment", "detect"):
            idx = [i for i, sub in enumerate(subtasks) if sub == kind]
            if not idx:
                continue
            sel = torch.tensor(idx, device=out.device)
            o, t = out[sel], x0[sel]
            if kind == "depth":
                m = mask[sel] if mask is not None else None
                losses["ssi"] = ssi_loss(o.mean(1, keepdim=True), t.mean(1, keepdim=True), m).sum() / b
            elif kind == "segment":
                logits, target = o.mean(1, keepdim=True), (t.mean(1, keepdim=True) > 0).float()
                losses["bce"] = bce_loss(logits, target).sum() / b
                losses["dice"] = dice_loss(torch.sigmoid(logits), target).sum() / b
            else:
                losses["box_mse"] = (o - t).pow(2).flatten(1).mean(1).sum() / b
        return losses

    def decode_discriminative(self, output: Tensor, batch: dict) -> list[dict]:
        """Per prompt, as :meth:`decode` returns: depth = the channel mean mapped onto [−1, 1] per
        item (affine, metrics unchanged); segment = sigmoid of the channel-mean logits as the
        response, mask where it exceeds ``segment_threshold``; detect = :meth:`decode` of x̂0 clamped
        to [−1, 1] (the generative decoder)."""
        from genperc.tasks.losses import minmax_normalise

        labels = batch.get("class_name") or [""] * len(batch["subtask"])
        out = []
        for i, sub in enumerate(batch["subtask"]):
            o = output[i].float()
            if sub == "depth":
                item = {"subtask": "depth", "depth": minmax_normalise(o.mean(0, keepdim=True)[None])[0]}
            elif sub == "segment":
                response = torch.sigmoid(o.mean(0))
                item = {"subtask": "segment", "response": response, "mask": (response > self.segment_threshold)[None]}
            else:
                item = self._decode_one(o.clamp(-1, 1), "detect")
            out.append({**item, "label": labels[i]})
        return out

    # -- metrics ----------------------------------------------------------------------------

    def metrics(self, prediction: list[dict], batch: dict) -> dict[str, Tensor | list]:
        n = len(prediction)
        nan = float("nan")
        objects = batch.get("objects")
        depth_keys = (*DEPTH_METRICS, *(OBJECT_METRICS if objects is not None else ()))
        cols: dict[str, list] = {k: [nan] * n for k in (*depth_keys, "IoU", "boxes_found", "boxes_true")}
        seg, det = [None] * n, [None] * n
        records = [m.get("record_index", i) for i, m in enumerate(batch.get("meta", [{}] * n))]
        for i, p in enumerate(prediction):
            sub = p["subtask"]
            if sub == "depth":
                vals = depth_metrics(p["depth"][None], batch["depth"][i:i + 1], batch["valid"][i:i + 1],
                                     min_depth=self.depth_range.min_depth, max_depth=self.depth_range.max_depth,
                                     objects=None if objects is None else objects[i:i + 1])
                for k in depth_keys:
                    cols[k][i] = float(vals[k][0])
            elif sub == "segment":
                inter, union = mask_intersection_union(p["mask"][None], batch["mask"][i:i + 1])
                # an absent class correctly left empty has no IoU (not 0): left out of the mean
                cols["IoU"][i] = float(inter[0] / union[0]) if union[0] > 0 else nan
                seg[i] = {"record": int(records[i]), "class_id": int(batch["class_id"][i]),
                          "response": p["response"].half().cpu(), "semantic": batch["semantic"][i].cpu()}
            else:
                cols["boxes_found"][i] = float(len(p["boxes"]))
                cols["boxes_true"][i] = float(len(batch["boxes"][i]))
                det[i] = {"record": int(records[i]), "class_id": int(batch["class_id"][i]),
                          "boxes": p["boxes"].tolist(), "scores": p["scores"].tolist(),
                          "gt": batch["boxes"][i].tolist()}
        out: dict[str, Tensor | list] = {k: torch.tensor(v, dtype=torch.float64) for k, v in cols.items()}
        out.update({"subtask": list(batch["subtask"]), "seg": seg, "det": det})
        return out

    def summarize(self, per_sample: dict) -> dict[str, float]:
        subs = per_sample["subtask"]
        out: dict[str, float] = {}
        for sub in SUBTASKS:
            out[f"{sub}/n"] = float(sum(s == sub for s in subs))
        is_depth = torch.tensor([s == "depth" for s in subs])
        if is_depth.any():
            for k in DEPTH_METRICS:
                out[f"depth/{k}"] = nanmean(per_sample[k][is_depth].tolist())
            if "objects/AbsRel" in per_sample:  # over the depth items with object pixels
                for k in OBJECT_METRICS:
                    out[f"depth/{k}"] = nanmean(per_sample[k][is_depth].tolist())
                out["depth/objects/n"] = float((~torch.isnan(per_sample["objects/AbsRel"][is_depth])).sum())
        seg = [s for s in per_sample["seg"] if s is not None]
        if seg:
            out.update({f"segment/{k}": v for k, v in self._semantic_summary(seg).items()})
            is_seg = torch.tensor([s == "segment" for s in subs])
            out["segment/mean_item_IoU"] = nanmean(per_sample["IoU"][is_seg].tolist())
        det = [d for d in per_sample["det"] if d is not None]
        if det:
            gt = [{"image_id": d["record"], "category_id": d["class_id"], "box": b} for d in det for b in d["gt"]]
            dets = [{"image_id": d["record"], "category_id": d["class_id"], "box": b, "score": s}
                    for d in det for b, s in zip(d["boxes"], d["scores"], strict=True)]
            cats = sorted({d["class_id"] for d in det})
            out.update({f"detect/{k}": v for k, v in coco_map50(gt, dets, cats).items()})
        return out

    def _semantic_summary(self, seg: list[dict]) -> dict[str, float]:
        cats = self.categories or [str(i) for i in range(1 + max(s["class_id"] for s in seg))]
        bg = cats.index("background") if "background" in cats else None
        by_record: dict[int, list[dict]] = {}
        for s in seg:
            by_record.setdefault(s["record"], []).append(s)
        conf = torch.zeros(len(cats), len(cats), dtype=torch.int64)
        for items in by_record.values():
            resp = torch.stack([s["response"].float() for s in items])
            ids = torch.tensor([s["class_id"] for s in items])
            best, arg = resp.max(0)
            pred = ids[arg]
            on = best > self.segment_threshold
            pred = torch.where(on, pred, torch.full_like(pred, bg if bg is not None else -1))
            gt = items[0]["semantic"]
            if bg is None:  # no background class: pixels without a response are not scored
                gt = torch.where(on, gt, torch.full_like(gt, -1))
            conf += confusion_matrix(pred, gt, len(cats))
        return semantic_summary(conf, cats)

    def settings(self) -> dict:
        return {"subtasks": list(self.subtasks), "classes": self.classes or "all but background",
                "absent_classes": self.absent_classes, "box_colour": list(BOX_COLOUR),
                "box_threshold": self.box_threshold, "box_width": self.box_width or "resolution // 32",
                "box_style": self.box_style,
                "box_score": "mean box-colour response on the box outline",
                "segment_threshold": self.segment_threshold, "depth_range": self.depth_range.as_list(),
                "depth_range_from": self.depth_range.origin,
                "depth_alignment": "least squares in depth space", "mAP": "pycocotools COCOeval, IoU 0.5"}

    # -- prediction files -------------------------------------------------------------------

    def export(self, prediction: dict, out_dir: Path, image: np.ndarray, stem: str = "prediction") -> list[Path]:
        from genperc.images import draw_boxes, save_rgb
        from genperc.tasks.depth import DepthTask
        from genperc.tasks.referring import ReferringTask

        sub = prediction["subtask"]
        if sub == "depth":
            return DepthTask().export(prediction["depth"], out_dir, image, stem)
        if sub == "segment":
            return ReferringTask().export(prediction["mask"], out_dir, image, stem)
        h, w = image.shape[:2]
        gh, gw = prediction.get("size", (None, None))
        sx = w / gw if gw else 1.0
        sy = h / gh if gh else 1.0
        boxes = [[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in prediction["boxes"].tolist()]
        scores = prediction["scores"].tolist()
        label = prediction.get("label", "")
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{stem}_boxes.json"
        path.write_text(json.dumps({"format": "xyxy pixels of the input image, right/bottom exclusive",
                                    "label": label, "boxes": [{"box": [round(v, 2) for v in b], "score": round(s, 4),
                                                               "label": label} for b, s in zip(boxes, scores, strict=True)]},
                                   indent=1))
        vis = draw_boxes(image, boxes, scores, labels=[label] * len(boxes) if label else None)
        return [path, save_rgb(vis, out_dir / f"{stem}_boxes.png")]
