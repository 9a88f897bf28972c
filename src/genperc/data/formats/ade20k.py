"""ADE20K in the SceneParsing (ADEChallengeData2016) layout, 150 classes.

Layout::

    <root>/images/{training,validation}/<stem>.jpg
    <root>/annotations/{training,validation}/<stem>.png    8-bit, 0 = other, 1..150 = classes
    <root>/objectInfo150.txt or objectInfo150.csv          optional: class names
    <root>/sceneCategories.txt                             optional: "<stem> <scene>" per line

Labels: 0 ("other objects") → −1 (ignore); class k ∈ 1..150 → k−1 (the usual
``reduce_zero_label``). Names come from ``objectInfo150`` (first synonym of the ``Name`` column,
e.g. "building;edifice" → "building"), else ``class_1..class_150``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from genperc.data.formats.common import IMAGE_SUFFIXES, contained, existing, read_image, read_label_png
from genperc.data.record import SceneRecord
from genperc.errors import UserError

NUM_CLASSES = 150
SPLIT_DIRS = {"train": "training", "training": "training", "val": "validation",
              "validation": "validation"}


def read_object_info(path) -> list[str]:
    """Class names from ``objectInfo150.txt`` (tab-separated) or ``.csv``, ordered by ``Idx``."""
    path = Path(path)
    delimiter = "," if path.suffix == ".csv" else "\t"
    with open(path, encoding="utf-8", newline="") as fh:
        rows = [r for r in csv.reader(fh, delimiter=delimiter) if any(c.strip() for c in r)]
    if not rows:
        raise UserError(f"{path} is empty", "delete it or restore the class list")
    header = [c.strip().lower() for c in rows[0]]
    name_col = header.index("name") if "name" in header else len(header) - 1
    idx_col = header.index("idx") if "idx" in header else None
    entries = []
    for lineno, r in enumerate(rows[1:], 2):
        try:
            idx = int(r[idx_col]) if idx_col is not None else lineno - 1
            name = r[name_col].split(";")[0].strip()
        except (ValueError, IndexError):
            raise UserError(f"{path}: cannot parse line {lineno}: {delimiter.join(r)!r}",
                            "expected columns Idx ... Name with a header line") from None
        entries.append((idx, name))
    entries.sort()
    names = [n for _, n in entries]
    if len(names) != NUM_CLASSES:
        raise UserError(f"{path} lists {len(names)} classes, expected {NUM_CLASSES}",
                        "use objectInfo150 from the SceneParsing release")
    return names


class ADE20KSource:
    """ADE20K SceneParsing as a :class:`~genperc.data.record.SceneSource` (semantic maps)."""

    def __init__(self, root, split: str = "val"):
        root = existing(root, "ADE20K root", "expected ADEChallengeData2016/ with images/ "
                        "and annotations/")
        if split not in SPLIT_DIRS:
            raise UserError(f"unknown ADE20K split '{split}'", "use 'train' or 'val'")
        sub = SPLIT_DIRS[split]
        image_dir = existing(root / "images" / sub, "ADE20K image folder")
        ann_dir = existing(root / "annotations" / sub, "ADE20K annotation folder")
        self.images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.images:
            raise UserError(f"no images in {image_dir}", "check the ADE20K root")
        self.annotations = [ann_dir / (p.stem + ".png") for p in self.images]
        missing = [a for a in self.annotations if not a.exists()]
        if missing:
            raise UserError(f"{len(missing)} ADE20K annotation(s) missing, first: {missing[0]}",
                            "every image needs annotations/<split>/<stem>.png")
        self.split = split
        info = next((root / n for n in ("objectInfo150.txt", "objectInfo150.csv")
                     if (root / n).exists()), None)
        self.categories = (read_object_info(info) if info is not None
                           else [f"class_{k}" for k in range(1, NUM_CLASSES + 1)])
        self._scenes = {}
        scenes = root / "sceneCategories.txt"
        if scenes.exists():
            for line in scenes.read_text(encoding="utf-8").splitlines():
                parts = line.split()
                if len(parts) >= 2:
                    self._scenes[parts[0]] = parts[1]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> SceneRecord:
        if not 0 <= index < len(self):
            raise IndexError(index)
        image_path, ann_path = self.images[index], self.annotations[index]
        image = read_image(contained(image_path.parent, image_path.name, "ADE20K image"))
        labels = read_label_png(contained(ann_path.parent, ann_path.name, "ADE20K annotation"), "ADE20K annotation")
        if labels.shape != image.shape[:2]:
            raise UserError(f"ADE20K annotation {self.annotations[index]} is "
                            f"{labels.shape[1]}x{labels.shape[0]}, its image is "
                            f"{image.shape[1]}x{image.shape[0]}", "the pair does not match")
        if labels.max(initial=0) > NUM_CLASSES:
            raise UserError(f"ADE20K annotation {self.annotations[index]} has label "
                            f"{int(labels.max())} > {NUM_CLASSES}", "is this the 150-class release?")
        semantic = (labels - 1).astype(np.int32)  # 0 → -1 (ignore), k → k-1
        stem = self.images[index].stem
        meta = {"source": "ade20k", "split": self.split, "file_name": self.images[index].name}
        if stem in self._scenes:
            meta["scene"] = self._scenes[stem]
        return SceneRecord(image=image, semantic=semantic, meta=meta)
