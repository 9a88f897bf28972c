"""Diffusion-tailored data augmentation (ADDP §3.2, Eq. 4): corrupt the clean target before noising.

    x0' = Augment(x0, t),   ε ~ N(0, I),   x_t = √ᾱ_t·x0' + √(1−ᾱ_t)·ε.

The corruption simulates the drift of intermediate denoising states ("exposure bias"); its strength
grows linearly with t — the same t that sets the noise level — and with a global intensity
multiplier (``train.augment``: 0 = off, 0.5, 1 = the paper's setting, 2; Fig. 8). Settings follow
the authors' released code (REFERENCE.md, "Augmentation"), which uses torchvision's transforms;
each transform here is torchvision's definition, batched:

* **referring segmentation** (:func:`referring_augment`), strength i = 0.2·(t/T)·intensity:

  - ``ColorJitter(brightness=i, contrast=i, saturation=i)`` of the pure-red overlay colour: each
    factor ~ U[max(0, 1−i), 1+i], the three applied in a random order; brightness = f·c,
    contrast = f·c + (1−f)·mean gray of the image, saturation = f·c + (1−f)·gray(c), gray =
    0.2989·R + 0.587·G + 0.114·B (torchvision's ``rgb_to_grayscale``), clamped to [0, 1] after each
    (torchvision's ``adjust_*`` on tensors). The overlay is one colour, so
    the image's mean gray is the colour's own gray.
  - ``RandomAffine(degrees=50·i, translate=(i, i), scale=(1−i, 1+i))`` of the mask: rotation
    ~ U(±50·i)° (clockwise on screen, torchvision's ``affine``), translation ~ U(±i·W), U(±i·H)
    rounded to whole pixels, scale ~ U[1−i, 1+i], about the image centre, nearest sampling, fill 0.
  - ``RandomErasing(p=0.5, scale=(0, i), ratio=(0.5, 2), value=0)`` of the mask: area
    ~ U(0, i)·H·W, aspect ratio log-uniform in [0.5, 2], h = round(√(area·ratio)),
    w = round(√(area/ratio)), top ~ U{0 … H−h}, left ~ U{0 … W−w}.
  - target = (1 − m)·image + m·colour (:func:`genperc.tasks.referring.overlay_colour`).
* **depth** (:func:`depth_augment`): Gaussian blur of the normalised depth with a 31×31 kernel and
  σ = σ_max·(t+1)/T·u·intensity, u ~ U(0, 1), σ_max = 10, over valid pixels only (normalised
  convolution blur(d·v)/blur(v); invalid pixels are left unchanged and never mixed in).

Differences from the released code, on purpose: every random number comes from the caller's
generator (the trainer's), so training is reproducible; everything is batched on the tensor's
device (per-sample parameters, one ``grid_sample`` for all affine warps, one grouped separable
convolution for all blurs — a 2-D Gaussian is separable); erasing clamps an over-large rectangle
to the image instead of re-drawing it (impossible for intensity ≤ 2); the blur pads with
"invalid" (zeros in both numerator and denominator), so image borders are treated like invalid
pixels rather than reflected.

**Targets under augmentation.** Only the noised input is corrupted; the loss target stays the
clean x0. The trainer computes every target from the clean x0 and the x_t the model actually saw:
x0-prediction (the paper's recommendation, §3.2 / A.3): target = x0; ε-prediction: ε* =
(x_t − √ᾱ_t·x0)/√(1−ᾱ_t), the noise *plus* the corruption scaled by √SNR — not the drawn ε;
v-prediction: v* = √ᾱ_t·ε* − √(1−ᾱ_t)·x0. (The authors' depth code instead regresses v with the
drawn ε; with augmentation that v does not reconstruct the clean x0 from x_t. Ours does.)

The codecs call :func:`augment_referring_batch` / :func:`augment_depth_batch` from their
``augment``; both return ``batch.x0`` itself (the same object, so the trainer skips a second
encoding) when the task's ``augment_intensity`` is 0. Nothing here imports above the tasks layer;
the figure of ADDP Fig. 4 lives in :mod:`genperc.analyze`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from genperc.errors import UserError
from genperc.tasks.referring import RED, overlay_colour

REFERRING_SCALE = 0.2  # i = 0.2·t/T at intensity 1 (released code)
MAX_DEGREES = 50.0  # rotation range 50·i degrees
ERASE_P = 0.5
ERASE_RATIO = (0.5, 2.0)
DEPTH_SIGMA_MAX = 10.0
DEPTH_KERNEL = 31
LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights (ITU-R 601, 0.299 rounded down)
#: the six orders of the jitter operations, 0 = brightness, 1 = contrast, 2 = saturation
JITTER_ORDERS = tuple(itertools.permutations(range(3)))
REFERRING_DRAWS = 13  # uniforms per sample: 4 colour jitter, 4 affine, 5 erasing


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


@dataclass
class ReferringParams:
    """The per-sample parameters of one referring augmentation, in torchvision's terms."""

    jitter_factors: Tensor  # [B, 3] brightness, contrast, saturation factors
    jitter_order: Tensor  # [B] long, index into JITTER_ORDERS
    degrees: Tensor  # [B] rotation, clockwise on screen
    translate: Tensor  # [B, 2] (tx, ty) in whole pixels
    scale: Tensor  # [B]
    erase_box: Tensor  # [B, 4] top, left, height, width in pixels; height 0 = nothing erased


