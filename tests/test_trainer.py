"""The one trainer: a step learns, resume is exact, NaN stops cleanly, checkpoints are atomic, DDP agrees."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from genperc.config import load_config
from genperc.data.datasets import collate
from genperc.data.toy import ToyShapes
from genperc.errors import UserError
from genperc.training.trainer import Trainer, TrainingDiverged

TINY = ["data.resolution=16", "model.sample_size=16", "train.batch_size=4", "train.log_every=1",
        "train.warmup_steps=2", "train.progress=false", "model.text_max_length=8"]


def tiny_cfg(*extra):
    return load_config("cpu-tiny", TINY + list(extra))


def weights(path: Path) -> dict:
    return load_file(str(path / "model.safetensors"))


def test_train_writes_checkpoint_logs_and_config(tmp_path, text_encoder):
    cfg = tiny_cfg("train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=1")
    tr = Trainer(cfg, tmp_path / "run", train_source=ToyShapes(size=16, resolution=16), text_encoder=text_encoder)
    res = tr.train()
    run = tmp_path / "run"
    assert res.step == 4 and torch.isfinite(torch.tensor(res.loss))
    ckpts = sorted((run / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step-00000004"]  # keep_checkpoints=1 pruned step 2, no temp dirs left
    for f in ("model/model.safetensors", "model/config.json", "ema/model.safetensors", "optimizer.pt",
              "state.json", "rng-rank0.safetensors", "config.yaml"):
        assert (ckpts[0] / f).exists(), f
    rows = (run / "metrics.csv").read_text().strip().splitlines()
    assert rows[0].startswith("step,loss") and len(rows) == 5
    assert (run / "config.yaml").exists() and any((run / "tb").iterdir())


def test_training_reduces_the_loss(tmp_path, text_encoder):
    cfg = tiny_cfg("train.steps=60", "train.lr=2e-3", "train.checkpoint_every=1000", "train.ema=false",
                   "train.timesteps=uniform", "train.batch_size=8")
    src = ToyShapes(size=8, resolution=16)  # a single batch, to be memorised
    tr = Trainer(cfg, tmp_path / "run", train_source=src, text_encoder=text_encoder)
    tr.train()
    losses = [float(r.split(",")[1]) for r in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]]
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:5]) / 5


def test_resume_is_exact(tmp_path, text_encoder):
    src = ToyShapes(size=12, resolution=16)
    common = ["train.checkpoint_every=3", "train.keep_checkpoints=3", "train.cond_dropout=0.3"]
    full = Trainer(tiny_cfg("train.steps=6", *common), tmp_path / "full", train_source=src, text_encoder=text_encoder)
    full.train()
    half = Trainer(tiny_cfg("train.steps=6", *common), tmp_path / "half", train_source=src, text_encoder=text_encoder)
    half.train(max_steps=3)
    resumed = Trainer(tiny_cfg("train.steps=6", *common), tmp_path / "half", train_source=src, text_encoder=text_encoder)
    resumed.train(resume=True)
    a = tmp_path / "full" / "checkpoints" / "step-00000006"
    b = tmp_path / "half" / "checkpoints" / "step-00000006"
    for sub in ("model", "ema"):
        wa, wb = weights(a / sub), weights(b / sub)
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (sub, k)
    assert json.loads((a / "state.json").read_text()) == json.loads((b / "state.json").read_text())


class NaNAfter:
    """An objective that returns NaN from step ``k`` on."""

    name = "nan"

    def __init__(self, trainer_ref, k):
        self.ref, self.k = trainer_ref, k

    def __call__(self, ctx):
        loss = ctx.output.float().pow(2).mean()
        return {"loss": loss * float("nan") if self.ref[0].step >= self.k else loss}


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, text_encoder):
    cfg = tiny_cfg("train.steps=10", "train.checkpoint_every=2")
    ref = []
    tr = Trainer(cfg, tmp_path / "run", train_source=ToyShapes(size=8, resolution=16), text_encoder=text_encoder,
                 objectives=[NaNAfter(ref, 5)])
    ref.append(tr)
    with pytest.raises(TrainingDiverged) as e:
        tr.train()
    assert "step 6" in str(e.value) and "step-00000004" in str(e.value)
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts[-1] == "step-00000004" and not any(c.startswith(".tmp") for c in ckpts)
    assert isinstance(e.value, UserError)


def test_interrupted_checkpoint_write_leaves_previous_intact(tmp_path, text_encoder, monkeypatch):
    cfg = tiny_cfg("train.steps=4", "train.checkpoint_every=2")
    tr = Trainer(cfg, tmp_path / "run", train_source=ToyShapes(size=8, resolution=16), text_encoder=text_encoder)
    tr.train(max_steps=2)
    before = weights(tmp_path / "run" / "checkpoints" / "step-00000002" / "model")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        tr.train()
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if not p.name.startswith(".tmp"))
    assert ckpts == ["step-00000002"]
    after = weights(tmp_path / "run" / "checkpoints" / "step-00000002" / "model")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resume_without_checkpoint_is_a_user_error(tmp_path, text_encoder):
    tr = Trainer(tiny_cfg("train.steps=2"), tmp_path / "run", train_source=ToyShapes(size=8, resolution=16),
                 text_encoder=text_encoder)
    with pytest.raises(UserError, match="no checkpoint"):
        tr.train(resume=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_SCRIPT = r"""
