"""Every config value is checked by its meaning where the config is built: one line naming the key
and its valid range (issue 15). The table runs ``genperc config <override>`` in-process."""

from __future__ import annotations

import pytest

from genperc.cli import main
from genperc.config import load_config
from genperc.errors import UserError

CASES = [
    ("train.steps=0", "train.steps=0 must be ≥ 1"),
    ("train.steps=-5", "train.steps=-5 must be ≥ 1"),
    ("train.grad_accum=0", "train.grad_accum=0 must be ≥ 1"),
    ("train.checkpoint_every=0", "train.checkpoint_every=0 must be ≥ 1"),
    ("train.log_every=0", "train.log_every=0 must be ≥ 1"),
    ("train.batch_size=0", "train.batch_size=0 must be ≥ 1"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints=0 must be ≥ 1"),
    ("train.lr=0", "train.lr=0.0 must be > 0"),
    ("train.lr=-1e-4", "must be > 0"),
    ("train.lr=.nan", "train.lr=nan is not a finite number"),
    ("train.lr=.inf", "train.lr=inf is not a finite number"),
    ("train.weight_decay=-0.1", "train.weight_decay=-0.1 must be ≥ 0"),
    ("train.warmup_steps=-1", "train.warmup_steps=-1 must be ≥ 0"),
    ("train.max_grad_norm=-1", "train.max_grad_norm=-1.0 must be ≥ 0"),
    ("train.ema_decay=1", "train.ema_decay=1.0 must lie in [0, 1)"),
    ("train.ema_decay=-0.5", "must lie in [0, 1)"),
    ("train.cond_dropout=1.5", "train.cond_dropout=1.5 must lie in [0, 1]"),
    ("train.augment=-1", "train.augment=-1.0 must lie in [0, 100]"),
    ("train.seed=-1", "train.seed=-1 must lie in"),
    ("train.lr_schedule=linear", "train.lr_schedule='linear' is not valid"),
    ("train.mixed_precision=fp8", "train.mixed_precision='fp8' is not valid"),
    ("train.timesteps=best", "train.timesteps='best' is not valid"),
    ("sample.steps=0", "sample.steps=0 must be ≥ 1"),
    ("sample.sampler=plms", "sample.sampler='plms' is not valid"),
    ("sample.eta=2", "sample.eta=2.0 must lie in [0, 1]"),
    ("sample.text_scale=-1", "sample.text_scale=-1.0 must be ≥ 0"),
    ("sample.batch_size=0", "sample.batch_size=0 must be ≥ 1"),
    ("model.sample_size=0", "model.sample_size=0 must lie in"),
    ("model.text_max_length=0", "model.text_max_length=0 must lie in"),
    ("data.resolution=0", "data.resolution=0 must lie in"),
    ("data.num_workers=-1", "data.num_workers=-1 must lie in"),
    ("data.source=nosuch", "unknown data source 'nosuch'"),
    ("data.train_split=../../x", "data.train_split '../../x' is not a split name"),
    ("data.val_split=/etc", "data.val_split '/etc' is not a split name"),
    ("diffusion.num_train_timesteps=1", "num_train_timesteps must be an integer ≥ 2"),
    ("train.contrastive.momentum=1.5", "momentum=1.5 must lie in [0, 1]"),
]


@pytest.mark.parametrize("override, fragment", CASES, ids=[c[0] for c in CASES])
def test_override_is_refused_in_one_line(override, fragment, capsys):
    assert main(["config", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert fragment in err, err


def test_genrep_settings_are_checked():
    from genperc.training.genrep.config import GenRepConfig

    with pytest.raises(UserError, match=r"task_options.genrep.eval.pr_k=0 must be ≥ 1"):
        GenRepConfig.from_dict({"eval": {"pr_k": 0}})
    with pytest.raises(UserError, match=r"task_options.genrep.stages.unified_lr=0.0 must be > 0"):
        GenRepConfig.from_dict({"stages": {"unified_lr": 0.0}})


def test_data_source_is_checked_before_its_path(capsys):
    assert main(["config", "data.source=nosuch"]) == 2
    err = capsys.readouterr().err
    assert "needs data.path" not in err and "toy, world" in err


@pytest.mark.parametrize("source, option, valid", [
    ("toy", "sise", "valid options of toy: max_objects, min_objects, seed, size"),
    ("world", "skipbad", "valid options of world: progress, skip_bad, verify"),
    ("folder", "x", "data.source=folder takes no options"),
    ("digits", "colour", "interpolation"),
])
def test_unknown_data_option_lists_the_valid_ones(source, option, valid):
    from genperc.data.sources import open_scene_source

    cfg = load_config("cpu-tiny", [f"data.source={source}", "data.path=/nonexistent", f"data.options.{option}=1"])
    with pytest.raises(UserError, match=f"unknown data.options key '{option}'") as e:
        open_scene_source(cfg.data, "train")
    assert valid in str(e.value)


@pytest.mark.parametrize("split", ["nosuch", "../../../x", "/abs"])
def test_split_names_are_checked(split):
    from genperc.data.sources import open_scene_source

    with pytest.raises(UserError, match="split"):
        open_scene_source(load_config("cpu-tiny").data, split)


def test_base_cycle_and_self_reference(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    (tmp_path / "self.yaml").write_text("base: self.yaml\n")
    for name, chain in (("a.yaml", "a.yaml → b.yaml → a.yaml"), ("self.yaml", "self.yaml → self.yaml")):
        assert main(["config", "--preset", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"cycle {chain}" in err


def test_relative_base_is_read_from_the_presets_folder(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "parent.yaml").write_text("base: cpu-tiny\ntrain:\n  lr: 0.0123\n")
    (tmp_path / "sub" / "child.yaml").write_text("base: ../parent.yaml\ntrain:\n  steps: 7\n")
    monkeypatch.chdir("/")  # a working directory far from both files
    cfg = load_config(str(tmp_path / "sub" / "child.yaml"))
    assert cfg.train.lr == 0.0123 and cfg.train.steps == 7


def test_every_shipped_preset_still_validates():
    from genperc.config import list_presets

    for name in list_presets():
        load_config(name)
