"""DDAE++ inside the denoiser: self-conditioning, contrastive self-distillation, block selection, presets."""

import copy
import json
import math

import pytest
import torch

from genperc.config import ContrastiveConfig, load_config
from genperc.diffusion.conditioning import Conditioning
from genperc.diffusion.schedule import DiffusionConfig, NoiseSchedule
from genperc.errors import UserError
from genperc.models.denoiser import Denoiser
from genperc.models.heads import FeatureTaps
from genperc.models.registry import create_denoiser
from genperc.models.selfcond import named_blocks
from genperc.training.contrastive import (
    ContrastiveSelfDistillation,
    augment_views,
    moco_v3_infonce,
    symmetric_infonce,
)
from genperc.training.layer_selection import candidate_blocks, select_block

SC = {"enabled": True, "block": "mid", "hidden": 16, "time_adaptive": True, "stop_grad": False}
ARCHS = {"unet": ("unet-tiny", {"sample_size": 8}), "dit": ("dit-tiny", {"sample_size": 8, "num_layers": 4}),
         "pixart": ("dit-tiny", {"sample_size": 8, "num_layers": 4, "text_dim": 16})}


def model(kind="unet", sc=None, classes=10, **kw):
    arch, base = ARCHS[kind]
    extra = {} if kind == "pixart" else {"num_classes": classes}
    return create_denoiser(arch, seed=0, self_conditioning=sc, **base, **extra, **kw)


def inputs(kind="unet", b=4):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 3, 8, 8, generator=g)
    t = torch.tensor([0, 11, 500, 999])[:b]
    if kind == "pixart":
        return x, t, Conditioning(text=torch.randn(b, 3, 16, generator=g))
    return x, t, Conditioning(class_labels=torch.tensor([0, 3, 9, 10])[:b])  # 10 = the null class (CFG)


def open_gate(m, value=0.05):
    gate = m.self_conditioning.gate
    torch.nn.init.normal_(gate.proj.weight if gate.time_adaptive else gate.scale, std=value,
                          generator=torch.Generator().manual_seed(2))


# -- self-conditioning --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["unet", "dit", "pixart"])
def test_zero_initialised_gate_is_exactly_the_baseline_and_opening_it_changes_the_output(kind):
    base, sc = model(kind), model(kind, SC)
    x, t, cond = inputs(kind)
    with torch.no_grad():
        ref = base(x, t, cond)
        assert torch.equal(sc(x, t, cond), ref)
        open_gate(sc)
        assert not torch.allclose(sc(x, t, cond), ref, atol=1e-4)
    assert not torch.allclose(sc(x, t, cond), base(x, t, cond), atol=1e-4)


def test_unconditional_and_constant_gate_models_start_as_the_baseline():
    x, t, _ = inputs()
    for kw in ({"classes": 0}, {"sc": SC | {"time_adaptive": False}}):
        sc = model(sc=kw.get("sc", SC), classes=kw.get("classes", 10))
        base = model(classes=kw.get("classes", 10))
        with torch.no_grad():
            assert torch.equal(sc(x, t), base(x, t))


def test_gradients_reach_the_gate_at_init_and_the_mlp_once_the_gate_is_open():
    m = model(sc=SC)
    x, t, cond = inputs()
    m(x, t, cond).pow(2).mean().backward()
    sc = m.self_conditioning
    assert sc.gate.proj.weight.grad.abs().sum() > 0
    assert torch.count_nonzero(sc.mlp[0].weight.grad) == 0  # g(t) = 0 blocks it at init
    m.zero_grad()
    open_gate(m)
    m(x, t, cond).pow(2).mean().backward()
    assert sc.mlp[0].weight.grad.abs().sum() > 0 and sc.norm.weight.grad.abs().sum() > 0


