"""Task datasets over SceneSources: shapes, dtypes, ranges, resizing, collate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from genperc.data.datasets import (
    ClassificationDataset,
    DepthDataset,
    DetectionDataset,
    ReferringDataset,
    SemanticDataset,
    collate,
)
from genperc.data.formats import DigitsSource, FolderSource
from genperc.data.record import Expression, ObjectAnn, SceneRecord
from genperc.data.transforms import plan_resize
from genperc.errors import UserError


class MemorySource:
    """A tiny in-memory SceneSource, counting reads."""

    categories = ["background", "cube", "sphere", "cylinder"]

    def __init__(self, records):
        self.records = records
        self.reads = 0

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        self.reads += 1
        return self.records[i]


def make_records():
    rng = np.random.default_rng(0)
    recs = []
    # record 0: 8x8, a cube (id 1) top-left, a sphere (id 2) bottom-right; left half of depth bad
    inst = np.zeros((8, 8), np.int32)
    inst[0:4, 0:4] = 1
    inst[4:8, 6:8] = 2
    depth = np.full((8, 8), 3.0, np.float32)
    valid = np.ones((8, 8), bool)
    depth[:, :4] = 1000.0  # garbage where invalid: must never leak into valid pixels
    valid[:, :4] = False
    recs.append(SceneRecord(
        image=rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), depth=depth, depth_valid=valid,
        instances=inst,
        objects=[ObjectAnn(1, "cube", 1, (0, 0, 4, 4)), ObjectAnn(2, "sphere", 2, None)],
        expressions=[Expression("the cube", [1], "attribute", 0),
                     Expression("the sphere right of the cube", [2], "relation", 1),
                     Expression("both", [1, 2], "attribute", "x")],
        class_label=1, meta={"source": "memory", "scene": 0}))
    # record 1: 8x8, one cylinder (id 5), semantic given explicitly
    inst1 = np.zeros((8, 8), np.int32)
    inst1[2:6, 2:6] = 5
    sem1 = np.where(inst1 == 5, 3, 0).astype(np.int32)
    sem1[0:2, 0:2] = -1
    recs.append(SceneRecord(
        image=np.full((8, 8, 3), 255, np.uint8), depth=np.full((8, 8), 2.0, np.float32),
        instances=inst1, semantic=sem1, objects=[ObjectAnn(5, "cylinder", 3, (2, 2, 6, 6))],
        expressions=[Expression("the cylinder", [5], "attribute", 7)], class_label=3,
        meta={"source": "memory", "scene": 1}))
    return recs


@pytest.fixture
def source():
    return MemorySource(make_records())


def test_image_range_and_meta(source):
    ds = ClassificationDataset(source, resolution=16)
    item = ds[0]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert torch.equal(ds[1]["image"], torch.ones(3, 16, 16))  # white → +1
    assert item["label"].dtype == torch.int64 and int(item["label"]) == 1
    assert item["index"] == 0 and item["meta"]["scene"] == 0
    assert item["meta"]["geometry"] == {"orig_hw": [8, 8], "crop_xyxy": [0, 0, 8, 8],
                                        "out_hw": [16, 16]}
    json.dumps(item["meta"])
    assert torch.equal(ds[0]["image"], item["image"])  # deterministic
    raw = ClassificationDataset(source)[0]["image"]  # no resolution: exact conversion
    np.testing.assert_allclose(raw.permute(1, 2, 0).numpy(),
                               source.records[0].image / 127.5 - 1, atol=1e-6)


def test_depth_dataset_does_not_mix_invalid_pixels(source):
    ds = DepthDataset(source, resolution=4)
    item = ds[0]
    assert item["depth"].shape == (1, 4, 4) and item["depth"].dtype == torch.float32
    assert item["valid"].shape == (1, 4, 4) and item["valid"].dtype == torch.bool
    v, d = item["valid"][0], item["depth"][0]
    assert v[:, 2:].all() and not v[:, :2].any()
    torch.testing.assert_close(d[v], torch.full((int(v.sum()),), 3.0))  # 1000 never leaks
    assert (d[~v] == 0).all()
    up = DepthDataset(source, resolution=16)[0]
    assert up["depth"][0][up["valid"][0]].max() <= 3.0 + 1e-5
    near = DepthDataset(source, resolution=(4, 6), depth_resize="nearest")[0]
    # nearest at pixel centres: output column j reads input column floor((j + 0.5)·8/6) = 0,2,3,4,6,7
    expected_valid = torch.tensor([False, False, False, True, True, True]).expand(1, 4, 6)
    assert torch.equal(near["valid"], expected_valid)
    torch.testing.assert_close(near["depth"], torch.where(expected_valid, 3.0, 0.0))
    # record 1 has no depth_valid: finite positive depth counts as valid
    assert DepthDataset(source)[1]["valid"].all()


def test_depth_dataset_keeps_the_ground_truth_at_its_own_resolution(source):
    """``ground_truth=True``: the record's depth over the plan's crop, not resized (Marigold's
    evaluation protocol); a centre crop of an 8×8 record to 4×2 keeps columns 2..5 (2:6), all rows."""
    item = DepthDataset(source, resolution=(4, 2), fit="center_crop", ground_truth=True)[0]
    record = source.records[0]
    assert item["depth"].shape == (1, 4, 2)
    torch.testing.assert_close(item["gt_valid"][0], torch.from_numpy(record.depth_valid[:, 2:6]))
    expected = np.where(record.depth_valid, record.depth, 0.0)[:, 2:6]
    torch.testing.assert_close(item["gt_depth"][0], torch.from_numpy(expected))
    assert "gt_depth" not in DepthDataset(source, resolution=4)[0]


def test_referring_one_item_per_expression_with_right_mask(source):
    ds = ReferringDataset(source, resolution=16)
    assert len(ds) == 4
    assert [ds[i]["text"] for i in range(4)] == [
        "the cube", "the sphere right of the cube", "both", "the cylinder"]
    item = ds[1]
    assert item["mask"].shape == (1, 16, 16) and item["mask"].dtype == torch.bool
    expected = np.kron(source.records[0].instances == 2, np.ones((2, 2), bool))
    np.testing.assert_array_equal(item["mask"][0].numpy(), expected)
    assert int(ds[2]["mask"].sum()) == (16 + 8) * 4  # union of cube and sphere, 2x upsampled
    assert item["family"] == "relation" and item["expression_id"] == "1"
    assert ds[2]["expression_id"] == "x" and ds[3]["meta"]["record_index"] == 1
    assert ds[3]["meta"]["expression_index"] == 0 and ds[3]["index"] == 3
    only = ReferringDataset(source, families=["relation"])
    assert len(only) == 1 and only[0]["text"] == "the sphere right of the cube"


def test_referring_index_uses_expressions_at_without_reading_images(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for stem in ("a", "b"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "images" / f"{stem}.png")
        m = np.zeros((4, 4), np.uint8)
        m[1:3, 1:3] = 1
        Image.fromarray(m).save(tmp_path / "masks" / f"{stem}.png")
    rows = [{"image": "a.png", "objects": [{"id": 1, "category": "cube"}],
             "expressions": [{"text": "t1", "object_ids": [1]}, {"text": "t2", "object_ids": [1]}]},
            {"image": "b.png", "objects": [{"id": 1, "category": "cube"}],
             "expressions": [{"text": "t3", "object_ids": [1]}]}]
    (tmp_path / "annotations.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    src = FolderSource(tmp_path)
    calls = []
    original = FolderSource.__getitem__
    FolderSource.__getitem__ = lambda self, i: calls.append(i) or original(self, i)
    try:
        ds = ReferringDataset(src)
        assert len(ds) == 3 and calls == []
        item = ds[2]
        assert item["text"] == "t3" and int(item["mask"].sum()) == 4 and calls == [1]
    finally:
        FolderSource.__getitem__ = original


def test_semantic_dataset_given_and_derived(source):
    ds = SemanticDataset(source, resolution=4)
    derived = ds[0]["semantic"]  # record 0 has no semantic map: from instances + categories
    assert derived.shape == (4, 4) and derived.dtype == torch.int64
    assert derived[0, 0] == 1 and derived[3, 3] == 2 and derived[0, 3] == 0  # 0 = background
    given = ds[1]["semantic"]
    assert given[0, 0] == -1 and given[2, 2] == 3 and set(given.unique().tolist()) == {-1, 0, 3}
    assert ds.ignore_index == -1


def test_detection_boxes_labels_and_collate(source):
    ds = DetectionDataset(source, resolution=16)
    item = ds[0]
    assert item["boxes"].dtype == torch.float32 and item["labels"].dtype == torch.int64
    # the cube's box scaled 2x; the sphere has no box: the tight box of its pixels, scaled
    torch.testing.assert_close(item["boxes"], torch.tensor([[0, 0, 8, 8], [12, 8, 16, 16.0]]))
    assert item["labels"].tolist() == [1, 2]
    batch = next(iter(DataLoader(ds, batch_size=2, collate_fn=DetectionDataset.collate_fn)))
    assert batch["image"].shape == (2, 3, 16, 16)
    assert isinstance(batch["boxes"], list) and [b.shape[0] for b in batch["boxes"]] == [2, 1]
    assert batch["labels"][1].tolist() == [3]
    assert batch["index"].tolist() == [0, 1] and isinstance(batch["meta"], list)
    cropped = DetectionDataset(source, resolution=(8, 4), fit="center_crop")[0]
    # centre crop keeps columns 2:6 of the 8x8 image at scale 1
    torch.testing.assert_close(cropped["boxes"], torch.tensor([[0, 0, 2, 4.0]]))
    assert cropped["labels"].tolist() == [1]  # the sphere (columns 6:8) is cropped away


def test_collate_stacks_tensors_keeps_strings_and_rejects_ragged(source):
    ds = ReferringDataset(source, resolution=8)
    batch = collate([ds[0], ds[1], ds[3]])
    assert batch["image"].shape == (3, 3, 8, 8) and batch["mask"].shape == (3, 1, 8, 8)
    assert batch["text"] == ["the cube", "the sphere right of the cube", "the cylinder"]
    assert batch["index"].dtype == torch.int64 and batch["family"][1] == "relation"
    assert collate([]) == {}
    recs = make_records()
    recs[1].image = np.zeros((6, 8, 3), np.uint8)
    ragged = ClassificationDataset(MemorySource(recs))
    with pytest.raises(UserError, match="cannot batch 'image'.*give the dataset a resolution"):
        collate([ragged[0], ragged[1]])


def test_classification_on_digits_with_dataloader():
    ds = ClassificationDataset(DigitsSource("test", size=32))
    assert ds.classes == [str(d) for d in range(10)]
    batch = next(iter(DataLoader(ds, batch_size=16, collate_fn=collate)))
    assert batch["image"].shape == (16, 3, 32, 32) and batch["label"].shape == (16,)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert batch["image"].min() == -1  # digits have black background
    assert batch["label"].dtype == torch.int64 and 0 <= batch["label"].min() <= batch["label"].max() <= 9


def test_missing_targets_are_user_errors(source):
    recs = make_records()
    recs[0].depth = None
    recs[0].class_label = None
    recs[1].instances = None
    recs[1].semantic = None
    src = MemorySource(recs)
    with pytest.raises(UserError, match=r"MemorySource\[0\] has no depth"):
        DepthDataset(src)[0]
    with pytest.raises(UserError, match="no class label"):
        ClassificationDataset(src)[0]
    with pytest.raises(UserError, match="no semantic or instance map"):
        SemanticDataset(src)[1]
    with pytest.raises(UserError, match="resolution must be"):
        DepthDataset(src, resolution="big")
    with pytest.raises(UserError, match="unknown fit"):
        DepthDataset(src, fit="squash")


def test_resize_plan_restore_and_center_crop():
    plan = plan_resize((6, 8), 4, "center_crop")
    assert plan.crop == (1, 0, 7, 6) and plan.out_hw == (4, 4)
    labels = np.arange(48).reshape(6, 8)
    small = plan.labels(labels)
    back = plan.restore(small, fill=-1)
    assert back.shape == (6, 8) and (back[:, 0] == -1).all() and (back[:, 7] == -1).all()
    assert set(np.unique(back[:, 1:7])) <= set(labels[:, 1:7].ravel())
    ident = plan_resize((6, 8))
    assert ident.identity and np.array_equal(ident.labels(labels), labels)
    soft = plan_resize((4, 4), 8).restore(np.ones((8, 8), np.float32), nearest=False)
    np.testing.assert_allclose(soft, np.ones((4, 4)), atol=1e-6)
