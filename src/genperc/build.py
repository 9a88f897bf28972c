"""Assemble a run's parts from its config: task, data, image space, text encoder, denoiser.

Training, evaluation and prediction all build through here so that a run directory (its
``config.yaml`` plus a checkpoint) is all ``genperc predict`` needs.
"""

from __future__ import annotations

from pathlib import Path

from genperc.config import RunConfig
from genperc.diffusion.schedule import NoiseSchedule
from genperc.tasks import Task, create_task


def build_task(cfg: RunConfig) -> Task:
    """The task codec with its options, the ADDP augmentation intensity and the schedule length."""
    task = create_task(cfg.task, **cfg.task_options)
    task.augment_intensity = cfg.train.augment
    task.num_train_timesteps = cfg.diffusion.num_train_timesteps
    return task


def build_schedule(cfg: RunConfig) -> NoiseSchedule:
    return NoiseSchedule(cfg.diffusion)


def build_space(cfg: RunConfig):
    """Pixel space by default; latent space when ``model.vae`` names a local VAE directory."""
    from genperc.models.latent import LatentSpace, PixelSpace

    return LatentSpace(cfg.model.vae) if cfg.model.vae else PixelSpace()


def build_text_encoder(cfg: RunConfig, task: Task):
    """The cached text encoder, or None for tasks without text or ``model.text_encoder=none``."""
    if not task.uses_text or cfg.model.text_encoder == "none":
        return None
    from genperc.models.text import build_text_encoder as _build

    return _build(cfg.model.text_encoder, cache=True, max_length=cfg.model.text_max_length)


def build_model(cfg: RunConfig, task: Task, space, text_encoder):
    """A fresh denoiser of the registered architecture ``model.arch``, or a pretrained local diffusers UNet widened for the task."""
    from genperc.models.denoiser import Denoiser
    from genperc.models.registry import create_denoiser

    target_ch = space.channels(task.target_channels)
    cond_ch = space.channels(task.cond_channels) if task.cond_channels else 0
    text_dim = text_encoder.dim if text_encoder is not None else 0
    size = cfg.model.sample_size // space.scale_factor
    ddae = ddae_options(cfg)
    if cfg.model.pretrained:
        return Denoiser.from_diffusers(cfg.model.pretrained, cond_channels=cond_ch, text_dim=text_dim,
                                       widen_mode=getattr(task, "widen_mode", "zero"), seed=cfg.train.seed, **ddae)
    return create_denoiser(
        cfg.model.arch,
        sample_size=size,
        in_channels=target_ch,
        cond_channels=cond_ch,
        text_dim=text_dim,
        num_classes=getattr(task, "num_classes", 0),
        learned_variance=cfg.diffusion.learned_variance,
        seed=cfg.train.seed,
        **ddae,
    )


def ddae_options(cfg: RunConfig) -> dict:
    """The denoiser's DDAE++ fields from ``model.self_conditioning`` and ``train.contrastive`` (None = off)."""
    from dataclasses import asdict

    from genperc.models.selfcond import AUGMENT_DIM

    sc, c = cfg.model.self_conditioning, cfg.train.contrastive
    heads = None
    if c.enabled:
        heads = {"hidden": c.hidden, "proj_dim": c.proj_dim, "pred_dim": c.pred_dim,
                 "aug_dim": AUGMENT_DIM if c.aug_cond else 0}
    return {"self_conditioning": asdict(sc) if sc.enabled else None, "contrastive_heads": heads}


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The newest published checkpoint directory of a run (unchecked: see :func:`genperc.checkpoints.choose`)."""
    from genperc.checkpoints import listing

    return listing(run_dir)[0]
