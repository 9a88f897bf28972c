"""Noise schedules, parameterisations and the forward process (genperc.diffusion.schedule)."""

import warnings

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from genperc.diffusion.schedule import (
    ALPHA_BAR_FLOOR,
    PREDICTION_TYPES,
    DiffusionConfig,
    NoiseSchedule,
    convert_prediction,
)
from genperc.errors import UserError

SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2"]


def _schedule(**kw) -> NoiseSchedule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return NoiseSchedule(DiffusionConfig(**kw))


def _truth(sched: NoiseSchedule, t, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(len(t), 2, 3, 3, generator=g, dtype=dtype)
    eps = torch.randn(len(t), 2, 3, 3, generator=g, dtype=dtype)
    x_t = sched.add_noise(x0, eps, t)
    ab = sched.alpha_bar(t).view(-1, 1, 1, 1).to(dtype)
    v = ab.sqrt() * eps - (1 - ab).sqrt() * x0
    return x_t, {"eps": eps, "x0": x0, "v": v}


@pytest.mark.parametrize("beta_schedule", SCHEDULES)
def test_conversions_exact_for_all_pairs(beta_schedule):
    sched = _schedule(beta_schedule=beta_schedule)
    t = torch.tensor([0, 1, 2, 10, 100, 250, 500, 750, 900, 990, 998, 999])
    x_t, truth = _truth(sched, t)
    for src in PREDICTION_TYPES:
        for dst in PREDICTION_TYPES:
            got = sched.convert(truth[src], src, dst, x_t, t)
            torch.testing.assert_close(got, truth[dst], rtol=0, atol=1e-9, msg=f"{src}->{dst}")
            back = sched.convert(got, dst, src, x_t, t)
            torch.testing.assert_close(back, truth[src], rtol=0, atol=1e-9, msg=f"{src}->{dst}->{src}")
    torch.testing.assert_close(sched.to_x0(truth["eps"], x_t, t), truth["x0"], rtol=0, atol=1e-9)
    torch.testing.assert_close(sched.to_eps(truth["v"], x_t, t, src="v"), truth["eps"], rtol=0, atol=1e-9)


def test_add_noise_and_velocity_match_diffusers():
    for beta_schedule in SCHEDULES:
        for zsnr in (False, True):
            cfg = DiffusionConfig(beta_schedule=beta_schedule, zero_terminal_snr=zsnr, prediction_type="v")
            ours = NoiseSchedule(cfg)
            ref = DDPMScheduler(beta_schedule=beta_schedule, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
                                rescale_betas_zero_snr=zsnr)
            g = torch.Generator().manual_seed(1)
            x0, noise = torch.randn(6, 3, 4, 4, generator=g), torch.randn(6, 3, 4, 4, generator=g)
            t = torch.tensor([0, 3, 111, 500, 998, 999])
            x_t = ours.add_noise(x0, noise, t)
            torch.testing.assert_close(x_t, ref.add_noise(x0, noise, t), rtol=0, atol=1e-6)
            # the v target the trainer regresses (from the clean x0 and x_t) is diffusers' velocity
            x0, noise, x_t = x0.double(), noise.double(), ours.add_noise(x0.double(), noise.double(), t)
            torch.testing.assert_close(ours.convert(x0, "x0", "v", x_t, t), ref.get_velocity(x0, noise, t),
                                       rtol=0, atol=1e-9)


def test_schedulers_share_betas_and_prediction_type():
    sched = _schedule(beta_schedule="scaled_linear", prediction_type="v", timestep_spacing="trailing")
    for kind in ("ddpm", "ddim", "euler-a"):
        s = sched.make_scheduler(kind)
        torch.testing.assert_close(s.alphas_cumprod.double(), sched.alphas_cumprod, rtol=0, atol=0)
        assert s.config.prediction_type == "v_prediction"
        assert s.config.timestep_spacing == "trailing"
    assert sched.make_scheduler("ddim").config.clip_sample is False
    assert sched.make_scheduler("ddpm", variance_type="fixed_large").config.variance_type == "fixed_large"
    assert _schedule(learned_variance=True).make_scheduler("ddpm").config.variance_type == "learned_range"


def test_scheduler_prediction_type_rules():
    assert _schedule(prediction_type="x0").scheduler_prediction_type("euler-a") == "v"
    assert _schedule(prediction_type="x0").scheduler_prediction_type("ddim") == "x0"
    assert _schedule(prediction_type="eps", zero_terminal_snr=True).scheduler_prediction_type("ddim") == "v"
    assert _schedule(prediction_type="eps").scheduler_prediction_type("ddpm") == "eps"


def test_trailing_one_step_evaluates_last_timestep():
    # REFERENCE.md (Marigold v1.1): "leading" with 1 step evaluates a nearly clean t on pure noise.
    for kind in ("ddpm", "ddim", "euler-a"):
        trailing = _schedule(timestep_spacing="trailing").timesteps(kind, 1)
        assert trailing.tolist() == [999]
        assert _schedule(timestep_spacing="leading").timesteps(kind, 1).tolist() == [0]
    assert _schedule(timestep_spacing="trailing").timesteps("ddim", 4).tolist() == [999, 749, 499, 249]


def test_with_spacing_is_a_sampling_copy():
    """A sampling-time spacing changes the visited timesteps only; the run's schedule is untouched."""
    run = _schedule(timestep_spacing="leading")
    trailing = run.with_spacing("trailing")
    assert run.with_spacing(None) is run and run.with_spacing("leading") is run
    assert run.config.timestep_spacing == "leading" and trailing.config.timestep_spacing == "trailing"
    assert torch.equal(trailing.alphas_cumprod, run.alphas_cumprod)
    assert trailing.timesteps("ddim", 2).tolist() == [999, 499] and run.timesteps("ddim", 2).tolist() == [500, 0]
    with pytest.raises(UserError, match="unknown timestep spacing 'foo'"):
        run.with_spacing("foo")


def test_zero_terminal_snr():
    sched = _schedule(zero_terminal_snr=True, prediction_type="v")
    assert sched.alphas_cumprod[-1].item() == 0.0
    assert sched.snr(999).item() == 0.0
    assert sched.alphas_cumprod[-2].item() > 0.0
    assert _schedule().alphas_cumprod[-1].item() > 0.0
    # At t=T-1, x_t = ε: v and x0 sources stay exact, eps sources stay finite (clamped).
    t = torch.tensor([999, 999])
    x_t, truth = _truth(sched, t)
    torch.testing.assert_close(x_t, truth["eps"])
    for src in ("v", "x0"):
        for dst in PREDICTION_TYPES:
            torch.testing.assert_close(sched.convert(truth[src], src, dst, x_t, t), truth[dst], rtol=0, atol=1e-9)
    for dst in ("x0", "v"):
        assert torch.isfinite(sched.convert(truth["eps"] + 0.1, "eps", dst, x_t, t)).all()
    # the floor stands in for ᾱ = 0 only: a tiny positive ᾱ is used as is.
    ab = torch.tensor([ALPHA_BAR_FLOOR / 4], dtype=torch.float64)
    x0 = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    eps = -torch.ones_like(x0)
    xt = ab.sqrt().view(-1, 1, 1, 1) * x0 + (1 - ab).sqrt().view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(convert_prediction(eps, "eps", "x0", xt, ab), x0)


def test_zero_terminal_snr_with_eps_warns():
    with pytest.warns(UserWarning, match="zero_terminal_snr"):
        DiffusionConfig(zero_terminal_snr=True, prediction_type="eps")


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(prediction_type="noise"),
        dict(beta_schedule="cosine"),
        dict(timestep_spacing="uniform"),
        dict(num_train_timesteps=1),
        dict(beta_start=0.02, beta_end=0.01),
    ],
)
def test_invalid_config_raises_user_error(kwargs):
    with pytest.raises(UserError) as err:
        DiffusionConfig(**kwargs)
    assert err.value.fix  # every message says how to fix it
    if "prediction_type" in kwargs:
        assert "'eps', 'x0', 'v'" in str(err.value)


