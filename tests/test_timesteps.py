"""ADDP §3.1 timestep strategies and contribution factors: the authors' tables, the diffusion
formulation, specs, seeded draws, the multinomial histogram and the loss-scaling weights (how the
objectives apply them: test_loss_weights.py)."""

import json

import numpy as np
import pytest
import torch

from genperc.config import TrainConfig
from genperc.diffusion.schedule import DiffusionConfig, NoiseSchedule
from genperc.diffusion.timesteps import (
    AUTHOR_TABLES,
    LossScalingTimesteps,
    ProbScalingTimesteps,
    UniformTimesteps,
    bin_edges,
    bins_to_timesteps,
    build_timestep_sampler,
    create_timestep_sampler,
    describe,
    diffusion_contributions,
    load_contributions,
    timestep_bins,
    timesteps_to_bins,
)
from genperc.errors import UserError


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule(DiffusionConfig())


def test_author_tables_map_to_bins_with_bin0_least_noise():
    c = load_contributions("addp-referring", 1000)
    assert c.shape == (1000,) and torch.isclose(c.sum(), torch.tensor(1.0, dtype=torch.float64))
    table = torch.tensor(AUTHOR_TABLES["addp-referring"], dtype=torch.float64)
    assert torch.allclose(timesteps_to_bins(c, 10), table / table.sum())
    assert torch.allclose(c[900:], c[950].expand(100))  # uniform inside a bin
    assert float(c[900:].sum()) == pytest.approx(95 / 108)  # 88% of draws from t >= 900
    assert torch.equal(timestep_bins(torch.tensor([0, 99, 100, 999]), 10, 1000), torch.tensor([0, 0, 1, 9]))


def test_uneven_bins_keep_each_bins_mass():
    assert bin_edges(3, 10) == [0, 3, 7, 10]
    c = bins_to_timesteps([1, 1, 2], 10)
    assert torch.allclose(timesteps_to_bins(c, 3), torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64))
    by_hand = [0.25 / 3] * 3 + [0.25 / 4] * 4 + [0.5 / 3] * 3  # bins [0, 3), [3, 7), [7, 10)
    assert c.tolist() == pytest.approx(by_hand, rel=1e-12)
    with pytest.raises(UserError):
        bins_to_timesteps([1] * 11, 10)


def test_diffusion_contributions_follow_inverse_snr(schedule):
    # ᾱ of the default (Stable Diffusion "scaled_linear") schedule, written out in numpy
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    ab = np.cumprod(1 - betas)
    ratio = (1 - ab) / ab
    c = diffusion_contributions(schedule)
    np.testing.assert_allclose(c.numpy(), ratio / ratio.sum(), rtol=1e-4)  # diffusers' betas are float32
    per_bin = diffusion_contributions(schedule, bins=10)
    np.testing.assert_allclose(per_bin.numpy(), (ratio / ratio.sum()).reshape(10, 100).sum(1), rtol=1e-5)


def test_zero_terminal_snr_is_clamped_not_infinite():
    with pytest.warns(UserWarning):
        NoiseSchedule(DiffusionConfig(zero_terminal_snr=True))  # eps warns; v below does not
    s = NoiseSchedule(DiffusionConfig(zero_terminal_snr=True, prediction_type="v"))
    assert float(s.alphas_cumprod[-1]) == 0.0
    c = diffusion_contributions(s)
    assert torch.isfinite(c).all() and float(c.sum()) == pytest.approx(1.0)
    assert c[-1] == c[-2]  # ᾱ = 0 clamped to the smallest positive ᾱ
    c2 = diffusion_contributions(s, min_alpha_bar=4.7e-3)
    assert float(c2[-1]) < float(c[-1])


