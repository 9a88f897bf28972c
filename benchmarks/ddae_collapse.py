"""Diagnose the sample collapse of docs/ddae.md, "Ablations": ``python benchmarks/ddae_collapse.py RUN [RUN ...]``.

For each trained run (EMA weights) it prints

* **saturated** — the share of 8 DDPM samples per class (50 steps, generator seed 1) with more than
  half of their pixels beyond ±0.98, and the spread (std) of the samples' mean intensity;
* **offset sensitivity** — how much the self-conditioning offset s = g(t)⊙MLP(pool(h)) moves when the
  clean image is brightened by 0.2 (clamped to [−1, 1]) before noising with the same ε:
  mean over 128 test images of ‖s(x + 0.2) − s(x)‖ / ‖s(x)‖ at t = 50, 300, 700.

Not a speed benchmark (``benchmarks/run.py`` runs only ``bench_*.py``); one thread.
"""

from __future__ import annotations

import sys

import torch

from genperc.diffusion.conditioning import Conditioning
from genperc.evaluation.genrep import generate, real_images
from genperc.experiments.ddae import _split
from genperc.inference import load_run


def saturated(loaded, num_classes: int) -> tuple[float, float]:
    images, _ = generate(loaded.model, num_classes, 8, schedule=loaded.schedule, steps=50,
                         generator=torch.Generator().manual_seed(1))
    share = (images.abs() > 0.98).float().mean(dim=(1, 2, 3))
    return float((share > 0.5).float().mean()), float(images.mean(dim=(1, 2, 3)).std())


@torch.no_grad()
def offset_sensitivity(loaded, x0: torch.Tensor, labels: torch.Tensor, ts=(50, 300, 700)) -> dict[int, float]:
    model, out = loaded.model, {}
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    for t in ts:
        tt = torch.full((x0.shape[0],), t)
        s = [model.self_conditioning.offset(model.self_condition_features(
                 loaded.schedule.add_noise((x0 + d).clamp(-1, 1), noise, tt), tt, Conditioning(class_labels=labels)), tt)
             for d in (0.0, 0.2)]
        out[t] = float(((s[1] - s[0]).norm(dim=1) / s[0].norm(dim=1).clamp_min(1e-8)).mean())
    return out


def main(runs: list[str]) -> None:
    torch.set_num_threads(1)
    for run in runs:
        loaded = load_run(run, weights="ema")
        loaded.model.eval()
        x0, labels = real_images(_split(loaded, loaded.cfg.data.val_split))
        share, spread = saturated(loaded, int(labels.max()) + 1)
        line = f"{run}: saturated {share:.2f} (mean-intensity std {spread:.3f})"
        if loaded.model.self_conditioning is not None:
            sens = offset_sensitivity(loaded, x0[:128], labels[:128])
            line += "; offset sensitivity " + ", ".join(f"t={t} {v:.3f}" for t, v in sens.items())
        print(line)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python benchmarks/ddae_collapse.py RUN [RUN ...]")
    main(sys.argv[1:])
