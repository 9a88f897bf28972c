"""Timestep strategies for training: which t each sample is trained at, and its loss weight.

``uniform`` is the standard DDPM draw t ~ U{0, …, T−1}. ADDP §3.1 adds contribution-aware
strategies (loss scaling and probability scaling by c_t²) through the same interface.
All draws come from the caller's seeded generator.
"""

from __future__ import annotations

import torch
from torch import Tensor

from genperc.errors import UserError


class TimestepSampler:
    """Draws ``t`` [B] and an optional per-sample loss weight [B] (None = all ones)."""

    def __init__(self, num_train_timesteps: int):
        self.T = num_train_timesteps

    def sample(self, batch_size: int, generator: torch.Generator, device=None) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError


class UniformTimesteps(TimestepSampler):
    def sample(self, batch_size, generator, device=None):
        t = torch.randint(0, self.T, (batch_size,), generator=generator, device=generator.device)
        return t.to(device), None


STRATEGIES: dict[str, type[TimestepSampler]] = {"uniform": UniformTimesteps}


def create_timestep_sampler(name: str, num_train_timesteps: int, **kwargs) -> TimestepSampler:
    if name not in STRATEGIES:
        raise UserError(f"unknown timestep strategy '{name}'", "choose one of: " + ", ".join(sorted(STRATEGIES)))
    return STRATEGIES[name](num_train_timesteps, **kwargs)
