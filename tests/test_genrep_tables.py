"""GenRep's experiment tables: cells computed from hand-made results, sizes named as sizes."""

import pytest

from genperc.errors import UserError
from genperc.experiments.genrep import SIZES, base_config, render_tables


def run(top1, ece, fid, s1, s2, **extra):
    return {"top1": top1, "ece": ece, "fid": fid, "precision": 0.5, "recall": 0.25, "class_consistency": 0.9,
            "timing": {"stage1_s": s1, "stage2_s": s2}, **extra}


def results():
    runs = {}
    for v, base in (("none", 0.40), ("gp", 0.42), ("sg", 0.44), ("both", 0.46), ("full", 0.50)):
        runs[f"{v}-s0"] = run(base, 0.10, 8.0, 10.0, 20.0)
        runs[f"{v}-s1"] = run(base + 0.02, 0.20, 9.0, 10.0, 20.0)
    runs["full-s0"]["timing"] = {"stage1_s": 12.0, "stage2_s": 21.0}
    runs["full-s1"]["timing"] = {"stage1_s": 12.0, "stage2_s": 21.0}
    runs["k2-s0"], runs["k2-s1"] = {"top1": 0.30, "ece": 0.05}, {"top1": 0.36, "ece": 0.07}
    return {"dataset": "digits", "size": "cpu", "classes": list("0123456789"), "train_images": 100,
            "eval_images": 50, "seeds": 2, "runs": runs, "k_values": [2], "defaults": {"steps": 10, "m": 2, "k": 2},
            "sweep_stages": "perception"}


def test_table_8_cells_are_mean_and_sample_std_over_seeds():
    md = render_tables(results(), {"8"})
    # full: top-1 50 and 52 → 51.0 ± √2; ECE 0.1, 0.2 → 0.150 ± 0.0707; FID 8, 9 → 8.50 ± 0.71
    assert "| + gradient alignment (GenRep) | 51.0 ± 1.4 | 0.150 ± 0.071 | 8.50 ± 0.71 | 0.500 ± 0.000 | " \
           "0.250 ± 0.000 | 90.0 ± 0.0 |" in md.splitlines()
    assert "| none | 41.0 ± 1.4 |" in md


def test_training_time_overhead_against_none():
    md = render_tables(results(), {"8"})
    # none: 10 + 20 = 30 s; full: 12 + 21 = 33 s → +10.0 %
    assert "| + gradient alignment (GenRep) | 12 | 21 | 33 | +10.0% |" in md.splitlines()
    assert "| none | 10 | 20 | 30 | +0.0% |" in md.splitlines()


def test_table_9_counts_the_states_algorithm_1_keeps():
    md = render_tables(results(), {"9"})
    # a 10-step chain, m = 2, k = 2: t < 8 and even → t = 6, 4, 2: three states
    assert "| 2 | 3 | 33.0 ± 4.2 | 0.060 ± 0.014 |" in md.splitlines()


def test_an_unknown_size_is_a_user_error():
    assert "huge" not in SIZES
    with pytest.raises(UserError, match="size"):
        base_config("digits", "huge", [], None)
