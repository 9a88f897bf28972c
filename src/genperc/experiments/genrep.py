"""``genperc experiment genrep``: GenRep's diagnostic tables (seed 003, Tables 8–11, 13, 14) on the
scikit-learn digits or the shapes world, with mean ± std over seeds.

What runs (all under ``--out``; every piece is reused when its result file exists, so an
interrupted experiment resumes):

* ``shared/``: the class-conditional generator (stage 0, seed 0 — the stand-in for GenRep's
  pretrained LDM, shared by every run like a public checkpoint), the posterior cache of the
  training images under that frozen generator (with the cost it took), the fitted temperature,
  and the feature network of FID / precision / recall (:mod:`genperc.evaluation.genrep`).
* per seed, the variants (``runs/<variant>-s<seed>/``):

  - Table 8 — ``none`` (L_disc; L_hybrid; summed gradients), ``gp`` (+ L_gen_distil),
    ``sg`` (+ semantic modulation and L_rep_align), ``both``, ``full`` (+ symmetric alignment);
  - Table 13 — ``one-sided`` (full with only ∇L_genera aligned, Eq. 13);
  - Table 9 / 10 — thinning k = 1…5 and burn-in m (the config's m × {0.5, 1, 1.5, 2, 2.5}, the
    paper's 25…125 around 50). At the ``cpu`` size these sweeps stop after stage 1
    (``--sweep-stages perception``): the posterior acts through L_percept, and a full stage 2 per
    sweep point does not fit the time budget; ``full`` runs both stages;
  - Table 11 — ECE with and without L_gen_distil (the Table 8 pairs none/gp and sg/both);
  - Table 14 — top-1 under forward noise t = 10, 20, 50 (none vs full);
  - training time: the full method against perception-only (stage 1 with L_disc only) and against
    ``none`` (same stages, no GenRep component), including the full method's share of the
    posterior cache (its cost divided by the runs that use it).

Stage 1 is shared between variants whose stage-1 settings are equal (none/sg; gp/both/full/
one-sided and the default sweep point). ``tables.md`` and ``results.json`` are written at the end.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from genperc.config import GenRepEvalConfig, RunConfig, load_config
from genperc.errors import UserError
from genperc.experiments.common import fmt_mean_std, machine_line

DATASETS = ("digits", "world")
SIZES = {"cpu": "genrep-cpu", "gpu": "genrep-gpu"}  # experiment size → its YAML run config (preset)
TABLES = ("8", "9", "10", "11", "13", "14")
T8 = ("none", "gp", "sg", "both", "full")
LABELS = {"none": "none", "gp": "+ generative perception", "sg": "+ semantic generation", "both": "both",
          "full": "+ gradient alignment (GenRep)", "one-sided": "one-sided (∇genera aligned, Eq. 13)"}


def _variant(name: str, base: dict) -> dict:
    """GenRep settings of a named variant, from the run config's ``task_options.genrep``."""
    g = json.loads(json.dumps(base))
    post, sem, align, stages = (g.setdefault(k, {}) for k in ("posterior", "semantic", "align", "stages"))
    if name in ("none", "sg"):
        post["enabled"] = False
    if name in ("none", "gp"):
        sem["modulation"] = False
        sem["rep_align"] = False
    if name in ("none", "gp", "sg", "both"):
        align["mode"] = "sum"
    if name == "one-sided":
        align["mode"] = "one-sided"
        align["one_sided"] = "genera"
    if name.startswith("k") or name.startswith("m"):
        key = "thinning" if name.startswith("k") else "burn_in"
        post[key] = int(name[1:])
        stages["unified"] = False
    return g


def _stage1_key(g: dict) -> str:
    p = g.get("posterior", {})
    return json.dumps({"enabled": p.get("enabled", True), "k": p.get("thinning"), "m": p.get("burn_in"),
                       "heads": g.get("heads")}, sort_keys=True)




