"""Timestep strategies for training: which t each sample is trained at, and its loss weight.

``uniform`` is the standard DDPM draw t ~ U{0, …, T−1}. ADDP §3.1 ("contribution-aware timestep
sampling") adds two strategies driven by contribution factors c_t² (one non-negative number per
training timestep, summing to 1):

* ``loss-scaling``: t ~ U{0, …, T−1} as usual and the sample's loss is multiplied by
  w = T·c_t². The objectives use these weights as given, ``L = mean_i(w_i·L_i)``
  (:func:`~genperc.training.objectives.denoising_loss`): the normaliser is the expectation of w
  under the sampling distribution, E[w] = Σ_t (1/T)·T·c_t² = 1, a constant, so
  E[L] = Σ_t c_t²·E[L_t] — the paper's c_t²-weighted loss (§4.3.1, Table 5's "Loss Scaling") — at
  every batch size, and k accumulated micro-batches of b samples give the same gradient as one
  batch of k·b. (Dividing by the batch's own mean weight instead, a self-normalised estimate, is
  biased: uniform at batch 1, and each micro-batch normalised separately under accumulation.) The
  weights are unbounded above: with the diffusion c² of Stable Diffusion's schedule w reaches ≈10.5
  at t = T−1, so a batch's loss swings with its draws (gradient clipping keeps steps bounded).
* ``prob-scaling``: t ~ Multinomial(c_0², …, c_{T−1}²) (``torch.multinomial`` with replacement, on
  the caller's generator) and no loss weight — what the paper's Table 5 finds best and what the
  authors' released code does.

The factors come from :func:`load_contributions`:

* ``"diffusion"`` — :func:`diffusion_contributions`, c_t² ∝ (1−ᾱ_t)/ᾱ_t (ADDP §3.1, Eq. 3);
* the name of one of the authors' tables, :data:`AUTHOR_TABLES` (``addp-depth``, ``addp-referring``);
* a path to the ``c.json`` written by ``genperc analyze contributions`` (perception statistics,
  :mod:`genperc.evaluation.contributions`);
* a literal table ``"[1, 1, 3, 7, 13, 14, 8, 4, 22, 33]"`` (any length n ≤ T).

**Bins.** A table of n numbers is read as n equal bins of timesteps, **bin 0 = the least noise**
(t ∈ [0, T/n)) … bin n−1 = the noisiest, first denoising steps — the order of the authors'
tables. Bin b covers t ∈ [round(b·T/n), round((b+1)·T/n)); its mass is spread uniformly over its
timesteps (each gets factor_b / size_b), so the bin's total probability is its normalised factor
even when n does not divide T. With n = 10 and T = 1000 this is the authors' "uniform inside a
bin of 100 timesteps".

All draws come from the caller's seeded generator (the trainer's), never the global RNG — the
authors' depth code draws t outside its seeded generator, so its runs are not reproducible.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from genperc.errors import UserError

#: The authors' c_t² tables (REFERENCE.md, "c_t² tables used by the authors"): 10 bins of T/10
#: timesteps, bin 0 = t ∈ [0, 100) (least noise) … bin 9 = t ∈ [900, 1000) (first denoising steps).
AUTHOR_TABLES: dict[str, tuple[float, ...]] = {
    "addp-depth": (1, 1, 3, 7, 13, 14, 8, 4, 22, 33),
    "addp-referring": (1, 1, 1, 1, 1, 1, 1, 2, 4, 95),
}

CONTRIBUTION_SPECS = "'diffusion', " + ", ".join(f"'{k}'" for k in AUTHOR_TABLES) + \
    ", a c.json path from 'genperc analyze contributions', or a list like '[1, 3, 5]'"


# ---------------------------------------------------------------------------------------------
# contribution factors c_t²


def bin_edges(num_bins: int, T: int) -> list[int]:
    """Edges [e_0 = 0, …, e_n = T] of n near-equal bins of timesteps (bin b = [e_b, e_{b+1}))."""
    if not isinstance(num_bins, int) or isinstance(num_bins, bool) or not 1 <= num_bins <= T:
        raise UserError(f"the number of bins must be an integer in [1, {T}], got {num_bins!r}", "use e.g. 10")
    return [round(b * T / num_bins) for b in range(num_bins + 1)]


def timestep_bins(t: Tensor, num_bins: int, T: int) -> Tensor:
    """The bin index (0 = least noise) of each timestep in ``t`` (any shape, long)."""
    edges = torch.tensor(bin_edges(num_bins, T)[1:-1], dtype=torch.long)
    return torch.bucketize(torch.as_tensor(t, dtype=torch.long).cpu(), edges, right=True)


def bins_to_timesteps(factors, T: int) -> Tensor:
    """Per-bin factors (bin 0 = least noise) → normalised per-timestep c_t² [T] (float64), each
    bin's mass spread uniformly over its timesteps (module doc)."""
    f = _check_factors(factors, "contribution factors")
    n = f.numel()
    if n > T:
        raise UserError(f"{n} contribution factors for only T={T} timesteps", f"give at most {T} factors")
    f = f / f.sum()
    edges = bin_edges(n, T)
    sizes = torch.tensor([edges[b + 1] - edges[b] for b in range(n)], dtype=torch.long)
    return torch.repeat_interleave(f / sizes.to(f.dtype), sizes)


