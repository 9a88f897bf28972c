"""The render job: N scenes of one split, deterministic, resumable, streamed, multi-worker.

* Deterministic: scene i is a pure function of (config, seed, split, i) — its generators come from
  ``np.random.SeedSequence([seed, crc32(split), i])`` — and every worker renders with one Mitsuba
  thread, so the files are byte-identical whatever ``workers`` is.
* Resumable: each scene's files are written via temp + rename, then its annotation line to
  ``.parts/<index>.json`` as the last step. A re-run skips scenes whose part file exists and whose
  files match their recorded SHA-256, and renders the rest (missing or damaged ones included).
* Streamed: workers write their own files; the parent only counts. At the end the parts are merged
  in index order into ``annotations.jsonl`` and ``SHA256SUMS``, the manifest is completed and
  ``.parts/`` removed. Memory does not grow with N.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from genperc import __version__
from genperc.atomic import ensure_writable_dir
from genperc.data.formats.common import contained
from genperc.data.world import render as renderer
from genperc.data.world.annotate import annotate, semantic_map
from genperc.data.world.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    SCENE_FILES,
    atomic_write,
    canonical_json,
    encode_scene,
    sha256,
    write_scene_files,
)
from genperc.data.world.scene import CATEGORIES, WorldConfig, class_names, sample_scene
from genperc.errors import UserError

WORLD_GENERATOR_VERSION = 1  # bump when a change alters what a (config, seed) renders
SPLITS = ("train", "val", "test")


def generator_version() -> str:
    return f"genperc-{__version__}/world-{WORLD_GENERATOR_VERSION}"


def scene_seeds(seed: int, split: str, index: int) -> tuple[np.random.Generator, int, np.random.Generator]:
    """(scene sampling generator, Mitsuba render seed, expression generator) of one scene."""
    root = np.random.SeedSequence([int(seed), zlib.crc32(split.encode("utf-8")), int(index)])
    scene_ss, render_ss, expr_ss = root.spawn(3)
    return (np.random.default_rng(scene_ss), int(render_ss.generate_state(1)[0]),
            np.random.default_rng(expr_ss))


@dataclass
class RenderedScene:
    image: np.ndarray  # uint8 [H, W, 3]
    depth: np.ndarray  # float32 [H, W]
    instances: np.ndarray  # int32 [H, W]
    semantic: np.ndarray  # int32 [H, W], -1 = no surface
    annotation: dict


def render_scene(config: WorldConfig, seed: int, split: str, index: int) -> RenderedScene:
    """Sample, check visibility (resampling deterministically), render and annotate one scene.

    Uses the process's configured Mitsuba variant (:func:`renderer.configure`).
    """
    rng, render_seed, expr_rng = scene_seeds(seed, split, index)
    res = config.resolution
    attempt = 0
    while True:
        attempt += 1
        spec = sample_scene(config, rng)
        labels = renderer.render_labels(spec, res)
        if (labels.pixel_counts(len(spec.objects)) >= config.pixel_threshold).all():
            break
        if attempt == config.max_attempts:
            raise UserError(f"scene {index}: no sample in {config.max_attempts} had every object "
                            f"visible on >= {config.pixel_threshold} pixels at {res}x{res}",
                            "lower --min-pixels or --max-objects, or raise --resolution")
    image = renderer.render_rgb(spec, res, config.spp, render_seed, config.max_depth)
    annotation = annotate(spec, labels, config, expr_rng)
    annotation.update(index=index, split=split, attempts=attempt)
    return RenderedScene(image, labels.depth, labels.instances,
                         semantic_map(labels.instances, labels.valid, spec), annotation)


# --------------------------------------------------------------------------- one scene on disk


def _part_path(split_dir: Path, index: int) -> Path:
    return split_dir / ".parts" / f"{index:06d}.json"


def _render_and_write(config: WorldConfig, seed: int, split: str, split_dir: Path, index: int) -> int:
    scene = render_scene(config, seed, split, index)
    encoded = encode_scene(scene.image, scene.depth, scene.instances, scene.semantic)
    files, hashes = write_scene_files(split_dir, index, encoded)
    record = dict(scene.annotation, files=files, sha256=hashes)
    atomic_write(_part_path(split_dir, index), (canonical_json(record) + "\n").encode("utf-8"))
    return index


def _scene_complete(split_dir: Path, index: int) -> bool:
    """The part file exists, parses, and every file it names matches its recorded hash."""
    part = _part_path(split_dir, index)
    try:
        record = json.loads(part.read_bytes())
        return all(sha256(contained(split_dir, record["files"][key]).read_bytes()) == record["sha256"][key]
                   for key in SCENE_FILES) and set(record["files"]) == set(SCENE_FILES)
    except (OSError, ValueError, KeyError, TypeError, UserError):
        return False


# --------------------------------------------------------------------------- workers

_worker: dict = {}


def _init_worker(config_dict: dict, seed: int, split: str, split_dir: str) -> None:
    config = WorldConfig.from_dict(config_dict)
    renderer.configure(config.variant, threads=1)
    _worker.update(config=config, seed=seed, split=split, split_dir=Path(split_dir))


def _work(index: int) -> int:
    w = _worker
    return _render_and_write(w["config"], w["seed"], w["split"], w["split_dir"], index)


# --------------------------------------------------------------------------- the job


def _manifest(config: WorldConfig, split: str, seed: int, scenes: int) -> dict:
    import mitsuba

    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
        "generator_version": generator_version(), "mitsuba_version": mitsuba.__version__,
        "variant": config.variant, "split": split, "seed": seed, "scenes": scenes,
        "config": config.to_dict(), "categories": list(CATEGORIES), "classes": class_names(config),
        "label_scheme": config.label_scheme,
        "depth": {"file": "float32 .npy", "units": "metres",
                  "meaning": "planar z-depth along the camera axis", "invalid": 0.0},
        "semantic_ignore": 255,
        "complete": False, "content_sha256": None,
    }


def _check_compatible(path: Path, new: dict) -> None:
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # a damaged manifest is rewritten
    keys = ("format_version", "generator_version", "mitsuba_version", "variant", "seed", "config")
    diff = [k for k in keys if old.get(k) != new.get(k)]
    if diff:
        raise UserError(f"{path.parent} was rendered with a different {', '.join(diff)}",
                        "render into another --out folder, or delete that split folder first")


def _read_old_manifest(path: Path) -> dict:
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        return old if isinstance(old, dict) else {}
    except (OSError, ValueError):
        return {}


def _check_not_shrinking(split_dir: Path, scenes: int, old: dict) -> None:
    """Fewer --scenes than the split already holds would drop annotated scenes: refused."""
    held = old.get("scenes") if isinstance(old.get("scenes"), int) else 0
    parts = split_dir / ".parts"
    if parts.is_dir():
        held = max([held] + [int(p.stem) + 1 for p in parts.glob("*.json") if p.stem.isdigit()])
    if held > scenes:
        raise UserError(f"{split_dir} holds {held} scenes; --scenes {scenes} would drop the annotations of "
                        f"{held - scenes}", f"pass --scenes {held} (or more), render into another --out, "
                        "or delete that split folder first")


def _trusted_annotations(split_dir: Path, old: dict) -> bool:
    """Whether the finished split's annotations.jsonl still hashes to what its SHA256SUMS and the
    old manifest's content_sha256 say: only then are its records reused (never tampered labels)."""
    from genperc.data.world.format import verify_chain

    jsonl = split_dir / "annotations.jsonl"
    if not old.get("complete") or not jsonl.is_file():
        return False
    try:
        verify_chain(split_dir, old, sha256(jsonl.read_bytes()))
        return True
    except UserError:
        return False


