"""The task codec interface: perception as image generation (ADDP §2).

A task turns ground truth into a target image ``x0`` the denoiser learns to generate, decodes a
generated image back into a prediction, scores it, and may corrupt the clean target before noising
(``augment``, ADDP §3.2). The trainer and the sampler never branch on the task: everything
task-specific is here. Adding a task is one file registered in ``genperc.tasks``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor


@dataclass
class TaskBatch:
    """What the trainer needs from a batch: the clean target and the conditions."""

    x0: Tensor  # [B, C, H, W] target image in [-1, 1]
    image: Tensor | None = None  # [B, 3, H, W] condition image in [-1, 1] (concatenated)
    texts: list[str] | None = None  # prompts / expressions (cross-attention)
    class_labels: Tensor | None = None  # [B] long
    extras: dict = field(default_factory=dict)  # task-specific tensors for augment (mask, valid, ...)


class Task:
    """Base codec. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str] = "task"
    target_channels: ClassVar[int] = 3
    cond_channels: ClassVar[int] = 3  # channels of the concatenated condition image (0 = none)
    uses_text: ClassVar[bool] = True
    main_metric: ClassVar[str] = ""
    augment_intensity: float = 0.0  # ADDP §3.2 intensity multiplier (set from train.augment)
    num_train_timesteps: int = 1000  # T, to turn t into the augmentation strength t/T

    def dataset(self, source, resolution: int):
        """A torch Dataset of this task's items over a :class:`~genperc.data.record.SceneSource`."""
        raise NotImplementedError

    def prepare(self, batch: dict) -> TaskBatch:
        """Encode a collated batch of dataset items into the target image and the conditions."""
        raise NotImplementedError

    def augment(self, tb: TaskBatch, t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Diffusion-tailored augmentation of the clean target at timestep t (ADDP §3.2).

        Returns the corrupted target image (pixel space, like ``tb.x0``) that is noised to x_t;
        the loss target stays the clean ``tb.x0``. Identity by default (returns ``tb.x0`` itself,
        which the trainer recognises to skip a second encoding).
        """
        return tb.x0

    def decode(self, x0: Tensor, batch: dict) -> Any:
        """Generated target image(s) → prediction."""
        raise NotImplementedError

    def metrics(self, prediction: Any, batch: dict) -> dict[str, Tensor]:
        """Per-sample metric values, each a tensor of shape [B]."""
        raise NotImplementedError

    def summarize(self, per_sample: dict[str, Tensor]) -> dict[str, float]:
        """Aggregate per-sample values over a split (default: the mean of each)."""
        return {k: float(v.float().mean()) for k, v in per_sample.items()}
