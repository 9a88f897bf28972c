"""ADDP Table 3 machinery (genperc.interactive.benchmark): the oracle user, rounds, the weight grid,
`genperc eval --correction` and the tables."""

import json

import numpy as np
import pytest

from genperc.cli import main
from genperc.data.record import ObjectAnn, SceneRecord
from genperc.errors import UserError
from genperc.inference import load_run
from genperc.interactive.benchmark import CorrectionEval, evaluate_corrections, table3, wrong_object


def test_the_oracle_names_the_object_the_mask_wrongly_covers_most():
    inst = np.zeros((4, 6), np.int32)
    inst[:, 0:2], inst[:, 2:4], inst[:, 4:6] = 1, 2, 3
    scene = SceneRecord(image=np.zeros((4, 6, 3), np.uint8), instances=inst,
                        objects=[ObjectAnn(id=i, category="cube", category_id=0) for i in (1, 2, 3)])
    mask = np.zeros((4, 6), bool)
    mask[:, 0:2] = True  # the target, all of it
    assert wrong_object(scene, mask, [1]) is None  # nothing wrongly covered: nothing to correct
    mask[:3, 2] = True  # 3 pixels of object 2
    mask[:2, 4] = True  # 2 pixels of object 3
    assert wrong_object(scene, mask, [1]) == 2
    mask[2, 4] = True  # a tie, 3 and 3: the lower instance id
    assert wrong_object(scene, mask, [1]) == 2
    assert wrong_object(scene, mask, [1, 2]) == 3
    assert wrong_object(scene, mask, [1], named=[2]) == 3 and wrong_object(scene, mask, [1], named=[2, 3]) is None


@pytest.mark.parametrize("threshold", [50, 442])
def test_oracle_rounds_grid_and_cost(referring_run, threshold):
    """threshold 442 (the largest RGB distance) decodes every pixel as mask, so every round has an object to correct."""
    run = load_run(referring_run.run_dir, text_encoder=referring_run.text_encoder,
                   overrides=[f"task_options.threshold={threshold}"])
    grid = [(3.0, 1.0), (1.0, 3.0)]
    res = evaluate_corrections(run, "test", correction="oracle", rounds=3, limit=6, grid=grid)
    assert len(res.rows) == 6 and res.arms() == ["round1", "round2", "round3", "w_d=3,w_dminus=1",
                                                  "w_d=1,w_dminus=3"]
    for row in res.rows:
        assert row["round1/calls"] == 3 * 3  # 3 steps × 3 InstructPix2Pix branches
        negatives = [n for n in row["round3/negatives"].split("; ") if n]
        assert row["round2/negatives"] == "; ".join(negatives[:1])
        # costs are cumulative from round 1: 4 branches with one negative, 5 with two
        if not row["round2/negatives"]:  # the first mask covered no other object: no round, no cost
            assert row["round2/calls"] == 9 and row["round2/I"] == row["round1/I"]
        else:
            assert row["round2/calls"] == 9 + 3 * 4 and row["w_d=1,w_dminus=3/calls"] == 9 + 3 * 4
        if len(negatives) == 2:
            assert row["round3/calls"] == 9 + 3 * 4 + 3 * 5
    if threshold == 442:
        counts = [len(r["round3/negatives"].split("; ")) for r in res.rows if r["round3/negatives"]]
        assert len(counts) == 6 and 2 in counts  # scenes of two objects have one other object to name
        assert all(r["round1/iou"] < 1 for r in res.rows)
    summary = res.summary()
    inter = sum(r["round2/I"] for r in res.rows)
    union = sum(r["round2/U"] for r in res.rows)
    assert summary["round2/oIoU"] == pytest.approx(inter / union)
    fam = res.rows[0]["family"]
    assert summary[f"round1/{fam}/n"] == sum(r["family"] == fam for r in res.rows)


