"""``genperc experiment curves``: learning curves (issue 12) — the held-out main metric against
training steps, for the generative model and its discriminative counterpart, over seeds.

ADDP's Table 2 sets the generative formulation against the discriminative one at the same
backbone; a single final number hides *when* one overtakes the other and whether either still
improves. Here every mode of ``--modes`` (``model.mode``: ``generative``, sampled; ``discriminative``,
the same denoiser in one forward with the task's loss, :mod:`genperc.models.discriminative`) is
trained for ``--seeds`` seeds (``train.seed`` = the config's seed + 0, 1, …) from one preset and
the same overrides, so the two differ only in the mode. Each run keeps a checkpoint every
``--every`` steps (``train.checkpoint_every``; ``train.keep_checkpoints`` large enough to keep
them all) and each kept checkpoint is then scored by :func:`genperc.inference.evaluate_run` on
the first ``--limit`` items of ``--split``, with the run's own sample settings and sampling seed 0
— exactly what ``genperc eval`` of that checkpoint gives. The task's trivial baselines
(:mod:`genperc.evaluation.baselines`) are scored once on the same items.

Why train first and evaluate the kept checkpoints after, rather than evaluate inside the trainer
(a hook): the number is by construction the one an independent ``load_run(RUN, checkpoint=k)``
+ ``evaluate_run`` gives (EMA weights as saved, a fresh model in eval mode, no state shared
with training); training is untouched (its RNG, its timing); and a crash at any point loses at
most one evaluation. The price is disk: every ``--every``-th checkpoint stays (weights, EMA and
optimizer state).

Resuming: each (mode, seed) is a run directory ``OUT/runs/<mode>-s<seed>``. A run with a
checkpoint resumes training from its newest one (after checking that its saved config is the one
asked for, sample settings aside); every evaluation is recorded in ``RUN/curve.json`` with its
settings and the checkpoint it scored, and reused while both are unchanged. Written:
``OUT/curves.csv`` (one row per mode, seed and evaluated step: the headline metrics),
``OUT/curves.png`` (main metric against step, mean ± std over seeds per mode, baselines dashed),
``OUT/tables.md`` and ``OUT/results.json``.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import time
from dataclasses import asdict
from pathlib import Path

from genperc.atomic import atomic_write_text
from genperc.config import MODEL_MODES, RunConfig, check_same_run, load_config, load_run_config
from genperc.errors import UserError
from genperc.evaluation.baselines import DEFAULT_FIT_ITEMS
from genperc.experiments.common import fmt_mean_std, machine_line, parse_choices

DEFAULT_MODES = ",".join(MODEL_MODES)
EVAL_SEED = 0
#: config keys that do not change what a run trains (left out of the check before resuming)


def parse_modes(modes: str) -> list[str]:
    """``"generative,discriminative"`` → the ``model.mode`` values, in order, without repeats."""
    return parse_choices(modes, MODEL_MODES, "mode")


def eval_steps(steps: int, every: int) -> list[int]:
    """The training steps a checkpoint is kept and scored at: every ``every``-th, and the last."""
    return sorted({*range(every, steps + 1, every), steps})


def check_arguments(seeds: int, steps: int, every: int, limit: int | None) -> None:
    for name, value in (("--seeds", seeds), ("--steps", steps), ("--every", every)):
        if value < 1:
            raise UserError(f"{name} {value} is not positive", f"use {name} 1 or more")
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit} is not positive", "use e.g. --limit 100, or leave it out for the whole split")


def run_config(base: RunConfig, mode: str, seed: int, steps: int, every: int) -> RunConfig:
    """One run's config: the base with its mode, seed, steps and a kept checkpoint every ``every`` steps."""
    keep = len(eval_steps(steps, every)) + 1
    return load_config(base=base.to_dict(), overrides=[f"model.mode={mode}", f"train.seed={seed}", f"train.steps={steps}",
                                                       f"train.checkpoint_every={every}", f"train.keep_checkpoints={keep}"])


def trained_step(run_dir: Path) -> int:
    """The step of the run's newest checkpoint (0 when it has none)."""
    from genperc.experiments.sampling import training_steps

    ckpts = sorted((run_dir / "checkpoints").glob("step-*"))
    return training_steps(ckpts[-1]) if ckpts else 0


