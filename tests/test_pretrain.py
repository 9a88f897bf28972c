"""The world generator (issue 12): scene captions, the caption task, `genperc pretrain`, and
fine-tuning a perception preset from the exported UNet as from Stable Diffusion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from genperc.data.record import ObjectAnn, SceneRecord
from genperc.data.world import WorldSource
from genperc.errors import UserError
from genperc.tasks import create_task
from genperc.tasks.caption import colour_histogram, scene_caption

FIXTURE = Path(__file__).parent / "fixtures" / "world" / "multi32"


def _record(objects):
    return SceneRecord(image=torch.zeros(8, 8, 3, dtype=torch.uint8).numpy(), objects=objects)


def test_caption_lists_objects_left_to_right_with_their_attributes():
    right = ObjectAnn(id=1, category="cube", category_id=1, box=(20, 0, 30, 10),
                      attributes={"size": "large", "color": "gray", "material": "rubber"})
    left = ObjectAnn(id=2, category="sphere", category_id=2, box=(0, 0, 6, 6),
                     attributes={"size": "small", "color": "blue", "material": "metal"})
    middle = ObjectAnn(id=3, category="cone", category_id=4, box=(10, 0, 14, 4), attributes={"colour": "yellow"})
    assert scene_caption(_record([right, left, middle])) == (
        "from left to right: a small blue metal sphere, a yellow cone and a large gray rubber cube")
    assert scene_caption(_record([ObjectAnn(id=1, category="orb", category_id=1)])) == "an orb"
    assert scene_caption(_record([])) == "an empty floor"


def test_world_captions_name_every_object():
    source = WorldSource(FIXTURE, split="val")
    items = create_task("caption").dataset(source, 32)
    for i in range(min(len(items), 4)):
        record = source[i]
        text = items[i]["text"]
        for obj in record.objects:
            assert f"{obj.attributes['color']} {obj.attributes['material']} {obj.category}" in text


def test_colour_overlap_is_one_for_the_same_colours_and_zero_for_disjoint_ones():
    task = create_task("caption")
    a = torch.full((1, 3, 4, 4), -0.9)
    b = torch.full((1, 3, 4, 4), 0.9)
    shuffled = a.clone()
    shuffled[..., :2, :] = b[..., :2, :]
    same_mix = torch.flip(shuffled, dims=(-1, -2))
    assert task.metrics(same_mix, {"image": shuffled})["colour_overlap"].item() == pytest.approx(1.0)
    assert task.metrics(b, {"image": a})["colour_overlap"].item() == pytest.approx(0.0)
    assert task.metrics(b, {"image": shuffled})["colour_overlap"].item() == pytest.approx(0.5)
    assert colour_histogram(a).sum().item() == pytest.approx(1.0)


def test_caption_requests_need_one_caption_per_image():
    task = create_task("caption")
    with pytest.raises(UserError, match="caption"):
        task.request(torch.zeros(2, 3, 8, 8), ["a cube"])
    with pytest.raises(UserError, match="caption"):
        task.request(torch.zeros(1, 3, 8, 8), None)


TINY = ["train.steps=3", "train.batch_size=2", "train.checkpoint_every=3", "train.log_every=1",
        "train.progress=false", "sample.steps=2", "train.mixed_precision=no"]


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    from genperc.pretrain import pretrain

    out = tmp_path_factory.mktemp("pretrain")
    record = pretrain(out, world_path=FIXTURE, overrides=TINY, eval_limit=2)
    return out, record


def test_pretrain_exports_a_diffusers_unet_with_its_hash(generator):
    from genperc.inference import load_run
    from genperc.models.text import sha256_file

    out, record = generator
    weights = out / "generator" / "unet" / "diffusion_pytorch_model.safetensors"
    assert record["unet_sha256"] == sha256_file(weights)
    assert json.loads((out / "generator" / "generator.json").read_text())["unet_sha256"] == record["unet_sha256"]
    assert 0.0 <= record["val_colour_overlap"] <= 1.0
    # the exported tensors are the run's EMA UNet, unchanged
    run = load_run(out / "run", weights="ema")
    exported = load_file(str(weights))
    own = {k.removeprefix("backbone."): v for k, v in run.model.state_dict().items()}
    assert exported.keys() == own.keys()
    assert all(torch.equal(exported[k], own[k]) for k in exported)


def test_a_referring_preset_fine_tunes_from_the_generator(generator, tmp_path):
    """model.pretrained=OUT/generator: conv_in widened by zeros for the image (InstructPix2Pix), every
    other weight the generator's, so before training the model ignores the image condition."""
    from genperc import build
    from genperc.config import load_config
    from genperc.training.trainer import Trainer

    out, _ = generator
    cfg = load_config("demo", [f"data.path={FIXTURE.resolve()}", f"model.pretrained={out / 'generator'}", *TINY])
    task = build.build_task(cfg)
    text_encoder = build.build_text_encoder(cfg, task)
    model = build.build_model(cfg, task, build.build_space(cfg), text_encoder)
    exported = load_file(str(out / "generator" / "unet" / "diffusion_pytorch_model.safetensors"))
    weight = model.backbone.conv_in.weight
    assert weight.shape[1] == 6
    assert torch.equal(weight[:, :3], exported["conv_in.weight"]) and not weight[:, 3:].any()
    result = Trainer(cfg, tmp_path / "run", task=task, text_encoder=text_encoder).train()
    assert result.step == 3


