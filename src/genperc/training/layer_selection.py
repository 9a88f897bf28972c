"""DDAE++'s choice of the self-conditioning block: one short run per candidate, the lowest training loss wins.

What is known (REFERENCE.md, "DDAE / DDAE++", from the DDAE++ README): the layer is "chosen by the
training loss of short parallel runs", and the best linear-probe layer need not be the best
self-conditioning layer. genperc's procedure, :func:`select_block`:

* **Candidates**: every block with a later block to condition
  (:func:`~genperc.models.selfcond.selectable_blocks`; UNet ``down{i}``, ``mid``, ``up{i}`` but the
  last, DiT ``blk{i}`` but the last), or the caller's list.
* **Runs**: the run config with only ``model.self_conditioning.block`` changed, self-conditioning on
  and contrastive self-distillation off (the procedure picks where to route; the denoising loss
  judges it), ``steps`` steps, one checkpoint at the end. Same seed in every run, so data order,
  timesteps and noise are the same and the block is the only difference.
* **Score**: the mean logged training ``loss`` over the last ``window`` steps (lower wins; ties go
  to the earlier candidate).
* **Parallel**: the runs are independent run directories (``OUT/<block>``); :func:`select_block` runs
  them one after another in this process unless a ``runner`` runs them elsewhere (other processes,
  other GPUs). ``OUT/selection.json`` records every score and the choice.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from genperc.config import RunConfig, load_config
from genperc.errors import UserError

#: ``runner(cfg, run_dir) -> the logged training losses, one per step``
Runner = Callable[[RunConfig, Path], Sequence[float]]


@dataclass
class BlockSelection:
    best: str
    losses: dict[str, float]  # block → mean training loss over the last ``window`` steps


def candidate_blocks(cfg: RunConfig) -> list[str]:
    """Blocks of ``model.arch`` that self-conditioning may read (built once at its default size)."""
    from genperc.models.registry import create_denoiser
    from genperc.models.selfcond import selectable_blocks

    if cfg.model.pretrained:
        raise UserError("the candidate blocks of a pretrained UNet are not listed automatically",
                        "pass the candidates (e.g. mid, up0, up1)")
    return selectable_blocks(create_denoiser(cfg.model.arch, seed=0).backbone)


def train_and_read_losses(cfg: RunConfig, run_dir: Path) -> list[float]:
    """The default runner: train ``cfg`` into ``run_dir`` and return the ``loss`` column of its metrics."""
    from genperc.training.trainer import Trainer

    Trainer(cfg, run_dir).train(overwrite=True)  # a candidate is trained afresh each time
    with (Path(run_dir) / "metrics.csv").open() as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def select_block(cfg: RunConfig, out_dir: str | Path, candidates: Sequence[str] | None = None, *, steps: int = 200,
                 window: int = 50, runner: Runner | None = None) -> BlockSelection:
    """Run every candidate block for ``steps`` steps and pick the lowest training loss (module docstring)."""
    if steps < 1 or window < 1:
        raise UserError(f"steps={steps} and window={window} must be >= 1", "use e.g. steps=200, window=50")
    out = Path(out_dir)
    names = list(candidates) if candidates else candidate_blocks(cfg)
    losses: dict[str, float] = {}
    for name in names:
        run_cfg = load_config(base=cfg.to_dict(), overrides=[
            "model.self_conditioning.enabled=true", f"model.self_conditioning.block={name}",
            "train.contrastive.enabled=false", f"train.steps={steps}", f"train.checkpoint_every={steps}",
            "train.log_every=1", "train.progress=false"])
        curve = list((runner or train_and_read_losses)(run_cfg, out / name))
        if not curve:
            raise UserError(f"the run for block {name} logged no loss", f"check {out / name}")
        tail = curve[-window:]
        losses[name] = sum(tail) / len(tail)
    best = min(losses, key=losses.__getitem__)
    selection = BlockSelection(best=best, losses=losses)
    out.mkdir(parents=True, exist_ok=True)
    (out / "selection.json").write_text(json.dumps({**asdict(selection), "steps": steps, "window": window}, indent=1))
    return selection
