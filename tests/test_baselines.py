"""Trivial baselines (genperc.evaluation.baselines) with known answers, and the depth metrics on
object pixels, on the rendered fixture world and the toy source."""

from pathlib import Path

import numpy as np
import pytest
import torch

from genperc.data.datasets import collate
from genperc.data.toy import ToyShapes
from genperc.data.transforms import plan_resize
from genperc.data.world import WorldSource
from genperc.evaluation.baselines import (
    best_constant_box,
    class_prior,
    classification_baselines,
    fit_baselines,
    head_noun_mask,
    mean_depth_map,
    row_ramp,
    score_baselines,
    trivial_baselines,
)
from genperc.metrics import coco_map50, depth_metrics
from genperc.tasks import create_task

FIXTURE = Path(__file__).parent / "fixtures" / "world" / "multi32"


@pytest.fixture(scope="module")
def val():
    return create_task("referring").dataset(WorldSource(FIXTURE, split="val"), 32)


# --------------------------------------------------------------------------- referring


def test_named_shape_mask_reads_the_head_noun(val):
    rec = val.source[0]
    plan = plan_resize(rec.image.shape[:2], 32)
    ids = {o.category: [p.id for p in rec.objects if p.category == o.category] for o in rec.objects}
    for text, head in [("the sphere left of the large red object", "sphere"), ("the second cube from the back", "cube"),
                       ("the small green metal cube", "cube")]:
        want = torch.from_numpy(plan.labels(rec.object_mask(ids[head])))
        assert torch.equal(head_noun_mask(rec, text, plan)[0, 0], want)
    every = torch.from_numpy(plan.labels(rec.object_mask([o.id for o in rec.objects])))
    assert torch.equal(head_noun_mask(rec, "the purple object", plan)[0, 0], every)


def test_trivial_baselines_score_the_same_items(val):
    task = create_task("referring")
    res = trivial_baselines(val, task, limit=40)
    assert res["empty mask"]["oIoU"] == 0 and res["empty mask"]["n"] == 40
    named = res["named shape"]
    # by hand: oIoU = Σ|P∧G| / Σ|P∨G| and mIoU = mean |P∧G|/|P∨G| of the head-noun masks
    inter, union = [], []
    for i in range(40):
        item = val[i]
        record = val.source[item["meta"]["record_index"]]
        pred = head_noun_mask(record, item["text"], plan_resize(record.image.shape[:2], 32))[0, 0].bool()
        gt = item["mask"][0].bool()
        inter.append(float((pred & gt).sum()))
        union.append(float((pred | gt).sum()))
    assert named["oIoU"] == pytest.approx(sum(inter) / sum(union))
    assert named["mIoU"] == pytest.approx(sum(a / b if b else 0.0 for a, b in zip(inter, union, strict=True)) / 40)
    assert 0 < named["oIoU"] < 1 and named["n"] == 40 and named["items"] == 40
    assert {"attribute/oIoU", "relation/oIoU", "ordinal/oIoU"} <= set(named)


def test_all_objects_is_the_union_of_the_instance_masks(val):
    task = create_task("referring")
    every = {b.name: b for b in fit_baselines(task, val.source, 32)}["all objects"]
    batch = collate([val[i] for i in range(6)])
    pred = every.predict(batch, val)
    assert pred.shape == batch["mask"].shape and pred.dtype == torch.bool
    for k in range(6):
        record = val.source[batch["meta"][k]["record_index"]]
        union = np.zeros(record.instances.shape, bool)
        for o in record.objects:
            union |= record.instances == o.id
        assert torch.equal(pred[k, 0], torch.from_numpy(plan_resize(record.image.shape[:2], 32).labels(union)))
        assert (pred[k] | batch["mask"][k]).sum() == pred[k].sum()  # the referred object is among them
    res = score_baselines(task, val, [every], limit=10)["all objects"]
    assert 0 < res["oIoU"] < 1 and res["Prec@0.5"] <= res["mIoU"] + 1


# --------------------------------------------------------------------------- depth


class _Items(list):
    """A dataset that is a list of items."""


