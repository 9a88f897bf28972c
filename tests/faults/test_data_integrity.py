"""Every link of a rendered world's hash chain is checked (issue 15): manifest → SHA256SUMS →
annotations.jsonl → scene files. Edited labels are caught by loading and by ``genperc data check``;
a record missing a key is one line naming the file, line and key; a repair never keeps tampered
labels; shrinking --scenes is refused; images over the pixel limit or corrupt are one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from genperc.cli import main
from genperc.data.world.format import WorldSource
from genperc.errors import UserError

FIXTURE = Path(__file__).parents[1] / "fixtures" / "world" / "multi32"


@pytest.fixture
def world(tmp_path) -> Path:
    dst = tmp_path / "world"
    shutil.copytree(FIXTURE, dst)
    return dst


def _edit_record(world: Path, line: int, edit) -> None:
    jsonl = world / "train" / "annotations.jsonl"
    lines = jsonl.read_text().splitlines(keepends=True)
    record = json.loads(lines[line])
    edit(record)
    lines[line] = json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n"
    jsonl.write_text("".join(lines))


def _check(world, capsys, *extra) -> str:
    assert main(["data", "check", str(world), "--split", "train", *extra]) == 2
    err = capsys.readouterr().err
    last = err.rstrip("\n").split("\n")[-1]  # after the progress bar of the scan
    assert last.startswith("error: ") and "Traceback" not in err, err
    return last


def _relabel(r):
    r["objects"][0]["shape"] = "sphere" if r["objects"][0]["shape"] != "sphere" else "cube"


def _reword(r):
    r["expressions"][0]["text"] = "the thing nobody rendered"


@pytest.mark.parametrize("edit", [_relabel, _reword], ids=["label", "expression"])
def test_edited_annotations_are_detected(world, edit, capsys):
    _edit_record(world, 3, edit)
    with pytest.raises(UserError, match="annotations.jsonl: SHA-256 differs from SHA256SUMS"):
        WorldSource(world, split="train")
    assert "labels or expressions edited" in _check(world, capsys)
    assert "labels or expressions edited" in _check(world, capsys, "--skip-bad")  # never skipped over
    WorldSource(world, split="train", verify=False)  # a deliberate edit: verification off


def test_edited_sums_and_manifest_are_detected(world, capsys):
    sums = world / "train" / "SHA256SUMS"
    sums.write_text(sums.read_text().replace("images/000002.png", "images/000002.PNG"))
    assert "content_sha256 in manifest.json" in _check(world, capsys)
    shutil.copy(FIXTURE / "train" / "SHA256SUMS", sums)
    manifest = world / "train" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["content_sha256"] = "0" * 64
    manifest.write_text(json.dumps(m))
    assert "content_sha256 in manifest.json" in _check(world, capsys)


def test_missing_sums_file(world, capsys):
    (world / "train" / "SHA256SUMS").unlink()
    assert "SHA256SUMS: missing" in _check(world, capsys)


def test_edited_file_is_detected(world, capsys):
    (world / "train" / "depth" / "000004.npy").write_bytes(b"\x93NUMPY garbage")
    assert "depth/000004.npy: corrupt" in _check(world, capsys)


@pytest.mark.parametrize("key", ["shape", "category_id", "box"])
def test_object_missing_a_key(world, key, capsys):
    _edit_record(world, 5, lambda r: r["objects"][1].pop(key))
    src = WorldSource(world, split="train", verify=False)
    with pytest.raises(UserError, match=rf"annotations.jsonl: line 6 .*missing key objects\[1\]\.{key}"):
        src[5]
    skipped = WorldSource(world, split="train", skip_bad=True, verify=False)
    assert skipped.summary.skipped == 1 and f"objects[1].{key}" in str(skipped.summary)


def test_missing_sha256_is_not_silently_unverified(world):
    _edit_record(world, 2, lambda r: r["sha256"].pop("image"))
    src = WorldSource(world, split="train", skip_bad=True, verify=False)  # no hashes wanted: loads
    assert src.summary.skipped == 0
    # with verification the chain fails first; a record without sha256 is also a bad record itself
    from genperc.data.world.format import _missing_keys

    record = json.loads((world / "train" / "annotations.jsonl").read_text().splitlines()[2])
    assert _missing_keys(record, hashed=True) == "sha256.image"


def test_skipped_scenes_are_reported(world, capsys):
    from genperc.config import load_config
    from genperc.data.sources import open_scene_source

    (world / "train" / "images" / "000001.png").unlink()
    cfg = load_config("cpu-tiny", ["data.source=world", f"data.path={world}", "data.options.skip_bad=true"])
    source = open_scene_source(cfg.data, "train")
    assert len(source) == 15
    err = capsys.readouterr().err
    assert "1 skipped" in err and "000001.png" in err and "--skip-bad" not in err


def test_damage_message_names_the_real_options(world):
    (world / "train" / "images" / "000001.png").unlink()
    with pytest.raises(UserError) as e:
        WorldSource(world, split="train")[1]
    assert "data.options.skip_bad=true" in str(e.value)


def test_repair_does_not_keep_tampered_labels(world, monkeypatch):
    """A re-render reuses records only when the chain vouches for them; else it renders them again."""
    from genperc.data.world import render_job

    _edit_record(world, 0, _relabel)
    manifest = json.loads((world / "train" / "manifest.json").read_text())
    assert not render_job._trusted_annotations(world / "train", manifest)
    untouched = json.loads((FIXTURE / "train" / "manifest.json").read_text())
    assert render_job._trusted_annotations(FIXTURE / "train", untouched)


def test_shrinking_scenes_is_refused(world):
    from genperc.data.world import render_job

    manifest = json.loads((world / "train" / "manifest.json").read_text())
    with pytest.raises(UserError, match=r"holds 16 scenes; --scenes 8 would drop the annotations of 8"):
        render_job._check_not_shrinking(world / "train", 8, manifest)
    render_job._check_not_shrinking(world / "train", 16, manifest)  # same size or more: fine


def test_pixel_limit_and_corrupt_images(tmp_path, monkeypatch):
    from genperc.data.formats.common import read_image

    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(big)
    monkeypatch.setenv("GENPERC_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(UserError, match=r"big.png is 50x40 = 2,000 pixels, over the limit of 1,000") as e:
        read_image(big)
    assert "GENPERC_MAX_IMAGE_PIXELS" in str(e.value)
    monkeypatch.delenv("GENPERC_MAX_IMAGE_PIXELS")
    assert read_image(big).shape == (40, 50, 3)
    bad = tmp_path / "bad.png"
    bad.write_bytes(big.read_bytes()[:60])
    with pytest.raises(UserError, match="bad.png"):
        read_image(bad)


def test_16bit_colour_is_noted(tmp_path, capsys):
    import struct
    import zlib

    from genperc.data.formats.common import read_image

    arr = np.full((4, 5, 3), 0x1234, np.uint16)
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(4))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path = tmp_path / "deep.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 5, 4, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    assert read_image(path).dtype == np.uint8
    assert "deep.png has 16-bit colour" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["data", "show", str(FIXTURE), "--out", "{file}/x.png"],
                                  ["data", "render", "--out", "{file}", "--scenes", "1"],
                                  ["predict", "no-run", "--image", "x.png", "--out", "{file}"],
                                  ["train", "-o", "{file}/run"]])
def test_output_folder_that_is_a_file(tmp_path, argv, capsys):
    file = tmp_path / "a-file"
    file.write_text("")
    assert main([a.replace("{file}", str(file)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(file) in err, err
