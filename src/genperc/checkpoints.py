"""A run's checkpoints: listed newest first, read and checked before use, the newest intact one chosen.

A checkpoint is the folder ``RUN/checkpoints/step-XXXXXXXX`` written by the trainer. It is published
by one rename once complete (:meth:`genperc.training.trainer.Trainer.save_checkpoint`), so a crash
never leaves half of one under that name; what can still break one is the disk or a person
(a truncated ``optimizer.pt``, a broken ``state.json``, an emptied folder, an overwritten
``model.safetensors``). Every reader here raises :class:`CorruptCheckpoint` naming the file and why.

:func:`choose` is the one place that picks a checkpoint for ``train --resume``, ``eval``,
``predict`` and everything built on :func:`genperc.inference.load_run`:

* asked for a given one (a step or a folder), it reads that one and fails with one line if it is
  broken (no silent substitute);
* asked for the newest, it reads the checkpoints newest first and takes the first that reads
  whole, printing one warning line on stderr for each one it skips and why; when none reads, one
  :class:`~genperc.errors.UserError` lists them.

Weights are refused when any value is NaN or Inf (a checkpoint that would only produce NaN is
corrupt too). ``optimizer.pt`` is read with ``torch.load(weights_only=True)``: a file holding any
other pickled object is refused with one line, never unpickled.
"""

from __future__ import annotations

import json
import pickle
import re
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from genperc.errors import UserError

T = TypeVar("T")
STEP_DIR = re.compile(r"^step-(\d+)$")


class CorruptCheckpoint(UserError):
    """A checkpoint file that cannot be used: missing, truncated, not what it claims, or not finite."""


def step_of(ckpt: Path) -> int:
    """The training step of a checkpoint folder named ``step-XXXXXXXX``."""
    return int(STEP_DIR.match(Path(ckpt).name).group(1))


def listing(run_dir: str | Path) -> list[Path]:
    """The run's published checkpoint folders, newest (highest step) first; unchecked.

    A :class:`UserError` when ``run_dir`` is not a directory or holds no checkpoint."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}", "pass a directory written by 'genperc train'")
    root = run_dir / "checkpoints"
    found = [p for p in root.glob("step-*") if STEP_DIR.match(p.name) and p.is_dir()] if root.is_dir() else []
    if not found:
        raise UserError(f"no checkpoint in {root}", "train longer than train.checkpoint_every steps or resume the run")
    return sorted(found, key=step_of, reverse=True)


def resolve(run_dir: str | Path, checkpoint: int | str | Path) -> Path:
    """The folder of a given checkpoint: its step (an int or a string of digits) or a path
    (``step-00000250`` inside ``RUN/checkpoints``, or any checkpoint folder); a :class:`UserError`
    listing the run's steps when there is none."""
    run_dir = Path(run_dir)
    if isinstance(checkpoint, int) or (isinstance(checkpoint, str) and checkpoint.strip().isdigit()):
        path = run_dir / "checkpoints" / f"step-{int(checkpoint):08d}"
    else:
        path = Path(checkpoint)
        if not path.is_dir() and not path.is_absolute():
            path = run_dir / "checkpoints" / path
    if not path.is_dir():
        steps = ", ".join(str(step_of(p)) for p in reversed(listing(run_dir)))
        raise UserError(f"no checkpoint {checkpoint} in {run_dir / 'checkpoints'}",
                        f"use one of the steps {steps}, or leave it out for the newest")
    return path


def choose(run_dir: str | Path, read: Callable[[Path], T], checkpoint: int | str | Path | None = None,
           warn: Callable[[str], None] | None = None) -> tuple[Path, T]:
    """``(folder, read(folder))`` of the checkpoint to use (see the module docstring).

    ``read`` loads and checks a checkpoint, raising :class:`CorruptCheckpoint` when it cannot be
    used; any other error propagates at once. ``warn`` receives the one-line notes on skipped
    checkpoints (default: printed on stderr)."""
    if checkpoint is not None:
        path = resolve(run_dir, checkpoint)
        try:
            return path, read(path)
        except CorruptCheckpoint as e:
            raise CorruptCheckpoint(f"checkpoint {path} is corrupt: {e.problem}",
                                    "pick another with --checkpoint, or leave it out for the newest intact one") from None
    warn = warn or _stderr
    skipped: list[str] = []
    for path in listing(run_dir):
        try:
            value = read(path)
        except CorruptCheckpoint as e:
            skipped.append(f"{path.name} ({e.problem})")
            warn(f"warning: skipping corrupt checkpoint {path}: {e.problem}")
            continue
        return path, value
    raise UserError(f"no intact checkpoint in {Path(run_dir) / 'checkpoints'}: " + "; ".join(skipped),
                    "restore a checkpoint from a backup, or start the run over (train --overwrite)")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# -- readers -----------------------------------------------------------------------------------


def read_state(ckpt: Path) -> dict:
    """``state.json``: ``step``, ``data_position`` and ``world_size`` (integers), step matching the folder."""
    path = Path(ckpt) / "state.json"
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{path.name} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpoint(f"{path.name} is not readable JSON ({e.__class__.__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(state.get(k), int)
                                              for k in ("step", "data_position", "world_size")):
        raise CorruptCheckpoint(f"{path.name} lacks integer step, data_position and world_size")
    if STEP_DIR.match(Path(ckpt).name) and state["step"] != step_of(ckpt):
        raise CorruptCheckpoint(f"{path.name} says step {state['step']}, the folder step {step_of(ckpt)}")
    return state


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file as a dict of CPU tensors, every floating value finite."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    name = f"{path.parent.name}/{path.name}"
    if not path.is_file():
        raise CorruptCheckpoint(f"{name} is missing")
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CorruptCheckpoint(f"{name} is not a readable safetensors file ({_first_line(e)})") from None
    check_finite(tensors.items(), name)
    return tensors


def check_finite(named_tensors, what: str) -> None:
    """:class:`CorruptCheckpoint` naming the first floating tensor with a NaN or Inf."""
    for key, value in named_tensors:
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CorruptCheckpoint(f"{what} holds NaN or Inf values ({key})")


def check_fits(tensors: dict[str, torch.Tensor], module: torch.nn.Module, what: str) -> None:
    """:class:`CorruptCheckpoint` when the tensors are not ``module``'s state (other keys)."""
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise CorruptCheckpoint(f"{what} does not fit the model ({len(missing)} missing key(s), e.g. {missing[:1]}, "
                                f"{len(unexpected)} unexpected, e.g. {unexpected[:1]})")


def read_torch(path: Path, map_location=None) -> dict:
    """A ``torch.save`` file of tensors and plain values, read with ``weights_only=True``: any other
    pickled object (code a file could run) is refused, never loaded."""
    path = Path(path)
    if not path.is_file():
        raise CorruptCheckpoint(f"{path.name} is missing")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise CorruptCheckpoint(f"{path.name} holds objects other than tensors and plain values"
                                + (f" ({found.group(1)})" if found else "") + "; refused unread") from None
    except (EOFError, OSError, RuntimeError, ValueError, zipfile.BadZipFile) as e:
        raise CorruptCheckpoint(f"{path.name} is truncated or not a torch file ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    """The first sentence of an exception's message (library messages run on for lines)."""
    text = str(e).strip().splitlines()
    return text[0].split(". ")[0].rstrip(".")[:160] if text else e.__class__.__name__
