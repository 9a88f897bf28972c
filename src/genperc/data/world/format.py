"""The on-disk format of a rendered shapes-world split, its writer helpers and a validating reader.

Layout (``genperc data render --out DIR --split train`` writes ``DIR/train/``)::

    DIR/<split>/manifest.json          format, generator version, config, classes, content hash
    DIR/<split>/annotations.jsonl      one JSON object per scene, in index order
    DIR/<split>/SHA256SUMS             "<sha256>  <path>" per file, in index order (sha256sum -c)
    DIR/<split>/images/000000.png      RGB, 8-bit sRGB, path traced and anti-aliased
    DIR/<split>/depth/000000.npy       float32 [H, W], planar z-depth along the camera axis, metres;
                                       0 = no surface (invalid)
    DIR/<split>/instances/000000.png   8-bit gray: 0 = floor / nothing, k = object with "id" k
    DIR/<split>/semantic/000000.png    8-bit gray: category index (0 = floor, 1 cube, 2 sphere,
                                       3 cylinder, 4 cone), 255 = no surface (ignore)

All label maps are sampled at pixel centres (one ray per pixel); the RGB image is anti-aliased.

Each ``annotations.jsonl`` line has ``index``, ``split``, ``width``, ``height``, ``files`` (paths
relative to the split folder) and ``sha256`` (of each file), ``objects`` (``id``, ``shape``,
``category_id``, ``color``, ``material``, ``size``, ``radius``, ``position`` [x, y, z] of the
bounding-box centre in metres with z up and the floor at z = 0, ``rotation`` (yaw, degrees),
``box`` [x0, y0, x1, y1] in pixels with exclusive right/bottom from the visible mask, ``pixels``
visible), ``relations`` (``relations[name][k]`` = ids that are ``name`` of ``objects[k]``, for
left / right / front / behind, camera-relative, CLEVR margin), ``expressions`` (``id``, ``text``,
``object_ids``, ``family`` in attribute / relation / ordinal, ``program``), ``class_label`` and
``class_name`` (index into the manifest's ``classes``, or null), ``camera`` (origin, target, up,
horizontal ``fov`` in degrees, ``near_clip``, pinhole ``intrinsics`` fx, fy, cx, cy in pixels),
``lights``, ``ambient``, ``floor_albedo``, ``attempts`` (scene samplings until every object was
visible enough).

``manifest.json``: ``format`` ("genperc-world"), ``format_version``, ``generator_version``,
``mitsuba_version``, ``variant``, ``split``, ``seed``, ``scenes``, ``config`` (the full world
config), ``categories``, ``classes``, ``depth`` (encoding and meaning), ``complete`` and
``content_sha256`` = SHA-256 of the ``SHA256SUMS`` file, which lists every file of every scene
and then ``annotations.jsonl``. PNGs are written with fixed settings and JSON with sorted keys, so
the same seed and config give byte-identical splits.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from genperc.data.record import Expression, ObjectAnn, SceneRecord
from genperc.errors import UserError

FORMAT_NAME = "genperc-world"
FORMAT_VERSION = 1
SCENE_FILES = {"image": ("images", ".png"), "depth": ("depth", ".npy"),
               "instances": ("instances", ".png"), "semantic": ("semantic", ".png")}
SEMANTIC_IGNORE = 255
PNG_COMPRESS_LEVEL = 6
_FIX = ("re-run `genperc data render` with the same options (it re-renders missing or damaged "
        "scenes), or pass --skip-bad / skip_bad=True to skip them")


# --------------------------------------------------------------------------- writing


def canonical_json(obj) -> str:
    """JSON with sorted keys and no spaces: the same object always gives the same bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode_png(array: np.ndarray) -> bytes:
    mode = "RGB" if array.ndim == 3 else "L"
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8), mode=mode).save(
        buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    return buf.getvalue()


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def atomic_write(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder and rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def scene_paths(index: int) -> dict[str, str]:
    """Paths of a scene's files relative to the split folder."""
    return {k: f"{folder}/{index:06d}{ext}" for k, (folder, ext) in SCENE_FILES.items()}


def encode_scene(image, depth, instances, semantic) -> dict[str, bytes]:
    sem = np.where(semantic < 0, SEMANTIC_IGNORE, semantic).astype(np.uint8)
    return {"image": encode_png(image), "depth": encode_npy(depth.astype(np.float32)),
            "instances": encode_png(instances.astype(np.uint8)), "semantic": encode_png(sem)}


def write_scene_files(split_dir: Path, index: int, encoded: dict[str, bytes]) -> tuple[dict, dict]:
    """Write a scene's image and label files; returns (relative paths, sha256 per file)."""
    paths = scene_paths(index)
    for key, data in encoded.items():
        atomic_write(split_dir / paths[key], data)
    return paths, {k: sha256(v) for k, v in encoded.items()}


# --------------------------------------------------------------------------- reading


def read_manifest(split_dir: Path) -> dict:
    path = split_dir / "manifest.json"
    if not path.is_file():
        raise UserError(f"world split manifest not found: {path}",
                        "render the split first with `genperc data render --out DIR --split NAME`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})", _FIX) from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise UserError(f"{path}: not a {FORMAT_NAME} manifest", "point at a folder written by `genperc data render`")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{path}: format version {manifest.get('format_version')} is newer than "
                        f"this genperc reads ({FORMAT_VERSION})", "upgrade genperc")
    return manifest


@dataclass
class Summary:
    """What a validating read found: scenes in total, and the bad ones skipped."""

    total: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)  # (index, "path: reason")

    @property
    def skipped(self) -> int:
        return len(self.bad)

    def __str__(self) -> str:
        if not self.bad:
            return f"{self.total} scenes, all valid"
        shown = "; ".join(f"#{i} {why}" for i, why in self.bad[:3])
        more = f"; +{len(self.bad) - 3} more" if len(self.bad) > 3 else ""
        return f"{self.total} scenes, {self.skipped} skipped ({shown}{more})"