def base_config(dataset: str, size: str, overrides: list[str], world_path: str | None) -> RunConfig:
    """The run config of the experiment: the size's YAML preset, the dataset's settings, overrides."""
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}", f"use one of {', '.join(DATASETS)}")
    if size not in SIZES:
        raise UserError(f"unknown experiment size {size!r}", f"use --size {' or '.join(SIZES)}")
    extra: list[str] = []
    if dataset == "world":
        res = 32 if size == "cpu" else 64
        extra += ["data.source=world", f"data.path={world_path}", f"data.resolution={res}",
                  f"model.sample_size={res}", "data.val_split=val",
                  "task_options.dense=true", "task_options.genrep.heads.segmentation=5",
                  "task_options.genrep.heads.depth=true"]
    cfg = load_config(SIZES[size], extra + list(overrides))
    if dataset == "world" and "size" in cfg.data.options:  # the digits' option; merging cannot delete it
        d = cfg.to_dict()
        d["data"]["options"] = {k: v for k, v in d["data"]["options"].items() if k != "size"}
        cfg = load_config(base=d)
    return cfg


def render_world(out: Path, size: str, log, resolution: int | None = None) -> Path:
    """Single-object world scenes with shape × colour classes (8 on CPU: 4 shapes × red/blue), at
    ``resolution`` (default 32 px on cpu, 64 on gpu)."""
    from genperc.data.world.render_job import render_split
    from genperc.data.world.scene import WorldConfig

    res = resolution or (32 if size == "cpu" else 64)
    colors = ("red", "blue") if size == "cpu" else ("gray", "red", "blue", "green", "brown", "purple", "cyan",
                                                      "yellow")
    wc = WorldConfig.single_object(resolution=res, label_scheme="shape_color", colors=colors, spp=8 if size == "cpu"
                                   else 16)
    counts = {"train": 800, "val": 200} if size == "cpu" else {"train": 20000, "val": 2000}
    for split, n in counts.items():
        if not (out / split / "manifest.json").is_file() or not json.loads(
                (out / split / "manifest.json").read_text()).get("complete"):
            log(f"rendering {n} {split} world scenes at {res}px into {out}")
            render_split(out, wc, split=split, scenes=n, seed=0 if split == "train" else 1, workers=1,
                         progress=False)
    return out


def run_experiment(dataset: str = "digits", size: str = "cpu", seeds: int = 3, out: str | Path = "runs/genrep",
                   tables: str = "8,9,10,11,13,14", overrides: list[str] | None = None,
                   world_path: str | None = None, sweep_stages: str | None = None, log=print) -> dict:
    """Run the experiment (module docstring) at ``size`` (cpu | gpu, :data:`SIZES`); returns the
    results dict also saved as JSON."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = parse_tables(tables)
    if dataset == "world" and world_path is None:
        world_path = str(render_world(out / "data" / "world", size, log))
    cfg = base_config(dataset, size, list(overrides or []), world_path)
    experiment = Experiment(cfg, out, dataset, size, sweep_stages or ("perception" if size == "cpu" else "full"), log)
    shared = experiment.prepare_shared_parts()
    jobs = experiment.plan_jobs(wanted)
    for seed in range(seeds):
        experiment.run_seed(seed, jobs, shared)
    experiment.results["seeds"] = seeds
    experiment.results["sweep_stages"] = experiment.sweep_stages
    experiment.save()
    (out / "tables.md").write_text(render_tables(experiment.results, wanted))
    return experiment.results


def parse_tables(tables: str) -> set[str]:
    wanted = {t.strip() for t in tables.split(",") if t.strip()}
    bad = wanted - set(TABLES)
    if bad:
        raise UserError(f"unknown table(s) {sorted(bad)}", f"choose from {', '.join(TABLES)}")
    return wanted


@dataclass
class SharedParts:
    """What every run of the experiment shares: the generator, the FID feature extractor, the
    frozen generator's posterior cache and its fitted temperature."""

    generator: object
    extractor: object
    cache: object
    temperature: float