def referring_params(strength: Tensor, u: Tensor, height: int, width: int,
                     erase_p: float = ERASE_P) -> ReferringParams:
    """Map strengths i [B] and uniforms u [B, 13] (4 jitter, 4 affine, 5 erasing) to the
    parameters of the module doc's distributions (inverse-CDF draws)."""
    i = strength.to(torch.float32)
    signed = 2 * u - 1  # U(−1, 1)
    factors = (1 + i[:, None] * signed[:, 0:3]).clamp(min=0)
    order = (u[:, 3] * len(JITTER_ORDERS)).long().clamp(max=len(JITTER_ORDERS) - 1)
    degrees = signed[:, 4] * MAX_DEGREES * i
    translate = torch.stack([torch.round(signed[:, 5] * i * width), torch.round(signed[:, 6] * i * height)], 1)
    scale = 1 + signed[:, 7] * i
    return ReferringParams(factors, order, degrees, translate, scale,
                           _erase_box(i, u[:, 8:13], height, width, erase_p))


def _erase_box(strength: Tensor, u: Tensor, height: int, width: int, p: float) -> Tensor:
    """[B, 4] top, left, h, w of RandomErasing's rectangle (h = w = 0 when it does not fire)."""
    fires = u[:, 0] < p
    area = u[:, 1] * strength * (height * width)
    lo, hi = math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])
    ratio = torch.exp(lo + u[:, 2] * (hi - lo))
    h = torch.sqrt(area * ratio).round().clamp(0, height)
    w = torch.sqrt(area / ratio).round().clamp(0, width)
    top = torch.floor(u[:, 3] * (height - h + 1)).clamp(max=height - h)
    left = torch.floor(u[:, 4] * (width - w + 1)).clamp(max=width - w)
    return torch.stack([top, left, h, w], 1) * fires[:, None]


def erase_region(box: Tensor, height: int, width: int) -> Tensor:
    """Bool [B, 1, H, W]: the rectangles ``box`` [B, 4] (top, left, h, w)."""
    ys = torch.arange(height, device=box.device, dtype=box.dtype)[None, :]
    xs = torch.arange(width, device=box.device, dtype=box.dtype)[None, :]
    top, left, h, w = box.unbind(1)
    rows = (ys >= top[:, None]) & (ys < (top + h)[:, None])  # [B, H]
    cols = (xs >= left[:, None]) & (xs < (left + w)[:, None])  # [B, W]
    return (rows[:, :, None] & cols[:, None, :])[:, None]


