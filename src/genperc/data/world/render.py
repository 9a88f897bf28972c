"""Mitsuba 3 rendering of a :class:`SceneSpec`: an anti-aliased RGB image and pixel-centre labels.

Two passes per scene, both built with ``mi.load_dict`` in the process's one Mitsuba variant:

* **labels** — the ``aov`` integrator with 1 sample per pixel exactly at the pixel centre (the
  ``stratified`` sampler without jitter and a box filter of radius 0.5, so every pixel holds the
  value of the single ray through its centre). Each object gets a diffuse BSDF whose reflectance
  encodes its instance id, so the ``albedo`` AOV is the instance map; the ``depth`` AOV is the ray
  distance. (Mitsuba's ``shape_index`` AOV is a pointer bit pattern in scalar variants and a
  registry id in JIT variants, so it is not used.) Cheap: a few milliseconds.
* **rgb** — the ``path`` integrator at ``spp`` samples per pixel with Mitsuba's default Gaussian
  reconstruction filter (anti-aliased), converted to 8-bit sRGB.

Depth. Mitsuba's perspective sensor starts each ray on the near-clip plane, so the ``depth`` AOV is
``t = |hit - camera| - near_clip / cos(theta)``, theta the angle between the ray and the optical
axis. We store **planar z-depth along the camera axis**: ``z = t * cos(theta) + near_clip``, in
metres; pixels that see no surface get 0 (invalid).

Variant: ``auto`` picks ``cuda_ad_rgb`` when a CUDA device is present, else ``scalar_rgb``.
``llvm_ad_rgb`` can be asked for, but with LLVM 15 (what Debian 12 ships) Dr.Jit's kernels abort
the process ("Cannot select: fminimum"); with LLVM 19 it runs but recompiles its kernels for
every scene (about 180 ms per 64x64 scene, slower than scalar), so it is never chosen
automatically. Rendering is
byte-reproducible for ``scalar_rgb`` with one render thread (the render job sets that): more
threads merge image blocks in a varying order.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from genperc.data.world.scene import COLORS, SceneSpec, object_height

METAL_ROUGHNESS = 0.18
_state: dict = {}


# --------------------------------------------------------------------------- variant


def resolve_variant(name: str = "auto") -> str:
    """The Mitsuba variant to use: ``auto`` → ``cuda_ad_rgb`` with a CUDA device, else ``scalar_rgb``."""
    if name != "auto":
        return name
    import drjit as dr
    import mitsuba as mi

    if "cuda_ad_rgb" in mi.variants():
        try:
            if dr.has_backend(dr.JitBackend.CUDA):
                return "cuda_ad_rgb"
        except Exception:  # no driver: fall through to the CPU
            pass
    return "scalar_rgb"


def use_variant(name: str = "auto", threads: int | None = None):
    """Set the process's Mitsuba variant (once; cheap when unchanged) and return ``mitsuba``."""
    import drjit as dr
    import mitsuba as mi

    variant = resolve_variant(name)
    if mi.variant() != variant:
        mi.set_variant(variant)
    if threads is not None and dr.thread_count() != threads:
        dr.set_thread_count(threads)
    return mi


# --------------------------------------------------------------------------- scene dicts


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    c = np.asarray(c, dtype=np.float64)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def linear_to_srgb8(c: np.ndarray) -> np.ndarray:
    """Linear RGB floats → 8-bit sRGB (clipped, rounded): the stored image."""
    c = np.clip(np.asarray(c, dtype=np.float64), 0.0, 1.0)
    s = np.where(c <= 0.0031308, 12.92 * c, 1.055 * np.power(c, 1 / 2.4) - 0.055)
    return np.round(s * 255.0).astype(np.uint8)


