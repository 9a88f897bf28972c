"""Task codecs: targets encode and decode back exactly, metrics and summaries are grouped and
carry their settings, the generalist enumerates its items deterministically, IP2P dropout."""

import pytest
import torch

from genperc.data.datasets import collate
from genperc.data.toy import ToyShapes
from genperc.diffusion.conditioning import Conditioning
from genperc.errors import UserError
from genperc.tasks import create_task
from genperc.tasks.generalist import PROMPTS, draw_box_outlines, parse_prompt
from genperc.training.dropout import conditioning_dropout


def batch_of(task, n=6, size=4, resolution=16):
    ds = task.dataset(ToyShapes(size=size, resolution=resolution, split="val"), resolution)
    return collate([ds[i] for i in range(min(n, len(ds)))]), ds


def test_depth_codec_round_trip_is_exact_up_to_affine():
    task = create_task("depth")
    batch, _ = batch_of(task, n=3)
    tb = task.prepare(batch)
    assert tb.x0.shape == (3, 3, 16, 16) and tb.texts == [""] * 3 and tb.x0.abs().max() <= 1
    assert torch.equal(tb.x0[:, 0], tb.x0[:, 1])
    m = task.metrics(task.decode(tb.x0), batch)
    assert torch.all(m["AbsRel"] < 1e-3) and torch.all(m["delta1"] == 1)
    s = task.summarize(m)
    headline = {"AbsRel", "SqRel", "RMSE", "RMSE_log", "log10", "delta1", "delta2", "delta3", "SIlog"}
    # the toy source has instance maps: the same metrics on object pixels too (issue 12)
    assert set(s) == headline | {f"objects/{k}" for k in headline} | {"objects/n"}
    assert torch.all(m["objects/AbsRel"] < 1e-3) and s["objects/n"] == 3
    assert "depth space" in task.settings()["alignment"]
    with pytest.raises(UserError):
        create_task("depth", space="inverse")


def test_referring_codec_settings_families_and_resolution():
    task = create_task("referring", threshold=50)
    batch, _ = batch_of(task)
    tb = task.prepare(batch)
    pred = task.decode(tb.x0)
    m = task.metrics(pred, batch)
    assert torch.all(m["IoU"] == 1)
    # scored at another resolution: the generated image is resized (bilinear), the truth (nearest)
    up = create_task("referring", eval_resolution=32)
    m_up = up.metrics(up.decode(tb.x0), batch)
    assert up.decode(tb.x0).shape[-1] == 32 and torch.all(m_up["IoU"] > 0.4) and torch.all(m_up["IoU"] < 1)
    s = task.summarize(m)
    assert s["oIoU"] == 1 and s["attribute/oIoU"] == 1 and s["attribute/n"] == len(m["IoU"])
    assert task.settings()["comparison"] == ">=" and up.settings()["eval_resolution"] == 32
    # threshold: a pixel at RGB distance 60 from red is mask with threshold 70, not with 50
    x = torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1).repeat(1, 1, 2, 2)
    x[0, 1, 0, 0] = -1 + 60 / 127.5
    assert not create_task("referring", threshold=50).decode(x)[0, 0, 0, 0]
    assert create_task("referring", threshold=70).decode(x)[0, 0, 0, 0]
    # majority vote ensemble
    full, empty = tb.x0, batch["image"]
    votes = task.decode_ensemble([full, full, empty])
    assert torch.equal(votes, task.decode(full))
    with pytest.raises(UserError):
        task.request(batch["image"][:1], [" "])


def test_generalist_dataset_enumerates_items_deterministically():
    task = create_task("generalist")
    src = ToyShapes(size=3, resolution=16, split="val")
    ds = task.dataset(src, 16)
    k = len(src.categories) - 1  # classes = categories but background
    assert len(ds) == 3 * (1 + 2 * k)
    subs = [ds._items[i][1] for i in range(1 + 2 * k)]
    assert subs == ["depth"] + ["segment"] * k + ["detect"] * k
    again = task.dataset(src, 16)
    assert [again[i]["text"] for i in range(len(ds))] == [ds[i]["text"] for i in range(len(ds))]
    texts = {ds[i]["text"] for i in range(len(ds))}
    assert len(texts) > 2 * k  # several phrasings are used
    only = create_task("generalist", subtasks=["segment"], classes=["disc"], absent_classes=False).dataset(src, 16)
    assert all(src[r].objects and any(o.category == "disc" for o in src[r].objects) for r, _, _ in only._items)


