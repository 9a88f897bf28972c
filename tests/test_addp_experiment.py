"""``genperc experiment addp`` (ADDP Table 5, Fig. 7, Fig. 8): the run plan, the choice of the best
strategy, the tables, their anchors (discriminative counterpart, trivial baselines), resuming, and a
tiny end-to-end run on a freshly rendered world."""

import json

import pytest
import torch

from genperc.errors import UserError
from genperc.experiments import addp as A


def _results(task, runs, seeds=2, strategies=A.TABLE5, intensities=(0.0, 1.0), best=None):
    main = "oIoU" if task == "referring" else "AbsRel"
    cfg = A.load_config("cpu-tiny" if task == "referring" else "cpu-depth")
    out = {"task": task, "size": "cpu", "seeds": seeds, "size_spec": A.asdict(A.SIZES[(task, "cpu")]),
           "train_items": 100, "test_items": 10, "val_items": 10, "main_metric": main, "strategies": list(strategies),
           "intensities": list(intensities), "workers": 2, "threads": 1, "config": cfg.to_dict(), "machine": "test",
           "runs": {}}
    for (name, seed), value in runs.items():
        summary = {main: value, "mIoU": value / 2, "Prec@0.5": value, "delta1": 1 - value, "RMSE": value}
        out["runs"][f"{name}-s{seed}"] = {"name": name, "seed": seed, "summary": summary, "timesteps": [999, 499],
                                          "per_step": [{k: v / 2 for k, v in summary.items()}, summary],
                                          "train_s": 10.0, "eval_s": 2.0, "images_per_s": 30.0}
    if best:
        out["best_strategy"] = best
    return out


def test_best_strategy_follows_the_metric_direction():
    runs = {(n, s): v + 0.01 * s for n, v in [("uniform", 0.1), ("loss-diffusion", 0.2), ("prob-diffusion", 0.3)]
            for s in range(2)}
    assert A.best_strategy(_results("referring", runs), ["uniform", "loss-diffusion", "prob-diffusion"], 2) == \
        "prob-diffusion"  # oIoU: higher is better
    assert A.best_strategy(_results("depth", runs), ["uniform", "loss-diffusion", "prob-diffusion"], 2) == \
        "uniform"  # AbsRel: lower is better
    with pytest.raises(UserError, match="no strategy run finished"):
        A.best_strategy(_results("depth", {}), ["uniform"], 2)


def test_tables_show_mean_and_std_over_seeds_and_the_paper_column():
    runs = {("uniform", 0): 0.10, ("uniform", 1): 0.20, ("prob-diffusion", 0): 0.30, ("prob-diffusion", 1): 0.50,
            ("prob-diffusion-aug1", 0): 0.6, ("prob-diffusion-aug1", 1): 0.6}
    md = A.render_tables(_results("referring", runs, strategies=("uniform", "prob-diffusion"), best="prob-diffusion"))
    rows = {}
    for line in md.splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split("|")[1].strip(), line)  # the first table a row name appears in
    assert "15.0 ± 7.1" in rows["uniform"] and "56.42" in rows["uniform"]  # mean ± sample std, in %
    assert "40.0 ± 14.1" in rows["probability scaling, diffusion c²"] and "63.05" in rows[
        "probability scaling, diffusion c²"]
    assert "60.0 ± 0.0" in rows["1×"] and "40.0 ± 14.1" in rows["0×"]  # intensity 0 is the strategy's run
    assert A.final_name(_results("referring", runs, best="prob-diffusion")) == "prob-diffusion-aug1"
    assert "prob-diffusion-aug1 (after)" in md and "| uniform (before) | 7.5 | 15.0 |" in md  # Fig. 7 per step