def test_stop_grad_changes_the_encoder_gradient_not_the_output():
    x, t, cond = inputs()
    grads, outs = [], []
    for stop in (False, True):
        m = model(sc=SC | {"stop_grad": stop})
        open_gate(m)
        out = m(x, t, cond)
        out.pow(2).mean().backward()
        outs.append(out.detach())
        grads.append(m.backbone.down_blocks[0].resnets[0].conv1.weight.grad.clone())
    assert torch.equal(outs[0], outs[1]) and not torch.allclose(grads[0], grads[1])


def _record_conditioning(m, kind):
    """Hooks (registered after self-conditioning's) that record what each block's conditioning was;
    a DiT's final layer calls block 0's embedder again, recorded as ``final``."""
    seen = {}
    for name, block in named_blocks(m.backbone).items():
        if kind == "unet":
            def pre(module, args, kwargs, name=name):
                seen[name] = kwargs["temb"] if "temb" in kwargs else args[1]
            block.register_forward_pre_hook(pre, with_kwargs=True)
        else:
            def post(module, args, output, name=name):
                seen["final" if name in seen else name] = output
            block.norm1.emb.register_forward_hook(post)
    return seen


@pytest.mark.parametrize(("kind", "block", "before"), [("unet", "mid", {"down0", "down1", "down2", "mid"}),
                                                       ("unet", "down1", {"down0", "down1"}),
                                                       ("dit", "mid", {"blk0", "blk1"})])  # + the final layer
def test_the_chosen_block_is_read_and_only_later_blocks_are_conditioned(kind, block, before):
    base, sc = model(kind), model(kind, SC | {"block": block})
    open_gate(sc)
    x, t, cond = inputs(kind)
    seen_base, seen_sc = _record_conditioning(base, kind), _record_conditioning(sc, kind)
    with torch.no_grad():
        base(x, t, cond)
        sc(x, t, cond)
    later = set(seen_base) - before
    assert later and all(torch.equal(seen_sc[n], seen_base[n]) for n in before)
    assert all(not torch.allclose(seen_sc[n], seen_base[n]) for n in later)
    # the pooled features are the block's output averaged over positions (GenRep's taps read the same)
    chosen = sc.self_conditioning.block
    assert chosen == (block if kind == "unet" else "blk1")
    taps = FeatureTaps(sc, [chosen]) if chosen == "mid" or chosen.startswith("blk") else None
    with torch.no_grad():
        feats = sc.self_condition_features(x, t, cond)
        if taps is not None:
            sc(x, t, cond)
            assert torch.allclose(feats, taps.pop()[chosen].mean(dim=(2, 3)), atol=1e-5)
    assert feats.shape == (4, sc.self_conditioning.channels)


def test_an_unknown_or_last_block_is_a_user_error_listing_the_names():
    with pytest.raises(UserError, match=r"'up7'.*valid blocks: down0, down1, down2, mid, up0, up1 "):
        model(sc=SC | {"block": "up7"})
    with pytest.raises(UserError, match="up2"):  # the last block has nothing after it
        model(sc=SC | {"block": "up2"})
    with pytest.raises(UserError, match="blk0, blk1, blk2 "):
        model("dit", SC | {"block": "blk3"})
    with pytest.raises(UserError, match="not a block name"):
        load_config("ddae-cpu", ["model.self_conditioning.block=middle"])


def test_deepcopy_rebinds_the_hooks_to_the_copy():
    m = model(sc=SC)
    other = copy.deepcopy(m)
    open_gate(other)
    x, t, cond = inputs()
    with torch.no_grad():
        assert torch.equal(m(x, t, cond), model()(x, t, cond))
        assert not torch.allclose(other(x, t, cond), m(x, t, cond), atol=1e-4)


def test_save_and_load_round_trip_keeps_self_conditioning_and_heads(tmp_path):
    m = create_denoiser("unet-tiny", seed=0, sample_size=8, num_classes=10, self_conditioning=SC,
                        contrastive_heads={"hidden": 8, "proj_dim": 4, "pred_dim": 8, "aug_dim": 9})
    open_gate(m)
    m.save_pretrained(tmp_path / "m")
    back = Denoiser.from_pretrained(tmp_path / "m")
    assert back.config.self_conditioning == SC and back.contrastive_heads.augment is not None
    sd, sd_back = m.state_dict(), back.state_dict()
    assert sd.keys() == sd_back.keys() and any(k.startswith("self_conditioning.gate") for k in sd)
    assert all(torch.equal(sd[k], sd_back[k]) for k in sd)
    x, t, cond = inputs()
    with torch.no_grad():
        assert torch.equal(back(x, t, cond), m(x, t, cond))


