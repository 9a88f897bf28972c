"""The correction session (genperc.interactive.session, ADDP §3.3): streamed rounds, Eq. 5 through
the one sampler, batched corrections, history, clicks resolved to unique descriptions."""

import json

import numpy as np
import pytest

from genperc.data.record import ObjectAnn, SceneRecord
from genperc.data.toy import ToyShapes
from genperc.errors import UserError
from genperc.interactive.session import CorrectionSession, decode_mask, encode_mask, unique_description

STEPS = 3  # conftest.TINY_REFERRING's sample.steps


@pytest.fixture()
def run(referring_run):
    return referring_run


@pytest.fixture()
def scene():
    return ToyShapes(size=1, resolution=24, split="test")[0]


def test_predict_streams_every_step_and_records_a_round(run, scene):
    target = scene.object_mask([scene.objects[0].id])
    session = CorrectionSession(run, scene.image, scene=scene, target_mask=target)
    steps = []
    r = session.predict(scene.objects[0].category, callback=steps.append)
    assert [s.index for s in steps] == list(range(STEPS)) and all(s.num_steps == STEPS for s in steps)
    assert steps[0].timestep > steps[-1].timestep
    assert steps[0].x0_image.shape == (16, 16, 3) and steps[0].x0_image.dtype == np.uint8
    assert steps[0].mask.shape == (16, 16) and steps[0].mask.dtype == bool
    assert r.mask.shape == (24, 24) and r.kind == "predict" and session.history == [r]
    inter, union = np.logical_and(r.mask, target).sum(), np.logical_or(r.mask, target).sum()
    assert r.iou == pytest.approx(inter / union if union else 1.0)
    assert r.denoiser_calls == STEPS * 3  # InstructPix2Pix guidance: 3 branches per step
    assert r.weights == {"w_d": 3.0, "w_dminus": 1.0, "w_i": 1.5}


def test_corrections_reuse_the_rounds_expression_and_seed_and_count_their_cost(run, scene):
    """A correction keeps the last round's expression and seed; a real D⁻ moves the sample; the
    cost is counted: K + 3 branches per step for K negatives."""
    session = CorrectionSession(run, scene.image)
    first = session.predict("the circle", seed=4)
    same = session.correct(["the circle"], w_d=3.0, w_dminus=3.0)  # w_D = w_D⁻: guidance by D⁻ alone
    assert same.negatives == ["the circle"] and same.seed == 4 and same.expression == "the circle"
    moved = session.correct("the blue square", w_d=6.0, w_dminus=0.5)
    assert moved.denoiser_calls == STEPS * 4 and moved.weights["w_dminus"] == 0.5
    assert np.abs(moved.generated.astype(int) - first.generated.astype(int)).max() > 0
    several = session.correct("the blue square, the red triangle")
    assert several.negatives == ["the blue square", "the red triangle"] and several.denoiser_calls == STEPS * 5
    assert [r.kind for r in session.history] == ["predict", "correct", "correct", "correct"]


def test_the_negative_of_eq5_equals_instructpix2pix_when_it_is_the_null_text(run, scene, monkeypatch):
    """With D⁻ encoded as the null text, Eq. 5 reduces to InstructPix2Pix (guidance.py): the
    corrected sample equals the prediction up to float noise of the larger batch."""
    session = CorrectionSession(run, scene.image)
    first = session.predict("the circle", seed=1)
    null_text, null_mask = run.text_encoder.null()
    real_encode = run.text_encoder.encode
    monkeypatch.setattr(run.text_encoder, "encode",
                        lambda texts: (null_text.expand(len(texts), -1, -1), null_mask.expand(len(texts), -1))
                        if texts == ["NULL"] else real_encode(texts))
    corrected = session.correct("NULL")
    assert np.abs(corrected.generated.astype(int) - first.generated.astype(int)).max() <= 1
    assert (corrected.mask == first.mask).mean() > 0.99


def test_correct_each_batches_k_members_and_keeps_the_history(run, scene):
    session = CorrectionSession(run, scene.image)
    session.predict("the square", seed=2)
    masks, info = session.correct_each(["the circle", "the triangle", "the red square"])
    assert len(masks) == 3 and all(m.shape == (24, 24) and m.dtype == bool for m in masks)
    assert info["denoiser_calls"] == STEPS * 4 and info["seed"] == 2
    samples, info = session.predict_each(3)
    assert len(samples) == 3 and info["denoiser_calls"] == STEPS * 3
    assert all(m.shape == (24, 24) for m in samples) and len(session.history) == 1


