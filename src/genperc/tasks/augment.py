"""Diffusion-tailored data augmentation (ADDP §3.2, Eq. 4): corrupt the clean target before noising.

    x0' = Augment(x0, t),   ε ~ N(0, I),   x_t = √ᾱ_t·x0' + √(1−ᾱ_t)·ε.

The corruption simulates the drift of intermediate denoising states ("exposure bias"); its strength
grows linearly with t — the same t that sets the noise level — and with a global intensity
multiplier (``train.augment``: 0 = off, 0.5, 1 = the paper's setting, 2; Fig. 8). Settings follow
the authors' released code (REFERENCE.md, "Augmentation"):

* **referring segmentation** (:func:`referring_augment`), strength i = 0.2·(t/T)·intensity:
  colour jitter of the pure-red overlay colour (brightness, contrast, saturation factors each
  ~ U[max(0, 1−i), 1+i], in a random order per sample like torchvision's ColorJitter), a random affine transform of the mask (rotation ~ U(±50·i)°, translation
  ~ U(±i) of the width/height, scale ~ U[1−i, 1+i], about the image centre, nearest sampling, zero
  fill) and random erasing of a rectangle of the mask (probability 0.5, area ~ U(0, i) of the
  image, aspect ratio log-uniform in [0.5, 2], value 0); then target = (1−m)·image + m·colour.
* **depth** (:func:`depth_augment`): Gaussian blur of the normalised depth with a 31-tap kernel
  and σ = σ_max·(t+1)/T·u·intensity, u ~ U(0, 1), σ_max = 10, over valid pixels only (normalised
  convolution blur(d·v)/blur(v); invalid pixels are left unchanged and never mixed in).

Differences from the released code, on purpose: every random number comes from the caller's
generator (the trainer's), so training is reproducible; everything is batched on the tensor's
device (per-sample parameters, one ``grid_sample`` for all affine warps, one grouped separable
convolution for all blurs) — no Python loop over the batch; erasing
clamps an over-large rectangle to the image instead of re-drawing it (impossible for
intensity ≤ 2); the blur pads with "invalid" (zeros in both numerator and denominator), so image
borders are treated like invalid pixels rather than reflected.

**Targets under augmentation.** Only the noised input is corrupted; the loss target stays the
clean x0. The trainer (``genperc.training.strategies.DiffusionObjective``) computes every target
from the clean x0 and the x_t the model actually saw:

* x0-prediction (the paper's recommendation, §3.2 / A.3): target = x0 — the model learns to map a
  corrupted state back to the clean answer;
* ε-prediction: target ε* = (x_t − √ᾱ_t·x0)/√(1−ᾱ_t) = ε + √(ᾱ_t/(1−ᾱ_t))·(x0' − x0), i.e. the
  noise *plus* the corruption scaled by √SNR — not the drawn ε;
* v-prediction: target v* = √ᾱ_t·ε* − √(1−ᾱ_t)·x0. (The authors' depth code instead regresses
  v = √ᾱ·ε − √(1−ᾱ)·x0 with the drawn ε; with augmentation that v does not reconstruct the clean
  x0 from x_t. Ours does, exactly.)

The codecs call :func:`augment_referring_batch` / :func:`augment_depth_batch` from their
``augment``; both return ``tb.x0`` itself (the same object, so the trainer skips a second
encoding) when the task's ``augment_intensity`` is 0.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from genperc.errors import UserError

RED = (1.0, -1.0, -1.0)  # pure red in [-1, 1]
REFERRING_SCALE = 0.2  # i = 0.2·t/T at intensity 1 (released code)
MAX_DEGREES = 50.0  # rotation range 50·i degrees
ERASE_P = 0.5
ERASE_RATIO = (0.5, 2.0)
DEPTH_SIGMA_MAX = 10.0
DEPTH_KERNEL = 31
_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale
_REFERRING_DRAWS = 13  # uniforms per sample: 4 colour jitter, 4 affine, 5 erasing


def augment_strength(t: Tensor, T: int, intensity: float, scale: float = REFERRING_SCALE) -> Tensor:
    """Per-sample strength i = scale·(t/T)·intensity, float32 [B] on t's device."""
    return torch.as_tensor(t).to(torch.float32) * (float(scale) * float(intensity) / float(T))


