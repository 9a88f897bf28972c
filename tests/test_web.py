"""`genperc serve` (ADDP §3.3, Fig. 1c) at the server: the page's helpers, upload checks, and the
served app driven over HTTP by gradio_client — streamed predict, typed correction, undo, export,
the agent, bad uploads as one line. The real browser is in test_browser.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from genperc.data.toy import ToyShapes
from genperc.errors import UserError
from genperc.interactive import web

STEPS = 4  # conftest.PAGE_STEPS: the served page's sampling steps


@pytest.fixture()
def served(served_page):
    return served_page


# --------------------------------------------------------------------------- helpers


def test_negatives_are_a_comma_separated_list_and_clicks_append():
    assert web.parse_negatives(" the red cube, ,the disc\nthe disc ") == ["the red cube", "the disc"]
    assert web.parse_negatives(None) == []
    assert web.add_negative("the disc", "the square") == "the disc, the square"
    assert web.add_negative("the disc, the square", "the disc") == "the disc, the square"
    assert web.add_negative("", "the disc") == "the disc"


def test_display_enlarges_small_images_and_clicks_map_back():
    image = np.zeros((16, 24, 3), np.uint8)
    k = web.display_factor(image)
    assert k == 20 and web.enlarge(image).shape == (320, 480, 3)
    assert web.display_factor(np.zeros((800, 600, 3), np.uint8)) == 1
    assert web.click_pixel((5 * k + k - 1, 7 * k), image) == (5, 7)
    assert web.click_pixel((10_000, -3), image) == (23, 0)  # clamped to the image
    mask = np.zeros((8, 8), bool)
    mask[0, 0] = True  # model resolution: one cell covers 2x3 image pixels
    shown = web.overlay(image, mask)
    assert shown.shape == (320, 480, 3)
    red = shown[..., 0] > 0
    assert red[: 2 * k, : 3 * k].all() and red.sum() == 2 * k * 3 * k


def test_pictures_are_files_named_by_content_written_once(monkeypatch):
    pictures = web.Pictures()
    a, b = np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 9, np.uint8)
    first = pictures(a)
    assert pictures(a) == first and pictures(b) != first
    assert np.array_equal(np.asarray(Image.open(first)), a)
    monkeypatch.setattr(web.Pictures, "keep", 2)
    pictures(np.ones((4, 4, 3), np.uint8))
    assert len(list(pictures.dir.glob("*.png"))) == 2


def test_large_uploads_are_reduced_for_the_page():
    image = np.zeros((3000, 1500, 3), np.uint8)
    small, notes = web.reduce(image)
    assert small.shape == (1024, 512, 3) and notes == ["reduced from 1500x3000 to 512x1024 for the page"]
    assert web.reduce(small) == (small, [])


def test_scene_target_and_labels():
    scene = ToyShapes(size=1, resolution=16, split="test")[0]
    e = scene.expressions[0]
    assert (web.scene_target(scene, e.text) == scene.object_mask(e.object_ids)).all()
    assert web.scene_target(scene, "no such thing") is None and web.scene_target(None, e.text) is None
    view = SimpleNamespace(index=2, num_steps=4, timestep=249)
    assert web.step_label(view) == "step 3/4, t=249"
    rnd = SimpleNamespace(kind="correct", expression="the disc", negatives=["the square"], iou=0.5, seed=1)
    assert web.describe_round(2, rnd) == "round 2 (correct): “the disc”, D⁻ = “the square”, IoU 0.50, seed 1"


def test_streamed_yields_each_step_then_the_result_and_reraises():
    def call(callback):
        for i in range(3):
            callback(i)
        return "done"

    assert list(web.streamed(call)) == [0, 1, 2, "done"]

    def fails(callback):
        callback(0)
        raise UserError("bad prompt", "type another")

    items = web.streamed(fails)
    assert next(items) == 0
    with pytest.raises(UserError, match="bad prompt"):
        next(items)


def _png(path, array, mode=None):
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def test_read_upload_refuses_what_is_not_an_8_bit_image(tmp_path):
    good = _png(tmp_path / "ok.png", np.full((12, 10, 3), 7, np.uint8))
    image, notes = web.read_upload(good)
    assert image.shape == (12, 10, 3) and notes == []
    (tmp_path / "notes.txt").write_text("not an image")
    cases = {
        tmp_path / "notes.txt": "cannot read notes.txt as an image",
        _png(tmp_path / "depth.png", np.full((12, 12), 40000, np.uint16)): "depth.png is a I;16",
        _png(tmp_path / "wide.png", np.zeros((8, 5000), np.uint8)): "larger than 4096 pixels",
    }
    for path, needle in cases.items():
        with pytest.raises(UserError) as e:
            web.read_upload(path)
        assert needle in str(e.value) and "\n" not in str(e.value)
        assert str(tmp_path) not in str(e.value)  # the server's paths stay on the server
    with pytest.raises(UserError, match="over the 0 MB upload limit"):
        web.read_upload(good, max_bytes=10)


# --------------------------------------------------------------------------- the served page


class Page:
    """gradio_client on the served page, each endpoint's outputs read by their labels."""

    def __init__(self, url):
        from gradio_client import Client

        self.client = Client(url, verbose=False)
        self.api = self.client.view_api(print_info=False, return_format="dict")["named_endpoints"]

    def _named(self, api_name, update) -> dict:
        return dict(zip([r["label"] for r in self.api[api_name]["returns"]], update, strict=True))

    def stream(self, api_name, *args) -> list[dict]:
        """Every update a (generator) endpoint sends, in order."""
        job = self.client.submit(*args, api_name=api_name)
        job.result()
        return [self._named(api_name, u) for u in job.outputs()]

    def call(self, api_name, *args) -> dict:
        return self.stream(api_name, *args)[-1]


