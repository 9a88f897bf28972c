"""``genperc experiment addp``: ADDP's ablations (seed 001, Table 5, Fig. 7 and Fig. 8) on the shapes
world, with mean ± std over seeds.

What runs (all under ``--out``; every run is reused when its ``result.json`` exists and resumed
from its last checkpoint otherwise, so an interrupted experiment goes on where it stopped):

* ``data/world/{train,val,test}``: one rendered world (seeded); ``val`` only estimates the
  perception c_t², ``test`` scores every run — no choice is made on the scores of ``val``.
* **(a) Table 5, timestep strategies** at equal data and compute (same scenes, steps, batch and
  seed per seed; only ``train.timesteps`` / ``train.contributions`` differ):
  ``uniform``; ``loss-diffusion`` (loss × c_t² from the diffusion formulation, Eq. 3);
  ``prob-diffusion`` (t ~ Multinomial(c_t²), diffusion c_t²); ``prob-perception`` (t ~
  Multinomial(c_t²) with c_t² estimated by the cumulative-R² procedure of §3.1 from *that seed's*
  uniform model on ``val`` — :func:`genperc.evaluation.contributions.perception_contributions`);
  optionally ``prob-authors`` (the authors' released table for the task).
* **(b) Fig. 8, augmentation intensity** 0 / 0.5 / 1 / 2 (``train.augment``, §3.2) on top of the
  strategy with the best mean main metric in (a); intensity 0 is that strategy's run itself.
* **Anchors** (issue 12), rows of Table 5 and of the Fig. 8 table, scored on the same test items:
  the **discriminative counterpart** ``discriminative`` at every seed (ADDP Table 2: the base
  config with ``model.mode=discriminative`` — same denoiser, data, steps × batch, no timestep
  strategy or augmentation — trained with the task's own loss, one forward pass at t = T−1; left
  out by ``discriminative=False`` / ``--no-discriminative``; never a candidate for the best
  strategy nor a per-step curve) and the task's **trivial baselines**
  (:mod:`genperc.evaluation.baselines`, fitted on the train split), scored once, not per seed —
  they do not train — into ``results["baselines"]``.
* **Fig. 7, per-step curves**: every generative run is scored at every denoising step in one sampling run
  (:func:`genperc.evaluation.trajectory.step_metrics`); its last step is the run's table entry
  (the same noise as ``genperc eval`` with the same seed). ``curves.png`` draws the split-level
  main metric (oIoU / AbsRel) against t for every strategy and intensity, ``before_after.png``
  the uniform model against the final one (best strategy at the best intensity).

Independent runs go to ``--workers`` processes of ``--threads`` torch threads each (two
single-thread workers is fastest on a small shared CPU). ``tables.md`` and ``results.json`` are
written at the end of every phase.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from genperc.atomic import atomic_write_text
from genperc.config import load_config
from genperc.errors import UserError
from genperc.experiments.common import fmt_mean_std, machine_line

TASKS = ("referring", "depth")
#: name → (train.timesteps, train.contributions, label); None = the seed's perception estimate
STRATEGIES = {
    "uniform": ("uniform", "diffusion", "uniform"),
    "loss-diffusion": ("loss-scaling", "diffusion", "loss scaling, diffusion c²"),
    "prob-diffusion": ("prob-scaling", "diffusion", "probability scaling, diffusion c²"),
    "prob-perception": ("prob-scaling", None, "probability scaling, perception c²"),
    "prob-authors": ("prob-scaling", "authors", "probability scaling, the authors' table"),
}
TABLE5 = ("uniform", "loss-diffusion", "prob-diffusion", "prob-perception")
#: the discriminative counterpart's run name and table row (ADDP Table 2's comparison)
DISCRIMINATIVE = "discriminative"
DISCRIMINATIVE_LABEL = "discriminative counterpart (one forward pass)"
INTENSITIES = (0.0, 0.5, 1.0, 2.0)
#: RefCOCO val oIoU of Table 5 (SD 1.5 InstructPix2Pix, 20-epoch ablation; REFERENCE.md)
PAPER_TABLE5 = {"uniform": 56.42, "loss-diffusion": 58.21, "prob-diffusion": 63.05, "prob-perception": 64.00}
#: the columns of each task's tables: (metric key, label, scale, digits)
COLUMNS = {"referring": (("oIoU", "oIoU (%) ↑", 100, 1), ("mIoU", "mIoU (%) ↑", 100, 1),
                         ("Prec@0.5", "Prec@0.5 (%) ↑", 100, 1)),
           "depth": (("AbsRel", "AbsRel (%) ↓", 100, 2), ("delta1", "δ1 (%) ↑", 100, 1), ("RMSE", "RMSE (m) ↓", 1, 3))}

#: The world of the experiment (``WorldConfig.preset``): the demo's. The README's tables were measured
#: on the ``demo`` world before issue 12; ``compact`` is the 32 px design of issue 12.
WORLD = "compact"


@dataclass
class ExperimentSize:
    """How big one (task, size) experiment is: the YAML config preset its runs start from, the
    world, the run length and the evaluation."""

    config: str
    resolution: int
    scenes: dict  # split → rendered scenes
    steps: int
    batch_size: int
    eval_items: int  # test items scored per run
    calib_items: int  # val items of the perception c² estimate
    spp: int = 8
    workers: int = 1
    threads: int = 0
    overrides: list = field(default_factory=list)


# CPU: 2 single-thread workers on this 2-core machine, ~1 h for the 21 runs of 3 seeds.
# GPU: one process, sized for a 10-minute device run (an estimate: not measured, no GPU was lent).
SIZES = {
    ("referring", "cpu"): ExperimentSize("demo", 32, {"train": 1000, "val": 40, "test": 40}, steps=400, batch_size=16,
                                 eval_items=160, calib_items=128, workers=2, threads=1,
                                 overrides=["train.lr=1e-3", "sample.steps=10"]),
    ("depth", "cpu"): ExperimentSize("cpu-depth", 32, {"train": 1000, "val": 128, "test": 128}, steps=400, batch_size=16,
                             eval_items=128, calib_items=128, workers=2, threads=1,
                             overrides=["train.lr=1e-3", "sample.steps=10"]),
    ("referring", "gpu"): ExperimentSize("gpu-small", 64, {"train": 6000, "val": 100, "test": 200}, steps=1500, batch_size=64,
                                 eval_items=500, calib_items=256, spp=16,
                                 overrides=["sample.sampler=euler-a", "sample.steps=20", "sample.text_scale=3.0",
                                            "sample.image_scale=1.5"]),
    ("depth", "gpu"): ExperimentSize("gpu-depth", 64, {"train": 6000, "val": 256, "test": 256}, steps=1500, batch_size=64,
                             eval_items=256, calib_items=256, spp=16, overrides=["sample.steps=20"]),
}


def size_for(task: str, size: str) -> ExperimentSize:
    """The :data:`SIZES` entry of (task, size)."""
    if task not in TASKS:
        raise UserError(f"unknown task {task!r} for the ADDP experiment", f"use one of {', '.join(TASKS)}")
    if (task, size) not in SIZES:
        raise UserError(f"unknown experiment size {size!r}", "use --size cpu or --size gpu")
    return SIZES[(task, size)]


def render_world(root: Path, spec: ExperimentSize, seed: int = 0, log=print) -> Path:
    """The experiment's world: train / val / test splits (resumable, deterministic)."""
    from genperc.data.world import WorldConfig, render_world

    config = WorldConfig.preset(WORLD, resolution=spec.resolution, spp=spec.spp)
    return render_world(root, config, spec.scenes, seed=seed, workers=max(1, min(os.cpu_count() or 1, 4)), log=log)


