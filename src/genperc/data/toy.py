"""A flat 2-D shapes source generated on the fly: the instant data set for tests and quick runs.

It needs no rendering and no files, so it is what unit tests, benchmarks and the smoke path of
``genperc train`` use. Each scene has 2–4 non-overlapping discs, squares and triangles in the CLEVR
colours on a gray background, with exact instance / semantic masks, boxes, a synthetic depth map
(a tilted floor with objects standing in front of it) and referring expressions that pick out
exactly one object ("the red disc", "the square"). The rendered, physically based world lives in
``genperc.data.world``; this source is its cheap stand-in with the same :class:`SceneRecord` type.

Scenes are a pure function of ``(seed, split, index)``: random access and deterministic.
"""

from __future__ import annotations

import zlib

import numpy as np

from genperc.data.record import Expression, ObjectAnn, SceneRecord
from genperc.data.world.scene import COLORS
from genperc.errors import UserError

SHAPES = ("disc", "square", "triangle")
COLOURS = COLORS  # the CLEVR colours, shared with the rendered world
# "red" objects are excluded from the referring source's palette by default: the referring target
# paints the referred object pure red, and a red object would make the target ambiguous to a viewer.
PALETTE = ("blue", "green", "brown", "purple", "cyan", "yellow", "gray")
SPLITS = ("train", "val", "test")  # each its own random stream


class ToyShapes:
    """Random-access :class:`SceneRecord` source of flat shapes (see module docstring)."""

    categories = ["background", *SHAPES]

    def __init__(
        self,
        size: int = 2048,
        resolution: int = 32,
        split: str = "train",
        seed: int = 0,
        min_objects: int = 2,
        max_objects: int = 4,
    ):
        if split not in SPLITS:
            raise UserError(f"the toy source has no split {split!r}", f"use one of {', '.join(SPLITS)}")
        for key, value, lo in (("size", size, 1), ("resolution", resolution, 4), ("min_objects", min_objects, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise UserError(f"toy source {key}={value!r} must be an integer ≥ {lo}",
                                f"set data.options.{key} (data.resolution for resolution) to {lo} or more")
        if isinstance(max_objects, bool) or not isinstance(max_objects, int) or max_objects < min_objects:
            raise UserError(f"toy source max_objects={max_objects!r} must be an integer ≥ min_objects={min_objects}",
                            "raise data.options.max_objects")
        self.size = size
        self.resolution = resolution
        self.split = split
        self.seed = seed
        self.min_objects = min_objects
        self.max_objects = max_objects

    def __len__(self) -> int:
        return self.size

    def _rng(self, index: int) -> np.random.Generator:
        key = zlib.crc32(self.split.encode())
        return np.random.default_rng(np.random.SeedSequence([self.seed, key, index]))

    def __getitem__(self, index: int) -> SceneRecord:
        if not 0 <= index < self.size:
            raise IndexError(index)
        rng = self._rng(index)
        r = self.resolution
        yy, xx = np.mgrid[0:r, 0:r] + 0.5  # pixel centres
        image = np.full((r, r, 3), 118, dtype=np.float32) + rng.normal(0, 4, (1, 1, 3))
        tilt = rng.uniform(0.5, 1.5)
        depth = (6.0 - tilt * 3.0 * yy / r).astype(np.float32)  # floor: nearer at the bottom
        instances = np.zeros((r, r), np.int32)
        semantic = np.zeros((r, r), np.int32)
        objects: list[ObjectAnn] = []
        n = int(rng.integers(self.min_objects, self.max_objects + 1))
        placed: list[tuple[float, float, float]] = []
        for oid in range(1, n + 1):
            for _ in range(50):
                rad = rng.uniform(0.12, 0.2) * r
                cx, cy = rng.uniform(rad, r - rad, size=2)
                if all(np.hypot(cx - px, cy - py) > rad + pr + 1 for px, py, pr in placed):
                    break
            else:
                break
            placed.append((cx, cy, rad))
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            colour = PALETTE[int(rng.integers(len(PALETTE)))]
            inside = _shape_mask(shape, xx, yy, cx, cy, rad)
            if inside.sum() == 0:
                continue
            image[inside] = np.asarray(COLOURS[colour], np.float32)
            depth[inside] = depth[int(min(cy + rad, r - 1)), int(cx)] - rng.uniform(0.2, 0.6)
            instances[inside] = oid
            semantic[inside] = self.categories.index(shape)
            ys, xs = np.nonzero(inside)
            objects.append(
                ObjectAnn(
                    id=oid,
                    category=shape,
                    category_id=self.categories.index(shape),
                    box=(float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)),
                    attributes={"colour": colour, "pixels": int(inside.sum()), "centre": [float(cx), float(cy)]},
                )
            )
        image = np.clip(image, 0, 255).astype(np.uint8)
        return SceneRecord(
            image=image,
            depth=depth,
            depth_valid=np.ones((r, r), bool),
            instances=instances,
            semantic=semantic,
            objects=objects,
            expressions=_expressions(objects),
            class_label=None,
            meta={"source": "toy", "split": self.split, "index": index, "seed": self.seed},
        )


def _shape_mask(shape, xx, yy, cx, cy, rad):
    if shape == "disc":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= rad**2
    if shape == "square":
        h = rad * 0.85
        return (np.abs(xx - cx) <= h) & (np.abs(yy - cy) <= h)
    # upward triangle inscribed in the circle of radius rad
    top, base = cy - rad, cy + rad * 0.6
    half = (yy - top) / (base - top) * rad
    return (yy >= top) & (yy <= base) & (np.abs(xx - cx) <= half)


def _expressions(objects: list[ObjectAnn]) -> list[Expression]:
    """Shortest attribute description that is unique in the scene: shape, colour, colour+shape."""
    out = []
    for o in objects:
        colour = o.attributes["colour"]
        candidates = [
            (f"the {o.category}", lambda p, o=o: p.category == o.category),
            (f"the {colour} object", lambda p, c=colour: p.attributes["colour"] == c),
            (
                f"the {colour} {o.category}",
                lambda p, o=o, c=colour: p.category == o.category and p.attributes["colour"] == c,
            ),
        ]
        for text, match in candidates:
            if sum(match(p) for p in objects) == 1:
                out.append(Expression(text=text, object_ids=[o.id], family="attribute", id=f"{o.id}:{len(out)}"))
                break
    return out
