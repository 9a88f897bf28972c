"""Perception metrics against values worked out by hand from REFERENCE.md's formulas."""

import math

import numpy as np
import pytest
import torch

from genperc.metrics import (
    align_depth,
    coco_map50,
    confusion_matrix,
    depth_errors,
    depth_metrics,
    fit_scale_shift,
    referring_summary,
    semantic_summary,
)
from genperc.tasks.depth import ensemble_depth, normalise_depth


def t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


def test_depth_errors_by_hand():
    # aligned prediction p against ground truth d, three valid pixels and one invalid
    p = t([[1.0, 2.0], [2.5, 99.0]])
    d = t([[2.0, 2.0], [2.0, 5.0]])
    v = torch.tensor([[True, True], [True, False]])
    e = depth_errors(p, d, v)
    # |p−d|/d = 0.5, 0, 0.25
    assert e["AbsRel"] == pytest.approx((0.5 + 0 + 0.25) / 3)
    # (p−d)²/d = 0.5, 0, 0.125
    assert e["SqRel"] == pytest.approx((0.5 + 0 + 0.125) / 3)
    assert e["RMSE"] == pytest.approx(math.sqrt((1 + 0 + 0.25) / 3))
    g = [math.log(0.5), 0.0, math.log(1.25)]
    assert e["RMSE_log"] == pytest.approx(math.sqrt(sum(x * x for x in g) / 3))
    assert e["log10"] == pytest.approx((abs(math.log10(0.5)) + 0 + math.log10(1.25)) / 3)
    # ratios max(p/d, d/p) = 2, 1, 1.25: δ is strict, so 1.25 is not < 1.25 but is < 1.25²
    assert e["delta1"] == pytest.approx(1 / 3)
    assert e["delta2"] == pytest.approx(2 / 3)
    assert e["delta3"] == pytest.approx(2 / 3)  # 2 > 1.25³ = 1.953
    mean_g = sum(g) / 3
    assert e["SIlog"] == pytest.approx(100 * math.sqrt(sum(x * x for x in g) / 3 - mean_g**2))


def test_least_squares_scale_shift_matches_the_normal_equations():
    gen = torch.Generator().manual_seed(0)
    pred = torch.rand(5, 6, generator=gen, dtype=torch.float64)
    gt = 3.0 * pred + 0.7 + 0.05 * torch.rand(5, 6, generator=gen, dtype=torch.float64)
    valid = torch.rand(5, 6, generator=gen) > 0.3
    s, b = fit_scale_shift(pred, gt, valid)
    A = np.stack([pred[valid].numpy(), np.ones(int(valid.sum()))], 1)
    ref = np.linalg.lstsq(A, gt[valid].numpy(), rcond=None)[0]
    assert (s, b) == pytest.approx(tuple(ref), rel=1e-9)


def test_depth_metrics_align_in_depth_space_then_clip():
    gt = t([[[1.0, 2.0], [3.0, 4.0]]])
    valid = torch.ones_like(gt, dtype=torch.bool)
    perfect = depth_metrics(-0.5 * gt + 7, gt, valid)  # any affine map of the truth: exact after LSQ
    assert perfect["AbsRel"][0] == pytest.approx(0, abs=1e-9) and perfect["delta1"][0] == 1.0
    # a flat prediction: LSQ gives the mean depth 2.5 everywhere; with max_depth=2.2 it is clipped
    # to 2.2 and the pixels with gt ≥ 2.2 are not valid: only gt = 1 and 2 count
    flat = depth_metrics(torch.zeros_like(gt), gt, valid, max_depth=2.2)
    # LSQ over the counted pixels (1, 2) → 1.5, inside the range
    assert flat["AbsRel"][0] == pytest.approx((0.5 / 1 + 0.5 / 2) / 2)
    aligned = align_depth(t([0.0, 0.0, 1.0]), t([1.0, 1.0, 9.0]), torch.ones(3, dtype=torch.bool), max_depth=5.0)
    assert aligned.tolist() == pytest.approx([1.0, 1.0, 5.0])  # s·1 + b = 9 clipped to the range


def test_disparity_alignment_fits_inverse_depth():
    gt = t([[[1.0, 2.0], [4.0, 8.0]]])
    valid = torch.ones_like(gt, dtype=torch.bool)
    pred = 2.0 / gt - 0.1  # affine in disparity, not in depth
    by_disp = depth_metrics(pred, gt, valid, alignment="disparity")
    by_depth = depth_metrics(pred, gt, valid, alignment="depth")
    assert by_disp["AbsRel"][0] == pytest.approx(0, abs=1e-9)
    # in depth space: least squares of the truth on the prediction (numpy), then AbsRel by hand
    p, d = pred.flatten().numpy(), gt.flatten().numpy()
    scale, shift = np.linalg.lstsq(np.stack([p, np.ones_like(p)], 1), d, rcond=None)[0]
    aligned = np.clip(scale * p + shift, 1e-3, 100.0)
    assert by_depth["AbsRel"][0] == pytest.approx(np.mean(np.abs(aligned - d) / d), rel=1e-9)


