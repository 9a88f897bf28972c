"""DDAE++ contrastive self-distillation: an InfoNCE loss between two augmented views, inside the denoiser.

DDAE++ (seed 004): "self-conditioning facilitates an effective integration of discriminative
techniques, such as contrastive self-distillation, directly into diffusion models without
sacrificing generation quality". The method is unreleased; public reviews say it follows MoCo v3
for the loss and EDM for the augmentation, with the augmentation parameters fed to the network as
a conditioning vector, two views of an instance, and an ablation over the head design and the
"distillation timestep" (REFERENCE.md). genperc's implementation, every number a key of
``train.contrastive`` (:class:`~genperc.config.ContrastiveConfig`):

* **Views** (:func:`augment_views`, kornia's functional ops on tensors, every parameter drawn from
  the trainer's generator): random resized crop (area ∈ [1 − 0.8·s, 1] of the image, aspect ratio
  log-uniform in 4/3^(±s), resized back bilinearly), horizontal flip (p = ½, ``flip``), and, when
  ``color`` c > 0, with p = 0.8 a colour jitter in fixed order — brightness + U(±0.4·s·c), contrast
  and saturation × U(1 ± 0.4·s·c), hue + U(±0.1·s·c) of a turn (skipped for images that are not RGB);
  s = ``aug_strength``. **Colour is off by default** (c = 0): EDM's augmentation, which reviewers say
  DDAE++ follows, is geometric only, and measured here any jitter (c = 0.25 or 1) made the denoiser
  sample a third to a half of its world images as saturated black or white frames, with or without
  ``aug_cond`` (docs/ddae.md, "Ablations"; the mechanism is not pinned down: at c = 1 the
  self-conditioning offset's response to a global brightness shift fell 4–10×, at c = 0.25 it did
  not). The
  parameters form a 9-vector (crop centre offset x, y; log crop width, height; flip; brightness;
  contrast − 1; saturation − 1; hue), zero for "not augmented" — EDM's convention.
  ``aug_cond`` feeds it to the network (a zero-initialised linear map into every block's conditioning
  embedding, :class:`~genperc.models.selfcond.ContrastiveHeads`), off by default.
* **Noising.** Each view is forward-noised at the distillation timestep (``t``, or one t per view
  drawn from ``t_range``), with the **null class** (and the batch's text, if any): a class label would
  let the features name the class without looking at the image; DDAE's probe also reads null-class
  features.
* **Student** = the denoiser's pooled self-conditioning features (the backbone runs only up to the
  self-conditioning block, :meth:`~genperc.models.denoiser.Denoiser.self_condition_features`) →
  projector → predictor. **Teacher** = an EMA copy of the whole denoiser (its projector included),
  θ_t ← m·θ_t + (1 − m)·θ_s after every optimizer step (``momentum``, constant — MoCo v3 raises
  it to 1 on a cosine schedule), no gradient, features → projector.
* **Loss** (MoCo v3): L = ctr(q₁, k₂) + ctr(q₂, k₁), ctr(q, k) = 2τ·CE(q̂·k̂ᵀ/τ, diagonal) with
  unit-normalised q, k and the keys of every process gathered (MoCo v3's ``concat_all_gather``),
  τ = ``temperature``; ``weight``·L joins the diffusion loss in the ``generation`` group under the
  name ``contrastive``.

**Two EMAs, kept apart.** The teacher is not the sampling EMA (``train.ema`` / ``ema_decay``,
saved as ``ema/`` and loaded by ``genperc eval``/``predict``): the teacher moves fast
(m ≈ 0.99) to give the student targets, the sampling EMA slowly (0.999+) to average weights for
generation, and they start and update differently (the teacher lerps every step from the start).
The trainer saves the teacher as ``contrastive_teacher/`` in each checkpoint (a full
:class:`~genperc.models.denoiser.Denoiser` directory) and restores it on ``--resume``; nothing loads it
for sampling.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from genperc.config import ContrastiveConfig
from genperc.errors import UserError

CROP_AREA = 0.8  # × strength: the smallest crop keeps 1 − 0.8·s of the image's area
CROP_RATIO = 4 / 3  # aspect ratio log-uniform in CROP_RATIO^(±s)
JITTER = (0.4, 0.4, 0.4, 0.1)  # × strength: brightness, contrast, saturation, hue (turns)
JITTER_P = 0.8
TEACHER_DIR = "contrastive_teacher"


def augment_views(x: Tensor, generator: torch.Generator, strength: float = 1.0, flip: bool = True,
                  color: float = 0.0) -> tuple[Tensor, Tensor]:
    """One random view of each image of ``x`` [B, C, H, W] in [−1, 1] and its parameters [B, 9] (module doc);
    ``color`` scales the colour jitter on top of ``strength`` (0: crop and flip only)."""
    import kornia

    b, c, h, w = x.shape
    s = float(strength)

    def u(*shape) -> Tensor:
        return torch.rand(shape, generator=generator, device=generator.device).to(x.device)

    area = 1 - CROP_AREA * s * u(b)
    ratio = torch.exp((2 * u(b) - 1) * s * math.log(CROP_RATIO))
    cw, ch = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)
    x0, y0 = u(b) * (1 - cw), u(b) * (1 - ch)
    x1, y1 = (x0 + cw) * w - 1, (y0 + ch) * h - 1
    boxes = torch.stack([torch.stack([x0 * w, y0 * h], -1), torch.stack([x1, y0 * h], -1),
                         torch.stack([x1, y1], -1), torch.stack([x0 * w, y1], -1)], 1)
    views = kornia.geometry.transform.crop_and_resize(x, boxes, (h, w))
    flipped = (u(b) < 0.5).float() if flip else torch.zeros(b, device=x.device)
    views = torch.where(flipped.bool().view(-1, 1, 1, 1), views.flip(-1), views)
    on = (u(b) < JITTER_P).float() if s > 0 else torch.zeros(b, device=x.device)
    jitter = [(2 * u(b) - 1) * j * s * color * on for j in JITTER]  # brightness, contrast, saturation, hue offsets
    if c == 3:
        e, img = kornia.enhance, (views + 1) / 2
        img = e.adjust_brightness(img, jitter[0]).clamp(0, 1)
        img = e.adjust_contrast(img, 1 + jitter[1]).clamp(0, 1)
        img = e.adjust_saturation(img, 1 + jitter[2]).clamp(0, 1)
        views = e.adjust_hue(img, 2 * math.pi * jitter[3]).clamp(0, 1) * 2 - 1
    else:
        jitter = [torch.zeros_like(j) for j in jitter]
    params = torch.stack([x0 + cw / 2 - 0.5, y0 + ch / 2 - 0.5, cw.log(), ch.log(), flipped, *jitter], 1)
    return views, params


def _gather(k: Tensor) -> tuple[Tensor, int]:
    """Keys of every process concatenated (no gradient; MoCo v3's ``concat_all_gather``), and this
    process's offset in them."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return k, 0
    parts = [torch.empty_like(k) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, k.contiguous())
    return torch.cat(parts), dist.get_rank() * k.shape[0]


def moco_v3_infonce(q: Tensor, k: Tensor, temperature: float) -> Tensor:
    """MoCo v3's ``contrastive_loss``: 2τ·CE(q̂·k̂ᵀ/τ, positives on the diagonal), q̂, k̂ unit vectors."""
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    keys, offset = _gather(k)
    logits = q @ keys.T / temperature
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(logits, labels) * (2 * temperature)


def symmetric_infonce(q1: Tensor, q2: Tensor, k1: Tensor, k2: Tensor, temperature: float) -> Tensor:
    """MoCo v3's symmetrised loss ctr(q₁, k₂) + ctr(q₂, k₁)."""
    return moco_v3_infonce(q1, k2, temperature) + moco_v3_infonce(q2, k1, temperature)


class EMATeacher:
    """A frozen copy of the student denoiser, θ ← m·θ + (1 − m)·θ_student by :meth:`update`."""

    def __init__(self, student, momentum: float):
        self.student, self.momentum = student, float(momentum)
        self.net = type(student)(student.config, seed=0)  # same architecture; weights copied next
        self.net.load_state_dict(student.state_dict())
        self.net.to(student.device).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self) -> None:
        teacher = list(self.net.parameters())
        torch._foreach_lerp_(teacher, [p.detach().to(q.dtype) for p, q in zip(self.student.parameters(), teacher,
                                                                              strict=True)], 1 - self.momentum)


