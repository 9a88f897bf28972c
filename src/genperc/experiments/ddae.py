"""``genperc experiment ddae``: the DDAE++ claim (seed 004; REFERENCE.md "DDAE / DDAE++") measured —
self-conditioning improves both generation and the linear probe at ~1% cost, and contrastive
self-distillation raises the probe further without hurting generation.

Three arms, trained at equal steps from the same preset, seed and data order (``runs/<arm>-s<seed>``):

* ``baseline`` — DDAE: the denoiser alone (``model.self_conditioning.enabled=false``,
  ``train.contrastive.enabled=false``);
* ``sc`` — + self-conditioning (:mod:`genperc.models.selfcond`);
* ``sc+cd`` — + self-conditioning + contrastive self-distillation (:mod:`genperc.training.contrastive`).

Each run is judged on (``runs/<arm>-s<seed>/ddae.json``):

* **Generation** — FID, precision and recall of class-conditional DDPM samples of the EMA weights
  against the evaluation split, in the feature space of a small classifier trained once on the
  training split (``shared/featurenet.safetensors``; :mod:`genperc.evaluation.genrep`). These are
  classifier-space measures, not Inception FID: comparable between the arms, not with the paper.
* **Representation** — the DDAE linear probe (:mod:`genperc.experiments.probe`) on the run's own
  classes, every block at the noise levels ``probe_t``, cached views (``probe_views``; the probe's
  docstring says what that approximates) and DDAE's update count; the best cell (t, block) is
  the arm's number, beside the chance level, the same probe on the clean pixels and on a freshly
  initialised denoiser (what training added).
* **Cost** — the training loop's step time (from its images/s) as a ratio to the baseline of the
  same seed. The arms run one after another on a machine that may be shared, so this ratio carries
  the machine's drift; ``make bench`` (``benchmarks/bench_ddae.py``) measures the overhead
  interleaved in one process.

Every finished run is reused (its ``ddae.json``), so an interrupted experiment resumes; runs of
different seeds may be trained by separate processes (``only_seeds``) into one ``--out`` and the
tables are written from the run files by whichever process finishes last (or ``tables_only``).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from genperc.atomic import atomic_write_text
from genperc.config import GenRepEvalConfig, RunConfig, check_same_run, load_config
from genperc.errors import UserError
from genperc.experiments.common import fmt_mean_std, machine_line

ARMS = ("baseline", "sc", "sc+cd")
LABELS = {"baseline": "DDAE (baseline)", "sc": "+ self-conditioning", "sc+cd": "+ self-conditioning + contrastive"}
ARM_OVERRIDES = {
    "baseline": ["model.self_conditioning.enabled=false", "train.contrastive.enabled=false"],
    "sc": ["model.self_conditioning.enabled=true", "train.contrastive.enabled=false"],
    "sc+cd": ["model.self_conditioning.enabled=true", "train.contrastive.enabled=true"],
}
DATASETS = ("digits", "world")
PRESETS = {"cpu": "ddae-cpu", "dit-cpu": "ddae-dit-cpu"}  # shorthands; any preset name or YAML path works too
PROBE_T = (1, 11, 21, 51, 101)  # DDAE's grid {1, 11, 21} and two noisier levels, of 1,000 steps


def base_config(dataset: str, preset: str, overrides: list[str], world_path: str | None) -> RunConfig:
    """The experiment's run config: the preset (``cpu`` → ``ddae-cpu``), the dataset, the overrides."""
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}", f"use one of {', '.join(DATASETS)}")
    d = load_config(PRESETS.get(preset, preset), list(overrides)).to_dict()
    if d["task"] != "classification":
        raise UserError(f"preset {preset!r} has task {d['task']!r}", "DDAE++ needs a classification preset, "
                        "e.g. --preset cpu (ddae-cpu) or dit-cpu (ddae-dit-cpu)")
    if dataset == "world":
        d["data"].update(source="world", path=world_path, val_split="val", options={})
    return load_config(base=d)


def run_config(base: RunConfig, arm: str, seed: int) -> RunConfig:
    return load_config(base=base.to_dict(), overrides=ARM_OVERRIDES[arm] + [f"train.seed={seed}"])


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