def train_run(cfg: RunConfig, run_dir: Path, text_encoder, log=print) -> bool:
    """Train the run to ``train.steps``, resuming from its newest checkpoint; False when already done."""
    from genperc.training.trainer import Trainer

    done = trained_step(run_dir)
    if done:
        check_same_run(run_dir, cfg, "use another --out, or the preset, overrides, --steps and --every it was run with")
    if done >= cfg.train.steps:
        return False
    log(f"{run_dir.name}: training steps {done}→{cfg.train.steps}" + (" (resumed)" if done else ""))
    Trainer(cfg, run_dir, text_encoder=text_encoder).train(resume=done > 0, overwrite=not done)
    return True


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, payload: dict) -> None:
    atomic_write_text(path, json.dumps(payload, indent=1, default=float))


def _stamp(checkpoint: Path) -> int:
    """Identifies a checkpoint's contents: a retrained checkpoint of the same step is re-scored."""
    return (checkpoint / "state.json").stat().st_mtime_ns


def _sample_overrides(run_dir: Path, cfg: RunConfig) -> list[str]:
    """Dotted overrides that give the run the sample settings asked for (none when it has them)."""
    saved = asdict(load_run_config(run_dir).sample)
    return [f"sample.{k}={json.dumps(v)}" for k, v in asdict(cfg.sample).items() if saved.get(k) != v]


def evaluate_checkpoints(cfg: RunConfig, run_dir: Path, steps: list[int], *, split: str, limit: int | None,
                         text_encoder, log=print) -> dict[int, dict]:
    """{step: {summary, items, checkpoint, seconds}} for every step, each scored by
    :func:`~genperc.inference.evaluate_run` or reused from ``RUN/curve.json``."""
    from genperc.inference import evaluate_run, find_checkpoint, load_run

    key = json.loads(json.dumps({"split": split, "limit": limit, "seed": EVAL_SEED, "sample": asdict(cfg.sample)}))
    record_path = run_dir / "curve.json"
    record = _read_json(record_path)
    done = record.get("evaluations", {}) if record.get("key") == key else {}
    overrides = _sample_overrides(run_dir, cfg)
    results = {}
    for step in steps:
        ckpt = find_checkpoint(run_dir, step)
        old = done.get(str(step))
        if old is not None and old.get("stamp") == _stamp(ckpt):
            results[step] = {**old, "reused": True}
            continue
        run = load_run(run_dir, checkpoint=step, text_encoder=text_encoder, overrides=overrides)
        res = evaluate_run(run, split, limit=limit, seed=EVAL_SEED, out=run_dir / "eval" / f"{split}-{ckpt.name}",
                           progress=True)
        results[step] = done[str(step)] = {"summary": res.summary, "items": res.settings["items"],
                                           "checkpoint": str(ckpt), "weights": run.weights,
                                           "seconds": res.settings["seconds"], "stamp": _stamp(ckpt)}
        _write_json(record_path, {"key": key, "evaluations": done})
        main = run.task.main_metric
        log(f"{run_dir.name} step {step}: {main} {res.summary.get(main, math.nan):.4f}")
    return results


def score_baselines_once(cfg: RunConfig, out: Path, *, split: str, limit: int | None, fit_items: int,
                         log=print) -> dict:
    """The task's trivial baselines on the first ``limit`` items of ``split`` (fitted on up to
    ``fit_items`` items of the training split), from ``OUT/baselines.json`` when already scored."""
    from genperc import build
    from genperc.data.sources import open_scene_source
    from genperc.evaluation.baselines import fit_baselines, score_baselines

    key = {"task": cfg.task, "task_options": cfg.task_options, "data": asdict(cfg.data), "split": split,
           "limit": limit, "fit_items": fit_items}
    key = json.loads(json.dumps(key, default=str))
    path = out / "baselines.json"
    saved = _read_json(path)
    if saved.get("key") == key:
        return saved
    task = build.build_task(cfg)
    predictors = fit_baselines(task, open_scene_source(cfg.data, cfg.data.train_split), cfg.data.resolution,
                               fit_items=fit_items)  # fitted first: the evaluation set's settings win
    dataset = task.dataset(open_scene_source(cfg.data, split), cfg.data.resolution)
    scores = score_baselines(task, dataset, predictors, limit=limit, batch_size=cfg.sample.batch_size)
    result = {"key": key, "scores": scores, "predictors": {b.name: b.description for b in predictors},
              "fit_split": cfg.data.train_split, "fit_items": fit_items}
    _write_json(path, result)
    log("baselines: " + ", ".join(f"{n} {s.get(task.main_metric, math.nan):.4f}" for n, s in scores.items()))
    return result


