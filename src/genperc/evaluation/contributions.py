"""Contribution factors c_t² from perception statistics (ADDP §3.1, "Deriving c_t² from Perception
Statistics") — how much of the final prediction's quality each denoising step already explains.

Input: an N×S matrix of a per-sample metric (IoU, δ1, …) of N validation samples at S denoising
steps, **columns in denoising order** (column 0 = the first, noisiest step, t ≈ T; column S−1 = the
final step, t ≈ 0), with the timestep of each column — what ``genperc analyze trajectory`` writes
(:mod:`genperc.evaluation.trajectory`).

**The procedure and its indexing.** In the paper's indexing step T is the first denoising step and
step 0 the final one; y = metric_0 is the final metric. (R²)_t denotes the R² of the ordinary
least-squares regression, with an intercept, of y on the metrics of steps T, T−1, …, t (every step
from the first one down to t). Then

    c_T² = (R²)_T,        c_t² = (R²)_t − (R²)_{t+1}     for t < T,

the increase in explained variance when step t joins the regression. Adding regressors never
lowers R², so every c_t² ≥ 0 (a cumulative maximum removes rounding noise).

**Bins.** The authors' tables have 10 bins of T/10 timesteps (bin 0 = t ∈ [0, T/10), least noise,
… bin 9 = the first steps); so do we by default. Each column goes to the bin of its timestep; the
bins are added to the regression from the noisiest (bin n−1) to the least noisy (bin 0), one
regressor per bin: the mean of the bin's columns (``within_bin="mean"``, default: fewer regressors
than samples and less step-to-step noise), its least noisy column (``"last"``: the state reached at
the end of the bin), or all its columns as a group (``"all"``: needs N well above S). A bin without
columns gets c² = 0 before the floor.

**The final step.** y regressed on itself has R² = 1, so letting the final column be a regressor
would hand its bin 1 − (R²)_1, everything the earlier steps did not explain — the final step's own
change *plus* sample noise and all non-linearity the linear model misses. By default
(``final="exclude"``) the final column is the response only, never a regressor; the factors are
the increments divided by their sum (R² of the full regression, reported as ``explained``), i.e. the
unexplained share is spread in proportion, not dumped on t ≈ 0. With many steps the step before the
last nearly equals the last and both choices agree. ``final="residual"`` follows the paper's
recursion literally down to t = 0 (the final step's bin also receives 1 − (R²)_1).

**Normalisation and the floor.** Factors are normalised to sum to 1, then every bin is raised to
at least ``floor`` (default 0.01) and the others scaled down to keep the sum 1: the authors'
tables never go below ~1% (REFERENCE.md: minimum 1 in tables summing to ~106), which keeps every
timestep in training under probability scaling. That the 1 is a floor is our reading of the tables (unverified); ``floor=0`` disables it.

**Numerics.** R² = ‖P_X y_c‖² / ‖y_c‖² with y_c the centred response and P_X the projection onto
the span of the centred, unit-scaled regressors, built incrementally by re-orthogonalised
Gram–Schmidt with a relative rank cut-off (``rcond``; equal to the least-squares fit with an
intercept, and monotone by construction): constant columns (e.g. IoU = 0 for every sample at the first step) become zero and add
nothing; collinear columns add nothing; with N − 1 or more independent regressors R² reaches 1 and
the later bins get 0 (over-fitting; a note says so — use more samples, fewer bins or
``adjusted=True``, which uses adjusted R² and stops crediting once it is undefined). Rows with
non-finite values are dropped (counted). A constant final metric has nothing to explain and is a
:class:`~genperc.errors.UserError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from genperc.diffusion.timesteps import (
    bin_edges,
    bins_to_timesteps,
    diffusion_contributions,  # noqa: F401  (re-exported: both estimates in one place)
    timestep_bins,
)
from genperc.errors import UserError

WITHIN_BIN = ("mean", "last", "all")
FINAL = ("exclude", "residual")


@dataclass
class ContributionResult:
    """c_t² per bin, bin 0 = least noise (t ∈ [0, T/bins)), plus the regression that produced them."""

    factors: Tensor  # [bins] normalised, floored c² (what training uses)
    increments: Tensor  # [bins] raw R² increments (R²)_b − (R²)_{b+1}
    r2: Tensor  # [bins] cumulative R² once bins n−1 … b are in the regression
    explained: float  # R² of the full regression
    T: int
    n_samples: int  # rows used
    dropped_samples: int  # rows with a non-finite value
    columns_per_bin: list[int]  # regressor columns in each bin (the final step excluded by default)
    timesteps: list[int]  # the columns' timesteps, denoising order
    options: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def bins(self) -> int:
        return int(self.factors.numel())

    def per_timestep(self, T: int | None = None) -> Tensor:
        """Normalised c_t² [T] (uniform inside each bin)."""
        return bins_to_timesteps(self.factors, T or self.T)

    def to_json(self, source: str = "", metric: str = "") -> dict:
        return {
            "kind": "genperc contribution factors (ADDP §3.1, perception statistics)",
            "order": "bin 0 = least noise (t in [0, T/bins)) ... last bin = first denoising steps",
            "bins": self.bins,
            "T": self.T,
            "bin_edges": bin_edges(self.bins, self.T),
            "factors": [round(float(v), 6) for v in self.factors],
            "increments": [round(float(v), 6) for v in self.increments],
            "r2": [round(float(v), 6) for v in self.r2],
            "explained": round(self.explained, 6),
            "n_samples": self.n_samples,
            "dropped_samples": self.dropped_samples,
            "columns_per_bin": self.columns_per_bin,
            "timesteps": self.timesteps,
            "metric": metric,
            "source": source,
            "options": self.options,
            "notes": self.notes,
        }


class _Projection:
    """An orthonormal basis of the centred regressors added so far (modified Gram–Schmidt, run
    twice for stability): R² = ‖Qᵀy‖² for unit-norm centred y. A column whose residual after
    projection is below ``tol`` (relative to its norm) is linearly dependent and adds nothing —
    this is the rank handling; R² can only grow as columns join. Pure float64 tensor algebra, no
    LAPACK call (tiny matrices; multi-threaded LAPACK is slow under CPU contention)."""

    def __init__(self, y: Tensor, tol: float):
        self.y, self.tol = y, tol
        self.basis: list[Tensor] = []
        self.explained = 0.0

    @property
    def rank(self) -> int:
        return len(self.basis)

    def add(self, col: Tensor) -> float:
        norm = float(col.norm())
        if norm <= 0:
            return self.explained
        v = col / norm
        for _ in range(2):
            for q in self.basis:
                v = v - (q @ v) * q
        r = float(v.norm())
        if r > self.tol:
            q = v / r
            self.basis.append(q)
            self.explained = min(self.explained + float(q @ self.y) ** 2, 1.0)
        return self.explained


def _standardise(col: Tensor) -> Tensor:
    c = col - col.mean()
    scale = c.abs().max()
    if float(scale) <= 1e-12 * max(1.0, float(col.abs().max())):
        return torch.zeros_like(c)  # constant column: carries nothing beyond the intercept
    c = c / scale
    return c / c.norm().clamp_min(1e-300)


def _apply_floor(f: Tensor, floor: float) -> Tensor:
    """Raise every share to at least ``floor`` and scale the others down so the sum stays 1
    (water-filling: a share scaled below the floor joins the floored ones)."""
    fixed = torch.zeros_like(f, dtype=torch.bool)
    while True:
        free = 1.0 - floor * int(fixed.sum())
        rest = f[~fixed]
        g = rest / rest.sum() * free if float(rest.sum()) > 0 else torch.full_like(rest, free / max(rest.numel(), 1))
        low = g < floor
        if not bool(low.any()):
            out = torch.full_like(f, floor)
            out[~fixed] = g
            return out
        idx = (~fixed).nonzero().flatten()[low]
        fixed[idx] = True


def perception_contributions(
    metric_matrix,
    timesteps=None,
    *,
    bins: int = 10,
    T: int = 1000,
    within_bin: str = "mean",
    final: str = "exclude",
    floor: float = 0.01,
    adjusted: bool = False,
    rcond: float = 1e-9,
) -> ContributionResult:
    """The iterative cumulative-R² estimate of c_t² (module doc) from an N×S metric matrix.

    ``metric_matrix``: [N, S] per-sample metric, columns in denoising order (the last column is the
    final prediction). ``timesteps``: [S] the timestep of each column; default: S evenly spread
    steps, column j at t = ⌊(S − j − ½)·T/S⌋. Columns are sorted by decreasing t (the final step is
    the lowest t). Returns a :class:`ContributionResult`.
    """
    _check_options(within_bin, final, bins, T, floor)
    ts, matrix = _columns_in_denoising_order(metric_matrix, timesteps, T)
    matrix, dropped, y = _finite_rows_and_response(matrix)
    col_bins = timestep_bins(ts, bins, T)
    # the final step is the response, never a regressor (module doc)
    per_bin = [[j for j in range(matrix.shape[1] - 1) if int(col_bins[j]) == b] for b in range(bins)]
    notes = [f"{dropped} samples with non-finite metrics were dropped"] if dropped else []
    r2, increments, explained = _cumulative_r2(matrix, y, per_bin, within_bin, adjusted, rcond, notes)
    if final == "residual":
        final_bin = int(col_bins[-1])
        increments[final_bin] += 1.0 - explained
        r2[: final_bin + 1] = 1.0
        explained = 1.0
    total = float(increments.sum())
    if total <= 0:
        notes.append("no step explains the final metric (R² = 0): uniform factors")
        factors = torch.full((bins,), 1.0 / bins, dtype=torch.float64)
    else:
        factors = increments / total
    if floor > 0:
        factors = _apply_floor(factors, floor)
    return ContributionResult(
        factors=factors, increments=increments, r2=r2, explained=float(explained), T=T, n_samples=matrix.shape[0],
        dropped_samples=dropped, columns_per_bin=[len(c) for c in per_bin], timesteps=[int(v) for v in ts],
        options={"within_bin": within_bin, "final": final, "floor": floor, "adjusted": adjusted, "rcond": rcond},
        notes=notes,
    )


def _check_options(within_bin: str, final: str, bins: int, T: int, floor: float) -> None:
    if within_bin not in WITHIN_BIN:
        raise UserError(f"within_bin={within_bin!r} is not valid", f"use one of: {', '.join(WITHIN_BIN)}")
    if final not in FINAL:
        raise UserError(f"final={final!r} is not valid", f"use one of: {', '.join(FINAL)}")
    bin_edges(bins, T)  # validates bins against T
    if not 0 <= floor <= 1.0 / bins:
        raise UserError(f"floor={floor} must be in [0, 1/bins = {1 / bins:.4g}]", "use e.g. 0.01 or 0")


def _columns_in_denoising_order(metric_matrix, timesteps, T: int) -> tuple[Tensor, Tensor]:
    """The columns' timesteps [S] and the float64 matrix [N, S], sorted by decreasing t."""
    matrix = torch.as_tensor(metric_matrix, dtype=torch.float64)
    if matrix.ndim != 2 or matrix.shape[1] < 2:
        raise UserError(f"the metric matrix must be N×S with S ≥ 2 steps, got shape {tuple(matrix.shape)}",
                        "pass rows = samples, columns = denoising steps")
    S = matrix.shape[1]
    if timesteps is None:
        ts = torch.tensor([int((S - j - 0.5) * T / S) for j in range(S)], dtype=torch.long)
    else:
        ts = torch.as_tensor(timesteps, dtype=torch.long).flatten()
        if ts.numel() != S:
            raise UserError(f"{ts.numel()} timesteps for {S} metric columns", "give one timestep per column")
        if (ts < 0).any() or (ts >= T).any():
            raise UserError(f"timesteps must lie in [0, {T}), got {ts.min().item()}…{ts.max().item()}",
                            "pass the schedule's num_train_timesteps as T")
    order = torch.argsort(-ts, stable=True)
    return ts[order], matrix[:, order]