def base_config(task: str, spec: ExperimentSize, world: Path, overrides: list[str]):
    """The config every run of the experiment starts from (before its strategy and seed)."""
    keys = [f"task={task}", "data.source=world", f"data.path={world.resolve()}", f"data.resolution={spec.resolution}",
            f"model.sample_size={spec.resolution}", "data.val_split=val", f"train.steps={spec.steps}",
            f"train.batch_size={spec.batch_size}", "train.progress=false", "train.augment=0",
            f"train.checkpoint_every={max(50, spec.steps // 4)}", "train.keep_checkpoints=1"]
    return load_config(spec.config, keys + list(spec.overrides) + list(overrides))


def eval_indices(n: int, k: int, seed: int) -> list[int]:
    """A fixed random subset of ``k`` of ``n`` items, spread over the split's scenes, in order."""
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[: min(k, n)].tolist())


# --------------------------------------------------------------------------------------------
# one run (executed in a worker process)

_TEXT_ENCODERS: dict = {}


def _text_encoder(cfg, task):
    """One text encoder per worker process (loading MiniLM costs seconds; its cache is shared)."""
    from genperc import build

    key = cfg.model.text_encoder
    if key not in _TEXT_ENCODERS:
        _TEXT_ENCODERS[key] = build.build_text_encoder(cfg, task)
    return _TEXT_ENCODERS[key]