def _uniform(shape, generator: torch.Generator | None, device) -> Tensor:
    if generator is None:
        raise UserError("augmentation is random and needs a generator",
                        "pass the trainer's torch.Generator (no global RNG)")
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


# ---------------------------------------------------------------------------------------------
# referring segmentation


_ORDERS = tuple(itertools.permutations(range(3)))  # the 6 orders of brightness, contrast, saturation


def _jitter_colour(colour01: Tensor, i: Tensor, u: Tensor) -> Tensor:
    """Brightness, contrast and saturation jitter of one RGB colour per sample ([B, 3] in [0, 1]),
    factors ~ U[max(0, 1−i), 1+i] from u[:, :3], applied in a random order (u[:, 3]) as
    torchvision's ColorJitter does; all six orders are computed and one is picked per sample."""
    gray_w = torch.tensor(_GRAY, dtype=colour01.dtype, device=colour01.device)
    f = (1 + i[:, None] * (2 * u[:, :3] - 1)).clamp(min=0)  # [B, 3]

    def apply(c: Tensor, op: int) -> Tensor:
        k = f[:, op:op + 1]
        if op == 0:  # brightness: scale towards black
            return (c * k).clamp(0, 1)
        # contrast: blend with the mean gray of the (uniform) image; saturation: with the colour's
        # own gray — for a single colour both are its luma
        gray = (c * gray_w).sum(1, keepdim=True)
        return (k * c + (1 - k) * gray).clamp(0, 1)

    outs = []
    for order in _ORDERS:
        c = colour01
        for op in order:
            c = apply(c, op)
        outs.append(c)
    pick = (u[:, 3] * len(_ORDERS)).long().clamp(max=len(_ORDERS) - 1)
    return torch.stack(outs)[pick, torch.arange(colour01.shape[0], device=colour01.device)]


def _affine_theta(i: Tensor, u: Tensor, H: int, W: int) -> Tensor:
    """affine_grid matrices [B, 2, 3] (output → input, normalised coordinates) of a rotation by
    U(±50·i)°, a translation by U(±i)·(W, H) pixels and a scale U[1−i, 1+i] about the centre."""
    angle = torch.deg2rad((2 * u[:, 0] - 1) * MAX_DEGREES * i)
    tx = (2 * u[:, 1] - 1) * i * W
    ty = (2 * u[:, 2] - 1) * i * H
    s = (1 + (2 * u[:, 3] - 1) * i).clamp(min=1e-3)
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    # inverse map p_in = (1/s)·R(−θ)·(p_out − τ) in pixels about the centre, conjugated by
    # D = diag(2/W, 2/H) into grid_sample's normalised coordinates (align_corners=False)
    a00, a01 = cos, sin * (H / W)
    a10, a11 = -sin * (W / H), cos
    bx, by = 2 * tx / W, 2 * ty / H
    row0 = torch.stack([a00, a01, -(a00 * bx + a01 * by)], 1)
    row1 = torch.stack([a10, a11, -(a10 * bx + a11 * by)], 1)
    return torch.stack([row0, row1], 1)


def _erase_region(i: Tensor, u: Tensor, H: int, W: int, p: float) -> Tensor:
    """Bool [B, 1, H, W]: the rectangle random erasing removes (empty where it does not fire)."""
    apply = u[:, 0] < p
    area = u[:, 1] * i * (H * W)
    lo, hi = math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])
    ratio = torch.exp(lo + u[:, 2] * (hi - lo))
    h = torch.sqrt(area * ratio).round().clamp(0, H)
    w = torch.sqrt(area / ratio).round().clamp(0, W)
    y0 = torch.floor(u[:, 3] * (H - h + 1)).clamp(max=H - h)
    x0 = torch.floor(u[:, 4] * (W - w + 1)).clamp(max=W - w)
    ys = torch.arange(H, device=u.device, dtype=u.dtype)[None, :]
    xs = torch.arange(W, device=u.device, dtype=u.dtype)[None, :]
    rows = (ys >= y0[:, None]) & (ys < (y0 + h)[:, None])  # [B, H]
    cols = (xs >= x0[:, None]) & (xs < (x0 + w)[:, None])  # [B, W]
    return (rows[:, :, None] & cols[:, None, :] & apply[:, None, None])[:, None]


