"""Training-step throughput (images/s) of the tiny and small presets, and the cost of recording a
sampler trajectory as a ratio to sampling without it — all measured in one process."""

from __future__ import annotations

import time

import torch

from genperc.diffusion.conditioning import Conditioning
from genperc.diffusion.schedule import DiffusionConfig, NoiseSchedule
from genperc.models.registry import create_denoiser


def _train_ips(preset: str, size: int, batch: int, steps: int = 6) -> float:
    torch.manual_seed(0)
    model = create_denoiser(preset, sample_size=size, in_channels=3, cond_channels=3, text_dim=384)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sched = NoiseSchedule(DiffusionConfig(prediction_type="x0"))
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    cond = Conditioning(text=torch.randn(batch, 8, 384, generator=g), text_mask=torch.ones(batch, 8, dtype=torch.bool),
                        image=torch.rand(batch, 3, size, size, generator=g) * 2 - 1)

    def step():
        t = torch.randint(0, 1000, (batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        loss = (model(sched.add_noise(x0, noise, t), t, cond) - x0).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t0)


def _sampling_ratio(repeats: int = 3) -> dict:
    from genperc.diffusion.sampler import sample

    model = create_denoiser("unet-tiny", sample_size=32, in_channels=3, cond_channels=0, text_dim=0).eval()
    sched = NoiseSchedule(DiffusionConfig(prediction_type="x0"))
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def timed(record: bool) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            sample(model, x, Conditioning(), schedule=sched, sampler="ddim", num_steps=10, record=record,
                   generator=torch.Generator().manual_seed(0))
        return time.perf_counter() - t0

    timed(False)
    plain, rec = [], []
    for _ in range(repeats):  # interleave to cancel drift
        plain.append(timed(False))
        rec.append(timed(True))
    return {"sampling_s_plain": round(min(plain), 3), "sampling_s_recorded": round(min(rec), 3),
            "trajectory_overhead_ratio": round(min(rec) / min(plain), 3)}


def run() -> dict:
    tiny = _train_ips("unet-tiny", 32, 16)
    small = _train_ips("unet-small", 64, 8, steps=3)
    return {"train_images_per_s_unet_tiny_32px": round(tiny, 1),
            "train_images_per_s_unet_small_64px": round(small, 2),
            "small_over_tiny_time_per_image": round(tiny / small, 1),
            **_sampling_ratio()}
