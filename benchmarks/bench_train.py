"""The training step against the machine's own peak and against a bare loop (issue 11).

For unet-tiny at 32 px and unet-small at 64 px, in one process:

* **levers** — the bare step (forward, loss, backward, AdamW) with each speed lever switched off
  and on, interleaved, as a time ratio (< 1 = the lever pays): bf16 autocast, the classic
  (matmul + softmax) attention processor instead of torch's SDPA, channels_last, fused AdamW.
* **peak fraction** — FLOPs of one training step counted with ``torch.utils.flop_counter``,
  divided by the step time with every lever the library uses (``genperc.runtime``), as a
  fraction of the same process's dense-matmul FLOP/s at the same precision.
* **trainer / bare** — ``Trainer.train`` step time (data loading, task codec, cached text encoder,
  timestep strategy, conditioning dropout, clipping, EMA, logging) over the same recipe written by
  hand (the bare step + gradient clipping + a foreach EMA) on the same model, precision and batch
  size: the trainer's own overhead (target ≤ 1.05).
* the cost of recording a sampler trajectory, as a ratio to sampling without it.

Step times are medians of interleaved repeats (these machines are shared and noisy).
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from genperc import runtime
from genperc.diffusion.conditioning import Conditioning
from genperc.diffusion.schedule import DiffusionConfig, NoiseSchedule
from genperc.models.registry import create_denoiser

CASES = [("unet-tiny", 32, 16), ("unet-small", 64, 8)]


class BareStep:
    """What a user would write by hand: x_t from a fixed batch, forward, MSE, backward, AdamW; with
    ``recipe`` also the trainer's recipe by hand (gradient clipping at 1 and an EMA of the weights)."""

    def __init__(self, arch: str, size: int, batch: int, *, bf16: bool, classic_attention: bool,
                 channels_last: bool, fused: bool, seed: int = 0, recipe: bool = False,
                 inputs: tuple[torch.Tensor, Conditioning] | None = None):
        self.model = create_denoiser(arch, seed=seed, sample_size=size, in_channels=3, cond_channels=3, text_dim=384)
        if classic_attention:
            runtime.use_classic_attention(self.model)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=fused or None)
        self.sched = NoiseSchedule(DiffusionConfig(prediction_type="x0"))
        self.g = torch.Generator().manual_seed(seed)
        if inputs is not None:  # the trainer's own batch (target and conditioning)
            self.x0, self.cond = inputs
        else:
            self.x0 = torch.rand(batch, 3, size, size, generator=self.g) * 2 - 1
            self.cond = Conditioning(text=torch.randn(batch, 8, 384, generator=self.g),
                                     text_mask=torch.ones(batch, 8, dtype=torch.bool),
                                     image=torch.rand(batch, 3, size, size, generator=self.g) * 2 - 1)
        self.bf16, self.channels_last, self.recipe = bf16, channels_last, recipe
        self.params = list(self.model.parameters())
        self.ema = [p.detach().clone() for p in self.params] if recipe else []

    def __call__(self) -> None:
        t = torch.randint(0, 1000, (self.x0.shape[0],), generator=self.g)
        x_t = self.sched.add_noise(self.x0, torch.randn(self.x0.shape, generator=self.g), t)
        if self.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(x_t, t, self.cond)
        loss = (out.float() - self.x0).pow(2).mean()
        loss.backward()
        if self.recipe:
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.recipe:
            with torch.no_grad():
                torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1 - 0.999)


def interleaved(fns: dict, repeats: int, steps: int) -> dict[str, float]:
    """Median seconds per call of each function, timed in turns (after one warm-up call each)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            times[name].append((time.perf_counter() - t0) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def matmul_flops(dtype: torch.dtype, n: int = 1536, repeats: int = 6) -> float:
    """Dense-matmul FLOP/s of this process at ``dtype`` (best of a few square products)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def step_flops(step: BareStep) -> float:
    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def _levers(arch: str, size: int, batch: int, repeats: int, steps: int) -> dict:
    base = dict(bf16=False, classic_attention=False, channels_last=False, fused=False)
    variants = {"fp32": base, "bf16": base | {"bf16": True},
                "bf16+classic_attention": base | {"bf16": True, "classic_attention": True},
                "fp32+classic_attention": base | {"classic_attention": True},
                "bf16+classic+channels_last": base | {"bf16": True, "classic_attention": True, "channels_last": True},
                "bf16+classic+fused_adamw": base | {"bf16": True, "classic_attention": True, "fused": True}}
    steps_ = {name: BareStep(arch, size, batch, **kw) for name, kw in variants.items()}
    sec = interleaved(steps_, repeats, steps)
    ref = sec["fp32"]
    return {f"{name}_time_ratio": round(s / ref, 3) for name, s in sec.items() if name != "fp32"} | {
        "fp32_s_per_step": round(ref, 4)}