def test_anchor_rows_discriminative_and_baselines():
    """The discriminative counterpart (mean ± std over seeds) and each baseline (one value) below the
    strategies of Table 5 and the intensities of Fig. 8; the discriminative run, even when it scores
    best, is never the best strategy nor the final run of the per-step table."""
    runs = {("uniform", 0): 0.10, ("uniform", 1): 0.20, ("prob-diffusion", 0): 0.30, ("prob-diffusion", 1): 0.50,
            ("discriminative", 0): 0.70, ("discriminative", 1): 0.90, ("prob-diffusion-aug1", 0): 0.6,
            ("prob-diffusion-aug1", 1): 0.6}
    results = _results("referring", runs, strategies=("uniform", "prob-diffusion"))
    results["runs"]["discriminative-s0"]["per_step"] = [results["runs"]["discriminative-s0"]["summary"]]
    results["runs"]["discriminative-s1"]["per_step"] = [results["runs"]["discriminative-s1"]["summary"]]
    results["discriminative"] = True
    results["baselines"] = {"empty mask": {"oIoU": 0.0, "mIoU": 0.0, "Prec@0.5": 0.0, "items": 10},
                            "named shape": {"oIoU": 0.4567, "mIoU": 0.25, "Prec@0.5": 0.125, "items": 10}}
    results["baseline_settings"] = {"fit_split": "train", "fit_items": 500, "predictors": {}}
    results["best_strategy"] = A.best_strategy(results, results["strategies"], 2)
    assert results["best_strategy"] == "prob-diffusion"  # oIoU 80 % of the discriminative run is not a candidate
    assert A.final_name(results) == "prob-diffusion-aug1"
    md = A.render_tables(results)
    label = A.DISCRIMINATIVE_LABEL
    assert _row(md, "Table 5", label) == ["80.0 ± 14.1", "40.0 ± 7.1", "80.0 ± 14.1", "–"]  # no paper number
    assert _row(md, "Table 5", "baseline: named shape") == ["45.7", "25.0", "12.5", "–"]
    assert _row(md, "Table 5", "baseline: empty mask") == ["0.0", "0.0", "0.0", "–"]
    assert _row(md, "Fig. 8", label) == ["80.0 ± 14.1", "40.0 ± 7.1", "80.0 ± 14.1"]
    assert _row(md, "Fig. 8", "baseline: named shape") == ["45.7", "25.0", "12.5"]
    assert "up to 500 items of the train split" in md
    curves = md.split("## Fig. 7", 1)[1].split("\n## ", 1)[0]
    assert "discriminative" not in curves and "prob-diffusion-aug1 (after)" in curves
    # planned without the counterpart (--no-discriminative): no row, the baselines stay
    md = A.render_tables({**results, "discriminative": False})
    assert label not in md and "baseline: named shape" in md


def test_discriminative_jobs_and_the_plan(tmp_path):
    """One discriminative job per seed on the base config with model.mode=discriminative, added to
    part (a) unless turned off; the best strategy is chosen among the strategies only."""
    experiment = _experiment(tmp_path, lambda m: None)
    jobs = A.discriminative_jobs(experiment, 2)
    assert [(j["name"], j["seed"]) for j in jobs] == [("discriminative", 0), ("discriminative", 1)]
    for j in jobs:
        assert j["config"]["model"]["mode"] == "discriminative" and j["config"]["train"]["seed"] == j["seed"]
        assert j["config"]["train"]["augment"] == 0 and not j["calibrate"]
        assert j["eval_indices"] == experiment.test_indices and j["eval_split"] == "test"
        assert {k: v for k, v in j["config"].items() if k != "model"} == {
            k: v for k, v in experiment.job("uniform", j["seed"], [])["config"].items() if k != "model"}
    planned = []
    experiment.run_jobs = lambda jobs, then=None: planned.append([A._key(j) for j in jobs])
    experiment.results = _results("depth", {("uniform", 0): 0.3, ("discriminative", 0): 0.1}, seeds=1)
    assert A.run_strategies(experiment, "depth", ["uniform"], 1) == "uniform"  # AbsRel 0.1 is not a candidate
    assert A.run_strategies(experiment, "depth", ["uniform"], 1, discriminative=False) == "uniform"
    assert planned == [["uniform-s0", "discriminative-s0"], ["uniform-s0"]]


