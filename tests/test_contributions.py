"""ADDP §3.1 c_t² from perception statistics on synthetic N×S matrices whose answer is known."""

import json

import numpy as np
import pytest
import torch

from genperc.diffusion.timesteps import load_contributions
from genperc.errors import UserError
from genperc.evaluation.contributions import perception_contributions, plot_contributions, write_contributions

N = 400
TS = [950, 850, 750, 650, 550, 450, 350, 250, 150, 50]  # one step per bin, denoising order


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _noise(g, n=N):
    return torch.randn(n, generator=g, dtype=torch.float64)


def _check(res):
    assert torch.isfinite(res.factors).all() and (res.factors >= 0).all()
    assert float(res.factors.sum()) == pytest.approx(1.0)
    assert (res.increments >= 0).all()
    assert (res.r2[:-1] >= res.r2[1:] - 1e-12).all()  # cumulative R² grows as bins join (n−1 → 0)


def test_first_step_explains_everything():
    g = _g()
    first = _noise(g)
    M = torch.stack([first + 0.01 * _noise(g) for _ in range(9)] + [2 * first + 0.05 * _noise(g)], 1)
    res = perception_contributions(M, TS, floor=0)
    _check(res)
    assert float(res.factors[9]) > 0.97 and res.explained > 0.99
    assert float(res.r2[9]) == pytest.approx(float(res.increments[9]))  # (R²)_T = c_T²


def test_mass_lands_where_the_metric_becomes_informative():
    g = _g(1)
    z = _noise(g)
    cols = [_noise(g) for _ in range(4)] + [z + 0.02 * _noise(g) for _ in range(5)] + [z]
    res = perception_contributions(torch.stack(cols, 1), TS, floor=0)
    _check(res)
    assert int(res.factors.argmax()) == 5  # column 4 has t = 550 → bin 5
    assert float(res.factors[5]) > 0.95


def test_two_independent_halves_split_the_mass():
    g = _g(2)
    a, b = _noise(g), _noise(g)
    a, b = a - a.mean(), b - b.mean()
    b = b - (b @ a) / (a @ a) * a  # orthogonal to a, same norm: each explains exactly half of a + b
    b = b * a.norm() / b.norm()
    cols = [torch.zeros(N, dtype=torch.float64)] * 2 + [a] * 4 + [a + b] * 3 + [a + b]
    res = perception_contributions(torch.stack(cols, 1), TS, floor=0)
    _check(res)
    # a joins at column 2 (t = 750, bin 7), b at column 6 (t = 350, bin 3); each explains half
    assert float(res.factors[7]) == pytest.approx(0.5, abs=1e-9)
    assert float(res.factors[3]) == pytest.approx(0.5, abs=1e-9)
    assert float(res.r2[7]) == pytest.approx(float(res.factors[7]) * res.explained, abs=1e-9)
    assert res.columns_per_bin == [0] + [1] * 9  # the final step (bin 0) is the response only


def test_constant_columns_add_nothing():
    g = _g(3)
    y = _noise(g)
    M = torch.stack([torch.zeros(N, dtype=torch.float64)] * 5 + [torch.full((N,), 0.3, dtype=torch.float64)]
                    + [y + 0.1 * _noise(g) for _ in range(3)] + [y], 1)
    res = perception_contributions(M, TS, floor=0)
    _check(res)
    assert float(res.increments[4:].abs().max()) == 0.0  # bins 9 … 4 are the constant columns


def test_fewer_samples_than_regressors_stays_finite():
    g = _g(4)
    M = torch.rand(3, 10, generator=g, dtype=torch.float64)
    res = perception_contributions(M, TS)
    _check(res)
    assert res.explained == pytest.approx(1.0) and any("over-fitting" in n for n in res.notes)
    adj = perception_contributions(M, TS, adjusted=True)
    _check(adj)
    fifty = perception_contributions(torch.rand(3, 50, generator=g, dtype=torch.float64), within_bin="all")
    _check(fifty)


def test_floor_keeps_every_bin_and_residual_mode():
    g = _g(5)
    first = _noise(g)
    M = torch.stack([first] * 9 + [first + 0.5 * _noise(g)], 1)
    res = perception_contributions(M, TS)  # floor 1%
    assert float(res.factors.min()) == pytest.approx(float(res.factors[:9].min()))
    assert float(res.factors.min()) == pytest.approx(0.01) and float(res.factors[9]) == pytest.approx(0.91)
    resid = perception_contributions(M, TS, final="residual", floor=0)
    assert float(resid.factors[0]) == pytest.approx(1 - res.explained, abs=1e-9)  # 1 − (R²)_1 on the final bin
    with pytest.raises(UserError):
        perception_contributions(M, TS, floor=0.2)


def test_column_order_and_binning_options():
    g = _g(6)
    z = _noise(g)
    steps = 50  # 5 columns per bin
    ts = [int((steps - j - 0.5) * 1000 / steps) for j in range(steps)]
    cols = [_noise(g) if j < 20 else z + 0.05 * _noise(g) for j in range(steps - 1)] + [z]
    M = torch.stack(cols, 1)
    base = perception_contributions(M, ts, floor=0)
    rev = perception_contributions(M.flip(1), ts[::-1], floor=0)  # columns in any order, sorted by t
    assert torch.allclose(base.factors, rev.factors)
    assert int(base.factors.argmax()) == 5 and base.columns_per_bin[0] == 4
    for mode in ("last", "all"):
        r = perception_contributions(M, ts, within_bin=mode, floor=0)
        _check(r)
        assert int(r.factors.argmax()) == 5
    default_ts = perception_contributions(M)  # evenly spread steps when no timesteps are given
    assert default_ts.timesteps == ts