def _init_worker(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def _items(run, split: str, indices: list[int]):
    """The items ``indices`` of the run's ``split`` (those that exist), as a ``Subset``."""
    from torch.utils.data import Subset

    from genperc.data.sources import open_scene_source

    dataset = run.task.dataset(open_scene_source(run.cfg.data, split), run.cfg.data.resolution)
    return Subset(dataset, [i for i in indices if i < len(dataset)])


def _step_scores(run, split: str, indices: list[int], seed: int):
    """Per-step metrics of ``indices`` of ``split`` and the split-level summary at every step."""
    from genperc.evaluation.trajectory import step_metrics

    subset = _items(run, split, indices)
    scores = step_metrics(run.model, run.task, subset, schedule=run.schedule, space=run.space,
                          text_encoder=run.text_encoder, sample_cfg=run.cfg.sample, seed=seed, device=run.device)
    per_step = [run.task.summarize({**{k: v[:, j] for k, v in scores.values.items()}, **scores.labels})
                for j in range(len(scores.timesteps))]
    return scores, per_step


def run_job(job: dict) -> dict:
    """Train one run (resuming it when it has a checkpoint), score it at every denoising step on the
    test items, and (``job["calibrate"]``) estimate its perception c_t² on the val items. Returns
    and writes ``RUN/result.json``; a finished run is only completed by a missing estimate."""
    from genperc.inference import load_run

    run_dir = Path(job["run_dir"])
    done = run_dir / "result.json"
    if done.is_file():
        result = json.loads(done.read_text())
        if not job.get("calibrate") or "perception_c2" in result:
            return result
        return _save_result(done, result | {"perception_c2": _try_calibrate(load_run(run_dir), job)})
    cfg = load_config(base=job["config"])
    trained, text_encoder, train_s = _train(cfg, run_dir)
    run = load_run(run_dir, text_encoder=text_encoder)
    result = _score_on_test(run, job) | {
        "name": job["name"], "seed": job["seed"], "train_s": train_s, "steps": trained.step,
        "images_per_s": trained.images_per_s, "final_loss": trained.loss, "threads": torch.get_num_threads(),
        "timesteps_strategy": cfg.train.timesteps, "contributions": cfg.train.contributions,
        "augment": cfg.train.augment, "mode": cfg.model.mode}
    if job.get("calibrate"):
        result["perception_c2"] = _try_calibrate(run, job)
    return _save_result(done, result)


def _train(cfg, run_dir: Path):
    """Train (or resume) the run; its training result, the text encoder and the seconds it took."""
    from genperc import build
    from genperc.training.trainer import Trainer

    task = build.build_task(cfg)
    text_encoder = _text_encoder(cfg, task)
    start = time.perf_counter()
    trainer = Trainer(cfg, run_dir, task=task, text_encoder=text_encoder)
    resume = bool(list((run_dir / "checkpoints").glob("step-*")))
    trained = trainer.train(resume=resume, overwrite=not resume)  # no checkpoint yet: start it over
    return trained, text_encoder, time.perf_counter() - start


def _score_on_test(run, job: dict) -> dict:
    """The run's split-level summary at every denoising step on the job's test items (the last
    step is the table entry); the per-sample matrices go to ``RUN/steps``. A discriminative run
    has one step: :func:`_score_discriminative`."""
    from genperc.evaluation.trajectory import write_step_metrics

    if run.mode == "discriminative":
        return _score_discriminative(run, job)
    start = time.perf_counter()
    scores, per_step = _step_scores(run, job["eval_split"], job["eval_indices"], job["eval_seed"])
    eval_s = time.perf_counter() - start
    write_step_metrics(scores, Path(job["run_dir"]) / "steps", {"split": job["eval_split"], "task": run.task.name})
    return {"summary": per_step[-1], "timesteps": scores.timesteps.tolist(), "per_step": per_step, "eval_s": eval_s}


def _score_discriminative(run, job: dict) -> dict:
    """A discriminative run on the job's test items: the normal evaluation (one forward pass, no
    sampler; :func:`genperc.evaluation.evaluate.evaluate`), its summary also the one entry of
    ``per_step`` at the one timestep t = T−1; the per-item rows go to ``RUN/test/samples.csv``."""
    from genperc.evaluation.evaluate import evaluate
    from genperc.models.discriminative import discriminative_timestep

    start = time.perf_counter()
    res = evaluate(run.model, run.task, _items(run, job["eval_split"], job["eval_indices"]), schedule=run.schedule,
                   space=run.space, text_encoder=run.text_encoder, sample_cfg=run.cfg.sample, device=run.device,
                   seed=job["eval_seed"], mode=run.mode)
    eval_s = time.perf_counter() - start
    res.write_csv(Path(job["run_dir"]) / "test" / "samples.csv")
    return {"summary": res.summary, "timesteps": [discriminative_timestep(run.schedule)], "per_step": [res.summary],
            "eval_s": eval_s}


def _save_result(path: Path, result: dict) -> dict:
    atomic_write_text(path, json.dumps(result, indent=1, default=float))
    return result


def _try_calibrate(run, job: dict) -> dict:
    try:
        return _calibrate(run, job)
    except UserError as e:  # e.g. a model so weak that every final IoU is 0: keep the run's scores
        return {"error": str(e)}


def _calibrate(run, job: dict) -> dict:
    """Perception c_t² of this (uniform) model: per-step metric of the val items, cumulative R²
    (ADDP §3.1) → ``RUN/contributions/c.json`` and its plot against the diffusion c² and the
    authors' table."""
    from genperc.diffusion.timesteps import AUTHOR_TABLES as C_TABLES
    from genperc.diffusion.timesteps import diffusion_contributions
    from genperc.evaluation.contributions import perception_contributions, plot_contributions, write_contributions
    from genperc.evaluation.trajectory import write_step_metrics

    out = Path(job["run_dir"]) / "contributions"
    scores, _ = _step_scores(run, "val", job["calib_indices"], job["eval_seed"])
    write_step_metrics(scores, out / "trajectory-val", {"split": "val", "task": run.task.name,
                                                        "T": run.schedule.num_train_timesteps})
    estimate = perception_contributions(scores.matrix, scores.timesteps, bins=10, T=run.schedule.num_train_timesteps)
    path = write_contributions(estimate, out / "c.json", source=str(out / "trajectory-val"), metric=scores.metric)
    authors = C_TABLES.get(f"addp-{run.task.name}")
    compare = {"diffusion c²": diffusion_contributions(run.schedule, bins=10)}
    if authors is not None:
        compare["authors' table"] = authors
    plot_contributions(estimate, out / "c.png", compare=compare)
    return {"path": str(path), "factors": estimate.factors.tolist(), "explained": estimate.explained,
            "metric": scores.metric, "samples": estimate.n_samples, "notes": list(estimate.notes)}


# --------------------------------------------------------------------------------------------
# the experiment


def _strategy_overrides(name: str, task: str, c_path: str | None) -> list[str]:
    timesteps, contributions, _ = STRATEGIES[name]
    if contributions is None:
        contributions = c_path
    elif contributions == "authors":
        contributions = f"addp-{task}"
    return [f"train.timesteps={timesteps}", f"train.contributions={contributions}"]


def parse_strategies(strategies: str) -> list[str]:
    """The comma-separated strategy names, checked (prob-perception needs the uniform run)."""
    names = [s.strip() for s in strategies.split(",") if s.strip()]
    bad = [s for s in names if s not in STRATEGIES]
    if bad:
        raise UserError(f"unknown strategy {bad[0]!r}", f"use any of {', '.join(STRATEGIES)}")
    if "prob-perception" in names and "uniform" not in names:
        raise UserError("prob-perception estimates c_t² from the uniform model", "keep uniform in --strategies")
    return names


def parse_intensities(intensities: str) -> list[float]:
    """The comma-separated augmentation intensities (≥ 0); '' = none (part b skipped)."""
    try:
        levels = [float(v) for v in intensities.split(",") if v.strip()] if intensities else []
    except ValueError as e:
        raise UserError(f"--intensities {intensities!r} is not a comma-separated list of numbers", "e.g. 0,0.5,1,2") from e
    if any(v < 0 for v in levels):
        raise UserError("augmentation intensities must be ≥ 0", "e.g. 0,0.5,1,2")
    return levels


@dataclass
class Experiment:
    """One experiment in progress: where it writes, its base config, the items it scores and the
    results so far (``results.json``); runs jobs on the worker processes."""

    out: Path
    cfg: object  # the base RunConfig of every run
    test_indices: list[int]
    val_indices: list[int]
    results: dict
    workers: int
    threads: int
    log: object = print

    def save(self) -> None:
        """Write ``results.json`` and ``tables.md``."""
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=float))
        (self.out / "tables.md").write_text(render_tables(self.results))

    def job(self, name: str, seed: int, extra: list[str], calibrate: bool = False) -> dict:
        """The job of run ``name`` at ``seed``: the base config with ``extra`` overrides."""
        cfg = load_config(base=self.cfg.to_dict(), overrides=[f"train.seed={seed}", *extra])
        return {"name": name, "seed": seed, "run_dir": str(self.out / "runs" / f"{name}-s{seed}"),
                "config": cfg.to_dict(), "eval_split": "test", "eval_indices": self.test_indices, "eval_seed": 0,
                "calib_indices": self.val_indices, "calibrate": calibrate}

    def is_done(self, job: dict) -> bool:
        return _key(job) in self.results["runs"]

    def run_jobs(self, jobs: list[dict], then=lambda result: []) -> None:
        """Run ``jobs`` (skipping finished ones) on the workers; ``then(result)`` may return more jobs,
        queued as soon as their prerequisite finishes (no worker idles between the phases)."""
        todo = [j for j in jobs if not self.is_done(j)]
        for j in jobs:
            if self.is_done(j):
                todo += [f for f in then(self.results["runs"][_key(j)]) if not self.is_done(f)]
        if not todo:
            return
        self.log(f"{len(todo)} run(s): " + ", ".join(_key(j) for j in todo))
        start = time.perf_counter()
        if self.workers == 1:
            _init_worker(self.threads)
            while todo:
                j = todo.pop(0)
                todo += self._record(j, run_job(j), start, then)
            return
        self._run_in_pool(todo, start, then)

    def _run_in_pool(self, todo: list[dict], start: float, then) -> None:
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
        from multiprocessing import get_context

        with ProcessPoolExecutor(max_workers=self.workers, mp_context=get_context("spawn"), initializer=_init_worker,
                                 initargs=(self.threads,)) as pool:
            pending = {pool.submit(run_job, j): j for j in todo}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    for extra in self._record(pending.pop(future), future.result(), start, then):
                        pending[pool.submit(run_job, extra)] = extra

    def _record(self, job: dict, result: dict, start: float, then) -> list[dict]:
        """Store a finished run, log it, save; the follow-up jobs ``then`` asks for."""
        self.results["runs"][_key(job)] = result
        metric = self.results["main_metric"]
        self.log(f"  {_key(job)}: {metric} {result['summary'][metric]:.4f} (train {result['train_s']:.0f} s, "
                 f"eval {result['eval_s']:.0f} s, {time.perf_counter() - start:.0f} s in)")
        self.save()
        return [f for f in then(result) if not self.is_done(f)]


