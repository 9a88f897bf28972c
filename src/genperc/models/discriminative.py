"""The discriminative counterpart's forward (ADDP Table 2; ``model.mode: discriminative``).

Garcia et al., "Fine-Tuning Image-Conditional Diffusion Models is Easier than You Think" (WACV
2025), turn an image-conditional diffusion model into a deterministic one-step predictor: evaluate
the denoiser once, at the last training timestep t = T−1, with the noise input replaced by zeros
(x_T = 0), and train it end to end with the task's own loss. The network, its text encoder and its
image conditioning are exactly the generative run's; only the input is deterministic.

The raw output is turned into the estimate of the clean target with the run's prediction type at
t = T−1 (:meth:`~genperc.diffusion.schedule.NoiseSchedule.to_x0` with x_t = 0: x0-prediction is the
output itself, v-prediction −√(1−ᾱ)·v, ε-prediction −√((1−ᾱ)/ᾱ)·ε), the learned-variance half of
the channels (if any) dropped, and decoded to the target image's space (the identity in pixel
space; the frozen VAE decoder, with gradients, in latent space — Garcia et al. also put their loss
behind the decoder). Every task loss reads that x̂0 (``Task.discriminative_loss``); tasks whose loss
needs logits take them from x̂0 (e.g. the channel mean for masks), never from the raw output, so one
estimate serves every prediction type.

Training (``genperc.training.objectives.DiscriminativeObjective``) and evaluation
(``genperc.evaluation.evaluate.sample_targets``) both call :func:`discriminative_forward`, so the
trained function and the evaluated one are the same.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from genperc.diffusion.conditioning import Conditioning


def discriminative_timestep(schedule) -> int:
    """t = T − 1, the one timestep the discriminative model is evaluated at (Garcia et al. §4)."""
    return int(schedule.num_train_timesteps) - 1


def discriminative_forward(model, cond: Conditioning, schedule, space, target_shape, *, device=None,
                           autocast=None) -> Tensor:
    """The target-space estimate x̂0 [B, C, H, W] (float32, unclamped, differentiable) of one
    forward of ``model`` at t = T−1 on x_T = 0 with the conditions ``cond``.

    ``target_shape``: the shape of the task's target image (pixel space); ``autocast``: a callable
    returning the mixed-precision context of the forward (the trainer's ``accelerator.autocast``;
    None = full precision); the conversion to x̂0 and the decoding run in float32 outside it."""
    device = device if device is not None else next(model.parameters()).device
    shape = space.latent_shape(tuple(target_shape))
    x_t = torch.zeros(shape, device=device)
    t = torch.full((shape[0],), discriminative_timestep(schedule), dtype=torch.long, device=device)
    with autocast() if autocast is not None else contextlib.nullcontext():
        out = model(x_t, t, cond)
    prediction = out[:, : shape[1]].float()  # a learned-variance model's second half is not a prediction
    x0 = schedule.to_x0(prediction, x_t, t)
    return space.decode(x0, clamp=False, grad=True).float()
