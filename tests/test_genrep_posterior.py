"""The Monte-Carlo generative posterior (GenRep Eq. 1–3): states kept, log-sum-exp, shared noise, Bayes."""

import math

import pytest
import torch

from genperc.diffusion.conditioning import Conditioning
from genperc.diffusion.schedule import DiffusionConfig, NoiseSchedule
from genperc.errors import UserError
from genperc.training.posterior import (
    PosteriorCache,
    PosteriorConfig,
    chain_log_densities,
    fit_temperature,
    gaussian_log_density,
    generative_posterior,
    kept_states,
    posterior_from_log_densities,
)

SCHED = NoiseSchedule(DiffusionConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, learned_variance=True,
                                      prediction_type="eps"))


def algorithm_1_kept(steps, m, k):
    """Algorithm 1 lines 16–19 as printed (reading its "T mod k" as t mod k): the chain runs
    t = T, T − 1, …, 1 and appends the state of step t when t < T − m and t mod k = 0; the state
    of step t is the (T − t)-th of the run (0 = the first)."""
    return [steps - t for t in range(steps, 0, -1) if t < steps - m and t % k == 0]


def test_kept_states_follow_algorithm_1_line_18():
    assert kept_states(10, 2, 2, "end").tolist() == algorithm_1_kept(10, 2, 2) == [4, 6, 8]
    assert kept_states(9, 2, 2, "end").tolist() == [3, 5, 7]  # the last state (t = 1) is not kept for k = 2
    assert kept_states(6, 0, 1).tolist() == [1, 2, 3, 4, 5]  # t < T − 0 drops the first state (t = T)
    assert kept_states(200, 50, 2).numel() == 74  # the paper's chain: t = 2, 4, …, 148
    for steps, m, k in ((40, 10, 2), (50, 12, 3), (7, 1, 2), (12, 0, 5)):
        assert kept_states(steps, m, k).tolist() == algorithm_1_kept(steps, m, k)
    with pytest.raises(UserError, match="leave no state"):
        kept_states(4, 3, 1)


def test_kept_states_start_anchor_keeps_every_kth_after_the_burn_in():
    assert kept_states(9, 2, 2, "start").tolist() == [2, 4, 6, 8]
    assert kept_states(6, 0, 1, "start").tolist() == list(range(6))


def test_gaussian_log_density_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    x, mu = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    lv = torch.randn(3, 2, 4, 4, generator=g) * 0.3
    ref = torch.distributions.Normal(mu, (0.5 * lv).exp()).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(gaussian_log_density(x, mu, lv), ref, atol=1e-4)


def test_mixture_is_log_mean_exp_and_bayes_uniform_prior():
    ld = torch.tensor([[[-1000.0, -1001.0, -5000.0], [-1003.0, -1002.0, -1004.0]]], dtype=torch.float64)
    kept = torch.tensor([0, 1])
    log_lik, log_post = posterior_from_log_densities(ld, kept)
    direct = [math.log((math.exp(0) + math.exp(-1)) / 2) - 1000, math.log((math.exp(-1) + math.exp(0)) / 2) - 1002]
    assert torch.allclose(log_lik[0], torch.tensor(direct, dtype=torch.float64))
    p = log_post.exp()[0]
    assert float(p.sum()) == pytest.approx(1.0)
    assert float(p[0]) == pytest.approx(1 / (1 + math.exp(-2)))
    # the temperature softens: τ → ∞ gives the uniform prior back
    _, soft = posterior_from_log_densities(ld, kept, temperature=1e9)
    assert torch.allclose(soft.exp(), torch.full((1, 2), 0.5, dtype=torch.float64))


class ClassBlind:
    """ε-prediction that ignores the class, with a learned-variance channel."""

    def __call__(self, x, t, cond):
        return torch.cat([0.3 * x, torch.zeros_like(x)], 1)


class ClassPulls:
    """x̂0 = class-specific constant image: ε-prediction consistent with that x̂0."""

    def __init__(self, levels):
        self.levels = torch.tensor(levels)

    def __call__(self, x, t, cond):
        x0 = self.levels[cond.class_labels].view(-1, 1, 1, 1).expand_as(x).to(x.dtype)
        eps = SCHED.convert(x0, "x0", "eps", x, t)
        return torch.cat([eps, torch.zeros_like(x)], 1)


def test_shared_noise_makes_class_blind_chains_identical():
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    ld, ts = chain_log_densities(ClassBlind(), x, [0, 1, 2], schedule=SCHED, steps=8,
                                 generator=torch.Generator().manual_seed(2))
    assert ld.shape == (3, 3, 8) and ts.tolist()[-1] == 0 and torch.isfinite(ld).all()
    assert torch.equal(ld[:, 0], ld[:, 1]) and torch.equal(ld[:, 0], ld[:, 2])
    res = generative_posterior(ClassBlind(), x, [0, 1, 2], schedule=SCHED, steps=8, burn_in=2, thinning=2,
                               generator=torch.Generator().manual_seed(2))
    assert torch.allclose(res.posterior, torch.full((3, 3), 1 / 3, dtype=res.posterior.dtype))