def timesteps_to_bins(c: Tensor, num_bins: int) -> Tensor:
    """Per-timestep factors [T] → their sums over ``num_bins`` bins (bin 0 = least noise)."""
    c = torch.as_tensor(c, dtype=torch.float64)
    edges = bin_edges(num_bins, c.numel())
    return torch.stack([c[edges[b]:edges[b + 1]].sum() for b in range(num_bins)])


def diffusion_contributions(schedule, bins: int | None = None, min_alpha_bar: float | None = None) -> Tensor:
    """c_t² from the diffusion formulation (ADDP §3.1, Eq. 3; REFERENCE.md):

        c_t² = ((1−ᾱ_t)/ᾱ_t) / Σ_i ((1−ᾱ_i)/ᾱ_i),

    i.e. proportional to 1/SNR(t): the weight of ε̂ in x0 = x_t/√ᾱ_t − √((1−ᾱ_t)/ᾱ_t)·ε̂, squared.
    (The paper writes α_t; the cumulative ᾱ_t is meant.)

    ``schedule``: a :class:`~genperc.diffusion.schedule.NoiseSchedule` (or a tensor of ᾱ_t).
    Returns float64 [T], or its sums over ``bins`` bins (bin 0 = least noise) when given.

    **Zero terminal SNR** (ᾱ_{T−1} = 0) makes the ratio infinite there. ᾱ is clamped from below at
    ``min_alpha_bar``, by default the smallest *positive* ᾱ of the schedule, so the terminal step
    weighs as much as its neighbour instead of taking all the mass. Even so, such schedules put
    nearly all of c² on the last few timesteps (1/SNR grows without bound); pass e.g.
    ``min_alpha_bar=4.7e-3`` (Stable Diffusion's terminal ᾱ) to keep the shape the paper used.
    """
    ab = schedule.alphas_cumprod if hasattr(schedule, "alphas_cumprod") else schedule
    ab = torch.as_tensor(ab, dtype=torch.float64).flatten()
    if ab.numel() < 1 or not torch.isfinite(ab).all() or (ab < 0).any() or (ab > 1).any():
        raise UserError("ᾱ must be finite values in [0, 1]", "pass a NoiseSchedule")
    if min_alpha_bar is None:
        positive = ab[ab > 0]
        if positive.numel() == 0:
            raise UserError("every ᾱ_t is 0: the diffusion contributions are undefined", "check the schedule")
        min_alpha_bar = float(positive.min())
    if not 0 < min_alpha_bar <= 1:
        raise UserError(f"min_alpha_bar must be in (0, 1], got {min_alpha_bar}", "use e.g. 4.7e-3")
    ab = ab.clamp(min=min_alpha_bar)
    ratio = (1 - ab) / ab
    if float(ratio.sum()) <= 0:  # ᾱ = 1 everywhere: nothing to weigh; fall back to uniform
        ratio = torch.ones_like(ratio)
    c = ratio / ratio.sum()
    return timesteps_to_bins(c, bins) if bins is not None else c


