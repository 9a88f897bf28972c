"""Noise schedules, parameterisations and the forward process, on diffusers' schedulers.

The forward process is the variance-preserving one of DDPM (Ho et al. 2020, Eq. 4):

    x_t = √ᾱ_t · x0 + √(1 − ᾱ_t) · ε,        ε ~ N(0, I),

with ᾱ_t = Π_{s≤t} (1 − β_s). The betas and ᾱ come from diffusers (a ``DDPMScheduler`` built
from :class:`DiffusionConfig`), so a model trained here samples identically with diffusers'
pipelines. What diffusers lacks and this module adds: exact conversions among the three
parameterisations, the posterior q(x_prev | x_t, x0) for an arbitrary skip with DDIM's η, and
robust handling of zero terminal SNR.

Parameterisations (genperc name → diffusers name):

* ``"eps"`` → ``"epsilon"``: the model predicts ε.
* ``"x0"``  → ``"sample"``: the model predicts x0.
* ``"v"``   → ``"v_prediction"``: v = √ᾱ·ε − √(1−ᾱ)·x0 (Salimans & Ho 2022, §4 / Imagen Video §2.4).

Zero terminal SNR (Lin et al. 2024, "Common diffusion noise schedules and sample steps are
flawed", Alg. 1): the betas are rescaled so that ᾱ_{T−1} = 0, i.e. x_{T−1} = ε carries no
information about x0. Then ε → x0 (and ε → v) divide by √ᾱ = 0 and are undefined at t = T−1.
:func:`convert_prediction` replaces ᾱ = 0 by :data:`ALPHA_BAR_FLOOR` (2⁻²⁴, the value
diffusers' Euler schedulers use) in those divisions only, so results stay finite; the x0 it
returns there is meaningless, which is why zero terminal SNR should be paired with the v- or
x0-parameterisation (a warning says so). Every other conversion has no division by √ᾱ.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, replace

import torch
from torch import Tensor

from genperc.errors import UserError

PREDICTION_TYPES = ("eps", "x0", "v")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
SCHEDULER_KINDS = ("ddpm", "ddim", "euler-a")

#: genperc prediction-type names → diffusers' ``prediction_type`` names.
DIFFUSERS_PREDICTION_TYPE = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
_FROM_DIFFUSERS = {v: k for k, v in DIFFUSERS_PREDICTION_TYPE.items()}

#: Stand-in for ᾱ = 0 where a conversion divides by √ᾱ (zero terminal SNR, module doc).
ALPHA_BAR_FLOOR = 2.0**-24


def _choice(value, valid, what: str):
    if value not in valid:
        raise UserError(
            f"unknown {what} {value!r}", f"use one of: {', '.join(repr(v) for v in valid)}"
        )


@dataclass
class DiffusionConfig:
    """The diffusion process a model is trained with; saved with every checkpoint.

    ``prediction_type`` also accepts diffusers' names ("epsilon", "sample", "v_prediction") and
    stores genperc's. ``learned_variance``: the model outputs 2× channels, the second half being
    the interpolation v ∈ [−1, 1] between log β̃_t and log β_t (Nichol & Dhariwal 2021, Eq. 15).
    """

    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    zero_terminal_snr: bool = False
    prediction_type: str = "eps"
    timestep_spacing: str = "leading"
    learned_variance: bool = False

    def __post_init__(self):
        self.prediction_type = _FROM_DIFFUSERS.get(self.prediction_type, self.prediction_type)
        _choice(self.prediction_type, PREDICTION_TYPES, "diffusion.prediction_type")
        _choice(self.beta_schedule, BETA_SCHEDULES, "diffusion.beta_schedule")
        _choice(self.timestep_spacing, TIMESTEP_SPACINGS, "diffusion.timestep_spacing")
        if isinstance(self.num_train_timesteps, bool) or not isinstance(self.num_train_timesteps, int) \
                or self.num_train_timesteps < 2:
            raise UserError(
                f"diffusion.num_train_timesteps must be an integer ≥ 2, got {self.num_train_timesteps!r}",
                "use e.g. 1000",
            )
        if not (0 < self.beta_start < self.beta_end < 1):
            raise UserError(
                f"diffusion betas must satisfy 0 < beta_start < beta_end < 1, got "
                f"beta_start={self.beta_start}, beta_end={self.beta_end}",
                "use e.g. beta_start=0.00085, beta_end=0.012 (Stable Diffusion)",
            )
        if self.zero_terminal_snr and self.prediction_type == "eps":
            warnings.warn(
                "zero_terminal_snr with eps-prediction: x0 cannot be recovered from ε at t=T-1 "
                "(ᾱ=0); use prediction_type='v' (Lin et al. 2024, §3.2).",
                stacklevel=3,
            )

    @classmethod
    def from_diffusers(cls, scheduler_config, **overrides) -> DiffusionConfig:
        """Build from a diffusers scheduler config (dict or ``scheduler.config``)."""
        c = dict(scheduler_config)
        kwargs = dict(
            num_train_timesteps=c.get("num_train_timesteps", 1000),
            beta_schedule=c.get("beta_schedule", "linear"),
            beta_start=c.get("beta_start", 0.0001),
            beta_end=c.get("beta_end", 0.02),
            zero_terminal_snr=c.get("rescale_betas_zero_snr", False),
            prediction_type=c.get("prediction_type", "epsilon"),
            timestep_spacing=c.get("timestep_spacing", "leading"),
            learned_variance=c.get("variance_type") in ("learned", "learned_range"),
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# Pure formulas on ᾱ (shape broadcastable to the data). Every function here is exact algebra.


def _bcast(a: Tensor, like: Tensor) -> Tensor:
    a = a.to(device=like.device, dtype=like.dtype)
    if a.ndim == 0:
        return a
    return a.reshape(a.shape[0], *([1] * (like.ndim - 1)))


def convert_prediction(pred: Tensor, src: str, dst: str, x_t: Tensor, alpha_bar: Tensor) -> Tensor:
    """Convert a prediction between ``"eps"``, ``"x0"`` and ``"v"`` given x_t and ᾱ_t.

    From x_t = a·x0 + s·ε (a = √ᾱ, s = √(1−ᾱ), a² + s² = 1) and v = a·ε − s·x0:

        x0 = a·x_t − s·v        ε = s·x_t + a·v        (from v: no division)
        ε  = (x_t − a·x0) / s    v = (a·x_t − x0) / s  (from x0: s > 0 for every t)
        x0 = (x_t − s·ε) / a    v = (ε − s·x_t) / a    (from ε: undefined at ᾱ = 0)

    The last two replace ᾱ = 0 by :data:`ALPHA_BAR_FLOOR` (zero terminal SNR; module doc); any
    positive ᾱ is used as is.
    ``alpha_bar`` is a 0-d tensor or one value per batch row.
    """
    _choice(src, PREDICTION_TYPES, "prediction type")
    _choice(dst, PREDICTION_TYPES, "prediction type")
    if src == dst:
        return pred
    ab = _bcast(alpha_bar, x_t)
    a, s = ab.sqrt(), (1 - ab).sqrt()
    if src == "v":
        return a * x_t - s * pred if dst == "x0" else s * x_t + a * pred
    if src == "x0":
        return (x_t - a * pred) / s if dst == "eps" else (a * x_t - pred) / s
    a_safe = torch.where(ab > 0, ab, torch.full_like(ab, ALPHA_BAR_FLOOR)).sqrt()
    return (x_t - s * pred) / a_safe if dst == "x0" else (pred - s * x_t) / a_safe


def posterior_from_alpha_bar(
    x0: Tensor, x_t: Tensor, alpha_bar: Tensor, alpha_bar_prev: Tensor, eta: float = 1.0,
    eps: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Mean and variance of q(x_prev | x_t, x0) for a skip t → t_prev, DDIM family.

    DDIM (Song et al. 2021, Eq. 12 and 16):
        σ² = η² · (1 − ᾱ')/(1 − ᾱ) · (1 − ᾱ/ᾱ'),
        μ  = √ᾱ'·x0 + √(1 − ᾱ' − σ²)·ε,   ε = (x_t − √ᾱ·x0)/√(1 − ᾱ) unless given.
    With ``eps=None`` and η = 1 this is the DDPM posterior (Ho et al. 2020, Eq. 6–7) in its
    usual form μ = √ᾱ'·β/(1−ᾱ)·x0 + √(ᾱ/ᾱ')·(1−ᾱ')/(1−ᾱ)·x_t with β = 1 − ᾱ/ᾱ', which is
    what is computed then (same value, diffusers' DDPM arithmetic).
    Returns (mean, variance); the variance has the shape of ᾱ broadcast to the data.
    """
    ab, abp = _bcast(alpha_bar, x_t), _bcast(alpha_bar_prev, x_t)
    beta = 1 - ab / abp
    var = eta**2 * (1 - abp) / (1 - ab) * beta
    if eps is None and eta == 1.0:
        mean = abp.sqrt() * beta / (1 - ab) * x0 + (ab / abp).sqrt() * (1 - abp) / (1 - ab) * x_t
        return mean, var
    if eps is None:
        eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
    mean = abp.sqrt() * x0 + (1 - abp - var).clamp(min=0).sqrt() * eps
    return mean, var


