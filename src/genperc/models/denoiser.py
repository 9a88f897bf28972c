"""The denoiser: one ``nn.Module`` around a diffusers model, driven by a :class:`Conditioning`.

``Denoiser.forward(x_t, t, cond)`` is the only call the diffusion core, the trainer and the
analysis code make. It hides which diffusers model sits underneath:

* **UNet architectures** (``unet-tiny`` / ``unet-small`` / ``unet-base``) use diffusers'
  ``UNet2DConditionModel``. With text (``text_dim > 0``) the attention levels are cross-attention
  blocks whose key/value width is ``text_dim`` (384 for MiniLM). Without text the *same model class*
  is built with self-attention-only blocks (``AttnDownBlock2D`` / ``AttnUpBlock2D`` /
  ``UNetMidBlock2D``) and is called with ``encoder_hidden_states=None``: no dummy null token and no
  wasted cross-attention. Class labels use the UNet's own class embedding
  (``class_embed_type=None`` with ``num_class_embeds``), which is added to the timestep embedding.
* **DiT architecture** (``dit-small``, DiT-S/2 of Peebles & Xie 2023: width 384, 12 blocks, 6 heads,
  patch 2). Without text it is diffusers' ``DiTTransformer2DModel`` (adaLN-Zero blocks,
  class-conditional). With text it is diffusers' ``PixArtTransformer2DModel`` (DiT blocks with
  adaLN-single plus cross-attention on the projected text tokens), because
  ``DiTTransformer2DModel`` has no cross-attention. PixArt has no class embedding, so a DiT with
  both text and classes is refused; use a UNet architecture for that.
* **Pretrained UNets** (Stable Diffusion, InstructPix2Pix, Marigold) come in through
  :meth:`Denoiser.from_diffusers`, see :mod:`genperc.models.pretrained`.

Conventions shared by every backbone:

* The image condition (Marigold / InstructPix2Pix) is concatenated to ``x_t`` on the channel axis:
  the backbone sees ``in_channels + cond_channels`` input channels. The order is a property of
  the model (``DenoiserConfig.image_first``): InstructPix2Pix and genperc's own models take
  ``[x_t, image]`` (Brooks et al. 2023, §3.4; diffusers' pipeline), Marigold takes
  ``[image_latent, noisy_latent]`` (Ke et al. 2024, §3.3; diffusers' ``MarigoldDepthPipeline``), so a
  released 8-channel Marigold UNet sees its inputs where it was trained to.
* The null class is the extra index ``num_classes`` (the table has ``num_classes + 1`` rows), as in
  DiT's classifier-free guidance embedding. A missing ``cond.class_labels`` means "null class".
  Label dropout for guidance is the trainer's job (with its own generator); the random label
  dropout built into diffusers' DiT label embedding is switched off, since it draws from the global
  RNG.
* ``learned_variance`` doubles the output channels (improved DDPM, GenRep's σ_base); the raw output
  tensor is returned and the diffusion core splits it.
* DDAE++ self-conditioning and the heads of its contrastive self-distillation are optional
  submodules (``self_conditioning``, ``contrastive_heads``) built from the config and saved with the
  weights; the backbone stays the plain diffusers model (:mod:`genperc.models.selfcond`).

A checkpoint is ``config.json`` (this module's :class:`DenoiserConfig`, including the diffusers
class name and config of the backbone) plus ``model.safetensors`` (the whole state dict), so a
saved denoiser is rebuilt exactly, even if the architecture registry changes later.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from genperc.diffusion.conditioning import Conditioning
from genperc.errors import UserError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_FORMAT = "genperc.Denoiser"

# Config fields stored as tuples (YAML / JSON give lists back).
_TUPLE_FIELDS = ("block_out_channels", "attention_levels")


@dataclass
class DenoiserConfig:
    """Everything needed to rebuild a :class:`Denoiser`.

    Conditioning fields:
      arch:            name of the registered architecture (:mod:`genperc.models.registry`) it
                       came from ("diffusers" for a wrapped pretrained UNet); checkpoints written
                       before the rename say ``preset``, read as ``arch``.
      sample_size:     nominal spatial size of ``x_t`` (pixels, or latent pixels in latent space).
      in_channels:     channels of the target being denoised (3 in pixel space, 4 in SD latents).
      cond_channels:   channels of the image condition concatenated on the channel axis (0 = none).
      image_first:     concatenate ``[image, x_t]`` (Marigold) instead of ``[x_t, image]``
                       (InstructPix2Pix, genperc's own models; the default, so checkpoints saved
                       before this field existed load unchanged).
      out_channels:    output channels; ``None`` resolves to ``in_channels`` (×2 with
                       ``learned_variance``).
      text_dim:        width of the text token states for cross-attention (384 for MiniLM; 0 = no
                       text).
      num_classes:     number of class labels (0 = none); index ``num_classes`` is the null class.
      learned_variance: predict the variance interpolation ``v`` as extra output channels
                       (improved DDPM).

    DDAE++ fields (:mod:`genperc.models.selfcond`; None = off, and checkpoints saved before they
    existed load as off):
      self_conditioning:  a :class:`~genperc.config.SelfConditioningConfig` as a dict.
      contrastive_heads:  ``{hidden, proj_dim, pred_dim, aug_dim}`` of the
                          :class:`~genperc.models.selfcond.ContrastiveHeads` (needs self-conditioning).

    Architecture fields (filled from the registry):
      backbone:        "unet" or "dit".
      block_out_channels, layers_per_block, attention_levels (one bool per resolution level,
      highest resolution first), norm_num_groups, transformer_layers: UNet.
      attention_head_dim: channels per attention head (UNet and DiT).
      num_layers, num_attention_heads, patch_size: DiT (width = heads × head dim).

    Resolved at build time (leave empty):
      backbone_class, backbone_config: the diffusers class and its config; when present they win
      over the architecture fields, so checkpoints rebuild exactly.
      source: the directory a pretrained backbone came from.
    """

    arch: str = "unet-tiny"
    sample_size: int = 32
    in_channels: int = 3
    cond_channels: int = 0
    image_first: bool = False
    out_channels: int | None = None
    text_dim: int = 0
    num_classes: int = 0
    learned_variance: bool = False
    self_conditioning: dict[str, Any] | None = None
    contrastive_heads: dict[str, int] | None = None
    # architecture
    backbone: str = "unet"
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    attention_levels: tuple[bool, ...] = (False, True, True)
    attention_head_dim: int = 8
    norm_num_groups: int = 8
    transformer_layers: int = 1
    num_layers: int = 12
    num_attention_heads: int = 6
    patch_size: int = 2
    # resolved
    backbone_class: str | None = None
    backbone_config: dict[str, Any] | None = field(default=None, repr=False)
    source: str | None = None

    def __post_init__(self) -> None:
        for name in _TUPLE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))
        if self.out_channels is None:
            self.out_channels = self.in_channels * (2 if self.learned_variance else 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name in _TUPLE_FIELDS:
            d[name] = list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "denoiser config") -> DenoiserConfig:
        if "preset" in d and "arch" not in d:  # checkpoints saved before the rename
            d = {("arch" if k == "preset" else k): v for k, v in d.items()}
        valid = [f.name for f in fields(cls)]
        unknown = [k for k in d if k not in valid]
        if unknown:
            raise UserError(
                f"unknown key(s) {', '.join(map(repr, unknown))} in {where}",
                f"valid keys: {', '.join(valid)}",
            )
        return cls(**d)

    @property
    def total_in_channels(self) -> int:
        """Channels the backbone sees: target + concatenated image condition."""
        return self.in_channels + self.cond_channels


# --------------------------------------------------------------------------------------------
# Backbone construction


_BACKBONES = {
    "UNet2DConditionModel": "diffusers.models.unets.unet_2d_condition",
    "DiTTransformer2DModel": "diffusers.models.transformers.dit_transformer_2d",
    "PixArtTransformer2DModel": "diffusers.models.transformers.pixart_transformer_2d",
}


def _backbone_class(name: str) -> type:
    """Import only the diffusers module that defines ``name`` (importing diffusers' model packages
    wholesale costs seconds)."""
    import importlib

    if name not in _BACKBONES:
        raise UserError(f"unsupported backbone class {name!r}", f"supported: {', '.join(_BACKBONES)}")
    return getattr(importlib.import_module(_BACKBONES[name]), name)


def _seeded(seed: int | None):
    """A context that builds from ``seed`` without touching the global RNG (nothing when None)."""
    if seed is None:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def ctx():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield

    return ctx()


def _check(cond: bool, problem: str, fix: str) -> None:
    if not cond:
        raise UserError(problem, fix)


def _validate(cfg: DenoiserConfig) -> None:
    _check(cfg.in_channels >= 1, f"in_channels must be >= 1, got {cfg.in_channels}", "set in_channels")
    _check(
        cfg.cond_channels >= 0, f"cond_channels must be >= 0, got {cfg.cond_channels}", "use 0 for no image condition"
    )
    _check(cfg.text_dim >= 0, f"text_dim must be >= 0, got {cfg.text_dim}", "use 0 for no text")
    _check(cfg.num_classes >= 0, f"num_classes must be >= 0, got {cfg.num_classes}", "use 0 for no classes")
    _check(cfg.sample_size >= 1, f"sample_size must be >= 1, got {cfg.sample_size}", "set sample_size")
    if cfg.backbone == "unet":
        n = len(cfg.block_out_channels)
        _check(
            len(cfg.attention_levels) == n,
            f"attention_levels has {len(cfg.attention_levels)} entries but block_out_channels has {n}",
            "give one bool per resolution level",
        )
        for ch in cfg.block_out_channels:
            _check(
                ch % cfg.norm_num_groups == 0,
                f"block_out_channels {ch} is not divisible by norm_num_groups={cfg.norm_num_groups}",
                "pick channels that are multiples of norm_num_groups",
            )
        for ch, att in zip(cfg.block_out_channels, cfg.attention_levels, strict=True):
            _check(
                not att or ch % cfg.attention_head_dim == 0,
                f"block_out_channels {ch} is not divisible by attention_head_dim={cfg.attention_head_dim}",
                "pick channels that are multiples of attention_head_dim",
            )
    elif cfg.backbone == "dit":
        _check(
            not (cfg.text_dim and cfg.num_classes),
            "the DiT backbone takes text (PixArt cross-attention) or class labels (DiT adaLN-Zero), not both",
            "set text_dim=0 or num_classes=0, or use a unet-* architecture",
        )
        _check(
            cfg.sample_size % cfg.patch_size == 0,
            f"sample_size {cfg.sample_size} is not divisible by patch_size={cfg.patch_size}",
            "pick a sample_size that is a multiple of patch_size",
        )
    else:
        raise UserError(f"unknown backbone {cfg.backbone!r}", "use 'unet' or 'dit'")


def _unet_kwargs(cfg: DenoiserConfig) -> dict[str, Any]:
    text = cfg.text_dim > 0
    down, up = [], []
    for att in cfg.attention_levels:
        down.append(("CrossAttnDownBlock2D" if text else "AttnDownBlock2D") if att else "DownBlock2D")
    for att in reversed(cfg.attention_levels):
        up.append(("CrossAttnUpBlock2D" if text else "AttnUpBlock2D") if att else "UpBlock2D")
    # diffusers quirk (its issue #2011): for cross-attention blocks ``attention_head_dim`` is read as
    # the number of heads; for self-attention blocks it is the head width. We store the head width.
    per_level = tuple(
        (ch // cfg.attention_head_dim) if text else cfg.attention_head_dim for ch in cfg.block_out_channels
    )
    return dict(
        sample_size=cfg.sample_size,
        in_channels=cfg.total_in_channels,
        out_channels=cfg.out_channels,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        mid_block_type="UNetMidBlock2DCrossAttn" if text else "UNetMidBlock2D",
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups,
        cross_attention_dim=cfg.text_dim if text else cfg.block_out_channels[-1],
        attention_head_dim=per_level,
        transformer_layers_per_block=cfg.transformer_layers,
        num_class_embeds=(cfg.num_classes + 1) if cfg.num_classes else None,
    )


def _dit_kwargs(cfg: DenoiserConfig) -> tuple[str, dict[str, Any]]:
    common = dict(
        num_attention_heads=cfg.num_attention_heads,
        attention_head_dim=cfg.attention_head_dim,
        in_channels=cfg.total_in_channels,
        out_channels=cfg.out_channels,
        num_layers=cfg.num_layers,
        sample_size=cfg.sample_size,
        patch_size=cfg.patch_size,
    )
    if cfg.text_dim:
        width = cfg.num_attention_heads * cfg.attention_head_dim
        return "PixArtTransformer2DModel", dict(
            common,
            cross_attention_dim=width,
            caption_channels=cfg.text_dim,
            use_additional_conditions=False,
        )
    # num_classes == 0: a single (null) label, always passed — unconditional DiT.
    return "DiTTransformer2DModel", dict(common, num_embeds_ada_norm=max(cfg.num_classes, 1))


def _instantiate(class_name: str, config: dict[str, Any]) -> nn.Module:
    cls = _backbone_class(class_name)
    clean = {k: v for k, v in config.items() if not k.startswith("_")}
    model = cls.from_config(clean)
    _disable_label_dropout(model)
    return model


def _disable_label_dropout(model: nn.Module) -> None:
    """diffusers' DiT drops labels with ``torch.rand`` (global RNG) in train mode; we drop them in
    the trainer with its own generator instead. The null row of the table is kept."""
    from diffusers.models.embeddings import LabelEmbedding

    for m in model.modules():
        if isinstance(m, LabelEmbedding):
            m.dropout_prob = 0.0


def build_backbone(cfg: DenoiserConfig) -> tuple[str, nn.Module]:
    """Build the diffusers model described by ``cfg`` (from ``backbone_config`` when present)."""
    if cfg.backbone_class and cfg.backbone_config is not None:
        return cfg.backbone_class, _instantiate(cfg.backbone_class, cfg.backbone_config)
    _validate(cfg)
    if cfg.backbone == "unet":
        return "UNet2DConditionModel", _instantiate("UNet2DConditionModel", _unet_kwargs(cfg))
    name, kwargs = _dit_kwargs(cfg)
    return name, _instantiate(name, kwargs)


def _plain_config(model: nn.Module) -> dict[str, Any]:
    """A JSON-able copy of a diffusers model's registered config."""
    out = {}
    for k, v in dict(model.config).items():
        if k.startswith("_"):
            continue
        out[k] = list(v) if isinstance(v, tuple) else v
    return json.loads(json.dumps(out))


