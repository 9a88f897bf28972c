"""``genperc experiment addp`` (ADDP Table 5, Fig. 7, Fig. 8): the run plan, the choice of the best
strategy, the tables, resuming, and a tiny end-to-end run on a freshly rendered world."""

import json

import pytest
import torch

from genperc.errors import UserError
from genperc.experiments import addp as A


def _results(task, runs, seeds=2, strategies=A.TABLE5, intensities=(0.0, 1.0), best=None):
    main = "oIoU" if task == "referring" else "AbsRel"
    cfg = A.load_config("cpu-tiny" if task == "referring" else "cpu-depth")
    out = {"task": task, "preset": "cpu", "seeds": seeds, "sizes": A.asdict(A.PRESETS[(task, "cpu")]),
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
    (dict(preset="tpu"), "unknown preset"),
])
def test_bad_arguments_are_named(tmp_path, kwargs, match):
    with pytest.raises(UserError, match=match):
        A.run_experiment(**{"out": tmp_path, **kwargs})


TINY = A.Preset("cpu-depth", 32, {"train": 6, "val": 6, "test": 4}, steps=3, batch_size=2, eval_items=4,
                calib_items=6, workers=1, threads=0, overrides=["sample.steps=3", "train.warmup_steps=1"])


def test_tiny_experiment_end_to_end_and_resume(tmp_path, monkeypatch):
    res = A.run_experiment("depth", "cpu", seeds=1, out=tmp_path, intensities="0,1", sizes=TINY, log=lambda m: None)
    runs = res["runs"]
    assert {"uniform-s0", "loss-diffusion-s0", "prob-diffusion-s0"} <= set(runs)
    est = runs["uniform-s0"]["perception_c2"]
    if "path" in est:  # the estimate from the uniform model was used by prob-perception
        assert "prob-perception-s0" in runs
        assert runs["prob-perception-s0"]["contributions"] == est["path"]
        assert abs(sum(est["factors"]) - 1) < 1e-9
    else:
        assert "prob-perception-s0" not in runs and "error" in est
    best = res["best_strategy"]
    assert f"{best}-aug1-s0" in runs and runs[f"{best}-aug1-s0"]["augment"] == 1.0
    for r in runs.values():
        assert r["steps"] == 3 and len(r["per_step"]) == len(r["timesteps"]) == 3
        assert r["summary"] == r["per_step"][-1] and r["summary"]["AbsRel"] >= 0
    assert runs["loss-diffusion-s0"]["timesteps_strategy"] == "loss-scaling"
    md = (tmp_path / "tables.md").read_text()
    assert "## Table 5" in md and "## Fig. 8" in md and "## Fig. 7" in md and "AbsRel (%) ↓" in md
    assert (tmp_path / "curves.png").stat().st_size > 0 and (tmp_path / "before_after.png").is_file()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["runs"].keys() == runs.keys()
    # every run is reused: a second call trains and scores nothing
    monkeypatch.setattr(A, "run_job", lambda job: pytest.fail(f"re-ran {job['name']}"))
    again = A.run_experiment("depth", "cpu", seeds=1, out=tmp_path, intensities="0,1", sizes=TINY, log=lambda m: None)
    assert again["runs"].keys() == runs.keys()


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
    assert ("factors" in r2["perception_c2"]) != ("error" in r2["perception_c2"])


def test_plot_step_curves(tmp_path):
    from genperc.evaluation.trajectory import plot_step_curves

    p = plot_step_curves({"a": {"x": ([999, 500, 0], torch.rand(3, 3))}, "empty": {}}, tmp_path / "c.png", "IoU")
    assert p.stat().st_size > 0
    with pytest.raises(UserError, match="no curves"):
        plot_step_curves({"a": {}}, tmp_path / "d.png")


@pytest.mark.slow
def test_referring_experiment_in_two_worker_processes(tmp_path, monkeypatch):
    """The referring runs (MiniLM text, InstructPix2Pix guidance) in a pool of two spawned workers."""
    tiny = A.Preset("demo", 32, {"train": 6, "val": 3, "test": 3}, steps=2, batch_size=2, eval_items=6,
                    calib_items=6, workers=2, threads=1, overrides=["sample.steps=2", "train.warmup_steps=1"])
    res = A.run_experiment("referring", "cpu", seeds=1, out=tmp_path, strategies="uniform,prob-authors",
                           intensities="0,0.5", sizes=tiny, log=lambda m: None)
    assert {"uniform-s0", "prob-authors-s0"} <= set(res["runs"]) and res["workers"] == 2
    assert res["runs"]["prob-authors-s0"]["contributions"] == "addp-referring"
    assert all(r["threads"] == 1 and 0 <= r["summary"]["oIoU"] <= 1 for r in res["runs"].values())
    assert "RefCOCO val oIoU" in (tmp_path / "tables.md").read_text()
    assert any(k.endswith("/oIoU") for k in res["runs"]["uniform-s0"]["summary"])  # per expression family


@pytest.mark.parametrize("key", sorted(A.PRESETS))
def test_every_preset_resolves_to_a_valid_config(key, tmp_path):
    task, preset = key
    p = A.preset_for(task, preset)
    cfg = A.base_config(task, p, tmp_path, [])
    assert cfg.task == task and cfg.model.sample_size == cfg.data.resolution == p.resolution
    assert cfg.train.steps == p.steps and cfg.train.batch_size == p.batch_size and cfg.train.augment == 0
    assert cfg.diffusion.prediction_type == "x0"  # the paper's recommendation with augmentation
    per_scene = 1 if task == "depth" else 4  # items per scene: one depth map, several expressions
    assert p.eval_items <= p.scenes["test"] * per_scene and p.calib_items <= p.scenes["val"] * per_scene
