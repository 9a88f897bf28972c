"""GenRep's unified model: feature taps and heads, Eq. 6–9 modulation, the hybrid loss, persistence."""

import math

import pytest
import torch

from genperc.diffusion.conditioning import Conditioning
from genperc.diffusion.schedule import DiffusionConfig, NoiseSchedule
from genperc.diffusion.variance import learned_log_variance, log_beta_range
from genperc.models.heads import FeatureTaps, HeadConfig, PerceptionHeads, default_taps
from genperc.models.registry import create_denoiser
from genperc.models.semantic import (
    MIN_LOG_BETA_RANGE,
    GenRepModel,
    SemanticConfig,
    build_genrep_model,
    rep_align_loss,
)
from genperc.training.objectives import HybridDiffusionObjective, StepContext, discretized_gaussian_log_likelihood

SCHED = NoiseSchedule(DiffusionConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, learned_variance=True,
                                      prediction_type="eps"))


def unet(size=8, k=3):
    return create_denoiser("unet-tiny", sample_size=size, in_channels=3, num_classes=k, learned_variance=True, seed=0)


def genrep(heads=None, sem=None, k=3):
    return build_genrep_model(unet(k=k), k, SCHED, heads or HeadConfig(segmentation=4, depth=True),
                              sem or SemanticConfig())


def test_taps_on_unet_and_dit_and_heads_shapes():
    d = unet()
    taps = FeatureTaps(d)
    assert taps.names == default_taps(d) == ["up0", "up1", "up2"]
    ch = taps.channels(d)
    heads = PerceptionHeads(ch, 3, HeadConfig(segmentation=4, depth=True))
    d(torch.randn(2, 3, 8, 8), torch.tensor([0, 0]), Conditioning(class_labels=torch.tensor([0, 1])))
    out = heads(taps.pop(), (8, 8))
    assert out["logits"].shape == (2, 3) and out["segmentation"].shape == (2, 4, 8, 8)
    assert out["depth"].shape == (2, 1, 8, 8) and (out["depth"] > 0).all()
    dit = create_denoiser("dit-small", sample_size=8, in_channels=3, num_classes=3, learned_variance=True, seed=0,
                          num_layers=4, num_attention_heads=2, attention_head_dim=8)
    dt = FeatureTaps(dit)
    assert dt.names == ["blk2", "blk3"] and set(dt.channels(dit).values()) == {16}
    pooled = PerceptionHeads(dt.channels(dit), 3, HeadConfig(fusion="pool", classifier="mlp"))
    dit(torch.randn(2, 3, 8, 8), torch.tensor([0, 0]))
    assert pooled(dt.pop(), (8, 8))["logits"].shape == (2, 3)


def test_cosine_head_is_ten_times_the_cosine_to_the_class_text_embeddings():
    """logits_c = s·cos(P·f, e_c) with s initialised to 10 (heads docstring), P the projection."""
    text = torch.randn(3, 5, generator=torch.Generator().manual_seed(8))
    heads = PerceptionHeads({"a": 4}, 3, HeadConfig(classifier="cosine"), text_embeddings=text)
    feats = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(9))
    logits = heads({"a": feats}, (3, 3))["logits"]
    projected = heads.classifier.net(heads.classifier.norm(heads({"a": feats}, (3, 3))["pooled"]))
    cos = torch.nn.functional.cosine_similarity(projected[:, None, :], text[None, :, :], dim=-1)
    assert torch.allclose(logits, 10 * cos, atol=1e-5)


def test_zero_initialised_modulation_leaves_the_denoiser_unchanged_and_perceive_works():
    m = genrep().eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 500])
    cond = Conditioning(class_labels=torch.tensor([0, 2]))
    assert torch.allclose(m(x, t, cond), m.denoiser(x, t, cond))
    out = m.perceive(x)
    assert out["logits"].shape == (2, 3) and "mid" in m.last_features