def test_training_mean_map_of_two_known_depth_maps():
    ones = torch.ones(1, 2, 3)
    valid_b = torch.ones(1, 2, 3, dtype=torch.bool)
    valid_b[0, 0, 0] = False  # the second map is invalid at the top-left pixel
    items = _Items([{"depth": 2 * ones, "valid": torch.ones(1, 2, 3, dtype=torch.bool)},
                    {"depth": torch.arange(6.0).view(1, 2, 3) + 4, "valid": valid_b}])
    want = (2 + torch.arange(6.0).view(1, 2, 3) + 4) / 2
    want[0, 0, 0] = 2.0  # only the first map is valid there
    assert torch.allclose(mean_depth_map(items), want)
    assert torch.allclose(mean_depth_map(items, fit_items=1), 2 * ones)  # the first item only
    # in disparity space: the mean of −1/d
    assert torch.allclose(mean_depth_map(items, space="disparity")[0, 1, 2], torch.tensor((-1 / 2 - 1 / 9) / 2))


def test_row_ramp_is_monotone_in_rows_and_its_affine_maps_score_the_same():
    ramp = row_ramp(8, 5)
    assert ramp.shape == (1, 8, 5) and ramp[0, 0, 0] == 1 and ramp[0, -1, 0] == -1  # far (+1) at the top
    assert (ramp[0, 1:] < ramp[0, :-1]).all() and (ramp[0] == ramp[0, :, :1]).all()
    source = ToyShapes(size=3, resolution=16, split="val")
    task = create_task("depth")
    batch = collate([task.dataset(source, 16)[i] for i in range(3)])
    ramp = row_ramp(16, 16).expand(3, 1, 16, 16)
    a = task.metrics(ramp, batch)
    b = task.metrics(3.7 * ramp - 0.4, batch)  # the metric fits scale and shift: slope and offset do not matter
    for k in ("AbsRel", "delta1", "objects/AbsRel"):
        assert torch.allclose(a[k], b[k])


def test_depth_baselines_on_the_toy_source():
    task = create_task("depth")
    train, val = ToyShapes(size=20, resolution=16), ToyShapes(size=5, resolution=16, split="val")
    baselines = fit_baselines(task, train, 16, fit_items=8)
    assert [b.name for b in baselines] == ["training mean map", "row ramp"]
    dataset = task.dataset(val, 16)
    res = score_baselines(task, dataset, baselines, limit=4, batch_size=3)
    for name in ("training mean map", "row ramp"):
        assert res[name]["items"] == 4 and res[name]["objects/n"] == 4
        assert 0 <= res[name]["AbsRel"] < 1 and 0 < res[name]["delta1"] <= 1
        assert 0 <= res[name]["objects/AbsRel"] < 1
    # the toy floor is exactly a row ramp (depth linear in the row): only the objects are wrong
    assert res["row ramp"]["objects/AbsRel"] > res["row ramp"]["AbsRel"]


def test_depth_on_object_pixels_known_answer():
    """A prediction exact on the objects and wrong on the floor, with errors the least-squares fit
    cannot see (they sum to zero and are orthogonal to the prediction): alignment stays s = 1,
    b = 0, so the object pixels score exactly 0 and the floor's errors 2/2, 0, 2/6 count only in
    the headline numbers. A second image has no object pixels: it contributes nothing."""
    gt = torch.tensor([[[2.0, 4.0, 6.0], [3.0, 5.0, 7.0]]])  # row 0 floor, row 1 objects
    pred = torch.tensor([[[4.0, 4.0, 4.0], [3.0, 5.0, 7.0]]])
    objects = torch.tensor([[[False, False, False], [True, True, True]]])
    batch = {"depth": torch.stack([gt, gt]), "valid": torch.ones(2, 1, 2, 3, dtype=torch.bool),
             "objects": torch.stack([objects, torch.zeros_like(objects)])}
    task = create_task("depth")
    values = task.metrics(torch.stack([pred, pred]), batch)
    assert values["objects/AbsRel"][0] == pytest.approx(0, abs=1e-12) and values["objects/delta1"][0] == 1
    assert values["AbsRel"][0] == pytest.approx((1 + 0 + 1 / 3) / 6)
    assert values["delta1"][0] == pytest.approx(4 / 6)  # ratios 2 and 1.5 fail δ1 < 1.25
    assert torch.isnan(values["objects/AbsRel"][1])
    summary = task.summarize(values)
    assert summary["objects/AbsRel"] == pytest.approx(0, abs=1e-12) and summary["objects/n"] == 1
    assert summary["AbsRel"] == pytest.approx((1 + 1 / 3) / 6)
    # without an objects mask: the headline numbers only, unchanged
    plain = depth_metrics(torch.stack([pred]), gt[None], torch.ones(1, 1, 2, 3, dtype=torch.bool))
    assert "objects/AbsRel" not in plain and plain["AbsRel"][0] == pytest.approx((1 + 1 / 3) / 6)