def _check_factors(values, what: str) -> Tensor:
    try:
        f = torch.as_tensor(values, dtype=torch.float64).flatten()
    except (TypeError, ValueError) as e:
        raise UserError(f"{what} must be a list of numbers, got {values!r}", "write e.g. [1, 3, 5]") from e
    if f.numel() == 0:
        raise UserError(f"{what} are empty", "give at least one non-negative number")
    if not torch.isfinite(f).all() or (f < 0).any():
        raise UserError(f"{what} must be finite and non-negative, got {f.tolist()}", "fix the table")
    if float(f.sum()) <= 0:
        raise UserError(f"{what} sum to 0", "give at least one positive factor")
    return f


def _parse_list(spec: str):
    try:
        value = json.loads(spec)
    except json.JSONDecodeError as e:
        raise UserError(f"cannot parse the contribution table {spec!r}", "write e.g. [1, 1, 3, 7]") from e
    if not isinstance(value, list):
        raise UserError(f"the contribution table {spec!r} is not a list", "write e.g. [1, 1, 3, 7]")
    return value


def read_contributions_file(path) -> list[float]:
    """The per-bin factors (bin 0 = least noise) of a ``c.json`` written by
    ``genperc analyze contributions`` (key ``factors``)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read contributions file {p}: {e}",
                        "pass the c.json written by 'genperc analyze contributions'") from e
    if not isinstance(data, dict) or "factors" not in data:
        raise UserError(f"{p} has no 'factors' list", "pass the c.json written by 'genperc analyze contributions'")
    return data["factors"]


def load_contributions(spec, schedule) -> Tensor:
    """Resolve a contributions spec into normalised per-timestep c_t² [T] (float64, sums to 1).

    ``spec``: ``"diffusion"`` | a name in :data:`AUTHOR_TABLES` | a path to a ``c.json`` | a literal list
    string ``"[1, 3, …]"`` | a list/tuple/tensor of per-bin factors (bin 0 = least noise; module
    doc). ``schedule``: a :class:`~genperc.diffusion.schedule.NoiseSchedule`, or an int T for specs
    other than ``"diffusion"``.
    """
    T = schedule if isinstance(schedule, int) else schedule.num_train_timesteps
    if isinstance(spec, (list, tuple, Tensor)):
        return bins_to_timesteps(spec, T)
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"invalid contributions spec {spec!r}", f"use {CONTRIBUTION_SPECS}")
    s = spec.strip()
    if s == "diffusion":
        if isinstance(schedule, int):
            raise UserError("contributions='diffusion' needs the noise schedule", "pass a NoiseSchedule")
        return diffusion_contributions(schedule)
    if s in AUTHOR_TABLES:
        return bins_to_timesteps(AUTHOR_TABLES[s], T)
    if s.startswith("["):
        return bins_to_timesteps(_parse_list(s), T)
    if Path(s).is_file():
        return bins_to_timesteps(read_contributions_file(s), T)
    if s.endswith(".json"):
        raise UserError(f"contributions file not found: {s}", "run 'genperc analyze contributions' to write it")
    raise UserError(f"unknown contributions {spec!r}", f"use {CONTRIBUTION_SPECS}")


# ---------------------------------------------------------------------------------------------
# strategies


class TimestepSampler:
    """Draws ``t`` [B] and an optional per-sample loss weight [B] (None = all ones)."""

    name = "base"

    def __init__(self, num_train_timesteps: int):
        self.T = num_train_timesteps

    def sample(self, batch_size: int, generator: torch.Generator, device=None) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def probabilities(self) -> Tensor:
        """P(t) [T] of the draw (float64)."""
        return torch.full((self.T,), 1.0 / self.T, dtype=torch.float64)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(T={self.T})"


class UniformTimesteps(TimestepSampler):
    """t ~ U{0, …, T−1}, no loss weight (DDPM)."""

    name = "uniform"

    def __init__(self, num_train_timesteps: int, contributions=None):
        super().__init__(num_train_timesteps)

    def sample(self, batch_size, generator, device=None):
        t = torch.randint(0, self.T, (batch_size,), generator=generator, device=generator.device)
        return t.to(device), None


class _ContributionSampler(TimestepSampler):
    def __init__(self, num_train_timesteps: int, contributions: Tensor):
        super().__init__(num_train_timesteps)
        if contributions is None:
            raise UserError(f"timestep strategy '{self.name}' needs contribution factors",
                            f"set train.contributions to {CONTRIBUTION_SPECS}")
        c = _check_factors(contributions, "contribution factors")
        if c.numel() != num_train_timesteps:
            c = bins_to_timesteps(c, num_train_timesteps)
        self.contributions = c / c.sum()  # float64 [T], sums to 1
        self._cache: dict[tuple[str, torch.dtype], Tensor] = {}

    def _contributions_on(self, device, dtype=torch.float32) -> Tensor:
        """c_t² [T] on ``device`` in ``dtype`` (cached per device and dtype)."""
        key = (str(device), dtype)
        if key not in self._cache:
            self._cache[key] = self.contributions.to(device=device, dtype=dtype)
        return self._cache[key]


class LossScalingTimesteps(_ContributionSampler):
    """t ~ U{0, …, T−1}; per-sample loss weight w = T·c_t² (E[w] = 1 under uniform t; module doc)."""

    name = "loss-scaling"

    def sample(self, batch_size, generator, device=None):
        t = torch.randint(0, self.T, (batch_size,), generator=generator, device=generator.device)
        return t.to(device), self.loss_weights(t).to(device)

    def loss_weights(self, t: Tensor) -> Tensor:
        """w = T·c_t² for timesteps ``t`` (float32, on t's device)."""
        t = torch.as_tensor(t, dtype=torch.long)
        return self._contributions_on(t.device)[t] * self.T


class ProbScalingTimesteps(_ContributionSampler):
    """t ~ Multinomial(c²) with replacement on the caller's generator; no loss weight."""

    name = "prob-scaling"

    def sample(self, batch_size, generator, device=None):
        probs = self._contributions_on(generator.device, torch.float64 if generator.device.type == "cpu" else torch.float32)
        t = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
        return t.to(device), None

    def probabilities(self) -> Tensor:
        return self.contributions.clone()


STRATEGIES: dict[str, type[TimestepSampler]] = {
    "uniform": UniformTimesteps,
    "loss-scaling": LossScalingTimesteps,
    "prob-scaling": ProbScalingTimesteps,
}


def create_timestep_sampler(name: str, num_train_timesteps: int, contributions=None, **kwargs) -> TimestepSampler:
    """A strategy by name; ``contributions`` (per-timestep [T] or per-bin factors) for the
    contribution-aware ones."""
    if name not in STRATEGIES:
        raise UserError(f"unknown timestep strategy '{name}'", "choose one of: " + ", ".join(sorted(STRATEGIES)))
    return STRATEGIES[name](num_train_timesteps, contributions=contributions, **kwargs)


def build_timestep_sampler(train_cfg, schedule) -> TimestepSampler:
    """The strategy a run's ``train`` config names: ``train.timesteps`` with the factors of
    ``train.contributions`` (resolved by :func:`load_contributions` against ``schedule``)."""
    name = train_cfg.timesteps
    if name not in STRATEGIES:
        raise UserError(f"unknown timestep strategy train.timesteps={name!r}",
                        "choose one of: " + ", ".join(sorted(STRATEGIES)))
    T = schedule.num_train_timesteps
    if name == "uniform":
        return UniformTimesteps(T)
    return create_timestep_sampler(name, T, contributions=load_contributions(train_cfg.contributions, schedule))


def describe(sampler: TimestepSampler, bins: int = 10) -> str:
    """One line: the strategy and its draw probability per bin (bin 0 = least noise), in percent."""
    p = timesteps_to_bins(sampler.probabilities(), min(bins, sampler.T))
    if isinstance(sampler, LossScalingTimesteps):
        p = timesteps_to_bins(sampler.contributions, min(bins, sampler.T))
        what = "loss weight share"
    else:
        what = "P(t)"
    return f"{sampler.name}: {what} per bin (t low→high) " + " ".join(f"{100 * float(v):.1f}" for v in p)


__all__ = [
    "AUTHOR_TABLES", "TimestepSampler", "UniformTimesteps", "LossScalingTimesteps", "ProbScalingTimesteps",
    "STRATEGIES", "create_timestep_sampler", "build_timestep_sampler", "load_contributions",
    "diffusion_contributions", "bins_to_timesteps", "timesteps_to_bins", "bin_edges", "timestep_bins",
    "read_contributions_file", "describe",
]
