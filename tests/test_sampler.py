"""The reverse-process sampler (genperc.diffusion.sampler)."""

import warnings

import pytest
import torch
from diffusers import DDIMScheduler

import genperc.diffusion.sampler as sampler_mod
from genperc.diffusion.conditioning import Conditioning
from genperc.diffusion.guidance import (
    ClassifierFreeGuidance,
    CorrectionalGuidance,
    InstructPix2PixGuidance,
    NoGuidance,
)
from genperc.diffusion.sampler import Trajectory, sample
from genperc.diffusion.schedule import DiffusionConfig, NoiseSchedule, posterior_from_alpha_bar
from genperc.errors import UserError

SHAPE = (2, 3, 4, 4)


def _schedule(**kw) -> NoiseSchedule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return NoiseSchedule(DiffusionConfig(**kw))


def _x0(seed=0):
    return torch.rand(SHAPE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def oracle(schedule: NoiseSchedule, x0: torch.Tensor):
    """A model that returns the exact prediction for a known x0 (in the schedule's type)."""

    def model(x, t, cond):
        x0r = x0.repeat(x.shape[0] // x0.shape[0], 1, 1, 1)
        pred = schedule.convert(x0r.double(), "x0", schedule.config.prediction_type, x.double(), t.long())
        return pred.to(x.dtype)

    return model


def smooth_model(x, t, cond):
    """A deterministic, non-trivial stand-in for a denoiser (depends on x and t)."""
    return 0.6 * x + 0.2 * torch.sin(t.float() / 97.0).view(-1, 1, 1, 1) + 0.1 * x.roll(1, dims=-1)


# (a) ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pred", ["eps", "x0", "v"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_our_ddim_step_equals_diffusers(pred, spacing):
    sched = _schedule(prediction_type=pred, timestep_spacing=spacing)
    ref = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                        prediction_type={"eps": "epsilon", "x0": "sample", "v": "v_prediction"}[pred],
                        timestep_spacing=spacing)
    ref.set_timesteps(10)
    g = torch.Generator().manual_seed(3)
    for t in ref.timesteps:
        x_t, out, z = (torch.randn(SHAPE, generator=g) for _ in range(3))
        t_prev = int(t) - 1000 // 10
        x0 = sched.to_x0(out, x_t, t)
        eps = sched.to_eps(out, x_t, t)
        for eta in (0.0, 0.6):
            mean, var = sched.posterior_mean_variance(x0, x_t, t, t_prev, eta=eta, eps=eps)
            step = ref.step(out, t, x_t, eta=eta, variance_noise=z if eta > 0 else None)
            expected = step.prev_sample
            got = mean + var.sqrt() * z if eta > 0 else mean
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(x0, step.pred_original_sample, rtol=1e-5, atol=1e-5)


# (b) ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pred", ["eps", "x0", "v"])
@pytest.mark.parametrize("steps,spacing", [(1, "trailing"), (3, "trailing"), (7, "leading"), (25, "linspace")])
def test_ddim_with_oracle_recovers_x0(pred, steps, spacing):
    sched = _schedule(prediction_type=pred, timestep_spacing=spacing)
    x0 = _x0()
    out = sample(oracle(sched, x0), SHAPE, schedule=sched, sampler="ddim", num_steps=steps,
                 generator=torch.Generator().manual_seed(1), record=True)
    torch.testing.assert_close(out.sample, x0, rtol=0, atol=1e-5)
    tr = out.trajectory
    assert len(tr) == steps
    for k in range(steps):
        torch.testing.assert_close(tr.pred_x0[k], x0, rtol=0, atol=1e-4)


def test_zero_terminal_snr_sampling_stays_finite():
    for pred in ("eps", "v"):
        sched = _schedule(prediction_type=pred, zero_terminal_snr=True, timestep_spacing="trailing")
        x0 = _x0()
        out = sample(oracle(sched, x0), SHAPE, schedule=sched, num_steps=1,
                     generator=torch.Generator().manual_seed(0), record=True)
        assert torch.isfinite(out.sample).all() and torch.isfinite(out.trajectory.mean).all()
        assert out.trajectory.timesteps.tolist() == [999]
        if pred == "v":  # x0 is recoverable from v at ᾱ = 0
            torch.testing.assert_close(out.sample, x0, rtol=0, atol=1e-5)


# (c) ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ddpm", "ddim", "euler-a"])
def test_trajectory_shapes_and_timesteps(kind):
    sched = _schedule(timestep_spacing="leading")
    out = sample(smooth_model, SHAPE, schedule=sched, sampler=kind, num_steps=5,
                 generator=torch.Generator().manual_seed(0), record=True)
    tr = out.trajectory
    assert isinstance(tr, Trajectory) and len(tr) == 5
    assert tr.timesteps.dtype == torch.long
    assert tr.timesteps.tolist() == [800, 600, 400, 200, 0]
    assert tr.timesteps.tolist() == [round(float(t)) for t in sched.timesteps(kind, 5)]
    # "leading", stride 1000 // 5 = 200: every sampler steps to the next listed timestep; after
    # t = 0 comes the clean x0 (−1; DDIM's 0 − 200 clamped).
    assert tr.prev_timesteps.tolist() == [600, 400, 200, 0, -1]
    for name in ("x_t", "pred_x0", "mean"):
        assert getattr(tr, name).shape == (5, *SHAPE)
        assert getattr(tr, name).device.type == "cpu"
    assert tr.variance.shape == (5,)
    assert out.sample.shape == SHAPE
    step = tr[2]
    assert step.index == 2 and step.timestep == 400 and step.x_t.shape == SHAPE


def _replay(shape, seed, kind, eta, timesteps):
    """The noises the sampler draws from a generator seeded with ``seed``, in order."""
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(shape, generator=g)
    zs = []
    for t in timesteps:
        draws = kind == "euler-a" or (kind == "ddim" and eta > 0) or (kind == "ddpm" and int(t) > 0)
        zs.append(torch.randn(shape, generator=g) if draws else torch.zeros(shape))
    return x_T, zs


@pytest.mark.parametrize(
    "kind,eta,spacing,learned",
    [
        ("ddpm", 0.0, "leading", False),
        ("ddpm", 0.0, "trailing", True),
        ("ddim", 0.0, "leading", False),
        ("ddim", 0.7, "trailing", False),
        ("euler-a", 0.0, "leading", False),
        ("euler-a", 0.0, "trailing", False),
    ],
)
def test_recorded_mean_and_variance_are_the_transition_taken(kind, eta, spacing, learned):
    """x_{k+1} = mean_k + √variance_k · z_k with the generator's own noise z_k, for every step."""
    sched = _schedule(prediction_type="v", timestep_spacing=spacing, learned_variance=learned)

    def model(x, t, cond):
        out = smooth_model(x, t, cond)
        return torch.cat([out, torch.tanh(x)], dim=1) if learned else out

    n = 6
    out = sample(model, SHAPE, schedule=sched, sampler=kind, num_steps=n, eta=eta,
                 generator=torch.Generator().manual_seed(11), record=True)
    tr = out.trajectory
    x_T, zs = _replay(SHAPE, 11, kind, eta, sched.timesteps(kind, n))
    if kind != "euler-a" or spacing == "leading":  # leading: init_noise_sigma = √(1+σ²)
        torch.testing.assert_close(tr.x_t[0], x_T)
    nxt = [*tr.x_t[1:], out.sample]
    for k in range(n):
        torch.testing.assert_close(tr.mean[k] + tr.variance[k].sqrt() * zs[k], nxt[k], rtol=1e-4, atol=1e-4)
    if learned:
        assert tr.variance.shape == (n, *SHAPE)
    if kind == "euler-a":  # Euler-ancestral's VP variance is the DDPM posterior variance (η = 1)
        sch = sched.make_scheduler("euler-a")
        sch.set_timesteps(n)
        ab = 1 / (1 + sch.sigmas.double() ** 2)
        for k in range(n):
            _, var = posterior_from_alpha_bar(tr.x_t[k], tr.x_t[k], ab[k], ab[k + 1], eta=1.0)
            assert tr.variance[k].item() == pytest.approx(var.item(), rel=1e-4, abs=1e-7)


# "trailing", 7 steps: round(arange(1000, 0, −1000/7)) − 1 (diffusers' rule, by hand).
TRAILING_7 = [999, 856, 713, 570, 428, 285, 142]


@pytest.mark.parametrize("kind", ["ddpm", "euler-a"])
def test_prev_timestep_is_the_next_listed_timestep_under_trailing_spacing(kind):
    sched = _schedule(timestep_spacing="trailing")
    out = sample(smooth_model, SHAPE, schedule=sched, sampler=kind, num_steps=7,
                 generator=torch.Generator().manual_seed(0), record=True)
    tr = out.trajectory
    assert tr.timesteps.tolist() == TRAILING_7
    assert tr.prev_timesteps.tolist() == [*TRAILING_7[1:], -1]
    assert [tr[k].prev_timestep for k in range(7)] == [*TRAILING_7[1:], -1]


def test_ddim_prev_timestep_is_the_level_diffusers_steps_to_under_trailing_spacing():
    """diffusers' DDIM steps from t to t − 1000 // 7 = t − 142 (not to the next listed timestep);
    the deterministic next state is √ᾱ'·x̂0 + √(1−ᾱ')·ε̂ at exactly that ᾱ'."""
    sched = _schedule(prediction_type="v", timestep_spacing="trailing")
    out = sample(smooth_model, SHAPE, schedule=sched, sampler="ddim", num_steps=7,
                 generator=torch.Generator().manual_seed(0), record=True)
    tr = out.trajectory
    assert tr.prev_timesteps.tolist() == [857, 714, 571, 428, 286, 143, 0]
    assert tr.prev_timesteps[:-1].tolist() != tr.timesteps[1:].tolist()
    nxt = [*tr.x_t[1:], out.sample]
    for k in range(7):
        ab, ab_prev = sched.alpha_bar(tr.timesteps[k]), sched.alpha_bar(tr.prev_timesteps[k])
        x_t, x0 = tr.x_t[k].double(), tr.pred_x0[k].double()
        eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        expected = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
        torch.testing.assert_close(nxt[k].double(), expected, rtol=1e-4, atol=1e-4)


def _learned_model(x, t, cond):
    return torch.cat([smooth_model(x, t, cond), torch.tanh(2 * x)], dim=1)  # v ∈ (−1, 1) varies per element


@pytest.mark.parametrize("spacing,steps", [("leading", 10), ("trailing", 7)])
def test_ddpm_learned_range_variance_equals_diffusers(spacing, steps):
    """The strided step's learned-range variance is diffusers' DDPMScheduler's (variance_type
    "learned_range": Eq. 15 between β̃ and β of the step t → previous_timestep)."""
    from diffusers import DDPMScheduler

    sched = _schedule(timestep_spacing=spacing, learned_variance=True)
    out = sample(_learned_model, SHAPE, schedule=sched, sampler="ddpm", num_steps=steps,
                 generator=torch.Generator().manual_seed(2), record=True)
    tr = out.trajectory
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        variance_type="learned_range", timestep_spacing=spacing)
    ref.set_timesteps(steps)
    for k, t in enumerate(ref.timesteps):
        v = torch.tanh(2 * tr.x_t[k])
        expected = torch.exp(ref._get_variance(int(t), predicted_variance=v)) if t > 0 else torch.zeros(SHAPE)
        torch.testing.assert_close(tr.variance[k], expected, rtol=1e-5, atol=1e-12)
    assert tr.variance[0].std() > 0  # the learned part is not a constant


