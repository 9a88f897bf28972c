"""The registry of denoiser architectures, timm style: ``create_denoiser("unet-tiny", text_dim=384)``.

An architecture fills the architecture fields of :class:`~genperc.models.denoiser.DenoiserConfig`;
the caller's overrides (conditioning fields, or any architecture field) win. A run config names its
architecture in ``model.arch`` (the YAML run configs in ``genperc/configs/`` are the "presets").
Parameter counts below are for 3 input channels with MiniLM text (``text_dim=384``) / without
text; text-free UNets replace the cross-attention transformer blocks by plain self-attention,
hence the smaller count.

=============  ==========================  =====================  ======================
arch           backbone                    params (text / none)   intended use
=============  ==========================  =====================  ======================
unet-tiny      UNet2DConditionModel        2.0 M / 1.1 M          CPU, tests, 32×32
unet-small     UNet2DConditionModel        18.8 M / 11.3 M        GPU, 64×64
unet-base      UNet2DConditionModel        95.5 M / 62.8 M        GPU, 64–128
dit-small      PixArt (text) / DiT         29.8 M / 35.2 M        DiT-S/2, GPU, 32×32 latents
dit-tiny       PixArt (text) / DiT         1.8 M / 2.1 M          CPU, tests, 16×16 (DDAE++ preset)
=============  ==========================  =====================  ======================

(The DiT figure is for 10 classes; diffusers' DiT keeps a timestep+label embedder per block.)
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from genperc.errors import UserError
from genperc.models.denoiser import Denoiser, DenoiserConfig

ARCHITECTURES: dict[str, dict[str, Any]] = {}


def register_architecture(name: str, **architecture: Any) -> None:
    """Register (or replace) an architecture: a dict of :class:`DenoiserConfig` field defaults."""
    valid = {f.name for f in fields(DenoiserConfig)}
    unknown = set(architecture) - valid
    if unknown:
        raise ValueError(f"architecture {name!r}: unknown DenoiserConfig fields {sorted(unknown)}")
    ARCHITECTURES[name] = dict(architecture)


def list_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


register_architecture(
    "unet-tiny",
    backbone="unet",
    sample_size=32,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    attention_levels=(False, True, True),
    # 32 channels per head (2 heads at 64 channels): the same parameters and FLOPs as 8-channel
    # heads, 1.30x faster on a 2-core CPU in bf16 (issue 11's profile: attention was memory-bound)
    attention_head_dim=32,
    norm_num_groups=8,
)
register_architecture(
    "unet-small",
    backbone="unet",
    sample_size=64,
    block_out_channels=(64, 128, 128, 256),
    layers_per_block=1,
    attention_levels=(False, False, True, True),
    attention_head_dim=32,
    norm_num_groups=32,
)
register_architecture(
    "unet-base",
    backbone="unet",
    sample_size=128,
    block_out_channels=(128, 256, 384, 384),
    layers_per_block=2,
    attention_levels=(False, False, True, True),
    attention_head_dim=64,
    norm_num_groups=32,
)
register_architecture(
    "dit-small",
    backbone="dit",
    sample_size=32,
    num_layers=12,
    num_attention_heads=6,
    attention_head_dim=64,
    patch_size=2,
)

register_architecture(
    "dit-tiny",
    backbone="dit",
    sample_size=16,
    num_layers=6,
    num_attention_heads=4,
    attention_head_dim=32,
    patch_size=2,
)


def denoiser_config(arch: str, **overrides: Any) -> DenoiserConfig:
    """The resolved :class:`DenoiserConfig` for architecture ``arch`` with ``overrides`` applied."""
    if arch not in ARCHITECTURES:
        raise UserError(f"unknown denoiser architecture {arch!r}",
                        f"valid architectures: {', '.join(list_architectures())}")
    valid = [f.name for f in fields(DenoiserConfig) if f.name not in ("arch", "backbone_class", "backbone_config")]
    unknown = [k for k in overrides if k not in valid]
    if unknown:
        raise UserError(
            f"unknown denoiser option(s) {', '.join(map(repr, unknown))} for architecture {arch!r}",
            f"valid options: {', '.join(valid)}",
        )
    return DenoiserConfig(arch=arch, **{**ARCHITECTURES[arch], **overrides})


def create_denoiser(arch: str, *, seed: int | None = None, **overrides: Any) -> Denoiser:
    """Build a randomly initialised :class:`Denoiser` of a registered architecture (see the table
    above).

    ``seed`` gives a reproducible initialisation that leaves the global RNG untouched."""
    return Denoiser(denoiser_config(arch, **overrides), seed=seed)