def _cone_ply() -> str:
    """A unit cone (base radius 1 at z = 0, apex at z = 2) as a binary PLY, written once per process."""
    path = _state.get("cone_ply")
    if path and os.path.exists(path):
        return path
    n = 48
    phi = 2 * np.pi * np.arange(n) / n
    mid = phi + np.pi / n

    def side_n(a):  # outward normal of the slanted side (slope: radius 1 over height 2)
        return np.stack([2 * np.cos(a), 2 * np.sin(a), np.ones_like(a)], -1) / math.sqrt(5)

    ring = np.stack([np.cos(phi), np.sin(phi), np.zeros(n)], -1)
    verts = [ring, np.tile([0.0, 0.0, 2.0], (n, 1)), ring, [[0.0, 0.0, 0.0]]]
    norms = [side_n(phi), side_n(mid), np.tile([0.0, 0.0, -1.0], (n, 1)), [[0.0, 0.0, -1.0]]]
    v = np.concatenate(verts).astype("<f4")
    vn = np.concatenate(norms).astype("<f4")
    i = np.arange(n)
    side = np.stack([i, (i + 1) % n, n + i], -1)  # counter-clockwise seen from outside
    cap = np.stack([np.full(n, 3 * n), 2 * n + (i + 1) % n, 2 * n + i], -1)
    faces = np.concatenate([side, cap]).astype("<i4")
    header = (f"ply\nformat binary_little_endian 1.0\nelement vertex {len(v)}\n"
              "property float x\nproperty float y\nproperty float z\n"
              "property float nx\nproperty float ny\nproperty float nz\n"
              f"element face {len(faces)}\nproperty list uchar int vertex_indices\nend_header\n")
    vert_bytes = np.concatenate([v, vn], 1).tobytes()
    face_rec = np.zeros(len(faces), dtype=[("n", "u1"), ("i", "<i4", 3)])
    face_rec["n"], face_rec["i"] = 3, faces
    data = header.encode("ascii") + vert_bytes + face_rec.tobytes()
    # One shared file (same bytes for every process), written via temp + rename: no leak per worker.
    path = os.path.join(tempfile.gettempdir(), f"genperc-cone-{n}-{os.getuid()}.ply")
    if not (os.path.exists(path) and Path(path).read_bytes() == data):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    _state["cone_ply"] = path
    return path


LIGHT_DISTANCE = 1000.0  # metres: far enough that the light spheres act as soft directional lights


def light_dicts(spec: SceneSpec) -> dict:
    """The emitters: a constant sky plus one far emitting sphere per light (soft shadows).

    Each emitter's ``sampling_weight`` is its irradiance on the floor, so the path tracer's
    one-emitter-per-bounce choice is proportional to each light's contribution: with uniform
    choice among unequal lights the floor was visibly noisy at 16 spp. (An environment map with
    the same lobes gives the same picture but costs about 30 % more per sample.)
    """
    sky = spec.ambient
    out = {"sky": {"type": "constant", "radiance": {"type": "rgb", "value": sky},
                   "sampling_weight": math.pi * sky}}
    for k, light in enumerate(spec.lights):
        a, e = math.radians(light.azimuth), math.radians(light.elevation)
        direction = [math.cos(e) * math.cos(a), math.cos(e) * math.sin(a), math.sin(e)]
        # A sphere of angular radius α and radiance L gives irradiance E = π L sin²α.
        radiance = light.irradiance / (math.pi * math.sin(light.spread) ** 2)
        out[f"light{k}"] = {
            "type": "sphere", "center": [LIGHT_DISTANCE * c for c in direction],
            "radius": LIGHT_DISTANCE * math.tan(light.spread),
            "emitter": {"type": "area", "radiance": {"type": "rgb", "value": radiance},
                        "sampling_weight": light.irradiance},
        }
    return out


def _shape_dicts(mi, obj, bsdf: dict) -> list[dict]:
    """Mitsuba shape dicts for one object (a cylinder is an open tube plus a top disk)."""
    T = mi.ScalarTransform4f
    x, y, _ = obj.position
    r = obj.radius
    h = object_height(obj.shape, r)
    if obj.shape == "sphere":
        return [{"type": "sphere", "center": [x, y, r], "radius": r, "bsdf": bsdf}]
    if obj.shape == "cube":
        to_world = T().translate([x, y, h / 2]).rotate([0, 0, 1], obj.rotation).scale(h / 2)
        return [{"type": "cube", "to_world": to_world, "bsdf": bsdf}]
    if obj.shape == "cylinder":
        return [{"type": "cylinder", "p0": [x, y, 0.0], "p1": [x, y, h], "radius": r, "bsdf": bsdf},
                {"type": "disk", "to_world": T().translate([x, y, h]).scale(r), "bsdf": bsdf}]
    if obj.shape == "cone":
        to_world = T().translate([x, y, 0.0]).rotate([0, 0, 1], obj.rotation).scale(r)
        return [{"type": "ply", "filename": _cone_ply(), "to_world": to_world,
                 "face_normals": False, "bsdf": bsdf}]
    raise ValueError(f"unknown shape {obj.shape}")


def _material(obj) -> dict:
    lin = srgb_to_linear(np.array(COLORS[obj.color]) / 255.0).tolist()
    if obj.material == "metal":
        return {"type": "roughconductor", "material": "none", "alpha": METAL_ROUGHNESS,
                "specular_reflectance": {"type": "rgb", "value": lin}}
    return {"type": "diffuse", "reflectance": {"type": "rgb", "value": lin}}


def _sensor(mi, spec: SceneSpec, width: int, height: int, labels: bool, spp: int) -> dict:
    cam = spec.camera
    sampler = ({"type": "stratified", "sample_count": 1, "jitter": False} if labels
               else {"type": "independent", "sample_count": spp})
    return {
        "type": "perspective", "fov": cam.fov, "fov_axis": "x", "near_clip": cam.near_clip,
        "far_clip": 1.0e4,
        "to_world": mi.ScalarTransform4f().look_at(origin=list(cam.origin), target=list(cam.target),
                                                   up=list(cam.up)),
        "film": {"type": "hdrfilm", "width": width, "height": height, "pixel_format": "rgb",
                 "rfilter": {"type": "box"} if labels else {"type": "gaussian"}},
        "sampler": sampler,
    }