def _referring_apply(image: Tensor, mask: Tensor, i: Tensor, u: Tensor, colour=RED, alpha: float = 1.0,
                     erase_p: float = ERASE_P) -> Tensor:
    """The deterministic part of :func:`referring_augment` given strengths i [B] and uniforms
    u [B, 13] (4 colour jitter, 4 affine, 5 erasing)."""
    B, _, H, W = image.shape
    dtype = image.dtype if image.is_floating_point() else torch.float32
    i = i.to(device=image.device, dtype=torch.float32)
    u = u.to(device=image.device, dtype=torch.float32)
    base = torch.tensor(colour, dtype=torch.float32, device=image.device).expand(B, 3)
    col = _jitter_colour((base + 1) / 2, i, u[:, 0:4]) * 2 - 1  # [B, 3] in [-1, 1]
    m = mask.to(device=image.device, dtype=torch.float32)
    if m.ndim == 3:
        m = m[:, None]
    moving = i > 0
    if bool(moving.any()):
        theta = _affine_theta(i, u[:, 4:8], H, W)
        grid = F.affine_grid(theta, [B, 1, H, W], align_corners=False)
        warped = F.grid_sample(m, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        m = torch.where(moving[:, None, None, None], warped, m)  # i = 0: untouched, bit for bit
        m = m.masked_fill(_erase_region(i, u[:, 8:13], H, W, erase_p), 0.0)
    m = (m * alpha).to(dtype)
    col = col.to(dtype)[:, :, None, None]
    return image.to(dtype) * (1 - m) + col * m


def referring_augment(image: Tensor, mask: Tensor, t: Tensor, T: int, intensity: float,
                      generator: torch.Generator, *, alpha: float = 1.0, colour=RED,
                      scale: float = REFERRING_SCALE) -> Tensor:
    """The corrupted referring target x0' [B, 3, H, W] (module doc): jittered overlay colour,
    affine-warped and partly erased mask, composited over ``image`` ([B, 3, H, W] in [-1, 1]);
    ``mask`` bool [B, 1, H, W]; ``t`` [B] timesteps; strength i = scale·(t/T)·intensity."""
    if image.ndim != 4 or image.shape[1] != 3:
        raise UserError(f"referring augmentation needs images [B, 3, H, W], got {tuple(image.shape)}",
                        "pass the condition image batch")
    B = image.shape[0]
    i = augment_strength(t, T, intensity, scale).to(image.device)
    if i.numel() != B:
        raise UserError(f"{i.numel()} timesteps for a batch of {B}", "pass one timestep per sample")
    u = _uniform((B, _REFERRING_DRAWS), generator, image.device)
    return _referring_apply(image, mask, i, u, colour=colour, alpha=alpha)


# ---------------------------------------------------------------------------------------------
# depth


def _gaussian_kernels(sigma: Tensor, size: int) -> Tensor:
    """Normalised 1-D Gaussian kernels [B, size] (σ → 0 gives the unit impulse)."""
    x = torch.arange(size, device=sigma.device, dtype=torch.float32) - (size // 2)
    s = sigma.to(torch.float32).clamp(min=1e-6)[:, None]
    k = torch.exp(-0.5 * (x[None] / s) ** 2)
    return k / k.sum(1, keepdim=True)


def _blur_valid(depth: Tensor, valid: Tensor, sigma: Tensor, kernel_size: int = DEPTH_KERNEL) -> Tensor:
    """Per-sample normalised Gaussian blur over valid pixels: blur(d·v)/blur(v) at valid pixels,
    d elsewhere. One grouped separable convolution for the whole batch."""
    B, C, H, W = depth.shape
    v = valid.to(device=depth.device, dtype=torch.bool)
    if v.shape[1] != 1:
        v = v.all(1, keepdim=True)
    vf = v.to(torch.float32)
    d = depth.to(torch.float32)
    stack = torch.cat([torch.where(v, d, torch.zeros_like(d)), vf], 1)  # [B, C+1, H, W]
    k = _gaussian_kernels(sigma.to(depth.device), kernel_size)  # [B, K]
    g = B * (C + 1)
    weight = k.repeat_interleave(C + 1, 0)  # [B·(C+1), K]
    pad = kernel_size // 2
    x = stack.reshape(1, g, H, W)
    x = F.conv2d(x, weight[:, None, None, :], padding=(0, pad), groups=g)
    x = F.conv2d(x, weight[:, None, :, None], padding=(pad, 0), groups=g)
    x = x.reshape(B, C + 1, H, W)
    blurred = x[:, :C] / x[:, C:].clamp_min(1e-12)
    return torch.where(v, blurred, d).to(depth.dtype)


def depth_sigma(t: Tensor, T: int, intensity: float, u: Tensor, sigma_max: float = DEPTH_SIGMA_MAX) -> Tensor:
    """σ = σ_max·(t+1)/T·u·intensity per sample."""
    return (torch.as_tensor(t).to(torch.float32) + 1) / float(T) * float(sigma_max) * float(intensity) * u


def depth_augment(depth_norm: Tensor, valid: Tensor | None, t: Tensor, T: int, intensity: float,
                  generator: torch.Generator, *, sigma_max: float = DEPTH_SIGMA_MAX,
                  kernel_size: int = DEPTH_KERNEL) -> Tensor:
    """The blurred depth target x0' [B, C, H, W] (module doc). ``depth_norm``: the normalised
    depth target in [-1, 1] (any channel count); ``valid``: bool [B, 1, H, W] or None (all valid)."""
    if depth_norm.ndim != 4:
        raise UserError(f"depth augmentation needs [B, C, H, W], got {tuple(depth_norm.shape)}",
                        "pass the depth target batch")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise UserError(f"kernel_size must be odd and positive, got {kernel_size}", "use 31")
    B = depth_norm.shape[0]
    t = torch.as_tensor(t).to(depth_norm.device)
    if t.numel() != B:
        raise UserError(f"{t.numel()} timesteps for a batch of {B}", "pass one timestep per sample")
    if float(intensity) == 0:
        return depth_norm
    u = _uniform((B,), generator, depth_norm.device)
    if valid is None:
        valid = torch.ones_like(depth_norm[:, :1], dtype=torch.bool)
    return _blur_valid(depth_norm, valid, depth_sigma(t, T, intensity, u, sigma_max), kernel_size)


# ---------------------------------------------------------------------------------------------
# codec entry points (called from the task codecs' ``augment``)


def augment_referring_batch(task, tb, t: Tensor, generator: torch.Generator | None) -> Tensor:
    """``ReferringTask.augment``: x0' from the batch's condition image and mask, or ``tb.x0``
    itself when ``task.augment_intensity`` is 0."""
    intensity = float(getattr(task, "augment_intensity", 0.0))
    if intensity == 0:
        return tb.x0
    mask = tb.extras.get("mask")
    if mask is None or tb.image is None:
        raise UserError("referring augmentation needs the image and tb.extras['mask']",
                        "prepare the batch with ReferringTask.prepare")
    return referring_augment(tb.image, mask, t, task.num_train_timesteps, intensity, generator,
                             alpha=float(getattr(task, "alpha", 1.0)))


def augment_depth_batch(task, tb, t: Tensor, generator: torch.Generator | None) -> Tensor:
    """``DepthTask.augment``: blurred ``tb.x0`` over ``tb.extras['valid']`` (all valid when
    absent), or ``tb.x0`` itself when ``task.augment_intensity`` is 0. Optional task attributes:
    ``augment_sigma_max`` (10), ``augment_kernel_size`` (31)."""
    intensity = float(getattr(task, "augment_intensity", 0.0))
    if intensity == 0:
        return tb.x0
    return depth_augment(tb.x0, tb.extras.get("valid"), t, task.num_train_timesteps, intensity, generator,
                         sigma_max=float(getattr(task, "augment_sigma_max", DEPTH_SIGMA_MAX)),
                         kernel_size=int(getattr(task, "augment_kernel_size", DEPTH_KERNEL)))


AUGMENTERS = {"referring": augment_referring_batch, "depth": augment_depth_batch}


def augment_batch(task, tb, t: Tensor, generator: torch.Generator | None) -> Tensor:
    """The task's own ``augment`` when its codec defines one, else this module's function for the
    task's name (for figures before a codec is wired), else the identity."""
    from genperc.tasks.base import Task

    if type(task).augment is not Task.augment:
        return task.augment(tb, t, generator)
    fn = AUGMENTERS.get(getattr(task, "name", ""))
    return fn(task, tb, t, generator) if fn is not None else tb.x0


# ---------------------------------------------------------------------------------------------
# figure (ADDP Fig. 4)


def augmentation_grid(task, tb, timesteps, seed: int = 0) -> Tensor:
    """[K, B, C, H, W]: the batch's target augmented at each of the K ``timesteps``, every column
    with the same seed (the same random directions, scaled by t)."""
    out = []
    for t in timesteps:
        g = torch.Generator().manual_seed(seed)
        tt = torch.full((tb.x0.shape[0],), int(t), dtype=torch.long)
        out.append(augment_batch(task, tb, tt, g).detach().float().cpu())
    return torch.stack(out)


def _display(x: Tensor):
    """[C, H, W] in [−1, 1] → an array for imshow and its colormap (RGB, or viridis for one channel
    or replicated channels such as a depth target)."""
    x = ((x.float() + 1) / 2).clamp(0, 1)
    if x.shape[0] == 3 and not (torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])):
        return x.permute(1, 2, 0).numpy(), None
    return x.mean(0).numpy(), "viridis"