@pytest.mark.parametrize("flag, expected", [([], True), (["--no-discriminative"], False),
                                            (["--discriminative"], True)])
def test_cli_discriminative_flag(tmp_path, monkeypatch, flag, expected):
    from genperc.cli import main

    seen = {}
    monkeypatch.setattr(A, "run_experiment", lambda **kw: seen.update(kw))
    assert main(["experiment", "addp", "--out", str(tmp_path), *flag]) == 0
    assert seen["discriminative"] is expected


def test_strategy_overrides():
    assert A._strategy_overrides("loss-diffusion", "depth", None) == ["train.timesteps=loss-scaling",
                                                                      "train.contributions=diffusion"]
    assert A._strategy_overrides("prob-perception", "referring", "/x/c.json")[1] == "train.contributions=/x/c.json"
    assert A._strategy_overrides("prob-authors", "depth", None)[1] == "train.contributions=addp-depth"


@pytest.mark.parametrize("kwargs, match", [
    (dict(strategies="uniform,fancy"), "unknown strategy 'fancy'"),
    (dict(strategies="prob-perception"), "keep uniform"),
    (dict(intensities="0,x"), "comma-separated"),
    (dict(intensities="-1"), "≥ 0"),
    (dict(seeds=0), "--seeds 0"),
    (dict(task="classification"), "unknown task"),
    (dict(size="tpu"), "unknown experiment size 'tpu'"),
])
def test_bad_arguments_are_named(tmp_path, kwargs, match):
    with pytest.raises(UserError, match=match):
        A.run_experiment(**{"out": tmp_path, **kwargs})


# eval_items 3 of the 4 test items: the anchors must be scored on the same chosen subset as the runs
TINY = A.ExperimentSize("cpu-depth", 32, {"train": 6, "val": 6, "test": 4}, steps=3, batch_size=2, eval_items=3,
                calib_items=6, workers=1, threads=0, overrides=["sample.steps=3", "train.warmup_steps=1"])


def _row(markdown: str, heading: str, label: str) -> list[str]:
    """The cells of the row ``label`` in the table under ``## heading…``."""
    section = markdown.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == label:
            return cells[1:]
    raise AssertionError(f"no row {label!r} under {heading!r}")


def _cells(summary: dict, task: str = "depth") -> list[str]:
    """A one-value row of the task's table columns, formatted by hand."""
    return {"depth": lambda s: [f"{100 * s['AbsRel']:.2f}", f"{100 * s['delta1']:.1f}", f"{s['RMSE']:.3f}"],
            "referring": lambda s: [f"{100 * s[k]:.1f}" for k in ("oIoU", "mIoU", "Prec@0.5")]}[task](summary)


