"""One reverse-process sampler over diffusers' DDPM, DDIM and Euler-ancestral schedulers.

Every consumer of the denoising process (evaluation, per-step perception curves, the GenRep
posterior, the UI, the agent) goes through :func:`sample`. It is one loop (k-diffusion's shape)
whose every step

1. evaluates all guidance branches in ONE batched forward ``model(x, t, cond)`` and combines
   them (:class:`_GuidedModel`, :mod:`genperc.diffusion.guidance`),
2. hands the combined prediction to a *stepper* — one small class per sampler
   (:class:`_DDPMStepper`, :class:`_DDIMStepper`, :class:`_EulerAncestralStepper`) that calls its
   diffusers scheduler's ``step`` with the caller's generator, and
3. asks the stepper to describe the transition it just took as a :class:`TrajectoryStep` — x_t,
   x̂0, the mean and variance of the next state and the timestep it lies at — streamed to
   ``callback`` and, with ``record=True``, stacked into a :class:`Trajectory`.

**One space for every sampler.** All trajectory tensors live in the variance-preserving space of
training, x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε. DDPM and DDIM work there already. diffusers' Euler-ancestral
works on s = x_t·√(1+σ_t²) with σ_t² = (1−ᾱ_t)/ᾱ_t (Karras et al. 2022's variance-exploding form);
``scheduler.scale_model_input`` maps s back to x_t before the model is called, and the recorded
x_t, mean and variance are those of x_t = s/√(1+σ²), i.e. mean_VP = √ᾱ'·(x̂0 + σ_down·ε̂) and
variance_VP = ᾱ'·σ_up² at the target level σ'. Algebra shows that this variance equals the DDPM
posterior variance β̃ between the two levels: Euler-ancestral is ancestral (η = 1) sampling.

**Transitions reported** (``mean``/``variance`` are those of x at ``prev_timestep``, the one place
the sampler's stride lives — consumers read it instead of recomputing it):

* DDPM: q(x_prev | x_t, x̂0) (Ho et al. 2020, Eq. 6–7) to diffusers' ``previous_timestep`` (the
  next listed timestep; −1 = clean after the last), and the variance diffusers adds: β̃ of the
  strided step clamped at 1e-20, or with a learned variance the "learned_range" interpolation
  (Nichol & Dhariwal 2021, Eq. 15, :func:`genperc.diffusion.variance.interpolate_log_variance`)
  between β̃ and β = 1 − ᾱ_t/ᾱ_prev of the strided step; 0 at t = 0 where no noise is added.
* DDIM: Song et al. 2021, Eq. 12 with σ² = η²·β̃, to diffusers' DDIM rule t − T // num_steps
  (not necessarily the next listed timestep with "trailing" spacing; clamped at −1).
* Euler-ancestral: as above, to the next listed timestep (rounded where fractional).

Zero-terminal-SNR, Euler's float timesteps, learned variance and x̂0 clipping: see :func:`sample`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from genperc.diffusion.conditioning import Conditioning
from genperc.diffusion.guidance import Guidance, NoGuidance
from genperc.diffusion.schedule import (
    SCHEDULER_KINDS,
    NoiseSchedule,
    convert_prediction,
    posterior_from_alpha_bar,
)
from genperc.diffusion.variance import interpolate_log_variance
from genperc.errors import UserError

Model = Callable[[Tensor, Tensor, Conditioning], Tensor]


@dataclass
class TrajectoryStep:
    """One reverse step, in the VP space x_t = √ᾱ·x0 + √(1−ᾱ)·ε.

    index:    position in the run (0 = first, noisiest step).
    timestep: the discrete training timestep the model was evaluated at (rounded for Euler with
              "linspace" spacing, whose timesteps are fractional).
    x_t:      [B, C, H, W] the state the model saw.
    pred_x0:  [B, C, H, W] x̂0 used by the transition (after clipping if ``clip_x0``).
    mean:     [B, C, H, W] mean of the next state.
    variance: variance of the next state, 0-d (fixed) or [B, C, H, W] (learned); broadcastable.
    prev_timestep: the timestep of the next state, i.e. of ``mean``/``variance`` (−1: the clean
              x0). The one place the sampler's stride lives (each stepper's ``prev_timestep``):
              DDIM's t − T//S (diffusers' DDIM rule, whatever the spacing), DDPM's scheduler
              ``previous_timestep`` (the next listed timestep), Euler's next listed timestep
              (rounded like ``timestep``). Consumers (the GenRep posterior) read it instead of
              recomputing it.
    """

    index: int
    timestep: int
    x_t: Tensor
    pred_x0: Tensor
    mean: Tensor
    variance: Tensor
    prev_timestep: int = -1


@dataclass
class Trajectory:
    """Steps stacked along a leading axis S (see :class:`TrajectoryStep` for each field)."""

    timesteps: Tensor  # LongTensor [S]
    x_t: Tensor  # [S, B, C, H, W]
    pred_x0: Tensor  # [S, B, C, H, W]
    mean: Tensor  # [S, B, C, H, W]
    variance: Tensor  # [S] or [S, B, C, H, W]
    prev_timesteps: Tensor | None = None  # LongTensor [S]

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])

    def __getitem__(self, i: int) -> TrajectoryStep:
        prev = int(self.prev_timesteps[i]) if self.prev_timesteps is not None else -1
        return TrajectoryStep(int(i) if i >= 0 else len(self) + int(i), int(self.timesteps[i]),
                              self.x_t[i], self.pred_x0[i], self.mean[i], self.variance[i], prev)

    @staticmethod
    def from_steps(steps: Sequence[TrajectoryStep]) -> Trajectory:
        fixed = all(s.variance.ndim == 0 for s in steps)
        return Trajectory(
            timesteps=torch.tensor([s.timestep for s in steps], dtype=torch.long),
            x_t=torch.stack([s.x_t for s in steps]),
            pred_x0=torch.stack([s.pred_x0 for s in steps]),
            mean=torch.stack([s.mean for s in steps]),
            variance=torch.stack(
                [s.variance if fixed else s.variance.expand_as(s.mean) for s in steps]
            ),
            prev_timesteps=torch.tensor([s.prev_timestep for s in steps], dtype=torch.long),
        )


@dataclass
class SampleOutput:
    """``sample``: the final state in VP space (x0 after a full run; the state reached when a
    callback stopped early). ``trajectory``: the recorded steps, or None (``record=False``)."""

    sample: Tensor
    trajectory: Trajectory | None = None


class _Recorder:
    """Preallocated [S, ...] buffers, so recording costs one copy per step and no final stack."""

    def __init__(self, num_steps: int, device):
        self.num_steps, self.device, self.n = num_steps, device, 0
        self.buf: dict[str, Tensor] = {}
        self.timesteps = torch.zeros(num_steps, dtype=torch.long)
        self.prev_timesteps = torch.zeros(num_steps, dtype=torch.long)

    def add(self, s: TrajectoryStep):
        if not self.buf:
            var_shape = () if s.variance.ndim == 0 else tuple(s.mean.shape)
            for k, shape in (("x_t", s.x_t.shape), ("pred_x0", s.pred_x0.shape),
                             ("mean", s.mean.shape), ("variance", var_shape)):
                self.buf[k] = torch.empty((self.num_steps, *shape), dtype=s.mean.dtype, device=self.device)
        for k in ("x_t", "pred_x0", "mean"):
            self.buf[k][self.n].copy_(getattr(s, k))
        self.buf["variance"][self.n].copy_(s.variance.expand(self.buf["variance"].shape[1:]))
        self.timesteps[self.n] = s.timestep
        self.prev_timesteps[self.n] = s.prev_timestep
        self.n += 1

    def result(self) -> Trajectory | None:
        if not self.buf:
            return None
        n = self.n
        return Trajectory(self.timesteps[:n], *(self.buf[k][:n] for k in ("x_t", "pred_x0", "mean", "variance")),
                          prev_timesteps=self.prev_timesteps[:n])


def sample(
    model: Model,
    x_T_or_shape: Tensor | Sequence[int],
    cond: Conditioning | None = None,
    *,
    schedule: NoiseSchedule,
    sampler: str = "ddim",
    num_steps: int = 50,
    guidance: Guidance | None = None,
    null_cond: Conditioning | None = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    record: bool = False,
    record_device: str | torch.device | None = "cpu",
    callback: Callable[[TrajectoryStep], bool | None] | None = None,
    clip_x0: bool = False,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    grad: bool = False,
    progress: bool = False,
) -> SampleOutput:
    """Run the reverse process from x_T (a tensor in VP space, or a shape to draw it with
    ``generator``) and return the final sample and, optionally, the trajectory.

    model:      ``model(x, t, cond) -> Tensor`` with x [N, C, H, W] in VP space, t [N] the
                discrete training timesteps (LongTensor; a float tensor only for Euler-a with
                "linspace" spacing, whose timesteps are fractional — diffusers' pipelines pass
                them as is), ``cond`` a :class:`Conditioning` of batch N. It returns the raw output
                in ``schedule.config.prediction_type``; with ``learned_variance`` 2·C channels, the
                second half the variance interpolation v ∈ [−1, 1], used by DDPM ("learned_range",
                taken from the fully conditional branch) and ignored by DDIM and Euler-a, whose
                updates have no place for it.
    cond:       conditions of batch B (or 1, broadcast); None for an unconditional model.
    sampler:    "ddpm" | "ddim" | "euler-a".
    guidance:   a :class:`~genperc.diffusion.guidance.Guidance`; default: none. All its branches go
                through the model in one batched call per step.
    null_cond:  the null conditions guidance drops to (embedding of "" as null text, …).
    eta:        DDIM's η (0 = deterministic). Only for "ddim".
    generator:  the source of every random draw (x_T when a shape is given, the noise of
                stochastic steps). Required whenever something is random; never the global RNG.
    record:     stack every step into ``SampleOutput.trajectory`` on ``record_device``
                (None = the sampling device). With ``record=False`` and no callback no step
                description is even computed.
    callback:   called with each :class:`TrajectoryStep` as it is produced (on the sampling
                device); returning True stops the run after that step.
    clip_x0:    clamp x̂0 to [−1, 1] before each step (and step with the prediction implied by
                the clamped x̂0, i.e. diffusers' ``use_clipped_model_output``).
    grad:       keep autograd on (off by default: sampling runs under ``torch.no_grad``).

    Zero terminal SNR: with eps-prediction the scheduler is driven with the (clamped) v implied by
    ε so that the step at t = T−1 stays finite (see ``NoiseSchedule.scheduler_prediction_type``).
    The initial state is ``x_T · scheduler.init_noise_sigma``, exactly as diffusers' pipelines do,
    so results match theirs for the same x_T (for Euler-a with "trailing"/"linspace" spacing the
    first recorded x_t is therefore x_T·σ_max/√(1+σ_max²), not exactly x_T).
    """
    _check_arguments(schedule, sampler, num_steps, eta, generator, isinstance(x_T_or_shape, Tensor))
    with torch.set_grad_enabled(grad):
        x_T = _initial_noise(x_T_or_shape, model, generator, device, dtype)
        guided = _GuidedModel(model, guidance or NoGuidance(), cond, null_cond, x_T, schedule.config.learned_variance)
        stepper = STEPPERS[sampler](schedule, num_steps, x_T.device, eta=eta, clip_x0=clip_x0)
        recorder = None
        if record:
            recorder = _Recorder(len(stepper.timesteps), record_device if record_device is not None else x_T.device)
        return _denoise(guided, stepper, x_T, generator, recorder, callback, progress)


def _check_arguments(schedule, sampler, num_steps, eta, generator, given_x: bool) -> None:
    if sampler not in SCHEDULER_KINDS:
        raise UserError(f"unknown sampler {sampler!r}", f"use one of: {', '.join(SCHEDULER_KINDS)}")
    T = schedule.num_train_timesteps
    if not isinstance(num_steps, int) or not 1 <= num_steps <= T:
        raise UserError(f"num_steps must be an integer in [1, {T}], got {num_steps!r}", "use e.g. 50")
    if eta < 0 or (eta != 0 and sampler != "ddim"):
        raise UserError(f"eta={eta} is only meaningful for the ddim sampler (η ≥ 0)",
                        "drop eta or use sampler='ddim'")
    stochastic = sampler in ("ddpm", "euler-a") or eta > 0
    if generator is None and (not given_x or stochastic):
        raise UserError(f"sampling with {sampler} from {'a shape' if not given_x else 'x_T'} is random "
                        "and needs a generator",
                        "pass generator=torch.Generator().manual_seed(SEED)")


def _initial_noise(x_T_or_shape, model, generator, device, dtype) -> Tensor:
    """x_T as given (moved to ``device``/``dtype``), or drawn with ``generator`` for a shape."""
    if isinstance(x_T_or_shape, Tensor):
        device = torch.device(device) if device is not None else x_T_or_shape.device
        x_T = x_T_or_shape.to(device=device, dtype=dtype or x_T_or_shape.dtype)
    else:
        device = torch.device(device) if device is not None else _default_device(model)
        shape = tuple(int(s) for s in x_T_or_shape)
        if len(shape) != 4:
            raise UserError(f"x_T shape must be (B, C, H, W), got {shape}", "pass a 4-tuple")
        x_T = torch.randn(shape, generator=generator, device=generator.device, dtype=dtype or torch.float32)
        x_T = x_T.to(device)
    if x_T.ndim != 4:
        raise UserError(f"x_T must be [B, C, H, W], got shape {tuple(x_T.shape)}", "pass a 4-d tensor")
    return x_T


def _default_device(model):
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


def _denoise(guided: _GuidedModel, stepper: _Stepper, x_T: Tensor, generator, recorder: _Recorder | None,
             callback, progress: bool) -> SampleOutput:
    """The one loop: guided prediction → scheduler step → (when anyone listens) step description."""
    describe = recorder is not None or callback is not None
    state = stepper.initial_state(x_T)
    steps_done = 0
    for i, t in enumerate(_progress_bar(stepper, progress)):
        x_t = stepper.model_input(state, t)
        prediction, variance_interp = guided(x_t, t)
        taken = stepper.step(i, t, x_t, state, prediction, variance_interp, generator)
        state, steps_done = taken.next_state, i + 1
        if describe and _report(stepper.describe(taken), recorder, callback):
            break
    return SampleOutput(stepper.to_vp(state, steps_done), recorder.result() if recorder is not None else None)


def _progress_bar(stepper: _Stepper, progress: bool):
    if not progress:
        return stepper.timesteps
    from tqdm.auto import tqdm

    return tqdm(stepper.timesteps, desc=f"sampling ({stepper.kind})", leave=False)


def _report(step: TrajectoryStep, recorder: _Recorder | None, callback) -> bool:
    """Record and stream one step; True when the callback asks to stop."""
    if recorder is not None:
        recorder.add(step)
    return callback is not None and callback(step) is True


# ---- the model with guidance ------------------------------------------------------------------


class _GuidedModel:
    """All guidance branches of ``cond`` in one batch: ``(x_t, t) -> (combined prediction, v)``.

    v is the learned-variance interpolation of the fully conditional branch (branch 0), or None.
    """

    def __init__(self, model: Model, guidance: Guidance, cond, null_cond, x_T: Tensor, learned: bool):
        batch, device, dtype = x_T.shape[0], x_T.device, x_T.dtype
        cond = (cond or Conditioning()).to(device, dtype=dtype)
        if cond.batch_size is not None:
            cond = cond.broadcast_to_batch(batch)
        null = null_cond.to(device, dtype=dtype) if null_cond is not None else None
        branches = guidance.branches(cond, null)
        self.model, self.guidance, self.learned = model, guidance, learned
        self.num_branches = len(branches)
        self.batched_cond = branches[0] if len(branches) == 1 else Conditioning.cat(branches)

    def __call__(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor | None]:
        n, (batch, channels) = self.num_branches, x_t.shape[:2]
        x_in = x_t if n == 1 else x_t.repeat(n, 1, 1, 1)
        out = self.model(x_in, _model_timestep(t, batch * n, x_t.device), self.batched_cond)
        expected = (batch * n, 2 * channels if self.learned else channels, *x_t.shape[2:])
        if not isinstance(out, Tensor) or out.shape != expected:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise UserError(f"the model returned {got}, expected {expected}",
                            "check the model's out_channels against diffusion.learned_variance")
        variance_interp = out[:batch, channels:] if self.learned else None
        return self.guidance.combine(list(out[:, :channels].chunk(n, dim=0))), variance_interp


def _model_timestep(t: Tensor, batch: int, device) -> Tensor:
    """The timestep tensor [batch] the model receives: long, except fractional Euler timesteps."""
    t = t.reshape(()).to(device)
    if t.is_floating_point() and float(t) == round(float(t)):
        t = t.round().long()
    return t.expand(batch)


# ---- steppers: one diffusers scheduler each ---------------------------------------------------


@dataclass
class _StepTaken:
    """What one scheduler step saw and produced (input to :meth:`_Stepper.describe`)."""

    index: int
    timestep: Tensor  # the scheduler's timestep (float for Euler)
    x_t: Tensor  # VP state the model saw
    state: Tensor  # the scheduler's own state (σ-space for Euler)
    alpha_bar: Tensor  # ᾱ at x_t (float64, 0-d)
    scheduler_prediction: Tensor  # the combined prediction in the scheduler's prediction type
    pred_x0: Tensor
    variance_interp: Tensor | None
    next_state: Tensor


class _Stepper:
    """Steps one diffusers scheduler and describes the transition taken, in VP space.

    Subclasses name the scheduler (``kind``), the timestep it steps to (:meth:`prev_timestep`)
    and the mean and variance of that transition (:meth:`transition`).
    """

    kind = ""

    def __init__(self, schedule: NoiseSchedule, num_steps: int, device, *, eta: float = 0.0,
                 clip_x0: bool = False):
        self.schedule, self.eta, self.clip_x0 = schedule, eta, clip_x0
        self.scheduler = schedule.make_scheduler(self.kind)
        self.scheduler.set_timesteps(num_steps, device=device)
        self.timesteps = self.scheduler.timesteps
        self.prediction_type = schedule.scheduler_prediction_type(self.kind)

    def initial_state(self, x_T: Tensor) -> Tensor:
        return x_T * self.scheduler.init_noise_sigma

    def model_input(self, state: Tensor, t: Tensor) -> Tensor:
        """The VP x_t the model sees at ``t`` (identity except for Euler's σ-space)."""
        return self.scheduler.scale_model_input(state, t)

    def alpha_bar(self, index: int, t: Tensor) -> Tensor:
        return self.schedule.alpha_bar(t)

    def to_vp(self, state: Tensor, steps_done: int) -> Tensor:
        """The scheduler's state after ``steps_done`` steps, in VP space."""
        return state

    def step(self, index, t, x_t, state, prediction, variance_interp, generator) -> _StepTaken:
        """Convert the model-native prediction to the scheduler's type (clipping x̂0 if asked)
        and let diffusers step."""
        alpha_bar = self.alpha_bar(index, t)
        native = self.schedule.config.prediction_type
        if self.clip_x0:
            x0 = convert_prediction(prediction, native, "x0", x_t, alpha_bar).clamp(-1, 1)
            prediction, native = x0, "x0"
        prediction = convert_prediction(prediction, native, self.prediction_type, x_t, alpha_bar)
        stepped = self._scheduler_step(prediction, variance_interp, t, state, generator)
        return _StepTaken(index, t, x_t, state, alpha_bar, prediction,
                          stepped.pred_original_sample.to(x_t.dtype), variance_interp, stepped.prev_sample)

    def _scheduler_step(self, prediction, variance_interp, t, state, generator):
        return self.scheduler.step(prediction, t, state, generator=generator)

    def describe(self, taken: _StepTaken) -> TrajectoryStep:
        prev = max(self.prev_timestep(taken.index, taken.timestep), -1)
        mean, variance = self.transition(taken, prev)
        return TrajectoryStep(taken.index, int(round(float(taken.timestep))), taken.x_t, taken.pred_x0,
                              mean, variance, prev)

    def prev_timestep(self, index: int, t: Tensor) -> int:
        raise NotImplementedError

    def transition(self, taken: _StepTaken, prev_timestep: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class _DDPMStepper(_Stepper):
    """Ancestral sampling (Ho et al. 2020, Alg. 2) with diffusers' ``DDPMScheduler``."""

    kind = "ddpm"

    def _scheduler_step(self, prediction, variance_interp, t, state, generator):
        if variance_interp is not None:
            prediction = torch.cat([prediction, variance_interp], dim=1)
        return self.scheduler.step(prediction, t, state, generator=generator)

    def prev_timestep(self, index: int, t: Tensor) -> int:
        return int(self.scheduler.previous_timestep(t))

    def transition(self, taken: _StepTaken, prev_timestep: int) -> tuple[Tensor, Tensor]:
        """Posterior mean (Ho et al. Eq. 7) and the variance diffusers' DDPM adds (module doc)."""
        x_t, t = taken.x_t, int(taken.timestep)
        ab, ab_prev = taken.alpha_bar, self.schedule.alpha_bar(prev_timestep)
        mean, posterior_var = posterior_from_alpha_bar(taken.pred_x0, x_t, ab, ab_prev, eta=1.0)
        if t <= 0:
            return mean, torch.zeros((), dtype=x_t.dtype, device=x_t.device)
        posterior_var = posterior_var.clamp(min=1e-20)
        if taken.variance_interp is None:
            return mean, posterior_var
        beta = (1 - ab / ab_prev).to(device=x_t.device, dtype=x_t.dtype)  # β of the strided step
        return mean, interpolate_log_variance(taken.variance_interp, posterior_var.log(), beta.log()).exp()


class _DDIMStepper(_Stepper):
    """DDIM (Song et al. 2021, Eq. 12) with diffusers' ``DDIMScheduler`` and η = ``eta``."""

    kind = "ddim"

    def _scheduler_step(self, prediction, variance_interp, t, state, generator):
        return self.scheduler.step(prediction, t, state, eta=self.eta, generator=generator)

    def prev_timestep(self, index: int, t: Tensor) -> int:
        """diffusers' DDIM rule, whatever the spacing: t − T // num_steps."""
        return int(t) - self.scheduler.config.num_train_timesteps // self.scheduler.num_inference_steps

    def transition(self, taken: _StepTaken, prev_timestep: int) -> tuple[Tensor, Tensor]:
        eps = convert_prediction(taken.scheduler_prediction, self.prediction_type, "eps", taken.x_t, taken.alpha_bar)
        return posterior_from_alpha_bar(taken.pred_x0, taken.x_t, taken.alpha_bar,
                                        self.schedule.alpha_bar(prev_timestep), eta=self.eta, eps=eps)


class _EulerAncestralStepper(_Stepper):
    """Euler-ancestral with diffusers' ``EulerAncestralDiscreteScheduler`` (σ-space, module doc)."""

    kind = "euler-a"

    def sigma(self, index: int) -> float:
        return float(self.scheduler.sigmas[index])

    def alpha_bar(self, index: int, t: Tensor) -> Tensor:
        return torch.tensor(1.0 / (1.0 + self.sigma(index) ** 2), dtype=torch.float64)

    def to_vp(self, state: Tensor, steps_done: int) -> Tensor:
        return state / math.sqrt(1.0 + self.sigma(steps_done) ** 2)

    def prev_timestep(self, index: int, t: Tensor) -> int:
        return int(round(float(self.timesteps[index + 1]))) if index + 1 < len(self.timesteps) else -1

    def transition(self, taken: _StepTaken, prev_timestep: int) -> tuple[Tensor, Tensor]:
        """An Euler step of the probability-flow ODE (Karras et al. 2022, §2) to σ_down plus fresh
        noise of std σ_up, as k-diffusion's ``sample_euler_ancestral``, in VP space:
        s' = x̂0 + σ_down·ε̂ + σ_up·z with ε̂ = (s − x̂0)/σ, and x' = s'/√(1+σ'²).
        """
        sigma, sigma_next = self.sigma(taken.index), self.sigma(taken.index + 1)
        sigma_up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
        sigma_down = math.sqrt(max(sigma_next**2 - sigma_up**2, 0.0))
        scale = 1.0 / math.sqrt(1.0 + sigma_next**2)
        x0 = taken.pred_x0
        eps = (taken.state.to(x0.dtype) - x0) / sigma
        variance = torch.tensor(scale**2 * sigma_up**2, dtype=x0.dtype, device=x0.device)
        return scale * (x0 + sigma_down * eps), variance


STEPPERS: dict[str, type[_Stepper]] = {
    "ddpm": _DDPMStepper, "ddim": _DDIMStepper, "euler-a": _EulerAncestralStepper,
}