def augmentation_figure(task_name: str, out, *, source: str = "toy", path=None, split: str = "val",
                        resolution: int = 64, samples: int = 4, timesteps=(0, 250, 500, 750, 999),
                        intensity: float = 1.0, T: int = 1000, seed: int = 0):
    """Save a grid (rows = samples, columns = clean target then x0' at each t) as a PNG."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from genperc.config import DataConfig
    from genperc.data.datasets import collate
    from genperc.data.sources import open_scene_source
    from genperc.tasks import create_task

    if samples < 1:
        raise UserError(f"samples must be ≥ 1, got {samples}", "use e.g. --samples 4")
    if not timesteps or any(not 0 <= int(t) < T for t in timesteps):
        raise UserError(f"timesteps must lie in [0, {T}), got {list(timesteps)}", "e.g. --timesteps 0,500,999")
    task = create_task(task_name)
    task.augment_intensity = float(intensity)
    task.num_train_timesteps = int(T)
    src = open_scene_source(DataConfig(source=source, path=str(path) if path else None, resolution=resolution), split)
    dataset = task.dataset(src, resolution)
    n = min(samples, len(dataset))
    if n == 0:
        raise UserError(f"the {split} split of {source} is empty", "check --source / --path / --split")
    tb = task.prepare(collate([dataset[i] for i in range(n)]))
    grid = augmentation_grid(task, tb, timesteps, seed)
    cols = len(timesteps) + 1
    fig, axes = plt.subplots(n, cols, figsize=(1.6 * cols, 1.6 * n + 0.4), dpi=120, squeeze=False)
    for r in range(n):
        for c in range(cols):
            img, cmap = _display(tb.x0[r].cpu() if c == 0 else grid[c - 1, r])
            ax = axes[r][c]
            ax.imshow(img, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("clean x0" if c == 0 else f"t={int(timesteps[c - 1])}", fontsize=8)
    fig.suptitle(f"ADDP diffusion-tailored augmentation: {task_name}, intensity {intensity:g}", fontsize=9)
    from genperc.images import save_figure

    return save_figure(fig, out)
