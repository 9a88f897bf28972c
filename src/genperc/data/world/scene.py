"""Scene specifications for the shapes world, and how they are sampled.

A :class:`SceneSpec` is everything the renderer needs (objects, camera, lights, floor) as plain
numbers; :func:`sample_scene` draws one from a caller-owned ``np.random.Generator``. The world
follows CLEVR (REFERENCE.md): cube / sphere / cylinder (plus a cone), the 8 CLEVR colours, rubber
and metal, sizes 0.7 and 0.35, objects at x, y ~ U(-3, 3) with a minimum gap, jittered camera and
lights. Coordinates: metres, z up, the floor is the plane z = 0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from genperc.errors import UserError

CATEGORIES = ["background", "cube", "sphere", "cylinder", "cone"]  # semantic ids; 0 = floor
SHAPES = ("cube", "sphere", "cylinder", "cone")
COLORS = {  # CLEVR colours, sRGB 0-255
    "gray": (87, 87, 87),
    "red": (173, 35, 35),
    "blue": (42, 75, 215),
    "green": (29, 105, 20),
    "brown": (129, 74, 25),
    "purple": (129, 38, 192),
    "cyan": (41, 208, 208),
    "yellow": (255, 238, 51),
}
MATERIALS = ("rubber", "metal")
SIZES = {"large": 0.7, "small": 0.35}  # CLEVR's "r": the footprint radius of the object
LABEL_FIELDS = ("size", "color", "material", "shape")  # canonical word order in names
LABEL_SCHEMES_HELP = "'shape', 'color', 'shape_color', any '_'-joined subset of size/color/material/shape, 'count' or 'none'"

# CLEVR's 200 visible pixels at 480x320, as a fraction of the image.
CLEVR_MIN_PIXEL_FRACTION = 200 / (480 * 320)


@dataclass(frozen=True)
class WorldConfig:
    """Everything that decides what a rendered split contains (recorded in its manifest)."""

    resolution: int = 64
    spp: int = 16
    min_objects: int = 3
    max_objects: int = 8
    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = tuple(COLORS)
    materials: tuple[str, ...] = MATERIALS
    sizes: tuple[str, ...] = tuple(SIZES)
    min_pixels: int | None = None  # None: CLEVR's fraction of the image, at least 4 pixels
    min_gap: float = 0.25  # free space between two objects' footprints, metres
    xy_range: float = 3.0  # object centres at x, y ~ U(-xy_range, xy_range)
    camera_distance: tuple[float, float] = (8.5, 10.5)
    camera_elevation: tuple[float, float] = (28.0, 45.0)  # degrees above the floor
    camera_azimuth: tuple[float, float] = (0.0, 360.0)  # degrees
    target_jitter: float = 0.5  # the camera looks at (U(-j, j), U(-j, j), 0)
    fov: float = 50.0  # degrees, horizontal
    light_jitter: float = 1.0  # 0 = fixed key/fill/back lights, 1 = the default jitter
    max_depth: int = 4  # path length of the path tracer
    relation_margin: float = 0.2  # CLEVR's margin for left/right/front/behind
    expressions_per_family: int = 2  # per object and template family
    label_scheme: str = "shape_color"
    max_attempts: int = 200  # scene resamplings before giving up (visibility)
    variant: str = "auto"  # Mitsuba variant; "auto" resolves to cuda_ad_rgb or scalar_rgb

    def __post_init__(self):
        _validate(self)

    @classmethod
    def single_object(cls, **overrides) -> WorldConfig:
        """Single-object scenes for classification / class-conditional generation."""
        base = dict(min_objects=1, max_objects=1, xy_range=0.6, camera_distance=(4.0, 5.0),
                    camera_elevation=(25.0, 40.0), target_jitter=0.2, fov=40.0)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def preset(cls, name: str, **overrides) -> WorldConfig:
        """A named world design of :data:`WORLD_PRESETS`, with ``overrides`` applied."""
        if name not in WORLD_PRESETS:
            raise UserError(f"unknown world preset {name!r}", f"use one of: {', '.join(WORLD_PRESETS)}")
        return cls(**{**WORLD_PRESETS[name], **overrides})

    @property
    def pixel_threshold(self) -> int:
        """Visible pixels every object needs (checked on the instance pass)."""
        if self.min_pixels is not None:
            return self.min_pixels
        return max(4, round(CLEVR_MIN_PIXEL_FRACTION * self.resolution**2))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> WorldConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"unknown world config key(s): {', '.join(unknown)}",
                            f"valid keys: {', '.join(sorted(names))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


#: Named world designs (``WorldConfig.preset(name)``, ``genperc data render --world NAME``).
#: ``clevr``: CLEVR's layout for 64 px and up. ``demo``: the 32 px world of the demo and the ADDP
#: experiments until issue 12 — 3–5 objects, the camera closer than CLEVR's, CLEVR's red left out
#: (the referring target paints the object pure red, and a model trained for minutes confuses red
#: objects with its own target). ``compact`` (issue 12): the demo world seen from closer (5–6.5 m)
#: and more steeply (40–60° above the floor instead of 28–45°), objects within 2 m of the centre,
#: so that a 32 px image shows no floor near the horizon and objects twice as large. Measured on 24
#: scenes: the farthest depth per image has median 9.5 m / 90th percentile 11.3 m (demo: 18.9 / 37.9,
#: with horizon rows at 44–60 m); median object 40 px (demo 23); objects cover 19% of the image
#: (demo 12%).
WORLD_PRESETS: dict[str, dict] = {
    "clevr": {},
    "demo": dict(resolution=32, spp=8, min_objects=3, max_objects=5, camera_distance=(6.5, 8.0),
                 colors=("gray", "blue", "green", "brown", "purple", "cyan", "yellow")),
}
WORLD_PRESETS["compact"] = {**WORLD_PRESETS["demo"], "camera_elevation": (40.0, 60.0), "camera_distance": (5.0, 6.5),
                             "xy_range": 2.0}


def _validate(c: WorldConfig) -> None:
    def bad(key, why, fix):
        raise UserError(f"world config {key}: {why}", fix)

    if not 8 <= c.resolution <= 4096:
        bad("resolution", f"{c.resolution} is out of range", "use 8..4096 pixels")
    if c.spp < 1:
        bad("spp", f"{c.spp} < 1", "use at least 1 sample per pixel")
    if not 1 <= c.min_objects <= c.max_objects <= 254:
        bad("objects", f"min {c.min_objects} / max {c.max_objects} is not a valid range",
            "use 1 <= --min-objects <= --max-objects <= 254")
    for key, values, allowed in (("shapes", c.shapes, SHAPES), ("colors", c.colors, COLORS),
                                 ("materials", c.materials, MATERIALS), ("sizes", c.sizes, SIZES)):
        if not values or any(v not in allowed for v in values) or len(set(values)) != len(values):
            bad(key, f"{list(values)} is not a non-empty subset", f"choose from {list(allowed)}")
    if c.min_pixels is not None and c.min_pixels < 1:
        bad("min_pixels", f"{c.min_pixels} < 1", "use at least 1 pixel")
    if c.max_depth < 2:
        bad("max_depth", f"{c.max_depth} < 2", "use 2 (direct light) or more")
    parse_label_scheme(c.label_scheme, c)  # raises on a bad scheme
    if c.variant not in ("auto", "scalar_rgb", "llvm_ad_rgb", "cuda_ad_rgb"):
        bad("variant", f"{c.variant!r} is not supported", "use auto, scalar_rgb, llvm_ad_rgb or cuda_ad_rgb")


# --------------------------------------------------------------------------- class labels


def parse_label_scheme(scheme: str, config: WorldConfig | None = None) -> tuple[str, ...]:
    """The attribute fields of a label scheme ('' tuple for 'count' / 'none')."""
    if scheme in ("count", "none"):
        return ()
    parts = tuple(scheme.split("_"))
    if not parts or any(p not in LABEL_FIELDS for p in parts) or len(set(parts)) != len(parts):
        raise UserError(f"world config label_scheme: {scheme!r} is not a label scheme",
                        f"use {LABEL_SCHEMES_HELP}")
    return parts


def _field_values(config: WorldConfig, name: str) -> tuple[str, ...]:
    return {"size": config.sizes, "color": config.colors,
            "material": config.materials, "shape": config.shapes}[name]


def class_names(config: WorldConfig) -> list[str]:
    """The class list of a split (index = class label); empty when no scene can carry a label."""
    if config.label_scheme == "none":
        return []
    if config.label_scheme == "count":
        return [f"{n} object{'s' if n > 1 else ''}"
                for n in range(config.min_objects, config.max_objects + 1)]
    if config.min_objects > 1:
        return []  # attribute schemes label single-object scenes only
    parts = parse_label_scheme(config.label_scheme)
    names = [""]
    for p in parts:  # product in scheme order (first field varies slowest)
        names = [f"{n}\0{v}" if n else v for n in names for v in _field_values(config, p)]
    return [_canonical_name(dict(zip(parts, n.split("\0"), strict=True))) for n in names]


def _canonical_name(values: dict) -> str:
    return " ".join(values[f] for f in LABEL_FIELDS if f in values)


def class_label(config: WorldConfig, objects: list[ObjectSpec]) -> int | None:
    """The class of a scene: attribute schemes label single-object scenes only."""
    if config.label_scheme == "none":
        return None
    if config.label_scheme == "count":
        return len(objects) - config.min_objects
    if len(objects) != 1:
        return None
    parts = parse_label_scheme(config.label_scheme)
    name = _canonical_name({p: getattr(objects[0], p) for p in parts})
    return class_names(config).index(name)


# --------------------------------------------------------------------------- specs


@dataclass
class ObjectSpec:
    shape: str
    color: str
    material: str
    size: str
    position: tuple[float, float, float]  # centre of the bounding box, metres
    rotation: float  # yaw about z, degrees

    @property
    def radius(self) -> float:
        return SIZES[self.size]


@dataclass
class CameraSpec:
    origin: tuple[float, float, float]
    target: tuple[float, float, float]
    fov: float  # horizontal, degrees
    up: tuple[float, float, float] = (0.0, 0.0, 1.0)
    near_clip: float = 0.01


@dataclass
class LightSpec:
    """A soft light from a direction: a far emitting sphere (CLEVR's area lights)."""

    azimuth: float  # degrees, world frame (0 = +x, 90 = +y)
    elevation: float  # degrees above the floor
    irradiance: float  # on a surface facing the light, linear RGB units (white)
    spread: float  # angular radius of the light, radians: larger = softer shadows


@dataclass
class SceneSpec:
    objects: list[ObjectSpec]
    camera: CameraSpec
    lights: list[LightSpec] = field(default_factory=list)
    ambient: float = 0.1  # constant sky radiance
    floor_albedo: float = 0.4  # linear reflectance of the gray floor

    def to_dict(self) -> dict:
        return asdict(self)


def object_height(shape: str, radius: float) -> float:
    """Height of an object of footprint radius ``r`` (CLEVR proportions)."""
    if shape == "cube":
        return 2 * radius / math.sqrt(2)  # side r*sqrt(2): its footprint diagonal is 2r
    return 2 * radius  # sphere, cylinder (height 2r), cone (height 2r)


def _r4(x) -> float:
    """Round to 0.1 mm so that the stored numbers are exactly the ones rendered and related."""
    return round(float(x), 4)


def _place_objects(config: WorldConfig, rng: np.random.Generator, n: int) -> list[ObjectSpec] | None:
    objects: list[ObjectSpec] = []
    for _ in range(n):
        shape = str(rng.choice(config.shapes))
        color = str(rng.choice(config.colors))
        material = str(rng.choice(config.materials))
        size = str(rng.choice(config.sizes))
        r = SIZES[size]
        for _try in range(100):
            x, y = (_r4(v) for v in rng.uniform(-config.xy_range, config.xy_range, 2))
            if all(math.hypot(x - o.position[0], y - o.position[1]) >= r + o.radius + config.min_gap
                   for o in objects):
                break
        else:
            return None  # too crowded: the caller resamples the scene
        objects.append(ObjectSpec(shape, color, material, size,
                                  (x, y, _r4(object_height(shape, r) / 2)),
                                  _r4(rng.uniform(0.0, 360.0))))
    return objects


def _spherical(azimuth: float, elevation: float, distance: float) -> np.ndarray:
    a, e = math.radians(azimuth), math.radians(elevation)
    return distance * np.array([math.cos(e) * math.cos(a), math.cos(e) * math.sin(a), math.sin(e)])


def sample_scene(config: WorldConfig, rng: np.random.Generator) -> SceneSpec:
    """Draw one scene (objects, camera, lights). Visibility is checked by the caller."""
    while True:
        n = int(rng.integers(config.min_objects, config.max_objects + 1))
        objects = _place_objects(config, rng, n)
        if objects is not None:
            break
    j = config.target_jitter
    target = np.array([rng.uniform(-j, j), rng.uniform(-j, j), 0.0])
    azimuth = rng.uniform(*config.camera_azimuth)
    elevation = rng.uniform(*config.camera_elevation)
    distance = rng.uniform(*config.camera_distance)
    origin = target + _spherical(azimuth, elevation, distance)
    camera = CameraSpec(tuple(_r4(v) for v in origin), tuple(_r4(v) for v in target), config.fov)
    # Key, fill and back lights relative to the camera's azimuth (CLEVR's three area lights):
    # (azimuth offset, elevation, irradiance, spread), each jittered by up to light_jitter.
    lights = []
    for d_az, elev, irr, spread in ((-45.0, 50.0, 3.2, 0.12), (60.0, 30.0, 0.4, 0.3),
                                    (180.0, 60.0, 0.6, 0.2)):
        jit = config.light_jitter
        lights.append(LightSpec(
            _r4((azimuth + d_az + rng.uniform(-20, 20) * jit) % 360.0),
            _r4(float(np.clip(elev + rng.uniform(-15, 15) * jit, 10.0, 85.0))),
            _r4(irr * rng.uniform(1 - 0.3 * jit, 1 + 0.3 * jit)),
            _r4(spread * rng.uniform(1 - 0.3 * jit, 1 + 0.3 * jit))))
    return SceneSpec(objects, camera, lights, ambient=_r4(rng.uniform(0.065, 0.11)),
                     floor_albedo=_r4(rng.uniform(0.3, 0.45)))
