"""The shapes world with Mitsuba: planar depth, label conventions, determinism, resume (tiny renders)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mitsuba")

from genperc.data.world import render as R  # noqa: E402
from genperc.data.world import render_job  # noqa: E402
from genperc.data.world.format import WorldSource  # noqa: E402
from genperc.data.world.relations import ground_directions  # noqa: E402
from genperc.data.world.render_job import render_split  # noqa: E402
from genperc.data.world.scene import CameraSpec, ObjectSpec, SceneSpec, WorldConfig  # noqa: E402
from genperc.errors import UserError  # noqa: E402

TINY = WorldConfig(resolution=16, spp=2, min_objects=2, max_objects=3, min_pixels=2, variant="scalar_rgb")


@pytest.fixture(scope="module", autouse=True)
def _scalar():
    R.configure("scalar_rgb", threads=1)


def test_planar_depth_conversion_formula():
    # A ray at angle θ from the axis whose hit is at planar depth z: Mitsuba reports t = z/cosθ - near/cosθ.
    cos = R.ray_cosines(5, 5, fov=60.0)
    assert cos[2, 2] == 1.0 and cos[2, 3] == pytest.approx(np.cos(np.arctan(np.tan(np.radians(30)) * 0.4)))
    z, near = 7.5, 0.01
    t = (z / cos - near / cos).astype(np.float32)
    np.testing.assert_allclose(R.planar_depth(t, 60.0, near), z, rtol=1e-6)
    assert R.planar_depth(np.zeros((2, 2), np.float32), 60.0, near).max() == 0.0  # no hit stays 0


def test_floor_seen_from_above_has_constant_planar_depth():
    cam = CameraSpec(origin=(0.0, 0.0, 4.0), target=(0.0, 0.0, 0.0), fov=60.0, up=(0.0, 1.0, 0.0))
    labels = R.render_labels(SceneSpec([], cam), 16)
    assert labels.valid.all() and (labels.instances == 0).all()
    np.testing.assert_allclose(labels.depth, 4.0, rtol=1e-5)  # planar, not ray distance


def test_labels_follow_the_camera_conventions():
    """Instance ids are 1-based in object order; 'right' of the camera is image x; depth is planar."""
    cam = CameraSpec(origin=(0.0, -8.0, 4.0), target=(0.0, 0.0, 0.0), fov=50.0)
    left = ObjectSpec("sphere", "red", "rubber", "large", (-1.5, 0.0, 0.7), 0.0)
    right = ObjectSpec("cube", "blue", "metal", "large", (1.5, 0.0, 0.495), 30.0)
    labels = R.render_labels(SceneSpec([left, right], cam), 32)
    counts = labels.pixel_counts(2)
    assert (counts > 10).all()
    xs = [np.nonzero(labels.instances == k)[1].mean() for k in (1, 2)]
    assert ground_directions(cam.origin, cam.target)["right"] @ np.array([1.0, 0, 0]) > 0
    assert xs[0] < xs[1]  # the object to the camera's right is to the image's right
    # The sphere's nearest planar depth is (centre - camera)·axis - r (sampled at pixel centres: >=).
    o, c = np.array(cam.origin), np.array(left.position)
    axis = -o / np.linalg.norm(o)
    nearest = (c - o) @ axis - left.radius
    assert nearest <= labels.depth[labels.instances == 1].min() < nearest + 0.02


def test_rgb_is_rendered_and_seeded():
    cam = CameraSpec(origin=(0.0, -8.0, 4.0), target=(0.0, 0.0, 0.0), fov=50.0)
    obj = ObjectSpec("cylinder", "yellow", "rubber", "large", (0.0, 0.0, 0.7), 0.0)
    spec = SceneSpec([obj], cam, lights=[])
    from genperc.data.world.scene import LightSpec

    spec.lights = [LightSpec(30.0, 50.0, 3.0, 0.12)]
    a = R.render_rgb(spec, 16, spp=4, seed=1)
    b = R.render_rgb(spec, 16, spp=4, seed=1)
    c = R.render_rgb(spec, 16, spp=4, seed=2)
    assert a.shape == (16, 16, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    centre = a[8, 8].astype(int)
    assert centre[0] > centre[2] and centre[1] > centre[2]  # yellow


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = tmp_path_factory.mktemp("world1")
    manifest = render_split(out, TINY, split="val", scenes=4, seed=7, workers=1, progress=False)
    return out, manifest


def test_split_written_and_readable(rendered):
    out, manifest = rendered
    assert manifest["complete"] and manifest["variant"] == "scalar_rgb"
    assert not (out / "val" / ".parts").exists()
    src = WorldSource(out, split="val")
    assert len(src) == 4 and src[3].image.shape == (16, 16, 3)
    sums = (out / "val" / "SHA256SUMS").read_text().splitlines()
    assert len(sums) == 4 * 4 + 1 and sums[-1].endswith("annotations.jsonl")


def test_same_bytes_whatever_the_workers(rendered, tmp_path):
    out, _ = rendered
    render_split(tmp_path, TINY, split="val", scenes=4, seed=7, workers=2, progress=False)
    assert _files(tmp_path) == _files(out)


def test_resume_rerenders_only_what_is_missing(rendered, tmp_path, monkeypatch):
    out, manifest = rendered
    import shutil

    shutil.copytree(out / "val", tmp_path / "val")
    d = tmp_path / "val"
    (d / "images" / "000001.png").unlink()
    (d / "depth" / "000002.npy").write_bytes(b"damaged")
    (d / "images" / ".000003.png.tmp999").write_bytes(b"left by a killed worker")
    calls = []
    real = render_job.render_scene
    monkeypatch.setattr(render_job, "render_scene", lambda *a: calls.append(a[3]) or real(*a))
    again = render_split(tmp_path, TINY, split="val", scenes=4, seed=7, workers=1, progress=False)
    assert sorted(calls) == [1, 2]
    assert again["content_sha256"] == manifest["content_sha256"]
    assert _files(tmp_path) == _files(out)


def test_interrupted_then_extended(rendered, tmp_path, monkeypatch):
    out, _ = rendered
    # an interrupted run: scenes 0-1 done, crash before the merge
    real = render_job._merge
    monkeypatch.setattr(render_job, "_merge", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        render_split(tmp_path, TINY, split="val", scenes=2, seed=7, workers=1, progress=False)
    assert not json.loads((tmp_path / "val" / "manifest.json").read_text())["complete"]
    with pytest.raises(UserError, match="did not finish"):
        WorldSource(tmp_path, split="val")
    monkeypatch.setattr(render_job, "_merge", real)
    render_split(tmp_path, TINY, split="val", scenes=2, seed=7, workers=1, progress=False)
    render_split(tmp_path, TINY, split="val", scenes=4, seed=7, workers=1, progress=False)  # extend
    assert _files(tmp_path) == _files(out)


def test_incompatible_rerun_is_a_user_error(rendered, tmp_path):
    out, _ = rendered
    import shutil

    shutil.copytree(out / "val", tmp_path / "val")
    with pytest.raises(UserError, match="different seed"):
        render_split(tmp_path, TINY, split="val", scenes=4, seed=8, workers=1, progress=False)
    with pytest.raises(UserError, match="split"):
        render_split(tmp_path, TINY, split="holdout", scenes=4, seed=7, progress=False)


def test_render_command(tmp_path):
    from typer.testing import CliRunner

    from genperc.data.commands import app

    res = CliRunner().invoke(app, ["render", "--out", str(tmp_path), "--scenes", "2", "--resolution", "16",
                                   "--spp", "2", "--workers", "1", "--single-object", "--split", "test",
                                   "--variant", "scalar_rgb", "--no-progress"])
    assert res.exit_code == 0, res.output
    src = WorldSource(tmp_path, split="test")
    assert len(src) == 2 and all(len(src[i].objects) == 1 for i in range(2))
    assert src[0].class_label is not None and len(src.classes) == 32
    res = CliRunner().invoke(app, ["render", "--out", str(tmp_path), "--min-objects", "5",
                                   "--max-objects", "2"])
    assert isinstance(res.exception, UserError)
