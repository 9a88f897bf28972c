"""ADDP §3.2 diffusion-tailored augmentation against reference implementations of torchvision's
definitions written here (ColorJitter, RandomAffine, RandomErasing) and of a 31×31 Gaussian blur
applied by a plain 2-D convolution; strength values at given t derived by hand; identity at t = 0,
seeded, batched = per-sample, the blur never mixes invalid pixels, and it plugs into the trainer."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from genperc.data.datasets import DepthDataset, ReferringDataset, collate
from genperc.data.toy import ToyShapes
from genperc.errors import UserError
from genperc.tasks.augment import (
    JITTER_ORDERS,
    REFERRING_DRAWS,
    affine_theta,
    apply_referring,
    augment_depth_batch,
    augment_referring_batch,
    augment_strength,
    blur_valid,
    depth_augment,
    depth_sigma,
    erase_region,
    jitter_colour,
    referring_augment,
    referring_params,
)
from genperc.tasks.referring import RED, ReferringTask, overlay_colour

T = 1000


def g(seed=0):
    return torch.Generator().manual_seed(seed)


def full(t, n):
    return torch.full((n,), t, dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# reference implementations, from the definitions (torchvision.transforms.functional on tensors)


def ref_grayscale(img):  # torchvision rgb_to_grayscale: 0.2989 R + 0.587 G + 0.114 B
    return 0.2989 * img[0] + 0.587 * img[1] + 0.114 * img[2]


def ref_blend(img, other, factor):  # torchvision _blend: (f·img + (1 − f)·other).clamp(0, 1)
    return (factor * img + (1 - factor) * other).clamp(0, 1)


def ref_color_jitter(img, brightness, contrast, saturation, order):
    """torchvision adjust_brightness / adjust_contrast / adjust_saturation on a [3, H, W] image in
    [0, 1], applied in ``order`` (0 brightness, 1 contrast, 2 saturation)."""
    for op in order:
        if op == 0:
            img = ref_blend(img, torch.zeros_like(img), brightness)
        elif op == 1:
            img = ref_blend(img, ref_grayscale(img).mean(), contrast)
        else:
            img = ref_blend(img, ref_grayscale(img)[None], saturation)
    return img


def ref_affine_nearest(mask, degrees, tx, ty, scale):
    """torchvision affine (clockwise angle on screen, about the centre, nearest, fill 0) by
    inverting p_out = c + τ + s·R(θ)·(p_in − c) pixel by pixel, y pointing down."""
    H, W = mask.shape
    out = np.zeros_like(mask)
    th = math.radians(degrees)
    cy, cx = (H - 1) / 2, (W - 1) / 2
    for y in range(H):
        for x in range(W):
            dx, dy = x - cx - tx, y - cy - ty
            # R(−θ) = [[cos, sin], [−sin, cos]]
            sx = (math.cos(th) * dx + math.sin(th) * dy) / scale + cx
            sy = (-math.sin(th) * dx + math.cos(th) * dy) / scale + cy
            ix, iy = round(sx), round(sy)
            if 0 <= ix < W and 0 <= iy < H:
                out[y, x] = mask[iy, ix]
    return out


def ref_erasing_box(H, W, area_fraction, log_ratio01, top01, left01, i):
    """torchvision RandomErasing.get_params with scale=(0, i), ratio=(0.5, 2): area ~ U(0, i)·HW,
    ratio = exp(U(log 0.5, log 2)), h = round(√(area·ratio)), w = round(√(area/ratio)),
    top ~ U{0 … H−h}, left ~ U{0 … W−w} (here from given uniforms)."""
    area = area_fraction * i * H * W
    ratio = math.exp(math.log(0.5) + log_ratio01 * (math.log(2) - math.log(0.5)))
    h, w = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
    return math.floor(top01 * (H - h + 1)), math.floor(left01 * (W - w + 1)), h, w


def ref_blur_valid(depth, valid, sigma, size=31):
    """A size×size 2-D Gaussian, normalised, applied by one conv2d as a normalised convolution
    conv(d·v)/conv(v) at valid pixels (zero padding), d elsewhere. [1, 1, H, W] float64."""
    r = torch.arange(size, dtype=torch.float64) - size // 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    kernel = torch.exp(-(xx ** 2 + yy ** 2) / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum())[None, None]
    v = valid.double()
    num = F.conv2d(depth.double() * v, kernel, padding=size // 2)
    den = F.conv2d(v, kernel, padding=size // 2)
    return torch.where(valid, num / den, depth.double())


# ---------------------------------------------------------------------------------------------
# strengths and parameters at given t, by hand


def test_referring_strength_is_one_fifth_of_t_over_T():
    t = torch.tensor([0, 250, 500, 999])
    assert torch.allclose(augment_strength(t, T, 1.0), torch.tensor([0.0, 0.05, 0.1, 0.1998]))
    assert torch.allclose(augment_strength(t, T, 2.0), torch.tensor([0.0, 0.1, 0.2, 0.3996]))
    assert torch.allclose(augment_strength(t, T, 0.5), torch.tensor([0.0, 0.025, 0.05, 0.0999]))


def test_depth_sigma_is_ten_times_t_plus_one_over_T_times_u():
    t = torch.tensor([0, 499, 999, 999])
    u = torch.tensor([1.0, 0.5, 1.0, 0.25])
    # 10·1/1000·1 = 0.01, 10·500/1000·0.5 = 2.5, 10·1000/1000·1 = 10, 10·1·0.25 = 2.5
    assert torch.allclose(depth_sigma(t, T, 1.0, u), torch.tensor([0.01, 2.5, 10.0, 2.5]))
    assert torch.allclose(depth_sigma(t, T, 2.0, u), torch.tensor([0.02, 5.0, 20.0, 5.0]))


def test_referring_parameters_span_torchvision_ranges():
    i = torch.tensor([0.2, 0.2, 0.2])
    u = torch.stack([torch.ones(REFERRING_DRAWS), torch.zeros(REFERRING_DRAWS), torch.full((REFERRING_DRAWS,), 0.5)])
    p = referring_params(i, u, 20, 30)
    # ColorJitter(i): factors in [1 − i, 1 + i]; RandomAffine(50·i, (i, i), (1 − i, 1 + i)) on 30×20
    assert torch.allclose(p.jitter_factors, torch.tensor([[1.2] * 3, [0.8] * 3, [1.0] * 3]))
    assert torch.allclose(p.degrees, torch.tensor([10.0, -10.0, 0.0]))
    assert torch.equal(p.translate, torch.tensor([[6.0, 4.0], [-6.0, -4.0], [0.0, 0.0]]))  # i·W = 6, i·H = 4
    assert torch.allclose(p.scale, torch.tensor([1.2, 0.8, 1.0]))
    assert p.jitter_order.tolist() == [5, 0, 3]
    assert p.erase_box[0].tolist() == [0, 0, 0, 0]  # u = 1 ≥ p = 0.5: no erasing
    assert p.erase_box[1].tolist() == [0, 0, 0, 0]  # fires with area 0
    u[2, 5:7] = torch.tensor([0.6, 0.3])  # translation U(±i·W): 0.2·0.2·30 = 1.2 → 1 px, −0.4·0.2·20 = −1.6 → −2 px
    assert referring_params(i, u, 20, 30).translate[2].tolist() == [1.0, -2.0]  # whole pixels, as torchvision
    assert sorted(JITTER_ORDERS) == sorted(itertools.permutations(range(3)))


def test_erasing_box_matches_torchvision_get_params():
    # by hand: 20×20, i = 0.2, area = 0.5·0.2·400 = 40, ratio 2: h = round(√80) = 9, w = round(√20) = 4,
    # top = ⌊0.3·12⌋ = 3, left = ⌊0.7·17⌋ = 11
    u = torch.zeros(1, REFERRING_DRAWS)
    u[0, 8:13] = torch.tensor([0.1, 0.5, 1.0, 0.3, 0.7])
    box = referring_params(torch.tensor([0.2]), u, 20, 20).erase_box
    assert box[0].tolist() == [3, 11, 9, 4]
    region = erase_region(box, 20, 20)[0, 0]
    assert region.nonzero().min(0).values.tolist() == [3, 11] and region.nonzero().max(0).values.tolist() == [11, 14]
    assert int(region.sum()) == 36
    gen = g(11)
    for _ in range(20):
        ue = torch.rand(5, generator=gen)
        ue[0] = 0.0
        u[0, 8:13] = ue
        box = referring_params(torch.tensor([0.3]), u, 24, 16).erase_box[0].tolist()
        assert box == list(ref_erasing_box(24, 16, *ue[1:].tolist(), i=0.3))


# ---------------------------------------------------------------------------------------------
# the kernels against the references


@pytest.mark.parametrize("order_index", range(6))
def test_colour_jitter_matches_torchvision_definitions(order_index):
    gen = g(order_index)
    colours = torch.cat([torch.tensor([[1.0, 0.0, 0.0]]), torch.rand(4, 3, generator=gen)])
    factors = 0.6 + 0.8 * torch.rand(5, 3, generator=gen)  # in [0.6, 1.4], some push past 1
    order = torch.full((5,), order_index)
    out = jitter_colour(colours, factors, order)
    for k in range(5):
        image = colours[k][:, None, None].expand(3, 4, 5).clone()  # a one-colour image
        ref = ref_color_jitter(image, *factors[k].tolist(), JITTER_ORDERS[order_index])
        assert torch.allclose(out[k][:, None, None].expand(3, 4, 5), ref, atol=1e-6)


def test_affine_by_hand_on_single_pixels():
    """9×9, centre (4, 4): +90° is clockwise on screen, +tx moves right, scale 2 doubles distances."""
    def warp(mask, degrees, tx, ty, scale):
        theta = affine_theta(torch.tensor([degrees]), torch.tensor([[tx, ty]]), torch.tensor([scale]), 9, 9)
        grid = F.affine_grid(theta, [1, 1, 9, 9], align_corners=False)
        return F.grid_sample(mask[None, None], grid, mode="nearest", align_corners=False)[0, 0]

    m = torch.zeros(9, 9)
    m[4, 6] = 1  # two pixels right of the centre
    assert warp(m, 90.0, 0.0, 0.0, 1.0).nonzero().tolist() == [[6, 4]]  # → two below: clockwise
    assert warp(m, 0.0, 2.0, -1.0, 1.0).nonzero().tolist() == [[3, 8]]  # 2 right, 1 up
    assert [4, 8] in warp(m, 0.0, 0.0, 0.0, 2.0).nonzero().tolist()  # distance 2 → 4


def test_affine_matches_reference_warp():
    gen = g(3)
    mask = (torch.rand(32, 24, generator=gen) > 0.6).float()
    for degrees, tx, ty, scale in [(17.3, 2.0, -3.0, 1.13), (-8.7, -1.0, 0.0, 0.87), (0.0, 0.0, 0.0, 1.0),
                                   (37.1, 4.0, 2.0, 0.91)]:
        theta = affine_theta(torch.tensor([degrees]), torch.tensor([[tx, ty]]), torch.tensor([scale]), 32, 24)
        grid = F.affine_grid(theta, [1, 1, 32, 24], align_corners=False)
        out = F.grid_sample(mask[None, None], grid, mode="nearest", align_corners=False)[0, 0]
        ref = ref_affine_nearest(mask.numpy(), degrees, tx, ty, scale)
        assert (out.numpy() != ref).sum() == 0, (degrees, tx, ty, scale)


def test_referring_target_matches_reference_composite():
    """x0' = (1 − m')·image + m'·c' with m' = erase(affine(m)) and c' the jittered red, each from
    the references above with the parameters of the draw."""
    gen = g(4)
    B, H, W = 3, 20, 16
    image = torch.rand(B, 3, H, W, generator=gen) * 2 - 1
    mask = torch.rand(B, 1, H, W, generator=gen) > 0.5
    strength = torch.tensor([0.1, 0.2, 0.3])
    u = torch.rand(B, REFERRING_DRAWS, generator=gen)
    u[:, 8] = 0.0  # erasing fires for every sample
    out = apply_referring(image, mask, strength, u)
    p = referring_params(strength, u, H, W)
    for k in range(B):
        warped = ref_affine_nearest(mask[k, 0].float().numpy(), float(p.degrees[k]), *p.translate[k].tolist(),
                                    float(p.scale[k]))
        top, left, h, w = ref_erasing_box(H, W, *u[k, 9:13].tolist(), i=float(strength[k]))
        warped[top:top + h, left:left + w] = 0
        m = torch.from_numpy(warped)
        red01 = torch.tensor([1.0, 0.0, 0.0])[:, None, None].expand(3, H, W)
        colour = ref_color_jitter(red01, *p.jitter_factors[k].tolist(), JITTER_ORDERS[int(p.jitter_order[k])])
        ref = (1 - m) * image[k] + m * (colour * 2 - 1)
        assert torch.allclose(out[k], ref, atol=1e-6)


def test_depth_blur_matches_a_31x31_gaussian_convolution():
    gen = g(5)
    depth = torch.rand(3, 1, 40, 36, generator=gen) * 2 - 1
    valid = torch.rand(3, 1, 40, 36, generator=gen) > 0.2
    valid[0] = True
    sigma = torch.tensor([2.5, 7.0, 0.8])
    out = blur_valid(depth, valid, sigma)
    for k in range(3):
        ref = ref_blur_valid(depth[k:k + 1], valid[k:k + 1], float(sigma[k]))
        assert torch.allclose(out[k:k + 1].double(), ref, atol=1e-5)


def test_depth_augment_uses_sigma_of_t_and_the_generators_draw():
    gen = g(6)
    depth = torch.rand(2, 1, 24, 24, generator=gen) * 2 - 1
    valid = torch.ones(2, 1, 24, 24, dtype=torch.bool)
    t = torch.tensor([299, 899])
    out = depth_augment(depth, valid, t, T, 1.0, g(7))
    u = torch.rand(2, generator=g(7))  # u ~ U(0, 1): the generator's next draw
    for k, sigma in enumerate((10 * 300 / 1000 * u[0], 10 * 900 / 1000 * u[1])):
        ref = ref_blur_valid(depth[k:k + 1], valid[k:k + 1], float(sigma))
        assert torch.allclose(out[k:k + 1].double(), ref, atol=1e-5)


def test_overlay_is_the_referring_target():
    image = torch.zeros(1, 3, 2, 2)
    mask = torch.tensor([[[[True, False], [False, True]]]])
    out = overlay_colour(image, mask)
    assert out[0, :, 0, 0].tolist() == list(RED) and out[0, :, 0, 1].tolist() == [0, 0, 0]
    half = overlay_colour(image, mask, alpha=0.5)
    assert half[0, :, 1, 1].tolist() == [0.5, -0.5, -0.5]
    assert torch.equal(ReferringTask().encode_target(image, mask), out)


# ---------------------------------------------------------------------------------------------
# behaviour


@pytest.fixture(scope="module")
def ref_batch():
    ds = ReferringDataset(ToyShapes(size=12, resolution=24, split="val"), resolution=24)
    return collate([ds[i] for i in range(12)])


@pytest.fixture(scope="module")
def depth_batch():
    ds = DepthDataset(ToyShapes(size=6, resolution=24, split="val"), resolution=24)
    b = collate([ds[i] for i in range(6)])
    d = b["depth"]
    low, high = d.amin((1, 2, 3), keepdim=True), d.amax((1, 2, 3), keepdim=True)
    b["norm"] = ((d - low) / (high - low) * 2 - 1).expand(-1, 3, -1, -1).contiguous()
    return b


def test_referring_identity_at_t0_and_intensity0(ref_batch):
    img, mask = ref_batch["image"], ref_batch["mask"]
    x0 = ReferringTask().encode_target(img, mask)
    assert torch.equal(referring_augment(img, mask, full(0, 12), T, 1.0, g()), x0)
    assert torch.equal(referring_augment(img, mask, full(999, 12), T, 0.0, g()), x0)
    task = ReferringTask()
    batch = task.prepare(ref_batch)
    assert augment_referring_batch(task, batch, full(999, 12), g()) is batch.x0  # off: the same object
    task.augment_intensity = 1.0
    out = task.augment(batch, full(999, 12), g())
    assert out.shape == batch.x0.shape and out.dtype == batch.x0.dtype and not torch.equal(out, batch.x0)


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
    with pytest.raises(UserError):
        referring_augment(img, mask, t, T, 1.0, None)


def test_referring_batched_equals_per_sample(ref_batch):
    img, mask = ref_batch["image"], ref_batch["mask"]
    i = torch.linspace(0, 0.4, 12)
    u = torch.rand(12, REFERRING_DRAWS, generator=g(3))
    batched = apply_referring(img, mask, i, u)
    for k in range(12):
        one = apply_referring(img[k:k + 1], mask[k:k + 1], i[k:k + 1], u[k:k + 1])
        assert torch.allclose(batched[k:k + 1], one, atol=1e-6)


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
    valid[0, 0, 0, 0] = False
    poisoned = torch.where(valid, d, torch.full_like(d, 1e6))  # invalid pixels hold garbage
    poisoned[0, 0, 0, 0] = float("nan")
    out = blur_valid(poisoned, valid, torch.tensor([3.0, 0.5, 8.0]))
    clean = blur_valid(torch.where(valid, d, torch.zeros_like(d)), valid, torch.tensor([3.0, 0.5, 8.0]))
    assert torch.allclose(out[valid], clean[valid])  # the garbage does not reach any valid pixel
    assert torch.equal(out[~valid].nan_to_num(7.0), poisoned[~valid].nan_to_num(7.0))  # invalid untouched


def test_depth_batched_equals_per_sample_and_keeps_dtype():
    gen = g(2)
    d = (torch.rand(4, 3, 16, 16, generator=gen) * 2 - 1).double()
    valid = torch.rand(4, 1, 16, 16, generator=gen) > 0.2
    sigma = torch.tensor([0.0, 1.0, 4.0, 10.0])
    batched = blur_valid(d, valid, sigma)
    assert batched.dtype == torch.float64
    for k in range(4):
        one = blur_valid(d[k:k + 1], valid[k:k + 1], sigma[k:k + 1])
        assert torch.allclose(batched[k:k + 1], one, atol=1e-6)
    assert torch.equal(batched[0], d[0])  # σ = 0: identity


def test_depth_codec_entry_point(depth_batch):
    from genperc.tasks import create_task

    task = create_task("depth")
    batch = task.prepare(depth_batch)
    assert augment_depth_batch(task, batch, full(500, 6), g()) is batch.x0
    task.augment_intensity = 1.0
    out = task.augment(batch, full(999, 6), g())
    assert out.shape == batch.x0.shape and not torch.equal(out, batch.x0)
    assert torch.equal(out[:, 0], out[:, 1])  # replicated channels stay replicated


def test_trainer_step_with_augmentation_is_seeded(tmp_path, text_encoder):
    from genperc.config import load_config
    from genperc.training.trainer import Trainer

    cfg = load_config("cpu-tiny", ["data.resolution=16", "model.sample_size=16", "train.batch_size=4",
                                   "train.progress=false", "model.text_max_length=8", "train.augment=1.0",
                                   "train.timesteps=prob-scaling", "train.contributions=addp-referring"])
    task = ReferringTask()
    task.augment_intensity, task.num_train_timesteps = cfg.train.augment, cfg.diffusion.num_train_timesteps
    trainer = Trainer(cfg, tmp_path / "run", task=task, train_source=ToyShapes(size=8, resolution=16),
                      text_encoder=text_encoder)
    batch = collate([trainer.dataset[i] for i in range(4)])
    state = trainer.generator.get_state()
    a = trainer.compute_losses(batch)["diffusion"]
    trainer.generator.set_state(state)
    b = trainer.compute_losses(batch)["diffusion"]
    assert torch.isfinite(a) and torch.equal(a, b)
