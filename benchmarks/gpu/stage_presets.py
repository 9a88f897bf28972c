"""Stage 4: short real runs of the gpu presets (gpu-small, gpu-depth, gpu-generalist on a rendered
shapes world; GenRep's gpu preset on the digits) through the library, each trained for a few hundred
steps and evaluated; and stage 5: ``accelerate launch`` of ``genperc train`` in a subprocess."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, Ctx, text_encoder_override

PRESETS = ("gpu-small", "gpu-depth", "gpu-generalist")
GPU = {"world": {"train": 1024, "val": 128}, "resolution": 64, "steps": 300, "time_limit_s": 20, "eval_items": 64,
       "eval_steps": 10, "overrides": []}
SMOKE = {"world": {"train": 6, "val": 4}, "resolution": 32, "steps": 2, "time_limit_s": 30, "eval_items": 4,
         "eval_steps": 2, "overrides": ["model.arch=unet-tiny", "model.sample_size=32", "data.resolution=32",
                                        "train.batch_size=4", "data.num_workers=0", "sample.batch_size=4"]}
GENREP_GPU = [f"task_options.genrep.{k}" for k in (
    "stages.pretrain_steps=300", "stages.perception_steps=100", "stages.unified_steps=100", "posterior.steps=40",
    "posterior.burn_in=10", "posterior.subset=512", "eval.sample_steps=20")] + ["train.log_every=50"]
GENREP_SMOKE = [f"task_options.genrep.{k}" for k in (
    "stages.pretrain_steps=3", "stages.perception_steps=2", "stages.unified_steps=2", "posterior.steps=8",
    "posterior.burn_in=2", "posterior.subset=10", "heads.width=16")] + [
    "train.batch_size=8", "train.log_every=1", "train.warmup_steps=0", "data.resolution=8", "data.options={size: 8}",
    "model.sample_size=8"]


def world(ctx: Ctx) -> dict:
    """Render a shapes world (scalar_rgb on every core: the data, not the renderer, is measured here)."""
    from genperc.data.world.render_job import render_split
    from genperc.data.world.scene import WorldConfig

    sizes = SMOKE if ctx.smoke else GPU
    path = ctx.work / "world"
    t0 = time.time()
    for split, n in sizes["world"].items():
        render_split(path, WorldConfig(resolution=sizes["resolution"], variant="scalar_rgb"), split=split, scenes=n,
                     seed=0 if split == "train" else 1, workers=min(os.cpu_count() or 1, 16), progress=False)
    return {"path": str(path), **sizes["world"], "resolution": sizes["resolution"], "variant": "scalar_rgb",
            "workers": min(os.cpu_count() or 1, 16), "seconds": round(time.time() - t0, 1)}


def _metrics_rows(run_dir: Path) -> list[dict]:
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def _preset(ctx: Ctx, preset: str, data: Path, text_encoder: str) -> dict:
    from genperc.config import load_config
    from genperc.inference import evaluate_run, load_run
    from genperc.training.trainer import Trainer

    sizes = SMOKE if ctx.smoke else GPU
    run_dir = ctx.work / "runs" / preset
    over = [f"data.path={data}", f"train.steps={sizes['steps']}", f"train.checkpoint_every={sizes['steps']}",
            "train.progress=false", "train.log_every=10", f"model.text_encoder={text_encoder}", *sizes["overrides"]]
    cfg = load_config(preset, over)
    t0 = time.time()
    trainer = Trainer(cfg, run_dir)
    build_s = time.time() - t0
    res = trainer.train(time_limit_s=sizes["time_limit_s"])
    train_s = time.time() - t0 - build_s
    rows = _metrics_rows(run_dir)
    first_loss = float(rows[0]["loss"]) if rows else float("nan")
    t1 = time.time()
    run = load_run(run_dir, device=ctx.device)
    ev = evaluate_run(run, "val", limit=sizes["eval_items"], steps=sizes["eval_steps"])
    eval_s = time.time() - t1
    return {"task": cfg.task, "arch": cfg.model.arch, "pixels": cfg.data.resolution, "batch": cfg.train.batch_size,
            "precision": trainer.precision, "steps": res.step, "build_s": round(build_s, 1),
            "train_s": round(train_s, 1), "train_images_per_s": round(res.images_per_s, 1),
            "loss_first_logged": round(first_loss, 4), "loss_last": round(res.loss, 4),
            "eval_items": sizes["eval_items"], "eval_sample_steps": sizes["eval_steps"], "eval_s": round(eval_s, 1),
            "eval_images_per_s": round(sizes["eval_items"] / eval_s, 2),
            "metrics": {k: round(v, 4) if isinstance(v, float) else v for k, v in ev.summary.items()}}


def _genrep(ctx: Ctx) -> dict:
    import copy

    from genperc import build
    from genperc.evaluation.genrep import evaluate_genrep
    from genperc.experiments.genrep import base_config
    from genperc.training.genrep import GenRepConfig, train_genrep
    from genperc.training.genrep.stages import open_split

    cfg = base_config("digits", "gpu", GENREP_SMOKE if ctx.smoke else GENREP_GPU, None)
    gcfg = GenRepConfig.from_run(cfg)
    task = build.build_task(cfg)
    eval_ds = task.dataset(open_split(cfg, cfg.data.val_split), cfg.data.resolution)
    t0 = time.time()
    res = train_genrep(cfg, ctx.work / "runs" / "genrep-gpu", gcfg=gcfg, log=lambda m: print(f"[genrep] {m}", flush=True))
    train_s = time.time() - t0
    ev = copy.deepcopy(gcfg.eval)
    ev.generation = False  # FID needs its feature network trained first (the experiment's); sampling: stage 3
    t1 = time.time()
    metrics = evaluate_genrep(res.model, eval_ds, schedule=build.build_schedule(cfg), num_classes=task.num_classes,
                              cfg=ev)
    return {"preset": "genrep-gpu (digits)", "arch": cfg.model.arch, "pixels": cfg.data.resolution,
            "batch": cfg.train.batch_size, "stages": {k: v for k, v in gcfg.stages.__dict__.items() if "steps" in k},
            "train_s": round(train_s, 1), "timing": res.timing, "eval_s": round(time.time() - t1, 1),
            "eval_images": len(eval_ds),
            "metrics": {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}}


def presets(ctx: Ctx) -> dict:
    text_encoder, what = text_encoder_override(ctx.work, ctx.smoke)
    ctx.result["text_encoder"] = what
    info = ctx.part("world_data", lambda: world(ctx), need_s=5.0)
    data = Path(info["path"]) if info else None
    for preset in PRESETS:
        if data is None:
            ctx.result[preset] = {"skipped": "no world data (see world_data)"}
            continue
        ctx.part(preset, lambda p=preset: _preset(ctx, p, data, text_encoder), need_s=5.0 if ctx.smoke else 25.0)
    ctx.part("genrep-gpu", lambda: _genrep(ctx), need_s=10.0 if ctx.smoke else 45.0)
    return ctx.result


# --------------------------------------------------------------------------- stage 5


def accelerate(ctx: Ctx) -> dict:
    """``accelerate launch --num_processes 1 -m genperc.cli train`` (the path multi-GPU users take)."""
    sizes = SMOKE if ctx.smoke else GPU
    data = ctx.work / "world"
    if not (data / "train" / "manifest.json").is_file():
        ctx.part("world_data", lambda: world(ctx), need_s=5.0)
    text_encoder, what = text_encoder_override(ctx.work, ctx.smoke)
    run_dir = ctx.work / "runs" / "accelerate-gpu-small"
    steps = 2 if ctx.smoke else 100
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "bf16" if ctx.cuda else "no", "--dynamo_backend", "no",
           *([] if ctx.cuda else ["--cpu"]), "-m", "genperc.cli",
           *(["--threads", "1"] if ctx.smoke else []), "train", "--preset", "gpu-small", "-o", str(run_dir),
           f"data.path={data}", f"train.steps={steps}", f"train.checkpoint_every={steps}", "train.log_every=10",
           f"model.text_encoder={text_encoder}", *sizes["overrides"]]
    ctx.result.update(command=" ".join(cmd[1:]), text_encoder=what)
    ctx.save()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(ctx.left() - 5, 10), env=env)
    print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n", flush=True)
    ctx.result.update(returncode=proc.returncode, seconds=round(time.time() - t0, 1))
    if proc.returncode != 0:
        raise RuntimeError(f"accelerate launch exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    rows = _metrics_rows(run_dir)
    ckpts = sorted((run_dir / "checkpoints").glob("step-*"))
    line = next((ln for ln in proc.stderr.splitlines() if "[genperc] training" in ln), "")
    ctx.result.update(steps=int(rows[-1]["step"]), train_images_per_s=round(float(rows[-1]["images_per_s"]), 1),
                      checkpoint=ckpts[-1].name if ckpts else None, trainer_line=line.strip(),
                      state=json.loads((ckpts[-1] / "state.json").read_text()) if ckpts else None)
    return ctx.result