def scene_dict(spec: SceneSpec, width: int, height: int, *, labels: bool, spp: int = 16,
               max_depth: int = 4) -> dict:
    """The ``mi.load_dict`` description of a scene for the label pass or the RGB pass."""
    mi = use_variant(_state.get("variant", "auto"))
    floor_bsdf = {"type": "diffuse",
                  "reflectance": {"type": "rgb", "value": 0.0 if labels else spec.floor_albedo}}
    d = {
        "type": "scene",
        "sensor": _sensor(mi, spec, width, height, labels, spp),
        "floor": {"type": "rectangle", "to_world": mi.ScalarTransform4f().scale(200.0),
                  "bsdf": floor_bsdf},
    }
    if labels:
        d["integrator"] = {"type": "aov", "aovs": "t:depth,a:albedo"}
    else:
        d["integrator"] = {"type": "path", "max_depth": max_depth}
        d.update(light_dicts(spec))
    for k, obj in enumerate(spec.objects):
        instance_id = k + 1
        bsdf = ({"type": "diffuse", "reflectance": {"type": "rgb", "value": [instance_id / 255.0, 0, 0]}}
                if labels else _material(obj))
        for part, shape in enumerate(_shape_dicts(mi, obj, bsdf)):
            d[f"object{k:03d}_{part}"] = shape
    return d


# --------------------------------------------------------------------------- passes


def ray_cosines(width: int, height: int, fov: float) -> np.ndarray:
    """cos(angle between the pixel-centre ray and the optical axis), float64 [H, W]; fov along x."""
    tx = math.tan(math.radians(fov) / 2)
    ty = tx * height / width
    xs = (2 * (np.arange(width) + 0.5) / width - 1) * tx
    ys = (2 * (np.arange(height) + 0.5) / height - 1) * ty
    return 1.0 / np.sqrt(1.0 + xs[None, :] ** 2 + ys[:, None] ** 2)


def planar_depth(ray_t: np.ndarray, fov: float, near_clip: float) -> np.ndarray:
    """Mitsuba's ``depth`` AOV (distance from the near-clip plane along the ray) → planar z-depth.

    Returns float32 metres along the camera axis; 0 where ``ray_t`` is 0 (no surface).
    """
    h, w = ray_t.shape
    z = ray_t.astype(np.float64) * ray_cosines(w, h, fov) + near_clip
    return np.where(ray_t > 0, z, 0.0).astype(np.float32)


@dataclass
class Labels:
    instances: np.ndarray  # int32 [H, W]: 0 = floor / nothing, k = object k (1-based)
    depth: np.ndarray  # float32 [H, W]: planar z-depth in metres, 0 = no surface
    valid: np.ndarray  # bool [H, W]: a surface was hit

    def pixel_counts(self, n_objects: int) -> np.ndarray:
        return np.bincount(self.instances.ravel(), minlength=n_objects + 1)[1 : n_objects + 1]


def render_labels(spec: SceneSpec, resolution: int) -> Labels:
    """Pixel-centre instance ids and planar depth (one ray per pixel)."""
    mi = use_variant(_state.get("variant", "auto"))
    scene = mi.load_dict(scene_dict(spec, resolution, resolution, labels=True))
    out = np.array(mi.render(scene, spp=1), dtype=np.float32)  # [H, W, 4]: t, albedo R, G, B
    ray_t, code = out[..., 0], out[..., 1]
    instances = np.rint(code * 255.0).astype(np.int32)
    valid = ray_t > 0
    depth = planar_depth(ray_t, spec.camera.fov, spec.camera.near_clip)
    instances[~valid] = 0
    return Labels(instances, depth, valid)


def render_rgb(spec: SceneSpec, resolution: int, spp: int, seed: int, max_depth: int = 4) -> np.ndarray:
    """The path-traced, anti-aliased image as 8-bit sRGB [H, W, 3]."""
    mi = use_variant(_state.get("variant", "auto"))
    scene = mi.load_dict(scene_dict(spec, resolution, resolution, labels=False, spp=spp,
                                    max_depth=max_depth))
    linear = np.array(mi.render(scene, seed=int(seed) & 0xFFFFFFFF, spp=spp), dtype=np.float32)
    return linear_to_srgb8(linear[..., :3])


def configure(variant: str = "auto", threads: int | None = 1) -> str:
    """Choose the variant for this process's renders (and the render thread count); returns it."""
    resolved = resolve_variant(variant)
    _state["variant"] = resolved
    use_variant(resolved, threads)
    return resolved
