"""The cost of DDAE++ in the training step (issue 14): self-conditioning on vs off, contrastive on vs off.

For the ``ddae-cpu`` (unet-tiny) and ``ddae-dit-cpu`` (dit-tiny) presets on the 16-px digits, three
trainers in one process — the baseline (both off), + self-conditioning, + self-conditioning +
contrastive self-distillation — run the same steps in turns; ``Trainer.train`` step times (data,
EMA, clipping and logging included, the checkpoint step left out) are timed by a hook; each ratio
is the median over repeats of the two arms' median step times within the repeat (a burst of load
from other jobs then hits both sides alike):

* ``self_conditioning_ratio`` = +SC / baseline (target ≤ 1.03; the paper says ~1%);
* ``contrastive_ratio`` = +SC+contrastive / +SC (two views through the encoder half for the student
  and the teacher, the teacher's EMA);
* ``ddae_pp_ratio`` = +SC+contrastive / baseline.

Also, for one model's forward + backward with the routing on and off (no data, optimizer or EMA;
the same weights and memory, :func:`_forward_backward_ratios`): ``self_conditioning_forward_backward_ratio``
(time, median of paired ratios) and ``self_conditioning_flop_ratio`` (FLOPs counted by
``torch.utils.flop_counter``; exact, so it bounds the compute the module adds when the timings drown
in the noise of a shared machine).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from genperc import runtime

PRESETS = ("ddae-cpu", "ddae-dit-cpu")
ARMS = {"baseline": ["model.self_conditioning.enabled=false", "train.contrastive.enabled=false"],
        "self_conditioning": ["train.contrastive.enabled=false"],
        "ddae_pp": []}


def _trainer(preset: str, arm: str, run_dir: Path):
    from genperc.config import load_config
    from genperc.training.trainer import Trainer

    opts = runtime.speed_options("cpu")
    cfg = load_config(preset, ARMS[arm] + ["train.progress=false", "train.steps=100000", "train.checkpoint_every=100000",
                                           f"train.mixed_precision={'bf16' if opts.bf16 else 'no'}"])
    trainer = Trainer(cfg, run_dir)
    trainer.stamps = []

    class Clock:
        def after_step(self, _trainer):
            trainer.stamps.append(time.perf_counter())

    trainer.hooks.append(Clock())
    trainer.train(max_steps=2)  # warm-up (and the first checkpoint)
    return trainer


def _step_times(preset: str, repeats: int, steps: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median step time of each arm, and of each arm's ratio to the baseline within a repeat (the three
    arms run one after another, so a burst of load from other jobs hits them alike)."""
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {arm: _trainer(preset, arm, Path(tmp) / arm) for arm in ARMS}
        times: dict[str, list[float]] = {arm: [] for arm in ARMS}
        for r in range(repeats):
            for arm in list(trainers)[::-1] if r % 2 else trainers:  # alternate the order
                trainer = trainers[arm]
                trainer.stamps.clear()
                trainer.train(max_steps=trainer.step + steps + 1)
                s = trainer.stamps  # the checkpoint after the last step is out
                times[arm].append(statistics.median(b - a for a, b in zip(s, s[1:], strict=False)))
    pairs = {"self_conditioning_ratio": ("self_conditioning", "baseline"),
             "contrastive_ratio": ("ddae_pp", "self_conditioning"), "ddae_pp_ratio": ("ddae_pp", "baseline")}
    ratio = {name: round(statistics.median(a / b for a, b in zip(times[x], times[y], strict=True)), 3)
             for name, (x, y) in pairs.items()}
    return {arm: statistics.median(v) for arm, v in times.items()}, ratio


def _forward_backward_ratios(preset: str, repeats: int, steps: int, batch: int = 32) -> dict[str, float]:
    """One model with self-conditioning (its gate opened), forward + backward through ``Denoiser.forward``
    (routing on) and through the bare backbone call (the hooks idle: the baseline computation) in
    alternating order — same weights and memory, so only the routing differs."""
    from genperc.config import load_config
    from genperc.diffusion.conditioning import Conditioning
    from genperc.models.registry import create_denoiser

    cfg = load_config(preset)
    m = create_denoiser(cfg.model.arch, seed=0, sample_size=16, num_classes=10,
                        self_conditioning=dict(vars(cfg.model.self_conditioning)))
    torch.nn.init.normal_(m.self_conditioning.gate.proj.weight, std=0.01, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(batch, 3, 16, 16, generator=g), torch.randint(0, 1000, (batch,), generator=g)
    cond = Conditioning(class_labels=torch.randint(0, 11, (batch,), generator=g))
    calls = {True: lambda: m(x, t, cond), False: lambda: m._backbone_forward(*m._inputs(x, t, cond))}
    flops: dict[bool, float] = {}
    for on, call in calls.items():
        with FlopCounterMode(display=False) as counter:
            call().pow(2).mean().backward()
        flops[on] = float(counter.get_total_flops())
    ratios = []
    for r in range(repeats):
        sec = {}
        for on in (False, True) if r % 2 else (True, False):  # alternate the order: no position bias
            t0 = time.perf_counter()
            for _ in range(steps):
                calls[on]().pow(2).mean().backward()
            sec[on] = time.perf_counter() - t0
        ratios.append(sec[True] / sec[False])
    return {"self_conditioning_forward_backward_ratio": round(statistics.median(ratios), 3),
            "self_conditioning_flop_ratio": round(flops[True] / flops[False], 4)}


def run(quick: bool = False) -> dict:
    threads = runtime.configure_threads(None, announce=False)
    repeats, steps = (2, 2) if quick else (8, 4)
    out: dict = {"threads": threads}
    for preset in PRESETS:
        sec, ratio = _step_times(preset, repeats, steps)
        out[preset] = ({f"{arm}_s_per_step": round(s, 4) for arm, s in sec.items()} | ratio
                       | _forward_backward_ratios(preset, 5 * repeats, steps))
    return out
