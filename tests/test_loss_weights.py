"""The one denoising loss of both diffusion objectives: ADDP §3.1 loss-scaling weights used as given
(normalised by E[w] = 1, not by the batch mean) and the task's loss mask (Marigold's valid pixels).

The expected gradient a timestep bin receives is computed exactly, by enumerating every batch of
timesteps with its multinomial probability, and compared with c_t² written by hand: the paper's
c_t²-weighted loss Σ_t c_t²·L_t gives bin b the gradient share c_b² at every batch size.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from genperc.diffusion.conditioning import Conditioning
from genperc.diffusion.schedule import DiffusionConfig, NoiseSchedule
from genperc.diffusion.timesteps import LossScalingTimesteps
from genperc.errors import UserError
from genperc.training.objectives import DiffusionObjective, HybridDiffusionObjective, StepContext

# Three timesteps, one per bin, with factors (1, 2, 5): c² = (1/8, 2/8, 5/8) and w = T·c² = 3·c².
T = 3
C2 = (1 / 8, 2 / 8, 5 / 8)
W = (3 / 8, 6 / 8, 15 / 8)
SAMPLER = LossScalingTimesteps(T, [1, 2, 5])
SCHEDULE = NoiseSchedule(DiffusionConfig(num_train_timesteps=T, prediction_type="x0"))
OBJECTIVES = [(DiffusionObjective(), "diffusion"), (HybridDiffusionObjective(0.001), "simple")]


def _context(output, x0, t, weights=None, batch=None) -> StepContext:
    return StepContext(output=output, x0=x0, x_t=x0, noise=x0, t=t, weights=weights, schedule=SCHEDULE,
                       cond=Conditioning(), model=None, batch=batch)


def _per_sample_gradient(objective, key, t: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """∂(scale·L)/∂L_i for each sample: the output is x0 + s_i, so L_i = s_i² and ∂L_i/∂s_i = 2 at s = 1."""
    s = torch.ones(len(t), requires_grad=True)
    x0 = torch.zeros(len(t), 2, 2, 2)
    output = x0 + s.view(-1, 1, 1, 1)
    loss = objective(_context(output, x0, t, SAMPLER.loss_weights(t)))[key] * scale
    (grad,) = torch.autograd.grad(loss, s)
    return grad / 2


def _batches(batch_size: int):
    """Every multiset of ``batch_size`` timesteps in {0, 1, 2} with its probability under t ~ U."""
    for n0 in range(batch_size + 1):
        for n1 in range(batch_size + 1 - n0):
            n2 = batch_size - n0 - n1
            ways = math.factorial(batch_size) // (math.factorial(n0) * math.factorial(n1) * math.factorial(n2))
            yield torch.tensor([0] * n0 + [1] * n1 + [2] * n2), ways / T**batch_size


def _expected_bin_gradient(objective, key, batch_size: int) -> list[float]:
    """E[Σ_{i: t_i = b} ∂L/∂L_i] for each bin b, exactly."""
    expected = [0.0] * T
    for t, p in _batches(batch_size):
        grad = _per_sample_gradient(objective, key, t)
        for b in range(T):
            expected[b] += p * float(grad[t == b].sum())
    return expected


def test_loss_weights_are_T_times_c2():
    assert SAMPLER.loss_weights(torch.tensor([0, 1, 2])).tolist() == pytest.approx(W, rel=1e-6)


@pytest.mark.parametrize(("objective", "key"), OBJECTIVES)
def test_each_bin_gets_its_c2_share_at_batch_1(objective, key):
    # the old w_i / mean(w) made every batch of one uniform: 1/3 per bin
    assert _expected_bin_gradient(objective, key, 1) == pytest.approx(C2, abs=1e-6)


@pytest.mark.parametrize(("objective", "key"), OBJECTIVES)
def test_each_bin_gets_its_c2_share_at_batch_16(objective, key):
    # the old w_i / mean(w) gave the noisiest bin 0.606 instead of 5/8 (and 0.134, 0.261 to the others)
    assert _expected_bin_gradient(objective, key, 16) == pytest.approx(C2, abs=1e-6)


def test_accumulated_micro_batches_give_the_gradient_of_one_batch():
    """k micro-batches of b, each backpropagated with scale 1/k as the trainer does, give the gradient of
    one batch of k·b for every draw — hence also in expectation, which is c² (k = 2, b = 2, all 3⁴ draws)."""
    objective, k, b = DiffusionObjective(), 2, 2
    expected = [0.0] * T
    for draw in range(T ** (k * b)):
        t = torch.tensor([(draw // T**i) % T for i in range(k * b)])
        accumulated = torch.cat([_per_sample_gradient(objective, "diffusion", micro, 1 / k) for micro in t.split(b)])
        torch.testing.assert_close(accumulated, _per_sample_gradient(objective, "diffusion", t))
        for bin_ in range(T):
            expected[bin_] += float(accumulated[t == bin_].sum()) / T ** (k * b)
    assert expected == pytest.approx(C2, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# the loss mask


def _masked_loss(objective, key, output, x0, mask, weights=None) -> torch.Tensor:
    t = torch.zeros(len(x0), dtype=torch.long)
    return objective(_context(output, x0, t, weights, SimpleNamespace(loss_mask=mask)))[key]


@pytest.mark.parametrize(("objective", "key"), OBJECTIVES)
def test_masked_loss_averages_over_valid_pixels_by_hand(objective, key):
    err = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [2.0, 0.0]]],
                        [[[5.0, 5.0], [5.0, 5.0]], [[5.0, 5.0], [5.0, 5.0]]]])
    mask = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    x0 = torch.zeros_like(err)
    output = err.clone().requires_grad_(True)
    # sample 0: valid (0,0), (1,0) → (1² + 3² + 0² + 2²) / (2 channels · 2 pixels) = 3.5; sample 1: nothing valid → 0
    loss = _masked_loss(objective, key, output, x0, mask)
    assert float(loss.detach()) == pytest.approx((3.5 + 0.0) / 2)
    (grad,) = torch.autograd.grad(loss, output)
    assert torch.isfinite(grad).all() and not grad[1].any() and not grad[0, :, :, 1].any()
    weighted = _masked_loss(objective, key, err, x0, mask.bool(), weights=torch.tensor([2.0, 0.5]))
    assert float(weighted) == pytest.approx((2.0 * 3.5 + 0.5 * 0.0) / 2)


@pytest.mark.parametrize(("objective", "key"), OBJECTIVES)
def test_masked_loss_min_pools_the_mask_to_a_latent_sized_prediction(objective, key):
    # an 8×8 pixel mask over a 2×2 prediction: each cell covers 4×4 pixels and counts only if all are valid
    mask = torch.ones(1, 1, 8, 8)
    mask[0, 0, 1, 2] = 0  # one invalid pixel in cell (0, 0)
    mask[0, 0, 5, 5] = 0  # and one in cell (1, 1)
    err = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    # valid cells (0, 1) and (1, 0): (2² + 3²) / 2 = 6.5 (nearest resizing would keep all four: 7.5)
    assert float(_masked_loss(objective, key, err, torch.zeros_like(err), mask)) == pytest.approx(6.5)


def test_an_all_valid_mask_changes_nothing():
    g = torch.Generator().manual_seed(0)
    out, x0 = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    t = torch.zeros(3, dtype=torch.long)
    plain = DiffusionObjective()(_context(out, x0, t))["diffusion"]
    masked = _masked_loss(DiffusionObjective(), "diffusion", out, x0, torch.ones(3, 1, 16, 16))
    assert float(masked) == pytest.approx(float((out - x0).pow(2).mean()), rel=1e-6)
    assert float(plain) == pytest.approx(float(masked), rel=1e-6)


def test_the_output_is_the_prediction_or_the_prediction_and_the_variance():
    x0 = torch.zeros(2, 3, 2, 2)
    t = torch.zeros(2, dtype=torch.long)
    prediction, variance = torch.ones(2, 3, 2, 2), torch.full((2, 3, 2, 2), 7.0)
    with_variance = DiffusionObjective()(_context(torch.cat([prediction, variance], 1), x0, t))["diffusion"]
    assert float(with_variance) == pytest.approx(1.0)  # the second half never enters the squared error
    with pytest.raises(UserError, match="9 channels"):
        DiffusionObjective()(_context(torch.ones(2, 9, 2, 2), x0, t))
