"""Training-step overhead of each ADDP component (timestep strategies, §3.1; augmentation, §3.2) as
a ratio to the plain step (uniform t, no augmentation) measured in the same process.

Two measurements per component, on the unet-tiny preset at 32×32, batch 16 (the CPU preset):

* ``*_ratio``: 1 + (extra time of the component) / (plain step time), the component timed alone
  over many repetitions (its own draws included, the uniform draw it replaces subtracted). Stable
  on a noisy machine; this is the number to compare with the 3% target.
* ``*_step_ratio``: whole training steps with the component, the best of interleaved repeats
  divided by the best plain step — the end-to-end check, noisier by nature.
"""

from __future__ import annotations

import time

import torch

from genperc.diffusion.conditioning import Conditioning
from genperc.diffusion.schedule import DiffusionConfig, NoiseSchedule
from genperc.diffusion.timesteps import create_timestep_sampler, load_contributions
from genperc.models.registry import create_denoiser
from genperc.tasks.augment import depth_augment, referring_augment

SIZE, BATCH, T = 32, 16, 1000


def _data(g):
    image = torch.rand(BATCH, 3, SIZE, SIZE, generator=g) * 2 - 1
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    cx, cy = torch.randint(8, SIZE - 8, (2, BATCH, 1, 1, 1), generator=g)
    mask = ((xx - cx) ** 2 + (yy - cy) ** 2) < 36
    depth = (torch.linspace(-1, 1, SIZE)[:, None].expand(SIZE, SIZE) + 0.1 * torch.rand(BATCH, 1, SIZE, SIZE, generator=g))
    valid = torch.rand(BATCH, 1, SIZE, SIZE, generator=g) > 0.1
    return image, mask, depth.expand(-1, 3, -1, -1).contiguous(), valid


def run(device: str | None = None) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    cpu_g = torch.Generator().manual_seed(0)
    g = torch.Generator(device=dev).manual_seed(0)  # the trainer's generator lives on its device
    sched = NoiseSchedule(DiffusionConfig(prediction_type="x0"))
    model = create_denoiser("unet-tiny", sample_size=SIZE, in_channels=3, cond_channels=3, text_dim=384, seed=0).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    image, mask, depth, valid = (x.to(dev) for x in _data(cpu_g))
    red = torch.tensor([1.0, -1.0, -1.0], device=dev).view(1, 3, 1, 1)
    x0_ref = image * (1 - mask.float()) + red * mask.float()
    cond = Conditioning(text=torch.randn(BATCH, 8, 384, generator=cpu_g).to(dev),
                        text_mask=torch.ones(BATCH, 8, dtype=torch.bool, device=dev), image=image)
    samplers = {
        "uniform": create_timestep_sampler("uniform", T),
        "loss_scaling": create_timestep_sampler("loss-scaling", T, contributions=load_contributions("diffusion", sched)),
        "prob_scaling": create_timestep_sampler("prob-scaling", T, contributions=load_contributions("addp-referring", T)),
    }
    augs = {
        "none": lambda t: x0_ref,
        "augment_referring": lambda t: referring_augment(image, mask, t, T, 1.0, g),
        "augment_depth": lambda t: depth_augment(depth, valid, t, T, 1.0, g),
    }

    def step(sampler="uniform", aug="none"):
        t, w = samplers[sampler].sample(BATCH, g, dev)
        x0_aug = augs[aug](t)
        noise = torch.randn(x0_aug.shape, generator=g, device=dev)
        out = model(sched.add_noise(x0_aug, noise, t), t, cond)
        per = (out - x0_ref).pow(2).flatten(1).mean(1)
        loss = (per * w / w.mean()).mean() if w is not None else per.mean()
        loss.backward()
        opt.step()
        opt.zero_grad()

    def best_of(fn, n):
        times = []
        for _ in range(n):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return min(times)

    step()  # warm-up
    variants = {"loss_scaling": ("loss_scaling", "none"), "prob_scaling": ("prob_scaling", "none"),
                "augment_referring": ("uniform", "augment_referring"), "augment_depth": ("uniform", "augment_depth")}
    for v in variants.values():
        step(*v)
    plain, full = [], {k: [] for k in variants}
    for _ in range(4):  # interleaved, to cancel drift
        plain.append(best_of(step, 1))
        for k, v in variants.items():
            full[k].append(best_of(lambda v=v: step(*v), 1))
    step_s = min(plain)

    reps = 200
    t_fixed = torch.full((BATCH,), 500, dtype=torch.long, device=dev)
    comp = {
        "uniform": best_of(lambda: [samplers["uniform"].sample(BATCH, g) for _ in range(reps)], 3) / reps,
        "loss_scaling": best_of(lambda: [samplers["loss_scaling"].sample(BATCH, g) for _ in range(reps)], 3) / reps,
        "prob_scaling": best_of(lambda: [samplers["prob_scaling"].sample(BATCH, g) for _ in range(reps)], 3) / reps,
        "augment_referring": best_of(lambda: [augs["augment_referring"](t_fixed) for _ in range(reps // 4)], 3) / (reps // 4),
        "augment_depth": best_of(lambda: [augs["augment_depth"](t_fixed) for _ in range(reps // 4)], 3) / (reps // 4),
    }
    out = {"plain_step_ms": round(1000 * step_s, 1)}
    for k in variants:
        extra = comp[k] - (comp["uniform"] if k in ("loss_scaling", "prob_scaling") else 0.0)
        out[f"{k}_ms"] = round(1000 * comp[k], 3)
        out[f"{k}_ratio"] = round(1 + max(extra, 0.0) / step_s, 4)
        out[f"{k}_step_ratio"] = round(min(full[k]) / step_s, 3)
    out["device"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    return out


if __name__ == "__main__":
    for k, v in run().items():
        print(f"{k}: {v}")