def test_tiny_experiment_end_to_end_and_resume(tmp_path, monkeypatch):
    from genperc import build
    from genperc.data.sources import open_scene_source
    from genperc.diffusion.timesteps import load_contributions
    from genperc.evaluation import baselines as B

    res = A.run_experiment("depth", TINY, seeds=1, out=tmp_path, intensities="0,1", log=lambda m: None)
    runs = res["runs"]
    assert set(runs) >= {"uniform-s0", "loss-diffusion-s0", "prob-diffusion-s0", "prob-perception-s0",
                         "discriminative-s0"}
    # AbsRel differs between depth maps, so the uniform model's perception c² always exists and
    # the prob-perception run trains on exactly that table
    est = runs["uniform-s0"]["perception_c2"]
    assert runs["prob-perception-s0"]["contributions"] == est["path"]
    per_timestep = load_contributions(est["path"], 1000)
    assert torch.allclose(per_timestep[::100] * 100, torch.tensor(est["factors"], dtype=per_timestep.dtype), atol=1e-5)
    best = res["best_strategy"]
    assert best in A.TABLE5 and runs[f"{best}-aug1-s0"]["augment"] == 1.0
    for r in runs.values():
        assert r["steps"] == 3 and r["summary"] == r["per_step"][-1]
        if r["name"] == "discriminative":  # one forward pass at t = T−1: one "step"
            assert r["mode"] == "discriminative" and r["timesteps"] == [999] and len(r["per_step"]) == 1
        else:
            assert r["mode"] == "generative" and len(r["per_step"]) == len(r["timesteps"]) == 3
    assert runs["loss-diffusion-s0"]["timesteps_strategy"] == "loss-scaling"
    # the discriminative run trained with the task's own loss, on the base config (no augmentation)
    from genperc.config import load_run_config

    disc_cfg = load_run_config(tmp_path / "runs" / "discriminative-s0")
    assert disc_cfg.model.mode == "discriminative" and disc_cfg.train.augment == 0
    assert disc_cfg.train.steps == 3 and disc_cfg.train.batch_size == 2
    assert (tmp_path / "runs" / "discriminative-s0" / "test" / "samples.csv").is_file()
    md = (tmp_path / "tables.md").read_text()
    # one seed: each cell is that run's AbsRel in %, 2 digits (then δ1 in %, RMSE in m)
    assert _row(md, "Table 5", "uniform") == _cells(runs["uniform-s0"]["summary"])
    aug = runs[f"{best}-aug1-s0"]["summary"]["AbsRel"]
    assert _row(md, "Fig. 8", "1×")[0] == f"{100 * aug:.2f}"
    disc = _cells(runs["discriminative-s0"]["summary"])
    assert _row(md, "Table 5", A.DISCRIMINATIVE_LABEL) == _row(md, "Fig. 8", A.DISCRIMINATIVE_LABEL) == disc
    assert "discriminative" not in md.split("## Fig. 7", 1)[1].split("\n## ", 1)[0]  # no per-step curve
    # the baselines, computed here on the same test items (3 of the 4, chosen as the runs' are)
    test_indices = A.eval_indices(4, 3, 1234)
    assert res["test_items"] == 3 and test_indices != [0, 1, 2]
    cfg = A.load_config(base=res["config"])
    task = build.build_task(cfg)
    fitted = B.fit_baselines(task, open_scene_source(cfg.data, "train"), 32)
    dataset = task.dataset(open_scene_source(cfg.data, "test"), 32)
    expected = B.score_baselines(task, dataset, fitted, indices=test_indices)
    assert set(res["baselines"]) == {"training mean map", "row ramp"}
    for name, summary in expected.items():
        assert summary["items"] == 3 and res["baselines"][name]["AbsRel"] == pytest.approx(summary["AbsRel"])
        assert _row(md, "Table 5", f"baseline: {name}") == _row(md, "Fig. 8", f"baseline: {name}") == _cells(summary)
        assert "±" not in "".join(_cells(summary))
    # score_baselines(indices=…) scores exactly those items: the mean of the items scored one by one
    singles = [B.score_baselines(task, dataset, fitted, indices=[i]) for i in test_indices]
    for name in expected:
        for key in ("AbsRel", "delta1", "RMSE"):
            assert expected[name][key] == pytest.approx(sum(one[name][key] for one in singles) / 3, rel=1e-5)
    assert (tmp_path / "curves.png").stat().st_size > 0 and (tmp_path / "before_after.png").is_file()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["runs"].keys() == runs.keys() and saved["size"] == "custom" and saved["baselines"] == res["baselines"]
    # every run and the baselines are reused: a second call trains and scores nothing
    monkeypatch.setattr(A, "run_job", lambda job: pytest.fail(f"re-ran {job['name']}"))
    monkeypatch.setattr(B, "fit_baselines", lambda *a, **k: pytest.fail("re-fitted the baselines"))
    monkeypatch.setattr(B, "score_baselines", lambda *a, **k: pytest.fail("re-scored the baselines"))
    again = A.run_experiment("depth", TINY, seeds=1, out=tmp_path, intensities="0,1", log=lambda m: None)
    assert again["runs"].keys() == runs.keys() and again["baselines"] == res["baselines"]


