"""Shapes-world rendering throughput: scenes/s per core at 32, 64 and 128 px, 16 spp.

Per core: the whole job (sampling, the visibility pass with resampling, path tracing, expressions,
PNG/NPY encoding and writing, merge) in one process with one Mitsuba thread. Machine: all cores,
``render_split(workers=os.cpu_count())`` at 64 px — the figure the issue's target (>= 20 scenes/s
at 64x64, 16 spp, on a 2-core machine) is about. A per-stage profile at 64 px says where the time
goes.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time

SCENES = {32: 60, 64: 40, 128: 12}


def _per_core(resolution: int, scenes: int) -> float:
    from genperc.data.world.render_job import render_split
    from genperc.data.world.scene import WorldConfig

    config = WorldConfig(resolution=resolution, spp=16)
    with tempfile.TemporaryDirectory() as tmp:
        render_split(tmp, config, split="val", scenes=1, seed=123, workers=1, progress=False)  # warm up
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        render_split(tmp, config, split="val", scenes=scenes, seed=0, workers=1, progress=False)
        return scenes / (time.perf_counter() - t0)


def _machine(resolution: int, scenes: int, workers: int) -> tuple[float, float]:
    """(scenes/s of the whole job, seconds of fixed cost: worker start-up and the merge).

    The fixed cost is measured with one scene per worker and subtracted for the steady rate.
    """
    from genperc.data.world.render_job import render_split
    from genperc.data.world.scene import WorldConfig

    def timed(n: int) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            render_split(tmp, WorldConfig(resolution=resolution, spp=16), split="val", scenes=n,
                         seed=0, workers=workers, progress=False)
            return time.perf_counter() - t0

    small, full = timed(workers), timed(scenes)
    return scenes / full, (scenes - workers) / max(full - small, 1e-9)


def _profile(resolution: int = 64, scenes: int = 20) -> dict:
    """Milliseconds per scene in each stage (one thread)."""
    import numpy as np

    from genperc.data.world import render as R
    from genperc.data.world.annotate import annotate, semantic_map
    from genperc.data.world.format import encode_scene
    from genperc.data.world.render_job import scene_seeds
    from genperc.data.world.scene import WorldConfig, sample_scene

    R.configure("auto", threads=1)
    config = WorldConfig(resolution=resolution)
    t = dict(sample=0.0, labels=0.0, rgb=0.0, annotate=0.0, encode=0.0)
    attempts = 0
    for i in range(scenes):
        rng, seed, erng = scene_seeds(0, "val", i)
        while True:
            a = time.perf_counter()
            spec = sample_scene(config, rng)
            b = time.perf_counter()
            labels = R.render_labels(spec, resolution)
            c = time.perf_counter()
            t["sample"] += b - a
            t["labels"] += c - b
            attempts += 1
            if (labels.pixel_counts(len(spec.objects)) >= config.pixel_threshold).all():
                break
        a = time.perf_counter()
        image = R.render_rgb(spec, resolution, config.spp, seed, config.max_depth)
        b = time.perf_counter()
        annotate(spec, labels, config, erng)
        c = time.perf_counter()
        encode_scene(image, labels.depth, labels.instances, semantic_map(labels.instances, labels.valid, spec))
        d = time.perf_counter()
        t["rgb"] += b - a
        t["annotate"] += c - b
        t["encode"] += d - c
    out = {k: round(1e3 * v / scenes, 2) for k, v in t.items()}
    out["attempts_per_scene"] = round(attempts / scenes, 2)
    out["resolution"] = int(np.int64(resolution))
    return out


def run() -> dict:
    from genperc.data.world.render import resolve_variant

    workers = os.cpu_count() or 1
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {workers} cores",
        "variant": resolve_variant("auto"),
        "spp": 16,
        "per_core_scenes_per_s": {str(r): round(_per_core(r, n), 2) for r, n in SCENES.items()},
        **dict(zip((f"machine_scenes_per_s_64px_{workers}_workers_300_scenes",
                    f"machine_scenes_per_s_64px_{workers}_workers_steady"),
                   (round(v, 2) for v in _machine(64, 300, workers)), strict=True)),
        "profile_ms_per_scene_64px": _profile(),
        "target": ">= 20 scenes/s at 64x64, 16 spp, on a 2-core machine",
    }
    return results


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