def test_variance_factor_multiplies_the_learned_variance_exactly():
    m = genrep().eval()
    torch.nn.init.constant_(m.modulation.var_mlp[-1].bias, 0.4)  # g = 0.4 → variance × e^0.4
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([3, 700])
    cond = Conditioning(class_labels=torch.tensor([0, 1]))
    base, mod = m.denoiser(x, t, cond), m(x, t, cond)
    assert torch.allclose(base[:, :3], mod[:, :3])
    lv_base = learned_log_variance(SCHED, base[:, 3:], t)
    lv_mod = learned_log_variance(SCHED, mod[:, 3:], t)
    assert torch.allclose(lv_mod - lv_base, torch.full_like(lv_base, 0.4), atol=2e-3)
    # and diffusers' single-step DDPM (learned_range) sees the same factor
    sch = SCHED.make_scheduler("ddpm")
    sch.set_timesteps(1000)
    v_b, v_m = base[:1, 3:], mod[:1, 3:]
    r = sch._get_variance(3, predicted_variance=v_m) - sch._get_variance(3, predicted_variance=v_b)
    assert torch.allclose(r, torch.full_like(r, 0.4), atol=2e-3)


def test_variance_factor_near_T_is_exp_g_scaled_where_the_clamp_bites():
    """The factor is exp(g) while log β_t − log β̃_t ≥ 1e-6 and exp(g·range/1e-6) where the clamp
    bites — for the linear schedule of T = 1000, t = 989…999 (module docstring)."""
    m = genrep().eval()
    g = 0.4
    torch.nn.init.constant_(m.modulation.var_mlp[-1].bias, g)
    true_range = log_beta_range(SCHED)  # float64, unclamped
    clamped = (true_range < MIN_LOG_BETA_RANGE).nonzero().flatten().tolist()
    assert clamped == list(range(989, 1000))
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([900, 988, 999])
    cond = Conditioning(class_labels=torch.tensor([0, 1, 2]))
    base, mod = m.denoiser(x, t, cond), m(x, t, cond)
    shift = learned_log_variance(SCHED, mod[:, 3:].double(), t) - learned_log_variance(SCHED, base[:, 3:].double(), t)
    expected = [g, g, g * float(true_range[999]) / MIN_LOG_BETA_RANGE]  # 0.4, 0.4, 0.33
    for row, value in enumerate(expected):
        assert torch.allclose(shift[row], torch.full_like(shift[row], value), rtol=1e-4), (int(t[row]), value)
    assert expected[2] < 0.9 * g  # near T the factor is visibly less than exp(g)


def ddpm_mean(eps, x_t, t):
    """Ho et al. 2020 Eq. 11: μ = (x_t − β_t/√(1 − ᾱ_t)·ε)/√α_t."""
    beta = SCHED.betas[t].view(-1, 1, 1, 1)
    ab = SCHED.alphas_cumprod[t].view(-1, 1, 1, 1)
    return (x_t.double() - beta / (1 - ab).sqrt() * eps.double()) / (1 - beta).sqrt()