class Experiment:
    """One experiment directory: its data, its ``results.json``, and the named steps of a run."""

    def __init__(self, cfg: RunConfig, out: Path, dataset: str, size: str, sweep_stages: str, log):
        from genperc import build
        from genperc.diffusion.schedule import NoiseSchedule
        from genperc.training.genrep import GenRepConfig, open_split

        self.cfg, self.out, self.sweep_stages, self.log = cfg, out, sweep_stages, log
        self.base_g = cfg.task_options.get("genrep", {})
        self.gcfg = GenRepConfig.from_dict(self.base_g)
        self.schedule = NoiseSchedule(cfg.diffusion)
        self.task = build.build_task(cfg)
        self.train_src = open_split(cfg, cfg.data.train_split)
        self.train_ds = self.task.dataset(self.train_src, cfg.data.resolution)
        self.eval_ds = self.task.dataset(open_split(cfg, cfg.data.val_split), cfg.data.resolution)
        self.num_classes = self.task.num_classes
        self.shared_dir = out / "shared"
        self.shared_dir.mkdir(exist_ok=True)
        self.results_path = out / "results.json"
        self.results = json.loads(self.results_path.read_text()) if self.results_path.is_file() else {"runs": {}}
        self.results.update({"dataset": dataset, "size": size, "classes": self.task.class_names,
                             "train_images": len(self.train_ds), "eval_images": len(self.eval_ds),
                             "machine": machine_line()})

    def save(self) -> None:
        self.results_path.write_text(json.dumps(self.results, indent=1))

    # -- shared parts -----------------------------------------------------------------------------

    def prepare_shared_parts(self) -> SharedParts:
        from genperc.training.genrep import train_generator

        t0 = time.perf_counter()
        gen_cfg = load_config(base=self.cfg.to_dict(), overrides=["train.seed=0"])
        generator, _, gen_s = train_generator(gen_cfg, self.shared_dir, self.task, self.train_src, self.gcfg,
                                              log=self.log)
        if gen_s:
            self.results["generator_s"] = gen_s
        extractor = self._feature_extractor()
        cache, temperature = self._posterior_cache(generator)
        self.log(f"shared parts ready in {time.perf_counter() - t0:.0f} s; teacher top-1 "
                 f"{self.results['teacher']['tau']['top1']:.3f} at τ={temperature:.3g}")
        if "posterior_cost" not in self.results:
            from genperc.training.genrep import cache_labels

            self.results["posterior_cost"] = posterior_cost(generator, self.train_ds, self.gcfg.posterior,
                                                            self.schedule, self.num_classes, labels_fn=cache_labels,
                                                            temperature=temperature)
        self.save()
        return SharedParts(generator, extractor, cache, temperature)

    def _feature_extractor(self):
        """The FID / precision / recall feature network (trained once) or a TorchScript one."""
        from genperc.evaluation.genrep import FeatureExtractor, cached_feature_net, real_images

        fnet = cached_feature_net(self.shared_dir / "featurenet.safetensors", self.train_ds, self.num_classes)
        if "featurenet_top1" not in self.results:
            xr, yr = real_images(self.eval_ds)
            self.results["featurenet_top1"] = float((FeatureExtractor(fnet).classify(xr) == yr).float().mean())
        fe = self.gcfg.eval.feature_extractor
        return FeatureExtractor(torchscript=fe.split(":", 1)[1]) if fe.startswith("torchscript:") else FeatureExtractor(fnet)

    def _posterior_cache(self, generator):
        """The frozen generator's cache (computed once), the fitted τ and the teacher's accuracy."""
        from genperc.evaluation.genrep import teacher_accuracy
        from genperc.training.genrep import build_posterior_cache, cache_labels
        from genperc.training.posterior import PosteriorCache, fit_temperature, kept_states

        pc = self.gcfg.posterior
        path = self.shared_dir / f"posterior-{pc.steps}steps-{pc.density}-{pc.subset or 'all'}.safetensors"
        if path.is_file():
            cache = PosteriorCache.load(path)
        else:
            cache, cost = build_posterior_cache(generator, self.train_ds, pc, self.schedule, self.num_classes, seed=0)
            cache.save(path)
            self.results["posterior_cache"] = cost
            self.save()
        present = cache.present.nonzero().flatten()
        labels = cache_labels(self.train_ds, present)
        kept = kept_states(pc.steps, pc.burn_in, pc.thinning, pc.thinning_anchor)
        log_densities = cache.log_densities[present]
        tau = fit_temperature(log_densities, labels, kept) if pc.fit_temperature else pc.temperature
        self.results["temperature"] = tau
        self.results["teacher"] = {"tau=1": teacher_accuracy(log_densities, labels, kept, 1.0),
                                   "tau": teacher_accuracy(log_densities, labels, kept, tau)}
        return cache, tau

    # -- the runs ---------------------------------------------------------------------------------

    def plan_jobs(self, wanted: set[str]) -> list[tuple[str, bool, dict]]:
        """(variant, full evaluation, GenRep settings) of every run of one seed."""
        pc = self.gcfg.posterior
        variants: list[tuple[str, bool]] = []
        if wanted & {"8", "11", "14"}:
            variants += [(v, True) for v in T8]
        elif "13" in wanted:
            variants += [("full", True)]
        if "13" in wanted:
            variants += [("one-sided", True)]
        m_values = sorted({max(0, round(pc.burn_in * f)) for f in (0.5, 1.0, 1.5, 2.0, 2.5)})
        sweep = ([f"k{j}" for j in range(1, 6)] if "9" in wanted else []) + \
                ([f"m{v}" for v in m_values] if "10" in wanted else [])
        sweep = [v for v in dict.fromkeys(sweep) if self._sweep_point_valid(v)]
        self.results["m_values"], self.results["k_values"] = m_values, list(range(1, 6))
        self.results["defaults"] = {"m": pc.burn_in, "k": pc.thinning, "steps": pc.steps}
        jobs = [(v, full, _variant(v, self.base_g)) for v, full in variants]
        for v in sweep:
            g = _variant(v, self.base_g)
            if self.sweep_stages == "full":
                g["stages"]["unified"] = True
            jobs.append((v, self.sweep_stages == "full", g))
        return jobs

    def _sweep_point_valid(self, name: str) -> bool:
        from genperc.training.posterior import kept_states

        pc = self.gcfg.posterior
        m, k = (int(name[1:]), pc.thinning) if name.startswith("m") else (pc.burn_in, int(name[1:]))
        try:
            kept_states(pc.steps, m, k, pc.thinning_anchor)
            return True
        except UserError:
            self.log(f"skipping {name}: no chain state left (steps={pc.steps}, m={m}, k={k})")
            return False

    def run_seed(self, seed: int, jobs: list[tuple[str, bool, dict]], shared: SharedParts) -> None:
        """Train and evaluate every job of one seed (a finished one is skipped); variants with equal
        stage-1 settings share stage 1."""
        from genperc.training.genrep import GenRepConfig, train_genrep

        scfg = load_config(base=self.cfg.to_dict(), overrides=[f"train.seed={seed}"])
        stage1_owner: dict[str, Path] = {}
        for name, full_eval, g in jobs:
            key = f"{name}-s{seed}"
            run = self.out / "runs" / key
            if key in self.results["runs"] and "top1" in self.results["runs"][key]:
                continue
            gc = GenRepConfig.from_dict(g)
            self.log(f"== {key}")
            res = train_genrep(scfg, run, train_source=self.train_src, gcfg=gc, generator=shared.generator,
                               posterior_cache=shared.cache if gc.posterior.enabled else None,
                               temperature=shared.temperature, stage1_from=stage1_owner.get(_stage1_key(g)),
                               log=self.log)
            stage1_owner.setdefault(_stage1_key(g), run)
            metrics = self.evaluate(res, run, seed, full_eval, shared)
            self.results["runs"][key] = metrics
            self.save()
            self.log(f"   top1 {metrics['top1']:.3f} ece {metrics['ece']:.3f}"
                     + (f" fid {metrics['fid']:.2f}" if "fid" in metrics else ""))

    def evaluate(self, res, run: Path, seed: int, full_eval: bool, shared: SharedParts) -> dict:
        """The run's metrics (``run/metrics.json``): perception, and generation when ``full_eval``;
        its timing and alignment statistics."""
        from genperc.evaluation.genrep import evaluate_genrep

        ev = GenRepEvalConfig(**{**self.gcfg.eval.__dict__, "seed": seed})
        if not full_eval:
            ev.generation = False
            ev.noise_levels = []
        metrics = evaluate_genrep(res.model, self.eval_ds, schedule=self.schedule, num_classes=self.num_classes,
                                  cfg=ev, extractor=shared.extractor, out_dir=run / "eval",
                                  names=self.task.class_names)
        metrics["timing"] = res.timing
        cos = [h["cos"] for h in res.align_history if not math.isnan(h.get("cos", math.nan))]
        if cos:
            metrics["align_cos_mean"] = statistics.mean(cos)
            metrics["align_conflict_share"] = sum(c < 0 for c in cos) / len(cos)
        (run / "metrics.json").write_text(json.dumps(metrics, indent=1))
        return metrics