def test_genrep_heads_compose_with_self_conditioning():
    from genperc.models.semantic import build_genrep_model

    sched = NoiseSchedule(DiffusionConfig(learned_variance=True))
    den = create_denoiser("unet-tiny", seed=0, sample_size=8, num_classes=10, learned_variance=True,
                          self_conditioning=SC)
    genrep = build_genrep_model(den, 10, sched)
    open_gate(genrep.denoiser)
    x, _, _ = inputs()
    with torch.no_grad():
        out = genrep.perceive(x)
        clone = genrep.clone()
        assert torch.equal(clone.perceive(x)["logits"], out["logits"])
    assert out["logits"].shape == (4, 10) and clone.denoiser.self_conditioning is not None


# -- contrastive self-distillation --------------------------------------------------------------


def test_moco_v3_infonce_matches_the_formula_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, -2.0]])
    k = torch.tensor([[2.0, 0.1], [0.0, 1.0], [1.0, -1.0]])
    tau = 0.5

    def by_hand(q, k):
        qn = [[a / math.hypot(*r) for a in r] for r in q.tolist()]
        kn = [[a / math.hypot(*r) for a in r] for r in k.tolist()]
        total = 0.0
        for i, qi in enumerate(qn):
            s = [sum(a * b for a, b in zip(qi, kj, strict=True)) / tau for kj in kn]
            total += -(s[i] - math.log(sum(math.exp(v) for v in s)))
        return 2 * tau * total / len(qn)

    assert moco_v3_infonce(q, k, tau).item() == pytest.approx(by_hand(q, k), rel=1e-6)
    q2, k2 = q.flip(0), k.flip(0)
    assert symmetric_infonce(q, q2, k, k2, tau).item() == pytest.approx(by_hand(q, k2) + by_hand(q2, k), rel=1e-6)


def test_augment_views_identity_parameters_and_ranges():
    x = torch.rand(6, 3, 8, 8) * 2 - 1
    same, params = augment_views(x, torch.Generator().manual_seed(0), strength=0.0, flip=False)
    assert torch.allclose(same, x, atol=1e-5) and torch.count_nonzero(params) == 0
    views, params = augment_views(x, torch.Generator().manual_seed(0), strength=1.0, color=1.0)
    again, _ = augment_views(x, torch.Generator().manual_seed(0), strength=1.0, color=1.0)
    assert torch.equal(views, again) and views.shape == x.shape and params.shape == (6, 9)
    assert views.min() >= -1 and views.max() <= 1 and not torch.allclose(views, x)
    assert set(params[:, 4].tolist()) <= {0.0, 1.0} and (params[:, 2:4] <= 1e-6).all()  # flips, crop ≤ image
    assert torch.count_nonzero(params[:, 5:]) > 0  # colour jitter drawn at strength 1


def test_augment_views_color_zero_keeps_the_crop_and_drops_the_jitter():
    x = torch.rand(6, 3, 8, 8) * 2 - 1
    jittered, p1 = augment_views(x, torch.Generator().manual_seed(0), strength=1.0, color=1.0)
    cropped, p0 = augment_views(x, torch.Generator().manual_seed(0), strength=1.0)  # default: no colour
    assert torch.equal(p0[:, :5], p1[:, :5]) and torch.count_nonzero(p0[:, 5:]) == 0  # same crops and flips
    assert not torch.allclose(cropped, jittered)
    # the crop-only view is the jittered one's geometry: same pixels where no jitter was drawn
    untouched = (p1[:, 5:] == 0).all(1)
    assert untouched.any() and torch.allclose(cropped[untouched], jittered[untouched], atol=1e-5)