def open_experiment(task: str, spec: ExperimentSize, size_name: str, seeds: int, out: Path, world: Path,
                    overrides: list[str], names: list[str], levels: list[float], workers: int | None,
                    threads: int | None, log, discriminative: bool = True) -> Experiment:
    """The experiment's base config, the fixed test / val items it scores and its results so far
    (resumed from ``OUT/results.json``), with this call's plan recorded."""
    from genperc import build
    from genperc.data.sources import open_scene_source

    cfg = base_config(task, spec, world, overrides)
    workers = 1 if torch.cuda.is_available() else (spec.workers if workers is None else max(1, workers))
    threads = spec.threads if threads is None else threads
    codec = build.build_task(cfg)
    sources = {split: open_scene_source(cfg.data, split) for split in ("train", "val", "test")}
    items = {split: len(codec.dataset(src, cfg.data.resolution)) for split, src in sources.items()}
    test_indices = eval_indices(items["test"], spec.eval_items, 1234)
    val_indices = eval_indices(items["val"], spec.calib_items, 4321)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results.setdefault("runs", {})
    results.update({"task": task, "size": size_name, "seeds": seeds, "size_spec": asdict(spec),
                    "train_items": items["train"], "test_items": len(test_indices), "val_items": len(val_indices),
                    "train_scenes": len(sources["train"]),
                    "main_metric": codec.main_metric, "strategies": names, "intensities": levels,
                    "discriminative": discriminative,
                    "workers": workers, "threads": threads, "config": cfg.to_dict(), "machine": machine_line()})
    return Experiment(out, cfg, test_indices, val_indices, results, workers, threads, log)