def test_ddpm_learned_variance_is_improved_ddpm_for_unit_stride():
    """With one step per training timestep (t → t − 1) the sampler's variance is the variance
    module's Σ_θ = exp(learned_log_variance) for every t ≥ 1."""
    from genperc.diffusion.variance import learned_log_variance

    sched = _schedule(num_train_timesteps=20, beta_schedule="linear", beta_start=1e-3, beta_end=0.2,
                      learned_variance=True)
    tr = sample(_learned_model, SHAPE, schedule=sched, sampler="ddpm", num_steps=20,
                generator=torch.Generator().manual_seed(4), record=True).trajectory
    assert tr.timesteps.tolist() == list(range(19, -1, -1))
    for k in range(19):  # the last step (t = 0) adds no noise
        t = torch.full((SHAPE[0],), int(tr.timesteps[k]))
        expected = learned_log_variance(sched, torch.tanh(2 * tr.x_t[k]), t).exp()
        torch.testing.assert_close(tr.variance[k], expected, rtol=1e-5, atol=0)


def test_euler_fractional_timesteps_reach_the_model_as_floats():
    sched = _schedule(timestep_spacing="linspace")
    seen = []

    def model(x, t, cond):
        seen.append(t.clone())
        return smooth_model(x, t, cond)

    out = sample(model, SHAPE, schedule=sched, sampler="euler-a", num_steps=5,
                 generator=torch.Generator().manual_seed(0), record=True)
    assert seen[0].dtype == torch.long and seen[1].is_floating_point()  # 999, then 749.25
    assert seen[1][0].item() == pytest.approx(749.25)
    assert out.trajectory.timesteps.tolist() == [999, 749, 500, 250, 0]


