"""Nothing lost, nobody in: refusal to clobber a run, the run lock, validated resume, corrupt
checkpoints skipped (or refused with one line), Ctrl-C naming the last checkpoint."""

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from genperc import checkpoints, runlock
from genperc.errors import UserError

CKPT4 = "checkpoints/step-00000004"


def one_line_error(code: int, err: str, fragment: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert fragment in err, err


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file of a run but its lock (to assert that a refused command changed nothing)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != ".lock" and "tb" not in p.parts}


# -- refusals: the command changes nothing ----------------------------------------------------------

REFUSALS = [
    ("no --resume", lambda r, train_argv: train_argv(r), "already holds a run — pass --resume to continue it or --overwrite"),
    ("both", lambda r, train_argv: train_argv(r) + ["--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
    ("other arch", lambda r, _: ["train", "-o", str(r), "--resume", "model.arch=unet-small"],
     "model.arch='unet-tiny' (now 'unet-small')"),
    ("other task", lambda r, _: ["train", "-o", str(r), "--resume", "--task", "depth"], "task='referring' (now 'depth')"),
    ("eval: no such checkpoint", lambda r, _: ["eval", str(r), "--checkpoint", "3"], "use one of the steps 2, 4"),
    ("predict: no such checkpoint", lambda r, _: ["predict", str(r), "--image", str(r / "config.yaml"),
                                               "--checkpoint", "3"], "use one of the steps 2, 4"),
    ("eval: --out not writable", lambda r, _: ["eval", str(r), "--out", str(r / "config.yaml" / "x")], "cannot write to"),
]


@pytest.mark.parametrize("argv, fragment", [row[1:] for row in REFUSALS], ids=[row[0] for row in REFUSALS])
def test_refused_commands_say_one_line_and_change_nothing(run_copy, cli, train_argv, argv, fragment):
    before = snapshot(run_copy)
    code, _, err = cli(argv(run_copy, train_argv))
    one_line_error(code, err, fragment)
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("argv", [lambda r, _: ["--threads", "1", "train", "-o", str(r), "--resume"],
                                  lambda r, train_argv: train_argv(r, 2, 2, "--overwrite")], ids=["resume", "overwrite"])
def test_a_locked_run_is_refused_naming_the_holder(run_copy, cli, train_argv, locked_by_other, argv):
    pid = locked_by_other(run_copy)
    before = snapshot(run_copy)
    code, _, err = cli(argv(run_copy, train_argv))
    one_line_error(code, err, f"is in use by pid {pid} on ")
    assert "a test holding the lock" in err and snapshot(run_copy) == before


def test_eval_into_a_locked_folder_is_refused(run_copy, cli, locked_by_other, tmp_path):
    pid = locked_by_other(tmp_path / "out")
    code, _, err = cli(["eval", str(run_copy), "--out", str(tmp_path / "out"), "--limit", "2"])
    one_line_error(code, err, f"is in use by pid {pid}")


def test_lock_is_reentrant_exclusive_and_survives_kill_9(tmp_path, locked_by_other):
    with runlock.locked(tmp_path / "a", "outer"), runlock.locked(tmp_path / "a", "inner"):
        assert "outer" in runlock.holder(tmp_path / "a")
    pid = locked_by_other(tmp_path / "b")
    with pytest.raises(runlock.RunLocked, match=f"pid {pid}"):
        with runlock.locked(tmp_path / "b", "second"):
            pass
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    with runlock.locked(tmp_path / "b", "after kill -9"):  # the kernel dropped the lock: the file is harmless
        assert "after kill -9" in runlock.holder(tmp_path / "b")


def test_overwrite_replaces_the_run(run_copy, cli, train_argv):
    code, _, err = cli(train_argv(run_copy, 2, 2, "--overwrite"))
    assert code == 0, err
    assert [p.name for p in (run_copy / "checkpoints").iterdir()] == ["step-00000002"]
    rows = (run_copy / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["step", "1", "2"]


def test_the_library_refuses_too(run_copy, resumer):
    resumer.run_dir = run_copy
    before = snapshot(run_copy)
    with pytest.raises(UserError, match="already holds a run — pass --resume to continue it or --overwrite"):
        resumer.train()
    with pytest.raises(UserError, match="exclude each other"):
        resumer.train(resume=True, overwrite=True)
    assert snapshot(run_copy) == before


# -- corrupt checkpoints: the newest intact one, with one warning line per skipped one ---------------


class Hostile:
    """Unpickling this would run a command; weights_only loading must refuse it unread."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _nan(path: Path) -> None:
    tensors = load_file(str(path))
    key = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, str(path))


CORRUPTIONS = {  # name: (corrupt(ckpt), the trainer skips it, eval/predict skip it, reason fragment)
    "empty folder": (lambda c: [shutil.rmtree(c), c.mkdir()], True, True, "missing"),
    "state.json broken": (lambda c: (c / "state.json").write_text('{"step": 4, '), True, False, "state.json"),
    "optimizer.pt truncated": (lambda c: _truncate(c / "optimizer.pt"), True, False, "optimizer.pt is truncated"),
    "optimizer.pt hostile": (lambda c: torch.save({"optimizer": Hostile(c / "pwned")}, c / "optimizer.pt"), True,
                             False, "optimizer.pt holds objects other than tensors"),
    "ema truncated": (lambda c: _truncate(c / "ema" / "model.safetensors"), True, True, "model.safetensors"),
    "ema NaN": (lambda c: _nan(c / "ema" / "model.safetensors"), True, True, "NaN or Inf"),
    "model overwritten": (lambda c: save_file({"x": torch.zeros(2)}, str(c / "model" / "model.safetensors")), True,
                          False, "does not fit the model"),
}


@pytest.fixture(scope="module")
def resumer(tiny_run, text_encoder):
    """A trainer of the tiny run's config, to load checkpoints of copies of it."""
    from genperc.config import load_run_config
    from genperc.training.trainer import Trainer

    return Trainer(load_run_config(tiny_run), tiny_run, text_encoder=text_encoder)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupt_latest_checkpoint_falls_back_with_one_warning(name, run_copy, resumer, text_encoder, capsys):
    from genperc.inference import load_run

    corrupt, trainer_skips, loader_skips, reason = CORRUPTIONS[name]
    corrupt(run_copy / CKPT4)
    resumer.run_dir = run_copy
    capsys.readouterr()
    used = resumer.load_checkpoint()
    err = capsys.readouterr().err
    if trainer_skips:
        assert used.name == "step-00000002" and resumer.step == 2
        assert err.count("\n") == 1 and f"skipping corrupt checkpoint {run_copy / CKPT4}" in err and reason in err
    else:
        assert used.name == "step-00000004" and err == ""
    run = load_run(run_copy, text_encoder=text_encoder)
    err = capsys.readouterr().err
    assert run.checkpoint.name == ("step-00000002" if loader_skips else "step-00000004")
    assert (err.count("\n") == 1 and "step-00000004" in err) if loader_skips else err == ""
    assert not (run_copy / CKPT4 / "pwned").exists()


def test_no_intact_checkpoint_is_one_user_error(run_copy, resumer, text_encoder):
    from genperc.inference import load_run

    for ckpt in (run_copy / "checkpoints").iterdir():
        _truncate(ckpt / "ema" / "model.safetensors")
    resumer.run_dir = run_copy
    for load in (resumer.load_checkpoint, lambda: load_run(run_copy, text_encoder=text_encoder)):
        with pytest.raises(UserError, match="no intact checkpoint .*step-00000004 .*step-00000002") as e:
            load()
        assert "\n" not in str(e.value)


def test_a_named_corrupt_checkpoint_is_refused_not_replaced(run_copy, text_encoder):
    from genperc.inference import load_run

    _nan(run_copy / CKPT4 / "ema" / "model.safetensors")
    with pytest.raises(checkpoints.CorruptCheckpoint, match="step-00000004 is corrupt: .*NaN"):
        load_run(run_copy, text_encoder=text_encoder, checkpoint=4)
    assert load_run(run_copy, text_encoder=text_encoder, checkpoint="step-00000002").checkpoint.name == "step-00000002"


COMMANDS = {
    "train --resume": lambda r, img: ["--threads", "1", "train", "-o", str(r), "--resume"],
    "eval": lambda r, img: ["eval", str(r), "--limit", "2"],
    "predict": lambda r, img: ["predict", str(r), "--image", str(img), "--prompt", "the red cube",
                               "--out", str(r / "pred")],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_commands_use_the_newest_intact_checkpoint(command, run_copy, image_file, cli):
    _truncate(run_copy / CKPT4 / "ema" / "model.safetensors")
    code, out, err = cli(COMMANDS[command](run_copy, image_file))
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "step-00000004" in warnings[0] and "ema/model.safetensors" in warnings[0]
    if command == "train --resume":  # replayed steps 3-4 once, and step 4 written anew
        assert [r.split(",")[0] for r in (run_copy / "metrics.csv").read_text().splitlines()] == ["step", "1", "2", "3", "4"]
        assert checkpoints.read_tensors(run_copy / CKPT4 / "ema" / "model.safetensors")
    elif command == "eval":
        assert "step-00000002" in out
    else:
        assert "step-00000002" in (run_copy / "pred" / "prediction.json").read_text()


# -- Ctrl-C ------------------------------------------------------------------------------------------


class InterruptAt:
    """A hook that presses Ctrl-C after optimizer step ``k``."""

    def __init__(self, k):
        self.k = k

    def after_step(self, trainer):
        if trainer.step == self.k:
            raise KeyboardInterrupt


def test_ctrl_c_names_the_last_checkpoint_and_reraises(tmp_path, text_encoder, tiny_overrides, capsys):
    from genperc.config import load_config
    from genperc.training.trainer import Trainer

    cfg = load_config("cpu-tiny", [*tiny_overrides, "train.steps=4", "train.checkpoint_every=2"])
    run = tmp_path / "run"
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, run, text_encoder=text_encoder, hooks=[InterruptAt(3)]).train()
    err = capsys.readouterr().err
    assert f"interrupted at step 3; last checkpoint: {run / 'checkpoints' / 'step-00000002'} — continue with --resume" in err
    with runlock.locked(run, "after Ctrl-C"):  # released
        pass


def test_metrics_keep_the_rows_up_to_the_checkpoint_and_drop_a_half_written_one(tmp_path):
    from genperc.training.trainer import _Logger

    (tmp_path / "metrics.csv").write_text("step,loss\r\n1,0.5\r\n2,0.4\r\n3,0.3\r\n1")  # killed writing row 10
    logger = _Logger(tmp_path, enabled=True, last_step=2)
    logger.log(3, {"loss": 0.25})
    logger.close()
    assert (tmp_path / "metrics.csv").read_text().splitlines() == ["step,loss", "1,0.5", "2,0.4", "3,0.25"]