def _absorb_old_annotations(split_dir: Path, scenes: int, old: dict) -> None:
    """A finished split being extended or repaired: its lines become part files again, when the
    hash chain vouches for them (else those scenes are rendered again, to the same bytes)."""
    jsonl = split_dir / "annotations.jsonl"
    if not _trusted_annotations(split_dir, old):
        return
    with open(jsonl, "rb") as f:
        for line in f:
            try:
                index = int(json.loads(line)["index"])
            except (ValueError, KeyError, TypeError):
                continue
            part = _part_path(split_dir, index)
            if index < scenes and not part.exists():
                atomic_write(part, line if line.endswith(b"\n") else line + b"\n")


def _remove_stale_temporaries(split_dir: Path) -> None:
    """Temp files of an interrupted run (``atomic_write`` names them ``.<name>.tmp<pid>``)."""
    folders = [split_dir, split_dir / ".parts"] + [split_dir / f for f, _ in SCENE_FILES.values()]
    for folder in folders:
        if folder.is_dir():
            for entry in os.scandir(folder):
                if entry.name.startswith(".") and ".tmp" in entry.name and entry.is_file():
                    os.remove(entry.path)


def _merge(split_dir: Path, scenes: int) -> str:
    """Parts → annotations.jsonl and SHA256SUMS, in index order; returns the content hash."""
    tmp_jsonl = split_dir / ".annotations.jsonl.tmp"
    tmp_sums = split_dir / ".SHA256SUMS.tmp"
    jsonl_hash = hashlib.sha256()
    with open(tmp_jsonl, "wb") as out, open(tmp_sums, "wb") as sums:
        for i in range(scenes):
            line = _part_path(split_dir, i).read_bytes()
            record = json.loads(line)
            for key in sorted(record["files"]):
                sums.write(f"{record['sha256'][key]}  {record['files'][key]}\n".encode())
            out.write(line)
            jsonl_hash.update(line)
        sums.write(f"{jsonl_hash.hexdigest()}  annotations.jsonl\n".encode())
    os.replace(tmp_jsonl, split_dir / "annotations.jsonl")
    os.replace(tmp_sums, split_dir / "SHA256SUMS")
    return sha256((split_dir / "SHA256SUMS").read_bytes())


