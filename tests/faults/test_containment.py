"""Hostile annotation files cannot make a loader read outside its data folder (issue 15): absolute
paths, ``..`` and symlinks that lead out are refused with one line naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from genperc.data.formats.common import contained
from genperc.errors import UserError

FIXTURE = Path(__file__).parents[1] / "fixtures" / "world" / "multi32"
HOSTILE = ["/etc/hostname", "../outside.png", "images/../../outside.png", "", None, 7]


def _png(path: Path, size=(8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((*size, 3), np.uint8)).save(path)
    return path


@pytest.mark.parametrize("name", HOSTILE)
def test_contained_refuses(tmp_path, name):
    _png(tmp_path / "outside.png")
    with pytest.raises(UserError):
        contained(tmp_path / "data", name, "image")


def test_contained_follows_links_and_refuses_those_leading_out(tmp_path):
    root = tmp_path / "data"
    _png(root / "a.png")
    _png(tmp_path / "secret.png")
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    assert contained(root, "a.png") == (root / "a.png").resolve()
    with pytest.raises(UserError, match="outside its folder"):
        contained(root, "link.png", "image")
    linked_root = tmp_path / "linked"
    linked_root.symlink_to(root)  # the data folder itself may be a link
    assert contained(linked_root, "a.png") == (root / "a.png").resolve()


@pytest.mark.parametrize("name", ["/etc/hostname", "../outside.png"])
def test_folder_layout(tmp_path, name):
    from genperc.data.formats.folder import FolderSource

    _png(tmp_path / "outside.png")
    _png(tmp_path / "data" / "images" / "ok.png")
    (tmp_path / "data" / "annotations.jsonl").write_text(json.dumps({"image": name}) + "\n")
    with pytest.raises(UserError, match="outside its folder"):
        FolderSource(tmp_path / "data")[0]


def test_class_folder_link_out(tmp_path):
    from genperc.data.formats.folder import ClassFolderSource

    _png(tmp_path / "secret" / "s.png")
    (tmp_path / "data" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "data" / "train" / "cat" / "s.png").symlink_to(tmp_path / "secret" / "s.png")
    with pytest.raises(UserError, match="outside its folder"):
        ClassFolderSource(tmp_path / "data", "train")[0]


def _coco(tmp_path, file_name) -> Path:
    ann = {"images": [{"id": 1, "file_name": file_name, "width": 8, "height": 8}],
           "annotations": [], "categories": [{"id": 1, "name": "cube"}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(ann))
    return path


@pytest.mark.parametrize("name", ["/etc/hostname", "../outside.png"])
def test_coco_file_name(tmp_path, name):
    from genperc.data.formats.coco import CocoSource

    _png(tmp_path / "outside.png")
    (tmp_path / "images").mkdir()
    with pytest.raises(UserError, match="file_name"):
        CocoSource(_coco(tmp_path, name), image_dir=tmp_path / "images")[0]


def test_refcoco_file_name(tmp_path):
    from genperc.data.formats.refcoco import RefCocoSource

    _png(tmp_path / "outside.png")
    data = tmp_path / "refer" / "refcoco"
    data.mkdir(parents=True)
    (data / "instances.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "../../../outside.png", "width": 8, "height": 8}],
        "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2],
                         "segmentation": [[0, 0, 2, 0, 2, 2]]}],
        "categories": [{"id": 1, "name": "cube"}]}))
    (data / "refs(unc).json").write_text(json.dumps([{"ref_id": 1, "ann_id": 5, "image_id": 1, "split": "val",
                                                      "sentences": [{"sent": "the cube"}]}]))
    with pytest.raises(UserError, match="file_name"):
        RefCocoSource(tmp_path / "refer", split="val")[0]


def test_ade20k_link_out(tmp_path):
    from genperc.data.formats.ade20k import ADE20KSource

    root = tmp_path / "ade"
    _png(tmp_path / "secret.png")
    (root / "images" / "validation").mkdir(parents=True)
    (root / "images" / "validation" / "a.png").symlink_to(tmp_path / "secret.png")
    (root / "annotations" / "validation").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "annotations" / "validation" / "a.png")
    with pytest.raises(UserError, match="outside its folder"):
        ADE20KSource(root, "val")[0]


@pytest.mark.parametrize("name", ["/etc/hostname", "../../outside.png", "images/../../../x.png"])
def test_world_files(tmp_path, name):
    """A world record naming a file outside its split is refused, even with verify=False (no hashes)."""
    from genperc.data.world.format import WorldSource

    world = tmp_path / "world"
    shutil.copytree(FIXTURE, world)
    jsonl = world / "train" / "annotations.jsonl"
    lines = jsonl.read_text().splitlines(keepends=True)
    record = json.loads(lines[0])
    record["files"]["image"] = name
    lines[0] = json.dumps(record) + "\n"
    jsonl.write_text("".join(lines))
    with pytest.raises(UserError, match="files.image .* is outside its folder"):
        WorldSource(world, split="train", verify=False)[0]


def test_world_split_name_cannot_leave_the_root(tmp_path):
    from genperc.config import load_config
    from genperc.data.sources import open_scene_source

    cfg = load_config("cpu-tiny", ["data.source=world", f"data.path={FIXTURE}"])
    with pytest.raises(UserError, match="not a split name"):
        open_scene_source(cfg.data, "../../multi32/train")
