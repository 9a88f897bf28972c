"""``kill -9`` a real ``genperc train`` at several points, ``--resume`` it: the final weights equal an
uninterrupted run's bit for bit, every step is logged once, no temporary folder is left."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

STEPS, EVERY = 6, 2


@pytest.fixture(scope="module")
def reference(tmp_path_factory, train_argv) -> Path:
    """The tiny run trained STEPS steps without interruption (in this process, one thread)."""
    from genperc.cli import main

    run = tmp_path_factory.mktemp("reference") / "run"
    assert main(train_argv(run, STEPS, EVERY)) == 0
    return run


def start(run: Path, train_argv, **env) -> subprocess.Popen:
    """``python -m genperc.cli train …`` of the tiny run in a process of its own."""
    argv = [sys.executable, "-m", "genperc.cli", *train_argv(run, STEPS, EVERY)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def kill_9(proc: subprocess.Popen) -> None:
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def logged_rows(run: Path) -> list[dict]:
    path = run / "metrics.csv"
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [row for row in csv.DictReader(f) if row.get("step", "").isdigit()]


def resume_and_compare(run: Path, reference: Path, cli) -> None:
    code, _, err = cli(["--threads", "1", "train", "-o", str(run), "--resume"])
    assert code == 0, err
    final = f"checkpoints/step-{STEPS:08d}"
    for sub in ("model", "ema"):
        got, want = (load_file(str(r / final / sub / "model.safetensors")) for r in (run, reference))
        assert got.keys() == want.keys()
        diff = [k for k in want if not bool((got[k] == want[k]).all())]
        assert not diff, f"{sub}: {len(diff)} tensors differ, e.g. {diff[0]}"
    assert (run / final / "state.json").read_text() == (reference / final / "state.json").read_text()
    rows, ref_rows = logged_rows(run), logged_rows(reference)
    assert [r["step"] for r in rows] == [str(s) for s in range(1, STEPS + 1)]  # replayed steps once
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]  # and the same losses
    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


def test_kill_9_while_a_checkpoint_is_written(tmp_path, reference, train_argv, cli):
    run = tmp_path / "run"
    proc = start(run, train_argv, GENPERC_FAULT_SLEEP_IN_SAVE="60@4")  # sleeps in the step-4 checkpoint
    for line in proc.stderr:
        if line.startswith("[genperc] fault: in save_checkpoint"):
            break
    kill_9(proc)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == [".tmp-step-00000004", "step-00000002"]  # half written, never published
    resume_and_compare(run, reference, cli)


def test_kill_9_during_a_step(tmp_path, reference, train_argv, cli):
    run = tmp_path / "run"
    proc = start(run, train_argv)
    deadline = time.monotonic() + 120
    while not any(int(r["step"]) >= EVERY + 1 for r in logged_rows(run)) and time.monotonic() < deadline:
        time.sleep(0.01)
    kill_9(proc)  # somewhere after step 3 was logged: between checkpoints 2 and 4, or just past 4
    resume_and_compare(run, reference, cli)


@pytest.mark.slow
def test_kill_9_before_the_first_checkpoint_then_overwrite(tmp_path, reference, train_argv, cli):
    run = tmp_path / "run"
    proc = start(run, train_argv, GENPERC_FAULT_SLEEP_IN_SAVE=f"60@{EVERY}")
    for line in proc.stderr:
        if line.startswith("[genperc] fault: in save_checkpoint"):
            break
    kill_9(proc)
    code, _, err = cli(["--threads", "1", "train", "-o", str(run), "--resume"])
    assert code == 2 and "no checkpoint in" in err and "--overwrite" in err
    code, _, err = cli(train_argv(run, STEPS, EVERY, "--overwrite"))
    assert code == 0, err
    got = load_file(str(run / f"checkpoints/step-{STEPS:08d}/ema/model.safetensors"))
    want = load_file(str(reference / f"checkpoints/step-{STEPS:08d}/ema/model.safetensors"))
    assert all(bool((got[k] == want[k]).all()) for k in want)


def test_text_states_do_not_depend_on_the_batch_they_were_first_encoded_in(text_encoder):
    """The cause of resumed runs ~1e-7 off: a resumed process fills its text cache in other batches,
    and padding to the batch's longest text changed a text's states by ~1e-6. The cache now encodes
    at a fixed length."""
    import torch

    from genperc.models.text import CachedTextEncoder

    text = "the red cube"
    alone, _ = CachedTextEncoder(text_encoder.encoder).encode([text])
    batched, _ = CachedTextEncoder(text_encoder.encoder).encode([text, "a small blue sphere left of the big cube"])
    assert torch.equal(alone[0], batched[0, : alone.shape[1]])
