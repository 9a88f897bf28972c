"""The real-format loaders, each on a tiny fixture written here in that exact format."""

from __future__ import annotations

import json
import os
import pickle

import h5py
import numpy as np
import pytest
import scipy.io
from PIL import Image

from genperc.data.datasets import ReferringDataset
from genperc.data.formats import (
    ADE20KSource,
    CocoSource,
    DigitsSource,
    FolderSource,
    NYUv2Source,
    RefCocoSource,
    available_formats,
    eigen_crop_mask,
    load_plain_pickle,
    open_source,
)
from genperc.data.formats.common import coco_segmentation_to_mask
from genperc.errors import UserError


def rect(x0, y0, x1, y1):
    """A COCO polygon covering rows y0:y1 and columns x0:x1 (pycocotools rasterisation)."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def rgb(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------
# RefCOCO (refer layout)
# ------------------------------------------------------------------------------------------------

H, W = 8, 10


def write_refer(root, dataset="refcoco", split_by="unc"):
    d = root / dataset
    d.mkdir(parents=True)
    img_dir = root / "images" / "train2014"
    img_dir.mkdir(parents=True)
    images = []
    for image_id in (7, 42):
        name = f"COCO_train2014_{image_id:012d}.jpg"
        Image.fromarray(rgb(H, W, image_id)).save(img_dir / name, quality=95)
        images.append({"id": image_id, "file_name": name, "height": H, "width": W})
    annotations = [
        # two overlapping polygon parts: union covers both, "refer" drops the overlap
        {"id": 100, "image_id": 7, "category_id": 1, "iscrowd": 0, "area": 48.0,
         "bbox": [0, 0, 9, 7], "segmentation": [rect(0, 0, 6, 4), rect(3, 2, 9, 7)]},
        {"id": 101, "image_id": 7, "category_id": 18, "iscrowd": 0, "area": 4.0,
         "bbox": [8, 6, 2, 2], "segmentation": [rect(8, 6, 10, 8)]},
        # uncompressed RLE (column-major runs): 10 zeros, then 6 ones
        {"id": 102, "image_id": 42, "category_id": 18, "iscrowd": 0, "area": 6.0,
         "bbox": [1, 2, 1, 6], "segmentation": {"counts": [10, 6, 64], "size": [H, W]}},
    ]
    categories = [{"id": 18, "name": "dog", "supercategory": "animal"},
                  {"id": 1, "name": "person", "supercategory": "person"}]
    (d / "instances.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": categories}))

    def sents(*texts, start):
        return [{"sent": t, "raw": t, "tokens": t.split(), "sent_id": start + k}
                for k, t in enumerate(texts)]

    refs = [
        {"ref_id": 2, "ann_id": 100, "image_id": 7, "category_id": 1, "split": "train",
         "sentences": sents("man on left", "person in red", start=10)},
        {"ref_id": 1, "ann_id": 101, "image_id": 7, "category_id": 18, "split": "val",
         "sentences": sents("small dog", start=20)},
        {"ref_id": 3, "ann_id": 102, "image_id": 42, "category_id": 18, "split": "train",
         "sentences": sents("thin dog", start=30)},
    ]
    with open(d / f"refs({split_by}).p", "wb") as fh:
        pickle.dump(refs, fh, protocol=2)
    return root


def test_refcoco_records_masks_and_splits(tmp_path):
    root = write_refer(tmp_path)
    src = RefCocoSource(root, "refcoco", split="train")
    assert len(src) == 2 and src.splits == ["train", "val"]
    assert src.categories == ["background", "person", "dog"]
    r0 = src[0]  # ref 2 (sorted by ref_id): the two-part polygon
    assert r0.image.shape == (H, W, 3) and r0.image.dtype == np.uint8
    assert r0.instances.dtype == np.int32
    union = np.zeros((H, W), bool)
    union[0:4, 0:6] = True
    union[2:7, 3:9] = True
    np.testing.assert_array_equal(r0.instances == 1, union)
    assert [o.category for o in r0.objects] == ["person"] and r0.objects[0].category_id == 1
    assert r0.objects[0].box == (0.0, 0.0, 9.0, 7.0)
    assert [e.text for e in r0.expressions] == ["man on left", "person in red"]
    assert [e.id for e in r0.expressions] == [10, 11]
    assert r0.meta["ref_id"] == 2 and r0.meta["image_id"] == 7
    json.dumps(r0.meta)
    # uncompressed RLE: runs go down columns, so 10 zeros fill column 0 and 2 rows of column 1
    r1 = src[1]
    expected = np.zeros((H, W), bool)
    expected[2:8, 1] = True
    np.testing.assert_array_equal(r1.instances == 1, expected)
    assert len(RefCocoSource(root, "refcoco", split="val")) == 1
    assert len(RefCocoSource(root, "refcoco", split="all")) == 3
    with pytest.raises(UserError, match="available splits: train, val"):
        RefCocoSource(root, "refcoco", split="testB")


def test_refcoco_refer_overlap_rule_drops_doubly_covered_pixels(tmp_path):
    root = write_refer(tmp_path)
    src = RefCocoSource(root, "refcoco", split="train", polygon_overlap="refer")
    m = src[0].instances == 1
    assert not m[2:4, 3:6].any()  # covered by both parts: value 2 in getMask, dropped by == 1
    assert m[0, 0] and m[6, 8]


def test_referring_dataset_over_refcoco_one_item_per_sentence(tmp_path):
    root = write_refer(tmp_path)
    src = open_source("refcoco", root, "train")
    ds = ReferringDataset(src, resolution=(16, 20))
    assert len(ds) == 3
    assert [ds[i]["text"] for i in range(3)] == ["man on left", "person in red", "thin dog"]
    item = ds[1]
    assert item["mask"].shape == (1, 16, 20) and item["mask"].dtype.is_floating_point is False
    assert item["expression_id"] == "11" and item["family"] == "refcoco"
    # nearest 2x upsampling of the union mask
    big = np.kron(src[0].instances == 1, np.ones((2, 2), bool))
    np.testing.assert_array_equal(item["mask"][0].numpy(), big)


def test_refcoco_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    root = write_refer(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = root / "refcoco" / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 1, "payload": Evil()}], protocol=2))
    with pytest.raises(UserError, match=r"refused .*refs\(unc\)\.p.*global '(posix|os|nt)\.system'"):
        RefCocoSource(root, "refcoco", split="train")
    assert not marker.exists()
    # the same through the generic loader, with a builtins global
    evil2 = tmp_path / "evil2.p"
    evil2.write_bytes(b"cbuiltins\neval\n(V__import__('os').system('touch " + str(marker).encode()
                      + b"')\ntR.")
    with pytest.raises(UserError, match="builtins.eval"):
        load_plain_pickle(evil2)
    assert not marker.exists()


def test_plain_pickle_reads_python2_byte_strings(tmp_path):
    # a Python 2 style pickle: SHORT_BINSTRING ('U') holds UTF-8 bytes of a str
    p = tmp_path / "py2.p"
    p.write_bytes(b"\x80\x02]}U\x04sentU\x05caf\xc3\xa9sa.")
    assert load_plain_pickle(p) == [{"sent": "café"}]
    # protocol 0 (cPickle's default in Python 2): text opcodes, escaped byte strings
    p0 = tmp_path / "p0.p"
    p0.write_bytes(b"(lp0\n(dp1\nS'sent'\np2\nS'caf\\xc3\\xa9'\np3\nsS'ann_id'\np4\nI1234\n"
                   b"sS'x'\np5\nF0.5\nsa.")
    assert load_plain_pickle(p0) == [{"sent": "café", "ann_id": 1234, "x": 0.5}]
    (tmp_path / "trunc.p").write_bytes(b"\x80\x02]}U\x04se")
    with pytest.raises(UserError, match="corrupt .*trunc.p"):
        load_plain_pickle(tmp_path / "trunc.p")


def test_refcoco_missing_and_corrupt_files_are_named(tmp_path):
    root = write_refer(tmp_path)
    (root / "refcoco" / "instances.json").write_text('{"images": [}')
    with pytest.raises(UserError, match=r"corrupt instances file .*instances.json: .* line 1"):
        RefCocoSource(root, "refcoco", split="train")
    with pytest.raises(UserError, match=r"refs file not found: .*refs\(umd\)\.p"):
        RefCocoSource(root, "refcoco", split="train", split_by="umd")

    root2 = write_refer(tmp_path / "b")
    img = root2 / "images" / "train2014" / "COCO_train2014_000000000007.jpg"
    img.write_bytes(b"not a jpeg at all")
    src = RefCocoSource(root2, "refcoco", split="train")
    with pytest.raises(UserError, match="cannot read .*COCO_train2014_000000000007.jpg as an image"):
        src[0]
    img.unlink()
    with pytest.raises(UserError, match="image not found: .*COCO_train2014_000000000007.jpg"):
        src[0]
    assert src[1].image.shape == (H, W, 3)  # the other image still loads


def test_coco_segmentation_kinds():
    poly = coco_segmentation_to_mask([rect(2, 2, 6, 6)], 8, 10)
    assert poly.sum() == 16 and poly[2:6, 2:6].all()
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(poly.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")  # as stored in JSON
    np.testing.assert_array_equal(coco_segmentation_to_mask(rle, 8, 10), poly)
    assert not coco_segmentation_to_mask([[1, 1, 2, 2]], 8, 10).any()  # degenerate polygon
    with pytest.raises(UserError, match="unsupported segmentation"):
        coco_segmentation_to_mask("nope", 8, 10)
    with pytest.raises(UserError, match="annotation 5: invalid segmentation"):
        coco_segmentation_to_mask({"counts": [70, 30], "size": [8, 10]}, 8, 10,
                                  where="annotation 5")


# ------------------------------------------------------------------------------------------------
# NYUv2 labeled .mat (HDF5) with splits.mat
# ------------------------------------------------------------------------------------------------


def write_nyu(path, n=4, h=6, w=8):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    depths = rng.uniform(0.5, 9.0, (n, h, w)).astype(np.float32)
    depths[:, 0, 0] = 0.0  # missing
    depths[:, 0, 1] = 12.0  # beyond 10 m
    labels = rng.integers(0, 4, (n, h, w)).astype(np.uint16)
    with h5py.File(path, "w") as f:
        # MATLAB v7.3 column-major: h5py sees images [N,3,W,H], depths/labels [N,W,H]
        f["images"] = images.transpose(0, 3, 2, 1)
        f["depths"] = depths.transpose(0, 2, 1)
        f["labels"] = labels.transpose(0, 2, 1)
        refs = f.create_dataset("names", (1, 3), dtype=h5py.ref_dtype)
        for k, name in enumerate(["bed", "chair", "wall"]):
            chars = f.create_dataset(f"#refs#/{k}", data=np.array([[ord(c)] for c in name],
                                                                   dtype=np.uint16))
            refs[0, k] = chars.ref
    return images, depths, labels


def test_nyuv2_transposed_axes_split_and_valid_range(tmp_path):
    mat = tmp_path / "nyu_depth_v2_labeled.mat"
    images, depths, labels = write_nyu(mat)
    scipy.io.savemat(tmp_path / "splits.mat", {"trainNdxs": np.array([[1], [3]]),
                                               "testNdxs": np.array([[2], [4]])})
    src = NYUv2Source(mat, split="test", semantic=True, eigen_crop=False)  # splits.mat found next to the .mat
    assert len(src) == 2 and src.indices == [1, 3]
    r = src[1]
    np.testing.assert_array_equal(r.image, images[3])
    np.testing.assert_array_equal(r.depth, depths[3])
    assert r.depth.dtype == np.float32 and r.image.dtype == np.uint8
    assert not r.depth_valid[0, 0] and not r.depth_valid[0, 1] and r.depth_valid[1:].all()
    np.testing.assert_array_equal(r.semantic, labels[3].astype(np.int32) - 1)
    assert src.categories == ["bed", "chair", "wall"]
    assert r.meta["frame"] == 3
    assert len(open_source("nyuv2", mat, "train", eigen_crop=False)) == 2
    assert NYUv2Source(mat, indices=[0, 2], eigen_crop=False).indices == [0, 2]
    assert len(NYUv2Source(mat, split="all", eigen_crop=False)) == 4


def test_nyuv2_eigen_crop_and_10_m_are_the_default_protocol(tmp_path):
    mat = tmp_path / "full.mat"
    depth = np.full((1, 480, 640), 2.0, np.float32)
    depth[0, 100, 100], depth[0, 101, 100] = 9.99, 10.0  # 10 m is outside the open range (1e-3, 10)
    with h5py.File(mat, "w") as f:
        f["images"] = np.zeros((1, 3, 640, 480), np.uint8)
        f["depths"] = depth.transpose(0, 2, 1)
    source = NYUv2Source(mat, split="all")
    r = source[0]
    assert source.depth_range == (1e-3, 10.0)
    assert r.depth_valid.sum() == (471 - 45) * (601 - 41) - 1
    assert r.depth_valid[45, 41] and not r.depth_valid[44, 41] and not r.depth_valid[45, 601]
    assert r.depth_valid[100, 100] and not r.depth_valid[101, 100]
    expected = eigen_crop_mask()
    expected[101, 100] = False
    np.testing.assert_array_equal(expected, r.depth_valid)
    assert NYUv2Source(mat, split="all", eigen_crop=False)[0].depth_valid.sum() == 480 * 640 - 1
    with pytest.raises(UserError, match="no split file"):
        NYUv2Source(mat, split="test")
    with pytest.raises(UserError, match="out of range"):
        NYUv2Source(mat, indices=[1])
    with pytest.raises(UserError, match="480x640"):
        eigen_crop_mask(6, 8)
    small = tmp_path / "small.mat"
    write_nyu(small)
    with pytest.raises(UserError, match="eigen_crop=false"):
        NYUv2Source(small, split="all")
    bad = tmp_path / "v5.mat"
    scipy.io.savemat(bad, {"depths": np.zeros((2, 2))})
    with pytest.raises(UserError, match="v5.mat is not an HDF5"):
        NYUv2Source(bad, split="all")
    with pytest.raises(UserError, match="NYUv2 .mat file not found: .*nope.mat"):
        NYUv2Source(tmp_path / "nope.mat")


def test_nyuv2_source_pickles_without_the_file_handle(tmp_path):
    mat = tmp_path / "n.mat"
    images, _, _ = write_nyu(mat, n=2)
    src = NYUv2Source(mat, split="all", eigen_crop=False)
    src[0]
    clone = pickle.loads(pickle.dumps(src))  # what a DataLoader worker (spawn) receives
    np.testing.assert_array_equal(clone[1].image, images[1])


# ------------------------------------------------------------------------------------------------
# COCO detection JSON
# ------------------------------------------------------------------------------------------------


def write_coco(root):
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    images = []
    for image_id, (h, w) in ((3, (8, 10)), (1, (6, 6))):
        name = f"{image_id:012d}.png"
        Image.fromarray(rgb(h, w, image_id)).save(root / "val2017" / name)
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
    anns = [
        {"id": 11, "image_id": 3, "category_id": 90, "iscrowd": 0, "area": 48.0,
         "bbox": [0, 0, 8, 6], "segmentation": [rect(0, 0, 8, 6)]},
        {"id": 12, "image_id": 3, "category_id": 5, "iscrowd": 0, "area": 4.0,
         "bbox": [2, 2, 2, 2], "segmentation": [rect(2, 2, 4, 4)]},
        {"id": 13, "image_id": 3, "category_id": 1, "iscrowd": 1, "area": 6.0,
         "bbox": [8, 0, 2, 3], "segmentation": {"counts": [64, 3, 5, 3, 5], "size": [8, 10]}},
    ]
    cats = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"},
            {"id": 5, "name": "airplane"}]
    (root / "annotations" / "instances_val2017.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root


def test_coco_boxes_categories_and_masks(tmp_path):
    root = write_coco(tmp_path)
    src = open_source("coco", root, "val", masks=True)
    assert src.categories == ["background", "person", "airplane", "toothbrush"]
    assert len(src) == 2 and src[0].meta["image_id"] == 1  # sorted by image id
    r = src[1]
    assert [(o.category, o.category_id, o.box) for o in r.objects] == [
        ("toothbrush", 3, (0.0, 0.0, 8.0, 6.0)), ("airplane", 2, (2.0, 2.0, 4.0, 4.0))]
    assert [o.id for o in r.objects] == [1, 2]
    # the small airplane is painted over the large toothbrush
    assert r.instances[3, 3] == 2 and r.instances[0, 0] == 1 and r.instances[7, 9] == 0
    assert r.semantic[3, 3] == 2 and r.semantic[0, 0] == 3
    assert (r.semantic[0:3, 8] == -1).all() and r.semantic[7, 9] == 0  # crowd → ignore
    assert len(src[0].objects) == 0
    with_crowd = CocoSource(root / "annotations" / "instances_val2017.json",
                            image_dir=root / "val2017", include_crowd=True, skip_empty=True)
    assert len(with_crowd) == 1 and len(with_crowd[0].objects) == 3
    assert with_crowd[0].instances is None  # masks only on request


def test_coco_errors_name_the_file(tmp_path):
    root = write_coco(tmp_path)
    with pytest.raises(UserError, match=r"annotations for split 'train' not found: .*instances_train.json"):
        open_source("coco", root, "train")
    (root / "val2017" / "000000000003.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    src = open_source("coco", root, "val2017")
    with pytest.raises(UserError, match=r"cannot read .*000000000003.png as an image"):
        src[1]
    ann = root / "annotations" / "instances_val2017.json"
    ann.write_text(ann.read_text()[:-5])
    with pytest.raises(UserError, match=r"corrupt COCO annotation file .*instances_val2017.json"):
        open_source("coco", ann)


# ------------------------------------------------------------------------------------------------
# ADE20K SceneParsing
# ------------------------------------------------------------------------------------------------


def write_ade(root):
    for sub in ("training", "validation"):
        (root / "images" / sub).mkdir(parents=True)
        (root / "annotations" / sub).mkdir(parents=True)
    labels = np.array([[0, 1, 2, 150], [150, 0, 7, 1], [3, 3, 3, 3]], dtype=np.uint8)
    for k in range(2):
        stem = f"ADE_val_{k + 1:08d}"
        Image.fromarray(rgb(3, 4, k)).save(root / "images" / "validation" / f"{stem}.jpg")
        Image.fromarray(labels).save(root / "annotations" / "validation" / f"{stem}.png")
    Image.fromarray(rgb(3, 4, 9)).save(root / "images" / "training" / "ADE_train_00000001.jpg")
    Image.fromarray(labels).save(root / "annotations" / "training" / "ADE_train_00000001.png")
    lines = ["Idx\tRatio\tTrain\tVal\tName"]
    lines += [f"{k}\t0.01\t10\t1\t{'building;edifice' if k == 2 else f'thing{k}'}"
              for k in range(150, 0, -1)]  # out of order on purpose
    (root / "objectInfo150.txt").write_text("\n".join(lines) + "\n")
    (root / "sceneCategories.txt").write_text("ADE_val_00000001 bathroom\n")
    return labels


def test_ade20k_labels_names_and_splits(tmp_path):
    labels = write_ade(tmp_path)
    src = open_source("ade20k", tmp_path, "val")
    assert len(src) == 2 and len(open_source("ade20k", tmp_path, "train")) == 1
    assert len(src.categories) == 150
    assert src.categories[0] == "thing1" and src.categories[1] == "building"
    r = src[0]
    assert r.semantic.dtype == np.int32
    np.testing.assert_array_equal(r.semantic, labels.astype(np.int32) - 1)
    assert r.semantic.min() == -1 and r.semantic.max() == 149
    assert r.meta["scene"] == "bathroom" and "scene" not in src[1].meta
    (tmp_path / "objectInfo150.txt").unlink()
    assert open_source("ade20k", tmp_path, "val").categories[149] == "class_150"


def test_ade20k_missing_or_mismatched_annotation(tmp_path):
    write_ade(tmp_path)
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(
        tmp_path / "annotations" / "validation" / "ADE_val_00000002.png")
    with pytest.raises(UserError, match="ADE_val_00000002.png is 5x5, its image is 4x3"):
        ADE20KSource(tmp_path, "val")[1]
    (tmp_path / "annotations" / "validation" / "ADE_val_00000002.png").unlink()
    with pytest.raises(UserError, match=r"1 ADE20K annotation\(s\) missing, first: .*ADE_val_00000002.png"):
        ADE20KSource(tmp_path, "val")


# ------------------------------------------------------------------------------------------------
# Generic folder layout
# ------------------------------------------------------------------------------------------------


def write_folder(root):
    for sub in ("images", "depth", "masks"):
        (root / sub).mkdir(parents=True)
    Image.fromarray(rgb(4, 5, 1)).save(root / "images" / "a.png")
    Image.fromarray(rgb(4, 5, 2)).save(root / "images" / "b.png")
    depth_a = np.linspace(0.5, 3.0, 20, dtype=np.float32).reshape(4, 5)
    depth_a[0, 0] = np.nan
    np.save(root / "depth" / "a.npy", depth_a)
    raw_b = np.arange(20, dtype=np.uint16).reshape(4, 5) * 1000
    Image.fromarray(raw_b).save(root / "depth" / "b.png")
    inst = np.zeros((4, 5), np.uint8)
    inst[1:3, 1:3] = 1
    inst[0, 4] = 2
    Image.fromarray(inst).save(root / "masks" / "a.png")
    (root / "meta.json").write_text(json.dumps({
        "categories": ["background", "cube", "sphere"], "classes": ["small", "large"],
        "depth_scale": 0.001}))
    rows = [
        {"image": "a.png", "split": "train", "class": "large",
         "objects": [{"id": 1, "category": "cube", "box": [1, 1, 3, 3]},
                     {"id": 2, "category_id": 2, "attributes": {"color": "red"}}],
         "expressions": [{"text": "the cube", "object_ids": [1], "family": "attribute", "id": 5},
                         {"text": "both", "object_ids": [1, 2], "family": "relation"}],
         "meta": {"scene": 17}},
        {"image": "b.png", "split": "val", "class": 0},
    ]
    (root / "annotations.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return depth_a, raw_b, inst


def test_folder_layout_fields_and_split_filter(tmp_path):
    depth_a, raw_b, inst = write_folder(tmp_path)
    src = open_source("folder", tmp_path, "all")
    assert len(src) == 2 and src.categories == ["background", "cube", "sphere"]
    a, b = src[0], src[1]
    assert a.class_label == 1 and b.class_label == 0
    np.testing.assert_array_equal(a.instances, inst)
    assert a.depth_valid[0, 0] == False and a.depth_valid.sum() == 19  # noqa: E712
    np.testing.assert_allclose(a.depth[1:], depth_a[1:])
    np.testing.assert_allclose(b.depth, raw_b * 0.001, rtol=1e-6)
    assert not b.depth_valid[0, 0] and b.depth_valid.sum() == 19  # 0 = missing
    assert [(o.id, o.category, o.category_id) for o in a.objects] == [(1, "cube", 1), (2, "sphere", 2)]
    assert a.objects[0].box == (1.0, 1.0, 3.0, 3.0) and a.objects[1].attributes == {"color": "red"}
    assert [e.text for e in a.expressions] == ["the cube", "both"] and a.expressions[1].id == 1
    assert a.meta["scene"] == 17 and b.instances is None and b.expressions == []
    train = FolderSource(tmp_path, split="train")
    assert len(train) == 1 and train[0].meta["file_name"] == "a.png"


def test_folder_errors(tmp_path):
    write_folder(tmp_path)
    with pytest.raises(UserError, match="no entries with split 'test'"):
        FolderSource(tmp_path, split="test")
    ann = tmp_path / "annotations.jsonl"
    ann.write_text(ann.read_text() + '{"image": "c.png", \n')
    with pytest.raises(UserError, match=r"corrupt annotations file .*annotations.jsonl: line 3"):
        FolderSource(tmp_path)
    ann.write_text('{"image": "c.png"}\n')
    with pytest.raises(UserError, match=r"image not found: .*images/c.png"):
        FolderSource(tmp_path)[0]
    ann.write_text('{"image": "a.png", "objects": [{"id": 1, "category": "torus"}]}\n')
    with pytest.raises(UserError, match="unknown category 'torus'"):
        FolderSource(tmp_path)[0]
    ann.unlink()
    (tmp_path / "depth" / "b.npy").write_bytes(b"garbage")
    with pytest.raises(UserError, match=r"cannot read depth .*b.npy"):
        FolderSource(tmp_path)[1]


# ------------------------------------------------------------------------------------------------
# scikit-learn digits
# ------------------------------------------------------------------------------------------------


def test_digits_splits_are_stratified_disjoint_and_seeded():
    parts = {s: DigitsSource(s) for s in ("train", "val", "test")}
    sizes = {s: len(p) for s, p in parts.items()}
    assert sizes == {"train": 1259, "val": 179, "test": 359}
    sets = [set(p.indices) for p in parts.values()]
    assert set.union(*sets) == set(range(1797)) and sum(map(len, sets)) == 1797
    test_labels = parts["test"].labels[parts["test"].indices]
    assert np.bincount(test_labels, minlength=10).min() >= 35  # every class ~20 %
    assert DigitsSource("test").indices == parts["test"].indices  # deterministic
    assert DigitsSource("test", seed=1).indices != parts["test"].indices


def test_digits_images_upsampled_and_labelled():
    src = open_source("digits", None, "val", size=32)
    r = src[0]
    assert r.image.shape == (32, 32, 3) and r.image.dtype == np.uint8
    assert (r.image[..., 0] == r.image[..., 2]).all()
    j = r.meta["digit_index"]
    assert r.class_label == int(src.labels[j]) and src.categories[r.class_label] == str(r.class_label)
    # nearest upsampling: 4x4 blocks repeating the 8x8 image scaled to 0..255
    from sklearn.datasets import load_digits

    raw = load_digits().images[j]
    np.testing.assert_array_equal(r.image[::4, ::4, 0], np.rint(raw * 255 / 16).astype(np.uint8))
    smooth = DigitsSource("val", size=24, interpolation="bilinear")[0].image
    assert smooth.shape == (24, 24, 3)
    assert DigitsSource("val", size=8)[0].image.shape == (8, 8, 3)


def test_registry():
    assert {"refcoco", "refcoco+", "refcocog", "nyuv2", "coco", "ade20k", "folder",
            "digits"} <= set(available_formats())
    with pytest.raises(UserError, match="unknown data format 'kitti'"):
        open_source("kitti", "/nowhere")
    with pytest.raises(UserError, match="needs a path"):
        open_source("coco")
