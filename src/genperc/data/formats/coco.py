"""COCO detection annotations (``instances_*.json``) with their image folder.

Layout (the one the COCO site publishes)::

    <root>/annotations/instances_<split>.json    e.g. instances_val2017.json
    <root>/<split>/<file_name>                   e.g. val2017/000000000139.jpg

``open_source("coco", root, "val2017")`` (or ``"val"``, which tries ``val2017`` then
``val2014``) finds both; or pass the JSON file and ``image_dir`` yourself.

Records: one per image, sorted by image id. Boxes: COCO ``[x, y, w, h]`` → ``(x0, y0, x1, y1)``.
Categories: ``["background"] + names`` in COCO id order, so the contiguous ``category_id`` is
1..K and 0 is background (as in the shapes world). Crowd annotations are left out of ``objects``
unless ``include_crowd``. With ``masks=True`` the records also carry an instance map (objects
painted largest first, so smaller objects stay visible where masks overlap; ids 1..N follow
``objects``) and a semantic map (0 = background, crowd regions −1 = ignore).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from genperc.data.formats.common import (
    coco_segmentation_to_mask,
    contained,
    existing,
    read_image,
    read_json,
    xywh_to_xyxy,
)
from genperc.data.record import ObjectAnn, SceneRecord
from genperc.errors import UserError


def find_coco_files(root, split: str) -> tuple[Path, Path]:
    """``(annotation json, image dir)`` of ``split`` under a COCO root."""
    root = existing(root, "COCO root")
    if root.is_file():
        raise UserError(f"{root} is a file", "pass the COCO root folder, or use CocoSource("
                        "annotations=..., image_dir=...)")
    names = [split] if split[-4:].isdigit() else [split, f"{split}2017", f"{split}2014"]
    for name in names:
        ann = root / "annotations" / f"instances_{name}.json"
        if ann.exists():
            for image_dir in (root / name, root / "images" / name, root / "images"):
                if image_dir.is_dir():
                    return ann, image_dir
            raise UserError(f"image folder for COCO split '{name}' not found under {root}",
                            f"expected {root / name}/")
    raise UserError(f"COCO annotations for split '{split}' not found: "
                    f"{root / 'annotations' / f'instances_{names[0]}.json'}",
                    "check the root and the split name (e.g. val2017)")


class CocoSource:
    """COCO ``instances`` annotations as a :class:`~genperc.data.record.SceneSource`."""

    def __init__(self, annotations, image_dir=None, masks: bool = False,
                 include_crowd: bool = False, skip_empty: bool = False, split: str | None = None):
        ann_path = existing(annotations, "COCO annotation file")
        data = read_json(ann_path, "COCO annotation file")
        if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= set(data):
            raise UserError(f"{ann_path} is not a COCO instances file",
                            "it needs 'images', 'annotations' and 'categories'")
        self.annotation_path = ann_path
        self.image_dir = Path(image_dir) if image_dir is not None else ann_path.parent
        self.masks = bool(masks)
        self.include_crowd = bool(include_crowd)
        self.split = split or ann_path.stem.removeprefix("instances_")
        cats = sorted(data["categories"], key=lambda c: c["id"])
        self.categories = ["background"] + [str(c["name"]) for c in cats]
        self.coco_category_ids = [c["id"] for c in cats]  # index k-1 ↔ category_id k
        self._cat_index = {c["id"]: k + 1 for k, c in enumerate(cats)}
        by_image: dict = {}
        for a in data["annotations"]:
            if a.get("category_id") not in self._cat_index:
                raise UserError(f"{ann_path}: annotation {a.get('id')} has unknown category "
                                f"{a.get('category_id')}", "the file is inconsistent")
            by_image.setdefault(a["image_id"], []).append(a)
        images = sorted(data["images"], key=lambda im: im["id"])
        if skip_empty:
            images = [im for im in images
                      if any(not a.get("iscrowd", 0) for a in by_image.get(im["id"], []))]
        self._images = images
        self._anns = {im["id"]: sorted(by_image.get(im["id"], []), key=lambda a: a["id"])
                      for im in images}

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> SceneRecord:
        if not 0 <= index < len(self):
            raise IndexError(index)
        info = self._images[index]
        path = contained(self.image_dir, info.get("file_name"), f"{self.annotation_path.name}: image {info.get('id')} file_name")
        image = read_image(path)
        h, w = image.shape[:2]
        if (int(info.get("height", h)), int(info.get("width", w))) != (h, w):
            raise UserError(f"image {path} is {w}x{h} but {self.annotation_path.name} says "
                            f"{info['width']}x{info['height']}", "the image is not the one annotated")
        anns = self._anns[info["id"]]
        kept = [a for a in anns if self.include_crowd or not a.get("iscrowd", 0)]
        objects = []
        for k, a in enumerate(kept, 1):
            cat = self._cat_index[a["category_id"]]
            objects.append(ObjectAnn(
                id=k, category=self.categories[cat], category_id=cat,
                box=xywh_to_xyxy(a["bbox"]) if "bbox" in a else None,
                attributes={"coco_ann_id": a["id"], "area": float(a.get("area", 0.0)),
                            "iscrowd": int(a.get("iscrowd", 0))}))
        record = SceneRecord(image=image, objects=objects,
                             meta={"source": "coco", "split": self.split, "image_id": info["id"],
                                   "file_name": info["file_name"]})
        if self.masks:
            instances = np.zeros((h, w), dtype=np.int32)
            semantic = np.zeros((h, w), dtype=np.int32)
            order = sorted(range(len(kept)), key=lambda i: -float(kept[i].get("area", 0.0)))
            for i in order:
                a = kept[i]
                m = coco_segmentation_to_mask(a["segmentation"], h, w,
                                              where=f"{self.annotation_path.name} annotation {a['id']}")
                instances[m] = objects[i].id
                semantic[m] = objects[i].category_id
            if not self.include_crowd:
                for a in anns:
                    if a.get("iscrowd", 0):
                        m = coco_segmentation_to_mask(a["segmentation"], h, w)
                        semantic[m & (instances == 0)] = -1
            record.instances, record.semantic = instances, semantic
        return record
