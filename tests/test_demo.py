"""The demo on the rendered fixture world: its examples, and (slow) the demo end to end. Its trivial
baselines live in genperc.evaluation.baselines (tests/test_baselines.py)."""

import json
from pathlib import Path

import pytest

from genperc.data.world import WorldSource
from genperc.demo import head_noun_mask, pick_examples, trivial_baselines
from genperc.tasks import create_task

FIXTURE = Path(__file__).parent / "fixtures" / "world" / "multi32"


@pytest.fixture(scope="module")
def val():
    return create_task("referring").dataset(WorldSource(FIXTURE, split="val"), 32)


def test_demo_uses_the_library_baselines():
    from genperc.evaluation import baselines

    assert head_noun_mask is baselines.head_noun_mask and trivial_baselines is baselines.trivial_baselines


def test_pick_examples_takes_each_family_from_different_scenes(val):
    picks = pick_examples(val, 3)
    fams = [val[i]["family"] for i in picks]
    assert len(set(fams)) == 3 and len({val[i]["meta"]["record_index"] for i in picks}) == 3


TINY = dict(steps=3, train_scenes=6, val_scenes=2, eval_limit=6, examples=2, workers=1,
            overrides=["train.batch_size=4", "sample.steps=2", "train.log_every=1", "train.warmup_steps=1"])


def test_demo_is_budgeted_in_steps_not_time(tmp_path, monkeypatch):
    """The same seed gives the same metrics on a quiet and on a busy machine: a second demo whose
    clock runs 1000× fast (every timing it could read says the machine is crawling) trains the same
    steps and scores exactly the same."""
    import time

    from genperc.demo import run_demo

    quiet = run_demo(tmp_path / "quiet", **TINY)
    real = time.perf_counter
    start = real()
    monkeypatch.setattr(time, "perf_counter", lambda: start + 1000 * (real() - start))
    busy = run_demo(tmp_path / "busy", **TINY)
    assert quiet["train"]["steps"] == busy["train"]["steps"] == 3
    assert busy["timings"]["train_s"] > 50 * quiet["timings"]["train_s"]  # the fake clock was read
    assert quiet["train"]["final_loss"] == busy["train"]["final_loss"]
    assert quiet["model"] == busy["model"]
    assert [c["iou"] for c in quiet["examples"]] == [c["iou"] for c in busy["examples"]]


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    from genperc.demo import run_demo

    report = run_demo(tmp_path, **TINY)
    assert {"model", "empty mask", "named shape"} <= set(report)
    html = (tmp_path / "report.html").read_text()
    assert "named shape" in html and "predictions/00_overlay.png" in html and "training_curve.png" in html
    assert (tmp_path / "predictions" / "01_mask.png").exists() and (tmp_path / "training_curve.png").exists()
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["settings"]["items"] == 6 and saved["machine"]["cores"] >= 1
