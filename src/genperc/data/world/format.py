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

from genperc.data.formats.common import contained
from genperc.data.record import Expression, ObjectAnn, SceneRecord
from genperc.errors import UserError

FORMAT_NAME = "genperc-world"
FORMAT_VERSION = 1
SCENE_FILES = {"image": ("images", ".png"), "depth": ("depth", ".npy"),
               "instances": ("instances", ".png"), "semantic": ("semantic", ".png")}
SEMANTIC_IGNORE = 255
PNG_COMPRESS_LEVEL = 6
_FIX = ("re-run `genperc data render` with the same options (it re-renders missing or damaged "
        "scenes), or skip damaged scenes: data.options.skip_bad=true (train, eval), --skip-bad (data show, check)")
_CHAIN_FIX = ("re-run `genperc data render` with the same options to repair the split, or, for a split "
              "edited on purpose, data.options.verify=false (nothing is then checked against the hashes)")
#: keys every object and expression record has (``_load`` reads them all)
OBJECT_KEYS = ("id", "shape", "category_id", "box", "color", "material", "size", "radius", "position",
               "rotation", "pixels")
EXPRESSION_KEYS = ("id", "text", "object_ids", "family")


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


def _missing_keys(ann, hashed: bool) -> str | None:
    """The first key a scene record lacks (dotted, e.g. ``objects[2].shape``), or None."""
    if not isinstance(ann, dict):
        return "(not a JSON object)"
    for k in ("width", "height", "files", "objects", "expressions") + (("sha256",) if hashed else ()):
        if k not in ann:
            return k
    for section in ("files",) + (("sha256",) if hashed else ()):
        if not isinstance(ann[section], dict):
            return f"{section} (not an object)"
        for k in SCENE_FILES:
            if k not in ann[section]:
                return f"{section}.{k}"
    for section, keys in (("objects", OBJECT_KEYS), ("expressions", EXPRESSION_KEYS)):
        if not isinstance(ann[section], list):
            return f"{section} (not a list)"
        for n, item in enumerate(ann[section]):
            if not isinstance(item, dict):
                return f"{section}[{n}] (not an object)"
            for k in keys:
                if k not in item:
                    return f"{section}[{n}].{k}"
    return None


def read_sums(split_dir: Path) -> dict[str, str]:
    """``SHA256SUMS`` as {relative path: sha256}; a one-line error when missing or malformed."""
    path = split_dir / "SHA256SUMS"
    if not path.is_file():
        raise UserError(f"{path}: missing", _CHAIN_FIX)
    sums = {}
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise UserError(f"{path}: line {n} is not '<sha256>  <path>'", _CHAIN_FIX)
        sums[name] = digest
    return sums


def verify_chain(split_dir: Path, manifest: dict, jsonl_sha: str) -> dict[str, str]:
    """The hash chain of a split, top down: the manifest's ``content_sha256`` is the SHA-256 of
    ``SHA256SUMS``, whose last line is the SHA-256 of ``annotations.jsonl``, whose records hold the
    SHA-256 of every scene file (checked when a scene is read). An edited label, expression, sum or
    file breaks a link: a one-line :class:`UserError` naming it. Returns the sums."""
    sums_path = split_dir / "SHA256SUMS"
    sums = read_sums(split_dir)
    if sha256(sums_path.read_bytes()) != manifest.get("content_sha256"):
        raise UserError(f"{sums_path}: SHA-256 differs from content_sha256 in manifest.json (edited?)", _CHAIN_FIX)
    if sums.get("annotations.jsonl") != jsonl_sha:
        raise UserError(f"{split_dir / 'annotations.jsonl'}: SHA-256 differs from SHA256SUMS "
                        "(labels or expressions edited?)", _CHAIN_FIX)
    return sums


def check_sums(source: WorldSource) -> None:
    """Every line of ``SHA256SUMS`` agrees with the records of ``annotations.jsonl`` (same files, same
    hashes) — the last link of the chain that :func:`verify_chain` does not walk file by file."""
    sums = read_sums(source.split_dir)
    sums.pop("annotations.jsonl", None)
    listed = {}
    for i in range(len(source._offsets)):
        try:
            ann = source._annotation(i)
        except UserError:
            continue  # reported by the scan
        listed.update({ann["files"][k]: ann["sha256"][k] for k in SCENE_FILES})
    wrong = sorted(p for p in set(sums) | set(listed) if sums.get(p) != listed.get(p))
    if wrong:
        raise UserError(f"{source.split_dir / 'SHA256SUMS'}: {len(wrong)} entries disagree with annotations.jsonl, "
                        f"first {wrong[0]}", _CHAIN_FIX)


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
        self._offsets, jsonl_sha = self._index_lines()
        if verify:
            verify_chain(self.split_dir, self.manifest, jsonl_sha)
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

    def _index_lines(self) -> tuple[list[int], str]:
        """Offsets of the non-blank lines of annotations.jsonl, and the file's SHA-256."""
        if not self._jsonl.is_file():
            raise UserError(f"world annotations not found: {self._jsonl}", _FIX)
        offsets, pos, digest = [], 0, hashlib.sha256()
        with open(self._jsonl, "rb") as f:
            for line in f:
                digest.update(line)
                if line.strip():
                    offsets.append(pos)
                pos += len(line)
        return offsets, digest.hexdigest()

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
        where = f"{self._jsonl}: line {raw_index + 1}"
        try:
            ann = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{where} is not a valid scene record ({e})", _FIX) from None
        missing = _missing_keys(ann, self.verify)
        if missing:
            raise UserError(f"{where} is not a valid scene record (missing key {missing})", _FIX)
        return ann

    def _read(self, ann: dict, key: str) -> tuple[Path, bytes]:
        path = contained(self.split_dir, ann["files"][key], f"{self._jsonl.name} scene {ann.get('index')} files.{key}")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise UserError(f"{path}: missing", _FIX) from None
        except OSError as e:
            raise UserError(f"{path}: unreadable ({e})", _FIX) from e
        if self.verify and sha256(data) != ann["sha256"][key]:  # present: _missing_keys checked it
            raise UserError(f"{path}: corrupt (SHA-256 differs from annotations.jsonl)", _FIX)
        return path, data

    def _png(self, ann: dict, key: str, mode: str) -> np.ndarray:
        from genperc.images import open_image

        path, data = self._read(ann, key)
        try:
            im = open_image(data, "scene file", name=path)
        except UserError as e:  # over the pixel limit, or not decodable
            raise UserError(e.problem if "limit" in e.problem else f"{path}: corrupt (not a readable PNG)", _FIX) from None
        with im:
            if im.mode != mode or im.size != (ann["width"], ann["height"]):
                raise UserError(f"{path}: corrupt (expected {mode} {ann['width']}x{ann['height']}, got {im.mode} "
                                f"{im.size[0]}x{im.size[1]})", _FIX)
            return np.asarray(im).copy()

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
        files = {k: str(self.split_dir / ann["files"][k]) for k in SCENE_FILES}
        meta = {"source": "world", "split": self.split, "index": ann["index"], "files": files,
                "relations": ann.get("relations"), "camera": ann.get("camera"),
                "class_name": ann.get("class_name"),
                "programs": [e.get("program") for e in ann["expressions"]]}
        return SceneRecord(image=image, depth=depth, depth_valid=depth > 0, instances=instances,
                           semantic=semantic, objects=objects, expressions=expressions,
                           class_label=ann.get("class_label"), meta=meta)