class _Ctx:
    """What the contrastive objective reads of the trainer's step context."""

    def __init__(self, x, labels):
        self.batch = type("B", (), {"x0": x})()
        self.generator = torch.Generator().manual_seed(3)
        self.space = type("P", (), {"encode": staticmethod(lambda v: v)})()
        self.schedule = NoiseSchedule(DiffusionConfig())
        self.clean_cond = Conditioning(class_labels=labels)
        self.cond = self.clean_cond
        self.autocast = lambda: torch.autocast("cpu", enabled=False)


def test_teacher_is_an_ema_copy_without_gradient_and_the_student_learns():
    cfg = ContrastiveConfig(enabled=True, hidden=16, proj_dim=8, pred_dim=16, momentum=0.9, aug_cond=True, t_range=[0, 50])
    student = create_denoiser("unet-tiny", seed=0, sample_size=8, num_classes=10, self_conditioning=SC,
                              contrastive_heads={"hidden": 16, "proj_dim": 8, "pred_dim": 16, "aug_dim": 9})
    obj = ContrastiveSelfDistillation(student, cfg)
    teacher = obj.teacher.net
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), student.parameters(), strict=True))
    loss = obj(_Ctx(torch.rand(4, 3, 8, 8) * 2 - 1, torch.arange(4)))["contrastive"]
    loss.backward()
    assert loss.item() > 0 and all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    heads = student.contrastive_heads
    assert heads.predictor[0].weight.grad.abs().sum() > 0 and heads.projector[0].weight.grad.abs().sum() > 0
    assert student.backbone.down_blocks[0].resnets[0].conv1.weight.grad.abs().sum() > 0  # the encoder learns
    assert heads.augment.weight.grad.abs().sum() > 0
    assert student.backbone.up_blocks[0].resnets[0].conv1.weight.grad is None  # the decoder is not run
    before = [p.clone() for p in teacher.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1)
    obj.after_step()
    for old, new, s in zip(before, teacher.parameters(), student.parameters(), strict=True):
        assert torch.allclose(new, 0.9 * old + 0.1 * s, atol=1e-6)


def test_contrastive_refuses_a_model_without_heads():
    with pytest.raises(UserError, match="contrastive heads"):
        ContrastiveSelfDistillation(model(sc=SC), ContrastiveConfig(enabled=True))


# -- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("override", "message"), [
    ("model.self_conditioning.hidden=0", r"hidden=0 must lie in \[1, 65536\]"),
    ("train.contrastive.temperature=0", r"temperature=0.0 must lie in \(0, 10\]"),
    ("train.contrastive.momentum=1.5", r"momentum=1.5 must lie in \[0, 1\]"),
    ("train.contrastive.weight=-1", r"weight=-1.0 must lie in \[0, 100\]"),
    ("train.contrastive.aug_strength=3", r"aug_strength=3.0 must lie in \[0, 2\]"),
    ("train.contrastive.t_range=[5, 2]", r"t_range=\[5, 2\] is not \[lo, hi\]"),
    ("train.contrastive.t=1000", r"t=1000 must lie in \[0, 999\]"),
    ("train.contrastive.t_range=[0, 1000]", r"t_range=\[0, 1000\] must lie in \[0, 999\]"),
    ("model.self_conditioning.enabled=false", "needs model.self_conditioning.enabled"),
])
def test_config_validation_names_the_key_and_range(override, message):
    with pytest.raises(UserError, match=message):
        load_config("ddae-cpu", [override])


# -- block selection ----------------------------------------------------------------------------


