"""``make demo``: the main job on the embedded default, end to end on a 2-core CPU in minutes.

1. **Render** a small shapes world at 32×32 (the ``compact`` design) with the world renderer (``OUT/world/{train,val}``;
   seeded and resumable, so a second run reuses it).
2. **Train** referring segmentation as InstructPix2Pix-style editing (ADDP §2: the referred object
   painted pure red, the expression as text, the image concatenated), fine-tuned from the world
   generator shipped with the package (``model.pretrained: world-generator``, the Stable Diffusion
   stand-in of :mod:`genperc.pretrain`) with the one trainer, for a
   fixed number of steps (``--steps``; the same seed gives the same model on any machine load;
   ``--minutes`` adds a machine-dependent time limit). The run's checkpoint is in ``OUT/run``.
3. **Evaluate** the saved run on held-out scenes (loaded back from ``OUT/run`` the way
   ``genperc eval`` does) and score the trivial baselines (:mod:`genperc.evaluation.baselines`)
   on the same expressions: the empty mask, every object, and the mask of every object of the
   named shape (the expression's head noun; "object" names every object) — what a model would
   output that learned only to read the shape word.
4. **Predict** on a few held-out scenes through the ``genperc predict`` path (PNG in, mask out).
5. Write ``OUT/report.html``: metrics beside the baselines, results by expression family, the
   settings, a prediction grid with the expressions, and the training curve; and
   ``OUT/metrics.json``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from genperc.config import load_config
from genperc.evaluation.baselines import head_noun_mask, trivial_baselines  # noqa: F401 (the demo's table; re-exported)

# The demo world: ``WorldConfig.preset(DEMO_WORLD)`` (see genperc.data.world.WORLD_PRESETS).
DEMO_WORLD = "compact"


def _log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pick_examples(dataset, k: int) -> list[int]:
    """Indices of ``k`` items taken in turn from each expression family, from different scenes
    where the split has enough of them."""
    by_family: dict[str, list[tuple[int, int]]] = {}
    for i in range(len(dataset)):
        item = dataset[i]
        by_family.setdefault(item["family"], []).append((i, item["meta"]["record_index"]))
    out: list[int] = []
    used: set[int] = set()
    for allow_reuse in (False, True):
        progress = True
        while len(out) < k and progress:
            progress = False
            for cands in by_family.values():
                pick = next(((i, r) for i, r in cands if i not in out and (allow_reuse or r not in used)), None)
                if pick is not None and len(out) < k:
                    out.append(pick[0])
                    used.add(pick[1])
                    progress = True
    return out


class EtaLog:
    """A trainer hook that logs progress, speed and the time left about ten times per run."""

    def __init__(self, total: int, every: int | None = None):
        self.total, self.every = total, every or max(1, total // 10)
        self.t0 = time.perf_counter()
        self.first = None

    def after_step(self, trainer) -> None:
        if self.first is None:
            self.first = trainer.step - 1
        done = trainer.step - self.first
        if trainer.step % self.every and trainer.step != self.total:
            return
        elapsed = time.perf_counter() - self.t0
        per_step = elapsed / max(done, 1)
        ips = trainer.cfg.train.batch_size * trainer.cfg.train.grad_accum / per_step
        _log(f"step {trainer.step}/{self.total} ({100 * trainer.step / self.total:.0f}%), {ips:.1f} images/s, "
             f"ETA {per_step * (self.total - trainer.step) / 60:.1f} min")


#: Training steps of ``genperc demo``: about 8 minutes on the 2-core Xeon when quiet (bf16), so that
#: install + render + train + evaluate fit in 15 minutes. The number of steps, not the time, is the
#: budget: the same seed gives the same model on a busy or a quiet machine.
DEMO_STEPS = 1500


def run_demo(out: Path, steps: int = DEMO_STEPS, minutes: float | None = None, preset: str = "demo",
             overrides: list[str] | None = None,
             train_scenes: int = 2000, val_scenes: int = 12, eval_limit: int | None = 240, examples: int = 9,
             workers: int = 2, seed: int = 0) -> dict:
    from genperc.data.sources import open_scene_source
    from genperc.data.world import WorldConfig, render_world
    from genperc.images import overlay_mask, resize_mask, save_rgb, upscale
    from genperc.inference import evaluate_run, load_run, machine_info, predict_files
    from genperc.training.trainer import Trainer

    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(preset, [f"train.seed={seed}", *(overrides or []), f"train.steps={steps}"])
    timings: dict[str, float] = {}

    # 1. data
    world_info = None
    if cfg.data.source == "world" and cfg.data.path is None:
        world = out / "world"
        _log(f"rendering the shapes world at 32x32: {train_scenes} train + {val_scenes} val scenes into {world}")
        t0 = time.perf_counter()
        render_world(world, WorldConfig.preset(DEMO_WORLD), {"train": train_scenes, "val": val_scenes}, seed=seed,
                     workers=workers)
        timings["render_s"] = time.perf_counter() - t0
        cfg = load_config(base=cfg.to_dict(), overrides=[f"data.path={world.resolve()}"])
        world_info = {"preset": DEMO_WORLD, **WorldConfig.preset(DEMO_WORLD).to_dict(), "train_scenes": train_scenes, "val_scenes": val_scenes, "seed": seed}
        _log(f"rendered in {timings['render_s']:.0f} s")

    # 2. training (a fresh run every time: an old run's checkpoints would be taken for this one's)
    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    # timestep strategy (ADDP §3.1) from train.timesteps/contributions; the hook logs the ETA
    trainer = Trainer(cfg, run_dir, hooks=[EtaLog(steps)])
    n_train = len(trainer.dataset)
    threads = torch.get_num_threads()
    _log(f"training {cfg.model.arch} for {cfg.task} on {cfg.data.source} {cfg.data.resolution}x{cfg.data.resolution}: "
         f"{steps} steps of {cfg.train.batch_size}, {trainer.precision} precision, {threads} torch thread(s)"
         + (f", stopping after {minutes:g} min (machine-dependent)" if minutes else ""))
    result = trainer.train(time_limit_s=minutes * 60 if minutes else None)
    timings["train_s"] = time.perf_counter() - t0
    _log(f"{result.step} steps ({result.step * cfg.train.batch_size} images, {n_train} training expressions), "
         f"loss {result.loss:.4f}, {result.images_per_s:.1f} images/s")
    text_encoder, trainer_precision = trainer.text_encoder, trainer.precision
    del trainer

    # 3. evaluation of the saved run, and the baselines on the same items
    t0 = time.perf_counter()
    run = load_run(run_dir, text_encoder=text_encoder)
    res = evaluate_run(run, cfg.data.val_split, limit=eval_limit, seed=seed, out=out / "eval")
    timings["eval_s"] = time.perf_counter() - t0
    val = run.task.dataset(open_scene_source(run.cfg.data, cfg.data.val_split), run.cfg.data.resolution)
    base = trivial_baselines(val, run.task, eval_limit)
    n_eval = res.settings["items"]
    _log(f"evaluated {n_eval} held-out expressions in {timings['eval_s']:.0f} s "
         f"({res.settings['sampler']} {res.settings['steps']} steps)")

    # 4. predictions on a few held-out scenes through the `genperc predict` path
    t0 = time.perf_counter()
    pred_dir = out / "predictions"
    cards = []
    for k, i in enumerate(pick_examples(val, examples)):
        item = val[i]
        rec = val.source[item["meta"]["record_index"]]
        stem = f"{k:02d}"
        image_path = save_rgb(rec.image, pred_dir / f"{stem}_input.png")
        predict_files(run, image_path, pred_dir, item["text"], seed=seed, stem=stem)
        pred_mask = torch.from_numpy(np.asarray(Image.open(pred_dir / f"{stem}_mask.png")) > 127)
        gt = item["mask"][0]
        pred_small = resize_mask(pred_mask, gt.shape)
        inter, union = float((pred_small & gt).sum()), float((pred_small | gt).sum())
        save_rgb(upscale(overlay_mask(rec.image, gt), 256), pred_dir / f"{stem}_truth.png")
        cards.append({"stem": stem, "text": item["text"], "family": item["family"],
                      "iou": inter / union if union else 0.0})
    timings["predict_s"] = time.perf_counter() - t0

    # 5. report
    curve = None
    try:
        from genperc.evaluation.report import training_curve

        curve = training_curve(run_dir / "metrics.csv", out / "training_curve.png")
    except Exception as e:  # a missing plot must not lose the numbers
        _log(f"no training curve ({e})")
    timings["total_s"] = time.perf_counter() - t_start
    report = {"model": res.summary, **base, "settings": res.settings, "train": {
        "steps": result.step, "images_per_s": result.images_per_s, "final_loss": result.loss,
        "training_expressions": n_train, "planned_steps": steps, "minutes_limit": minutes, "threads": threads,
        "precision": trainer_precision, "preset": preset, "overrides": overrides or []},
        "world": world_info,
        "timings": timings, "machine": machine_info(), "examples": cards}
    (out / "metrics.json").write_text(json.dumps(report, indent=1, default=str))
    write_report(out, report, has_curve=curve is not None)

    _log(f"held-out referring segmentation ({n_eval} expressions):")
    for name in ("model", *base):
        s = report[name]
        _log(f"  {name:<12} oIoU {s['oIoU']:.3f}  mIoU {s['mIoU']:.3f}  Prec@0.5 {s['Prec@0.5']:.3f}")
    _log(f"total {timings['total_s'] / 60:.1f} min; wrote {out / 'report.html'} and {out / 'metrics.json'}")
    return report


def write_report(out: Path, report: dict, has_curve: bool = True) -> Path:
    """``OUT/report.html`` from the demo's ``metrics.json`` content."""
    import html

    from genperc.evaluation.report import page, settings_list, table

    metrics = ["oIoU", "mIoU", "Prec@0.5", "Prec@0.6", "Prec@0.7", "Prec@0.8", "Prec@0.9"]
    names = ["model", *(n for n in ("empty mask", "all objects", "named shape") if n in report)]
    rows = [{"predictor": n, **{m: report[n][m] for m in metrics}} for n in names]
    best = {m: "max" for m in metrics}
    families = sorted({k.split("/")[0] for k in report["model"] if "/" in k})
    fam_rows = []
    for fam in families:
        for n in names:
            s = report[n]
            fam_rows.append({"family": fam, "predictor": n, "expressions": s.get(f"{fam}/n", float("nan")),
                             **{m: s.get(f"{fam}/{m}", float("nan")) for m in ("oIoU", "mIoU", "Prec@0.5")}})
    tr, st, mach = report["train"], report["settings"], report["machine"]
    t = report["timings"]
    cards = []
    for c in report["examples"]:
        imgs = "".join(f"<img src='predictions/{c['stem']}_{kind}.png' title='{kind}'>"
                       for kind in ("input", "truth", "generated", "overlay"))
        cards.append(f"<div class='card'>{imgs}<br><b>{html.escape(c['text'])}</b><br>"
                     f"<span class='muted'>{html.escape(c['family'])} · IoU {c['iou']:.2f}</span></div>")
    body = [
        f"<p>Referring segmentation as InstructPix2Pix-style editing (ADDP §2): the model repaints the referred "
        f"object pure red. <b>{tr['preset']}</b> preset, {tr['steps']} training steps in {t['train_s'] / 60:.1f} min "
        f"({tr['images_per_s']:.1f} images/s, {tr.get('precision', '?')}, {tr.get('threads', '?')} torch thread(s)) on {tr['training_expressions']} training expressions"
        + (f" of {report['world']['train_scenes']} rendered 32×32 scenes" if report.get("world") else "")
        + f"; evaluated on {st['items']} expressions of held-out scenes with {st['sampler']} {st['steps']} steps"
        f" (text guidance {st['text_scale']:g}, image guidance {st['image_scale']:g}).</p>",
        f"<p class='muted'>Machine: {mach['cpu']}, {mach['cores']} cores, GPU: {mach['gpu'] or 'none'}, "
        f"torch {mach['torch']}. Time: render {t.get('render_s', 0):.0f} s, train {t['train_s']:.0f} s, "
        f"evaluate {t['eval_s']:.0f} s, predict {t['predict_s']:.0f} s, total {t['total_s'] / 60:.1f} min.</p>",
        "<h2>Held-out metrics</h2>", table(rows, ["predictor", *metrics], bold_best=best),
        "<p class='muted'>Baselines on the same expressions: <i>empty mask</i> predicts nothing; <i>all objects</i> "
        "every object of the scene; <i>named shape</i> "
        "predicts every object of the shape the expression's head noun names (every object for \"object\").</p>",
        "<h2>By expression family</h2>", table(fam_rows, ["family", "predictor", "expressions", "oIoU", "mIoU", "Prec@0.5"]),
        "<h2>Predictions on held-out scenes</h2>",
        "<p class='muted'>Each card: input · ground truth · generated target image · predicted mask "
        "(from <code>genperc predict</code>).</p>",
        "<div class='grid'>" + "".join(cards) + "</div>",
    ]
    if has_curve:
        body += ["<h2>Training curve</h2>", "<img src='training_curve.png' alt='training loss'>"]
    body += ["<h2>Settings</h2>", settings_list({**st["task_settings"], **{k: v for k, v in st.items()
                                                                          if k not in ("task_settings", "data")}})]
    path = out / "report.html"
    path.write_text(page("genperc demo: referring segmentation on the shapes world", "\n".join(body)))
    return path
