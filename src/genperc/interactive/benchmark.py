"""Correction measured (ADDP §3.3, Table 3): a referring model alone, then corrected by correctional
guidance (Eq. 5) whose D⁻ comes from an **oracle user** or from the **agent** (Fig. 5), scored per
expression family on held-out scenes.

* **Oracle user**: D⁻ = the shortest unique description of the object the previous round's mask
  wrongly covers most (the non-target instance with the most predicted pixels; ties: the lower
  instance id) among those not named yet; when the mask covers no other object the user has nothing
  to correct and the round keeps the previous mask at no cost. Round r + 1 adds its D⁻ to the negatives of round r (several
  negatives compose as their mean, :class:`~genperc.diffusion.guidance.CorrectionalGuidance`), so
  rounds 1 → 2 → 3 is the multi-round interaction of Fig. 1c.
* **Agent**: caption → language model → k corrections in one batched run → pixel vote
  (:mod:`genperc.interactive.agent`), one extra round; beside it the arm ``vote``: the same vote
  over k *uncorrected* samples drawn the same way (:meth:`CorrectionSession.predict_each`), so that
  the gain of correction is not confused with the gain of an ensemble.
* **Weight grid**: round 2 of the oracle at every (w_D, w_D⁻), including w_D ≤ w_D⁻ (the paper
  recommends w_D > w_D⁻ and publishes no values). At w_D = w_D⁻ the D⁻ terms cancel (InstructPix2Pix
  at s_T = w_D), so those cells are the uncorrected anchors of each w_D.

Every round reuses the round-1 sample's seed, so a round differs from the last only by its
guidance. Costs: denoiser evaluations per image (steps × guidance branches, counted) and seconds,
cumulative from round 1 (the agent's include its prediction, the k corrections and the
captioner and language model's time).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from genperc.atomic import atomic_write_text
from genperc.errors import UserError
from genperc.evaluation.report import fmt_mean_std
from genperc.inference import LoadedRun, machine_info, machine_line
from genperc.interactive.session import CorrectionSession, unique_description

CORRECTIONS = ("none", "oracle", "agent")
#: (w_D, w_D⁻) cells; w_D = w_D⁻ cancels D⁻ (InstructPix2Pix at s_T = w_D): each w_D's own anchor.
DEFAULT_GRID = ((1.5, 1.0), (1.5, 1.5), (3.0, 1.0), (3.0, 3.0), (5.0, 1.0), (5.0, 5.0), (1.5, 3.0), (3.0, 0.0))


def wrong_object(scene, mask: np.ndarray, target_ids: list[int], named=()) -> int | None:
    """The instance the mask wrongly covers most, leaving out those already ``named`` as D⁻
    (None when it covers no other object)."""
    ids, counts = np.unique(scene.instances[np.asarray(mask, dtype=bool)], return_counts=True)
    skip = {0, *target_ids, *named}
    best = [(c, -i) for i, c in zip(ids.tolist(), counts.tolist(), strict=True) if i not in skip]
    return -max(best)[1] if best else None


@dataclass
class CorrectionEval:
    """Per-expression rows and the summary of :func:`evaluate_corrections`."""

    rows: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def arms(self) -> list[str]:
        return [k.removesuffix("/I") for k in self.rows[0] if k.endswith("/I")] if self.rows else []

    def summary(self) -> dict:
        """Per arm (round1, round2, …, agent, grid cells): oIoU, mIoU and cost, overall and per family."""
        out = {}
        families = sorted({r["family"] for r in self.rows})
        for arm in self.arms():
            for fam in [None, *families]:
                rows = [r for r in self.rows if fam is None or r["family"] == fam]
                inter, union = sum(r[f"{arm}/I"] for r in rows), sum(r[f"{arm}/U"] for r in rows)
                prefix = arm if fam is None else f"{arm}/{fam}"
                out[f"{prefix}/oIoU"] = inter / union if union else math.nan
                out[f"{prefix}/mIoU"] = float(np.mean([r[f"{arm}/iou"] for r in rows])) if rows else math.nan
                out[f"{prefix}/n"] = len(rows)
            out[f"{arm}/calls"] = float(np.mean([r[f"{arm}/calls"] for r in self.rows]))
            out[f"{arm}/seconds"] = float(np.mean([r[f"{arm}/seconds"] for r in self.rows]))
        return out


    def write(self, out: str | Path) -> Path:
        """``out/corrections.json`` (summary, settings, machine) and ``out/corrections.csv`` (rows)."""
        import csv
        import io

        out = Path(out)
        buf = io.StringIO()
        fields = list(dict.fromkeys(k for r in self.rows for k in r))
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(out / "corrections.csv", buf.getvalue())
        payload = {"summary": self.summary(), "settings": self.settings, "machine": machine_info(),
                   "when": time.strftime("%Y-%m-%d %H:%M:%S")}
        return atomic_write_text(out / "corrections.json", json.dumps(payload, indent=1, default=float))


def _score(row: dict, arm: str, mask: np.ndarray, target: np.ndarray, calls: int, seconds: float) -> None:
    inter, union = int(np.logical_and(mask, target).sum()), int(np.logical_or(mask, target).sum())
    row.update({f"{arm}/I": inter, f"{arm}/U": union, f"{arm}/iou": inter / union if union else 1.0,
                f"{arm}/calls": calls, f"{arm}/seconds": seconds})


def evaluate_corrections(run: LoadedRun, split: str = "test", *, correction: str = "oracle", rounds: int = 2,
                         limit: int | None = None, seed: int = 0, w_d=None, w_dminus=None, w_i=None,
                         grid=(), captioner="scene", language_model="minilm", k: int = 3,
                         progress: bool = False) -> CorrectionEval:
    """Score a referring run alone (arm ``round1``) and corrected: ``oracle`` rounds 2…``rounds``
    (arms ``round2``, …) and each (w_D, w_D⁻) of ``grid`` at round 2 (arms ``w_d=…,w_dminus=…``), or
    the ``agent`` (arm ``agent``). Items: the split's expressions in order, the first ``limit``."""
    from genperc.data.sources import open_scene_source

    if correction not in CORRECTIONS:
        raise UserError(f"unknown correction {correction!r}", f"use one of {', '.join(CORRECTIONS)}")
    if rounds < 1 or (correction == "oracle" and rounds < 2 and not grid):
        raise UserError(f"rounds={rounds}: the oracle needs at least 2 rounds", "use --rounds 2 (or 3)")
    agent = None
    if correction == "agent":
        from genperc.interactive.agent import build_captioner, build_language_model

        agent = (build_captioner(captioner), build_language_model(language_model))
    source = open_scene_source(run.cfg.data, split)
    result = CorrectionEval(settings={"split": split, "correction": correction, "rounds": rounds, "seed": seed,
                                      "grid": [list(g) for g in grid], "k": k, "captioner": captioner,
                                      "language_model": language_model, "checkpoint": str(run.checkpoint)})
    t0 = time.perf_counter()
    for index in range(len(source)):
        scene = source[index]
        if scene.instances is None:
            raise UserError(f"{split} scene {index} has no instance masks", "use a source with instance annotations")
        for expr in scene.expressions:
            if limit is not None and len(result.rows) >= limit:
                break
            target = scene.object_mask(expr.object_ids)
            session = CorrectionSession(run, scene.image, scene=scene, target_mask=target)
            if not result.settings.get("weights"):
                result.settings.update(weights=session.default_weights(w_d, w_dminus, w_i),
                                       sampler=session.sample_cfg.sampler, steps=session.sample_cfg.steps)
            row = {"scene": index, "expression": expr.text, "family": expr.family}
            first = session.predict(expr.text, seed=seed)
            _score(row, "round1", first.mask, target, first.denoiser_calls, first.seconds)
            if correction == "oracle":
                _oracle_rounds(session, scene, expr.object_ids, target, row, rounds, w_d, w_dminus, w_i, grid)
            elif correction == "agent":
                from genperc.interactive.agent import run_agent

                done = run_agent(session, expr.text, captioner=agent[0], language_model=agent[1], k=k,
                                 w_d=w_d, w_dminus=w_dminus, w_i=w_i, seed=seed)
                _score(row, "agent", done.mask, target, done.denoiser_calls, done.seconds)
                row["agent/confusers"] = "; ".join(done.agent.get("confusers", []))
                _vote_anchor(session, first, row, target, k, w_d, w_i)
            result.rows.append(row)
            if progress and len(result.rows) % 20 == 0:
                print(f"  {len(result.rows)} expressions, {time.perf_counter() - t0:.0f} s", flush=True)
        if limit is not None and len(result.rows) >= limit:
            break
    if not result.rows:
        raise UserError(f"the {split} split has no referring expressions", "use a split with expressions")
    result.settings["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def _vote_anchor(session, first, row, target, k, w_d, w_i) -> None:
    """Arm ``vote``: the agent's vote (ties → the first prediction) over k uncorrected samples."""
    from genperc.interactive.agent import majority_vote

    masks, info = session.predict_each(k, w_d=w_d, w_i=w_i)
    _score(row, "vote", majority_vote(masks, tie=first.mask), target, first.denoiser_calls + info["denoiser_calls"] * k,
           first.seconds + info["seconds"])


def _oracle_rounds(session, scene, target_ids, target, row, rounds, w_d, w_dminus, w_i, grid) -> None:
    negatives: list[str] = []
    named: list[int] = []
    first = session.history[0]
    mask, calls, seconds = first.mask, first.denoiser_calls, first.seconds  # cumulative from round 1
    for r in range(2, rounds + 1):
        wrong = wrong_object(scene, mask, target_ids, named)
        if wrong is not None:
            named.append(wrong)
            negatives.append(unique_description(scene, wrong))
            done = session.correct(list(negatives), w_d=w_d, w_dminus=w_dminus, w_i=w_i)
            mask, calls, seconds = done.mask, calls + done.denoiser_calls, seconds + done.seconds
        _score(row, f"round{r}", mask, target, calls, seconds)
        row[f"round{r}/negatives"] = "; ".join(negatives)
    first_wrong = wrong_object(scene, first.mask, target_ids)
    for gd, gn in grid:
        arm = f"w_d={gd:g},w_dminus={gn:g}"
        if first_wrong is None:
            _score(row, arm, first.mask, target, first.denoiser_calls, first.seconds)
            continue
        masks, info = session.correct_each([unique_description(scene, first_wrong)], w_d=gd, w_dminus=gn, w_i=w_i)
        _score(row, arm, masks[0], target, first.denoiser_calls + info["denoiser_calls"],
               first.seconds + info["seconds"])


# ---------------------------------------------------------------------- Table 3


def table3(results: dict[str, dict[str, CorrectionEval]], out: str | Path) -> Path:
    """Markdown tables of ``results[run name][correction] = CorrectionEval`` (mean ± std over runs):
    arms × families, the weight grid and the cost; written to ``out/tables.md`` with results.json."""
    out = Path(out)
    summaries = {name: {c: e.summary() for c, e in by.items()} for name, by in results.items()}
    first = next(iter(results.values()))
    families = sorted({r["family"] for e in first.values() for r in e.rows})
    arms = [(c, a) for c, e in first.items() for a in e.arms() if a != "round1"]
    arms.insert(0, (next(iter(first)), "round1"))  # the model alone, once: every correction starts from it
    main_arms = [(c, a) for c, a in arms if not a.startswith("w_d=")]
    grid_arms = [(c, a) for c, a in arms if a.startswith("w_d=")]

    def cell(c, a, key):
        return fmt_mean_std([summaries[n][c].get(f"{a}/{key}") for n in summaries], scale=100)

    any_eval = next(iter(first.values()))
    lines = [f"Machine: {machine_line()}. Runs: {', '.join(results)}; "
             f"{any_eval.settings['sampler']} {any_eval.settings['steps']} steps, weights "
             f"{any_eval.settings['weights']}, {len(any_eval.rows)} expressions of the "
             f"`{any_eval.settings['split']}` split; oIoU in %, mean ± std over runs.", "",
             "| Table 3 | oIoU | " + " | ".join(families) + " | denoiser calls / image (cumulative) | s / image |",
             "|---|---|" + "---|" * len(families) + "---|---|"]
    labels = {"round1": "model alone (round 1)", "agent": "+ correction by the agent",
              "vote": "vote of k uncorrected samples (the agent's anchor)"}
    for c, a in main_arms:
        label = labels.get(a, f"+ oracle user, round {a.removeprefix('round')}")
        calls = fmt_mean_std([summaries[n][c].get(f"{a}/calls") for n in summaries], digits=0)
        secs = fmt_mean_std([summaries[n][c].get(f"{a}/seconds") for n in summaries], digits=2)
        lines.append(f"| {label} | {cell(c, a, 'oIoU')} | "
                     + " | ".join(cell(c, f"{a}/{f}", "oIoU") for f in families) + f" | {calls} | {secs} |")
    if grid_arms:
        lines += ["", "| oracle round 2 at (w_D, w_D⁻) | oIoU | " + " | ".join(families) + " |",
                  "|---|---|" + "---|" * len(families)]
        for c, a in grid_arms:
            lines.append(f"| {a.replace('w_d=', 'w_D = ').replace(',w_dminus=', ', w_D⁻ = ')} | {cell(c, a, 'oIoU')} | "
                         + " | ".join(cell(c, f"{a}/{f}", "oIoU") for f in families) + " |")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(
        {"machine": machine_info(), "summaries": summaries,
         "settings": {n: {c: e.settings for c, e in by.items()} for n, by in results.items()}}, indent=1,
        default=float))
    return atomic_write_text(out / "tables.md", "\n".join(lines) + "\n")