import hashlib, sys, torch
from genperc.config import load_config
from genperc.data.datasets import collate
from genperc.data.toy import ToyShapes
from genperc.training.trainer import Trainer
cfg = load_config("cpu-tiny", sys.argv[2:])
tr = Trainer(cfg, sys.argv[1], train_source=ToyShapes(size=16, resolution=16))
tr.train()
h = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in tr.unwrapped.parameters())).hexdigest()
open(f"{sys.argv[1]}/hash-{tr.accelerator.process_index}-of-{tr.accelerator.num_processes}", "w").write(h)
"""


def test_two_process_ddp_ranks_agree(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    run = tmp_path / "run"
    run.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(script), str(run), *TINY, "train.steps=3", "train.checkpoint_every=3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hashes = [(run / f"hash-{r}-of-2").read_text() for r in range(2)]
    assert hashes[0] == hashes[1]
    state = json.loads((run / "checkpoints" / "step-00000003" / "state.json").read_text())
    assert state["world_size"] == 2 and (run / "checkpoints" / "step-00000003" / "rng-rank1.safetensors").exists()


class StepRecorder:
    """A hook: the step counter and a parameter's value each time it is called."""

    def __init__(self):
        self.steps, self.values = [], []

    def after_step(self, trainer):
        self.steps.append(trainer.step)
        self.values.append(next(trainer.unwrapped.parameters()).detach().clone())


def test_hooks_run_after_each_optimizer_step(tmp_path, text_encoder):
    cfg = tiny_cfg("train.steps=3", "train.checkpoint_every=3", "train.ema=false", "train.warmup_steps=0")
    hook = StepRecorder()
    tr = Trainer(cfg, tmp_path / "run", train_source=ToyShapes(size=8, resolution=16), text_encoder=text_encoder,
                 hooks=[hook])
    initial = next(tr.unwrapped.parameters()).detach().clone()
    tr.train()
    assert hook.steps == [1, 2, 3]
    assert not torch.equal(hook.values[0], initial)  # the optimizer had stepped
    final = weights(tmp_path / "run" / "checkpoints" / "step-00000003" / "model")
    name = next(iter(tr.unwrapped.state_dict()))
    assert torch.equal(hook.values[-1], final[name])


class GroupedLoss:
    def __init__(self, group, name, uses_output=True):
        self.group, self.name, self.uses_output = group, name, uses_output

    def __call__(self, ctx):
        source = ctx.output if self.uses_output else ctx.x0
        return {self.name: source.float().pow(2).mean()}


class RecordingCombiner:
    reduces_gradients = True

    def __init__(self):
        self.groups = []

    def backward(self, groups, accelerator, scale=1.0):
        self.groups.append({g: sorted(losses) for g, losses in groups.items()})


def test_losses_reach_the_combiner_by_group_and_names_are_unique(tmp_path, text_encoder):
    cfg = tiny_cfg("train.steps=1", "train.checkpoint_every=1", "train.ema=false")
    combiner = RecordingCombiner()
    objectives = [GroupedLoss("perception", "disc"), GroupedLoss("generation", "simple"),
                  GroupedLoss("generation", "extra")]
    tr = Trainer(cfg, tmp_path / "run", train_source=ToyShapes(size=8, resolution=16), text_encoder=text_encoder,
                 objectives=objectives, combiner=combiner)
    tr.train()
    assert combiner.groups == [{"perception": ["disc"], "generation": ["extra", "simple"]}]
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"disc", "simple", "extra"} <= set(header)
    tr.objectives = [GroupedLoss("perception", "same"), GroupedLoss("generation", "same")]
    batch = collate([tr.dataset[i] for i in range(2)])
    with pytest.raises(ValueError, match="'same'.*unique"):
        tr.compute_loss_groups(batch)


def test_no_denoiser_forward_when_no_objective_uses_the_output(tmp_path, text_encoder):
    cfg = tiny_cfg("train.steps=1", "train.checkpoint_every=1", "train.ema=false")
    tr = Trainer(cfg, tmp_path / "run", train_source=ToyShapes(size=8, resolution=16), text_encoder=text_encoder,
                 objectives=[GroupedLoss("perception", "x0", uses_output=False)], combiner=RecordingCombiner())
    calls = []
    tr.unwrapped.register_forward_hook(lambda *a: calls.append(1))
    groups = tr.compute_loss_groups(collate([tr.dataset[i] for i in range(2)]))
    assert calls == [] and list(groups) == ["perception"]
    tr.objectives = [GroupedLoss("generation", "out")]
    tr.compute_loss_groups(collate([tr.dataset[i] for i in range(2)]))
    assert calls == [1]
