"""ADDP §3.2 diffusion-tailored augmentation: identity at t = 0, strength grows with t, seeded,
batched = per-sample, the blur never mixes invalid pixels, and it plugs into the trainer."""

import pytest
import torch

from genperc.data.datasets import DepthDataset, ReferringDataset, collate
from genperc.data.toy import ToyShapes
from genperc.errors import UserError
from genperc.tasks.augment import (
    _REFERRING_DRAWS,
    _affine_theta,
    _blur_valid,
    _erase_region,
    _referring_apply,
    augment_depth_batch,
    augment_referring_batch,
    depth_augment,
    referring_augment,
)
from genperc.tasks.referring import ReferringTask

T = 1000


@pytest.fixture(scope="module")
def ref_batch():
    ds = ReferringDataset(ToyShapes(size=12, resolution=24, split="val"), resolution=24)
    return collate([ds[i] for i in range(12)])


@pytest.fixture(scope="module")
def depth_batch():
    ds = DepthDataset(ToyShapes(size=6, resolution=24, split="val"), resolution=24)
    b = collate([ds[i] for i in range(6)])
    d = b["depth"]
    b["norm"] = ((d - d.amin((1, 2, 3), keepdim=True)) / (d.amax((1, 2, 3), keepdim=True) - d.amin((1, 2, 3), keepdim=True))
                 * 2 - 1).expand(-1, 3, -1, -1).contiguous()
    return b


def g(seed=0):
    return torch.Generator().manual_seed(seed)


def full(t, n):
    return torch.full((n,), t, dtype=torch.long)


def test_referring_identity_at_t0_and_intensity0(ref_batch):
    img, mask = ref_batch["image"], ref_batch["mask"]
    x0 = ReferringTask().encode_target(img, mask)
    assert torch.equal(referring_augment(img, mask, full(0, 12), T, 1.0, g()), x0)
    assert torch.equal(referring_augment(img, mask, full(999, 12), T, 0.0, g()), x0)
    task = ReferringTask()
    tb = task.prepare(ref_batch)
    assert augment_referring_batch(task, tb, full(999, 12), g()) is tb.x0  # off: the same object
    task.augment_intensity = 1.0
    out = augment_referring_batch(task, tb, full(999, 12), g())
    assert out.shape == tb.x0.shape and out.dtype == tb.x0.dtype and not torch.equal(out, tb.x0)


def test_referring_strength_grows_with_t_and_intensity(ref_batch):
    img, mask = ref_batch["image"], ref_batch["mask"]
    x0 = ReferringTask().encode_target(img, mask)
    dev = [float((referring_augment(img, mask, full(t, 12), T, 1.0, g()) - x0).abs().mean()) for t in (0, 300, 600, 999)]
    assert dev[0] == 0 and dev[0] < dev[1] < dev[2] < dev[3]
    by_intensity = [float((referring_augment(img, mask, full(600, 12), T, i, g()) - x0).abs().mean()) for i in (0.5, 1, 2)]
    assert by_intensity[0] < by_intensity[1] < by_intensity[2]


