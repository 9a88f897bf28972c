"""``genperc pretrain``: a world generator, the shapes world's stand-in for Stable Diffusion (issue 12).

ADDP (§4), Marigold (§3.3) and InstructPix2Pix (§3.4) all start from a text-to-image model and
fine-tune it into a perception model, widening its input layer for the condition image. This
module builds that starting point on the world itself:

1. **Render** the world's training scenes (``OUT/world/{train,val}``, a :data:`WORLD_PRESETS`
   design; resumable) unless ``world_path`` names a rendered world.
2. **Train** text-to-image generation on the scenes' captions
   (:class:`genperc.tasks.caption.CaptionTask`, preset ``world-generator``) with the one trainer,
   into ``OUT/run`` (resumable).
3. **Export** the denoiser's EMA UNet as a diffusers folder, ``OUT/generator/unet/`` (``config.json``
   + ``diffusion_pytorch_model.safetensors``), with ``OUT/generator/generator.json`` recording how
   it was made and the weights' sha256. Any preset fine-tunes from it with
   ``model.pretrained=OUT/generator`` through :meth:`genperc.models.denoiser.Denoiser.from_diffusers`,
   exactly as it would from a Stable Diffusion folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from genperc.config import check_same_run, load_config
from genperc.errors import UserError

GENERATOR_PRESET = "world-generator"


def _log(msg: str) -> None:
    print(f"[pretrain {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def export_generator(run_dir: str | Path, dest: str | Path, *, weights: str = "ema") -> dict:
    """Write a trained text-to-image run's UNet as a diffusers folder ``dest/unet`` and return
    ``dest/generator.json``'s record (the source run, step, weights and the safetensors' sha256).

    Only a UNet without an image condition, classes or learned variance is a generator that
    :meth:`~genperc.models.denoiser.Denoiser.from_diffusers` can widen for a task."""
    from genperc.inference import load_run
    from genperc.models.text import sha256_file

    run = load_run(run_dir, weights=weights, device="cpu")
    model = run.model
    c = model.config
    if c.backbone != "unet" or c.cond_channels or c.num_classes or c.learned_variance or not c.text_dim:
        raise UserError(f"{run_dir} is not a text-to-image UNet run (backbone {c.backbone}, cond_channels "
                        f"{c.cond_channels}, classes {c.num_classes}, text_dim {c.text_dim})",
                        f"pretrain with the {GENERATOR_PRESET} preset (task caption, a unet-* arch, text)")
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model.backbone.save_pretrained(tmp / "unet", safe_serialization=True)
    weights_file = tmp / "unet" / "diffusion_pytorch_model.safetensors"
    record = {"format": "diffusers UNet2DConditionModel (genperc world generator)",
              "source_run": str(Path(run_dir).resolve()), "checkpoint": str(run.checkpoint), "weights": weights,
              "arch": c.arch, "text_encoder": run.cfg.model.text_encoder, "sample_size": c.sample_size,
              "prediction_type": run.cfg.diffusion.prediction_type,
              "unet_sha256": sha256_file(weights_file), "unet_bytes": weights_file.stat().st_size}
    (tmp / "generator.json").write_text(json.dumps(record, indent=1) + "\n")
    if dest.exists():
        import shutil

        shutil.rmtree(dest)
    tmp.replace(dest)
    return record


def pretrain(out: str | Path, *, steps: int | None = None, world: str = "compact", world_path: str | Path | None = None,
             train_scenes: int = 4000, val_scenes: int = 50, preset: str = GENERATOR_PRESET,
             overrides: list[str] | None = None, seed: int = 0, workers: int = 2, eval_limit: int = 64) -> dict:
    """Render, train, evaluate and export a world generator into ``out`` (module docstring).
    Returns ``generator.json``'s record plus the held-out ``colour_overlap``."""
    from genperc.inference import evaluate_run, load_run
    from genperc.training.trainer import Trainer

    out = Path(out)
    root = Path(world_path) if world_path else out / "world"
    if world_path is None:
        from genperc.data.world import WorldConfig, render_world

        render_world(root, WorldConfig.preset(world), {"train": train_scenes, "val": val_scenes}, seed=seed,
                     workers=workers, log=_log)
    elif not (root / "train").is_dir():
        raise UserError(f"no train split in {root}", "pass a world rendered by `genperc data render` (OUT/train)")
    extra = [f"data.path={root.resolve()}", f"train.seed={seed}", *(overrides or [])]
    if steps is not None:
        extra.append(f"train.steps={steps}")
    cfg = load_config(preset, extra)
    if cfg.task != "caption":
        raise UserError(f"preset {preset!r} trains task {cfg.task!r}, not caption", f"use --preset {GENERATOR_PRESET}")
    run_dir = out / "run"
    resume = bool(list((run_dir / "checkpoints").glob("step-*")))
    if resume:
        check_same_run(run_dir, cfg, "use another --out, or the options and overrides it was trained with")
    _log(f"training text-to-image on scene captions: {cfg.train.steps} steps of {cfg.model.arch} → {run_dir}")
    Trainer(cfg, run_dir).train(resume=resume, overwrite=not resume)
    record = export_generator(run_dir, out / "generator")
    if (root / "val").is_dir():
        evaluation = evaluate_run(load_run(run_dir), split="val", limit=eval_limit)
        record["val_colour_overlap"] = evaluation.summary["colour_overlap"]
        record["val_items"] = evaluation.summary.get("items", eval_limit)
    record.update({"world": world if world_path is None else str(root), "steps": cfg.train.steps, "seed": seed})
    (out / "generator" / "generator.json").write_text(json.dumps(record, indent=1) + "\n")
    _log(f"generator → {out / 'generator'} (unet sha256 {record['unet_sha256'][:16]}…); "
         f"fine-tune with model.pretrained={out / 'generator'}")
    return record
