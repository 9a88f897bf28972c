"""Where the denoiser works: pixel space (default) or the latent space of a local VAE.

An :class:`ImageSpace` turns images (float NCHW in [-1, 1], DESIGN.md) into what the denoiser sees
and back. :class:`PixelSpace` is the identity. :class:`LatentSpace` wraps a local diffusers
``AutoencoderKL`` (latent diffusion, Rombach et al. 2022): ``z = (E(x) − shift) · scaling_factor``
with both factors read from the VAE config (``shift_factor`` is absent, i.e. 0, for Stable
Diffusion 1.x/2.x), and ``x = D(z / scaling_factor + shift)``.

Encoding takes the posterior mean by default — what Marigold does for both the RGB image and the
depth map — or, with ``encode_mode="sample"``, a sample drawn from the caller's
``torch.Generator`` (DESIGN.md: no global RNG). The VAE is frozen: encode and decode run without
gradients in eval mode, on the VAE's device (move it with ``.to``); results come back on the
device and in the dtype of the input.
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from genperc.errors import UserError


@runtime_checkable
class ImageSpace(Protocol):
    """Images in [-1, 1] <-> denoiser space."""

    scale_factor: int  # spatial downsampling: encoded size = image size / scale_factor

    def channels(self, image_channels: int = 3) -> int:
        """Channels of the encoding of an image with ``image_channels`` channels."""
        ...

    def latent_shape(self, image_shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
        """Shape of the encoding of a [B, C, H, W] image batch."""
        ...

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor: ...

    def decode(self, z: Tensor, clamp: bool | None = None, *, grad: bool = False) -> Tensor:
        """Denoiser space -> images; ``clamp`` to [-1, 1] (None: the space's own default); ``grad``:
        differentiable (the discriminative loss in pixel space)."""
        ...

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> ImageSpace: ...


class PixelSpace:
    """The identity: the denoiser works on the image (or the task's target image) itself, whatever
    its channel count (3 for RGB, 1 for a depth map or a mask)."""

    scale_factor = 1

    def channels(self, image_channels: int = 3) -> int:
        return image_channels

    def latent_shape(self, image_shape) -> tuple[int, ...]:
        return tuple(image_shape)

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if images.ndim != 4:
            raise UserError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}", "pass a 4-D NCHW batch")
        return images

    def decode(self, z: Tensor, clamp: bool | None = None, *, grad: bool = False) -> Tensor:
        return z.clamp(-1, 1) if clamp else z

    def to(self, device=None, dtype=None) -> PixelSpace:
        return self

    def __repr__(self) -> str:
        return "PixelSpace()"


class LatentSpace:
    """A frozen local ``AutoencoderKL`` (a pipeline directory with ``vae/`` or the VAE folder).

    ``encode_mode``: ``"mean"`` (posterior mean, Marigold; deterministic) or ``"sample"`` (needs a
    generator). A single-channel image (depth map, mask) is replicated to the VAE's input channels
    before encoding, as Marigold does for depth; ``decode`` always returns the VAE's output channels
    (the task codec reduces them, e.g. Marigold's channel mean). ``decode`` clamps to [-1, 1] unless
    ``clamp=False``.
    """

    def __init__(
        self,
        vae_dir: str | os.PathLike,
        *,
        subfolder: str | None = "vae",
        encode_mode: str = "mean",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        clamp: bool = True,
    ):
        from genperc.models.pretrained import load_pretrained_vae

        if encode_mode not in ("mean", "sample"):
            raise UserError(f"unknown encode_mode {encode_mode!r}", "use 'mean' (Marigold) or 'sample'")
        self.vae = load_pretrained_vae(vae_dir, subfolder=subfolder)
        self.vae.requires_grad_(False).eval().to(device=device, dtype=dtype)
        cfg = self.vae.config
        self.source = str(vae_dir)
        self.encode_mode = encode_mode
        self.clamp = clamp
        self.latent_channels = int(cfg.latent_channels)
        self.image_channels = int(cfg.in_channels)
        self.scale_factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)

    def channels(self, image_channels: int = 3) -> int:
        """Every image (1 or ``image_channels`` of the VAE) encodes to ``latent_channels``."""
        return self.latent_channels

    def latent_shape(self, image_shape) -> tuple[int, ...]:
        b, _, h, w = image_shape
        return (b, self.latent_channels, h // self.scale_factor, w // self.scale_factor)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def to(self, device=None, dtype=None) -> LatentSpace:
        self.vae.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """[B, C, H, W] images in [-1, 1] -> [B, latent_channels, H/f, W/f] scaled latents."""
        if images.ndim == 4 and images.shape[1] == 1 and self.image_channels != 1:
            images = images.expand(-1, self.image_channels, -1, -1)
        _check_images(images, self.image_channels, self.scale_factor)
        posterior = self.vae.encode(images.to(self.device, self.dtype)).latent_dist
        if self.encode_mode == "mean":
            z = posterior.mean
        else:
            if generator is None:
                raise UserError(
                    "LatentSpace(encode_mode='sample') needs a torch.Generator",
                    "pass generator=... (or use encode_mode='mean')",
                )
            z = posterior.sample(generator=generator)
        return ((z - self.shift_factor) * self.scaling_factor).to(device=images.device, dtype=images.dtype)

    def decode(self, z: Tensor, clamp: bool | None = None, *, grad: bool = False) -> Tensor:
        """Scaled latents -> images, clamped to [-1, 1] if ``clamp`` (None: ``self.clamp``).

        ``grad=True`` lets gradients flow through the frozen decoder to ``z`` (the discriminative
        counterpart's loss in pixel space, Garcia et al. 2025); by default no graph is built."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise UserError(
                f"latents must be [B, {self.latent_channels}, h, w], got {tuple(z.shape)}",
                "decode what encode (or the denoiser) produced",
            )
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            x = self.vae.decode(z.to(self.device, self.dtype) / self.scaling_factor + self.shift_factor).sample
        x = x.to(device=z.device, dtype=z.dtype)
        return x.clamp(-1, 1) if (self.clamp if clamp is None else clamp) else x

    def __repr__(self) -> str:
        return (
            f"LatentSpace({self.source!r}, latent_channels={self.latent_channels}, scale_factor={self.scale_factor}, "
            f"scaling_factor={self.scaling_factor}, encode_mode={self.encode_mode!r})"
        )


def build_image_space(vae_dir: str | os.PathLike | None = None, **kwargs) -> ImageSpace:
    """Pixel space when ``vae_dir`` is empty, else the latent space of that local VAE."""
    if vae_dir in (None, "", "none", "pixel"):
        return PixelSpace()
    return LatentSpace(vae_dir, **kwargs)


def _check_images(images: Tensor, channels: int, factor: int) -> None:
    if images.ndim != 4 or images.shape[1] != channels:
        raise UserError(
            f"images must be [B, {channels}, H, W], got shape {tuple(images.shape)}",
            f"convert images to {channels} channels, NCHW",
        )
    if images.shape[-1] % factor or images.shape[-2] % factor:
        raise UserError(
            f"image size {tuple(images.shape[-2:])} is not divisible by the VAE factor {factor}",
            f"resize to a multiple of {factor}",
        )
