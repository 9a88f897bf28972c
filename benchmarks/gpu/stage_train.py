"""Stages 1–2: training-step throughput and MFU (levers: torch.compile, channels_last), and
genperc's Trainer against the bare diffusers step on the same model and batch."""

from __future__ import annotations

import copy
import math
import statistics
import tempfile
import time

import torch
from common import (
    Ctx,
    IP2PStep,
    bench_train,
    compute_dtype,
    matmul_peak,
    random_batch,
    round_pow2,
    sync,
    text_encoder_override,
    timed,
)

# (arch, pixels, largest batch tried); the batch is sized to the GPU's memory below it
GPU_CASES = [("unet-small", 64, 512), ("unet-base", 128, 256)]
SMOKE_CASES = [("unet-tiny", 16, 2)]


def _denoiser_unet(arch: str, size: int):
    """The UNet2DConditionModel inside genperc's denoiser of ``arch`` (RGB target, RGB condition, 384-d text)."""
    from genperc.models.registry import create_denoiser

    return create_denoiser(arch, seed=0, sample_size=size, in_channels=3, cond_channels=3, text_dim=384).backbone


def _peak_memory(step) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def size_batch(ctx: Ctx, arch: str, size: int, cap: int, fraction: float = 0.5) -> tuple[int, str]:
    """The largest power-of-two batch ≤ ``cap`` whose step is predicted to use ≤ ``fraction`` of the
    GPU's memory: the peak at batch 8 and 16 gives fixed + per-image bytes, extrapolated."""
    if not ctx.cuda:
        return cap, "smoke: fixed"
    unet = _denoiser_unet(arch, size)
    step = IP2PStep(unet, *random_batch(8, size, ctx.device), device=ctx.device)
    p8 = _peak_memory(step)
    step.set_batch(*random_batch(16, size, ctx.device))
    p16 = _peak_memory(step)
    del step, unet
    torch.cuda.empty_cache()
    per_image = max((p16 - p8) / 8, 1.0)
    total = torch.cuda.get_device_properties(0).total_memory
    fit = (fraction * total - (p8 - 8 * per_image)) / per_image
    batch = max(8, min(cap, round_pow2(fit)))
    return batch, f"pow2 ≤ {cap} fitting {fraction:.0%} of {total / 2**30:.0f} GiB ({per_image / 2**20:.0f} MiB/image)"


def _variant_step(ctx: Ctx, arch: str, size: int, batch: int, variant: str, bf16: bool) -> IP2PStep:
    return IP2PStep(_denoiser_unet(arch, size), *random_batch(batch, size, ctx.device), device=ctx.device, bf16=bf16,
                    channels_last="channels_last" in variant, compile="compile" in variant)


def _prepare_case(ctx: Ctx, arch: str, size: int, cap: int, bf16: bool) -> dict:
    """Batch size and FLOPs of one case (FLOPs counted on the eager step by torch.utils.flop_counter)."""
    out: dict = {"arch": arch, "pixels": size, "variants": {}}
    batch, rule = size_batch(ctx, arch, size, cap)
    out.update(batch=batch, batch_rule=rule)
    eager = _variant_step(ctx, arch, size, batch, "eager", bf16)
    out["flops"] = flops = bench_train().step_flops(eager)
    out.update(gflop_per_image=round(flops / batch / 1e9, 3), gflop_per_step=round(flops / 1e9, 2))
    return out


def _measure(ctx: Ctx, case: dict, variant: str, peak: float, bf16: bool) -> dict:
    """Median step time of one variant (after two warm-up steps: compilation, autotuning, allocator)."""
    repeats, steps = (2, 2) if ctx.smoke else (5, 5)
    batch, flops = case["batch"], case["flops"]
    t0 = time.time()
    step = _variant_step(ctx, case["arch"], case["pixels"], batch, variant, bf16)
    step()
    step()
    sync(ctx.device)
    warm = time.time() - t0
    sec = timed({variant: step}, ctx.device, repeats, steps)[variant]
    del step
    if "compile" in variant:
        torch._dynamo.reset()
    if ctx.cuda:
        torch.cuda.empty_cache()
    return {"s_per_step": round(sec, 5), "images_per_s": round(batch / sec, 1), "tflop_s": round(flops / sec / 1e12, 3),
            "mfu": round(flops / sec / peak, 4), "warmup_s": round(warm, 1)}


def _best(case: dict) -> None:
    done = {k: v for k, v in case["variants"].items() if "mfu" in v}
    if done:
        best = max(done, key=lambda k: done[k]["mfu"])
        case.update(best=best, mfu_best=done[best]["mfu"], images_per_s_best=done[best]["images_per_s"])