def test_user_errors_and_dropped_rows():
    g = _g(7)
    M = torch.rand(20, 10, generator=g, dtype=torch.float64)
    M[3, 4] = float("nan")
    res = perception_contributions(M, TS)
    assert res.n_samples == 19 and res.dropped_samples == 1
    const = M.clone()
    const[:, -1] = 1.0
    with pytest.raises(UserError, match="nothing to explain"):
        perception_contributions(const, TS)
    with pytest.raises(UserError):
        perception_contributions(M[:2], TS)
    with pytest.raises(UserError):
        perception_contributions(M, TS[:5])
    with pytest.raises(UserError):
        perception_contributions(M, [t + 1000 for t in TS])
    with pytest.raises(UserError):
        perception_contributions(M, TS, within_bin="median")


def test_c_json_round_trip_and_plot(tmp_path):
    g = _g(8)
    z = _noise(g, 60)
    M = torch.stack([_noise(g, 60) for _ in range(3)] + [z + 0.1 * _noise(g, 60) for _ in range(6)] + [z], 1)
    res = perception_contributions(M, TS)
    path = write_contributions(res, tmp_path / "c.json", source="synthetic", metric="IoU")
    data = json.loads(path.read_text())
    assert data["bins"] == 10 and len(data["factors"]) == 10 and data["metric"] == "IoU" and len(data["r2"]) == 10
    c = load_contributions(str(path), 1000)
    assert torch.allclose(c, res.per_timestep(), atol=1e-8)
    png = plot_contributions(res, tmp_path / "c.png", compare={"addp-referring": [1, 1, 1, 1, 1, 1, 1, 2, 4, 95]})
    assert png.stat().st_size > 1000


# ---------------------------------------------------------------------------------------------
# against numpy.linalg.lstsq: the cumulative multiple regression written from its definition


def _lstsq_r2(X: np.ndarray, y: np.ndarray) -> float:
    """R² of the least-squares fit of y on [1, X] (with intercept): 1 − SS_res / SS_tot."""
    A = np.column_stack([np.ones(len(y)), X]) if X.size else np.ones((len(y), 1))
    beta = np.linalg.lstsq(A, y, rcond=None)[0]
    residual = y - A @ beta
    return 1.0 - float(residual @ residual) / float(((y - y.mean()) ** 2).sum())


def _correlated_steps(n: int, steps: int, rho: float, seed: int) -> np.ndarray:
    """Per-step metrics of n samples as an AR(1) chain over denoising steps, m_j = ρ·m_{j−1} + e_j,
    plus per-step measurement noise: neighbouring steps are strongly correlated, every step adds
    a little information about the final one."""
    rng = np.random.default_rng(seed)
    chain = [rng.standard_normal(n)]
    for _ in range(steps - 1):
        chain.append(rho * chain[-1] + np.sqrt(1 - rho ** 2) * rng.standard_normal(n))
    return np.stack([c + 0.3 * rng.standard_normal(n) for c in chain[:-1]] + [chain[-1]], 1)


@pytest.mark.parametrize("rho, seed", [(0.9, 0), (0.6, 1), (0.97, 2)])
def test_cumulative_r2_matches_numpy_lstsq_on_correlated_steps(rho, seed):
    metrics = _correlated_steps(300, 10, rho, seed)
    res = perception_contributions(torch.from_numpy(metrics), TS, floor=0)
    y = metrics[:, -1]
    # bins 9 (t = 950, the first step) … 1 join one at a time; the final column (bin 0) is the response
    expected = {}
    for b in range(9, 0, -1):
        expected[b] = _lstsq_r2(metrics[:, : 10 - b], y)
    for b in range(9, 0, -1):
        assert float(res.r2[b]) == pytest.approx(expected[b], abs=1e-9)
    assert float(res.r2[0]) == pytest.approx(expected[1], abs=1e-9)  # bin 0 adds no regressor
    # c_t² = R²_t − R²_{t+1} (c_T² = R²_T), non-negative, normalised by the full R²
    increments = [expected[9]] + [expected[b] - expected[b + 1] for b in range(8, 0, -1)]
    assert all(v >= -1e-12 for v in increments)
    assert torch.allclose(res.increments[1:].flip(0), torch.tensor(increments, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(res.factors[1:].flip(0), torch.tensor(increments, dtype=torch.float64) / expected[1],
                          atol=1e-9)
    assert res.explained == pytest.approx(expected[1], abs=1e-9)


def test_bin_means_match_numpy_lstsq_with_several_steps_per_bin():
    metrics = _correlated_steps(200, 20, 0.85, 3)  # two steps per bin
    ts = [975 - 50 * j for j in range(20)]
    res = perception_contributions(torch.from_numpy(metrics), ts, floor=0, within_bin="mean")
    y = metrics[:, -1]
    regressors = []
    for b in range(9, -1, -1):
        cols = [j for j in range(19) if ts[j] // 100 == b]  # the final column is the response only
        regressors.append(metrics[:, cols].mean(1))
        assert float(res.r2[b]) == pytest.approx(_lstsq_r2(np.stack(regressors, 1), y), abs=1e-9)
    everything = perception_contributions(torch.from_numpy(metrics), ts, floor=0, within_bin="all")
    assert everything.explained == pytest.approx(_lstsq_r2(metrics[:, :19], y), abs=1e-9)