def parse_grid(text: str) -> list[tuple[float, float]]:
    """``"3:1,1.5:3"`` → [(3.0, 1.0), (1.5, 3.0)]: (w_D, w_D⁻) pairs."""
    pairs = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        try:
            w_d, w_n = (float(v) for v in item.split(":"))
        except ValueError:
            raise UserError(f"grid cell {item!r} is not w_D:w_D⁻", 'use e.g. --grid "3:1,1.5:3"') from None
        pairs.append((w_d, w_n))
    return pairs


def run_table3(run_dirs: list[str | Path], out: str | Path, *, split: str = "test", limit: int | None = 160,
               rounds: int = 3, grid=DEFAULT_GRID, agent: bool = True, k: int = 3, seed: int = 0,
               captioner: str = "scene", language_model: str = "minilm", progress: bool = True) -> Path:
    """``genperc experiment correct``: every run (one per training seed) scored alone, with the
    oracle user over ``rounds`` and the weight ``grid``, and with the agent; each evaluation is
    saved as it finishes (``out/<run>/<correction>/corrections.json``) and reused by a rerun."""
    from genperc.inference import load_run

    if not run_dirs:
        raise UserError("no runs given", "pass the referring run directories (one per training seed)")
    out = Path(out)
    results: dict[str, dict[str, CorrectionEval]] = {}
    for run_dir in run_dirs:
        run = load_run(run_dir)
        name = Path(run_dir).name
        results[name] = {}
        for correction in ("oracle", "agent") if agent else ("oracle",):
            dest = out / name / correction
            if (dest / "corrections.csv").is_file():
                results[name][correction] = _read(dest)
                continue
            if progress:
                print(f"{name}: correction by the {correction}", flush=True)
            ev = evaluate_corrections(run, split, correction=correction, rounds=rounds, limit=limit, seed=seed,
                                      grid=grid if correction == "oracle" else (), captioner=captioner,
                                      language_model=language_model, k=k, progress=progress)
            ev.write(dest)
            results[name][correction] = ev
    return table3(results, out)


def _read(dest: Path) -> CorrectionEval:
    """A saved evaluation (``CorrectionEval.write``) back, numbers as numbers."""
    import csv

    def num(v: str):
        try:
            return int(v)
        except ValueError:
            try:
                return float(v)
            except ValueError:
                return v

    with (dest / "corrections.csv").open() as f:
        rows = [{k: num(v) if "/" in k or k == "scene" else v for k, v in r.items()} for r in csv.DictReader(f)]
    return CorrectionEval(rows=rows, settings=json.loads((dest / "corrections.json").read_text())["settings"])