def train_throughput(ctx: Ctx) -> dict:
    """Stage 1: images/s and MFU of the bare training step of unet-small 64 px and unet-base 128 px
    (bf16 autocast on the GPU), eager / channels_last / torch.compile / both. The eager variants of
    every case come first; the compiled ones (tens of seconds of compilation each) after, unet-base's
    first, as long as the stage's budget lasts."""
    dtype = compute_dtype(ctx.device)
    bf16 = dtype == torch.bfloat16
    peak = matmul_peak(ctx.device, dtype, ctx.smoke)
    ctx.result.update(precision="bf16" if bf16 else "fp32", matmul_peak_tflop_s=round(peak / 1e12, 3),
                      step="diffusers InstructPix2Pix example step (common.IP2PStep)")
    ctx.save()
    cases = ctx.result.setdefault("cases", {})
    for arch, size, cap in SMOKE_CASES if ctx.smoke else GPU_CASES:
        ctx.part(f"{arch}_{size}px", lambda a=arch, s=size, c=cap: _prepare_case(ctx, a, s, c, bf16),
                 need_s=5.0 if ctx.smoke else 20.0, into=cases)
    ready = {k: c for k, c in cases.items() if isinstance(c, dict) and "flops" in c}
    plan = [(k, v) for v in ("eager", "channels_last") for k in ready]
    plan += [(k, v) for v in ("compile+channels_last", "compile") for k in reversed(ready)]  # unet-base first
    for key, variant in plan:
        case = ready[key]
        if "compile" in variant and not ctx.cuda:
            case["variants"][variant] = {"skipped": "torch.compile is measured on the GPU only (smoke runs on the CPU)"}
            continue
        need = 5.0 if ctx.smoke else (60.0 if "compile" in variant else 10.0)
        ctx.part(variant, lambda c=case, v=variant: _measure(ctx, c, v, peak, bf16), need_s=need, into=case["variants"])
        _best(case)
        ctx.save()
    return ctx.result


# --------------------------------------------------------------------------- stage 2

GPU_PRESETS = [("gpu-small", []), ("gpu-base", [])]
SMOKE_PRESETS = [("gpu-small", ["model.arch=unet-tiny", "model.sample_size=16", "data.resolution=16",
                                "train.batch_size=2", "data.num_workers=0"])]


def _trainer_vs_bare(ctx: Ctx, preset: str, extra: list[str], text_encoder: str, peak: float) -> dict:
    """``Trainer.train`` per-step time over the bare step (same model copy, batch, precision,
    clipping, EMA and conditioning dropout), on the toy source (the loop's overhead, not the data's)."""
    from genperc.config import load_config
    from genperc.training.trainer import Trainer

    # one long timed call on the GPU (each call ends with a checkpoint: seconds for unet-base); the
    # shared CPU interleaves short ones against its noise
    repeats, steps = (2, 3) if ctx.smoke else (1, 30)
    with tempfile.TemporaryDirectory(dir=ctx.work) as tmp:
        cfg = load_config(preset, ["data.source=toy", f"model.text_encoder={text_encoder}", "train.progress=false",
                                   "train.steps=1000000", "train.checkpoint_every=1000000", "train.log_every=10",
                                   *extra])
        trainer = Trainer(cfg, tmp)
        stamps: list[float] = []

        class Clock:
            def after_step(self, _trainer):
                sync(ctx.device)
                stamps.append(time.perf_counter())

        trainer.hooks.append(Clock())
        x0, cond = bench_train()._trainer_batch(trainer)
        bare = IP2PStep(copy.deepcopy(trainer.unwrapped.backbone), x0, cond.to(ctx.device), device=ctx.device,
                        prediction_type=cfg.diffusion.prediction_type, bf16=trainer.precision == "bf16",
                        ema=cfg.train.ema, ema_decay=cfg.train.ema_decay, dropout=cfg.train.cond_dropout,
                        max_grad_norm=cfg.train.max_grad_norm, lr=cfg.train.lr,
                        null_text=trainer.null_conditioning().text, scheduler=trainer.schedule.make_scheduler("ddpm"))
        if trainer.speed.classic_attention:
            from genperc import runtime

            runtime.use_classic_attention(bare.unet)
        flops = bench_train().step_flops(bare)
        bare()
        trainer.train(max_steps=trainer.step + 2)  # warm-up: text cache, workers, first checkpoint
        trainer_steps, bare_steps = [], []
        for _ in range(repeats):
            stamps.clear()
            trainer.train(max_steps=trainer.step + steps + 1)
            trainer_steps += [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
            bare_steps.append(timed({"bare": bare}, ctx.device, 1, steps)["bare"])
    batch = cfg.train.batch_size
    # the trainer's mean step (a data stall every few steps counts), like the bare step's block mean
    tr, br = statistics.mean(trainer_steps), statistics.median(bare_steps)
    return {"arch": cfg.model.arch, "pixels": cfg.data.resolution, "batch": batch, "precision": trainer.precision,
            "num_workers": cfg.data.num_workers, "trainer_s_per_step": round(tr, 5),
            "trainer_s_per_step_median": round(statistics.median(trainer_steps), 5), "bare_s_per_step": round(br, 5),
            "trainer_images_per_s": round(batch / tr, 1), "bare_images_per_s": round(batch / br, 1),
            "trainer_over_bare": round(tr / br, 3) if math.isfinite(tr / br) else None,
            "trainer_mfu": round(flops / tr / peak, 4), "bare_mfu": round(flops / br / peak, 4)}


def trainer_vs_bare(ctx: Ctx) -> dict:
    """Stage 2: genperc's Trainer as a ratio to the bare diffusers InstructPix2Pix step."""
    dtype = compute_dtype(ctx.device)
    peak = matmul_peak(ctx.device, dtype, ctx.smoke)
    text_encoder, what = text_encoder_override(ctx.work, ctx.smoke)
    ctx.result.update(text_encoder=what, matmul_peak_tflop_s=round(peak / 1e12, 3), data="toy (generated on the fly)")
    ctx.save()
    for preset, extra in SMOKE_PRESETS if ctx.smoke else GPU_PRESETS:
        ctx.part(preset, lambda p=preset, e=extra: _trainer_vs_bare(ctx, p, e, text_encoder, peak),
                 need_s=10.0 if ctx.smoke else 30.0, into=ctx.result.setdefault("cases", {}))
    return ctx.result