def test_referring_is_seeded_and_draws_from_the_generator_only(ref_batch):
    img, mask = ref_batch["image"], ref_batch["mask"]
    t = torch.randint(0, T, (12,), generator=g(9))
    torch.manual_seed(1)
    a = referring_augment(img, mask, t, T, 1.0, g(5))
    torch.manual_seed(2)  # the global RNG plays no part
    b = referring_augment(img, mask, t, T, 1.0, g(5))
    c = referring_augment(img, mask, t, T, 1.0, g(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= -1 and float(a.max()) <= 1
    with pytest.raises(UserError):
        referring_augment(img, mask, t, T, 1.0, None)


def test_referring_batched_equals_per_sample(ref_batch):
    img, mask = ref_batch["image"], ref_batch["mask"]
    i = torch.linspace(0, 0.4, 12)
    u = torch.rand(12, _REFERRING_DRAWS, generator=g(3))
    batched = _referring_apply(img, mask, i, u)
    for k in range(12):
        one = _referring_apply(img[k:k + 1], mask[k:k + 1], i[k:k + 1], u[k:k + 1])
        assert torch.allclose(batched[k:k + 1], one, atol=1e-6)


def test_affine_and_erasing_geometry():
    m = torch.zeros(1, 1, 8, 8)
    m[0, 0, 2, 2] = 1
    u = torch.full((1, 4), 0.5)
    u[0, 1] = 1.0  # translation +i·W = +2 pixels to the right, no rotation, scale 1
    grid = torch.nn.functional.affine_grid(_affine_theta(torch.tensor([0.25]), u, 8, 8), [1, 1, 8, 8], align_corners=False)
    moved = torch.nn.functional.grid_sample(m, grid, mode="nearest", align_corners=False)
    assert moved[0, 0].nonzero().tolist() == [[2, 4]]
    i = torch.tensor([0.2, 0.2, 0.0])
    ue = torch.tensor([[0.0, 1.0, 0.5, 0.3, 0.7], [0.9, 1.0, 0.5, 0.3, 0.7], [0.0, 1.0, 0.5, 0.3, 0.7]])
    region = _erase_region(i, ue, 20, 20, p=0.5)
    assert 0 < int(region[0].sum()) <= round(0.2 * 400 * 1.1)  # fires, area ≤ i of the image (rounding)
    assert int(region[1].sum()) == 0 and int(region[2].sum()) == 0  # p not hit / i = 0


def test_depth_identity_strength_and_seed(depth_batch):
    d = depth_batch["norm"]
    v = depth_batch["valid"]
    assert depth_augment(d, v, full(999, 6), T, 0.0, g()) is d
    assert torch.equal(depth_augment(d, v, full(0, 6), T, 1.0, g()), d)  # σ ≤ 0.01: exact
    dev = [float((depth_augment(d, v, full(t, 6), T, 1.0, g()) - d).abs().mean()) for t in (0, 250, 500, 999)]
    assert dev[0] == 0 and dev[0] < dev[1] < dev[2] < dev[3]
    t = torch.randint(0, T, (6,), generator=g(2))
    assert torch.equal(depth_augment(d, v, t, T, 1.0, g(4)), depth_augment(d, v, t, T, 1.0, g(4)))
    assert not torch.equal(depth_augment(d, v, t, T, 1.0, g(4)), depth_augment(d, v, t, T, 1.0, g(5)))


def test_depth_blur_only_mixes_valid_pixels():
    gen = g(1)
    d = torch.rand(3, 1, 20, 20, generator=gen) * 2 - 1
    valid = torch.rand(3, 1, 20, 20, generator=gen) > 0.3
    poisoned = torch.where(valid, d, torch.full_like(d, 1e6))  # invalid pixels hold garbage
    poisoned[0, 0, 0, 0] = float("nan") if not valid[0, 0, 0, 0] else poisoned[0, 0, 0, 0]
    out = _blur_valid(poisoned, valid, torch.tensor([3.0, 0.5, 8.0]))
    assert torch.isfinite(out[valid]).all()
    assert float(out[valid].abs().max()) <= 1.0 + 1e-5  # a convex mix of valid values only
    same = ~valid
    assert torch.equal(out[same].nan_to_num(7.0), poisoned[same].nan_to_num(7.0))  # invalid untouched
    ref = _blur_valid(d, torch.ones_like(valid), torch.tensor([3.0, 0.5, 8.0]))
    assert not torch.allclose(ref, out)


def test_depth_batched_equals_per_sample_and_keeps_dtype():
    gen = g(2)
    d = (torch.rand(4, 3, 16, 16, generator=gen) * 2 - 1).double()
    valid = torch.rand(4, 1, 16, 16, generator=gen) > 0.2
    sigma = torch.tensor([0.0, 1.0, 4.0, 10.0])
    batched = _blur_valid(d, valid, sigma)
    assert batched.dtype == torch.float64 and batched.shape == d.shape and batched.device == d.device
    for k in range(4):
        one = _blur_valid(d[k:k + 1], valid[k:k + 1], sigma[k:k + 1])
        assert torch.allclose(batched[k:k + 1], one, atol=1e-6)
    assert torch.equal(batched[0], d[0])  # σ = 0: identity


def test_depth_codec_entry_point(depth_batch):
    from genperc.tasks import create_task

    task = create_task("depth")
    tb = task.prepare(depth_batch)
    assert augment_depth_batch(task, tb, full(500, 6), g()) is tb.x0
    task.augment_intensity = 1.0
    out = augment_depth_batch(task, tb, full(999, 6), g())
    assert out.shape == tb.x0.shape and not torch.equal(out, tb.x0)
    assert torch.equal(out[:, 0], out[:, 1])  # replicated channels stay replicated


class AugmentedReferring(ReferringTask):
    """What the lead wires into ReferringTask.augment."""

    def augment(self, tb, t, generator=None):
        return augment_referring_batch(self, tb, t, generator)


def test_trainer_step_with_augmentation_and_prob_scaling(tmp_path, text_encoder):
    from genperc.config import load_config
    from genperc.diffusion.timesteps import build_timestep_sampler
    from genperc.training.trainer import Trainer

    cfg = load_config("cpu-tiny", ["data.resolution=16", "model.sample_size=16", "train.batch_size=4",
                                   "train.progress=false", "model.text_max_length=8", "train.augment=1.0"])
    task = AugmentedReferring()
    task.augment_intensity, task.num_train_timesteps = cfg.train.augment, cfg.diffusion.num_train_timesteps
    tr = Trainer(cfg, tmp_path / "run", task=task, train_source=ToyShapes(size=8, resolution=16),
                 text_encoder=text_encoder)
    cfg.train.timesteps, cfg.train.contributions = "prob-scaling", "addp-referring"
    tr.timesteps = build_timestep_sampler(cfg.train, tr.schedule)  # what Trainer.__init__ will call
    batch = collate([tr.dataset[i] for i in range(4)])
    state = tr.generator.get_state()
    a = tr.compute_losses(batch)["diffusion"]
    tr.generator.set_state(state)
    b = tr.compute_losses(batch)["diffusion"]
    assert torch.isfinite(a) and torch.equal(a, b)


def test_colour_jitter_range_and_random_order():
    from genperc.tasks.augment import _jitter_colour

    red = torch.tensor([[1.0, 0.0, 0.0]]).expand(6, 3)
    i = torch.full((6,), 0.2)
    u = torch.tensor([[0.9, 0.1, 0.9, (k + 0.5) / 6] for k in range(6)])  # same factors, all six orders
    out = _jitter_colour(red, i, u)
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert len({tuple(round(v, 5) for v in row.tolist()) for row in out}) > 1  # the order matters
    assert torch.equal(_jitter_colour(red, torch.zeros(6), u), red)  # i = 0: pure red