class ContrastiveSelfDistillation:
    """The objective (``{"contrastive": weight·L}``), the teacher's trainer hook (``after_step``) and
    its checkpoint state (``save_state`` / ``load_state``); see the module docstring."""

    name = "contrastive"
    group = "generation"

    def __init__(self, student, cfg: ContrastiveConfig):
        if getattr(student, "contrastive_heads", None) is None:
            raise UserError("contrastive self-distillation needs a denoiser with contrastive heads",
                            "build the model from a config with train.contrastive.enabled=true")
        if student.config.cond_channels:
            raise UserError("contrastive self-distillation augments the image itself; this denoiser also takes an "
                            "image condition", "use it with unconditional or class-conditional image generation")
        self.student, self.cfg = student, cfg
        self.teacher = EMATeacher(student, cfg.momentum)

    def timesteps(self, n: int, generator: torch.Generator, device) -> Tensor:
        lo, hi = self.cfg.t_range if self.cfg.t_range else (self.cfg.t, self.cfg.t)
        return torch.randint(lo, hi + 1, (n,), generator=generator, device=generator.device).to(device)

    def __call__(self, ctx) -> dict[str, Tensor]:
        cfg, g = self.cfg, ctx.generator
        pixels = ctx.batch.x0
        b = pixels.shape[0]
        views, params = augment_views(torch.cat([pixels, pixels]), g, cfg.aug_strength, cfg.flip, cfg.color)
        with torch.no_grad():
            z = ctx.space.encode(views)
        t = self.timesteps(2 * b, g, z.device)
        noise = torch.randn(z.shape, generator=g, device=g.device).to(z.device)
        x_t = ctx.schedule.add_noise(z, noise, t)
        cond = (ctx.clean_cond if ctx.clean_cond is not None else ctx.cond).replace(class_labels=None).repeat(2)
        aug = params if cfg.aug_cond else None
        heads = self.student.contrastive_heads
        with ctx.autocast():
            q = heads.predictor(heads.projector(self.student.self_condition_features(x_t, t, cond, aug)))
        with torch.no_grad(), ctx.autocast():
            teacher = self.teacher.net
            k = teacher.contrastive_heads.projector(teacher.self_condition_features(x_t, t, cond, aug))
        (q1, q2), (k1, k2) = q.chunk(2), k.chunk(2)
        return {self.name: cfg.weight * symmetric_infonce(q1, q2, k1, k2, cfg.temperature)}

    def after_step(self, trainer=None) -> None:
        self.teacher.update()

    def save_state(self, checkpoint: Path) -> None:
        self.teacher.net.save_pretrained(Path(checkpoint) / TEACHER_DIR)

    def load_state(self, checkpoint: Path) -> None:
        from safetensors.torch import load_file

        path = Path(checkpoint) / TEACHER_DIR / "model.safetensors"
        if not path.is_file():
            raise UserError(f"checkpoint {checkpoint} has no contrastive teacher ({path})",
                            "resume with the config the run was trained with (train.contrastive)")
        self.teacher.net.load_state_dict(load_file(str(path), device=str(self.student.device)))