# --------------------------------------------------------------------------- outputs


def curve_rows(mode: str, seed: int, evaluations: dict[int, dict], metrics: list[str]) -> list[dict]:
    return [{"mode": mode, "seed": seed, "step": step, **{m: ev["summary"].get(m, math.nan) for m in metrics},
             "items": ev["items"]} for step, ev in sorted(evaluations.items())]


def write_csv(rows: list[dict], path: Path) -> Path:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _arrow(metric: str) -> str:
    from genperc.metrics import LOWER_IS_BETTER

    return "↓" if metric.rsplit("/", 1)[-1] in LOWER_IS_BETTER else "↑"


def _values(rows: list[dict], mode: str, step: int, metric: str) -> list[float]:
    return [r[metric] for r in rows if r["mode"] == mode and r["step"] == step]


def render_table(results: dict, metric: str) -> list[str]:
    """Rows the evaluated steps (then the baselines), columns the modes: mean ± std over seeds."""
    rows, modes = results["rows"], results["modes"]
    lines = [f"### {metric.replace('delta', 'δ')} {_arrow(metric)}", "",
             "| step | " + " | ".join(modes) + " |", "| ---: |" + " ---: |" * len(modes)]
    for step in results["eval_steps"]:
        lines.append(f"| {step} | " + " | ".join(fmt_mean_std(_values(rows, m, step, metric), digits=4)
                                                  for m in modes) + " |")
    for name, summary in results.get("baselines", {}).items():
        cell = fmt_mean_std([summary.get(metric, math.nan)], digits=4)
        lines.append(f"| baseline: {name} | " + " | ".join([cell] * len(modes)) + " |")
    return lines + [""]


def render_tables(results: dict, machine: str) -> str:
    seeds = ", ".join(map(str, results["seeds"]))
    lines = ["## Learning curves: held-out metrics against training steps (issue 12; ADDP Table 2's comparison)", "",
             f"`genperc experiment curves --preset {results['preset']}` "
             + " ".join(results["overrides"]) + f" (genperc.experiments.curves): {results['task']}, "
             f"{results['steps']} training steps, a checkpoint scored every {results['every']}; modes "
             f"{', '.join(results['modes'])}; training seeds {seeds} (mean ± std over seeds); {results['split']} split, "
             f"{results['items']} items, each run's sample settings ({results['sample_line']}), sampling seed "
             f"{EVAL_SEED}; {results['weights']} weights.",
             f"Baselines: the task's trivial baselines on the same items (fitted on up to {results['fit_items']} "
             f"items of the training split)." if results.get("baselines") else "Baselines: not scored.",
             f"Machine: {machine}.", ""]
    for metric in results["metrics"]:
        lines += render_table(results, metric)
    return "\n".join(lines)