def test_diffusers_names_are_accepted():
    assert DiffusionConfig(prediction_type="epsilon").prediction_type == "eps"
    assert DiffusionConfig(prediction_type="v_prediction").prediction_type == "v"
    cfg = DiffusionConfig.from_diffusers(
        DDIMScheduler(beta_schedule="scaled_linear", prediction_type="sample", timestep_spacing="trailing").config
    )
    assert (cfg.prediction_type, cfg.timestep_spacing, cfg.beta_schedule) == ("x0", "trailing", "scaled_linear")
    with pytest.raises(UserError):
        _schedule().make_scheduler("heun")


def test_posterior_matches_ddpm_and_ddim_forms():
    sched = _schedule(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    t, t_prev = torch.tensor([500, 37]), torch.tensor([400, 0])
    x_t, truth = _truth(sched, t)
    # η = 1: DDPM's closed form (x0 only) equals the DDIM form with ε.
    m1, v1 = sched.posterior_mean_variance(truth["x0"], x_t, t, t_prev, eta=1.0)
    m2, v2 = sched.posterior_mean_variance(truth["x0"], x_t, t, t_prev, eta=1.0, eps=truth["eps"])
    torch.testing.assert_close(m1, m2, rtol=0, atol=1e-12)
    torch.testing.assert_close(v1, v2)
    # variance = β̃ = (1-ᾱ')/(1-ᾱ)·(1-ᾱ/ᾱ'); for one step it is diffusers' DDPM "fixed_small".
    ref = DDPMScheduler(beta_schedule="linear")
    _, v_one = sched.posterior_mean_variance(truth["x0"], x_t, t, t - 1)
    for i, ti in enumerate(t.tolist()):
        assert v_one[i].item() == pytest.approx(ref._get_variance(ti).item(), rel=1e-4)
    # to "clean" (t_prev < 0): mean = x0, variance 0.
    m, v = sched.posterior_mean_variance(truth["x0"], x_t, t, torch.tensor([-1, -1]))
    torch.testing.assert_close(m, truth["x0"])
    assert (v == 0).all()
    # η = 0 and exact (x0, ε): the deterministic DDIM step lands on the forward marginal.
    m0, v0 = sched.posterior_mean_variance(truth["x0"], x_t, t, t_prev, eta=0.0)
    torch.testing.assert_close(m0, sched.add_noise(truth["x0"], truth["eps"], t_prev), rtol=0, atol=1e-12)
    assert (v0 == 0).all()