class Experiment:
    """One ``--out`` directory: its shared feature network, its runs and its tables."""

    def __init__(self, cfg: RunConfig, out: Path, *, dataset: str, preset: str, probe_t=PROBE_T,
                 probe_views: int = 8, probe_updates: int = 15 * 391, samples_per_class: int = 25, sample_steps: int = 50,
                 log=print):
        self.cfg, self.out, self.log = cfg, out, log
        self.dataset, self.preset = dataset, preset
        self.probe_t, self.probe_views, self.samples_per_class = list(probe_t), probe_views, samples_per_class
        self.probe_updates, self.sample_steps = probe_updates, sample_steps
        (out / "shared").mkdir(parents=True, exist_ok=True)

    # -- one run ----------------------------------------------------------------------------------

    def train(self, arm: str, seed: int) -> tuple[Path, dict]:
        """Train ``arm`` at ``seed`` (resuming a kept checkpoint); returns the run and its timing
        (``train_seconds.json``: wall seconds summed over resumptions, and the training loop's
        images/s of its last leg)."""
        from genperc.training.trainer import Trainer

        cfg = run_config(self.cfg, arm, seed)
        run = self.out / "runs" / f"{arm}-s{seed}"
        timing = run / "train_seconds.json"
        done = _read(timing) or {"seconds": 0.0, "step": 0}
        if done["step"] >= cfg.train.steps:
            return run, done
        resume = any((run / "checkpoints").glob("step-*"))
        if resume:
            check_same_run(run, cfg, "use another --out, or the preset, overrides and --steps it was run with")
        self.log(f"== {run.name}: training {cfg.train.steps} steps" + (" (resumed)" if resume else ""))
        start = time.perf_counter()
        result = Trainer(cfg, run).train(resume=resume, overwrite=not resume)  # no checkpoint: nothing to keep
        done = {"seconds": done["seconds"] + time.perf_counter() - start, "step": result.step,
                "images_per_s": result.images_per_s or done.get("images_per_s")}  # None: trained elsewhere
        atomic_write_text(timing, json.dumps(done))
        return run, done

    def evaluate(self, run: Path, seed: int, timing: dict) -> dict:
        """Generation and probe metrics of a trained run (module docstring), cached in ``ddae.json``."""
        from genperc.evaluation.genrep import generation_metrics
        from genperc.experiments.probe import ProbeConfig, linear_probe, load_probe_data, probe_blocks, probe_timesteps
        from genperc.inference import load_run

        loaded = load_run(run, weights="ema")
        eval_ds = _split(loaded, loaded.cfg.data.val_split)
        extractor = self.feature_extractor(loaded)
        ev = GenRepEvalConfig(samples_per_class=self.samples_per_class, sample_steps=self.sample_steps, seed=seed)
        gen = generation_metrics(loaded.model, eval_ds, extractor, loaded.task.num_classes, schedule=loaded.schedule,
                                 cfg=ev, out_dir=run / "eval", names=loaded.task.class_names)
        data = load_probe_data(loaded, seed=seed)
        n = loaded.schedule.num_train_timesteps
        ts = probe_timesteps(loaded.model, n, [min(n - 1, round(t * n / 1000)) for t in self.probe_t])
        probe = linear_probe(loaded, data, ts, probe_blocks(loaded.model),
                             ProbeConfig(cache=True, cache_draws=self.probe_views, min_updates=self.probe_updates,
                                         seed=seed))
        probe.write(run / "probe")
        t, block, top1 = probe.best
        record = {"seconds": timing["seconds"], "images_per_s": timing["images_per_s"], "fid": gen["fid"], "precision": gen["precision"], "recall": gen["recall"],
                  "class_consistency": gen.get("class_consistency"), "probe_top1": top1, "probe_t": t,
                  "probe_block": block, "anchors": probe.settings["anchors"], "samples": gen["samples"]}
        atomic_write_text(run / "ddae.json", json.dumps(record, indent=1))
        return record

    def feature_extractor(self, loaded):
        """The FID feature network, trained once on the training split (``shared/``)."""
        from genperc.evaluation.genrep import FeatureExtractor, cached_feature_net

        if not hasattr(self, "_extractor"):
            net = cached_feature_net(self.out / "shared" / "featurenet.safetensors",
                                     _split(loaded, loaded.cfg.data.train_split), loaded.task.num_classes)
            self._extractor = FeatureExtractor(net)
        return self._extractor

    def run(self, arm: str, seed: int) -> dict:
        run, timing = self.train(arm, seed)
        record = _read(run / "ddae.json")
        if record is None:
            self.log(f"   evaluating {run.name}: generation and linear probe")
            record = self.evaluate(run, seed, timing)
        self.log(f"   {run.name}: FID {record['fid']:.2f}  precision {record['precision']:.3f}  recall "
                 f"{record['recall']:.3f}  probe {record['probe_top1']:.3f} (t={record['probe_t']}, "
                 f"{record['probe_block']})" + (f"  {record['images_per_s']:.0f} images/s" if record["images_per_s"] else ""))
        return record

    # -- the tables -------------------------------------------------------------------------------

    def supervised_top1(self, run: Path) -> float:
        """Test top-1 of the FID feature network, a small CNN trained with labels on the training split:
        the discriminative counterpart beside the probe (``shared/featurenet.json``)."""
        from genperc.evaluation.genrep import real_images
        from genperc.inference import load_run

        path = self.out / "shared" / "featurenet.json"
        if not path.is_file():
            loaded = load_run(run, weights="ema")
            images, labels = real_images(_split(loaded, loaded.cfg.data.val_split))
            top1 = float((self.feature_extractor(loaded).classify(images) == labels).float().mean())
            atomic_write_text(path, json.dumps({"top1": top1}))
        return json.loads(path.read_text())["top1"]

    def collect(self, seeds: int) -> dict:
        runs = {f"{a}-s{s}": _read(self.out / "runs" / f"{a}-s{s}" / "ddae.json") for a in ARMS for s in range(seeds)}
        return {"dataset": self.dataset, "preset": self.preset, "steps": self.cfg.train.steps, "seeds": seeds,
                "arch": self.cfg.model.arch, "probe_t": self.probe_t, "probe_views": self.probe_views,
                "machine": machine_line(), "runs": {k: v for k, v in runs.items() if v is not None}}


