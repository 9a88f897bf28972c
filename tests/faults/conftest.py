"""Fixtures of the fault tests: a tiny trained run (made once per session) and fresh copies of it.

The run is the smallest preset, ``cpu-tiny``, shrunk to 16-px toy shapes, 4 training steps and a
checkpoint every 2 (checkpoints ``step-00000002`` and ``step-00000004``): a few seconds on a CPU.
It is referring (text-conditioned), so the text cache takes part in exact resume.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

#: overrides of cpu-tiny that make a run of a few seconds (besides train.steps / checkpoint_every)
TINY = ["data.resolution=16", "model.sample_size=16", "train.batch_size=4", "train.warmup_steps=1",
        "train.progress=false", "train.log_every=1", "model.text_max_length=8", "sample.steps=2",
        "sample.batch_size=4", "data.options={size: 6}", "train.keep_checkpoints=3", "train.cond_dropout=0.3"]


def train_argv(run_dir: Path, steps: int = 4, every: int = 2, *extra: str) -> list[str]:
    """``genperc`` arguments that train the tiny run into ``run_dir`` (one torch thread, as every
    comparison here needs the same summation order)."""
    return ["--threads", "1", "train", "-o", str(run_dir), *TINY, f"train.steps={steps}",
            f"train.checkpoint_every={every}", *extra]


@pytest.fixture(name="train_argv", scope="session")
def _train_argv():
    """:func:`train_argv`, for the tests (conftest modules are not imported by name)."""
    return train_argv


@pytest.fixture(name="tiny_overrides", scope="session")
def _tiny_overrides():
    """:data:`TINY`, for the tests."""
    return list(TINY)


@pytest.fixture
def cli(capsys):
    """``cli(argv)``: ``genperc.cli.main(argv)`` in this process → (exit code, stdout, stderr)."""
    from genperc.cli import main

    def run(argv: list[str]) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(argv)
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A tiny trained referring run (checkpoints at steps 2 and 4); never modify it: copy it."""
    from genperc.cli import main

    run = tmp_path_factory.mktemp("tiny") / "run"
    assert main(train_argv(run)) == 0
    return run


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """A fresh copy of :func:`tiny_run` to break."""
    dst = tmp_path / "run"
    shutil.copytree(tiny_run, dst, ignore=shutil.ignore_patterns(".lock", "tb"))
    return dst


@pytest.fixture
def image_file(tmp_path) -> Path:
    """An 8-bit RGB PNG for ``genperc predict``."""
    import numpy as np
    from PIL import Image

    path = tmp_path / "image.png"
    Image.fromarray((np.arange(16 * 16 * 3) % 251).astype("uint8").reshape(16, 16, 3)).save(path)
    return path


LOCK_HOLDER = """
import sys, time
from genperc.runlock import locked
with locked(sys.argv[1], "a test holding the lock"):
    print("locked", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def locked_by_other(tmp_path):
    """``lock(folder)``: another process takes ``folder``'s lock; it is killed at the test's end.
    Returns that process's PID."""
    procs = []

    def lock(folder: Path) -> int:
        proc = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc.pid

    yield lock
    for proc in procs:
        proc.kill()
        proc.wait()
