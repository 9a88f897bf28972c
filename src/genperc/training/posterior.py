"""The Monte-Carlo generative posterior p(y|x) of a class-conditional diffusion model (GenRep
Eq. 1–3, Algorithm 1).

For an image x and every class y, run the reverse chain x_T → … → x_0 conditioned on y; each
transition is N(x_{s−1}; μ_{s,y}, σ²_{s,y}) (Eq. 1, learned variance). After discarding the first
``burn_in`` states (m) and keeping every ``thinning``-th (k) of the rest, the kept states form a
Gaussian mixture (Eq. 2)::

    p(x|y) ≈ (1/S)·Σ_s N(x; μ_{s,y}, σ²_{s,y})
    log p(x|y) = logsumexp_s log N(x; μ_{s,y}, σ²_{s,y}) − log S
    log N(x; μ, σ²) = −½·Σ_d [ (x_d − μ_d)²/σ²_d + log σ²_d + log 2π ]

and Bayes' rule with a uniform prior (Eq. 3) gives p(y|x) = softmax_y(log p(x|y) / τ).

Choices the paper leaves open (each a key of :class:`PosteriorConfig`):

* **Shared noise.** All classes of one image share x_T *and* the noise of every stochastic step:
  each chain row gets its own ``torch.Generator`` seeded with the image's seed (diffusers draws
  the step noise row by row from a list of generators), so the chains differ only through y.
* **Chain.** ``steps`` DDPM steps of the diffusion core's sampler (GenRep: 200 of T = 1000), from
  pure noise (Algorithm 1 line 14; the chain does not see x). The variance of each state is the
  sampler's learned-range variance of that (possibly strided) step; the last step (to x_0) adds no
  noise in DDPM, so its density uses improved DDPM's decoder variance
  frac·log β_0 + (1 − frac)·log β̃_1.
* **Which states are kept.** ``thinning_anchor: end`` is Algorithm 1 line 18: with the chain's
  steps numbered t = S … 1 (S = ``steps``; the state appended at step t is that step's output),
  keep the states with t < S − m and t mod k = 0. The line prints "T mod k = 0" with a capital T,
  a condition that does not depend on the step (it would keep every state or none); we read it as
  t mod k, which line 29's normalisation by T//k (every k-th state) confirms. So the first m + 1
  states are discarded (t = S … S − m), and for k ≥ 2 the very last state (t = 1) is not kept.
  ``start`` (a genperc option) keeps the first state after m burn-in states and every k-th after it.
* **Density target.** ``density: x`` evaluates the clean x under each state's transition Gaussian,
  as Eq. 2 writes (a mismatch the paper's App. A.5 acknowledges: the states are noisy);
  ``noised`` evaluates the forward-noised x at that state's noise level (same shared noise), a
  consistent alternative; the level is the sampler's own previous timestep of the step
  (``TrajectoryStep.prev_timestep``), right under every timestep spacing.
* **Temperature τ.** The log-densities are sums over D = C·H·W dimensions (3,072 at 32×32), so
  class differences are hundreds of nats and τ = 1 gives a posterior that is one-hot in all but
  name — a hard label, not the "soft posterior" the paper wants to distil. ``temperature`` sets τ;
  ``fit_temperature`` fits τ on the cached training posteriors by minimising the NLL of the true
  labels (temperature scaling, Guo et al. 2017) — a choice of genperc, reported with the fitted τ.
* **Teacher.** ``teacher: current`` (the default) is Algorithm 1: the chains are run by the model
  being trained, every step (``cache: false``), in eval mode. ``frozen`` is the cheap option —
  the stage-0 generator, whose posteriors can be cached once before stage 1 (``cache: true``);
  it is *not* the paper's setting (the run configs of ``genperc experiment genrep`` use it and
  say so).

Cost: C classes × ``steps`` denoiser calls per image. Ways to pay less (measured by
``genperc experiment genrep``): fewer chain ``steps``; a per-image cache (the per-state
log-densities [C, S] are stored once per image, so every burn-in / thinning / temperature is a
selection afterwards — and a frozen teacher needs them only once); a ``fraction`` of each batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from genperc.diffusion.bayes import posterior_from_log_densities
from genperc.diffusion.conditioning import Conditioning
from genperc.errors import UserError

ANCHORS = ("end", "start")
DENSITIES = ("x", "noised")
TEACHERS = ("frozen", "current")


@dataclass
class PosteriorConfig:
    """The Monte-Carlo posterior and its distillation (module docstring for every key)."""

    enabled: bool = True  # L_gen_distil on/off (Table 8 "Generative Vis. Perception")
    steps: int = 50  # DDPM steps of each chain
    burn_in: int = 12  # m
    thinning: int = 2  # k
    thinning_anchor: str = "end"  # end | start
    density: str = "x"  # x | noised
    temperature: float = 1.0  # τ
    fit_temperature: bool = False
    teacher: str = "current"  # current (Algorithm 1: the model being trained) | frozen (the stage-0 generator)
    cache: bool = False  # per-image cache of the per-state log-densities (frozen: computed once before stage 1)
    subset: int = 0  # training images that get a posterior (0 = all); the first N of a seeded permutation
    refresh_epochs: float = 0.0  # recompute a cached entry after this many epochs (teacher=current; 0 = never)
    fraction: float = 1.0  # share of each batch computed on the fly when not cached
    batch_size: int = 512  # chain rows (images × classes) per sampler call
    weight: float = 1.0  # weight of L_gen_distil in L_percept (Eq. 5: 1)

    def __post_init__(self):
        if self.thinning_anchor not in ANCHORS:
            raise UserError(f"posterior.thinning_anchor={self.thinning_anchor!r} is not valid", "use end or start")
        if self.density not in DENSITIES:
            raise UserError(f"posterior.density={self.density!r} is not valid", "use x or noised")
        if self.teacher not in TEACHERS:
            raise UserError(f"posterior.teacher={self.teacher!r} is not valid", "use frozen or current")
        if self.steps < 1 or self.thinning < 1 or self.burn_in < 0:
            raise UserError("posterior.steps and posterior.thinning must be >= 1, posterior.burn_in >= 0",
                            "e.g. steps=50 burn_in=12 thinning=2")
        if self.temperature <= 0:
            raise UserError("posterior.temperature must be > 0", "e.g. 1.0")
        if not 0 < self.fraction <= 1:
            raise UserError("posterior.fraction must lie in (0, 1]", "e.g. 0.25")


def kept_states(num_states: int, burn_in: int, thinning: int, anchor: str = "end") -> Tensor:
    """Indices (0 = the first, noisiest state) of the chain states used in Eq. 2."""
    if anchor not in ANCHORS:
        raise UserError(f"unknown thinning anchor {anchor!r}", "use end or start")
    idx = torch.arange(num_states)
    if anchor == "end":  # Algorithm 1 line 18: t < T − m and t mod k = 0, with t = S … 1
        t_algorithm = num_states - idx
        keep = (t_algorithm < num_states - burn_in) & (t_algorithm % thinning == 0)
    else:
        keep = (idx >= burn_in) & ((idx - burn_in) % thinning == 0)
    kept = idx[keep]
    if kept.numel() == 0:
        raise UserError(f"burn-in {burn_in} and thinning {thinning} leave no state of a {num_states}-step chain",
                        "lower posterior.burn_in / posterior.thinning or raise posterior.steps")
    return kept


def gaussian_log_density(x: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
    """log N(x; mean, diag e^log_var), summed over all but the first axis (nats)."""
    log_var = log_var.expand_as(mean)
    per = (x - mean) ** 2 * torch.exp(-log_var) + log_var + math.log(2 * math.pi)
    return -0.5 * per.flatten(1).sum(1)


@dataclass
class PosteriorResult:
    log_likelihood: Tensor  # [B, K] log p(x|y) in nats
    log_posterior: Tensor  # [B, K] log p(y|x)
    log_densities: Tensor  # [B, K, S] every state's log N(x; μ_s,y, σ_s,y)
    kept: Tensor  # [S'] indices of the states used
    timesteps: Tensor  # [S] the chain's timesteps

    @property
    def posterior(self) -> Tensor:
        return self.log_posterior.exp()


def _row_generators(seeds: Tensor, repeats: int, device) -> list[torch.Generator]:
    gens = []
    for s in seeds.tolist():
        for _ in range(repeats):
            g = torch.Generator(device=device)
            g.manual_seed(int(s))
            gens.append(g)
    return gens


@torch.no_grad()
def chain_log_densities(model, x: Tensor, classes, *, schedule, steps: int, generator: torch.Generator,
                        density: str = "x", batch_size: int = 512) -> tuple[Tensor, Tensor]:
    """Per-class reverse chains with shared noise; log N(target; μ_s,y, σ_s,y) for every state.

    Returns (log_densities [B, K, S] float64, timesteps [S]). ``classes`` is a list / LongTensor of
    class indices (K of them). ``model(x, t, cond) -> [prediction, v]`` is any denoiser of the
    diffusion core (a :class:`~genperc.models.semantic.GenRepModel` modulates its output itself).
    """
    if density not in DENSITIES:
        raise UserError(f"unknown posterior density {density!r}", "use x or noised")
    classes = torch.as_tensor(classes, dtype=torch.long).reshape(-1)
    seeds = torch.randint(0, 2**62, (x.shape[0],), generator=generator, device=generator.device).cpu()
    per_chunk = max(1, batch_size // int(classes.numel()))
    out, steps_t = [], None
    for start in range(0, x.shape[0], per_chunk):
        xb = x[start:start + per_chunk]
        ld, steps_t = _chunk_log_densities(model, xb, classes, seeds[start:start + xb.shape[0]], schedule=schedule,
                                           steps=steps, density=density)
        out.append(ld)
    return torch.cat(out, dim=0), steps_t


def _chunk_log_densities(model, xb: Tensor, classes: Tensor, seeds: Tensor, *, schedule, steps: int,
                         density: str) -> tuple[Tensor, Tensor]:
    """One sampler call for images ``xb`` × ``classes``: rows (image r // K, class r % K)."""
    from genperc.diffusion.sampler import sample
    from genperc.diffusion.variance import clipped_log_posterior_variance, learned_log_variance

    num_classes = int(classes.numel())
    num_images, channels = xb.shape[:2]
    device = xb.device
    learned = schedule.config.learned_variance
    gens = _row_generators(seeds, num_classes, device)
    x_T = torch.stack([torch.randn(xb.shape[1:], generator=g, device=g.device) for g in gens]).to(device, xb.dtype)
    labels = classes.to(device).repeat(num_images)
    target = xb.repeat_interleave(num_classes, dim=0)
    captured: dict[str, Tensor | None] = {}
    dens: list[Tensor] = []
    ts: list[int] = []

    def wrapped(z, t, cond):
        o = model(z, t, cond)
        captured["v"] = o[:, channels:] if o.shape[1] == 2 * channels else None
        return o

    def on_step(step):
        t = int(step.timestep)
        if t > 0:
            log_var = torch.log(step.variance.clamp(min=1e-20)).to(step.mean.dtype)
        elif learned:  # the last step adds no noise: improved DDPM's decoder variance
            log_var = learned_log_variance(schedule, captured["v"], torch.zeros(step.mean.shape[0], dtype=torch.long))
        else:
            log_var = clipped_log_posterior_variance(schedule)[0].to(device, step.mean.dtype)
        if density == "x":
            tgt = target
        else:  # the forward-noised x at the level of this state's output, with the shared x_T as noise
            ab = schedule.alpha_bar(step.prev_timestep).to(device, xb.dtype)
            tgt = ab.sqrt() * target + (1 - ab).sqrt() * x_T
        lv = log_var.double()
        if lv.ndim <= 1:
            lv = lv.reshape(-1, 1, 1, 1)
        dens.append(gaussian_log_density(tgt.double(), step.mean.double(), lv))
        ts.append(t)

    sample(wrapped, x_T, Conditioning(class_labels=labels), schedule=schedule, sampler="ddpm", num_steps=steps,
           generator=gens, callback=on_step)
    return torch.stack(dens, dim=-1).view(num_images, num_classes, -1).cpu(), torch.tensor(ts, dtype=torch.long)


def generative_posterior(model, x: Tensor, classes=None, *, schedule, steps: int = 50, burn_in: int = 12,
                         thinning: int = 2, anchor: str = "end", temperature: float = 1.0,
                         density: str = "x", generator: torch.Generator | None = None,
                         batch_size: int = 512) -> PosteriorResult:
    """GenRep Eq. 2–3: p(y|x) from per-class reverse chains (module docstring).

    ``classes`` defaults to all of the model's classes (``model.config.num_classes``).
    """
    if classes is None:
        classes = torch.arange(int(model.config.num_classes))
    if generator is None:
        raise UserError("generative_posterior draws the chains' noise and needs a generator",
                        "pass generator=torch.Generator().manual_seed(SEED)")
    ld, ts = chain_log_densities(model, x, classes, schedule=schedule, steps=steps, generator=generator,
                                 density=density, batch_size=batch_size)
    kept = kept_states(ld.shape[-1], burn_in, thinning, anchor)
    log_lik, log_post = posterior_from_log_densities(ld, kept, temperature)
    return PosteriorResult(log_lik, log_post, ld, kept, ts)


def fit_temperature(log_densities: Tensor, labels: Tensor, kept: Tensor, grid: int = 81) -> float:
    """τ minimising the mean NLL of the true labels under softmax(log p(x|y)/τ) (log-spaced grid
    search over 1e-2 … 1e8 then a local refinement; deterministic)."""
    log_lik, _ = posterior_from_log_densities(log_densities, kept, 1.0)
    labels = labels.long()

    def nll(tau: float) -> float:
        return float(-torch.log_softmax(log_lik / tau, -1).gather(-1, labels[:, None]).mean())

    taus = torch.logspace(-2, 8, grid, dtype=torch.float64).tolist()
    best = min(taus, key=nll)
    fine = torch.logspace(math.log10(best) - 0.15, math.log10(best) + 0.15, 31, dtype=torch.float64).tolist()
    return float(min(fine, key=nll))


class PosteriorCache:
    """Per-image per-state log-densities [N, K, S] with a presence flag and the step they were made.

    Saved as safetensors (``log_densities``, ``present``, ``made_at``, ``timesteps``).
    """

    def __init__(self, num_items: int, num_classes: int, num_states: int):
        self.log_densities = torch.zeros(num_items, num_classes, num_states, dtype=torch.float64)
        self.present = torch.zeros(num_items, dtype=torch.bool)
        self.made_at = torch.full((num_items,), -1, dtype=torch.long)
        self.timesteps = torch.zeros(num_states, dtype=torch.long)
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return int(self.present.sum())

    def put(self, indices: Tensor, log_densities: Tensor, step: int = 0, timesteps: Tensor | None = None) -> None:
        idx = indices.long().cpu()
        self.log_densities[idx] = log_densities.double().cpu()
        self.present[idx] = True
        self.made_at[idx] = int(step)
        if timesteps is not None:
            self.timesteps = timesteps.clone()

    def lookup(self, indices: Tensor, step: int = 0, max_age: int | None = None) -> tuple[Tensor, Tensor]:
        """(hit mask [B], log-densities [B, K, S] — zeros where missing)."""
        idx = indices.long().cpu()
        hit = self.present[idx].clone()
        if max_age is not None:
            hit &= (int(step) - self.made_at[idx]) <= max_age
        self.hits += int(hit.sum())
        self.misses += int((~hit).sum())
        return hit, self.log_densities[idx]

    def save(self, path) -> None:
        from safetensors.torch import save_file

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file({"log_densities": self.log_densities, "present": self.present.to(torch.uint8),
                   "made_at": self.made_at, "timesteps": self.timesteps}, str(path))

    @classmethod
    def load(cls, path) -> PosteriorCache:
        from safetensors.torch import load_file

        d = load_file(str(path))
        n, k, s = d["log_densities"].shape
        c = cls(n, k, s)
        c.log_densities, c.present = d["log_densities"], d["present"].bool()
        c.made_at, c.timesteps = d["made_at"], d["timesteps"]
        return c