# (d) ------------------------------------------------------------------------------------------


def test_record_false_keeps_and_computes_nothing(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("step description computed although nobody asked for it")

    monkeypatch.setattr(sampler_mod, "posterior_from_alpha_bar", boom)
    monkeypatch.setattr(sampler_mod._Stepper, "describe", boom)
    for stepper in sampler_mod.STEPPERS.values():
        monkeypatch.setattr(stepper, "transition", boom)
    for kind in ("ddpm", "ddim", "euler-a"):
        out = sample(smooth_model, SHAPE, schedule=_schedule(), sampler=kind, num_steps=3,
                     generator=torch.Generator().manual_seed(0))
        assert out.trajectory is None and out.sample.shape == SHAPE


# (e) ------------------------------------------------------------------------------------------


def test_callback_streams_every_step_and_can_stop():
    sched = _schedule()
    kwargs = dict(schedule=sched, sampler="ddim", num_steps=6, generator=torch.Generator().manual_seed(0))
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    seen = []
    full = sample(smooth_model, x_T, record=True, callback=seen.append, **kwargs)
    assert [s.index for s in seen] == list(range(6))
    assert [s.timestep for s in seen] == full.trajectory.timesteps.tolist()
    for s in seen:
        torch.testing.assert_close(s.x_t, full.trajectory.x_t[s.index])
        torch.testing.assert_close(s.mean, full.trajectory.mean[s.index])
    gathered = Trajectory.from_steps(seen)  # a streaming consumer can stack what it saw
    assert torch.equal(gathered.timesteps, full.trajectory.timesteps)
    torch.testing.assert_close(gathered.pred_x0, full.trajectory.pred_x0)

    calls = []

    def stop_after_three(step):
        calls.append(step.index)
        return step.index == 2

    part = sample(smooth_model, x_T, record=True, callback=stop_after_three, **kwargs)
    assert calls == [0, 1, 2]
    assert len(part.trajectory) == 3
    torch.testing.assert_close(part.sample, full.trajectory.x_t[3])  # the state reached


# (f) ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,eta", [("ddpm", 0.0), ("ddim", 0.5), ("euler-a", 0.0)])
def test_same_generator_seed_same_samples(kind, eta):
    def run(seed):
        return sample(smooth_model, SHAPE, schedule=_schedule(), sampler=kind, num_steps=4, eta=eta,
                      generator=torch.Generator().manual_seed(seed)).sample

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


# (g) ------------------------------------------------------------------------------------------


def _conds(B=2, L=3, D=4):
    g = torch.Generator().manual_seed(0)
    cond = Conditioning(text=torch.randn(B, L, D, generator=g), text_mask=torch.ones(B, L, dtype=torch.bool),
                        image=torch.randn(B, 3, 4, 4, generator=g))
    null = Conditioning(text=torch.zeros(1, 2, D), text_mask=torch.ones(1, 2, dtype=torch.bool))
    neg = Conditioning(text=torch.ones(1, 5, D), text_mask=torch.ones(1, 5, dtype=torch.bool))
    return cond, null, neg


@pytest.mark.parametrize(
    "guidance,branches",
    [
        (NoGuidance(), 1),
        (ClassifierFreeGuidance(3.0), 2),
        (InstructPix2PixGuidance(3.0, 1.5), 3),
        ("correctional", 4),
    ],
)
def test_guidance_branches_go_through_one_forward_per_step(guidance, branches):
    cond, null, neg = _conds()
    if guidance == "correctional":
        guidance = CorrectionalGuidance(image_scale=1.5, negative_scale=1.0, text_scale=3.0, negative=neg)
    batches = []

    def counting_model(x, t, c):
        batches.append((x.shape[0], t.shape[0], c.text.shape[0], c.image.shape[0]))
        return smooth_model(x, t, c) + c.text.mean(dim=(1, 2)).view(-1, 1, 1, 1) + 0.1 * c.image

    sample(counting_model, SHAPE, cond, schedule=_schedule(), num_steps=5, guidance=guidance, null_cond=null,
           generator=torch.Generator().manual_seed(0))
    assert len(batches) == 5
    assert set(batches) == {(2 * branches,) * 4}


def test_conditioning_of_batch_one_is_broadcast():
    """A condition of batch 1 acts as the same condition repeated for every sample."""
    cond, null, _ = _conds(B=1)

    def model(x, t, c):
        return smooth_model(x, t, c) + c.image + c.text.mean(dim=(1, 2)).view(-1, 1, 1, 1)

    kwargs = dict(schedule=_schedule(), num_steps=2, guidance=ClassifierFreeGuidance(2.0), null_cond=null)
    one = sample(model, SHAPE, cond, generator=torch.Generator().manual_seed(0), **kwargs).sample
    repeated = sample(model, SHAPE, cond.repeat(SHAPE[0]), generator=torch.Generator().manual_seed(0), **kwargs)
    torch.testing.assert_close(one, repeated.sample, rtol=0, atol=0)
    with pytest.raises(UserError, match="batch size 3"):
        sample(model, SHAPE, cond.repeat(3), generator=torch.Generator().manual_seed(0), **kwargs)


# other behaviour ------------------------------------------------------------------------------


def test_clip_x0_clamps_the_prediction():
    sched = _schedule(prediction_type="x0")
    out = sample(lambda x, t, c: torch.full_like(x, 3.0), SHAPE, schedule=sched, num_steps=4,
                 generator=torch.Generator().manual_seed(0), record=True, clip_x0=True)
    assert out.trajectory.pred_x0.max().item() == 1.0
    torch.testing.assert_close(out.sample, torch.ones(SHAPE))


def test_user_errors():
    sched, g = _schedule(), torch.Generator().manual_seed(0)
    with pytest.raises(UserError, match="unknown sampler"):
        sample(smooth_model, SHAPE, schedule=sched, sampler="heun", generator=g)
    with pytest.raises(UserError, match="eta"):
        sample(smooth_model, SHAPE, schedule=sched, sampler="euler-a", eta=0.5, generator=g)
    with pytest.raises(UserError, match="generator"):
        sample(smooth_model, SHAPE, schedule=sched, sampler="ddim")
    with pytest.raises(UserError, match="generator"):
        sample(smooth_model, torch.zeros(SHAPE), schedule=sched, sampler="ddpm")
    with pytest.raises(UserError, match="num_steps"):
        sample(smooth_model, SHAPE, schedule=sched, num_steps=0, generator=g)
    with pytest.raises(UserError, match="learned_variance"):
        sample(lambda x, t, c: torch.cat([x, x], 1), SHAPE, schedule=sched, generator=g)
    # a deterministic run from a given x_T needs no generator
    sample(smooth_model, torch.zeros(SHAPE), schedule=sched, sampler="ddim", num_steps=2)