def test_page_streams_predict_corrects_undoes_and_exports(served):
    run, url = served
    page = Page(url)
    assert set(page.api) >= {"/load_scene", "/upload", "/predict", "/correct", "/undo", "/export"}
    scene = ToyShapes(size=6, resolution=16, split="test")[0]
    texts = [e.text for e in scene.expressions]
    offered = page.call("/load_scene", 0)["Expressions of this scene"]["choices"]
    assert [c[0] for c in offered] == texts

    updates = page.stream("/predict", texts[0], 0)
    steps = [u["Step"] for u in updates if isinstance(u["Step"], str) and u["Step"]]
    assert steps == [f"step {i}/{STEPS}, t={steps[i - 1].split('t=')[1]}" for i in range(1, STEPS + 1)]
    assert len({s.split("t=")[1] for s in steps}) == STEPS, "one streamed update per denoising step"
    assert all(isinstance(u["Image and mask: click the object the model wrongly chose"], str) for u in updates)
    final = updates[-1]
    assert final["Message"].startswith(f"round 1 (predict): “{texts[0]}”, IoU ")
    assert "denoiser calls" in final["Message"]
    assert len(final["Rounds"]) == 1

    final = page.call("/correct", f"{texts[1]}, {texts[2]}", texts[0], 3.0, 1.5, 1.0, 1)
    negatives = f"D⁻ = “{texts[1]}”, “{texts[2]}”"
    assert final["Message"].startswith(f"round 2 (correct): “{texts[0]}”, {negatives}, IoU ")
    assert [r["caption"].split(":")[0] for r in final["Rounds"]] == ["round 1 (predict)", "round 2 (correct)"]

    undone = page.call("/undo")
    assert undone["Message"] == "undid round 2 (correct)" and len(undone["Rounds"]) == 1
    with open(page.call("/export")["History (JSON)"]) as f:
        history = json.dumps(json.load(f))
    assert texts[0] in history and texts[1] not in history