def jitter_colour(colour01: Tensor, factors: Tensor, order: Tensor) -> Tensor:
    """Brightness, contrast and saturation jitter (module doc) of one RGB colour per sample
    ([B, 3] in [0, 1]) with ``factors`` [B, 3], in the order ``JITTER_ORDERS[order]``; all six
    orders are computed and one is picked per sample."""
    luma = torch.tensor(LUMA, dtype=colour01.dtype, device=colour01.device)

    def apply(colour: Tensor, op: int) -> Tensor:
        factor = factors[:, op:op + 1]
        if op == 0:  # brightness: blend with black
            return (colour * factor).clamp(0, 1)
        # contrast: blend with the image's mean gray; saturation: with the pixel's gray — for a
        # one-colour image both are the colour's luma
        gray = (colour * luma).sum(1, keepdim=True)
        return (factor * colour + (1 - factor) * gray).clamp(0, 1)

    outs = []
    for ops in JITTER_ORDERS:
        colour = colour01
        for op in ops:
            colour = apply(colour, op)
        outs.append(colour)
    return torch.stack(outs)[order, torch.arange(colour01.shape[0], device=colour01.device)]


def affine_theta(degrees: Tensor, translate: Tensor, scale: Tensor, height: int, width: int) -> Tensor:
    """``affine_grid`` matrices [B, 2, 3] (output → input, normalised coordinates,
    align_corners=False) of torchvision's ``affine``: rotation by ``degrees`` clockwise on screen,
    translation ``translate`` (tx, ty) pixels and scale about the image centre."""
    angle = torch.deg2rad(degrees)
    s = scale.clamp(min=1e-3)
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    # inverse map p_in = (1/s)·R(−θ)·(p_out − τ) in pixels about the centre, conjugated by
    # D = diag(2/W, 2/H) into grid_sample's normalised coordinates
    a00, a01 = cos, sin * (height / width)
    a10, a11 = -sin * (width / height), cos
    bx, by = 2 * translate[:, 0] / width, 2 * translate[:, 1] / height
    row0 = torch.stack([a00, a01, -(a00 * bx + a01 * by)], 1)
    row1 = torch.stack([a10, a11, -(a10 * bx + a11 * by)], 1)
    return torch.stack([row0, row1], 1)