def test_pretrain_refuses_a_perception_preset(tmp_path):
    from genperc.pretrain import pretrain

    with pytest.raises(UserError, match="not caption"):
        pretrain(tmp_path, world_path=FIXTURE, preset="demo", overrides=TINY)


def test_depth_fine_tunes_from_the_generator_marigold_style(generator):
    """Marigold's widening: the generator's conv_in tiled over [image, x_t] and halved; a depth run
    without a text encoder is told to add one (the generator's cross-attention needs text)."""
    from genperc import build
    from genperc.config import load_config

    out, _ = generator
    exported = load_file(str(out / "generator" / "unet" / "diffusion_pytorch_model.safetensors"))
    keys = [f"data.path={FIXTURE.resolve()}", "data.source=world", f"model.pretrained={out / 'generator'}", *TINY]
    cfg = load_config("cpu-depth", [*keys, "model.text_encoder=minilm"])
    task = build.build_task(cfg)
    model = build.build_model(cfg, task, build.build_space(cfg), build.build_text_encoder(cfg, task))
    weight = model.backbone.conv_in.weight
    assert model.config.image_first
    assert torch.allclose(weight[:, :3], exported["conv_in.weight"] / 2) and torch.equal(weight[:, :3], weight[:, 3:])
    cfg = load_config("cpu-depth", keys)
    task = build.build_task(cfg)
    with pytest.raises(UserError, match="model.text_encoder=minilm"):
        build.build_model(cfg, task, build.build_space(cfg), build.build_text_encoder(cfg, task))


def test_a_packaged_generator_is_found_by_name_and_checked(generator, tmp_path, monkeypatch):
    import shutil

    from genperc.models import pretrained

    out, record = generator
    monkeypatch.setattr(pretrained, "PACKAGED_DIR", tmp_path)
    shutil.copytree(out / "generator", tmp_path / "tiny-generator")
    assert pretrained.resolve_pretrained("tiny-generator") == tmp_path / "tiny-generator"
    assert pretrained.load_pretrained_unet("tiny-generator").conv_in.weight.shape[1] == 3
    assert pretrained.resolve_pretrained("not-shipped") == Path("not-shipped")
    weights = tmp_path / "tiny-generator" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(UserError, match="SHA-256 mismatch"):
        pretrained.resolve_pretrained("tiny-generator")


def test_pretrain_refuses_to_resume_a_run_trained_otherwise(generator):
    """A second `genperc pretrain` into the same --out with other settings is refused before it
    touches the run (its checkpoints and exported generator stay as they were)."""
    from genperc.pretrain import pretrain

    out, record = generator
    before = sorted(p.name for p in (out / "run" / "checkpoints").iterdir())
    with pytest.raises(UserError, match="trained with another config"):
        pretrain(out, world_path=FIXTURE, overrides=[*TINY, "train.lr=3e-4"], eval_limit=2)
    assert sorted(p.name for p in (out / "run" / "checkpoints").iterdir()) == before
    assert json.loads((out / "generator" / "generator.json").read_text())["unet_sha256"] == record["unet_sha256"]
