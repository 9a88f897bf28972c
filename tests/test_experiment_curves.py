"""``genperc experiment curves`` (issue 12): learning curves of the generative model and its
discriminative counterpart, each checkpoint scored by ``evaluate_run``, baselines alongside, resumable."""

import csv
import json

import pytest

from genperc.cli import main
from genperc.errors import UserError
from genperc.experiments.curves import eval_steps, parse_modes, run_experiment
from genperc.inference import evaluate_run, find_checkpoint, load_run

TINY = ["data.resolution=16", "model.sample_size=16", "train.batch_size=4", "train.warmup_steps=2",
        "train.progress=false", "sample.steps=2"]
ARGS = dict(modes="generative,discriminative", seeds=2, steps=4, every=2, limit=4, baseline_fit_items=8)


@pytest.fixture(scope="module")
def curves(tmp_path_factory):
    out = tmp_path_factory.mktemp("curves")
    return out, run_experiment("cpu-depth", TINY, out=out, log=lambda _: None, **ARGS)


def _rows(out):
    with (out / "curves.csv").open() as f:
        return list(csv.DictReader(f))


def test_one_row_per_mode_seed_and_step_with_the_outputs(curves):
    out, results = curves
    rows = _rows(out)
    keys = [(r["mode"], int(r["seed"]), int(r["step"])) for r in rows]
    assert sorted(keys) == sorted((m, s, k) for m in ("generative", "discriminative") for s in (0, 1) for k in (2, 4))
    assert all(int(r["items"]) == 4 for r in rows)
    assert list(rows[0])[:4] == ["mode", "seed", "step", "AbsRel"]  # the task's main metric first
    for name in ("curves.png", "tables.md", "results.json"):
        assert (out / name).stat().st_size > 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["main_metric"] == "AbsRel" and len(saved["rows"]) == 8 and saved["eval_steps"] == [2, 4]
    tables = (out / "tables.md").read_text()
    assert "| step | generative | discriminative |" in tables and "Machine:" in tables
    assert " ± " in tables  # two seeds: mean ± std


def test_a_step_value_is_an_independent_evaluate_run_of_that_checkpoint(curves):
    out, _ = curves
    rows = {(r["mode"], r["seed"], r["step"]): r for r in _rows(out)}
    for mode in ("generative", "discriminative"):
        run = load_run(out / "runs" / f"{mode}-s1", checkpoint=2)
        assert run.checkpoint.name == "step-00000002"
        expected = evaluate_run(run, "val", limit=4).summary
        row = rows[(mode, "1", "2")]
        assert float(row["AbsRel"]) == pytest.approx(expected["AbsRel"], rel=1e-6, abs=1e-9)
        assert float(row["delta1"]) == pytest.approx(expected["delta1"], rel=1e-6, abs=1e-9)
        assert row["AbsRel"] != rows[(mode, "1", "4")]["AbsRel"]  # another checkpoint, another number


def test_baselines_are_scored_once_on_the_same_items(curves):
    out, results = curves
    assert set(results["baselines"]) == {"training mean map", "row ramp"}
    assert all(s["items"] == 4 and 0 < s["AbsRel"] < 10 for s in results["baselines"].values())
    assert "| baseline: training mean map |" in (out / "tables.md").read_text()


def test_a_second_call_reuses_runs_and_evaluations(curves, monkeypatch):
    out, first = curves
    ckpts = sorted(out.glob("runs/*/checkpoints/step-*/**/*"))
    mtimes = {p: p.stat().st_mtime_ns for p in ckpts}

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    def no_evaluation(*args, **kwargs):
        raise AssertionError("evaluated again")

    monkeypatch.setattr("genperc.training.trainer.Trainer.train", no_training)
    monkeypatch.setattr("genperc.inference.evaluate_run", no_evaluation)
    logs = []
    second = run_experiment("cpu-depth", TINY, out=out, log=logs.append, **ARGS)
    assert second["rows"] == first["rows"] and second["baselines"] == first["baselines"]
    assert {p: p.stat().st_mtime_ns for p in ckpts} == mtimes
    assert any("0 scored now and 8 reused" in line for line in logs)


def test_another_training_config_in_the_same_out_is_refused(curves):
    out, _ = curves
    with pytest.raises(UserError, match="train.lr"):
        run_experiment("cpu-depth", TINY + ["train.lr=1e-3"], out=out, log=lambda _: None, **ARGS)


def test_modes_and_steps_are_checked(tmp_path):
    assert parse_modes("discriminative, generative,generative") == ["discriminative", "generative"]
    assert eval_steps(10, 4) == [4, 8, 10] and eval_steps(4, 2) == [2, 4] and eval_steps(3, 5) == [3]
    with pytest.raises(UserError, match="generative, discriminative"):
        parse_modes("generative,diffusion")
    for bad, message in ((dict(steps=0), "--steps 0"), (dict(every=0), "--every 0"), (dict(seeds=0), "--seeds 0"),
                         (dict(limit=0), "--limit 0")):
        with pytest.raises(UserError, match=message):
            run_experiment("cpu-depth", TINY, out=tmp_path / "o", log=lambda _: None, **{**ARGS, **bad})
    assert not (tmp_path / "o").exists()


def test_find_checkpoint_names_the_steps_a_run_has(curves):
    out, _ = curves
    run_dir = out / "runs" / "generative-s0"
    assert find_checkpoint(run_dir).name == "step-00000004"
    assert find_checkpoint(run_dir, "2") == find_checkpoint(run_dir, "step-00000002") == run_dir / "checkpoints" / "step-00000002"
    with pytest.raises(UserError, match="use one of the steps 2, 4"):
        find_checkpoint(run_dir, 3)


def test_cli_bad_modes_is_one_line_with_the_valid_values(tmp_path, capsys):
    code = main(["experiment", "curves", "--preset", "cpu-depth", "--modes", "generative,bogus",
                 "--out", str(tmp_path / "o"), "--steps", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "bogus" in err and "generative, discriminative" in err
    assert not (tmp_path / "o").exists()  # checked before anything is written
