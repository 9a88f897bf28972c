"""``make demo``: the main job on the embedded default, end to end on a CPU in minutes.

Trains the ``cpu-tiny`` preset (referring segmentation as InstructPix2Pix-style editing, ADDP §2)
on the instant toy shapes for a time budget, evaluates it on held-out scenes with the sampler, and
prints what it learned beside two trivial baselines computed on the same split: the empty mask,
and the mask of every object of the named shape.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from genperc.config import load_config
from genperc.data.sources import open_scene_source
from genperc.evaluation.evaluate import evaluate
from genperc.training.trainer import Trainer


def trivial_baselines(dataset, task, limit: int) -> dict[str, dict[str, float]]:
    """Score two trivial predictors on the first ``limit`` items: the empty mask, and the mask of
    every object whose shape the expression names (what a model that ignores everything but the
    shape word would produce)."""
    from genperc.data.transforms import plan_resize

    per: dict[str, dict[str, list]] = {"empty": {}, "named shape": {}}
    for i in range(min(limit, len(dataset))):
        item = dataset[i]
        rec = dataset.source[item["meta"]["record_index"]]
        plan = plan_resize(rec.image.shape[:2], dataset.resolution, dataset.fit)
        words = set(item["text"].split())
        named = plan.labels(rec.object_mask([o.id for o in rec.objects if o.category in words]))
        batch = {"mask": item["mask"][None]}
        preds = {"empty": torch.zeros_like(batch["mask"]), "named shape": torch.from_numpy(named)[None, None]}
        for name, pred in preds.items():
            for k, v in task.metrics(pred, batch).items():
                per[name].setdefault(k, []).append(v)
    return {name: task.summarize({k: torch.cat(v) for k, v in d.items()}) for name, d in per.items()}


def run_demo(out: Path, minutes: float = 1.0, preset: str = "cpu-tiny", overrides: list[str] | None = None) -> dict:
    out = Path(out)
    cfg = load_config(preset, overrides)
    print(f"[demo] training {cfg.model.preset} for {cfg.task} on the {cfg.data.source} data for {minutes:g} min")
    trainer = Trainer(cfg, out / "run")
    result = trainer.train(time_limit_s=minutes * 60)
    print(f"[demo] {result.step} steps, loss {result.loss:.4f}, {result.images_per_s:.1f} images/s")

    val = trainer.task.dataset(open_scene_source(cfg.data, cfg.data.val_split), cfg.data.resolution)
    model = trainer.unwrapped
    if trainer.ema is not None:
        trainer.ema.copy_to(model.parameters())
    res = evaluate(model, trainer.task, val, schedule=trainer.schedule, space=trainer.space,
                   text_encoder=trainer.text_encoder, sample_cfg=cfg.sample, device=trainer.accelerator.device,
                   limit=128)
    base = trivial_baselines(val, trainer.task, limit=128)
    report = {"model": res.summary, **base, "settings": trainer.task.settings(), "steps": result.step,
              "sampler": cfg.sample.sampler, "sample_steps": cfg.sample.steps}
    (out / "metrics.json").write_text(json.dumps(report, indent=1))
    print(f"[demo] held-out referring segmentation ({min(128, len(val))} expressions, "
          f"{cfg.sample.sampler} {cfg.sample.steps} steps):")
    for name in ("model", *base):
        s = report[name]
        print(f"  {name:<12} oIoU {s['oIoU']:.3f}  mIoU {s['mIoU']:.3f}  Prec@0.5 {s['Prec@0.5']:.3f}")
    print(f"[demo] wrote {out / 'metrics.json'}")
    return report