def perception_followup(experiment: Experiment, task: str, names: list[str], uniform: dict) -> list[dict]:
    """The prob-perception job of a finished uniform run's seed, trained on that run's c_t²
    estimate; none when prob-perception is not asked for or the estimate failed (logged)."""
    if uniform["name"] != "uniform" or "prob-perception" not in names:
        return []
    seed, estimate = uniform["seed"], uniform.get("perception_c2", {})
    if "path" not in estimate:
        experiment.log(f"  no perception c² from uniform-s{seed} ({estimate.get('error', 'not estimated')}): "
                       f"prob-perception-s{seed} is left out")
        return []
    return [experiment.job("prob-perception", seed, _strategy_overrides("prob-perception", task, estimate["path"]))]


def discriminative_jobs(experiment: Experiment, seeds: int) -> list[dict]:
    """The discriminative counterpart at every seed (ADDP Table 2): the base config — same denoiser,
    data, steps × batch, no augmentation — with ``model.mode=discriminative`` (the task's own loss,
    one forward pass; the timestep strategy does not apply)."""
    return [experiment.job(DISCRIMINATIVE, seed, ["model.mode=discriminative"]) for seed in range(seeds)]


def score_anchor_baselines(experiment: Experiment) -> dict:
    """The task's trivial baselines (:mod:`genperc.evaluation.baselines`, the same predictors as
    ``genperc eval --baselines``), fitted on the train split and scored once — they do not train,
    so not per seed — on the experiment's test items, into ``results["baselines"]`` (kept when
    already there)."""
    from genperc import build
    from genperc.data.sources import open_scene_source
    from genperc.evaluation.baselines import DEFAULT_FIT_ITEMS, fit_baselines, score_baselines

    results, cfg = experiment.results, experiment.cfg
    if "baselines" in results:
        return results["baselines"]
    experiment.log(f"scoring the trivial baselines on {len(experiment.test_indices)} test items")
    task = build.build_task(cfg)
    predictors = fit_baselines(task, open_scene_source(cfg.data, cfg.data.train_split), cfg.data.resolution,
                               fit_items=DEFAULT_FIT_ITEMS)  # fitted first, as genperc eval does
    dataset = task.dataset(open_scene_source(cfg.data, "test"), cfg.data.resolution)
    indices = [i for i in experiment.test_indices if i < len(dataset)]
    results["baselines"] = score_baselines(task, dataset, predictors, indices=indices,
                                           batch_size=cfg.sample.batch_size)
    results["baseline_settings"] = {"fit_split": cfg.data.train_split, "fit_items": DEFAULT_FIT_ITEMS,
                                    "predictors": {b.name: b.description for b in predictors}}
    experiment.save()
    return results["baselines"]