def render_split(out, config: WorldConfig, *, split: str = "train", scenes: int, seed: int = 0,
                 workers: int = 1, progress: bool = True) -> dict:
    """Render (or resume) ``scenes`` scenes into ``out/split``; returns the final manifest."""
    from tqdm import tqdm

    if split not in SPLITS:
        raise UserError(f"--split {split!r} is not a split", f"use one of {', '.join(SPLITS)}")
    if scenes < 1:
        raise UserError(f"--scenes {scenes} < 1", "render at least one scene")
    if workers < 1:
        raise UserError(f"--workers {workers} < 1", "use 1 or more worker processes")
    split_dir = Path(out) / split
    ensure_writable_dir(split_dir, "render output folder")  # before the renderer starts
    variant = renderer.configure(config.variant, threads=None)  # resolve "auto" here
    config = WorldConfig.from_dict(dict(config.to_dict(), variant=variant))
    manifest = _manifest(config, split, seed, scenes)
    manifest_path = split_dir / "manifest.json"
    _check_compatible(manifest_path, manifest)
    old_manifest = _read_old_manifest(manifest_path)
    _check_not_shrinking(split_dir, scenes, old_manifest)
    atomic_write(manifest_path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())

    _remove_stale_temporaries(split_dir)
    _absorb_old_annotations(split_dir, scenes, old_manifest)
    todo = [i for i in range(scenes) if not _scene_complete(split_dir, i)]
    bar = tqdm(total=scenes, initial=scenes - len(todo), desc=f"render {split}", unit="scene",
               disable=not progress)
    try:
        if workers == 1 or len(todo) <= 1:
            import drjit as dr

            threads = dr.thread_count()
            renderer.configure(variant, threads=1)
            try:
                for i in todo:
                    _render_and_write(config, seed, split, split_dir, i)
                    bar.update(1)
            finally:
                dr.set_thread_count(threads)
        else:
            ctx = mp.get_context("spawn")  # Dr.Jit / Mitsuba state must not be forked
            with ctx.Pool(min(workers, len(todo)), initializer=_init_worker,
                          initargs=(config.to_dict(), seed, split, str(split_dir))) as pool:
                for _ in pool.imap_unordered(_work, todo, chunksize=1):
                    bar.update(1)
    finally:
        bar.close()

    manifest["content_sha256"] = _merge(split_dir, scenes)
    manifest["complete"] = True
    atomic_write(manifest_path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    shutil.rmtree(split_dir / ".parts", ignore_errors=True)
    return manifest


def render_world(root, config: WorldConfig, scenes: dict[str, int], *, seed: int = 0, workers: int = 1,
                 log=None) -> Path:
    """Render (or resume) several splits of one world, ``scenes = {split: count}``, into
    ``root/<split>``; a split whose manifest says complete is not touched (no renderer start)."""
    root = Path(root)
    for split, n in scenes.items():
        manifest = root / split / "manifest.json"
        if manifest.is_file() and json.loads(manifest.read_text()).get("complete"):
            continue
        if log is not None:
            log(f"rendering {n} {split} scenes at {config.resolution}px into {root}")
        render_split(root, config, split=split, scenes=n, seed=seed, workers=workers, progress=False)
    return root