def _experiment(tmp_path, log):
    cfg = A.load_config("cpu-depth")
    return A.Experiment(tmp_path, cfg, [0, 1], [2, 3], {"runs": {}}, workers=1, threads=0, log=log)


def test_prob_perception_follows_its_seeds_uniform_estimate(tmp_path):
    messages = []
    experiment = _experiment(tmp_path, messages.append)
    names = ["uniform", "prob-perception"]
    ok = {"name": "uniform", "seed": 2, "perception_c2": {"path": "/runs/uniform-s2/contributions/c.json"}}
    [job] = A.perception_followup(experiment, "depth", names, ok)
    assert job["name"] == "prob-perception" and job["seed"] == 2
    assert job["config"]["train"]["contributions"] == "/runs/uniform-s2/contributions/c.json"
    assert job["config"]["train"]["timesteps"] == "prob-scaling" and job["config"]["train"]["seed"] == 2
    failed = {"name": "uniform", "seed": 1, "perception_c2": {"error": "nothing to explain"}}
    assert A.perception_followup(experiment, "depth", names, failed) == []
    assert messages == ["  no perception c² from uniform-s1 (nothing to explain): prob-perception-s1 is left out"]
    assert A.perception_followup(experiment, "depth", ["uniform"], ok) == []  # not asked for
    assert A.perception_followup(experiment, "depth", names, {**ok, "name": "prob-diffusion"}) == []


def test_mean_and_sample_std_cells_by_hand():
    from genperc.experiments.common import fmt_mean_std

    # mean (0.1 + 0.2 + 0.4)/3 = 0.2333; deviations −0.1333, −0.0333, 0.1667: √(0.04667/2) = 0.1528
    assert fmt_mean_std([0.1, 0.2, 0.4], 100, 1) == "23.3 ± 15.3"
    assert fmt_mean_std([0.1, float("nan"), 0.3], 100, 2) == "20.00 ± 14.14"  # NaN left out; √0.02 = 0.1414
    assert fmt_mean_std([0.0123], 100, 2) == "1.23" and fmt_mean_std([], 1, 1) == "–"