# --------------------------------------------------------------------------------------------
# The module


class Denoiser(nn.Module):
    """``forward(x_t, t, cond) -> raw output`` over a diffusers backbone; see the module docstring.

    Build one with :func:`genperc.models.registry.create_denoiser`, :meth:`from_pretrained` (a genperc
    checkpoint) or :meth:`from_diffusers` (a local Stable Diffusion-style UNet).
    """

    def __init__(self, config: DenoiserConfig, backbone: nn.Module | None = None, *, seed: int | None = None):
        """``seed`` makes the random initialisation reproducible without touching the global RNG
        (diffusers initialises from it, so the build runs inside ``torch.random.fork_rng``)."""
        super().__init__()
        config = replace(config)  # the caller's object is left untouched
        with _seeded(seed):
            if backbone is None:
                class_name, backbone = build_backbone(config)
            else:
                class_name = type(backbone).__name__
                _disable_label_dropout(backbone)
            config.backbone_class = class_name
            config.backbone_config = _plain_config(backbone)
            self.config = config
            self.backbone = backbone
            self._build_ddae(config)

    def _build_ddae(self, config: DenoiserConfig) -> None:
        """DDAE++ self-conditioning and contrastive heads (:mod:`genperc.models.selfcond`), when configured."""
        from genperc.config import SelfConditioningConfig
        from genperc.models.selfcond import ContrastiveHeads, SelfConditioning

        self.self_conditioning = self.contrastive_heads = None
        sc = config.self_conditioning
        if sc is not None and sc.get("enabled", True):
            self.self_conditioning = SelfConditioning(self.backbone, SelfConditioningConfig(**sc))
        if config.contrastive_heads is not None:
            if self.self_conditioning is None:
                raise UserError("contrastive heads read the self-conditioning features, which this denoiser lacks",
                                "enable model.self_conditioning with train.contrastive")
            self.contrastive_heads = ContrastiveHeads(self.self_conditioning.channels, self.self_conditioning.width,
                                                      **config.contrastive_heads)

    # ---- properties -------------------------------------------------------------------------

    @property
    def null_class(self) -> int:
        """The class index meaning "no class" (classifier-free guidance, missing labels)."""
        return self.config.num_classes

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in the backward pass (diffusers' checkpointing of the backbone).

        Refused for a DiT with self-conditioning: diffusers recomputes whole DiT blocks in the
        backward pass, outside the forward whose self-conditioning offset they received."""
        if self.self_conditioning is not None and self.config.backbone != "unet":
            raise UserError("gradient checkpointing of a DiT with self-conditioning would recompute its blocks "
                            "without the self-conditioning offset", "switch one of the two off")
        self.backbone.enable_gradient_checkpointing()

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # ---- forward ----------------------------------------------------------------------------

    def forward(self, x_t: Tensor, t: Tensor | int | float, cond: Conditioning | None = None) -> Tensor:
        """Predict from the noisy ``x_t`` [B, in_channels, H, W] at timesteps ``t`` ([B] or scalar).

        Returns the raw backbone output [B, out_channels, H, W] (ε, x0 or v as trained; with
        ``learned_variance`` the second half of the channels is the variance interpolation).
        """
        sc = self.self_conditioning
        x, t, text, text_mask, labels = self._inputs(x_t, t, cond)
        with sc.running(t) if sc is not None else contextlib.nullcontext():
            return self._backbone_forward(x, t, text, text_mask, labels)

    def self_condition_features(self, x_t: Tensor, t: Tensor | int | float, cond: Conditioning | None = None,
                                augment: Tensor | None = None) -> Tensor:
        """The pooled features [B, C] of the self-conditioning block (DDAE++) for (x_t, t, cond).

        The backbone runs only up to that block (the pass ends there). ``augment`` [B, 9] are the
        augmentation parameters of the views (:func:`genperc.training.contrastive.augment_views`),
        embedded into every block's conditioning when the contrastive heads have an augmentation
        embedding (``aug_cond``); zeros or None mean "not augmented"."""
        sc = self.self_conditioning
        if sc is None:
            raise UserError("this denoiser has no self-conditioning features", "build it with model.self_conditioning.enabled=true")
        from genperc.models.selfcond import StopForward

        x, t, text, text_mask, labels = self._inputs(x_t, t, cond)
        heads = self.contrastive_heads
        extra = None
        if augment is not None and heads is not None and heads.augment is not None:
            extra = heads.augment(augment.to(heads.augment.weight.dtype))
        with sc.running(t, extra=extra, stop=True) as current:
            with contextlib.suppress(StopForward):
                self._backbone_forward(x, t, text, text_mask, labels)
        return current.pooled

    def _inputs(self, x_t: Tensor, t, cond: Conditioning | None):
        """(backbone input, t [B], text, text mask, class labels), checked."""
        cfg = self.config
        cond = cond if cond is not None else Conditioning()
        if x_t.ndim != 4:
            raise UserError(f"x_t must be [B, C, H, W], got shape {tuple(x_t.shape)}", "pass a 4-D batch")
        b = x_t.shape[0]
        if x_t.shape[1] != cfg.in_channels:
            raise UserError(
                f"x_t has {x_t.shape[1]} channels but the denoiser denoises {cfg.in_channels}",
                "match the task's target channels to in_channels",
            )
        x = self._concat_image(x_t, cond.image)
        t = self._timesteps(t, b, x.device)
        text, text_mask = self._text(cond, b, x.dtype)
        labels = self._labels(cond.class_labels, b, x.device)
        return x, t, text, text_mask, labels

    def _backbone_forward(self, x: Tensor, t: Tensor, text, text_mask, labels) -> Tensor:
        b = x.shape[0]
        if self.config.backbone_class == "UNet2DConditionModel":
            return self.backbone(
                x,
                t,
                encoder_hidden_states=text,
                encoder_attention_mask=text_mask,
                class_labels=labels,
                return_dict=False,
            )[0]
        if self.config.backbone_class == "PixArtTransformer2DModel":
            self._check_patch(x)
            return self.backbone(
                x,
                encoder_hidden_states=text,
                timestep=t,
                encoder_attention_mask=text_mask,
                return_dict=False,
            )[0]
        if self.config.backbone_class == "DiTTransformer2DModel":
            self._check_patch(x)
            if labels is None:  # unconditional DiT: the single null label
                labels = torch.zeros(b, dtype=torch.long, device=x.device)
            return self.backbone(x, timestep=t, class_labels=labels, return_dict=False)[0]
        raise AssertionError(f"unhandled backbone {self.config.backbone_class}")

    def _concat_image(self, x_t: Tensor, image: Tensor | None) -> Tensor:
        want = self.config.cond_channels
        if image is None:
            if want:
                raise UserError(
                    f"this denoiser expects an image condition with {want} channels but cond.image is None",
                    "pass cond.image (zeros for the null image)",
                )
            return x_t
        got = image.shape[1] if image.ndim == 4 else None
        if got != want:
            raise UserError(
                f"cond.image has {got} channels (shape {tuple(image.shape)}) but cond_channels={want}",
                f"pass an image with {want} channels or build the denoiser with cond_channels={got}",
            )
        if image.shape[0] != x_t.shape[0] or image.shape[-2:] != x_t.shape[-2:]:
            raise UserError(
                f"cond.image shape {tuple(image.shape)} does not match x_t shape {tuple(x_t.shape)} in batch or size",
                "resize the condition image to the size of x_t",
            )
        image = image.to(x_t.dtype)
        return torch.cat([image, x_t] if self.config.image_first else [x_t, image], dim=1)

    @staticmethod
    def _timesteps(t: Tensor | int | float, b: int, device: torch.device) -> Tensor:
        t = torch.as_tensor(t, device=device)
        if t.ndim == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise UserError(f"t must be a scalar or shape [{b}], got {tuple(t.shape)}", "pass one timestep per sample")
        return t

    def _text(self, cond: Conditioning, b: int, dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
        dim = self.config.text_dim
        if cond.text is None:
            if dim:
                raise UserError(
                    "this denoiser is text-conditioned but cond.text is None",
                    'pass text states (the embedding of "" is the null text)',
                )
            return None, None
        if not dim:
            raise UserError(
                "cond.text was given but this denoiser has no text conditioning (text_dim=0)",
                "build it with text_dim set to the text encoder's width, or drop the text",
            )
        text = cond.text
        if text.ndim != 3 or text.shape[0] != b or text.shape[-1] != dim:
            raise UserError(
                f"cond.text has shape {tuple(text.shape)}, expected [{b}, L, {dim}]",
                f"use a text encoder of width {dim} or rebuild with text_dim={text.shape[-1]}",
            )
        mask = cond.text_mask
        if mask is None:
            mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
        elif mask.shape != text.shape[:2]:
            raise UserError(
                f"cond.text_mask has shape {tuple(mask.shape)}, expected {tuple(text.shape[:2])}",
                "give one bool per text token",
            )
        return text.to(dtype), mask.bool()

    def _labels(self, labels: Tensor | None, b: int, device: torch.device) -> Tensor | None:
        n = self.config.num_classes
        if labels is None:
            return torch.full((b,), n, dtype=torch.long, device=device) if n else None
        if not n:
            raise UserError(
                "cond.class_labels was given but this denoiser has no class embedding (num_classes=0)",
                "build it with num_classes set, or drop the labels",
            )
        labels = labels.to(device=device, dtype=torch.long)
        if labels.shape != (b,):
            raise UserError(
                f"cond.class_labels must have shape [{b}], got {tuple(labels.shape)}", "one label per sample"
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > n):
            raise UserError(
                f"class labels must lie in [0, {n}] ({n} = null class), got [{int(labels.min())}, {int(labels.max())}]",
                "check the dataset's class indices against num_classes",
            )
        return labels

    def _check_patch(self, x: Tensor) -> None:
        p = self.config.backbone_config.get("patch_size", 1) or 1
        if x.shape[-1] % p or x.shape[-2] % p:
            raise UserError(
                f"input size {tuple(x.shape[-2:])} is not divisible by the DiT patch size {p}",
                f"resize inputs to a multiple of {p}",
            )

    # ---- persistence ------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` + ``model.safetensors`` atomically (temp dir in the same parent,
        then rename; an existing directory is replaced only after the new one is complete)."""
        from safetensors.torch import save_file

        from genperc.atomic import atomic_directory

        target = Path(directory)
        with atomic_directory(target) as tmp:
            payload = {"_format": _FORMAT, **self.config.to_dict()}
            (tmp / CONFIG_NAME).write_text(json.dumps(payload, indent=2) + "\n")
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "genperc": _FORMAT})
        return target

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device | None = None) -> Denoiser:
        """Load a directory written by :meth:`save_pretrained`."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        d = Path(directory)
        if not d.is_dir():
            raise UserError(
                f"denoiser directory not found: {d}", "pass a directory written by Denoiser.save_pretrained"
            )
        cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
        for p in (cfg_path, w_path):
            if not p.is_file():
                raise UserError(
                    f"incomplete denoiser checkpoint: missing {p}", "re-save the model with save_pretrained"
                )
        try:
            raw = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{cfg_path} is not valid JSON ({e.msg}, line {e.lineno})", "re-save the model") from None
        if raw.pop("_format", None) != _FORMAT:
            raise UserError(
                f"{cfg_path} is not a genperc denoiser config",
                "for a diffusers UNet directory use Denoiser.from_diffusers",
            )
        config = DenoiserConfig.from_dict(raw, where=str(cfg_path))
        model = cls(config)
        try:
            state = load_file(str(w_path), device="cpu")
        except (SafetensorError, OSError) as e:
            raise UserError(f"cannot read {w_path}: {e}", "re-save the model with save_pretrained") from None
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UserError(
                f"{w_path} does not match {cfg_path}: {len(missing)} missing key(s) "
                f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})",
                "save config and weights together with save_pretrained",
            )
        if device is not None:
            model.to(device)
        return model

    @classmethod
    def from_diffusers(
        cls,
        path: str | os.PathLike,
        *,
        subfolder: str | None = "unet",
        in_channels: int | None = None,
        cond_channels: int = 0,
        widen_mode: str = "zero",
        text_dim: int | None = None,
        num_classes: int | None = None,
        variant: str | None = None,
        image_first: bool | None = None,
        self_conditioning: dict[str, Any] | None = None,
        contrastive_heads: dict[str, int] | None = None,
        seed: int | None = None,
    ) -> Denoiser:
        """Wrap a local pretrained diffusers UNet (SD / InstructPix2Pix / Marigold layout).

        ``in_channels`` (default: the UNet's ``out_channels``) are the target channels; the image
        condition adds ``cond_channels``. If the UNet's ``conv_in`` is narrower than
        ``in_channels + cond_channels`` it is widened with :func:`widen_conv_in` (``"zero"``:
        InstructPix2Pix; ``"tile"``: Marigold); if it already has that width (a released
        InstructPix2Pix or Marigold UNet) it is used as is. ``image_first`` (default: ``True`` for
        the Marigold widening ``"tile"``, ``False`` for ``"zero"``) is the channel order of the
        concatenation, ``[image, x_t]`` for Marigold, ``[x_t, image]`` for InstructPix2Pix (see the
        module docstring). ``text_dim`` (default: the UNet's
        ``cross_attention_dim``) different from the UNet's adds a trainable linear projection of the
        text states (diffusers' ``encoder_hid_dim_type="text_proj"``), e.g. MiniLM (384) into SD
        (768). ``num_classes`` (default: the UNet's own, usually none) adds a zero-initialised class
        embedding with a null row, so the pretrained behaviour is unchanged at start. UNets with
        other extra conditioning (SDXL's added time ids, upscalers' noise-level class) are refused.
        ``self_conditioning`` / ``contrastive_heads`` add DDAE++'s modules (:class:`DenoiserConfig`),
        initialised from ``seed``.
        """
        from genperc.models.pretrained import (
            add_class_embedding,
            add_text_projection,
            load_pretrained_unet,
            widen_conv_in,
        )

        unet = load_pretrained_unet(path, subfolder=subfolder, variant=variant)
        c = unet.config
        extra = (c.addition_embed_type, c.class_embed_type, c.encoder_hid_dim_type)
        if extra[0] is not None or extra[1] is not None or extra[2] not in (None, "text_proj"):
            raise UserError(
                f"the UNet in {path} uses extra conditioning (addition_embed_type={c.addition_embed_type}, "
                f"class_embed_type={c.class_embed_type}, encoder_hid_dim_type={c.encoder_hid_dim_type}) that genperc does not feed",
                "use a Stable Diffusion 1.x/2.x-style UNet (SD, InstructPix2Pix, Marigold)",
            )
        target = int(in_channels if in_channels is not None else c.out_channels)
        total = target + int(cond_channels)
        if c.in_channels < total:
            widen_conv_in(unet, total, mode=widen_mode)
        elif c.in_channels > total:
            raise UserError(
                f"the UNet in {path} takes {c.in_channels} input channels, more than "
                f"in_channels + cond_channels = {target} + {cond_channels}",
                f"set cond_channels={c.in_channels - target}",
            )
        cad = c.cross_attention_dim
        if not isinstance(cad, int):
            raise UserError(
                f"the UNet in {path} has per-block cross_attention_dim {cad}", "use a UNet with one text width"
            )
        current = int(c.encoder_hid_dim or cad)
        if text_dim == 0:
            raise UserError(f"the UNet in {path} has cross-attention and needs text states, but the run has no text encoder",
                            "set model.text_encoder=minilm (a task without text then conditions on the empty prompt)")
        text_dim = current if text_dim is None else int(text_dim)
        if text_dim != current:
            add_text_projection(unet, text_dim)
        existing = int(c.num_class_embeds) - 1 if c.num_class_embeds else 0
        if num_classes is None:
            num_classes = existing
        elif existing and num_classes != existing:
            raise UserError(
                f"the UNet in {path} has {existing} classes (+ null), not {num_classes}",
                f"set num_classes={existing}",
            )
        elif num_classes and not existing:
            add_class_embedding(unet, num_classes + 1)
        levels = tuple("Attn" in bt for bt in c.down_block_types)
        config = DenoiserConfig(
            arch="diffusers",
            sample_size=int(c.sample_size) if isinstance(c.sample_size, int) else int(c.sample_size[0]),
            in_channels=target,
            cond_channels=int(cond_channels),
            image_first=(widen_mode == "tile") if image_first is None else bool(image_first),
            out_channels=int(c.out_channels),
            text_dim=int(text_dim),
            num_classes=int(num_classes),
            backbone="unet",
            block_out_channels=tuple(c.block_out_channels),
            layers_per_block=int(c.layers_per_block) if isinstance(c.layers_per_block, int) else 0,
            attention_levels=levels,
            norm_num_groups=int(c.norm_num_groups or 32),
            self_conditioning=self_conditioning,
            contrastive_heads=contrastive_heads,
            source=str(Path(path).resolve()),
        )
        return cls(config, backbone=unet, seed=seed)
