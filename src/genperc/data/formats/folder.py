"""A generic folder layout for data a user brings (documented in docs/data-formats.md).

::

    <root>/                       (or <root>/<split>/ when that folder exists)
      images/<stem>.png|.jpg      RGB images (required)
      depth/<stem>.npy            float32 [H, W] metres; non-finite or <= 0 = invalid
      depth/<stem>.png            16-bit; metres = value * depth_scale (meta.json); 0 = invalid
      masks/<stem>.png            instance ids, 8/16-bit: 0 = background, k = object id k
      semantic/<stem>.png         category indices; `semantic_ignore` (default 255) → -1
      annotations.jsonl           optional, one JSON object per image (see below)
      meta.json                   optional: categories, classes, depth_scale, semantic_ignore

An ``annotations.jsonl`` line::

    {"image": "0001.png", "split": "train", "class": 3,
     "objects": [{"id": 1, "category": "cube", "box": [x0, y0, x1, y1], "attributes": {}}],
     "expressions": [{"text": "the red cube", "object_ids": [1], "family": "attribute", "id": 7}],
     "meta": {}}

When ``annotations.jsonl`` exists its lines define the items, in file order; otherwise every
image, sorted by name. ``split`` filters lines by their ``"split"`` field when the root has no
``<split>/`` folder (``None`` or ``"all"`` keeps everything).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from genperc.data.formats.common import (
    IMAGE_SUFFIXES,
    contained,
    existing,
    read_image,
    read_json,
    read_jsonl,
    read_label_png,
)
from genperc.data.record import Expression, ObjectAnn, SceneRecord
from genperc.errors import UserError


class FolderSource:
    """The generic folder layout as a :class:`~genperc.data.record.SceneSource`."""

    def __init__(self, root, split: str | None = None):
        root = existing(root, "data folder")
        if split not in (None, "all") and (root / split / "images").is_dir():
            root, split_filter = root / split, None
        else:
            split_filter = None if split in (None, "all") else split
        self.root = root
        self.split = split
        image_dir = existing(root / "images", "image folder", f"expected {root}/images/")
        meta_path = root / "meta.json"
        self.info = read_json(meta_path, "meta.json") if meta_path.exists() else {}
        if not isinstance(self.info, dict):
            raise UserError(f"{meta_path} must hold a JSON object", "see docs/data-formats.md")
        ann_path = root / "annotations.jsonl"
        if ann_path.exists():
            rows = read_jsonl(ann_path, "annotations file")
            for lineno, row in enumerate(rows, 1):
                if "image" not in row:
                    raise UserError(f"{ann_path}: entry {lineno} has no 'image'",
                                    "every line names its image file, e.g. \"image\": \"0001.png\"")
            if split_filter is not None:
                rows = [r for r in rows if r.get("split") == split_filter]
                if not rows:
                    raise UserError(f"no entries with split '{split_filter}' in {ann_path}",
                                    "check the split name or the 'split' fields")
            self._rows = rows
        else:
            if split_filter is not None:
                raise UserError(f"no folder {root / split_filter}/images and no annotations.jsonl "
                                f"to select split '{split_filter}'", "pass split=None to use all "
                                "images, or arrange one folder per split")
            self._rows = [{"image": p.name} for p in sorted(image_dir.iterdir())
                          if p.suffix.lower() in IMAGE_SUFFIXES]
            if not self._rows:
                raise UserError(f"no images in {image_dir}", "add .png or .jpg files")
        self.image_dir = image_dir
        names = self.info.get("categories")
        if names is None:
            names = sorted({str(o["category"]) for r in self._rows
                            for o in r.get("objects", []) if "category" in o})
        self.categories = [str(n) for n in names]
        self.classes = [str(c) for c in self.info.get("classes", self.categories)]
        self._cat_index = {n: k for k, n in enumerate(self.categories)}
        self.depth_scale = self.info.get("depth_scale")
        self.semantic_ignore = int(self.info.get("semantic_ignore", 255))

    def __len__(self) -> int:
        return len(self._rows)

    def _stem(self, index: int) -> str:
        return Path(self._rows[index]["image"]).stem

    def expressions_at(self, index: int) -> list[Expression]:
        """The expressions of record ``index`` without reading its files."""
        out = []
        for k, e in enumerate(self._rows[index].get("expressions", [])):
            try:
                out.append(Expression(text=str(e["text"]),
                                      object_ids=[int(i) for i in e["object_ids"]],
                                      family=str(e.get("family", "unknown")), id=e.get("id", k)))
            except (KeyError, TypeError, ValueError):
                raise UserError(f"{self.root / 'annotations.jsonl'}: expression {k} of "
                                f"{self._rows[index]['image']} needs 'text' and 'object_ids'",
                                "see docs/data-formats.md") from None
        return out

    def _objects(self, row: dict) -> list[ObjectAnn]:
        objects = []
        for k, o in enumerate(row.get("objects", [])):
            where = f"{self.root / 'annotations.jsonl'}: object {k} of {row['image']}"
            if "id" not in o:
                raise UserError(f"{where} has no 'id'", "give each object its instance id")
            if "category_id" in o:
                cid = int(o["category_id"])
                if not 0 <= cid < len(self.categories):
                    raise UserError(f"{where}: category_id {cid} out of range",
                                    "list the categories in meta.json")
            elif "category" in o:
                if str(o["category"]) not in self._cat_index:
                    raise UserError(f"{where}: unknown category '{o['category']}'",
                                    "add it to 'categories' in meta.json")
                cid = self._cat_index[str(o["category"])]
            else:
                raise UserError(f"{where} has no 'category'", "name its category")
            box = o.get("box")
            if box is not None:
                if len(box) != 4:
                    raise UserError(f"{where}: box must be [x0, y0, x1, y1]", "fix the box")
                box = tuple(float(v) for v in box)
            objects.append(ObjectAnn(id=int(o["id"]), category=self.categories[cid],
                                     category_id=cid, box=box,
                                     attributes=dict(o.get("attributes", {}))))
        return objects

    def _class_label(self, row: dict) -> int | None:
        c = row.get("class")
        if c is None or isinstance(c, int):
            return c
        if str(c) not in self.classes:
            raise UserError(f"{self.root / 'annotations.jsonl'}: unknown class '{c}' for "
                            f"{row['image']}", "list it in 'classes' in meta.json or use an index")
        return self.classes.index(str(c))

    def _depth(self, stem: str, hw) -> tuple[np.ndarray | None, np.ndarray | None]:
        npy, png = self.root / "depth" / f"{stem}.npy", self.root / "depth" / f"{stem}.png"
        if npy.exists():
            try:
                depth = np.load(npy, allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:
                raise UserError(f"cannot read depth {npy} ({exc})", "replace the file") from None
            depth = np.asarray(depth, dtype=np.float32)
            path = npy
        elif png.exists():
            if self.depth_scale is None:
                raise UserError(f"16-bit depth {png} needs 'depth_scale' in meta.json",
                                "e.g. {\"depth_scale\": 0.001} for millimetres")
            raw = read_label_png(png, "depth image")
            depth = raw.astype(np.float32) * float(self.depth_scale)
            depth[raw == 0] = 0.0
            path = png
        else:
            return None, None
        if depth.shape != tuple(hw):
            raise UserError(f"depth {path} has shape {depth.shape}, its image {tuple(hw)}",
                            "depth must be [H, W] like the image")
        return depth, np.isfinite(depth) & (depth > 0)

    def __getitem__(self, index: int) -> SceneRecord:
        if not 0 <= index < len(self):
            raise IndexError(index)
        row = self._rows[index]
        image = read_image(contained(self.image_dir, row["image"], f"{self.root / 'annotations.jsonl'}: image"))
        hw = image.shape[:2]
        stem = self._stem(index)
        depth, valid = self._depth(stem, hw)
        instances = semantic = None
        mask_path = self.root / "masks" / f"{stem}.png"
        if mask_path.exists():
            instances = read_label_png(mask_path, "instance mask").astype(np.int32)
        sem_path = self.root / "semantic" / f"{stem}.png"
        if sem_path.exists():
            raw = read_label_png(sem_path, "semantic mask")
            semantic = np.where(raw == self.semantic_ignore, -1, raw).astype(np.int32)
        for name, arr, path in (("instance mask", instances, mask_path),
                                ("semantic mask", semantic, sem_path)):
            if arr is not None and arr.shape != hw:
                raise UserError(f"{name} {path} has shape {arr.shape}, its image {hw}",
                                "masks must match the image size")
        meta = {"source": "folder", "split": row.get("split", self.split), "file_name": row["image"]}
        meta.update(row.get("meta", {}))
        return SceneRecord(image=image, depth=depth, depth_valid=valid, instances=instances,
                           semantic=semantic, objects=self._objects(row),
                           expressions=self.expressions_at(index),
                           class_label=self._class_label(row), meta=meta)


class ClassFolderSource:
    """The image-folder layout of torchvision's ``ImageFolder``: the class is the subfolder.

    ::

        <root>/<split>/<class>/<name>.png|.jpg     (or <root>/<class>/… when split is None / "all")

    Classes are the subfolder names, sorted (index = class label, as ``ImageFolder`` numbers them);
    items are ordered by class, then by file name. ``open_source("folder", …)`` picks this layout
    when the folder has no ``images/`` and no ``annotations.jsonl`` (the layout above)."""

    def __init__(self, root, split: str | None = None):
        root = existing(root, "data folder")
        if split not in (None, "all"):
            root = existing(root / split, f"split folder '{split}'",
                            f"arrange the images as {root}/{split}/<class>/<image>.png")
        self.root, self.split = root, split
        self._items = []
        self.classes = []
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if files:
                self._items += [(f, len(self.classes)) for f in files]
                self.classes.append(folder.name)
        if not self._items:
            raise UserError(f"no class folders with images in {root}",
                            "arrange the images as <root>/<split>/<class>/<image>.png")
        self.categories = self.classes

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> SceneRecord:
        if not 0 <= index < len(self):
            raise IndexError(index)
        path, label = self._items[index]
        return SceneRecord(image=read_image(contained(self.root, path.relative_to(self.root), "image")), class_label=label,
                           meta={"source": "folder", "split": self.split, "file_name": f"{path.parent.name}/{path.name}"})


def is_class_folder(root, split: str | None = None) -> bool:
    """Whether ``root`` (for ``split``) is in the class-subfolder layout rather than the layout with
    ``images/`` (:class:`FolderSource`)."""
    root = Path(root)
    if split not in (None, "all") and (root / split).is_dir():
        root = root / split
    return root.is_dir() and not (root / "images").is_dir() and not (root / "annotations.jsonl").exists()