def _trainer_batch(trainer) -> tuple[torch.Tensor, Conditioning]:
    """The target and conditioning of the trainer's first batch, as the trainer builds them."""
    from genperc.data.datasets import collate
    from genperc.models.conditioning import make_conditioning

    task_batch = trainer.task.prepare(collate([trainer.dataset[i] for i in range(trainer.cfg.train.batch_size)]))
    with torch.no_grad():
        cond = make_conditioning(task_batch, trainer.text_encoder, trainer.space, torch.device("cpu"))
    return trainer.space.encode(task_batch.x0), cond


def _trainer_vs_bare(arch: str, size: int, batch: int, repeats: int, steps: int, workers: int = 0) -> dict:
    """``Trainer.train`` per-step time over the same recipe by hand, same model, precision and batch."""
    from genperc.config import load_config
    from genperc.training.trainer import Trainer

    opts = runtime.speed_options("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("cpu-tiny", [f"model.arch={arch}", f"model.sample_size={size}", f"data.resolution={size}",
                                       f"train.batch_size={batch}", "train.progress=false", "train.steps=100000",
                                       "train.checkpoint_every=100000", "train.log_every=10",
                                       f"data.num_workers={workers}",
                                       f"train.mixed_precision={'bf16' if opts.bf16 else 'no'}"])
        trainer = Trainer(cfg, tmp)
        stamps: list[float] = []

        class Clock:
            def after_step(self, _trainer):
                stamps.append(time.perf_counter())

        trainer.hooks.append(Clock())
        bare = BareStep(arch, size, batch, bf16=opts.bf16, classic_attention=opts.classic_attention,
                        channels_last=False, fused=opts.fused_adamw, recipe=True, inputs=_trainer_batch(trainer))
        bare()
        trainer.train(max_steps=trainer.step + 2)  # warm-up (text cache, first checkpoint)
        trainer_steps, bare_steps = [], []
        for _ in range(repeats):
            stamps.clear()
            trainer.train(max_steps=trainer.step + steps + 1)
            trainer_steps += [b - a for a, b in zip(stamps, stamps[1:], strict=False)]  # the checkpoint after the last is out
            t0 = time.perf_counter()
            for _ in range(steps):
                bare()
            bare_steps.append((time.perf_counter() - t0) / steps)
    tr, br = statistics.median(trainer_steps), statistics.median(bare_steps)
    return {"trainer_s_per_step": round(tr, 4), "bare_s_per_step": round(br, 4),
            "trainer_over_bare": round(tr / br, 3)}


def _case(arch: str, size: int, batch: int, quick: bool) -> dict:
    repeats, steps = (2, 1) if quick else ((5, 3) if arch == "unet-tiny" else (3, 1))
    opts = runtime.speed_options("cpu")
    fast = BareStep(arch, size, batch, bf16=opts.bf16, classic_attention=opts.classic_attention,
                    channels_last=False, fused=opts.fused_adamw)
    flops = step_flops(fast)
    sec = interleaved({"fast": fast}, repeats, steps)["fast"]
    peak = matmul_flops(torch.bfloat16 if opts.bf16 else torch.float32, n=512 if quick else 1536)
    out = {"batch": batch, "gflop_per_image": round(flops / batch / 1e9, 3),
           "images_per_s": round(batch / sec, 1), "achieved_gflop_s": round(flops / sec / 1e9, 1),
           "matmul_peak_gflop_s": round(peak / 1e9, 1), "peak_fraction": round(flops / sec / peak, 3),
           "precision": "bf16" if opts.bf16 else "fp32", "classic_attention": opts.classic_attention}
    out |= _levers(arch, size, batch, repeats, steps)
    out |= _trainer_vs_bare(arch, size, batch, repeats, max(steps, 3))
    if arch == "unet-tiny":  # a data worker decoding ahead of the step (data.num_workers=1)
        worker = _trainer_vs_bare(arch, size, batch, repeats, max(steps, 3), workers=1)
        out["trainer_over_bare_with_data_worker"] = worker["trainer_over_bare"]
    return out


def _sampling_ratio(repeats: int = 3) -> dict:
    from genperc.diffusion.sampler import sample

    model = create_denoiser("unet-tiny", sample_size=32, in_channels=3, cond_channels=0, text_dim=0).eval()
    sched = NoiseSchedule(DiffusionConfig(prediction_type="x0"))
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def run(record: bool):
        def fn():
            with torch.no_grad():
                sample(model, x, Conditioning(), schedule=sched, sampler="ddim", num_steps=10, record=record,
                       generator=torch.Generator().manual_seed(0))
        return fn

    sec = interleaved({"plain": run(False), "recorded": run(True)}, repeats, 1)
    return {"sampling_s_plain": round(sec["plain"], 3), "sampling_s_recorded": round(sec["recorded"], 3),
            "trajectory_overhead_ratio": round(sec["recorded"] / sec["plain"], 3)}


def run(quick: bool = False) -> dict:
    threads = runtime.configure_threads(None, announce=False)
    out: dict = {"threads": threads}
    for arch, size, batch in CASES:
        out[f"{arch}_{size}px"] = _case(arch, size, batch, quick)
    return out | _sampling_ratio(2 if quick else 3)
