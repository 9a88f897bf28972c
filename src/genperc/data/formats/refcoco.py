"""RefCOCO, RefCOCO+ and G-Ref (RefCOCOg) in the layout of the refer toolkit.

Layout (REFERENCE.md, "Referring segmentation evaluation")::

    <root>/<dataset>/refs(<split_by>).p    pickle: list of refs (or refs(<split_by>).json)
    <root>/<dataset>/instances.json        COCO style: images, annotations, categories
    <root>/images/train2014/COCO_train2014_%012d.jpg   (``image_dir``)

A ref is ``{ref_id, ann_id, image_id, category_id, split, sentences: [{sent, tokens, sent_id}]}``.
The pickle is loaded with :class:`~genperc.data.formats.common.PlainUnpickler`, which refuses
every Python global, so a crafted file cannot run code.

One :class:`SceneRecord` per ref (not per image): its instance map holds the referred object's
full mask (id 1), and its expressions are the ref's sentences. Per ref, because COCO masks of
different objects may overlap, which one instance map per image cannot represent; the referring
dataset then yields one item per sentence. Masks are decoded with pycocotools (see
:func:`~genperc.data.formats.common.coco_segmentation_to_mask` for the ``polygon_overlap`` rule).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from genperc.data.formats.common import (
    coco_segmentation_to_mask,
    contained,
    existing,
    load_plain_pickle,
    read_image,
    read_json,
    xywh_to_xyxy,
)
from genperc.data.record import Expression, ObjectAnn, SceneRecord
from genperc.errors import UserError

#: The usual split-by of each data set of the refer toolkit (G-Ref also has "google").
DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
IMAGE_TEMPLATE = "COCO_train2014_%012d.jpg"


class RefCocoSource:
    """One split of RefCOCO / RefCOCO+ / G-Ref as a :class:`~genperc.data.record.SceneSource`.

    ``split`` is the refs' ``split`` value (``train``, ``val``, ``testA``, ``testB``, ``test``) or
    ``"all"``. ``categories`` is ``["background"] + COCO category names`` in COCO id order, as in
    :class:`~genperc.data.formats.coco.CocoSource`.
    """

    def __init__(self, root, dataset: str = "refcoco", split: str = "val",
                 split_by: str | None = None, image_dir=None, polygon_overlap: str = "union"):
        root = existing(root, "refer data root")
        self.dataset = dataset
        self.split_by = split_by or DEFAULT_SPLIT_BY.get(dataset.lower(), "unc")
        data_dir = root / dataset
        if not data_dir.is_dir() and (root / "instances.json").exists():
            data_dir = root  # root already points at <root>/<dataset>
        refs_p = data_dir / f"refs({self.split_by}).p"
        refs_json = data_dir / f"refs({self.split_by}).json"
        if refs_json.exists():
            refs = read_json(refs_json, "refs file")
        elif refs_p.exists():
            refs = load_plain_pickle(refs_p, "refs file")
        else:
            raise UserError(
                f"refs file not found: {refs_p}",
                f"expected <root>/{dataset}/refs({self.split_by}).p from the refer toolkit; "
                "check root, dataset and split_by",
            )
        self.refs_path = refs_json if refs_json.exists() else refs_p
        self._check_refs(refs)
        inst_path = data_dir / "instances.json"
        inst = read_json(existing(inst_path, "instances file",
                                  f"expected {dataset}/instances.json next to the refs file"),
                         "instances file")
        if not isinstance(inst, dict) or not {"images", "annotations", "categories"} <= set(inst):
            raise UserError(f"{inst_path} is not a COCO instances file",
                            "it needs 'images', 'annotations' and 'categories'")
        self.image_dir = Path(image_dir) if image_dir is not None else root / "images" / "train2014"
        self.polygon_overlap = polygon_overlap

        cats = sorted(inst["categories"], key=lambda c: c["id"])
        self.categories = ["background"] + [str(c["name"]) for c in cats]
        self._cat_index = {c["id"]: k + 1 for k, c in enumerate(cats)}
        self._images = {im["id"]: im for im in inst["images"]}
        anns = {}
        self.splits = sorted({str(r["split"]) for r in refs})
        keep = [r for r in refs if split == "all" or str(r["split"]) == split]
        if not keep:
            raise UserError(f"no refs with split '{split}' in {self.refs_path}",
                            f"available splits: {', '.join(self.splits)} (or 'all')")
        wanted = {r["ann_id"] for r in keep}
        for a in inst["annotations"]:
            if a["id"] in wanted:
                anns[a["id"]] = a
        for r in keep:
            if r["ann_id"] not in anns:
                raise UserError(f"ref {r['ref_id']} names annotation {r['ann_id']}, which is not "
                                f"in {inst_path}", "the refs and instances files do not match")
            if r["image_id"] not in self._images:
                raise UserError(f"ref {r['ref_id']} names image {r['image_id']}, which is not in "
                                f"{inst_path}", "the refs and instances files do not match")
        self._anns = anns
        self.refs = sorted(keep, key=lambda r: r["ref_id"])
        self.split = split

    @staticmethod
    def _check_refs(refs) -> None:
        need = {"ref_id", "ann_id", "image_id", "split", "sentences"}
        if not isinstance(refs, list) or not all(isinstance(r, dict) and need <= set(r)
                                                 for r in refs):
            raise UserError("the refs file is not a list of refs with " + ", ".join(sorted(need)),
                            "use refs(<split_by>).p from the refer toolkit")

    def __len__(self) -> int:
        return len(self.refs)

    def image_path(self, image_id) -> Path:
        info = self._images[image_id]
        return contained(self.image_dir, info.get("file_name", IMAGE_TEMPLATE % int(image_id)),
                         f"instances.json: image {image_id} file_name")

    def expressions_at(self, index: int) -> list[Expression]:
        """The expressions of record ``index`` without reading its image."""
        ref = self.refs[index]
        return [
            Expression(text=str(s.get("sent", s.get("raw", ""))), object_ids=[1],
                       family=self.dataset, id=s.get("sent_id", k))
            for k, s in enumerate(ref["sentences"])
        ]

    def __getitem__(self, index: int) -> SceneRecord:
        if not 0 <= index < len(self):
            raise IndexError(index)
        ref = self.refs[index]
        ann = self._anns[ref["ann_id"]]
        info = self._images[ref["image_id"]]
        path = self.image_path(ref["image_id"])
        image = read_image(path)
        h, w = image.shape[:2]
        if (int(info.get("height", h)), int(info.get("width", w))) != (h, w):
            raise UserError(f"image {path} is {w}x{h} but the instances file says "
                            f"{info['width']}x{info['height']}", "the image is not the one annotated")
        mask = coco_segmentation_to_mask(ann["segmentation"], h, w, self.polygon_overlap,
                                         where=f"annotation {ann['id']}")
        cat_id = self._cat_index.get(ann["category_id"], 0)
        obj = ObjectAnn(id=1, category=self.categories[cat_id], category_id=cat_id,
                        box=xywh_to_xyxy(ann["bbox"]) if "bbox" in ann else None,
                        attributes={"coco_ann_id": ann["id"], "area": float(ann.get("area", 0)),
                                    "iscrowd": int(ann.get("iscrowd", 0))})
        return SceneRecord(
            image=image,
            instances=mask.astype(np.int32),
            objects=[obj],
            expressions=self.expressions_at(index),
            meta={"source": self.dataset, "split_by": self.split_by, "split": str(ref["split"]),
                  "ref_id": ref["ref_id"], "ann_id": ref["ann_id"], "image_id": ref["image_id"],
                  "file_name": path.name},
        )