def test_eval_correction_cli_writes_and_table3(referring_run, tmp_path, capsys):
    rc = main(["eval", str(referring_run.run_dir), "--split", "test", "--correction", "oracle", "--limit", "3",
               "--out", str(tmp_path / "ev")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "round1" in printed and "round2" in printed
    data = json.loads((tmp_path / "ev" / "corrections.json").read_text())
    assert data["settings"]["correction"] == "oracle" and "round2/oIoU" in data["summary"]
    assert (tmp_path / "ev" / "corrections.csv").read_text().count("\n") == 4
    assert main(["eval", str(referring_run.run_dir), "--correction", "psychic"]) == 2
    with pytest.raises(UserError, match="at least 2 rounds"):
        evaluate_corrections(referring_run, "test", correction="oracle", rounds=1)


def test_table3_has_a_row_per_arm_and_mean_std_over_runs(tmp_path):
    def ev(values):
        rows = [{"family": f, "round1/I": 1, "round1/U": 4, "round1/iou": 0.25, "round1/calls": 9,
                 "round1/seconds": 0.1, "round2/I": v, "round2/U": 4, "round2/iou": v / 4, "round2/calls": 12,
                 "round2/seconds": 0.2} for f, v in zip(["attribute", "relation"], values, strict=True)]
        return CorrectionEval(rows=rows, settings={"sampler": "ddim", "steps": 3, "weights": {}, "split": "test"})

    path = table3({"a": {"oracle": ev([2, 3])}, "b": {"oracle": ev([4, 3])}}, tmp_path)
    text = path.read_text()
    # round 2: oIoU (2+3)/8 = 62.5 and (4+3)/8 = 87.5 → 75.0 ± 17.7; attribute 50/100 → 75.0 ± 35.4
    assert "| + oracle user, round 2 | 75.0 ± 17.7 | 75.0 ± 35.4 | 75.0 ± 0.0 | 12 ± 0 |" in text
    assert "| model alone (round 1) | 25.0 ± 0.0 |" in text
    assert json.loads((tmp_path / "results.json").read_text())["summaries"]["a"]["oracle"]["round2/oIoU"] == 0.625


def test_experiment_correct_writes_table3_and_reuses_saved_evaluations(referring_run, tmp_path, capsys, monkeypatch):
    args = ["experiment", "correct", str(referring_run.run_dir), "--no-agent", "--limit", "2", "--rounds", "2",
            "--grid", "3:1,1:3", "-o", str(tmp_path)]
    assert main(args) == 0
    text = (tmp_path / "tables.md").read_text()
    assert "| model alone (round 1) |" in text and "| + oracle user, round 2 |" in text
    assert "| w_D = 3, w_D⁻ = 1 |" in text and "| w_D = 1, w_D⁻ = 3 |" in text
    import genperc.interactive.benchmark as bench

    monkeypatch.setattr(bench, "evaluate_corrections", lambda *a, **k: pytest.fail("saved result not reused"))
    assert main(args) == 0 and (tmp_path / "tables.md").read_text() == text
    assert main(["experiment", "correct", str(referring_run.run_dir), "--grid", "3-1"]) == 2


def test_agent_arm_in_eval_and_table3(referring_run, tmp_path):
    run = load_run(referring_run.run_dir, text_encoder=referring_run.text_encoder,
                   overrides=["task_options.threshold=442"])  # every pixel mask: every item has confusers
    res = evaluate_corrections(run, "test", correction="agent", limit=3, k=2)
    assert res.arms() == ["round1", "agent", "vote"]
    for row in res.rows:
        confusers = row["agent/confusers"].split("; ")
        assert 1 <= len(confusers) <= 2 and row["expression"] not in confusers
        assert row["agent/calls"] == 9 + len(confusers) * 3 * 4  # prediction + k corrections of 4 branches
        assert row["vote/calls"] == 9 + 2 * 9  # its anchor: k = 2 uncorrected samples of 3 branches
    text = table3({"tiny": {"agent": res}}, tmp_path).read_text()
    assert "| vote of k uncorrected samples (the agent's anchor) |" in text
    assert "| + correction by the agent |" in text and text.count("| model alone (round 1) |") == 1