def _finite_rows_and_response(matrix: Tensor) -> tuple[Tensor, int, Tensor]:
    """The rows without non-finite values, how many were dropped, and the centred unit-norm
    final metric y."""
    finite = torch.isfinite(matrix).all(1)
    dropped = int((~finite).sum())
    matrix = matrix[finite]
    N = matrix.shape[0]
    if N < 3:
        raise UserError(f"only {N} samples with finite metrics at every step", "analyse at least 3 (better ≥ 50) samples")
    y = matrix[:, -1] - matrix[:, -1].mean()
    if float(y.abs().max()) <= 1e-12 * max(1.0, float(matrix[:, -1].abs().max())):
        raise UserError(f"the final metric is the same for all {N} samples ({float(matrix[0, -1]):.4g}): nothing to explain",
                        "use more varied samples or a better-trained model")
    return matrix, dropped, y / y.norm()


def _bin_regressors(matrix: Tensor, cols: list[int], within_bin: str) -> list[Tensor]:
    if within_bin == "mean":
        return [matrix[:, cols].mean(1)]
    if within_bin == "last":
        return [matrix[:, cols[-1]]]
    return [matrix[:, j] for j in cols]


def _cumulative_r2(matrix: Tensor, y: Tensor, per_bin: list[list[int]], within_bin: str, adjusted: bool,
                   rcond: float, notes: list[str]) -> tuple[Tensor, Tensor, float]:
    """(R²)_b once bins n−1 … b are in the regression, its increments, and the full R²; the bins
    join from the noisiest. Appends to ``notes`` where R² saturates or adjusted R² is undefined."""
    bins, N = len(per_bin), matrix.shape[0]
    projection = _Projection(y, rcond)
    r2 = torch.zeros(bins, dtype=torch.float64)
    increments = torch.zeros(bins, dtype=torch.float64)
    prev, undefined = 0.0, False
    for b in range(bins - 1, -1, -1):  # noisiest bin first
        if per_bin[b] and not undefined:
            for column in _bin_regressors(matrix, per_bin[b], within_bin):
                value = projection.add(_standardise(column))
            rank = projection.rank
            if adjusted and N - rank - 1 <= 0:
                undefined = True
                notes.append(f"adjusted R² undefined from bin {b} on (rank {rank} ≥ N−1 = {N - 1}); "
                             "later bins get no credit")
                value = prev
            elif adjusted:
                value = 1 - (1 - value) * (N - 1) / (N - rank - 1)
            value = min(max(value, prev), 1.0)  # monotone: adding regressors never lowers R²
            increments[b] = value - prev
            prev = value
        r2[b] = prev
    if not adjusted and projection.rank >= N - 1:
        notes.append(f"{projection.rank} independent regressors for {N} samples: R² saturates (over-fitting); "
                     "use more samples, fewer bins or adjusted=True")
    return r2, increments, prev


