"""One reverse-process sampler over diffusers' DDPM, DDIM and Euler-ancestral schedulers.

Every consumer of the denoising process (evaluation, per-step perception curves, the GenRep
posterior, the UI, the agent) goes through :func:`sample`. Each step it

1. evaluates all guidance branches in ONE batched forward ``model(x, t, cond)``,
2. combines them (:mod:`genperc.diffusion.guidance`),
3. calls the diffusers scheduler's ``step`` with the caller's generator, and
4. describes the transition it just took as a :class:`TrajectoryStep` — x_t, x̂0 and the mean
   and variance of x_prev — streamed to ``callback`` and, with ``record=True``, stacked into a
   :class:`Trajectory` (k-diffusion style: the callback is how consumers see the steps).

**One space for every sampler.** All trajectory tensors live in the variance-preserving space of
training, x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε. DDPM and DDIM work there already. diffusers' Euler-ancestral
works on s = x_t·√(1+σ_t²) with σ_t² = (1−ᾱ_t)/ᾱ_t (Karras et al. 2022's variance-exploding form);
``scheduler.scale_model_input`` maps s back to x_t before the model is called, and the recorded
x_t, mean and variance are those of x_t = s/√(1+σ²), i.e. mean_VP = √ᾱ'·(x̂0 + σ_down·ε̂) and
variance_VP = ᾱ'·σ_up² at the target level σ'. Algebra shows that this variance equals the DDPM
posterior variance β̃ between the two levels: Euler-ancestral is ancestral (η = 1) sampling.

**Transitions reported** (``mean``/``variance`` are those of x at the next timestep):

* DDPM: q(x_prev | x_t, x̂0) (Ho et al. 2020, Eq. 6–7) and the variance actually added by
  diffusers (β̃ clamped at 1e-20; with a learned variance the "learned_range" interpolation,
  Nichol & Dhariwal 2021, Eq. 15; 0 at t = 0 where no noise is added).
* DDIM: Song et al. 2021, Eq. 12 with σ² = η²·β̃. diffusers' DDIM steps from t to
  t − T // num_steps (not necessarily the next listed timestep with "trailing" spacing); the
  reported mean is that of the transition diffusers takes.
* Euler-ancestral: as above.

Zero-terminal-SNR, Euler's float timesteps, learned variance and x̂0 clipping: see :func:`sample`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from genperc.diffusion.conditioning import Conditioning
from genperc.diffusion.guidance import Guidance, NoGuidance, fit_batch
from genperc.diffusion.schedule import (
    SCHEDULER_KINDS,
    NoiseSchedule,
    convert_prediction,
    posterior_from_alpha_bar,
)
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
    prev_timestep: the timestep of the next state as the step computed it (−1: the clean x0). The
              one place the sampler's stride lives: DDIM's t − T//S, DDPM's and Euler's scheduler
              ``previous_timestep`` — consumers (the GenRep posterior) read it instead of recomputing.
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


def _model_timestep(t: Tensor, batch: int, device) -> Tensor:
    """The timestep tensor [batch] the model receives: long, except fractional Euler timesteps."""
    t = t.reshape(()).to(device)
    if t.is_floating_point() and float(t) == round(float(t)):
        t = t.round().long()
    return t.expand(batch)


def _needs_noise(sampler: str, eta: float) -> bool:
    return sampler in ("ddpm", "euler-a") or eta > 0


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
    if sampler not in SCHEDULER_KINDS:
        raise UserError(f"unknown sampler {sampler!r}", f"use one of: {', '.join(SCHEDULER_KINDS)}")
    T = schedule.num_train_timesteps
    if not isinstance(num_steps, int) or not 1 <= num_steps <= T:
        raise UserError(f"num_steps must be an integer in [1, {T}], got {num_steps!r}", "use e.g. 50")
    if eta < 0 or (eta != 0 and sampler != "ddim"):
        raise UserError(f"eta={eta} is only meaningful for the ddim sampler (η ≥ 0)",
                        "drop eta or use sampler='ddim'")
    given_x = isinstance(x_T_or_shape, Tensor)
    if generator is None and (not given_x or _needs_noise(sampler, eta)):
        raise UserError(f"sampling with {sampler} from {'a shape' if not given_x else 'x_T'} is random "
                        "and needs a generator",
                        "pass generator=torch.Generator().manual_seed(SEED)")
    with torch.set_grad_enabled(grad):
        return _sample(model, x_T_or_shape, cond, schedule=schedule, sampler=sampler,
                       num_steps=num_steps, guidance=guidance or NoGuidance(), null_cond=null_cond,
                       eta=eta, generator=generator, record=record, record_device=record_device,
                       callback=callback, clip_x0=clip_x0, device=device, dtype=dtype,
                       progress=progress)


def _default_device(model):
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


def _sample(model, x_T_or_shape, cond, *, schedule, sampler, num_steps, guidance, null_cond, eta,
            generator, record, record_device, callback, clip_x0, device, dtype, progress):
    if isinstance(x_T_or_shape, Tensor):
        device = torch.device(device) if device is not None else x_T_or_shape.device
        dtype = dtype or x_T_or_shape.dtype
        x_T = x_T_or_shape.to(device=device, dtype=dtype)
    else:
        device = torch.device(device) if device is not None else _default_device(model)
        dtype = dtype or torch.float32
        shape = tuple(int(s) for s in x_T_or_shape)
        if len(shape) != 4:
            raise UserError(f"x_T shape must be (B, C, H, W), got {shape}", "pass a 4-tuple")
        x_T = torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)
    if x_T.ndim != 4:
        raise UserError(f"x_T must be [B, C, H, W], got shape {tuple(x_T.shape)}", "pass a 4-d tensor")
    B, C = x_T.shape[:2]

    cond = (cond or Conditioning()).to(device, dtype=dtype)
    if cond.batch_size is not None and cond.batch_size != B:
        cond = fit_batch(cond, B)
    null = null_cond.to(device, dtype=dtype) if null_cond is not None else None
    branches = guidance.branches(cond, null)
    n = len(branches)
    cond_all = branches[0] if n == 1 else Conditioning.cat(branches)

    T = schedule.num_train_timesteps
    learned = schedule.config.learned_variance
    native = schedule.config.prediction_type
    sched_type = schedule.scheduler_prediction_type(sampler)
    scheduler = schedule.make_scheduler(sampler)
    scheduler.set_timesteps(num_steps, device=device)
    timesteps = scheduler.timesteps
    step_kwargs = {"eta": eta} if sampler == "ddim" else {}

    describe = record or callback is not None
    recorder = _Recorder(len(timesteps), record_device if record_device is not None else device) if record else None
    state = x_T * scheduler.init_noise_sigma  # the scheduler's own space (VP except Euler)
    vp_scale_next = 1.0

    iterator = timesteps
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(timesteps, desc=f"sampling ({sampler})", leave=False)
    for i, t in enumerate(iterator):
        x_t = scheduler.scale_model_input(state, t)  # VP space for every scheduler
        if sampler == "euler-a":
            k = scheduler.step_index
            sigma, sigma_next = float(scheduler.sigmas[k]), float(scheduler.sigmas[k + 1])
            ab_t = torch.tensor(1.0 / (1.0 + sigma**2), dtype=torch.float64)
        else:
            ab_t = schedule.alpha_bar(t)

        x_in = x_t if n == 1 else x_t.repeat(n, 1, 1, 1)
        out = model(x_in, _model_timestep(t, B * n, device), cond_all)
        expected = 2 * C if learned else C
        if not isinstance(out, Tensor) or out.shape != (B * n, expected, *x_t.shape[2:]):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise UserError(f"the model returned {got}, expected {(B * n, expected, *x_t.shape[2:])}",
                            "check the model's out_channels against diffusion.learned_variance")
        var_v = None
        if learned:
            out, var_v = out[:, :C], out[:B, C:]  # learned variance from branch 0 (fully conditional)
        pred = guidance.combine(list(out.chunk(n, dim=0)))

        if clip_x0:
            x0 = convert_prediction(pred, native, "x0", x_t, ab_t).clamp(-1, 1)
            pred_s = convert_prediction(x0, "x0", sched_type, x_t, ab_t)
        else:
            pred_s = convert_prediction(pred, native, sched_type, x_t, ab_t)
        model_output = torch.cat([pred_s, var_v], dim=1) if (learned and sampler == "ddpm") else pred_s
        stepped = scheduler.step(model_output, t, state, generator=generator, **step_kwargs)
        prev = stepped.prev_sample
        if sampler == "euler-a":
            vp_scale_next = 1.0 / math.sqrt(1.0 + sigma_next**2)

        stop = False
        if describe:
            x0 = stepped.pred_original_sample.to(x_t.dtype)
            if sampler == "euler-a":
                mean, var = _euler_transition(x0, state, sigma, sigma_next, x_t)
                t_prev = int(round(float(timesteps[i + 1]))) if i + 1 < len(timesteps) else -1
            elif sampler == "ddim":
                t_prev = int(t) - T // num_steps
                eps = convert_prediction(pred_s, sched_type, "eps", x_t, ab_t)
                mean, var = posterior_from_alpha_bar(x0, x_t, ab_t, schedule.alpha_bar(t_prev), eta=eta, eps=eps)
            else:
                t_prev = int(scheduler.previous_timestep(t))
                mean, var = _ddpm_transition(schedule, x0, x_t, int(t), t_prev, var_v)
            step = TrajectoryStep(i, int(round(float(t))), x_t, x0, mean, var, max(t_prev, -1))
            if recorder is not None:
                recorder.add(step)
            if callback is not None:
                stop = callback(step) is True
        state = prev
        if stop:
            break

    final = state * vp_scale_next if sampler == "euler-a" else state
    return SampleOutput(final, recorder.result() if recorder is not None else None)


def _ddpm_transition(schedule: NoiseSchedule, x0, x_t, t: int, t_prev: int, var_v):
    """Posterior mean (Ho et al. Eq. 7) and the variance diffusers' DDPM adds (module doc)."""
    ab, abp = schedule.alpha_bar(t), schedule.alpha_bar(t_prev)
    mean, post_var = posterior_from_alpha_bar(x0, x_t, ab, abp, eta=1.0)
    if t <= 0:
        return mean, torch.zeros((), dtype=x_t.dtype, device=x_t.device)
    post_var = post_var.clamp(min=1e-20)
    if var_v is None:
        return mean, post_var
    beta = (1 - ab / abp).to(device=x_t.device, dtype=x_t.dtype)
    frac = (var_v + 1) / 2
    return mean, torch.exp(frac * torch.log(beta) + (1 - frac) * torch.log(post_var))


def _euler_transition(x0, s, sigma: float, sigma_next: float, x_t):
    """Euler-ancestral step (an Euler step of the probability-flow ODE of Karras et al. 2022, §2,
    to σ_down, plus fresh noise of std σ_up, as k-diffusion's ``sample_euler_ancestral``) in VP space.

    In σ-space: s' = x̂0 + σ_down·ε̂ + σ_up·z with ε̂ = (s − x̂0)/σ; VP: x' = s'/√(1+σ'²).
    """
    sigma_up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    sigma_down = math.sqrt(max(sigma_next**2 - sigma_up**2, 0.0))
    scale = 1.0 / math.sqrt(1.0 + sigma_next**2)
    eps = (s.to(x0.dtype) - x0) / sigma
    mean = scale * (x0 + sigma_down * eps)
    var = torch.tensor(scale**2 * sigma_up**2, dtype=x_t.dtype, device=x_t.device)
    return mean, var