def test_load_contributions_specs(tmp_path, schedule):
    lit = load_contributions("[1, 3]", 1000)
    assert torch.allclose(timesteps_to_bins(lit, 2), torch.tensor([0.25, 0.75], dtype=torch.float64))
    assert torch.equal(load_contributions([1, 3], schedule), lit)
    assert torch.equal(load_contributions("diffusion", schedule), diffusion_contributions(schedule))
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"bins": 2, "factors": [0.25, 0.75]}))
    assert torch.allclose(load_contributions(str(f), schedule), lit)
    for bad in ("nope", "[1, -1]", "[0, 0]", "[1, 2", "{}", "[]", str(tmp_path / "missing.json"), "", "[1, \"a\"]"):
        with pytest.raises(UserError):
            load_contributions(bad, schedule)
    (tmp_path / "bad.json").write_text(json.dumps({"bins": 2}))
    with pytest.raises(UserError, match="factors"):
        load_contributions(str(tmp_path / "bad.json"), schedule)
    with pytest.raises(UserError):
        load_contributions("diffusion", 1000)  # needs the schedule


@pytest.mark.parametrize("name", ["uniform", "loss-scaling", "prob-scaling"])
def test_draws_are_seeded(name):
    s = create_timestep_sampler(name, 1000, contributions=AUTHOR_TABLES["addp-depth"])
    a = s.sample(64, torch.Generator().manual_seed(3))
    b = s.sample(64, torch.Generator().manual_seed(3))
    c = s.sample(64, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    assert a[0].dtype == torch.long and a[0].shape == (64,) and int(a[0].min()) >= 0 and int(a[0].max()) < 1000
    if a[1] is not None:
        assert torch.equal(a[1], b[1])


def test_prob_scaling_histogram_matches_c2():
    s = create_timestep_sampler("prob-scaling", 1000, contributions=load_contributions("addp-depth", 1000))
    n = 20000
    t, w = s.sample(n, torch.Generator().manual_seed(0))
    assert w is None
    counts = torch.bincount(timestep_bins(t, 10, 1000), minlength=10).double()
    table = torch.tensor(AUTHOR_TABLES["addp-depth"], dtype=torch.float64)
    expected = n * table / table.sum()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 27.9  # 9 degrees of freedom, p = 0.001
    assert torch.allclose(s.probabilities(), load_contributions("addp-depth", 1000))


def test_prob_scaling_never_draws_zero_weight_timesteps():
    s = create_timestep_sampler("prob-scaling", 10, contributions=[0, 1])
    t, _ = s.sample(500, torch.Generator().manual_seed(1))
    assert int(t.min()) >= 5


def test_loss_scaling_weights_are_T_c2_with_mean_one():
    s = create_timestep_sampler("loss-scaling", 1000, contributions=load_contributions("addp-referring", 1000))
    t, w = s.sample(50000, torch.Generator().manual_seed(0))
    # bin b = t // 100 holds factor_b / 108 spread over 100 timesteps: w = 1000 · factor_b / 108 / 100
    table = torch.tensor([1, 1, 1, 1, 1, 1, 1, 2, 4, 95], dtype=torch.float64)
    assert torch.allclose(w.double(), 10 * table[t // 100] / 108, rtol=1e-6)
    assert float(w.mean()) == pytest.approx(1.0, abs=0.05)
    counts = torch.bincount(timestep_bins(t, 10, 1000), minlength=10).double()
    assert float(counts.min()) > 4000  # t stays uniform


def test_build_timestep_sampler_from_train_config(schedule):
    assert isinstance(build_timestep_sampler(TrainConfig(), schedule), UniformTimesteps)
    s = build_timestep_sampler(TrainConfig(timesteps="prob-scaling", contributions="addp-referring"), schedule)
    assert isinstance(s, ProbScalingTimesteps) and "88.0" in describe(s)
    s = build_timestep_sampler(TrainConfig(timesteps="loss-scaling"), schedule)  # default: diffusion c²
    assert isinstance(s, LossScalingTimesteps) and torch.allclose(s.contributions, diffusion_contributions(schedule))
    with pytest.raises(UserError, match="train.timesteps='importance' is not valid"):  # refused by the config itself
        TrainConfig(timesteps="importance")
    with pytest.raises(UserError):
        build_timestep_sampler(TrainConfig(timesteps="prob-scaling", contributions="addp-nothing"), schedule)
    with pytest.raises(UserError):
        create_timestep_sampler("prob-scaling", 1000)  # no factors