def corrupt_mask(mask: Tensor, params: ReferringParams, moving: Tensor) -> Tensor:
    """Affine-warp, then erase, the float mask [B, 1, H, W]; samples where ``moving`` is False
    (strength 0) are left untouched, bit for bit."""
    B, _, H, W = mask.shape
    theta = affine_theta(params.degrees, params.translate, params.scale, H, W)
    grid = F.affine_grid(theta, [B, 1, H, W], align_corners=False)
    warped = F.grid_sample(mask, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    warped = warped.masked_fill(erase_region(params.erase_box, H, W), 0.0)
    return torch.where(moving[:, None, None, None], warped, mask)


def apply_referring(image: Tensor, mask: Tensor, strength: Tensor, u: Tensor, colour=RED,
                    alpha: float = 1.0) -> Tensor:
    """The deterministic part of :func:`referring_augment` given strengths [B] and uniforms
    u [B, 13]: jittered colour over the corrupted mask."""
    B, _, H, W = image.shape
    dtype = image.dtype if image.is_floating_point() else torch.float32
    strength = strength.to(device=image.device, dtype=torch.float32)
    params = referring_params(strength, u.to(device=image.device, dtype=torch.float32), H, W)
    base = torch.tensor(colour, dtype=torch.float32, device=image.device).expand(B, 3)
    jittered = jitter_colour((base + 1) / 2, params.jitter_factors, params.jitter_order) * 2 - 1
    m = mask.to(device=image.device, dtype=torch.float32)
    if m.ndim == 3:
        m = m[:, None]
    moving = strength > 0
    if bool(moving.any()):
        m = corrupt_mask(m, params, moving)
    return overlay_colour(image.to(dtype), m, jittered.to(dtype), alpha)


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
    strength = augment_strength(t, T, intensity, scale).to(image.device)
    if strength.numel() != B:
        raise UserError(f"{strength.numel()} timesteps for a batch of {B}", "pass one timestep per sample")
    u = _uniform((B, REFERRING_DRAWS), generator, image.device)
    return apply_referring(image, mask, strength, u, colour=colour, alpha=alpha)


# ---------------------------------------------------------------------------------------------
# depth


def gaussian_kernels(sigma: Tensor, size: int) -> Tensor:
    """Normalised 1-D Gaussian kernels [B, size] (σ → 0 gives the unit impulse)."""
    x = torch.arange(size, device=sigma.device, dtype=torch.float32) - (size // 2)
    s = sigma.to(torch.float32).clamp(min=1e-6)[:, None]
    k = torch.exp(-0.5 * (x[None] / s) ** 2)
    return k / k.sum(1, keepdim=True)


def blur_valid(depth: Tensor, valid: Tensor, sigma: Tensor, kernel_size: int = DEPTH_KERNEL) -> Tensor:
    """Per-sample normalised Gaussian blur over valid pixels: blur(d·v)/blur(v) at valid pixels,
    d elsewhere, with a ``kernel_size``² Gaussian of std ``sigma`` [B] (one grouped separable
    convolution for the whole batch)."""
    B, C, H, W = depth.shape
    v = valid.to(device=depth.device, dtype=torch.bool)
    if v.shape[1] != 1:
        v = v.all(1, keepdim=True)
    d = depth.to(torch.float32)
    stack = torch.cat([torch.where(v, d, torch.zeros_like(d)), v.to(torch.float32)], 1)  # [B, C+1, H, W]
    groups = B * (C + 1)
    weight = gaussian_kernels(sigma.to(depth.device), kernel_size).repeat_interleave(C + 1, 0)  # [B·(C+1), K]
    pad = kernel_size // 2
    x = stack.reshape(1, groups, H, W)
    x = F.conv2d(x, weight[:, None, None, :], padding=(0, pad), groups=groups)
    x = F.conv2d(x, weight[:, None, :, None], padding=(pad, 0), groups=groups)
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
    depth target in [-1, 1] (any channel count); ``valid``: bool [B, 1, H, W] or None (all valid).
    u is the generator's next draw of ``torch.rand(B)``."""
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
    return blur_valid(depth_norm, valid, depth_sigma(t, T, intensity, u, sigma_max), kernel_size)


# ---------------------------------------------------------------------------------------------
# codec entry points (called from the task codecs' ``augment``)


def augment_referring_batch(task, batch, t: Tensor, generator: torch.Generator | None) -> Tensor:
    """``ReferringTask.augment``: x0' from the task batch's condition image and mask, or
    ``batch.x0`` itself when ``task.augment_intensity`` is 0."""
    intensity = float(getattr(task, "augment_intensity", 0.0))
    if intensity == 0:
        return batch.x0
    mask = batch.extras.get("mask")
    if mask is None or batch.image is None:
        raise UserError("referring augmentation needs the image and the batch's extras['mask']",
                        "prepare the batch with ReferringTask.prepare")
    return referring_augment(batch.image, mask, t, task.num_train_timesteps, intensity, generator,
                             alpha=float(getattr(task, "alpha", 1.0)))


def augment_depth_batch(task, batch, t: Tensor, generator: torch.Generator | None) -> Tensor:
    """``DepthTask.augment``: blurred ``batch.x0`` over ``batch.extras['valid']`` (all valid when
    absent), or ``batch.x0`` itself when ``task.augment_intensity`` is 0. Optional task
    attributes: ``augment_sigma_max`` (10), ``augment_kernel_size`` (31)."""
    intensity = float(getattr(task, "augment_intensity", 0.0))
    if intensity == 0:
        return batch.x0
    return depth_augment(batch.x0, batch.extras.get("valid"), t, task.num_train_timesteps, intensity, generator,
                         sigma_max=float(getattr(task, "augment_sigma_max", DEPTH_SIGMA_MAX)),
                         kernel_size=int(getattr(task, "augment_kernel_size", DEPTH_KERNEL)))