def run_strategies(experiment: Experiment, task: str, names: list[str], seeds: int,
                   discriminative: bool = True) -> str:
    """Part (a), Table 5: every strategy at every seed, and (``discriminative``) the discriminative
    counterpart beside them; each prob-perception run starts when its seed's uniform run (and
    estimate) is done. Returns the best strategy (also recorded; never the discriminative run)."""
    calibrate = "prob-perception" in names
    jobs = [experiment.job(s, seed, _strategy_overrides(s, task, None), calibrate=(s == "uniform" and calibrate))
            for seed in range(seeds) for s in names if s != "prob-perception"]
    jobs += discriminative_jobs(experiment, seeds) if discriminative else []
    experiment.run_jobs(jobs, then=lambda result: perception_followup(experiment, task, names, result))
    best = best_strategy(experiment.results, names, seeds)
    experiment.results["best_strategy"] = best
    experiment.save()
    return best


def run_intensities(experiment: Experiment, task: str, best: str, levels: list[float], seeds: int) -> None:
    """Part (b), Fig. 8: the best strategy at every augmentation intensity > 0 (intensity 0 is
    the strategy's own run); a prob-perception best reuses each seed's estimate."""
    jobs = []
    for seed in range(seeds):
        c_path = None
        if best == "prob-perception":
            c_path = experiment.results["runs"][f"uniform-s{seed}"]["perception_c2"].get("path")
            if c_path is None:
                continue
        jobs += [experiment.job(aug_name(best, v), seed, _strategy_overrides(best, task, c_path) + [f"train.augment={v}"])
                 for v in levels if v > 0]
    experiment.run_jobs(jobs)
    experiment.save()


def run_experiment(task: str = "referring", size: str | ExperimentSize = "cpu", seeds: int = 3,
                   out: str | Path | None = None, strategies: str = ",".join(TABLE5), intensities: str = "0,0.5,1,2",
                   overrides: list[str] | None = None, world_path: str | None = None, workers: int | None = None,
                   threads: int | None = None, discriminative: bool = True, log=print) -> dict:
    """Run the experiment (module docstring); returns the results dict also saved as JSON.
    ``size``: a name in :data:`SIZES` (``cpu`` / ``gpu``) or an :class:`ExperimentSize` of one's
    own (tests, custom sizes; recorded as ``custom``). ``discriminative``: also train the
    discriminative counterpart at every seed (the trivial baselines are always scored)."""
    names, levels = parse_strategies(strategies), parse_intensities(intensities)
    if seeds < 1:
        raise UserError(f"--seeds {seeds} < 1", "use 1 or more seeds")
    spec = size if isinstance(size, ExperimentSize) else size_for(task, size)
    size_name = "custom" if isinstance(size, ExperimentSize) else size
    out = Path(out or Path("runs") / f"addp-{task}-{size_name}")
    out.mkdir(parents=True, exist_ok=True)
    world = Path(world_path) if world_path else render_world(out / "data" / "world", spec, log=log)
    experiment = open_experiment(task, spec, size_name, seeds, out, world, list(overrides or []), names, levels,
                                 workers, threads, log, discriminative=discriminative)
    score_anchor_baselines(experiment)
    best = run_strategies(experiment, task, names, seeds, discriminative=discriminative)
    run_intensities(experiment, task, best, levels, seeds)
    plot_curves(experiment.results, out)
    return experiment.results


def _key(job: dict) -> str:
    return f"{job['name']}-s{job['seed']}"


def _key_values(results: dict, name: str, metric: str, seeds: int, step: int | None = None) -> list[float]:
    vals = []
    for s in range(seeds):
        r = results["runs"].get(f"{name}-s{s}")
        if r is None:
            continue
        summary = r["summary"] if step is None else r["per_step"][step]
        v = summary.get(metric)
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            vals.append(float(v))
    return vals


def _better(metric: str):
    from genperc.metrics import LOWER_IS_BETTER

    return (lambda a, b: a < b) if metric in LOWER_IS_BETTER else (lambda a, b: a > b)


def best_strategy(results: dict, names: list[str], seeds: int) -> str:
    """The strategy with the best mean main metric over the seeds (ties: the earlier one)."""
    m = results["main_metric"]
    better = _better(m)
    best, best_v = None, None
    for n in names:
        vals = _key_values(results, n, m, seeds)
        if vals and (best is None or better(statistics.mean(vals), best_v)):
            best, best_v = n, statistics.mean(vals)
    if best is None:
        raise UserError("no strategy run finished", "look at the run directories under OUT/runs")
    return best


def aug_name(best: str, v: float) -> str:
    return best if v == 0 else f"{best}-aug{v:g}"


def render_tables(results: dict) -> str:
    """``tables.md``: the setup line, Table 5, Fig. 8, Fig. 7 per step, the c² tables and timings."""
    lines = _setup_lines(results) + _table5(results)
    if results.get("best_strategy"):
        lines += _fig8_table(results) + _curve_table(results)
    lines += _c2_table(results)
    lines += _time_table(results)
    return "\n".join(lines) + "\n"


def _metric_cells(results: dict, run_name: str) -> str:
    """The run's table cells: mean ± std over seeds of each of the task's columns."""
    return " | ".join(fmt_mean_std(_key_values(results, run_name, key, results["seeds"]), scale, digits)
                      for key, _, scale, digits in COLUMNS[results["task"]])


