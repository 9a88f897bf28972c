"""Stage 4b: Mitsuba rendering throughput of the shapes world, ``cuda_ad_rgb`` against ``scalar_rgb``,
and whether their images agree (labels exactly; RGB up to Monte-Carlo noise)."""

from __future__ import annotations

import math
import os
import time

import numpy as np
from common import Ctx

GPU = {"resolutions": (64, 128), "scenes": 12}
SMOKE = {"resolutions": (32,), "scenes": 3}


def _specs(resolution: int, scenes: int):
    from genperc.data.world.render_job import scene_seeds
    from genperc.data.world.scene import WorldConfig, sample_scene

    config = WorldConfig(resolution=resolution)
    out = []
    for i in range(scenes):
        rng, seed, _ = scene_seeds(0, "val", i)
        out.append((sample_scene(config, rng), seed))
    return config, out


def _render_all(variant: str, threads: int | None, config, specs, seed_offset: int = 0):
    """(first-scene seconds, seconds per scene after it, [(labels, rgb)]) in ``variant``."""
    from genperc.data.world import render as R

    R.configure(variant, threads=threads)
    out, times = [], []
    for spec, seed in specs:
        t0 = time.perf_counter()
        labels = R.render_labels(spec, config.resolution)
        rgb = R.render_rgb(spec, config.resolution, config.spp, seed + seed_offset, config.max_depth)
        times.append(time.perf_counter() - t0)
        out.append((labels, rgb))
    steady = times[1:] or times
    return times[0], sum(steady) / len(steady), out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _agreement(ref, other) -> dict:
    same_ids, depth_diff, psnrs = [], [], []
    for (la, ra), (lb, rb) in zip(ref, other, strict=True):
        same_ids.append(float(np.mean(la.instances == lb.instances)))
        both = la.valid & lb.valid
        depth_diff.append(float(np.abs(la.depth[both] - lb.depth[both]).max()) if both.any() else 0.0)
        psnrs.append(psnr(ra, rb))
    finite = [p for p in psnrs if math.isfinite(p)]
    return {"instance_map_agreement": round(min(same_ids), 5), "depth_max_abs_diff_m": round(max(depth_diff), 5),
            "rgb_psnr_db_mean": round(sum(finite) / len(finite), 2) if finite else "identical"}


def _resolution(ctx: Ctx, resolution: int, scenes: int, cuda_ok: str | None) -> dict:
    config, specs = _specs(resolution, scenes)
    threads = os.cpu_count() or 1
    out: dict = {"scenes": scenes, "spp": config.spp}
    ctx.result[f"{resolution}px"] = out  # saved as it fills, in case the cuda part hangs
    first, per, scalar = _render_all("scalar_rgb", threads, config, specs)
    out["scalar_rgb"] = {"threads": threads, "scenes_per_s": round(1 / per, 2), "ms_per_scene": round(1e3 * per, 1),
                         "first_scene_s": round(first, 2)}
    _, _, reseeded = _render_all("scalar_rgb", threads, config, specs, seed_offset=1)
    out["noise_floor_scalar_vs_scalar_other_seed"] = _agreement(scalar, reseeded)
    ctx.save()
    if cuda_ok is not None:
        out["cuda_ad_rgb"] = {"skipped": cuda_ok}
        return out
    first, per, cuda = _render_all("cuda_ad_rgb", None, config, specs)
    out["cuda_ad_rgb"] = {"scenes_per_s": round(1 / per, 2), "ms_per_scene": round(1e3 * per, 1),
                          "first_scene_s": round(first, 2),
                          "speedup_over_scalar_all_threads": round(out["scalar_rgb"]["ms_per_scene"] / (1e3 * per), 2)}
    out["agreement_cuda_vs_scalar"] = _agreement(scalar, cuda)
    return out


def _cuda_unavailable(ctx: Ctx) -> str | None:
    """Why cuda_ad_rgb is not measured, or None when it can be."""
    if ctx.smoke:
        return "smoke: scalar_rgb only (no GPU)"
    import drjit as dr
    import mitsuba as mi

    if "cuda_ad_rgb" not in mi.variants():
        return f"this mitsuba has no cuda_ad_rgb (variants: {mi.variants()})"
    if not dr.has_backend(dr.JitBackend.CUDA):
        return "Dr.Jit finds no CUDA backend"
    return None


def rendering(ctx: Ctx) -> dict:
    import mitsuba as mi

    sizes = SMOKE if ctx.smoke else GPU
    cuda_ok = _cuda_unavailable(ctx)
    ctx.result.update(mitsuba=mi.__version__, what="render_labels + render_rgb per scene (genperc.data.world.render)")
    for res in sizes["resolutions"]:
        ctx.part(f"{res}px", lambda r=res: _resolution(ctx, r, sizes["scenes"], cuda_ok),
                 need_s=5.0 if ctx.smoke else 20.0)
    return ctx.result