def test_referring_summary_by_hand():
    inter, union = t([2.0, 0.0, 3.0, 0.0]), t([4.0, 0.0, 3.0, 5.0])
    # IoU per expression: 0.5, 0 (empty union counts 0), 1, 0
    s = referring_summary(inter, union)
    assert s["oIoU"] == pytest.approx(5 / 12)
    assert s["mIoU"] == pytest.approx(1.5 / 4)
    assert s["Prec@0.5"] == pytest.approx(2 / 4)  # ≥
    assert s["Prec@0.9"] == pytest.approx(1 / 4)
    assert referring_summary(inter, union, strict=True)["Prec@0.5"] == pytest.approx(1 / 4)  # >


def test_semantic_miou_from_confusion_matrix_by_hand():
    gt = torch.tensor([[0, 0, 1, 1], [2, 2, -1, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    conf = confusion_matrix(pred, gt, 3)
    assert conf.tolist() == [[1, 1, 0], [0, 3, 0], [1, 0, 1]]  # the ignored pixel (−1) is left out
    s = semantic_summary(conf, ["a", "b", "c"])
    # IoU_a = 1/(1+1+1), IoU_b = 3/(3+1), IoU_c = 1/(1+1)
    assert s["IoU[a]"] == pytest.approx(1 / 3)
    assert s["IoU[b]"] == pytest.approx(3 / 4)
    assert s["IoU[c]"] == pytest.approx(1 / 2)
    assert s["mIoU"] == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert s["pixel_acc"] == pytest.approx(5 / 7)


def test_coco_map50_by_hand():
    # one image, one class, two true boxes; detections ranked 0.9 (hit), 0.8 (miss), 0.7 (hit):
    # precision 1 up to recall 0.5, then 2/3 up to recall 1. COCO's 101-point interpolation:
    # recall thresholds 0.00…0.50 (51 points) → 1, 0.51…1.00 (50 points) → 2/3.
    gt = [{"image_id": 1, "category_id": 3, "box": (0, 0, 10, 10)},
          {"image_id": 1, "category_id": 3, "box": (20, 20, 30, 30)}]
    dets = [{"image_id": 1, "category_id": 3, "box": (0, 0, 10, 10), "score": 0.9},
            {"image_id": 1, "category_id": 3, "box": (40, 40, 50, 50), "score": 0.8},
            {"image_id": 1, "category_id": 3, "box": (21, 21, 30, 31), "score": 0.7}]
    r = coco_map50(gt, dets, [3])
    assert r["mAP@0.5"] == pytest.approx((51 * 1 + 50 * 2 / 3) / 101)
    assert coco_map50(gt, [], [3])["mAP@0.5"] == 0.0
    assert math.isnan(coco_map50([], dets, [3])["mAP@0.5"])


def test_depth_normalisation_uses_valid_percentiles():
    depth = torch.arange(1, 101, dtype=torch.float32).reshape(1, 1, 10, 10)
    valid = torch.ones_like(depth, dtype=torch.bool)
    valid[..., 0, 0] = False
    d = normalise_depth(depth, valid)
    vals = depth[valid]
    lo, hi = torch.quantile(vals, 0.02), torch.quantile(vals, 0.98)
    expect = ((depth - lo) / (hi - lo) * 2 - 1).clamp(-1, 1)
    assert torch.allclose(d[valid], expect[valid])
    assert d[0, 0, 0, 0] == 1.0  # invalid → the far end
    assert d.min() == -1 and d.max() == 1


def _non_affine_members(n: int, hw=(12, 12), seed: int = 0) -> torch.Tensor:
    """Members that are affine maps of one map plus a different non-affine distortion each, so no
    scale and shift aligns them exactly."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(*hw, generator=gen)
    return torch.stack([base * (1 + 0.3 * i) + 0.1 * i + 0.15 * torch.rand(*hw, generator=gen) ** 2 for i in range(n)])


def _spanning_unit(members: torch.Tensor) -> torch.Tensor:
    """Each member mapped to span [0, 1]: the ensemble's start (Marigold's initialisation)."""
    lo, hi = members.amin((1, 2), keepdim=True), members.amax((1, 2), keepdim=True)
    return (members - lo) / (hi - lo)


def test_ensemble_of_affine_copies_is_the_normalised_map():
    base = _non_affine_members(1)[0]
    members = torch.stack([base * s + t for s, t in ((1.0, 0.0), (3.0, -2.0), (0.5, 4.0))])
    expected = (base - base.min()) / (base.max() - base.min())
    torch.testing.assert_close(ensemble_depth(members), expected, rtol=0, atol=1e-5)


def test_ensemble_without_iterations_is_the_median_of_the_start_and_the_fit_moves_it():
    """max_iter = 0 keeps Marigold's initial alignment (the median of the members spanning [0, 1],
    renormalised); the default fit moves away from it on members no affine map aligns."""
    members = _non_affine_members(5)
    median = _spanning_unit(members).median(0).values
    start = (median - median.min()) / (median.max() - median.min())
    torch.testing.assert_close(ensemble_depth(members, max_iter=0), start, rtol=0, atol=1e-6)
    assert (ensemble_depth(members) - start).abs().max() > 1e-3