def write_contributions(result: ContributionResult, path, source: str = "", metric: str = "") -> Path:
    """Write ``c.json`` (readable by ``train.contributions=<path>``)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(result.to_json(source=source, metric=metric), indent=1) + "\n")
    return p


def plot_contributions(result: ContributionResult, path, compare: dict | None = None, title: str = "") -> Path:
    """Bar plot of the factors per bin in denoising order (noisiest bin on the left), the
    cumulative R² on a second axis, and optional comparison tables ``{name: per-bin factors}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = result.bins
    edges = bin_edges(n, result.T)
    order = list(range(n - 1, -1, -1))
    labels = [f"{edges[b]}–{edges[b + 1] - 1}" for b in order]
    x = torch.arange(n).tolist()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * n + 2), 3.6), dpi=120)
    ax.bar(x, [100 * float(result.factors[b]) for b in order], color="#4C72B0", label="c² (perception)")
    for i, (name, values) in enumerate((compare or {}).items()):
        v = torch.as_tensor(values, dtype=torch.float64)
        v = v / v.sum()
        if v.numel() == n:
            ax.step([xx - 0.5 for xx in x] + [n - 0.5], [100 * float(v[b]) for b in order] + [100 * float(v[0])],
                    where="post", color=f"C{i + 1}", lw=1.5, label=name)
    ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=7)
    ax.set_xlabel("timestep bin (denoising order →)")
    ax.set_ylabel("c² share (%)")
    ax2 = ax.twinx()
    ax2.plot(x, [float(result.r2[b]) for b in order], "k.-", lw=1, label="cumulative R²")
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("cumulative R²")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="center right")
    ax.set_title(title or f"ADDP contribution factors (N={result.n_samples}, R²={result.explained:.2f})", fontsize=9)
    from genperc.images import save_figure

    return save_figure(fig, path)
