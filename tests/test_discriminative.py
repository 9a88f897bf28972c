"""The discriminative counterpart (issue 12, ADDP Table 2): ``model.mode: discriminative`` — the same
denoiser at t = T−1 on x_T = 0, the task's own loss, trained by the one trainer and scored by the
same evaluation."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from genperc.cli import main
from genperc.config import load_config
from genperc.data.toy import ToyShapes
from genperc.errors import UserError
from genperc.inference import evaluate_run, load_run, predict_files
from genperc.tasks.base import TaskBatch
from genperc.tasks.depth import DepthTask
from genperc.tasks.generalist import GeneralistTask
from genperc.tasks.losses import align_scale_shift, bce_loss, dice_loss, ssi_loss
from genperc.tasks.referring import ReferringTask
from genperc.training.objectives import DiffusionObjective, DiscriminativeObjective, default_objectives
from genperc.training.trainer import Trainer

TINY = ["data.resolution=16", "model.sample_size=16", "train.batch_size=4", "train.log_every=1",
        "train.warmup_steps=2", "train.progress=false", "model.text_max_length=8", "model.mode=discriminative"]
PRESETS = {"referring": "cpu-tiny", "depth": "cpu-depth"}


def tiny_cfg(preset="cpu-tiny", *extra):
    return load_config(preset, TINY + list(extra))


def _encoder(task, text_encoder):
    return None if task == "depth" else text_encoder


# -- losses with known answers --------------------------------------------------------------------


def test_dice_of_identical_masks_is_zero_and_of_disjoint_masks_near_one():
    m = (torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    assert torch.allclose(dice_loss(m, m), torch.zeros(3))
    assert torch.allclose(dice_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)), torch.zeros(1))  # both empty
    disjoint = dice_loss(m, 1 - m)
    assert (disjoint > 0.95).all()


def test_bce_matches_torch():
    g = torch.Generator().manual_seed(1)
    logits, target = torch.randn(2, 1, 5, 5, generator=g) * 3, (torch.rand(2, 1, 5, 5, generator=g) > 0.5).float()
    expected = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(1)
    assert torch.allclose(bce_loss(logits, target), expected, atol=1e-6)
    assert torch.allclose(bce_loss(logits, target).mean(), F.binary_cross_entropy_with_logits(logits, target), atol=1e-6)


def test_ssi_loss_is_invariant_to_a_positive_scale_and_a_shift_and_respects_the_mask():
    g = torch.Generator().manual_seed(2)
    target = torch.rand(3, 1, 8, 8, generator=g) * 2 - 1
    pred = target + 0.3 * torch.randn(3, 1, 8, 8, generator=g)
    base = ssi_loss(pred, target)
    assert torch.allclose(ssi_loss(4.0 * pred - 2.5, target), base, atol=1e-5)
    assert torch.allclose(ssi_loss(0.01 * pred + 7.0, target), base, atol=1e-4)
    assert torch.allclose(ssi_loss(3.0 * target + 1.0, target), torch.zeros(3), atol=1e-5)
    # least squares when positively correlated (Marigold-E2E-FT's alignment), the magnitude otherwise
    p, t = pred.flatten(1), target.flatten(1)
    a = torch.stack([p, torch.ones_like(p)], -1)
    lsq = torch.linalg.lstsq(a, t[..., None]).solution
    assert torch.allclose(align_scale_shift(pred, target).flatten(1), (a @ lsq)[..., 0], atol=1e-5)
    assert (ssi_loss(-pred, target) > base).all()  # a sign flip is not free: near stays −1
    # pixels outside the mask do not count
    mask = torch.ones_like(target)
    mask[..., :4] = 0
    spoiled = pred.clone()
    spoiled[..., :4] = 100.0
    assert torch.allclose(ssi_loss(spoiled, target, mask), ssi_loss(pred, target, mask), atol=1e-5)


def test_task_losses_and_decoding():
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(2, 1, 8, 8, generator=g) > 0.5
    image = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    ref = ReferringTask()
    batch = ref.prepare({"image": image, "mask": mask, "text": ["a", "b"]})
    perfect = (mask.float() * 2 - 1).expand(-1, 3, -1, -1) * 20  # confident logits in every channel
    losses = ref.discriminative_loss(perfect, batch)
    assert set(losses) == {"bce", "dice"} and losses["bce"] < 1e-6 and losses["dice"] < 1e-6
    assert torch.equal(ref.decode_discriminative(perfect), mask)

    depth = DepthTask()
    d = torch.rand(2, 1, 8, 8, generator=g) + 1
    valid = torch.ones_like(d, dtype=torch.bool)
    db = depth.prepare({"image": image, "depth": d, "valid": valid})
    target = db.x0.mean(1, keepdim=True)
    assert depth.discriminative_loss((5 * db.x0 + 3), db)["ssi"] < 1e-5
    decoded = depth.decode_discriminative(5 * db.x0 + 3)
    assert decoded.shape == (2, 1, 8, 8) and decoded.min() == -1 and decoded.max() == 1
    assert torch.allclose(ssi_loss(decoded, target), torch.zeros(2), atol=1e-5)

    gen = GeneralistTask()
    x0 = torch.stack([db.x0[0], perfect[0].sign(), image[1]])
    tb = TaskBatch(x0=x0, image=torch.cat([image, image[:1]]), texts=["d", "s", "b"],
                   extras={"subtask": ["depth", "segment", "detect"]}, loss_mask=torch.ones(3, 1, 8, 8))
    out = torch.stack([5 * db.x0[0] - 1, perfect[0], image[1]])
    gl = gen.discriminative_loss(out, tb)
    assert set(gl) == {"ssi", "bce", "dice", "box_mse"} and all(float(v) < 1e-5 for v in gl.values())
    preds = gen.decode_discriminative(out, {"subtask": ["depth", "segment", "detect"]})
    assert [p["subtask"] for p in preds] == ["depth", "segment", "detect"]
    assert torch.equal(preds[1]["mask"], mask[0])


# -- config ---------------------------------------------------------------------------------------


def test_mode_is_validated_saved_and_chooses_the_objective(tmp_path):
    with pytest.raises(UserError, match="model.mode='discrim' is not valid") as e:
        load_config("cpu-tiny", ["model.mode=discrim"])
    assert "discriminative" in e.value.fix
    assert load_config("cpu-tiny").model.mode == "generative"
    cfg = tiny_cfg()
    cfg.save(tmp_path / "config.yaml")
    assert "mode: discriminative" in (tmp_path / "config.yaml").read_text()
    [obj] = default_objectives(cfg, ReferringTask())
    assert isinstance(obj, DiscriminativeObjective) and not obj.uses_output and not obj.uses_noise
    assert isinstance(default_objectives(load_config("cpu-tiny"), ReferringTask())[0], DiffusionObjective)
    rc = main(["config", "--preset", "cpu-tiny", "model.mode=both"])
    assert rc == 2


# -- training -------------------------------------------------------------------------------------


class _Spy(torch.nn.Module):
    """A denoiser that notes every call's input and timestep."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, t, cond):
        self.calls.append((x.detach().clone(), t.detach().clone()))
        return self.model(x, t, cond)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)