def test_a_run_interrupted_after_its_checkpoint_resumes(tmp_path):
    """run_job resumes a run from its checkpoint rather than starting over."""
    world = A.render_world(tmp_path / "world", TINY, log=lambda m: None)
    cfg = A.base_config("depth", TINY, world, ["train.checkpoint_every=2", "train.steps=2"])
    job = {"name": "uniform", "seed": 0, "run_dir": str(tmp_path / "run"), "config": cfg.to_dict(),
           "eval_split": "test", "eval_indices": [0, 1], "eval_seed": 0, "calib_indices": [], "calibrate": False}
    A.run_job(job)
    (tmp_path / "run" / "result.json").unlink()
    job["config"] = A.load_config(base=job["config"], overrides=["train.steps=4"]).to_dict()
    r = A.run_job(job)
    assert r["steps"] == 4
    steps = [int(line.split(",")[0]) for line in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == [2, 4]  # log_every 10: step 2 (first call, its last) then step 4 appended; a fresh run logs only 4
    # a finished run asked for the perception estimate later gets it without retraining
    job["calibrate"], job["calib_indices"] = True, [0, 1, 2, 3, 4, 5]
    r2 = A.run_job(job)
    assert "perception_c2" in r2 and r2["summary"] == r["summary"]
    assert abs(sum(r2["perception_c2"]["factors"]) - 1) < 1e-9  # AbsRel varies: the estimate exists


def test_plot_step_curves(tmp_path):
    from genperc.evaluation.trajectory import plot_step_curves

    p = plot_step_curves({"a": {"x": ([999, 500, 0], torch.rand(3, 3))}, "empty": {}}, tmp_path / "c.png", "IoU")
    assert p.stat().st_size > 0
    with pytest.raises(UserError, match="no curves"):
        plot_step_curves({"a": {}}, tmp_path / "d.png")


@pytest.mark.slow
def test_referring_experiment_in_two_worker_processes(tmp_path, monkeypatch):
    """The referring runs (MiniLM text, InstructPix2Pix guidance) in a pool of two spawned workers."""
    tiny = A.ExperimentSize("demo", 32, {"train": 6, "val": 3, "test": 3}, steps=2, batch_size=2, eval_items=6,
                    calib_items=6, workers=2, threads=1, overrides=["sample.steps=2", "train.warmup_steps=1"])
    res = A.run_experiment("referring", tiny, seeds=1, out=tmp_path, strategies="uniform,prob-authors",
                           intensities="0,0.5", log=lambda m: None)
    assert {"uniform-s0", "prob-authors-s0"} <= set(res["runs"]) and res["workers"] == 2
    assert res["runs"]["prob-authors-s0"]["contributions"] == "addp-referring"
    assert all(r["threads"] == 1 and 0 <= r["summary"]["oIoU"] <= 1 for r in res["runs"].values())
    md = (tmp_path / "tables.md").read_text()
    assert _row(md, "Table 5", "uniform")[-1] == "56.42"  # the paper's column
    assert res["runs"]["discriminative-s0"]["mode"] == "discriminative"  # trained in the pool beside the others
    assert _row(md, "Table 5", A.DISCRIMINATIVE_LABEL) == _cells(res["runs"]["discriminative-s0"]["summary"],
                                                                 "referring") + ["–"]
    assert set(res["baselines"]) == {"empty mask", "all objects", "named shape"}
    assert _row(md, "Fig. 8", "baseline: named shape") == _cells(res["baselines"]["named shape"], "referring")
    assert any(k.endswith("/oIoU") for k in res["runs"]["uniform-s0"]["summary"])  # per expression family


@pytest.mark.parametrize("key", sorted(A.SIZES))
def test_every_size_resolves_to_a_valid_config(key, tmp_path):
    task, size = key
    p = A.size_for(task, size)
    cfg = A.base_config(task, p, tmp_path, [])
    assert cfg.task == task and cfg.model.sample_size == cfg.data.resolution == p.resolution
    assert cfg.train.steps == p.steps and cfg.train.batch_size == p.batch_size and cfg.train.augment == 0
    assert cfg.diffusion.prediction_type == "x0"  # the paper's recommendation with augmentation
    per_scene = 1 if task == "depth" else 4  # items per scene: one depth map, several expressions
    assert p.eval_items <= p.scenes["test"] * per_scene and p.calib_items <= p.scenes["val"] * per_scene


def test_c2_table_rows_by_hand():
    runs = {("uniform", 0): 0.1}
    results = _results("referring", runs, seeds=1, strategies=("uniform",), best="uniform")
    factors = [0.05, 0.05, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.2]  # bin 0 … bin 9
    results["runs"]["uniform-s0"]["perception_c2"] = {"factors": factors, "explained": 0.456}
    md = A.render_tables(results)
    # noisiest bin first, in %; R² with two digits
    assert _row(md, "c_t²", "perception, uniform seed 0") == ["20.0"] + ["10.0"] * 7 + ["5.0", "5.0", "0.46"]
    # the authors' referring table [1, 1, 1, 1, 1, 1, 1, 2, 4, 95] of sum 108: 95/108 = 88.0 %, 4/108 = 3.7 %,
    # 2/108 = 1.9 %, 1/108 = 0.9 %
    assert _row(md, "c_t²", "the authors' table") == ["88.0", "3.7", "1.9"] + ["0.9"] * 7 + ["–"]
