"""The shapes world without rendering: relations, expressions, labels, the fixture, the reader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from genperc.data.world.annotate import mask_box
from genperc.data.world.expressions import FAMILIES, evaluate, generate_expressions
from genperc.data.world.format import WorldSource
from genperc.data.world.relations import ground_directions, relations
from genperc.data.world.scene import (
    CATEGORIES,
    ObjectSpec,
    WorldConfig,
    class_label,
    class_names,
    sample_scene,
)
from genperc.errors import UserError

FIXTURE = Path(__file__).parent / "fixtures" / "world"
FIXTURE_SPLITS = [("multi32", "train"), ("multi32", "val"), ("multi64", "val"),
                  ("single32", "train"), ("single32", "val")]

# Camera on -y looking at the origin: behind = +y, right = +x.
CAM = dict(origin=(0.0, -10.0, 5.0), target=(0.0, 0.0, 0.0))


def _obj(i, x, y, shape="cube", color="red", material="rubber", size="large"):
    return {"id": i, "shape": shape, "color": color, "material": material, "size": size,
            "position": [x, y, 0.35]}


# --------------------------------------------------------------------------- relations


def test_ground_directions_are_camera_relative():
    d = ground_directions(**CAM)
    np.testing.assert_allclose(d["behind"], [0, 1, 0], atol=1e-12)
    np.testing.assert_allclose(d["right"], [1, 0, 0], atol=1e-12)
    np.testing.assert_allclose(d["left"], [-1, 0, 0], atol=1e-12)
    np.testing.assert_allclose(d["front"], [0, -1, 0], atol=1e-12)


def test_relation_margin_rule():
    # A at the origin; B 0.3 to the right (> 0.2 margin); C 0.1 to the right (< margin); D 0.5 behind.
    pos = [(0, 0, 0), (0.3, 0, 0), (0.1, 0, 0), (0, 0.5, 0)]
    rel = relations(pos, ground_directions(**CAM), margin=0.2)
    assert 1 in rel["right"][0] and 0 in rel["left"][1]
    assert 2 not in rel["right"][0] and 0 not in rel["left"][2]  # within the margin: neither
    assert rel["behind"][0] == [3] and 0 in rel["front"][3]
    assert rel["left"][0] == [] and sorted(rel["right"][0]) == [1]
    # Exactly at the margin is not enough (strict inequality, as CLEVR).
    rel = relations([(0, 0, 0), (0.2, 0, 0)], ground_directions(**CAM), margin=0.2)
    assert rel["right"][0] == [] and rel["left"][1] == []


# --------------------------------------------------------------------------- expressions


def _scene(objects):
    d = ground_directions(**CAM)
    idx = relations([o["position"] for o in objects], d, 0.2)
    rel = {k: [[objects[j]["id"] for j in js] for js in v] for k, v in idx.items()}
    return rel, d


def test_expressions_refer_to_exactly_one_object():
    objects = [_obj(1, -2, 0), _obj(2, 0, 0), _obj(3, 2, 0), _obj(4, 0, 2, shape="sphere", color="blue"),
               _obj(5, 1, -1.5, color="green", material="metal", size="small")]
    rel, d = _scene(objects)
    exprs = generate_expressions(objects, rel, d, 0.2, np.random.default_rng(0), per_family=2)
    texts = [e["text"] for e in exprs]
    assert len(texts) == len(set(texts))
    for e in exprs:
        assert e["family"] in FAMILIES
        assert evaluate(e["program"], objects, rel, d, 0.2) == e["object_ids"]
        assert len(e["object_ids"]) == 1
    # the three identical red cubes in a row are only reachable by relation / ordinal
    for oid in (1, 2, 3):
        fams = {e["family"] for e in exprs if e["object_ids"] == [oid]}
        assert "attribute" not in fams and "ordinal" in fams
    assert any("second" in e["text"] for e in exprs if e["object_ids"] == [2])  # the middle cube
    assert "the sphere" in texts  # minimal unique description


def test_ambiguous_ordinal_is_rejected():
    # two identical cubes 0.1 apart along x: "the first cube from the left" is ambiguous
    objects = [_obj(1, 0.0, 0.0), _obj(2, 0.1, 1.0)]
    rel, d = _scene(objects)
    program = {"filter": {"shape": "cube"}, "ordinal": 1, "from": "left"}
    assert sorted(evaluate(program, objects, rel, d, 0.2)) == [1, 2]
    exprs = generate_expressions(objects, rel, d, 0.2, np.random.default_rng(0))
    for e in exprs:
        assert not (e["family"] == "ordinal" and e["program"]["from"] in ("left", "right"))
        assert evaluate(e["program"], objects, rel, d, 0.2) == e["object_ids"]


def test_expressions_are_seeded():
    objects = [_obj(1, -2, 0), _obj(2, 0, 0), _obj(3, 2, 0, color="blue")]
    rel, d = _scene(objects)
    a = generate_expressions(objects, rel, d, 0.2, np.random.default_rng(5))
    b = generate_expressions(objects, rel, d, 0.2, np.random.default_rng(5))
    assert a == b


# --------------------------------------------------------------------------- scenes, labels


def test_sample_scene_is_seeded_and_respects_the_gap():
    cfg = WorldConfig()
    a = sample_scene(cfg, np.random.default_rng(3))
    b = sample_scene(cfg, np.random.default_rng(3))
    assert a.to_dict() == b.to_dict()
    assert cfg.min_objects <= len(a.objects) <= cfg.max_objects
    for i, o in enumerate(a.objects):
        for p in a.objects[i + 1:]:
            gap = np.hypot(o.position[0] - p.position[0], o.position[1] - p.position[1])
            assert gap >= o.radius + p.radius + cfg.min_gap - 1e-3


def test_class_labels():
    cfg = WorldConfig.single_object()
    names = class_names(cfg)
    assert len(names) == 4 * 8 and names[0] == "gray cube"
    obj = ObjectSpec("sphere", "red", "metal", "small", (0, 0, 0.35), 0.0)
    assert names[class_label(cfg, [obj])] == "red sphere"
    shape_only = WorldConfig.single_object(label_scheme="shape")
    assert class_names(shape_only) == ["cube", "sphere", "cylinder", "cone"]
    assert class_label(WorldConfig(label_scheme="shape_color"), [obj, obj]) is None  # multi-object
    assert class_names(WorldConfig()) == []  # 3-8 objects: no scene is labelled by attributes
    assert len(class_names(WorldConfig(min_objects=1, max_objects=3))) == 32
    count = WorldConfig(label_scheme="count", min_objects=3, max_objects=5)
    assert class_names(count) == ["3 objects", "4 objects", "5 objects"]
    assert class_label(count, [obj] * 4) == 1


@pytest.mark.parametrize("bad", [dict(min_objects=5, max_objects=3), dict(shapes=("torus",)),
                                 dict(label_scheme="shape_weight"), dict(resolution=2),
                                 dict(variant="gpu")])
def test_config_errors_are_user_errors(bad):
    with pytest.raises(UserError):
        WorldConfig(**bad)


def test_config_round_trip():
    cfg = WorldConfig.single_object(resolution=32)
    assert WorldConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(UserError, match="unknown world config key"):
        WorldConfig.from_dict({"resolutoin": 3})


# --------------------------------------------------------------------------- the fixture


@pytest.mark.parametrize("name,split", FIXTURE_SPLITS)
def test_fixture_records(name, split):
    src = WorldSource(FIXTURE / name, split=split)
    cfg = WorldConfig.from_dict(src.manifest["config"])
    assert src.categories == CATEGORIES and len(src) == src.manifest["scenes"]
    for i in range(len(src)):
        rec = src[i]
        h = w = cfg.resolution
        assert rec.image.shape == (h, w, 3) and rec.image.dtype == np.uint8
        assert rec.depth.shape == (h, w) and rec.depth.dtype == np.float32
        assert rec.instances.dtype == np.int32 and rec.semantic.dtype == np.int32
        assert rec.depth_valid.all() and (rec.depth > 0).all()  # the floor fills every view
        assert cfg.min_objects <= len(rec.objects) <= cfg.max_objects
        for obj in rec.objects:
            mask = rec.instances == obj.id
            assert mask.sum() == obj.attributes["pixels"] >= cfg.pixel_threshold
            assert tuple(mask_box(mask)) == obj.box  # boxes come from the visible masks
            assert (rec.semantic[mask] == obj.category_id).all()
            assert CATEGORIES[obj.category_id] == obj.category
        assert (rec.semantic[rec.instances == 0] == 0).all()  # the floor is background
        if cfg.max_objects == 1:
            a = rec.objects[0].attributes
            assert src.classes[rec.class_label] == f"{a['color']} {rec.objects[0].category}"


@pytest.mark.parametrize("name,split", FIXTURE_SPLITS)
def test_fixture_expressions_pick_exactly_one_visible_object(name, split):
    src = WorldSource(FIXTURE / name, split=split)
    margin = src.manifest["config"]["relation_margin"]
    families = set()
    for i in range(len(src)):
        rec, ann = src[i], src.annotation(i)
        directions = ground_directions(ann["camera"]["origin"], ann["camera"]["target"])
        assert rec.expressions, "every scene has expressions"
        for e, program in zip(rec.expressions, rec.meta["programs"], strict=True):
            assert len(e.object_ids) == 1
            assert evaluate(program, ann["objects"], ann["relations"], directions, margin) == e.object_ids
            assert rec.object_mask(e.object_ids).any()
            families.add(e.family)
    if name.startswith("multi"):
        assert families == set(FAMILIES)


def test_fixture_depth_is_planar():
    """Floor pixels: planar depth from the stored camera matches the analytic floor intersection."""
    src = WorldSource(FIXTURE / "multi32", split="val")
    rec, ann = src[0], src.annotation(0)
    cam = ann["camera"]
    o, t = np.array(cam["origin"]), np.array(cam["target"])
    f = (t - o) / np.linalg.norm(t - o)
    r = np.cross(f, cam["up"])
    r /= np.linalg.norm(r)
    u = np.cross(r, f)
    k = cam["intrinsics"]
    ys, xs = np.mgrid[0:rec.depth.shape[0], 0:rec.depth.shape[1]] + 0.5
    d = f[None, None] + ((xs - k["cx"]) / k["fx"])[..., None] * r - ((ys - k["cy"]) / k["fy"])[..., None] * u
    s = -o[2] / d[..., 2]  # ray parameter where z = 0 (d is not normalised: s * (d·f) = s)
    planar = s * (d @ f)
    floor = rec.instances == 0
    np.testing.assert_allclose(rec.depth[floor], planar[floor], rtol=1e-4)


# --------------------------------------------------------------------------- validation


@pytest.fixture
def split_copy(tmp_path):
    dst = tmp_path / "world"
    shutil.copytree(FIXTURE / "multi32", dst)
    return dst


def test_missing_file_is_named(split_copy):
    (split_copy / "train" / "images" / "000002.png").unlink()
    src = WorldSource(split_copy, split="train")
    src[1]  # others still load
    with pytest.raises(UserError, match=r"images/000002\.png: missing"):
        src[2]


def test_corrupt_files_are_named(split_copy):
    d = split_copy / "train"
    (d / "depth" / "000003.npy").write_bytes(b"\x93NUMPY garbage")
    png = d / "instances" / "000004.png"
    png.write_bytes(png.read_bytes()[:40])
    src = WorldSource(split_copy, split="train")
    with pytest.raises(UserError, match=r"depth/000003\.npy: corrupt"):
        src[3]
    with pytest.raises(UserError, match=r"instances/000004\.png: corrupt"):
        src[4]
    src = WorldSource(split_copy, split="train", verify=False)  # without hashes: decoding fails
    with pytest.raises(UserError, match=r"depth/000003\.npy: corrupt"):
        src[3]
    with pytest.raises(UserError, match=r"instances/000004\.png: corrupt"):
        src[4]


def test_missing_manifest_and_annotations_are_named(split_copy, tmp_path):
    with pytest.raises(UserError, match="folder not found"):
        WorldSource(tmp_path / "nowhere", split="train")
    (split_copy / "val" / "manifest.json").unlink()
    with pytest.raises(UserError, match=r"val/manifest\.json"):
        WorldSource(split_copy, split="val")
    (split_copy / "train" / "annotations.jsonl").unlink()
    with pytest.raises(UserError, match=r"annotations\.jsonl"):
        WorldSource(split_copy, split="train")


def test_skip_bad_counts(split_copy):
    d = split_copy / "train"
    (d / "images" / "000001.png").unlink()
    (d / "semantic" / "000005.png").write_bytes(b"not a png")
    lines = (d / "annotations.jsonl").read_bytes().splitlines(keepends=True)
    lines[7] = b"{broken json\n"
    (d / "annotations.jsonl").write_bytes(b"".join(lines))
    with pytest.raises(UserError, match="annotations.jsonl: SHA-256 differs from SHA256SUMS"):
        WorldSource(split_copy, split="train", skip_bad=True)  # an edited annotations file is never skipped over
    src = WorldSource(split_copy, split="train", skip_bad=True, verify=False)
    assert src.summary.total == 16 and src.summary.skipped == 3 and len(src) == 13
    assert [i for i, _ in src.summary.bad] == [1, 5, 7]
    assert "3 skipped" in str(src.summary) and "000001.png" in str(src.summary)
    assert [src[k].meta["index"] for k in range(3)] == [0, 2, 3]
    with pytest.raises(UserError, match="line 8"):
        WorldSource(split_copy, split="train", verify=False)[7]


def test_cli_show_and_check(tmp_path, split_copy):
    from PIL import Image
    from typer.testing import CliRunner

    from genperc.data.commands import app

    runner = CliRunner()
    out = tmp_path / "sheet.png"
    res = runner.invoke(app, ["show", str(FIXTURE / "multi64"), "--split", "val", "--index", "2",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    with Image.open(out) as im:
        assert im.size[0] > 600 and im.size[1] > 400
    res = runner.invoke(app, ["check", str(FIXTURE / "single32"), "--split", "val"])
    assert res.exit_code == 0 and "8 scenes, all valid" in res.output
    (split_copy / "val" / "images" / "000000.png").unlink()
    res = runner.invoke(app, ["check", str(split_copy), "--split", "val"])
    assert isinstance(res.exception, UserError) and "000000.png" in str(res.exception)
    res = runner.invoke(app, ["check", str(split_copy), "--split", "val", "--skip-bad"])
    assert res.exit_code == 0 and "1 skipped" in res.output
    res = runner.invoke(app, ["show", str(FIXTURE / "multi64"), "--split", "val", "--index", "99"])
    assert isinstance(res.exception, UserError)


def test_split_statistics_agree_with_the_annotations():
    """`genperc data stats`: the visible pixels per object match the count the renderer stored in
    each object's annotation; depth and cover are within their ranges."""
    import numpy as np

    from genperc.data.world import WorldSource
    from genperc.data.world.show import split_statistics

    source = WorldSource(Path(__file__).parent / "fixtures" / "world" / "multi32", split="val")
    stats = split_statistics(source)
    stored = [o.attributes["pixels"] for i in range(len(source)) for o in source[i].objects]
    assert stats["scenes"] == len(source)
    assert stats["object_pixels_median"] == float(np.median(stored))
    deepest = max(float(source[i].depth.max()) for i in range(len(source)))
    assert 0 < stats["farthest_depth_median_m"] <= stats["farthest_depth_p90_m"] <= deepest
    assert 0 < stats["object_cover_mean"] < 1
    assert split_statistics(source, limit=2)["scenes"] == 2


def test_open_source_opens_the_world_by_name():
    """open_source("world", …) imports the world lazily, which registers the format."""
    from genperc.data.formats import available_formats, open_source
    from genperc.data.world import WorldSource

    source = open_source("world", Path(__file__).parent / "fixtures" / "world" / "multi32", "val")
    assert isinstance(source, WorldSource) and len(source) > 0 and "world" in available_formats()
