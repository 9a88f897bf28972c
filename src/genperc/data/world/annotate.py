"""From a rendered scene (spec + pixel-centre labels) to its annotation record.

Boxes and visible pixel counts come from the instance map, so they describe what the camera sees;
positions, sizes and relations come from the 3-D scene. The record is the JSON object stored as
one line of ``annotations.jsonl`` (see :mod:`genperc.data.world.format`).
"""

from __future__ import annotations

import math

import numpy as np

from genperc.data.world.expressions import generate_expressions
from genperc.data.world.relations import ground_directions, relations
from genperc.data.world.render import Labels
from genperc.data.world.scene import CATEGORIES, SceneSpec, WorldConfig, class_label, class_names


def mask_box(mask: np.ndarray) -> list[int] | None:
    """``[x0, y0, x1, y1]`` of a boolean mask, exclusive right/bottom; None if empty."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if len(ys) == 0:
        return None
    return [int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1]


def semantic_map(instances: np.ndarray, valid: np.ndarray, spec: SceneSpec) -> np.ndarray:
    """Category index per pixel (0 = floor), -1 where no surface was hit; int32 [H, W]."""
    lut = np.array([0] + [CATEGORIES.index(o.shape) for o in spec.objects], dtype=np.int32)
    sem = lut[instances]
    sem[~valid] = -1
    return sem


def camera_record(spec: SceneSpec, width: int, height: int) -> dict:
    cam = spec.camera
    fx = (width / 2) / math.tan(math.radians(cam.fov) / 2)
    return {"origin": list(cam.origin), "target": list(cam.target), "up": list(cam.up),
            "fov": cam.fov, "fov_axis": "x", "near_clip": cam.near_clip,
            "intrinsics": {"fx": round(fx, 6), "fy": round(fx, 6), "cx": width / 2, "cy": height / 2}}


def object_records(spec: SceneSpec, labels: Labels) -> list[dict]:
    out = []
    for k, o in enumerate(spec.objects):
        mask = labels.instances == k + 1
        out.append({
            "id": k + 1, "shape": o.shape, "category_id": CATEGORIES.index(o.shape),
            "color": o.color, "material": o.material, "size": o.size, "radius": o.radius,
            "position": list(o.position), "rotation": o.rotation,
            "box": mask_box(mask), "pixels": int(mask.sum()),
        })
    return out


def annotate(spec: SceneSpec, labels: Labels, config: WorldConfig, rng: np.random.Generator) -> dict:
    """Objects, relations, expressions, class label and camera of one scene (JSON-ready)."""
    h, w = labels.instances.shape
    objects = object_records(spec, labels)
    directions = ground_directions(spec.camera.origin, spec.camera.target)
    rel_idx = relations([o["position"] for o in objects], directions, config.relation_margin)
    rel = {name: [[objects[j]["id"] for j in js] for js in lists] for name, lists in rel_idx.items()}
    expressions = generate_expressions(objects, rel, directions, config.relation_margin, rng,
                                       per_family=config.expressions_per_family)
    label = class_label(config, spec.objects)
    return {
        "width": w, "height": h,
        "objects": objects, "relations": rel, "expressions": expressions,
        "class_label": label, "class_name": None if label is None else class_names(config)[label],
        "camera": camera_record(spec, w, h),
        "lights": [vars(light) for light in spec.lights],
        "ambient": spec.ambient, "floor_albedo": spec.floor_albedo,
    }