def test_depth_items_carry_object_masks_at_the_model_resolution():
    source = WorldSource(FIXTURE, split="val")
    ds = create_task("depth").dataset(source, 16)
    item, record = ds[0], source[0]
    union = np.isin(record.instances, [o.id for o in record.objects])
    assert item["objects"].shape == (1, 16, 16) and item["objects"].dtype == torch.bool
    assert torch.equal(item["objects"][0], torch.from_numpy(plan_resize(record.image.shape[:2], 16).labels(union)))
    gen = create_task("generalist").dataset(ToyShapes(size=2, resolution=16), 16)
    assert gen[0]["subtask"] == "depth" and gen[0]["objects"].any()


# --------------------------------------------------------------------------- generalist


def test_best_constant_box_known_answer():
    """Class boxes of four training scenes: A = (0, 0, 4, 4) in three of them, B far away in one.
    A matches (IoU ≥ 0.5) in three scenes — (0, 0, 4, 5) has IoU 16/20 with A — so it is the box.
    Predicted with score 1 on an evaluation scene holding A and B: one true positive of two
    ground-truth boxes at precision 1, so COCO's 101-point AP@0.5 = 51/101 (recall 0 … 0.5)."""
    a, b = [0.0, 0.0, 4.0, 4.0], [10.0, 10.0, 14.0, 14.0]
    scenes = [torch.tensor([a]), torch.tensor([b]), torch.tensor([a, [8.0, 0, 12, 4]]), torch.tensor([[0.0, 0, 4, 5]])]
    box, hits = best_constant_box(scenes)
    assert box.tolist() == a and hits == 3
    assert best_constant_box([torch.zeros(0, 4)]) == (None, 0)
    ap = coco_map50([{"image_id": 0, "category_id": 1, "box": g} for g in (a, b)],
                    [{"image_id": 0, "category_id": 1, "box": box.tolist(), "score": 1.0}], [1])
    assert ap["mAP@0.5"] == pytest.approx(51 / 101)


def test_generalist_baselines_answer_their_own_subtask():
    task = create_task("generalist")
    train, val = ToyShapes(size=12, resolution=16), ToyShapes(size=2, resolution=16, split="val")
    dataset = task.dataset(val, 16)
    baselines = fit_baselines(task, train, 16, fit_items=12)
    assert [(b.name, b.subtask) for b in baselines] == [
        ("training mean map", "depth"), ("row ramp", "depth"), ("all background", "segment"),
        ("best constant box", "detect")]
    res = score_baselines(task, dataset, baselines, batch_size=5)
    n = len(dataset)
    assert all(r["items"] == n for r in res.values())
    assert res["row ramp"]["depth/n"] == 2 and "segment/mIoU" not in res["row ramp"]
    assert 0 <= res["row ramp"]["depth/objects/AbsRel"] < 1 and res["row ramp"]["depth/objects/n"] == 2
    bg = res["all background"]
    # by hand: every pixel predicted background — IoU[background] = its share of the pixels, 0 for
    # each class present, so mIoU = that share / (1 + the classes present)
    sem = torch.stack([val_item["semantic"] for val_item in (dataset[i] for i in range(n))
                       if val_item["subtask"] == "depth"])
    present = sorted(set(sem.unique().tolist()) - {0})
    assert bg["segment/n"] == 2 * 3 and bg["segment/IoU[background]"] == pytest.approx(float((sem == 0).double().mean()))
    assert all(bg[f"segment/IoU[{task.categories[c]}]"] == 0 for c in present)
    assert bg["segment/mIoU"] == pytest.approx(float((sem == 0).double().mean()) / (1 + len(present)))
    box = res["best constant box"]
    assert box["detect/n"] == 6 and 0 <= box["detect/mAP@0.5"] <= 1


# --------------------------------------------------------------------------- classification


def test_majority_class():
    prior = class_prior([2, 0, 2, 1, 2], 4)
    assert torch.allclose(prior, torch.tensor([2, 2, 4, 1], dtype=torch.float64) / 9) and int(prior.argmax()) == 2
    task = create_task("classification")
    task.num_classes = 4
    train = _Items({"label": torch.tensor(c)} for c in [2, 0, 2, 1, 2])
    (majority,) = classification_baselines(task, train)
    assert majority.name == "majority class"
    batch = {"label": torch.tensor([2, 2, 3, 0])}
    summary = task.summarize(task.metrics(majority.predict(batch, None), batch))
    assert summary["top1"] == 0.5  # the majority class, 2, is right twice
    assert summary["nll"] == pytest.approx(float(-(2 * np.log(4 / 9) + np.log(1 / 9) + np.log(2 / 9)) / 4))