@pytest.mark.parametrize("box_style", ["outline", "fill"])
def test_generalist_targets_decode_back_to_perfect_scores(box_style):
    task = create_task("generalist", box_style=box_style)
    batch, _ = batch_of(task, n=100, size=2)
    tb = task.prepare(batch)
    pred = task.decode(tb.x0, batch)
    for i, p in enumerate(pred):
        if p["subtask"] == "detect":
            want = sorted(map(tuple, batch["boxes"][i].tolist()))
            assert sorted(map(tuple, p["boxes"].tolist())) == want
            assert all(s == pytest.approx(1.0) for s in p["scores"].tolist())
    s = task.summarize(task.metrics(pred, batch))
    assert s["depth/AbsRel"] < 1e-3 and s["segment/mIoU"] == 1 and s["detect/mAP@0.5"] == pytest.approx(1)
    assert {k.split("/")[0] for k in s} == {"depth", "segment", "detect"}
    ens = task.summarize(task.metrics(task.decode_ensemble([tb.x0, tb.x0, tb.x0], batch), batch))
    assert ens["depth/AbsRel"] < 1e-3 and ens["segment/mIoU"] == 1 and ens["detect/mAP@0.5"] == pytest.approx(1)


def test_generalist_box_drawing_and_prompts():
    img = -torch.ones(3, 8, 8)
    green = torch.tensor([-1.0, 1.0, -1.0])
    out = draw_box_outlines(img, torch.tensor([[1.0, 2.0, 5.0, 7.0]]), green)
    ring = (out == green.view(3, 1, 1)).all(0)
    expect = torch.zeros(8, 8, dtype=torch.bool)
    expect[2:7, 1:5] = True
    expect[3:6, 2:4] = False
    assert torch.equal(ring, expect)
    for sub in ("segment", "detect"):
        for p in PROMPTS[sub]:
            assert parse_prompt(p.format(c="red cube")) == (sub, "red cube")
    for p in PROMPTS["depth"]:
        assert parse_prompt(p)[0] == "depth"
    with pytest.raises(UserError):
        parse_prompt("what a nice picture")


def test_conditioning_dropout_follows_instructpix2pix_rule():
    """One uniform r per sample: text dropped iff r < 2p, image dropped iff p ≤ r < 3p (REFERENCE.md)."""
    p, b = 0.05, 4000
    cond = Conditioning(text=torch.ones(b, 2, 3), text_mask=torch.ones(b, 2, dtype=torch.bool), image=torch.ones(b, 3, 2, 2))
    null = Conditioning(text=torch.full((1, 1, 3), 7.0), text_mask=torch.ones(1, 1, dtype=torch.bool))
    out = conditioning_dropout(cond, null, p, torch.Generator().manual_seed(3))
    r = torch.rand(b, generator=torch.Generator().manual_seed(3))
    text_dropped = out.text[:, 0, 0] == 7.0
    image_dropped = out.image.flatten(1).sum(1) == 0
    assert torch.equal(text_dropped, r < 2 * p)
    assert torch.equal(image_dropped, (r >= p) & (r < 3 * p))
    assert torch.all(out.text_mask[text_dropped, 1] == 0)  # null text "" is padded, not zeros of the prompt
    both = (text_dropped & image_dropped).float().mean()
    assert abs(float(text_dropped.float().mean()) - 0.10) < 0.02 and abs(float(both) - 0.05) < 0.015
    assert conditioning_dropout(cond, null, 0.0, torch.Generator()) is cond


def _write_tiny_nyuv2(path, depth):
    """A labeled-set .mat (HDF5, column-major) with the given depth frames [N, H, W]."""
    import h5py
    import numpy as np

    n, h, w = depth.shape
    with h5py.File(path, "w") as f:
        f["images"] = np.random.default_rng(0).integers(0, 256, (n, h, w, 3), dtype=np.uint8).transpose(0, 3, 2, 1)
        f["depths"] = depth.astype(np.float32).transpose(0, 2, 1)
    return path