def _split(loaded, split: str):
    """The run's task dataset of one split of its data."""
    from genperc.data.sources import open_scene_source

    return loaded.task.dataset(open_scene_source(loaded.cfg.data, split), loaded.resolution)


def render_tables(results: dict) -> str:
    """The claim's table: per arm mean ± std over seeds, and which of the paper's claims hold."""
    seeds = results["seeds"]
    runs = results["runs"]

    def vals(arm: str, key: str) -> list[float]:
        return [runs[f"{arm}-s{s}"][key] for s in range(seeds) if f"{arm}-s{s}" in runs]

    def ratio(arm: str) -> list[float]:
        pairs = [(runs.get(f"baseline-s{s}"), runs.get(f"{arm}-s{s}")) for s in range(seeds)]
        return [b["images_per_s"] / a["images_per_s"] for b, a in pairs
                if b and a and b.get("images_per_s") and a.get("images_per_s")]  # a run trained elsewhere has none

    lines = [f"## DDAE++ on {results['dataset']} ({results['arch']}, preset {results['preset']}, "
             f"{results['steps']} steps, {seeds} seed(s))", "",
             f"Machine: {results['machine']}.", "",
             "| arm | FID ↓ | precision ↑ | recall ↑ | probe top-1 % ↑ | best cell (t, block) | step time × |",
             "|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        if not vals(arm, "fid"):
            continue
        cells = [f"{runs[f'{arm}-s{s}']['probe_t']}, {runs[f'{arm}-s{s}']['probe_block']}" for s in range(seeds)
                 if f"{arm}-s{s}" in runs]
        lines.append(f"| {LABELS[arm]} | {fmt_mean_std(vals(arm, 'fid'), digits=2)} | "
                     f"{fmt_mean_std(vals(arm, 'precision'), digits=3)} | {fmt_mean_std(vals(arm, 'recall'), digits=3)} | "
                     f"{fmt_mean_std(vals(arm, 'probe_top1'), 100)} | {'; '.join(dict.fromkeys(cells))} | "
                     f"{fmt_mean_std(ratio(arm), digits=2)} |")
    anchors = [r["anchors"] for r in runs.values()]
    if anchors:
        fresh = [a["random_init"]["top1"] for a in anchors if "random_init" in a]
        lines += ["", f"Anchors (same probe, same data): chance {anchors[0]['chance']:.3f}; clean pixels "
                      f"{statistics.mean(a['pixels'] for a in anchors):.3f}"
                      + (f"; a freshly initialised denoiser (best cell) {statistics.mean(fresh):.3f}" if fresh else "")
                      + (f"; discriminative counterpart (a CNN trained with labels, the FID network) "
                         f"{results['supervised_top1']:.3f}" if "supervised_top1" in results else "")
                      + ". FID / precision / recall in the feature space of a small classifier trained on the "
                      "training split (not Inception)."]
    lines += ["", "Claims (mean over seeds):"] + _claims(vals, ratio)
    return "\n".join(lines) + "\n"


def _verdict(before: list[float], after: list[float], better: str) -> str:
    """"holds" / "does not hold" by the means, "within seed noise" when the means differ by less
    than the larger standard deviation over seeds (one seed: the means alone)."""
    diff = statistics.mean(after) - statistics.mean(before)
    spread = max((statistics.stdev(v) for v in (before, after) if len(v) > 1), default=0.0)
    if abs(diff) < spread:
        return "within seed noise"
    return "holds" if (diff > 0) == (better == "higher") else "does not hold"


def _claims(vals, ratio) -> list[str]:
    out = []
    fid, probe = ({a: vals(a, key) for a in ARMS} for key in ("fid", "probe_top1"))

    def change(d, a, b, digits):
        return f"{statistics.mean(d[a]):.{digits}f} → {statistics.mean(d[b]):.{digits}f}"

    if fid["baseline"] and fid["sc"]:
        out.append(f"- self-conditioning improves FID: {_verdict(fid['baseline'], fid['sc'], 'lower')} "
                   f"({change(fid, 'baseline', 'sc', 2)}); improves the probe: "
                   f"{_verdict(probe['baseline'], probe['sc'], 'higher')} ({change(probe, 'baseline', 'sc', 3)}); "
                   f"cost {fmt_mean_std(ratio('sc'), digits=2)}× (paper ~1.01×)")
    if fid["sc"] and fid["sc+cd"]:
        hurt = _verdict(fid["sc"], fid["sc+cd"], "lower")
        out.append(f"- contrastive distillation raises the probe further: "
                   f"{_verdict(probe['sc'], probe['sc+cd'], 'higher')} ({change(probe, 'sc', 'sc+cd', 3)}); "
                   f"without hurting FID: {'holds' if hurt != 'does not hold' else 'does not hold'}"
                   f"{' (within seed noise)' if hurt == 'within seed noise' else ''} ({change(fid, 'sc', 'sc+cd', 2)})")
    return out


def run_experiment(dataset: str = "digits", preset: str = "cpu", seeds: int = 3, out: str | Path = "runs/ddae",
                   overrides: list[str] | None = None, world_path: str | None = None, only_seeds=None,
                   probe_t=PROBE_T, probe_views: int = 8, probe_updates: int = 15 * 391, samples_per_class: int = 25,
                   sample_steps: int = 50, log=print) -> dict:
    """Train and judge every arm × seed (module docstring); writes ``results.json`` and ``tables.md``
    when every run of the ``seeds`` is done."""
    if seeds < 1:
        raise UserError(f"--seeds {seeds} < 1", "use 1 or more seeds")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if dataset == "world" and world_path is None:
        from genperc.experiments.genrep import render_world

        world_path = str(render_world(out / "data" / "world", "cpu", log,
                                      resolution=load_config(PRESETS.get(preset, preset)).data.resolution))
    cfg = base_config(dataset, preset, list(overrides or []), world_path)
    exp = Experiment(cfg, out, dataset=dataset, preset=preset, probe_t=probe_t, probe_views=probe_views,
                     probe_updates=probe_updates, samples_per_class=samples_per_class, sample_steps=sample_steps,
                     log=log)
    for seed in (range(seeds) if only_seeds is None else only_seeds):
        for arm in ARMS:
            exp.run(arm, seed)
    results = exp.collect(seeds)
    if len(results["runs"]) == seeds * len(ARMS):
        results["supervised_top1"] = exp.supervised_top1(out / "runs" / "baseline-s0")
        atomic_write_text(out / "results.json", json.dumps(results, indent=1))
        atomic_write_text(out / "tables.md", render_tables(results))
        log(render_tables(results))
    else:
        log(f"{len(results['runs'])} of {seeds * len(ARMS)} runs done; the tables follow when the rest are")
    return results
