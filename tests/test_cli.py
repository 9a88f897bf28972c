"""The command line: help everywhere, user errors as one line with exit code 2."""

import pytest

from genperc.cli import main


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["data", "--help"], ["data", "render", "--help"],
                                  ["experiment", "addp", "--help"], ["experiment", "sampling", "--help"]])
def test_help(argv, capsys):
    assert main(argv) == 0
    assert "Usage" in capsys.readouterr().out


@pytest.mark.parametrize("experiment", ["addp", "genrep"])
def test_experiments_take_a_size_not_a_preset(experiment, capsys):
    """Experiment sizes are --size cpu|gpu; "preset" means only a YAML run config."""
    assert main(["experiment", experiment, "--help"]) == 0
    out = capsys.readouterr().out
    assert "--size" in out and "--preset" not in out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "--preset", "no-such"], "unknown preset 'no-such'"),
        (["train", "train.bogus=1"], "valid keys: train.steps"),
        (["train", "train.steps=lots"], "train.steps"),
        (["train", "--resume"], "--resume needs --run-dir"),
        (["config", "diffusion.prediction_type=z"], "prediction_type"),
        (["data", "show", "/no/such/dir", "--out", "x.png"], "/no/such/dir"),
        (["experiment", "addp", "--task", "pose"], "unknown task 'pose'"),
        (["experiment", "addp", "--strategies", "uniform,best"], "unknown strategy 'best'"),
        (["experiment", "addp", "--size", "tpu"], "unknown experiment size 'tpu'"),
        (["experiment", "sampling", "runs/none", "--spacings", "foo"], "unknown timestep spacing 'foo'"),
        (["experiment", "sampling", "runs/none", "--steps", "1,x"], "--steps '1,x'"),
        (["experiment", "sampling", "runs/none", "--sampler", "plms"], "unknown sampler 'plms'"),
        (["experiment", "sampling", "/no/such/run", "--steps", "1"], "run directory not found: /no/such/run"),
    ],
)
def test_user_errors_are_one_line_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_config_prints_resolved_yaml(capsys):
    assert main(["config", "--preset", "cpu-tiny", "train.lr=1e-3"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.001" in out and "arch: unet-tiny" in out


def test_resume_of_missing_run_dir(tmp_path, capsys):
    assert main(["train", "--resume", "--run-dir", str(tmp_path / "nope")]) == 2
    assert "config.yaml" in capsys.readouterr().err
