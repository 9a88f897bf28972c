"""GenRep end to end on tiny digits: generator, posterior cache, stage 1, stage 2, evaluation, CLI."""

import json

import pytest
import torch

from genperc.config import load_config
from genperc.diffusion.schedule import NoiseSchedule
from genperc.models.semantic import GenRepModel
from genperc.training.genrep import GenRepConfig, open_split, train_genrep

TINY = ["data.resolution=8", "data.options={size: 8}", "model.sample_size=8", "train.batch_size=8",
        "train.log_every=1", "train.progress=false", "train.warmup_steps=0"]
G = {"stages": {"pretrain_steps": 3, "perception_steps": 2, "unified_steps": 3},
     "posterior": {"steps": 4, "burn_in": 1, "thinning": 1, "subset": 12, "fit_temperature": True, "batch_size": 80,
                   "teacher": "frozen", "cache": True},
     "heads": {"width": 16}, "semantic": {"projector_hidden": 16, "var_hidden": 8},
     "eval": {"samples_per_class": 2, "sample_steps": 3, "noise_levels": [10]}}


def test_two_stage_training_end_to_end(tmp_path):
    cfg = load_config("genrep-cpu", TINY)
    res = train_genrep(cfg, tmp_path / "run", gcfg=GenRepConfig.from_dict(G), log=lambda s: None)
    run = tmp_path / "run"
    for p in ("stage0/checkpoints/step-00000003/ema/model.safetensors", "posterior.safetensors",
              "stage1/checkpoints/step-00000002/model/config.json", "stage2/checkpoints/step-00000003/model",
              "stage2/semantic/model.safetensors", "stage2/align.csv", "timing.json", "config.yaml"):
        assert (run / p).exists(), p
    rows = (run / "stage2" / "metrics.csv").read_text().splitlines()
    assert {"disc", "distil", "simple", "vlb", "rep_align"} <= set(rows[0].split(","))
    align = (run / "stage2" / "align.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in align] == ["step", "1", "2", "3"]
    timing = json.loads((run / "timing.json").read_text())
    assert {"stage0_s", "posterior_cache_s", "stage1_s", "stage2_s"} <= set(timing) and timing["temperature"] > 0
    # ε_sem and ε_unified both moved away from the stage-1 weights
    s1 = GenRepModel.from_pretrained(run / "stage1" / "checkpoints" / "step-00000002" / "model")
    p1, pu, ps = (next(iter(m.attention_parameters())) for m in (s1, res.model, res.semantic))
    assert not torch.equal(pu, p1) and not torch.equal(ps, p1)
    # frozen outside the attention blocks (Algorithm 1), heads trained
    conv = res.model.denoiser.backbone.conv_in.weight
    assert torch.equal(conv, s1.denoiser.backbone.conv_in.weight)
    # the saved unified model reloads and generates / perceives
    back = GenRepModel.from_pretrained(run / "stage2" / "checkpoints" / "step-00000003" / "model")
    from genperc import build
    from genperc.config import GenRepEvalConfig
    from genperc.evaluation.genrep import FeatureExtractor, FeatureNet, evaluate_genrep

    task = build.build_task(cfg)
    ds = task.dataset(open_split(cfg, "val"), 8)
    sub = torch.utils.data.Subset(ds, list(range(20)))
    metrics = evaluate_genrep(back, sub, schedule=NoiseSchedule(cfg.diffusion), num_classes=10,
                              cfg=GenRepEvalConfig(**G["eval"]), extractor=FeatureExtractor(FeatureNet(10)),
                              out_dir=tmp_path / "eval")
    assert {"top1", "ece", "top1_t10", "fid", "precision", "recall", "class_consistency"} <= set(metrics)
    assert (tmp_path / "eval" / "samples.png").exists() and (tmp_path / "eval" / "reliability.png").exists()
    # a rerun reuses every finished stage
    again = train_genrep(cfg, run, gcfg=GenRepConfig.from_dict(G), log=lambda s: None)
    assert torch.equal(next(iter(again.model.attention_parameters())), pu)


def tiny_generator(num_classes=10):
    from genperc.models.registry import create_denoiser

    return create_denoiser("unet-tiny", sample_size=8, in_channels=3, num_classes=num_classes, learned_variance=True,
                           seed=0)


@pytest.mark.parametrize("semantic", [{"modulation": True, "rep_target_input": "clean"},
                                      {"modulation": False, "rep_target_input": "noisy"}])
def test_stage_2_with_the_current_model_as_posterior_teacher(tmp_path, semantic):
    """Algorithm 1's teacher (the model being trained) runs its chains inside the training step;
    they must not replace the features of the training forward that REPA reads (B·K rows)."""
    g = {**G, "stages": {"perception_steps": 1, "unified_steps": 2},
         "posterior": {"steps": 2, "burn_in": 0, "thinning": 1, "teacher": "current", "batch_size": 80},
         "semantic": {**G["semantic"], **semantic}}
    cfg = load_config("genrep-cpu", TINY + ["train.batch_size=4", "task_options.classes=['0', '1', '2']"])
    res = train_genrep(cfg, tmp_path / "run", gcfg=GenRepConfig.from_dict(g), generator=tiny_generator(3),
                       log=lambda s: None)
    rows = (tmp_path / "run" / "stage2" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert {"disc", "distil", "simple", "vlb", "rep_align"} <= set(header) and len(rows) == 3
    assert all(v != "nan" for v in rows[-1].split(","))
    assert res.timing["stage2_posterior_s"] > 0 and not (tmp_path / "run" / "posterior.safetensors").exists()


def test_config_errors_are_user_errors():
    from genperc.errors import UserError

    with pytest.raises(UserError, match="task_options.genrep.posterior.bogus"):
        GenRepConfig.from_dict({"posterior": {"bogus": 1}})
    with pytest.raises(UserError, match="stages.trainable"):
        GenRepConfig.from_dict({"stages": {"trainable": "some"}})


SMOKE = [f"task_options.genrep.{k}" for k in (
    "stages.pretrain_steps=3", "stages.perception_steps=2", "stages.unified_steps=2", "posterior.steps=8",
    "posterior.burn_in=2", "posterior.subset=10", "eval.samples_per_class=2", "eval.sample_steps=3",
    "heads.width=16")] + ["train.batch_size=8", "train.log_every=1", "train.warmup_steps=0"]


@pytest.mark.slow
def test_experiment_smoke(tmp_path):
    from genperc.cli import main

    over = SMOKE + ["data.resolution=8", "data.options={size: 8}", "model.sample_size=8"]
    assert main(["experiment", "genrep", "--dataset", "digits", "--seeds", "2", "--out", str(tmp_path / "x"),
                 "--tables", "8,9,13", *over]) == 0
    from genperc.experiments.common import fmt_mean_std

    md = (tmp_path / "x" / "tables.md").read_text().splitlines()
    runs = json.loads((tmp_path / "x" / "results.json").read_text())["runs"]
    assert {f"{v}-s{s}" for v in ("none", "gp", "sg", "both", "full", "one-sided", "k1", "k5") for s in (0, 1)} <= set(runs)
    full = fmt_mean_std([runs["full-s0"]["top1"], runs["full-s1"]["top1"]], 100)
    assert any(line.startswith(f"| + gradient alignment (GenRep) | {full} |") for line in md)


@pytest.mark.slow
def test_experiment_smoke_on_world_scenes(tmp_path):
    from pathlib import Path

    from genperc.cli import main

    fixture = Path(__file__).parent / "fixtures" / "world" / "single32"
    assert main(["experiment", "genrep", "--dataset", "world", "--world-path", str(fixture), "--seeds", "1",
                 "--out", str(tmp_path / "w"), "--tables", "8,14", *SMOKE]) == 0
    runs = json.loads((tmp_path / "w" / "results.json").read_text())["runs"]
    assert {"miou", "absrel", "top1_t10", "top1_t50"} <= set(runs["full-s0"])
    row = next(line for line in (tmp_path / "w" / "tables.md").read_text().splitlines()
               if line.startswith("| + gradient alignment (GenRep) | ") and line.count("|") == 6)
    assert f"{100 * runs['full-s0']['top1_t50']:.1f} |" in row  # Table 14's t = 50 cell


DDP_SCRIPT = r"""
import hashlib, os, sys, torch
from genperc.config import load_config
from genperc.training.genrep import GenRepConfig, train_genrep
import json
cfg = load_config("genrep-cpu", sys.argv[2:])
g = GenRepConfig.from_dict(json.loads(os.environ["GENREP_G"]))
res = train_genrep(cfg, sys.argv[1], gcfg=g, log=lambda s: None)
h = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in res.model.parameters())).hexdigest()
hs = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in res.semantic.parameters())).hexdigest()
open(f"{sys.argv[1]}/hash-{os.environ['RANK']}", "w").write(h + " " + hs)
"""


@pytest.mark.slow
def test_two_process_genrep_stages_agree(tmp_path):
    """All stages under torchrun with 2 gloo processes: the ranks end with identical unified and
    semantic networks (each loss group's gradient is all-reduced before the alignment)."""
    import os
    import subprocess
    import sys

    script = tmp_path / "ddp_genrep.py"
    script.write_text(DDP_SCRIPT)
    run = tmp_path / "run"
    run.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GENREP_G": json.dumps(G)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(script), str(run), *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    h0, h1 = ((run / f"hash-{r}").read_text() for r in range(2))
    assert h0 == h1
    assert json.loads((run / "stage2" / "checkpoints" / "step-00000003" / "state.json").read_text())["world_size"] == 2


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
