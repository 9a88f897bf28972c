"""Local diffusers-format checkpoints: loading (never a hub download) and adapting them.

Layouts handled: a pipeline directory (``model_index.json`` + ``unet/``, ``vae/``, ... — Stable
Diffusion, InstructPix2Pix, Marigold) or a bare component directory (``config.json`` + weights).
Weights must be safetensors (``diffusion_pytorch_model[.variant].safetensors`` or a sharded
``.safetensors.index.json``); a pickle ``.bin`` is refused (DESIGN.md: no pickle from user files).
Every problem with the directory is one :class:`~genperc.errors.UserError` naming the missing file.

Adapting a pretrained UNet to perception (all in place, with the diffusers config updated so that
``save_pretrained`` / ``from_pretrained`` round-trip):

* :func:`widen_conv_in` — more input channels for an image condition concatenated to the noisy
  target. ``"zero"``: old weights in the first channels, zeros elsewhere (InstructPix2Pix, Brooks
  et al. 2023). ``"tile"``: the old weights repeated over the new channels and scaled by
  old/new, e.g. ×0.5 for 4 → 8 (Marigold, Ke et al. 2024), so that feeding the same latent twice
  reproduces the old response. The **bias is copied** in both modes (diffusers' InstructPix2Pix
  training example leaves it at its random init, diffusers issue #4960).
* :func:`add_text_projection` — a linear map from another text encoder's width (MiniLM 384) to the
  UNet's cross-attention width (diffusers' ``encoder_hid_dim_type="text_proj"``).
* :func:`add_class_embedding` — a zero-initialised class embedding added to the timestep
  embedding (the pretrained output is unchanged until it is trained).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from genperc.errors import UserError

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"


def _weights_names(variant: str | None) -> tuple[str, str, str]:
    stem = DIFFUSERS_WEIGHTS + (f".{variant}" if variant else "")
    return f"{stem}.safetensors", f"{stem}.safetensors.index.json", f"{stem}.bin"


def resolve_component_dir(
    path: str | os.PathLike,
    subfolder: str | None,
    *,
    what: str = "model",
    variant: str | None = None,
) -> Path:
    """Return the component directory (``path/subfolder`` or ``path`` itself) after checking that
    it holds a config and safetensors weights; raise a one-line UserError naming what is missing."""
    root = Path(path).expanduser()
    if not root.exists():
        raise UserError(f"{what} directory not found: {root}", "pass a local diffusers-format directory (no hub ids)")
    if not root.is_dir():
        raise UserError(f"{what} path is not a directory: {root}", "pass the directory that holds model_index.json")
    if subfolder and (root / subfolder).is_dir():
        comp = root / subfolder
    elif (root / "config.json").is_file() and not (root / "model_index.json").is_file():
        comp = root  # a bare component directory
    elif subfolder:
        raise UserError(
            f"{what} directory incomplete: missing {root / subfolder / 'config.json'}",
            f"pass a diffusers pipeline directory with a '{subfolder}/' folder, or the {what} folder itself",
        )
    else:
        raise UserError(f"{what} directory incomplete: missing {root / 'config.json'}", "pass a diffusers model folder")

    cfg = comp / "config.json"
    if not cfg.is_file():
        raise UserError(f"{what} directory incomplete: missing {cfg}", "copy the full diffusers folder")
    try:
        json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg} is not valid JSON ({e})", "re-download or re-save the model") from None

    single, index, pickle_bin = (comp / n for n in _weights_names(variant))
    if single.is_file():
        return comp
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{index} is not a valid safetensors index", "re-save the model") from None
        for shard in shards:
            if not (comp / shard).is_file():
                raise UserError(f"{what} directory incomplete: missing shard {comp / shard}", "copy all weight shards")
        return comp
    if pickle_bin.is_file():
        raise UserError(
            f"{what} weights in {comp} are pickle only ({pickle_bin.name}); genperc loads safetensors only",
            "convert them once with diffusers (from_pretrained + save_pretrained(safe_serialization=True)) "
            "in an environment you trust",
        )
    raise UserError(f"{what} directory incomplete: missing {single}", "copy the safetensors weights")


def read_component_config(comp: Path) -> dict[str, Any]:
    return json.loads((comp / "config.json").read_text())


def _load(cls, path, subfolder, what, variant, expected_class: str):
    comp = resolve_component_dir(path, subfolder, what=what, variant=variant)
    name = read_component_config(comp).get("_class_name")
    if name not in (None, expected_class):
        raise UserError(
            f"{comp / 'config.json'} describes a {name}, not a {expected_class}", f"point to the {what} folder"
        )
    return cls.from_pretrained(str(comp), local_files_only=True, use_safetensors=True, variant=variant)


#: Where the generators shipped with the package live: ``weights/<name>/{generator.json, unet/}``
#: (``genperc pretrain`` output, e.g. ``model.pretrained: world-generator``).
PACKAGED_DIR = Path(__file__).resolve().parent.parent / "weights"


def resolve_pretrained(path: str | os.PathLike) -> Path:
    """``path`` itself, or — when no such path exists and it names a generator shipped in
    :data:`PACKAGED_DIR` — that generator's folder after checking its weights against the sha256
    recorded in its ``generator.json``."""
    given = Path(path).expanduser()
    record_path = PACKAGED_DIR / str(path) / "generator.json"
    if given.exists() or not record_path.is_file():
        return given
    from genperc.models.text import verify_sha256

    folder = record_path.parent
    verify_sha256(folder / "unet" / "diffusion_pytorch_model.safetensors", json.loads(record_path.read_text())["unet_sha256"],
                  what=f"the packaged generator {path!r}", reinstall="genperc (or rebuild it: make world-generator)")
    return folder


def load_pretrained_unet(path: str | os.PathLike, subfolder: str | None = "unet", variant: str | None = None):
    """Load a ``UNet2DConditionModel`` from a local pipeline directory (``path/unet``), a bare UNet
    folder or a generator shipped with the package (:func:`resolve_pretrained`). Never contacts a hub."""
    from diffusers import UNet2DConditionModel

    return _load(UNet2DConditionModel, resolve_pretrained(path), subfolder, "UNet", variant, "UNet2DConditionModel")


def load_pretrained_vae(path: str | os.PathLike, subfolder: str | None = "vae", variant: str | None = None):
    """Load an ``AutoencoderKL`` from a local pipeline directory (``path/vae``) or a bare VAE folder."""
    from diffusers import AutoencoderKL

    return _load(AutoencoderKL, path, subfolder, "VAE", variant, "AutoencoderKL")


# --------------------------------------------------------------------------------------------
# Adapting a pretrained UNet


@torch.no_grad()
def widen_conv_in(unet: nn.Module, new_in_channels: int, mode: str = "zero") -> nn.Module:
    """Give ``unet.conv_in`` ``new_in_channels`` inputs, in place; returns ``unet``.

    ``mode="zero"`` (InstructPix2Pix): new[:, :old] = W, new[:, old:] = 0.
    ``mode="tile"`` (Marigold): new = repeat(W, new/old) · old/new; needs new % old == 0.
    The bias is copied in both modes (diffusers issue #4960), and ``unet.config.in_channels`` is
    updated so the widened model saves and reloads.
    """
    conv = unet.conv_in
    old = conv.in_channels
    if mode not in ("zero", "tile"):
        raise UserError(f"unknown conv_in widening mode {mode!r}", "use 'zero' (InstructPix2Pix) or 'tile' (Marigold)")
    if new_in_channels < old:
        raise UserError(f"cannot widen conv_in from {old} to fewer channels ({new_in_channels})", f"use >= {old}")
    if new_in_channels == old:
        return unet
    if mode == "tile" and new_in_channels % old:
        raise UserError(
            f"tile widening needs a multiple of {old} input channels, got {new_in_channels}",
            "use mode='zero' or a multiple of the old channel count",
        )
    new = nn.Conv2d(
        new_in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    if mode == "zero":
        new.weight.zero_()
        new.weight[:, :old] = conv.weight
    else:
        reps = new_in_channels // old
        new.weight.copy_(conv.weight.repeat(1, reps, 1, 1) * (old / new_in_channels))
    if conv.bias is not None:
        new.bias.copy_(conv.bias)
    new.weight.requires_grad_(conv.weight.requires_grad)
    unet.conv_in = new
    unet.register_to_config(in_channels=new_in_channels)
    return unet


def add_text_projection(unet: nn.Module, text_dim: int) -> nn.Module:
    """Map text states of width ``text_dim`` to the UNet's cross-attention width with a new linear
    layer (diffusers' ``encoder_hid_dim_type="text_proj"``); in place, config updated."""
    cad = unet.config.cross_attention_dim
    if text_dim <= 0:
        raise UserError(
            f"text_dim must be > 0 for a cross-attention UNet, got {text_dim}", "use the text encoder width"
        )
    ref = unet.conv_in.weight
    unet.encoder_hid_proj = nn.Linear(text_dim, cad, device=ref.device, dtype=ref.dtype)
    unet.register_to_config(encoder_hid_dim=text_dim, encoder_hid_dim_type="text_proj")
    return unet


@torch.no_grad()
def add_class_embedding(unet: nn.Module, num_class_embeds: int) -> nn.Module:
    """Add a zero-initialised ``nn.Embedding(num_class_embeds, time_embed_dim)`` whose rows are
    added to the timestep embedding (diffusers ``class_embed_type=None``); in place, config updated."""
    dim = unet.time_embedding.linear_2.out_features
    ref = unet.conv_in.weight
    emb = nn.Embedding(num_class_embeds, dim, device=ref.device, dtype=ref.dtype)
    emb.weight.zero_()
    unet.class_embedding = emb
    unet.register_to_config(num_class_embeds=num_class_embeds, class_embed_type=None)
    return unet