def test_mean_shift_is_c_t_times_W_t_concat_x_t_x_sem():
    """Eq. 6–7: the DDPM mean moves by c(t)·W_t·concat(x_t, x_sem) with c(t) = −β_t/(√α_t·√(1 − ᾱ_t))
    (ε-prediction) and W_t the matrix of t's bucket (t·buckets // T)."""
    m = genrep(sem=SemanticConfig(buckets=4))
    with torch.no_grad():
        m.modulation.weight.normal_(generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(6)
    x, x_sem = torch.randn(2, 3, 8, 8, generator=gen), torch.randn(2, 3, 8, 8, generator=gen)
    t = torch.tensor([100, 600])  # buckets 0 and 2 of 4
    cond = Conditioning(class_labels=torch.tensor([1, 2]))
    m.eval()
    shift = ddpm_mean(m(x, t, cond, x_sem=x_sem)[:, :3], x, t) - ddpm_mean(m.denoiser(x, t, cond)[:, :3], x, t)
    for row, bucket in enumerate((0, 2)):
        w = m.modulation.weight[bucket].detach().double()  # [C, 2C]
        z = torch.cat([x[row], x_sem[row]]).double().reshape(6, -1)  # concat(x_t, x_sem), [2C, HW]
        beta, ab = SCHED.betas[t[row]], SCHED.alphas_cumprod[t[row]]
        c_t = -beta / ((1 - beta).sqrt() * (1 - ab).sqrt())
        expected = (c_t * (w @ z)).reshape(3, 8, 8)
        assert torch.allclose(shift[row], expected, atol=1e-5), row


def test_x_sem_is_the_semantic_source_in_training_and_x_t_at_inference():
    m = genrep()
    with torch.no_grad():
        m.modulation.weight.normal_(generator=torch.Generator().manual_seed(7))
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([100])
    cond = Conditioning(class_labels=torch.tensor([1]))
    sem = torch.zeros_like(x)
    m.attach_semantic(lambda *_: sem)
    train_out = m.train()(x, t, cond)
    assert torch.equal(train_out, m(x, t, cond, x_sem=sem))
    m.eval()
    assert torch.equal(m(x, t, cond), m(x, t, cond, x_sem=x))
    assert not torch.allclose(train_out, m(x, t, cond))
    assert "_semantic_source" not in dict(m.named_modules())


def test_save_load_and_clone_are_independent(tmp_path):
    m = genrep(HeadConfig(classifier="mlp"))
    with torch.no_grad():
        m.modulation.weight.normal_()
    m.save_pretrained(tmp_path / "g")
    back = GenRepModel.from_pretrained(tmp_path / "g")
    for (k, a), (_, b) in zip(m.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    c = m.clone()
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(c.perceive(x)["logits"], m.perceive(x)["logits"])
    c.perceive(x)
    assert c.taps.features == {} and m.taps.features == {}  # each model's hooks write to its own taps


def test_rep_align_loss_is_minus_one_for_aligned_features():
    a = torch.randn(2, 4, 4, 4)
    assert float(rep_align_loss(a, torch.nn.functional.interpolate(a, size=(8, 8)))) == pytest.approx(-1.0, abs=1e-5)


def test_discretized_likelihood_sums_to_one():
    levels = torch.linspace(-1, 1, 256)
    mean, lv = torch.full((256,), 0.13), torch.full((256,), math.log(0.05))
    assert float(discretized_gaussian_log_likelihood(levels, mean, lv).exp().sum()) == pytest.approx(1.0, abs=1e-4)


def test_hybrid_loss_detaches_the_mean_in_the_vlb_and_is_zero_at_the_truth():
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([5, 50, 400, 999])
    x_t = SCHED.add_noise(x0, noise, t)
    eps = noise.clone().requires_grad_(True)
    v = -torch.ones_like(x0, requires_grad=True)  # frac 0 → log β̃_t: the true posterior variance
    out = torch.cat([eps, v], 1)
    ctx = StepContext(output=out, x0=x0, x_t=x_t, noise=noise, t=t, weights=None, schedule=SCHED,
                      cond=Conditioning(), model=None)
    losses = HybridDiffusionObjective(0.001)(ctx)
    assert float(losses["simple"].detach()) < 1e-10 and abs(float(losses["vlb"].detach())) < 1e-4
    v2 = torch.zeros_like(x0, requires_grad=True)
    ctx.output = torch.cat([eps + 0.1, v2], 1)
    losses = HybridDiffusionObjective(0.001)(ctx)
    (g_eps,) = torch.autograd.grad(losses["vlb"], [eps], retain_graph=True)
    (g_v,) = torch.autograd.grad(losses["vlb"], [v2])
    assert torch.count_nonzero(g_eps) == 0 and torch.count_nonzero(g_v) > 0


def test_genrep_model_on_a_dit_backbone():
    dit = create_denoiser("dit-small", sample_size=8, in_channels=3, num_classes=3, learned_variance=True, seed=0,
                          num_layers=3, num_attention_heads=2, attention_head_dim=8)
    m = build_genrep_model(dit, 3, SCHED, HeadConfig(width=8), SemanticConfig(projector_hidden=8))
    assert m.student_tap == "blk1" and len(m.attention_parameters()) == 3 * 8  # q, k, v, out (w + b) per block
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 900])
    out = m(x, t, Conditioning(class_labels=torch.tensor([0, 2])))
    assert out.shape == (2, 6, 8, 8) and m.perceive(x)["logits"].shape == (2, 3)
    assert m.projector(m.last_features["blk1"]).shape[1] == m.tap_channels[m.target_tap]


def test_rep_align_weight_defaults_to_eq_10s_one():
    assert SemanticConfig().rep_weight == 1.0  # L_genera = L_LDM + L_rep_align (REPA itself uses 0.5)