# ----------------------------------------------------------------------------------------------


class NoiseSchedule:
    """The discrete forward process of a :class:`DiffusionConfig`; betas and ᾱ from diffusers.

    ``betas`` and ``alphas_cumprod`` are float64 copies of diffusers' (float32) values, so
    float64 computations here are exact algebra on the numbers diffusers uses.
    Timesteps ``t`` are LongTensors [B] (or 0-d / ints); a negative t means "clean data" (ᾱ = 1),
    as diffusers does for the step after the last one.
    """

    def __init__(self, config: DiffusionConfig | None = None):
        from diffusers import DDPMScheduler

        self.config = config if config is not None else DiffusionConfig()
        ref = DDPMScheduler(**self._diffusers_kwargs())
        self.betas = ref.betas.to(torch.float64)
        self.alphas_cumprod = ref.alphas_cumprod.to(torch.float64)

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    def __repr__(self) -> str:
        return f"NoiseSchedule({self.config})"

    def with_spacing(self, spacing: str | None) -> NoiseSchedule:
        """This schedule sampled with another timestep spacing (``None``: this one's, unchanged).

        The spacing only decides which timesteps a sampler visits (diffusers' ``timestep_spacing``;
        Lin et al. 2024, Table 2): the betas, ᾱ and the parameterisation are the same, so a model
        trained with one spacing can be sampled with another. Returns a copy; training keeps the
        run's ``diffusion.timestep_spacing``.
        """
        if spacing is None or spacing == self.config.timestep_spacing:
            return self
        _choice(spacing, TIMESTEP_SPACINGS, "timestep spacing")
        with warnings.catch_warnings():  # the config was checked (and warned about) when it was built
            warnings.simplefilter("ignore")
            config = replace(self.config, timestep_spacing=spacing)
        return NoiseSchedule(config)

    # --- lookups -------------------------------------------------------------------------------

    def alpha_bar(self, t) -> Tensor:
        """ᾱ_t as float64 (ᾱ = 1 for t < 0)."""
        t = torch.as_tensor(t, dtype=torch.long)
        ab = self.alphas_cumprod[t.clamp(min=0).cpu()]
        return torch.where(t.cpu() < 0, torch.ones_like(ab), ab)

    def snr(self, t) -> Tensor:
        """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) (as in VDM, Kingma et al. 2021), float64."""
        ab = self.alpha_bar(t)
        return ab / (1 - ab)

    # --- forward process and parameterisations -------------------------------------------------

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε (Ho et al. 2020, Eq. 4); t is a LongTensor [B]."""
        ab = _bcast(self.alpha_bar(t), x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def convert(self, pred: Tensor, src: str, dst: str, x_t: Tensor, t) -> Tensor:
        """Exact conversion between "eps", "x0" and "v" (see :func:`convert_prediction`).

        The training target is ``convert(x0, "x0", kind, x_t, t)`` with the *clean* x0 and the x_t
        the model saw (:func:`genperc.training.objectives.denoising_loss`), never the drawn ε: under
        ADDP augmentation x_t is made from a corrupted x0', and ε* = (x_t − √ᾱ·x0)/√(1−ᾱ) ≠ ε.
        """
        return convert_prediction(pred, src, dst, x_t, self.alpha_bar(t))

    def to_x0(self, pred: Tensor, x_t: Tensor, t, src: str | None = None) -> Tensor:
        """The x0 implied by a model output in ``src`` (default: the config's prediction type)."""
        return self.convert(pred, src or self.config.prediction_type, "x0", x_t, t)

    def to_eps(self, pred: Tensor, x_t: Tensor, t, src: str | None = None) -> Tensor:
        """The ε implied by a model output in ``src`` (default: the config's prediction type)."""
        return self.convert(pred, src or self.config.prediction_type, "eps", x_t, t)

    def posterior_mean_variance(
        self, x0: Tensor, x_t: Tensor, t, t_prev, eta: float = 1.0, eps: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """q(x_{t_prev} | x_t, x0) for any t_prev < t (negative = clean), DDIM's η.

        η = 1 is the DDPM posterior, η = 0 the deterministic DDIM step. See
        :func:`posterior_from_alpha_bar`; the variance is returned broadcastable to x_t.
        """
        return posterior_from_alpha_bar(
            x0, x_t, self.alpha_bar(t), self.alpha_bar(t_prev), eta=eta, eps=eps
        )

    # --- diffusers schedulers ------------------------------------------------------------------

    def _diffusers_kwargs(self) -> dict:
        c = self.config
        return dict(
            num_train_timesteps=c.num_train_timesteps,
            beta_schedule=c.beta_schedule,
            beta_start=c.beta_start,
            beta_end=c.beta_end,
            rescale_betas_zero_snr=c.zero_terminal_snr,
            prediction_type=DIFFUSERS_PREDICTION_TYPE[c.prediction_type],
            timestep_spacing=c.timestep_spacing,
        )

    def scheduler_prediction_type(self, kind: str) -> str:
        """The genperc prediction type the diffusers scheduler of ``kind`` is configured with.

        Equal to the config's, except where diffusers cannot step the native type:
        * Euler-ancestral has no x0 ("sample") support → "v" (exact conversion, no division by √ᾱ);
        * DDPM/DDIM with zero terminal SNR and eps-prediction divide by √ᾱ_{T−1} = 0 → "v" via
          the clamped conversion, so the first step stays finite.
        The sampler converts the model output to this type before ``scheduler.step``.
        """
        _choice(kind, SCHEDULER_KINDS, "sampler")
        native = self.config.prediction_type
        if kind == "euler-a" and native == "x0":
            return "v"
        if kind in ("ddpm", "ddim") and native == "eps" and self.config.zero_terminal_snr:
            return "v"
        return native

    def make_scheduler(self, kind: str, **overrides):
        """A fresh diffusers scheduler ("ddpm" | "ddim" | "euler-a") with this schedule's betas,
        spacing and zero-terminal-SNR rescaling.

        Its ``prediction_type`` is :meth:`scheduler_prediction_type` (usually the config's).
        Sample clipping is off (``clip_sample=False``; the sampler clips x̂0 itself when asked);
        DDPM uses the posterior variance β̃ ("fixed_small") or, with ``learned_variance``,
        "learned_range"; DDIM keeps ``set_alpha_to_one=True`` (ᾱ_prev = 1 after the last step).
        ``overrides`` are passed to the scheduler's constructor last.
        """
        from diffusers import DDIMScheduler, DDPMScheduler, EulerAncestralDiscreteScheduler

        _choice(kind, SCHEDULER_KINDS, "sampler")
        kwargs = self._diffusers_kwargs()
        kwargs["prediction_type"] = DIFFUSERS_PREDICTION_TYPE[self.scheduler_prediction_type(kind)]
        if kind == "ddpm":
            cls = DDPMScheduler
            kwargs.update(
                clip_sample=False,
                variance_type="learned_range" if self.config.learned_variance else "fixed_small",
            )
        elif kind == "ddim":
            cls = DDIMScheduler
            kwargs.update(clip_sample=False, set_alpha_to_one=True)
        else:
            cls = EulerAncestralDiscreteScheduler
        kwargs.update(overrides)
        return cls(**kwargs)

    def timesteps(self, kind: str, num_steps: int) -> Tensor:
        """The timesteps a scheduler of ``kind`` evaluates for ``num_steps`` steps."""
        sch = self.make_scheduler(kind)
        sch.set_timesteps(num_steps)
        return sch.timesteps