def test_depth_task_on_a_tiny_nyuv2_file(tmp_path):
    """The real-format path: NYUv2's .mat (HDF5, column-major), invalid and out-of-range depth."""
    import numpy as np

    from genperc.data.formats.nyuv2 import NYUv2Source

    depth = np.random.default_rng(0).uniform(0.5, 9.0, (2, 8, 8))
    depth[:, 0, 0], depth[:, 0, 1] = 0.0, 12.0  # missing, beyond NYUv2's 10 m
    mat = _write_tiny_nyuv2(tmp_path / "nyu.mat", depth)
    task = create_task("depth")
    ds = task.dataset(NYUv2Source(mat, split="all", eigen_crop=False), 8)
    batch = collate([ds[0], ds[1]])
    assert not batch["valid"][:, 0, 0, :2].any()
    tb = task.prepare(batch)
    assert torch.all(tb.x0[:, :, 0, 0] == 1)  # invalid pixels → the far end of the target
    # ... and out of the loss: the mask is 0 exactly at the missing and the > 10 m pixel
    expected_mask = torch.ones(2, 1, 8, 8)
    expected_mask[:, :, 0, :2] = 0
    assert tb.loss_mask.dtype == torch.float32
    torch.testing.assert_close(tb.loss_mask, expected_mask, rtol=0, atol=0)
    m = task.metrics(task.decode(tb.x0), batch)
    # the 2%/98% clip of the target costs a little accuracy at the extremes, nothing more
    assert torch.all(m["AbsRel"] < 0.05) and torch.all(m["delta1"] > 0.9)


@pytest.mark.parametrize("task_name", ["depth", "generalist"])
def test_depth_range_comes_from_the_nyuv2_source_unless_set(tmp_path, task_name):
    """Ground truth [1, 9.9, 9.9], prediction [0, 1, 2]: least squares gives s = 4.45, b = 2.4833,
    aligned [2.4833, 6.9333, 11.3833]; NYUv2's 10 m clips the last to 10 (the old default 100 did
    not): AbsRel = (1.4833/1 + 2.9667/9.9 + 0.1/9.9)/3."""
    import numpy as np

    from genperc.data.formats.nyuv2 import NYUv2Source

    source = NYUv2Source(_write_tiny_nyuv2(tmp_path / "nyu.mat", np.array([[[1.0, 9.9, 9.9]]])), split="all",
                         eigen_crop=False)
    options = {"subtasks": ["depth"]} if task_name == "generalist" else {}
    task = create_task(task_name, **options)
    assert task.depth_range.as_list() == [1e-3, 100.0]  # no source seen yet: the default
    ds = task.dataset(source, None)
    assert task.depth_range.as_list() == [1e-3, 10.0] and task.settings()["depth_range_from"] == "data source"
    pred = torch.tensor([0.0, 1.0, 2.0]).view(1, 1, 1, 3)
    batch = collate([ds[0]])
    if task_name == "generalist":
        pred = [{"subtask": "depth", "depth": pred[0]}]
    abs_rel = task.metrics(pred, batch)["AbsRel"][0]
    s, b = 4.45, 6.9333333 - 4.45
    expected = (abs(b - 1) / 1 + abs(s + b - 9.9) / 9.9 + abs(10 - 9.9) / 9.9) / 3
    assert float(abs_rel) == pytest.approx(expected, rel=1e-5)

    explicit = create_task(task_name, max_depth=50.0, **options)
    explicit.dataset(source, None)
    assert explicit.depth_range.as_list() == [1e-3, 50.0]
    with pytest.raises(UserError, match="min_depth < max_depth"):
        create_task(task_name, min_depth=20.0, **options).dataset(source, None)


def test_generalist_loss_mask_masks_invalid_depth_of_depth_items_only():
    task = create_task("generalist")
    batch, _ = batch_of(task, n=100, size=1)
    batch["valid"][:, :, 2:5, 3] = False  # invalid depth in every item's record
    tb = task.prepare(batch)
    assert tb.loss_mask.shape == (len(batch["subtask"]), 1, 16, 16)
    for i, sub in enumerate(batch["subtask"]):
        expected = torch.ones(1, 16, 16)
        if sub == "depth":
            expected[:, 2:5, 3] = 0
        torch.testing.assert_close(tb.loss_mask[i], expected, rtol=0, atol=0)
    assert batch["subtask"].count("depth") == 1 and len(batch["subtask"]) > 1


def test_generalist_filled_boxes_cover_the_box_and_bad_styles_are_refused():
    image = torch.full((3, 8, 8), -1.0)
    task = create_task("generalist", box_style="fill")
    drawn = draw_box_outlines(image, torch.tensor([[2.0, 1.0, 6.0, 5.0]]), task.box_colour, task._width(8))
    green = (drawn == task.box_colour.view(3, 1, 1)).all(0)
    assert green[1:5, 2:6].all() and green.sum() == 16
    with pytest.raises(UserError, match="box_style"):
        create_task("generalist", box_style="dashed")