def _setup_lines(results: dict) -> list[str]:
    spec, sample = results["size_spec"], results["config"]["sample"]
    return [f"# ADDP ablations: {results['task']} on the shapes world ({results['size']} size)", "",
            f"Machine: {results['machine']}; {results['workers']} worker process(es) × "
            f"{results['threads'] or 'default'} torch thread(s). {results['seeds']} seed(s), mean ± std over seeds. "
            f"Every run: {spec['steps']} steps of batch {spec['batch_size']} on {results['train_items']} training "
            f"items ({spec['resolution']}×{spec['resolution']}, {results.get('train_scenes', spec['scenes']['train'])} scenes), scored on "
            f"{results['test_items']} test items ({sample['sampler']}, {sample['steps']} steps); the perception c² "
            f"from {results['val_items']} val items.", ""]


def _table5(results: dict) -> list[str]:
    """Table 5: one row per strategy; for referring, the paper's RefCOCO number beside it."""
    columns = COLUMNS[results["task"]]
    paper = results["task"] == "referring"
    header = "| strategy | " + " | ".join(c[1] for c in columns) + " |" + (" paper: RefCOCO val oIoU |" if paper else "")
    lines = ["## Table 5 — timestep strategies (equal data and compute)", "", header,
             "|" + "---|" * (header.count("|") - 1)]
    for name in results.get("strategies", []):
        lines.append(f"| {STRATEGIES[name][2]} | {_metric_cells(results, name)} |"
                     + (f" {PAPER_TABLE5.get(name, '–')} |" if paper else ""))
    lines += _anchor_rows(results, " – |" if paper else "")
    lines += [""] + _anchor_note(results)
    if not paper:
        lines += ["The paper has no Table 5 for depth; its full method (the authors' table + augmentation) moves "
                  "Marigold on NYUv2 from AbsRel 6.0 to 5.6 and δ1 95.9 to 96.3.", ""]
    return lines


