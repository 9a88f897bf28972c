"""`genperc experiment ddae` (the DDAE++ claim, three arms × seeds) and `genperc experiment ddae-select`
(the self-conditioning block by short runs), end to end at toy size, and the claim table's verdicts."""

from __future__ import annotations

import json

import pytest

from genperc.cli import main
from genperc.experiments.ddae import ARMS, render_tables

TINY = ["data.resolution=8", "data.options={size: 8}", "model.sample_size=8", "train.batch_size=8",
        "train.steps=2", "train.checkpoint_every=2", "train.log_every=1", "train.progress=false",
        "train.warmup_steps=0", "model.self_conditioning.hidden=16", "train.contrastive.hidden=16",
        "train.contrastive.proj_dim=8", "train.contrastive.pred_dim=16"]
FAST = ["--probe-t", "11", "--probe-views", "1", "--probe-updates", "0", "--samples-per-class", "2",
        "--sample-steps", "3"]


def test_three_arms_train_evaluate_tabulate_and_resume(tmp_path, capsys, monkeypatch):
    """The UNet preset end to end (the DiT preset trains, resumes and samples in test_ddae.py)."""
    out = tmp_path / "ddae"
    assert main(["experiment", "ddae", "--seeds", "1", "-o", str(out), *FAST, *TINY]) == 0
    for arm in ARMS:
        record = json.loads((out / "runs" / f"{arm}-s0" / "ddae.json").read_text())
        assert record["fid"] >= 0 and 0 <= record["precision"] <= 1 and 0 <= record["recall"] <= 1
        assert 0 <= record["probe_top1"] <= 1 and record["probe_t"] == 11 and record["images_per_s"] > 0
        assert (out / "runs" / f"{arm}-s0" / "probe" / "probe.csv").is_file()
        cfg = (out / "runs" / f"{arm}-s0" / "config.yaml").read_text()
        assert ("enabled: true" in cfg.split("self_conditioning:")[1].split("\n")[1]) == (arm != "baseline")
    table = (out / "tables.md").read_text()
    assert all(label in table for label in ("DDAE (baseline)", "+ self-conditioning |",
                                            "+ self-conditioning + contrastive |"))
    assert "self-conditioning improves FID:" in table and "clean pixels" in table
    assert "discriminative counterpart" in table and 0 <= json.loads((out / "shared" / "featurenet.json").read_text())["top1"] <= 1
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["runs"]) == sorted(f"{a}-s0" for a in ARMS)

    # finished runs are reused (nothing is retrained); with a seed still missing no table is written
    import genperc.training.trainer as trainer_mod

    monkeypatch.setattr(trainer_mod.Trainer, "train", lambda *a, **k: pytest.fail("retrained a finished run"))
    (out / "tables.md").unlink()
    capsys.readouterr()
    assert main(["experiment", "ddae", "--seeds", "2", "--only-seeds", "0", "-o", str(out), *FAST, *TINY]) == 0
    assert not (out / "tables.md").exists() and "3 of 6 runs done" in capsys.readouterr().out


def _run(fid, probe, ips):
    return {"fid": fid, "precision": 0.5, "recall": 0.5, "probe_top1": probe, "probe_t": 11, "probe_block": "mid",
            "images_per_s": ips, "anchors": {"chance": 0.1, "pixels": 0.9}}


def test_claim_verdicts_follow_the_numbers():
    results = {"dataset": "digits", "arch": "unet-tiny", "preset": "cpu", "steps": 10, "seeds": 2,
               "machine": "m", "runs": {
                   "baseline-s0": _run(10.0, 0.50, 100.0), "baseline-s1": _run(12.0, 0.54, 100.0),
                   "sc-s0": _run(9.0, 0.60, 98.0), "sc-s1": _run(9.5, 0.62, 99.0),
                   "sc+cd-s0": _run(11.0, 0.70, 60.0), "sc+cd-s1": _run(11.5, 0.72, 62.0)}}
    text = render_tables(results)
    noisy = render_tables({**results, "runs": {**results["runs"], "sc-s0": _run(14.0, 0.60, 98.0)}})
    # FID 11.0 ± 1.41 → 11.75 ± 3.18: the change is inside the seeds' spread
    assert "improves FID: within seed noise (11.00 → 11.75)" in noisy
    assert "without hurting FID: holds (within seed noise) (11.75 → 11.25)" in noisy
    # FID 11.0 → 9.25 and probe 0.52 → 0.61: both hold; contrastive: probe 0.61 → 0.71 holds, FID 9.25 → 11.25 hurt
    assert "improves FID: holds (11.00 → 9.25)" in text and "improves the probe: holds (0.520 → 0.610)" in text
    assert "raises the probe further: holds (0.610 → 0.710)" in text
    assert "without hurting FID: does not hold (9.25 → 11.25)" in text
    assert "| DDAE (baseline) | 11.00 ± 1.41 |" in text and "| 52.0 ± 2.8 |" in text
    assert "| 1.02 ± 0.01 |" in text  # step time 100/98 = 1.020, 100/99 = 1.010


def test_ddae_select_picks_a_block_by_short_runs(tmp_path, capsys):
    out = tmp_path / "select"
    code = main(["experiment", "ddae-select", "--blocks", "mid,up0", "--steps", "2", "--window", "2", "-o", str(out),
                 *[o for o in TINY if not o.startswith(("train.steps", "train.checkpoint_every"))]])
    assert code == 0
    selection = json.loads((out / "selection.json").read_text())
    assert set(selection["losses"]) == {"mid", "up0"}
    assert selection["best"] == min(selection["losses"], key=selection["losses"].get)
    assert f"chosen: model.self_conditioning.block={selection['best']}" in capsys.readouterr().out