@pytest.mark.parametrize("task", list(PRESETS))
def test_discriminative_run_overfits_a_batch(task, tmp_path, text_encoder):
    """A batch of 4 memorised in 15 steps by the task's own loss; the trainer draws no timestep,
    noise or dropout (the generator is untouched) and the model only ever sees t = T−1 on zeros."""
    cfg = tiny_cfg(PRESETS[task], "train.steps=15", "train.lr=3e-3", "train.ema=false",
                   "train.checkpoint_every=1000", "train.cond_dropout=0.5")
    tr = Trainer(cfg, tmp_path / "run", train_source=ToyShapes(size=4, resolution=16),
                 text_encoder=_encoder(task, text_encoder))
    spy = _Spy(tr.model)
    tr.model = spy
    state = tr.generator.get_state().clone()
    tr.train()
    assert torch.equal(tr.generator.get_state(), state)
    assert all(torch.all(t == 999) and not x.any() for x, t in spy.calls) and len(spy.calls) == 15
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert header[:2] == ["step", "loss"] and ({"bce", "dice"} if task == "referring" else {"ssi"}) <= set(header)
    losses = [float(r.split(",")[1]) for r in rows[1:]]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:3]) / 3


def test_discriminative_resume_is_exact(tmp_path, text_encoder):
    src = ToyShapes(size=12, resolution=16)
    common = ["train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=3", "train.cond_dropout=0.3"]
    full = Trainer(tiny_cfg("cpu-tiny", *common), tmp_path / "full", train_source=src, text_encoder=text_encoder)
    full.train()
    half = Trainer(tiny_cfg("cpu-tiny", *common), tmp_path / "half", train_source=src, text_encoder=text_encoder)
    half.train(max_steps=2)
    resumed = Trainer(tiny_cfg("cpu-tiny", *common), tmp_path / "half", train_source=src, text_encoder=text_encoder)
    resumed.train(resume=True)
    a = tmp_path / "full" / "checkpoints" / "step-00000004"
    b = tmp_path / "half" / "checkpoints" / "step-00000004"
    for sub in ("model", "ema"):
        wa, wb = load_file(str(a / sub / "model.safetensors")), load_file(str(b / sub / "model.safetensors"))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), sub
    assert json.loads((a / "state.json").read_text()) == json.loads((b / "state.json").read_text())


