"""GenRep stage 2's parts: the EMA semantic network (a trainer hook) and the REPA target."""

import torch

from genperc.diffusion.conditioning import Conditioning
from genperc.diffusion.schedule import DiffusionConfig, NoiseSchedule
from genperc.models.heads import HeadConfig
from genperc.models.registry import create_denoiser
from genperc.models.semantic import SemanticConfig, build_genrep_model, rep_align_loss
from genperc.training.genrep import RepAlignObjective, SemanticTeacher
from genperc.training.objectives import StepContext

SCHED = NoiseSchedule(DiffusionConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, learned_variance=True,
                                      prediction_type="eps"))


def unified_model(**semantic):
    denoiser = create_denoiser("unet-tiny", sample_size=8, in_channels=3, num_classes=3, learned_variance=True, seed=0)
    return build_genrep_model(denoiser, 3, SCHED, HeadConfig(width=8),
                              SemanticConfig(projector_hidden=8, var_hidden=8, **semantic))


def test_ema_moves_the_semantic_network_by_exactly_m_per_optimizer_step():
    unified = unified_model(ema=0.9)
    teacher = SemanticTeacher(unified, SCHED, unified.semantic_config)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):  # two optimizer steps: θ_sem ← m·θ_sem + (1 − m)·θ_unified after each
        before = [p.clone() for p in teacher.net.parameters()]
        with torch.no_grad():
            for p in unified.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        teacher.after_step(None)
        for b, s, u in zip(before, teacher.net.parameters(), unified.parameters(), strict=True):
            assert torch.allclose(s, 0.9 * b + 0.1 * u, rtol=1e-6, atol=1e-7)
    assert teacher.updates == 2


def _step(unified, x_t, t, cond, x0):
    """What the trainer does: the generation forward, then the objective reads its context."""
    unified.train()
    out = unified(x_t, t, cond)
    return StepContext(output=out, x0=x0, x_t=x_t, noise=torch.zeros_like(x_t), t=t, weights=None, schedule=SCHED,
                       cond=cond, model=unified)


def test_noisy_rep_target_is_refreshed_every_step_with_the_modulation_off():
    unified = unified_model(modulation=False, rep_target_input="noisy")
    teacher = SemanticTeacher(unified, SCHED, unified.semantic_config)
    objective = RepAlignObjective(teacher, unified.semantic_config)
    gen = torch.Generator().manual_seed(1)
    cond = Conditioning(class_labels=torch.tensor([0, 2]))
    t = torch.tensor([50, 400])
    for _ in range(3):
        x0 = torch.rand(2, 3, 8, 8, generator=gen) * 2 - 1
        x_t = SCHED.add_noise(x0, torch.randn(x0.shape, generator=gen), t)
        ctx = _step(unified, x_t, t, cond, x0)
        loss = objective(ctx)["rep_align"]
        # by hand: ε_sem's features of this very x_t at the target tap
        with torch.no_grad():
            target = teacher.net.features(x_t, t, cond)[unified.target_tap]
        student = unified.last_features[unified.student_tap]
        expected = unified.semantic_config.rep_weight * rep_align_loss(unified.projector(student), target)
        assert torch.allclose(loss, expected, atol=1e-6)


def test_noisy_rep_target_reuses_the_x_sem_pass_with_the_modulation_on():
    unified = unified_model(modulation=True, rep_target_input="noisy")
    teacher = SemanticTeacher(unified, SCHED, unified.semantic_config)
    unified.attach_semantic(teacher)
    objective = RepAlignObjective(teacher, unified.semantic_config)
    x0 = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    t, cond = torch.tensor([10, 900]), Conditioning(class_labels=torch.tensor([1, 1]))
    calls = []
    original = teacher.net.denoiser.forward
    teacher.net.denoiser.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    ctx = _step(unified, SCHED.add_noise(x0, torch.ones_like(x0), t), t, cond, x0)
    loss = objective(ctx)["rep_align"]
    assert len(calls) == 1  # one ε_sem pass per micro-batch: x_sem and the target share it
    with torch.no_grad():
        target = teacher.net.features(ctx.x_t, t, cond)[unified.target_tap]
    student = unified.last_features[unified.student_tap]
    assert torch.allclose(loss, unified.semantic_config.rep_weight * rep_align_loss(unified.projector(student), target),
                          atol=1e-6)


def test_teacher_chain_leaves_the_training_forward_features_in_place():
    from genperc.training.genrep import teacher_mode

    unified = unified_model()
    x_t, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 6])
    unified.train()
    unified(x_t, t, Conditioning(class_labels=torch.tensor([0, 1])))
    features = unified.last_features
    with teacher_mode(unified):  # a chain of B·K rows, as the posterior teacher runs it
        unified(torch.randn(6, 3, 8, 8), torch.full((6,), 100), Conditioning(class_labels=torch.arange(3).repeat(2)))
        assert not unified.training
    assert unified.training and unified.last_features is features
    assert unified.last_features[unified.student_tap].shape[0] == 2