class WorldSource:
    """A rendered shapes-world split as a :class:`~genperc.data.record.SceneSource`.

    ``WorldSource(dir, split="train")`` reads ``dir/train/`` (or ``dir`` itself when it holds a
    ``manifest.json``). Files are checked when read: a missing or damaged file raises a
    :class:`UserError` naming it. With ``skip_bad=True`` every scene is checked up front, bad ones
    are left out and counted in ``summary``. ``verify=False`` skips the SHA-256 comparison (files
    are still decoded and their shapes checked).
    """

    def __init__(self, root, split: str = "train", skip_bad: bool = False, verify: bool = True,
                 progress: bool = False):
        root = Path(root)
        self.split_dir = root if (root / "manifest.json").is_file() else root / split
        if not self.split_dir.is_dir():
            raise UserError(f"world split folder not found: {self.split_dir}",
                            "check the path and --split, or render it with `genperc data render`")
        self.manifest = read_manifest(self.split_dir)
        if not self.manifest.get("complete"):
            raise UserError(f"{self.split_dir / 'manifest.json'}: the render of this split did not finish",
                            "re-run the same `genperc data render` command to resume it")
        self.split = self.manifest.get("split", split)
        self.categories: list[str] = list(self.manifest["categories"])
        self.classes: list[str] = list(self.manifest.get("classes", []))
        self.verify = verify
        self._offsets = self._index_lines()
        expected = self.manifest.get("scenes")
        if expected is not None and expected != len(self._offsets):
            raise UserError(f"{self._jsonl}: {len(self._offsets)} scenes, the manifest says {expected}", _FIX)
        self.summary = Summary(total=len(self._offsets))
        self._keep = list(range(len(self._offsets)))
        if skip_bad:
            self._keep = self._scan(progress)

    @property
    def _jsonl(self) -> Path:
        return self.split_dir / "annotations.jsonl"

    def _index_lines(self) -> list[int]:
        if not self._jsonl.is_file():
            raise UserError(f"world annotations not found: {self._jsonl}", _FIX)
        offsets, pos = [], 0
        with open(self._jsonl, "rb") as f:
            for line in f:
                if line.strip():
                    offsets.append(pos)
                pos += len(line)
        return offsets

    def _scan(self, progress: bool) -> list[int]:
        from tqdm import tqdm

        keep = []
        for i in tqdm(range(len(self._offsets)), desc=f"check {self.split}", unit="scene",
                      disable=not progress):
            try:
                self._load(i)
                keep.append(i)
            except UserError as e:
                self.summary.bad.append((i, e.problem))
        return keep

    # ----------------------------------------------------------------- SceneSource

    def __len__(self) -> int:
        return len(self._keep)

    def __getitem__(self, index: int) -> SceneRecord:
        if not -len(self) <= index < len(self):
            raise IndexError(f"scene {index} out of range ({len(self)} scenes)")
        return self._load(self._keep[index])

    def annotation(self, index: int) -> dict:
        """The raw JSON record of the index-th (kept) scene."""
        return self._annotation(self._keep[index])

    # ----------------------------------------------------------------- loading

    def _annotation(self, raw_index: int) -> dict:
        with open(self._jsonl, "rb") as f:
            f.seek(self._offsets[raw_index])
            line = f.readline()
        try:
            ann = json.loads(line)
            if not isinstance(ann, dict) or not isinstance(ann.get("files"), dict):
                raise TypeError("not a JSON object with 'files'")
            missing = [k for k in ("width", "height", "objects", "expressions") if k not in ann]
            missing += [f"files.{k}" for k in SCENE_FILES if k not in ann["files"]]
            if missing:
                raise KeyError(", ".join(missing))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{self._jsonl}: line {raw_index + 1} is not a valid scene record ({e})", _FIX) from e
        return ann

    def _read(self, ann: dict, key: str) -> tuple[Path, bytes]:
        path = self.split_dir / ann["files"][key]
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise UserError(f"{path}: missing", _FIX) from None
        except OSError as e:
            raise UserError(f"{path}: unreadable ({e})", _FIX) from e
        expected = ann.get("sha256", {}).get(key)
        if self.verify and expected and sha256(data) != expected:
            raise UserError(f"{path}: corrupt (SHA-256 differs from annotations.jsonl)", _FIX)
        return path, data

    def _png(self, ann: dict, key: str, mode: str) -> np.ndarray:
        path, data = self._read(ann, key)
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                if im.mode != mode or im.size != (ann["width"], ann["height"]):
                    raise ValueError(f"expected {mode} {ann['width']}x{ann['height']}, got {im.mode} {im.size[0]}x{im.size[1]}")
                return np.asarray(im).copy()
        except (OSError, ValueError, SyntaxError) as e:
            raise UserError(f"{path}: corrupt ({e})", _FIX) from e

    def _npy(self, ann: dict, key: str) -> np.ndarray:
        path, data = self._read(ann, key)
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
            if arr.dtype != np.float32 or arr.shape != (ann["height"], ann["width"]):
                raise ValueError(f"expected float32 {ann['height']}x{ann['width']}, got {arr.dtype} {arr.shape}")
        except (OSError, ValueError, EOFError) as e:
            raise UserError(f"{path}: corrupt ({e})", _FIX) from e
        return arr

    def _load(self, raw_index: int) -> SceneRecord:
        ann = self._annotation(raw_index)
        image = self._png(ann, "image", "RGB")
        depth = self._npy(ann, "depth")
        instances = self._png(ann, "instances", "L").astype(np.int32)
        semantic = self._png(ann, "semantic", "L").astype(np.int32)
        semantic[semantic == SEMANTIC_IGNORE] = -1
        if instances.max(initial=0) > len(ann["objects"]):
            path = self.split_dir / ann["files"]["instances"]
            raise UserError(f"{path}: corrupt (instance id {instances.max()} but "
                            f"{len(ann['objects'])} objects)", _FIX)
        objects = [ObjectAnn(id=o["id"], category=o["shape"], category_id=o["category_id"],
                             box=None if o["box"] is None else tuple(float(v) for v in o["box"]),
                             attributes={k: o[k] for k in ("color", "material", "size", "radius",
                                                           "position", "rotation", "pixels")})
                   for o in ann["objects"]]
        expressions = [Expression(text=e["text"], object_ids=list(e["object_ids"]),
                                  family=e["family"], id=e["id"]) for e in ann["expressions"]]
        files = {k: str(self.split_dir / v) for k, v in ann["files"].items()}
        meta = {"source": "world", "split": self.split, "index": ann["index"], "files": files,
                "relations": ann.get("relations"), "camera": ann.get("camera"),
                "class_name": ann.get("class_name"),
                "programs": [e.get("program") for e in ann["expressions"]]}
        return SceneRecord(image=image, depth=depth, depth_valid=depth > 0, instances=instances,
                           semantic=semantic, objects=objects, expressions=expressions,
                           class_label=ann.get("class_label"), meta=meta)