def _fig8_table(results: dict) -> list[str]:
    """Fig. 8: one row per augmentation intensity on the best strategy."""
    best, columns = results["best_strategy"], COLUMNS[results["task"]]
    lines = [f"## Fig. 8 — augmentation intensity on the best strategy ({STRATEGIES[best][2]})", "",
             "| intensity | " + " | ".join(c[1] for c in columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for level in results.get("intensities", []):
        lines.append(f"| {level:g}× | {_metric_cells(results, aug_name(best, level))} |")
    return lines + _anchor_rows(results) + [""]


def _anchor_rows(results: dict, tail: str = "") -> list[str]:
    """The anchors' rows (issue 12), on the runs' test items: the discriminative counterpart (mean
    ± std over seeds) when planned, then each trivial baseline (deterministic: one value)."""
    rows = []
    if results.get("discriminative"):
        rows.append(f"| {DISCRIMINATIVE_LABEL} | {_metric_cells(results, DISCRIMINATIVE)} |{tail}")
    for name, summary in results.get("baselines", {}).items():
        cells = " | ".join(fmt_mean_std([summary.get(key)], scale, digits)
                           for key, _, scale, digits in COLUMNS[results["task"]])
        rows.append(f"| baseline: {name} | {cells} |{tail}")
    return rows


def _anchor_note(results: dict) -> list[str]:
    """What the anchor rows are, under Table 5."""
    notes = []
    if results.get("discriminative"):
        notes.append("The discriminative counterpart (ADDP Table 2) is the same denoiser, data, steps × batch and seeds "
                     "trained with the task's own loss and evaluated in one forward pass at t = T−1 on x_T = 0 "
                     "(`model.mode=discriminative`; no timestep strategy, no augmentation).")
    if "baselines" in results:
        fit = results.get("baseline_settings", {})
        notes.append(f"Baselines are the task's trivial predictors (`genperc eval --baselines`), fitted on up to "
                     f"{fit.get('fit_items', '–')} items of the {fit.get('fit_split', 'train')} split; "
                     f"deterministic, so no ±.")
    if not notes:
        return []
    return [" ".join(["Anchors (scored on the same test items as every run).", *notes]), ""]


def final_name(results: dict) -> str | None:
    """The best strategy at its best intensity (the "after" of Fig. 7)."""
    best = results.get("best_strategy")
    if not best:
        return None
    m, seeds = results["main_metric"], results["seeds"]
    better = _better(m)
    final, fv = best, None
    for v in results.get("intensities", []):
        vals = _key_values(results, aug_name(best, v), m, seeds)
        if vals and (fv is None or better(statistics.mean(vals), fv)):
            final, fv = aug_name(best, v), statistics.mean(vals)
    return final


def _curve_table(results: dict) -> list[str]:
    m, seeds = results["main_metric"], results["seeds"]
    scale = {k: s for k, _, s, _ in COLUMNS[results["task"]]}[m]
    final = final_name(results)
    rows = [("uniform (before)", "uniform"), (f"{final} (after)", final)]
    ref = results["runs"].get("uniform-s0")
    if ref is None or final is None:
        return []
    ts = ref["timesteps"]
    lines = [f"## Fig. 7 — {m} of the predicted x̂0 at every denoising step (mean over seeds)", "",
             "| run | " + " | ".join(f"t={t}" for t in ts) + " |", "|" + "---|" * (len(ts) + 1)]
    for label, name in rows:
        cells = []
        for j in range(len(ts)):
            vals = _key_values(results, name, m, seeds, step=j)
            cells.append(f"{statistics.mean(vals) * scale:.1f}" if vals else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + ["", "Curves of every run: `curves.png`; before/after: `before_after.png`.", ""]


def _percent_row(label: str, shares, r2: str = "–") -> str:
    """A c² row: the per-bin shares (any scale) in % of their sum, noisiest bin first."""
    total = float(sum(shares))
    return f"| {label} | " + " | ".join(f"{100 * shares[b] / total:.1f}" for b in range(9, -1, -1)) + f" | {r2} |"


def _c2_table(results: dict) -> list[str]:
    """Each seed's perception c² beside the authors' table and the diffusion formulation's."""
    from genperc.diffusion.schedule import NoiseSchedule
    from genperc.diffusion.timesteps import AUTHOR_TABLES as C_TABLES
    from genperc.diffusion.timesteps import diffusion_contributions

    estimates = {seed: results["runs"][f"uniform-s{seed}"]["perception_c2"] for seed in range(results["seeds"])
                 if "perception_c2" in results["runs"].get(f"uniform-s{seed}", {})}
    failed = [f"seed {seed}: {e['error']}" for seed, e in estimates.items() if "error" in e]
    estimates = {seed: e for seed, e in estimates.items() if "factors" in e}
    if not estimates and not failed:
        return []
    lines = ["## c_t² per bin (%, bin 9 = t ∈ [900, 1000) first)", "",
             "| source | " + " | ".join(f"bin {b}" for b in range(9, -1, -1)) + " | R² |", "|" + "---|" * 12]
    lines += [_percent_row(f"perception, uniform seed {seed}", e["factors"], f"{e['explained']:.2f}")
              for seed, e in estimates.items()]
    authors = C_TABLES.get(f"addp-{results['task']}")
    if authors is not None:
        lines.append(_percent_row("the authors' table", authors))
    schedule = NoiseSchedule(load_config(base=results["config"]).diffusion)
    lines.append(_percent_row("diffusion formulation", diffusion_contributions(schedule, bins=10).tolist()))
    return lines + [""] + [f"No perception c² estimate ({f}); that seed's prob-perception run is left out."
                           for f in failed] + [""]


def _time_table(results: dict) -> list[str]:
    best = results.get("best_strategy")
    order = list(results.get("strategies", [])) + [aug_name(best, v) for v in results.get("intensities", []) if best]
    names = list(dict.fromkeys([n for n in order if any(r["name"] == n for r in results["runs"].values())]
                               + [r["name"] for r in results["runs"].values()]))
    lines = ["## Training time per run (s, mean over seeds; equal steps — wall clock on a shared machine)", "",
             "| run | train (s) | images/s | test scoring (s) |", "|---|---|---|---|"]
    for n in names:
        rs = [r for r in results["runs"].values() if r["name"] == n]
        lines.append(f"| {n} | {statistics.mean(r['train_s'] for r in rs):.0f} | "
                     f"{statistics.mean(r['images_per_s'] for r in rs):.1f} | {statistics.mean(r['eval_s'] for r in rs):.0f} |")
    return lines + [""]


def plot_curves(results: dict, out: Path) -> list[Path]:
    """``curves.png`` (every strategy and intensity) and ``before_after.png`` (uniform vs the final
    run): the split-level main metric at every denoising step, mean ± std over seeds (Fig. 7)."""
    from genperc.evaluation.trajectory import plot_step_curves

    metric, seeds = results["main_metric"], results["seeds"]
    best = results.get("best_strategy")

    def curves(names: dict[str, str]) -> dict:
        found = {}
        for label, name in names.items():
            runs = [results["runs"][f"{name}-s{k}"] for k in range(seeds) if f"{name}-s{k}" in results["runs"]]
            if runs:
                rows = [[step[metric] for step in r["per_step"]] for r in runs]
                found[label] = (runs[0]["timesteps"], torch.tensor(rows, dtype=torch.float64))
        return found

    panels = {"timestep strategy": curves({STRATEGIES[n][2]: n for n in results.get("strategies", [])})}
    if best:
        panels["augmentation intensity"] = curves({f"{v:g}×": aug_name(best, v) for v in results.get("intensities", [])})
    paths = [plot_step_curves(panels, out / "curves.png", ylabel=metric)]
    final = final_name(results)
    if final:
        paths.append(plot_step_curves({"before / after": curves({"uniform": "uniform", f"after: {final}": final})},
                                      out / "before_after.png", ylabel=metric))
    return paths