def test_discriminative_forward_runs_under_the_trainers_autocast(tmp_path, text_encoder):
    cfg = tiny_cfg("cpu-tiny", "train.steps=1", "train.mixed_precision=bf16", "train.checkpoint_every=1000")
    tr = Trainer(cfg, tmp_path / "run", train_source=ToyShapes(size=4, resolution=16), text_encoder=text_encoder)
    seen = []
    tr.unwrapped.backbone.conv_in.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    losses = tr.compute_losses(next(iter(tr._loader())))
    assert seen == [torch.bfloat16]  # the one forward ran under the trainer's autocast, the losses in fp32
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


# -- evaluation and prediction --------------------------------------------------------------------


@pytest.fixture(scope="module")
def disc_run(tmp_path_factory, text_encoder):
    cfg = tiny_cfg("cpu-tiny", "train.steps=2", "train.checkpoint_every=2", "sample.batch_size=4",
                   "data.options={size: 6}")
    root = tmp_path_factory.mktemp("disc")
    Trainer(cfg, root / "rs", train_source=ToyShapes(size=6, resolution=16), text_encoder=text_encoder).train()
    return root / "rs"


def test_evaluation_is_one_forward_per_item(disc_run, text_encoder, tmp_path):
    run = load_run(disc_run, text_encoder=text_encoder)
    run.model = spy = _Spy(run.model)
    res = evaluate_run(run, "val", limit=6, steps=10, out=tmp_path)  # sampler options do not apply
    assert sum(x.shape[0] for x, _ in spy.calls) == 6 and len(spy.calls) == 2  # batches of 4 + 2
    assert all(torch.all(t == 999) and not x.any() for x, t in spy.calls)
    assert "oIoU" in res.summary and len(res.rows) == 6
    settings = json.loads((tmp_path / "metrics.json").read_text())["settings"]
    assert settings["mode"] == "discriminative" and settings["sampler"] == "n/a" and settings["steps"] == 1
    assert settings["eta"] == settings["spacing"] == settings["text_scale"] == "n/a" and settings["ensemble"] == 1
    assert "t = 999" in settings["forward"]


def test_ensemble_is_refused_for_a_discriminative_run(disc_run, text_encoder, tmp_path, capsys):
    run = load_run(disc_run, text_encoder=text_encoder)
    with pytest.raises(UserError, match="discriminative run makes one deterministic prediction"):
        evaluate_run(run, "val", ensemble=3, limit=2)
    rc = main(["eval", str(disc_run), "--ensemble", "2", "--limit", "2", "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--ensemble" in err


def test_eval_and_predict_cli_work_unchanged(disc_run, tmp_path, capsys):
    from PIL import Image

    rc = main(["eval", str(disc_run), "--limit", "3", "--out", str(tmp_path / "eval")])
    assert rc == 0 and "discriminative, one step at t = 999" in capsys.readouterr().out
    image = tmp_path / "scene.png"
    Image.fromarray(ToyShapes(size=1, resolution=24, split="test")[0].image).save(image)
    rc = main(["predict", str(disc_run), "--image", str(image), "--prompt", "the disc", "--out", str(tmp_path / "p")])
    assert rc == 0
    info = json.loads((tmp_path / "p" / "prediction.json").read_text())
    assert info["mode"] == "discriminative" and info["sampler"] == "n/a"
    assert (tmp_path / "p" / "prediction_mask.png").exists()
    run = load_run(disc_run)
    paths, _ = predict_files(run, image, tmp_path / "q", "the disc")
    assert any(p.name == "prediction_overlay.png" for p in paths)