def test_undo_export_and_mask_encoding(run, scene, tmp_path):
    session = CorrectionSession(run, scene.image, target_mask=scene.object_mask([scene.objects[0].id]))
    session.predict("the square")
    session.correct("the circle")
    path = session.export(tmp_path / "history.json")
    data = json.loads(path.read_text())
    assert [r["kind"] for r in data["rounds"]] == ["predict", "correct"]
    assert np.array_equal(decode_mask(data["rounds"][1]["mask"]), session.history[1].mask)
    assert data["rounds"][0]["iou"] == pytest.approx(session.history[0].iou)
    assert session.undo().kind == "correct" and len(session.history) == 1
    assert session.undo().kind == "predict" and session.undo() is None
    rng = np.random.default_rng(0)
    for mask in (rng.random((5, 7)) > 0.5, np.ones((3, 3), bool), np.zeros((2, 4), bool)):
        enc = encode_mask(mask)
        assert np.array_equal(decode_mask(enc), mask) and enc["pixels"] == mask.sum()


def test_a_click_resolves_to_the_objects_shortest_unique_description(run, scene):
    session = CorrectionSession(run, scene.image, scene=scene)
    assert session.describe_click(0, 0) is None or scene.instances[0, 0] != 0
    for obj in scene.objects:
        ys, xs = np.nonzero(scene.instances == obj.id)
        text = session.describe_click(int(xs[0]), int(ys[0]))
        assert text.startswith("the ")
        words = set(text.split()) - {"the", "object"}  # "the gray object": colour alone is unique
        assert [o.id for o in scene.objects if words <= {o.category, o.attributes["colour"]}] == [obj.id]
    with pytest.raises(UserError, match="outside"):
        session.describe_click(99, 0)


def _obj(oid, shape, **attrs):
    return ObjectAnn(id=oid, category=shape, category_id=0, attributes=attrs)


def test_unique_description_minimal_attributes_and_twins():
    inst = np.zeros((4, 8), np.int32)
    inst[:, 0], inst[:, 3], inst[:, 6], inst[:, 7] = 1, 2, 3, 4
    objects = [_obj(1, "cube", color="red", size="large", material="metal"),
               _obj(2, "cube", color="red", size="small", material="metal"),
               _obj(3, "sphere", color="red", size="small", material="rubber"),
               _obj(4, "sphere", color="red", size="small", material="rubber")]
    scene = SceneRecord(image=np.zeros((4, 8, 3), np.uint8), instances=inst, objects=objects)
    assert unique_description(scene, 1) == "the large object"  # size alone: the only large object
    assert unique_description(scene, 2) == "the small cube"  # no single attribute; the shape's pair first
    assert unique_description(scene, 3) == "the first small red rubber sphere from the left"
    assert unique_description(scene, 4) == "the second small red rubber sphere from the left"


def test_session_errors_are_one_line(run, scene, tmp_path):
    session = CorrectionSession(run, scene.image)
    with pytest.raises(UserError, match="predict an expression first"):
        session.correct("the circle")
    session.predict("the circle")
    with pytest.raises(UserError, match="at least one negative"):
        session.correct(" , ")
    with pytest.raises(UserError, match="no instance annotation"):
        session.describe_click(1, 1)
    with pytest.raises(UserError, match="uint8"):
        CorrectionSession(run, scene.image.astype(np.float32))
    with pytest.raises(UserError, match="target_mask"):
        CorrectionSession(run, scene.image, target_mask=np.zeros((3, 3), bool))


def test_predict_cli_corrects_with_several_negatives(run, scene, tmp_path, capsys):
    from PIL import Image

    from genperc.cli import main

    png = tmp_path / "scene.png"
    Image.fromarray(scene.image).save(png)
    args = ["predict", str(run.run_dir), "--image", str(png), "--prompt", "the circle", "--steps", "2"]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert main([*args, "--out", str(tmp_path / "fix"), "--correct", "the square", "--correct", "the red triangle",
                 "--w-d", "4", "--w-dminus", "0.5"]) == 0
    info = json.loads((tmp_path / "fix" / "prediction.json").read_text())
    assert info["correction"] == {"negatives": ["the square", "the red triangle"], "w_d": 4.0, "w_dminus": 0.5,
                                  "w_i": 1.5, "guidance": "ADDP Eq. 5"}
    assert "correction" not in json.loads((tmp_path / "plain" / "prediction.json").read_text())
    plain = np.asarray(Image.open(tmp_path / "plain" / "prediction_generated.png"))
    fixed = np.asarray(Image.open(tmp_path / "fix" / "prediction_generated.png"))
    assert plain.shape == fixed.shape and not np.array_equal(plain, fixed)