def test_page_says_what_is_wrong_in_one_line(served, tmp_path):
    from gradio_client import handle_file

    page = Page(served[1])
    no_image = "⚠️ no image yet — pick a held-out scene or upload an image first"
    assert page.call("/predict", "the disc", 0)["Message"] == no_image
    (tmp_path / "notes.txt").write_text("not an image")
    _png(tmp_path / "depth.png", np.full((12, 12), 40000, np.uint16))
    for name, needle in [("notes.txt", "cannot read notes.txt as an image"), ("depth.png", "depth.png is a I;16")]:
        message = page.call("/upload", handle_file(str(tmp_path / name)))["Message"]
        assert message.startswith(f"⚠️ {needle}") and "\n" not in message and "Traceback" not in message
    assert page.call("/load_scene", 99)["Message"] == "⚠️ there is no scene 99 — pick a scene number from 0 to 5"
    page.call("/load_scene", 0)  # this browser session's state: none of the other test's rounds
    assert page.call("/correct", " , ", "the disc", 3.0, 1.0, 1.0, 0)["Message"].startswith("⚠️ no D⁻")
    assert page.call("/undo")["Message"].startswith("⚠️ nothing to undo")


def test_page_uploads_an_image(served, tmp_path):
    page = Page(served[1])
    from gradio_client import handle_file

    path = _png(tmp_path / "photo.png", np.full((20, 30, 4), 90, np.uint8))
    shown = page.call("/upload", handle_file(str(path)))
    assert shown["Message"] == "uploaded photo.png (30x20); image mode RGBA → RGB (alpha channel dropped)"
    assert shown["Expressions of this scene"]["visible"] is False
    updates = page.stream("/predict", "the gray square", 0)
    assert len(updates) == STEPS + 1 and "IoU" not in updates[-1]["Message"]


def test_page_runs_the_agent_and_shows_its_reasoning(served):
    page = Page(served[1])
    scene = ToyShapes(size=6, resolution=16, split="test")[0]
    page.call("/load_scene", 0)
    updates = page.stream("/agent", scene.expressions[0].text, 2, 3.0, 1.0, 1.0, 0)
    steps = [u["Step"] for u in updates if isinstance(u["Step"], str) and u["Step"].startswith("step ")]
    assert len(steps) == 2 * STEPS, "the prediction it builds on, then the k members' batched run"
    final = updates[-1]
    assert final["Message"].startswith(f"round 2 (agent): “{scene.expressions[0].text}”, D⁻ = ")
    reasoning = final["Agent's reasoning"]
    assert all(f"**{part}**" in reasoning for part in ("Caption", "Prompt", "Language model's answer",
                                                       "Confusers (k = 2)", "Vote"))
    shown = final["Agent: the k corrected masks and their vote"]
    assert [m["caption"].split(" = ")[0] for m in shown] == ["D⁻", "D⁻", "the vote"]
    assert [r["caption"].split(":")[0] for r in final["Rounds"]] == ["round 1 (predict)", "round 2 (agent)"]


def test_without_the_agent_its_button_is_hidden(served, monkeypatch):
    import sys

    import genperc.interactive

    monkeypatch.setitem(sys.modules, "genperc.interactive.agent", None)  # as if it were not installed
    monkeypatch.delattr(genperc.interactive, "agent", raising=False)
    agent, why = web.load_agent()
    assert agent is None and why.startswith("the agent is not available")
    page = web.Page(served[0], ToyShapes(size=2, resolution=16, split="test"), agent=None, agent_note=why)
    demo = page.build()
    assert page.agent_btn.visible is False and page.agent_md.value == why
    assert "agent" not in {d.api_name for d in demo.fns.values()}


def test_a_run_the_session_cannot_correct_is_refused_when_the_page_is_built(tmp_path):
    depth = SimpleNamespace(task=SimpleNamespace(name="depth"), run_dir=tmp_path, mode="generative")
    with pytest.raises(UserError, match="correction needs a referring run"):
        web.build_app(depth, source=ToyShapes(size=1, resolution=16))


def test_serve_command(capsys):
    from genperc.cli import main

    assert main(["serve", "--help"]) == 0
    assert "--language-model" in capsys.readouterr().out
    assert main(["serve", "/no/such/run"]) == 2
    assert "/no/such/run" in capsys.readouterr().err