def test_block_selection_picks_the_lowest_training_loss(tmp_path):
    cfg = load_config("ddae-cpu")
    assert candidate_blocks(cfg) == ["down0", "down1", "down2", "mid", "up0", "up1"]
    seen = {}

    def runner(run_cfg, run_dir):
        sc = run_cfg.model.self_conditioning
        seen[sc.block] = (sc.enabled, run_cfg.train.contrastive.enabled, run_cfg.train.steps, run_dir.name)
        return {"mid": [9.0, 0.5, 0.5], "up0": [0.1, 0.7, 0.6], "up1": [1.0, 0.4, 0.8]}[sc.block]

    sel = select_block(cfg, tmp_path, ["mid", "up0", "up1"], steps=3, window=2, runner=runner)
    assert sel.best == "mid" and sel.losses == pytest.approx({"mid": 0.5, "up0": 0.65, "up1": 0.6})
    assert seen["up1"] == (True, False, 3, "up1")
    assert json.loads((tmp_path / "selection.json").read_text())["best"] == "mid"


# -- the presets, end to end --------------------------------------------------------------------

TINY = ["data.resolution=8", "data.options={size: 8}", "model.sample_size=8", "train.batch_size=6",
        "train.log_every=1", "train.progress=false", "train.warmup_steps=0", "model.self_conditioning.hidden=16",
        "train.contrastive.hidden=16", "train.contrastive.proj_dim=8", "train.contrastive.pred_dim=16",
        "train.checkpoint_every=2", "train.keep_checkpoints=3"]


@pytest.mark.parametrize("preset", ["ddae-cpu", "ddae-dit-cpu"])
def test_preset_trains_saves_resumes_loads_and_samples(tmp_path, preset):
    from safetensors.torch import load_file

    from genperc.diffusion.guidance import ClassifierFreeGuidance
    from genperc.diffusion.sampler import sample
    from genperc.inference import load_run
    from genperc.training.trainer import Trainer

    cfg = load_config(preset, TINY + ["train.steps=4"])
    Trainer(cfg, tmp_path / "full").train()
    Trainer(cfg, tmp_path / "half").train(max_steps=2)
    Trainer(cfg, tmp_path / "half").train(resume=True)
    a, b = (tmp_path / r / "checkpoints" / "step-00000004" for r in ("full", "half"))
    for sub in ("model", "ema", "contrastive_teacher"):
        wa, wb = load_file(str(a / sub / "model.safetensors")), load_file(str(b / sub / "model.safetensors"))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), sub
    teacher, ema = (load_file(str(a / sub / "model.safetensors")) for sub in ("contrastive_teacher", "ema"))
    assert any(not torch.equal(teacher[k], ema[k]) for k in teacher)  # two different EMAs
    header = (tmp_path / "full" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"diffusion", "contrastive"} <= set(header)
    run = load_run(tmp_path / "full", device="cpu")
    assert run.model.self_conditioning is not None and run.model.contrastive_heads is not None
    out = sample(run.model, (4, 3, 8, 8), Conditioning(class_labels=torch.tensor([0, 1, 2, 3])),
                 schedule=run.schedule, sampler="ddpm", num_steps=3, guidance=ClassifierFreeGuidance(2.0),
                 null_cond=Conditioning(class_labels=torch.tensor([10])), generator=torch.Generator().manual_seed(0))
    assert out.sample.shape == (4, 3, 8, 8) and torch.isfinite(out.sample).all()


DDP_SCRIPT = r"""
import hashlib, sys
from genperc.config import load_config
from genperc.training.trainer import Trainer
tr = Trainer(load_config("ddae-cpu", sys.argv[2:]), sys.argv[1])
tr.train()
teacher = next(o for o in tr.objectives if hasattr(o, "teacher")).teacher.net
params = [*tr.unwrapped.parameters(), *teacher.parameters()]
h = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in params)).hexdigest()
open(f"{sys.argv[1]}/hash-{tr.accelerator.process_index}", "w").write(h)
"""


@pytest.mark.slow
def test_two_process_ddp_ranks_agree_with_gathered_keys(tmp_path):
    """The student's features pass runs outside DDP's forward and the keys are gathered over ranks:
    both ranks must still end with the same student and teacher."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    run = tmp_path / "run"
    run.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(script), str(run), *TINY, "train.batch_size=4", "train.steps=3", "train.checkpoint_every=3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "hash-0").read_text() == (run / "hash-1").read_text()