def posterior_cost(generator, dataset, pc, schedule, k: int, *, labels_fn, images: int = 60,
                   temperature: float = 1.0) -> list[dict]:
    """What cheaper posteriors cost and change, on the first ``images`` training images: seconds per
    image, the teacher's top-1, and the KL (at temperature τ) of each variant's posterior from the
    full chain's — including the full chain with other noise, the Monte-Carlo noise floor."""
    from dataclasses import replace

    from genperc.training.genrep import teacher_mode
    from genperc.training.posterior import chain_log_densities, kept_states, posterior_from_log_densities

    n = min(images, len(dataset))
    x = torch.stack([dataset[i]["image"] for i in range(n)])
    y = labels_fn(dataset, torch.arange(n))
    rows, ref = [], None
    from genperc.errors import UserError as _UserError

    plan = [(s, 123) for s in dict.fromkeys((pc.steps, max(2, pc.steps // 2), max(2, pc.steps // 4)))]
    plan.insert(1, (pc.steps, 456))  # the same chain length with other noise: the Monte-Carlo noise floor
    for steps, chain_seed in plan:
        c = replace(pc, steps=steps, burn_in=round(pc.burn_in * steps / pc.steps))
        try:
            kept_states(steps, c.burn_in, c.thinning, c.thinning_anchor)
        except _UserError:
            continue
        g = torch.Generator().manual_seed(chain_seed)
        t0 = time.perf_counter()
        with teacher_mode(generator):
            ld, _ = chain_log_densities(generator, x, torch.arange(k), schedule=schedule, steps=steps, generator=g,
                                        density=c.density, batch_size=c.batch_size)
        sec = (time.perf_counter() - t0) / n
        kept = kept_states(steps, c.burn_in, c.thinning, c.thinning_anchor)
        _, lp = posterior_from_log_densities(ld, kept, temperature)
        if ref is None:
            ref = lp
        kl = float((ref.exp() * (ref - lp)).sum(-1).mean())
        rows.append({"steps": steps, "burn_in": c.burn_in, "noise": "other" if chain_seed != 123 else "same",
                     "seconds_per_image": sec,
                     "teacher_top1": float((lp.argmax(-1) == y).float().mean()), "kl_from_full": kl})
    return rows


def render_tables(results: dict, wanted: set[str]) -> str:
    runs = results["runs"]
    seeds = results.get("seeds", 1)

    def vals(variant: str, metric: str) -> list:
        return [runs[f"{variant}-s{s}"].get(metric) for s in range(seeds) if f"{variant}-s{s}" in runs]

    size = results.get("size", results.get("preset"))  # results.json of older runs say "preset"
    lines = [f"# GenRep diagnostics on {results['dataset']} ({size} size)", "",
             f"Machine: {results.get('machine', '?')}. {seeds} seed(s), mean ± std. "
             f"{results['train_images']} training / {results['eval_images']} evaluation images, "
             f"{len(results.get('classes', []))} classes. Top-1 and ECE in % / fraction as labelled; FID, "
             f"precision and recall in the feature space of a classifier trained on the same data "
             f"(its test top-1: {100 * results.get('featurenet_top1', float('nan')):.1f}%).", ""]
    t = results.get("teacher", {})
    if t:
        lines += [f"Generative posterior (the distillation target) on the cached training images: top-1 "
                  f"{100 * t['tau=1']['top1']:.1f}% / ECE {t['tau=1']['ece']:.3f} at τ = 1, "
                  f"{100 * t['tau']['top1']:.1f}% / ECE {t['tau']['ece']:.3f} at the fitted "
                  f"τ = {results['temperature']:.3g}.", ""]
    dense = any("miou" in r for r in runs.values())
    if wanted & {"8"}:
        head = "| variant | Top-1 (%) ↑ | ECE ↓ |" + (" mIoU (%) ↑ | depth AbsRel ↓ |" if dense else "") + \
               " FID ↓ | precision ↑ | recall ↑ | class consistency (%) ↑ |"
        lines += ["## Table 8 — components", "", head, "|" + "---|" * (head.count("|") - 1)]
        for v in T8:
            row = f"| {LABELS[v]} | {fmt_mean_std(vals(v, 'top1'), 100)} | {fmt_mean_std(vals(v, 'ece'), 1, 3)} |"
            if dense:
                row += f" {fmt_mean_std(vals(v, 'miou'), 100)} | {fmt_mean_std(vals(v, 'absrel'), 1, 3)} |"
            row += (f" {fmt_mean_std(vals(v, 'fid'), 1, 2)} | {fmt_mean_std(vals(v, 'precision'), 1, 3)} | "
                    f"{fmt_mean_std(vals(v, 'recall'), 1, 3)} | {fmt_mean_std(vals(v, 'class_consistency'), 100)} |")
            lines.append(row)
        lines.append("")
    stages_note = ("stage 1 only (perception with L_gen_distil)" if results.get("sweep_stages") == "perception"
                   else "both stages")
    d = results.get("defaults", {})
    if "9" in wanted:
        lines += [f"## Table 9 — thinning interval k (chain of {d.get('steps')} steps, m = {d.get('m')}; "
                  f"{stages_note})", "", "| k | states kept | Top-1 (%) ↑ | ECE ↓ |", "|---|---|---|---|"]
        from genperc.training.posterior import kept_states

        for j in results.get("k_values", []):
            n = int(kept_states(d["steps"], d["m"], j).numel())
            lines.append(f"| {j} | {n} | {fmt_mean_std(vals(f'k{j}', 'top1'), 100)} | {fmt_mean_std(vals(f'k{j}', 'ece'), 1, 3)} |")
        lines.append("")
    if "10" in wanted:
        lines += [f"## Table 10 — burn-in m (chain of {d.get('steps')} steps, k = {d.get('k')}; {stages_note})", "",
                  "| m | Top-1 (%) ↑ | ECE ↓ |", "|---|---|---|"]
        for m in results.get("m_values", []):
            lines.append(f"| {m} | {fmt_mean_std(vals(f'm{m}', 'top1'), 100)} | {fmt_mean_std(vals(f'm{m}', 'ece'), 1, 3)} |")
        lines.append("")
    if "11" in wanted:
        lines += ["## Table 11 — expected calibration error (15 bins)", "",
                  "| L_gen_distil | pair | ECE ↓ | Top-1 (%) |", "|---|---|---|---|"]
        for without, with_ in (("none", "gp"), ("sg", "both")):
            lines.append(f"| | {LABELS[without]} | {fmt_mean_std(vals(without, 'ece'), 1, 3)} | "
                         f"{fmt_mean_std(vals(without, 'top1'), 100)} |")
            lines.append(f"| ✓ | {LABELS[with_]} | {fmt_mean_std(vals(with_, 'ece'), 1, 3)} | "
                         f"{fmt_mean_std(vals(with_, 'top1'), 100)} |")
        lines.append("")
    if "13" in wanted:
        lines += ["## Table 13 — direction of the alignment", "",
                  "| alignment | Top-1 (%) ↑ | FID ↓ | mean cos(∇percept, ∇genera) | conflicting steps |",
                  "|---|---|---|---|---|"]
        for v in ("one-sided", "full"):
            lines.append(f"| {LABELS[v]} | {fmt_mean_std(vals(v, 'top1'), 100)} | {fmt_mean_std(vals(v, 'fid'), 1, 2)} | "
                         f"{fmt_mean_std(vals(v, 'align_cos_mean'), 1, 3)} | {fmt_mean_std(vals(v, 'align_conflict_share'), 100)}% |")
        lines.append("")
    if "14" in wanted:
        lines += ["## Table 14 — robustness to forward-noised inputs (Top-1 %)", "",
                  "| variant | t = 0 | t = 10 | t = 20 | t = 50 |", "|---|---|---|---|---|"]
        for v in ("none", "full"):
            lines.append(f"| {LABELS[v]} | {fmt_mean_std(vals(v, 'top1'), 100)} | {fmt_mean_std(vals(v, 'top1_t10'), 100)} | "
                         f"{fmt_mean_std(vals(v, 'top1_t20'), 100)} | {fmt_mean_std(vals(v, 'top1_t50'), 100)} |")
        lines.append("")
    lines += _overhead(results, vals)
    pcost = results.get("posterior_cost")
    if pcost:
        lines += ["## What the posterior costs", "",
                  f"On the first {results.get('posterior_cost_images', 60)} training images; the teacher's top-1 and "
                  f"the KL of each posterior from the full chain's at the fitted τ = "
                  f"{results.get('temperature', 1.0):.3g}.", "",
                  "| chain steps | burn-in | chain noise | s / image (C·steps calls) | teacher top-1 (%) | "
                  "KL from the first row |", "|---|---|---|---|---|---|"]
        for r in pcost:
            noise = "another draw" if r.get("noise") == "other" else "first draw"
            lines.append(f"| {r['steps']} | {r['burn_in']} | {noise} | {r['seconds_per_image']:.3f} | "
                         f"{100 * r['teacher_top1']:.1f} | {r['kl_from_full']:.3f} |")
        ct = results.get("posterior_cache")
        if ct:
            lines.append("")
            lines.append(f"Cache of the training set: {ct['images']} images, {ct['denoiser_calls']} denoiser calls, "
                         f"{ct['seconds']:.0f} s once; afterwards a cached posterior costs a lookup. A fraction f of "
                         f"each batch computed on the fly costs f × batch × s/image per step.")
        lines.append("")
    return "\n".join(lines) + "\n"


def _overhead(results: dict, vals) -> list[str]:
    """Training time per Table-8 variant (stage 1 + stage 2, mean over seeds) and the overhead of
    each GenRep component over ``none``; the posterior cache is a one-off cost shown separately."""

    def mean_of(v: str, key: str) -> float | None:
        xs = [results["runs"][f"{v}-s{s}"]["timing"].get(key) for s in range(results.get("seeds", 1))
              if f"{v}-s{s}" in results["runs"]]
        xs = [x for x in xs if x is not None]
        return statistics.mean(xs) if xs else None

    rows = [v for v in (*T8, "one-sided") if mean_of(v, "stage2_s") is not None]
    if "none" not in rows:
        return []
    base = mean_of("none", "stage1_s") + mean_of("none", "stage2_s")
    lines = ["## Training time", "",
             "| variant | stage 1 (s) | stage 2 (s) | total (s) | vs none |", "|---|---|---|---|---|"]
    for v in rows:
        s1, s2 = mean_of(v, "stage1_s"), mean_of(v, "stage2_s")
        lines.append(f"| {LABELS[v]} | {s1:.0f} | {s2:.0f} | {s1 + s2:.0f} | {100 * ((s1 + s2) / base - 1):+.1f}% |")
    ct = results.get("posterior_cache", {})
    gen = results.get("generator_s")
    lines += ["", f"Posterior cache (once, shared by every distilling run): {ct.get('seconds', float('nan')):.0f} s "
              f"for {ct.get('images', '?')} images ({ct.get('seconds_per_image', float('nan')):.2f} s per image); "
              + (f"the generator (stage 0, {gen:.0f} s) is" if gen else "the generator (stage 0) is")
              + " not counted — GenRep starts from a pretrained model. The paper reports +10.1% for the full "
              "method over a perception-only variant without the MCMC posterior (87 vs 79 GPU hours). Wall-clock "
              "on a shared machine.", ""]
    return lines