def plot_curves(results: dict, path: Path) -> Path:
    """The main metric against the training step: mean ± std over seeds per mode, baselines dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, rows = results["main_metric"], results["rows"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for mode in results["modes"]:
        steps = [s for s in results["eval_steps"] if _values(rows, mode, s, metric)]
        vals = [[v for v in _values(rows, mode, s, metric) if not math.isnan(v)] for s in steps]
        mean = [statistics.mean(v) if v else math.nan for v in vals]
        std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
        line, = ax.plot(steps, mean, marker="o", ms=3, label=f"{mode} ({_plural(len(results['seeds']), 'seed')})")
        ax.fill_between(steps, [m - s for m, s in zip(mean, std, strict=True)], [m + s for m, s in zip(mean, std, strict=True)],
                        color=line.get_color(), alpha=0.2, lw=0)
    for k, (name, summary) in enumerate(results.get("baselines", {}).items()):
        value = summary.get(metric, math.nan)
        if not math.isnan(value):
            ax.axhline(value, ls="--", lw=1, color=f"C{len(results['modes']) + k}", label=f"baseline: {name}")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{metric} {_arrow(metric)} ({results['split']}, {results['items']} items)")
    ax.set_title(f"{results['task']}: learning curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- the experiment


def _sample_line(cfg: RunConfig, modes: list[str]) -> str:
    sc = cfg.sample
    gen = (f"generative: {sc.sampler} {sc.steps} {cfg.diffusion.timestep_spacing} steps, η {sc.eta:g}, "
           f"s_T {sc.text_scale:g} / s_I {sc.image_scale:g}")
    parts = [gen] if "generative" in modes else []
    return "; ".join(parts + (["discriminative: one forward"] if "discriminative" in modes else []))


def _text_encoder(cfg: RunConfig):
    from genperc import build

    return build.build_text_encoder(cfg, build.build_task(cfg))


def run_experiment(preset: str = "cpu-tiny", overrides: list[str] | None = None, *, modes: str = DEFAULT_MODES,
                   seeds: int = 3, steps: int | None = None, every: int | None = None, split: str = "val",
                   limit: int | None = None, out: str | Path = "runs/curves", baselines: bool = True,
                   baseline_fit_items: int = DEFAULT_FIT_ITEMS, log=print) -> dict:
    """Train (or resume) every mode × seed, score its kept checkpoints and the baselines, write
    ``OUT/curves.csv``, ``curves.png``, ``tables.md`` and ``results.json``; return the results.
    Arguments and the split are checked before anything trains."""
    from genperc.data.sources import open_scene_source
    from genperc.tasks import TASKS

    mode_names, overrides = parse_modes(modes), list(overrides or [])
    base = load_config(preset, overrides)
    steps = base.train.steps if steps is None else steps
    every = base.train.checkpoint_every if every is None else every
    check_arguments(seeds, steps, every, limit)
    open_scene_source(base.data, split)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seed_values = [base.train.seed + k for k in range(seeds)]
    at = eval_steps(steps, every)
    baseline_scores = score_baselines_once(base, out, split=split, limit=limit, fit_items=baseline_fit_items,
                                           log=log) if baselines else None
    text_encoder = _text_encoder(base)
    metrics = TASKS[base.task].headline_metrics()
    rows, weights, items, fresh = [], "ema", None, 0
    start = time.perf_counter()
    for mode in mode_names:
        for seed in seed_values:
            cfg = run_config(base, mode, seed, steps, every)
            run_dir = out / "runs" / f"{mode}-s{seed}"
            train_run(cfg, run_dir, text_encoder, log=log)
            evaluations = evaluate_checkpoints(cfg, run_dir, at, split=split, limit=limit, text_encoder=text_encoder,
                                               log=log)
            rows += curve_rows(mode, seed, evaluations, metrics)
            fresh += sum(not ev.get("reused") for ev in evaluations.values())
            last = evaluations[at[-1]]
            weights, items = last["weights"], last["items"]
    results = {"experiment": "curves", "preset": preset, "overrides": overrides, "task": base.task,
               "main_metric": TASKS[base.task].main_metric, "metrics": metrics, "modes": mode_names,
               "seeds": seed_values, "steps": steps, "every": every, "eval_steps": at, "split": split, "limit": limit,
               "items": items, "eval_seed": EVAL_SEED, "weights": weights, "sample": asdict(base.sample),
               "sample_line": _sample_line(base, mode_names), "rows": rows,
               **({"baselines": baseline_scores["scores"], "baseline_predictors": baseline_scores["predictors"],
                   "fit_items": baseline_fit_items} if baseline_scores else {})}
    write_outputs(results, out)
    log(f"{len(rows)} checkpoints, {fresh} scored now and {len(rows) - fresh} reused, in "
        f"{time.perf_counter() - start:.0f} s")
    return results


def write_outputs(results: dict, out: Path) -> list[Path]:
    from genperc.inference import machine_info

    machine = machine_info()
    paths = [write_csv(results["rows"], out / "curves.csv"), plot_curves(results, out / "curves.png")]
    (out / "tables.md").write_text(render_tables(results, machine_line()))
    _write_json(out / "results.json", {**results, "machine": machine, "when": time.strftime("%Y-%m-%d %H:%M:%S")})
    return [*paths, out / "tables.md", out / "results.json"]