def test_the_right_class_wins_and_batching_does_not_matter():
    x = torch.full((2, 1, 4, 4), 0.8)
    x[1] = -0.8
    model = ClassPulls([-0.8, 0.0, 0.8])
    kw = dict(schedule=SCHED, steps=10, burn_in=3, thinning=2, temperature=1.0)
    res = generative_posterior(model, x, [0, 1, 2], generator=torch.Generator().manual_seed(3), **kw)
    assert res.log_posterior.argmax(-1).tolist() == [2, 0]
    small = generative_posterior(model, x, [0, 1, 2], generator=torch.Generator().manual_seed(3), batch_size=3, **kw)
    assert torch.allclose(small.log_densities, res.log_densities)


def test_fit_temperature_and_cache_roundtrip(tmp_path):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (64,), generator=g)
    ld = torch.randn(64, 4, 6, generator=g, dtype=torch.float64) * 300
    ld[torch.arange(64), labels] += 400  # informative but noisy, on a scale of hundreds of nats
    kept = torch.arange(6)
    tau = fit_temperature(ld, labels, kept)
    assert 1 < tau < 1e5
    cache = PosteriorCache(10, 4, 6)
    cache.put(torch.tensor([1, 3]), ld[:2], step=5, timesteps=torch.arange(6))
    cache.save(tmp_path / "c.safetensors")
    c2 = PosteriorCache.load(tmp_path / "c.safetensors")
    hit, got = c2.lookup(torch.tensor([3, 2, 1]))
    assert hit.tolist() == [True, False, True] and torch.equal(got[0], ld[1])
    hit, _ = c2.lookup(torch.tensor([1]), step=20, max_age=10)
    assert hit.tolist() == [False]


def test_config_checks():
    with pytest.raises(UserError, match="thinning_anchor"):
        PosteriorConfig(thinning_anchor="middle")
    with pytest.raises(UserError, match="fraction"):
        PosteriorConfig(fraction=0)


def test_provider_computes_a_fraction_on_the_fly_and_caches_it():
    from genperc.training.genrep import PosteriorProvider

    cfg = PosteriorConfig(steps=6, burn_in=1, thinning=1, fraction=0.5, teacher="current", cache=True,
                          refresh_epochs=1.0)
    cache = PosteriorCache(8, 3, 6)
    step = [0]
    prov = PosteriorProvider(cfg, SCHED, 3, cache=cache, teacher=ClassPulls([-0.8, 0.0, 0.8]),
                             generator=torch.Generator().manual_seed(0), step_fn=lambda: step[0], epoch_steps=4)
    x = torch.full((4, 1, 4, 4), 0.8)
    log_p, hit = prov(torch.tensor([0, 1, 2, 3]), x)
    assert int(hit.sum()) == 2 and prov.computed_rows == 2 and len(cache) == 2
    assert torch.allclose(log_p[hit].exp().sum(-1), torch.ones(2)) and (log_p[hit].argmax(-1) == 2).all()
    _, hit2 = prov(torch.tensor([0, 1, 2, 3]), x)  # the cached two plus two new ones
    assert bool(hit2.all()) and prov.computed_rows == 4
    step[0] = 10  # older than refresh_epochs (4 steps): recomputed, half of them
    _, hit3 = prov(torch.tensor([0, 1, 2, 3]), x)
    assert int(hit3.sum()) == 2 and prov.computed_rows == 6


def test_noised_density_uses_the_samplers_previous_timestep_under_trailing_spacing():
    """density=noised evaluates √ᾱ·x + √(1−ᾱ)·x_T at the noise level of the state each step makes:
    the next timestep of the chain. With trailing spacing and T/S not whole (1000/6), that is not
    t − T//S (999 → 832, not 833)."""
    from diffusers import DDPMScheduler

    from genperc.diffusion.sampler import sample

    sched = NoiseSchedule(DiffusionConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                          learned_variance=True, prediction_type="eps", timestep_spacing="trailing"))
    steps = 6
    reference = DDPMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    reference.set_timesteps(steps)
    listed = reference.timesteps.tolist()
    assert listed[:2] == [999, 832] and listed[0] - 1000 // steps != listed[1]
    x = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(4)) * 2 - 1
    ld, ts = chain_log_densities(ClassBlind(), x, [0], schedule=sched, steps=steps,
                                 generator=torch.Generator().manual_seed(5), density="noised")
    assert ts.tolist() == listed
    # the chain by hand: x_T from the image's seed (shared-noise protocol), the sampler's means / variances
    seed = torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(5))
    row = torch.Generator().manual_seed(int(seed))
    x_T = torch.randn(x.shape[1:], generator=row)[None]
    means, variances = [], []
    sample(ClassBlind(), x_T, Conditioning(class_labels=torch.tensor([0])), schedule=sched, sampler="ddpm",
           num_steps=steps, generator=[row], callback=lambda s: (means.append(s.mean), variances.append(s.variance)))
    ab = sched.alphas_cumprod
    for i, t_next in enumerate(listed[1:]):  # every step but the last (to x_0, decoder variance)
        target = ab[t_next].sqrt() * x + (1 - ab[t_next]).sqrt() * x_T
        std = variances[i].double().sqrt()
        expected = torch.distributions.Normal(means[i].double(), std).log_prob(target.double()).sum()
        assert float(ld[0, 0, i]) == pytest.approx(float(expected), rel=1e-6), (i, t_next)


def test_the_default_teacher_is_algorithm_1s_model_being_trained():
    cfg = PosteriorConfig()
    assert cfg.teacher == "current" and not cfg.cache  # recomputed every step, not cached once
