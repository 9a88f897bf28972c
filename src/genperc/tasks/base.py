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

from genperc.errors import UserError


@dataclass
class TaskBatch:
    """What the trainer needs from a batch: the clean target and the conditions."""

    x0: Tensor  # [B, C, H, W] target image in [-1, 1]
    image: Tensor | None = None  # [B, 3, H, W] condition image in [-1, 1] (concatenated)
    texts: list[str] | None = None  # prompts / expressions (cross-attention)
    class_labels: Tensor | None = None  # [B] long
    extras: dict = field(default_factory=dict)  # task-specific tensors for augment (mask, valid, ...)
    # [B, 1, H, W] float at x0's pixel resolution, 1 where the pixel counts in the loss, 0 where it
    # does not (invalid depth, Marigold); None = every pixel counts. The diffusion objective averages
    # the squared error over the counted pixels (min-pooled to the latent grid in latent space).
    loss_mask: Tensor | None = None


class Task:
    """Base codec. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str] = "task"
    target_channels: ClassVar[int] = 3
    cond_channels: ClassVar[int] = 3  # channels of the concatenated condition image (0 = none)
    uses_text: ClassVar[bool] = True
    needs_prompt: ClassVar[bool] = True  # prediction needs a user prompt (referring expression, instruction)
    main_metric: ClassVar[str] = ""
    headline: ClassVar[tuple[str, ...]] = ()  # the other metrics every table shows beside main_metric

    @classmethod
    def headline_metrics(cls) -> list[str]:
        """The main metric, then the other headline metrics (the columns of eval and experiment tables)."""
        return list(dict.fromkeys([cls.main_metric, *cls.headline]))
    # decode() receives the generated image unclamped and clamps after its own reduction (Marigold:
    # channel mean, then clip); otherwise the image is clamped to [-1, 1] per channel first
    clamps_own_decode: ClassVar[bool] = False
    widen_mode: ClassVar[str] = "zero"  # pretrained conv_in widening for the condition: zero (IP2P) | tile (Marigold)
    augment_intensity: float = 0.0  # ADDP §3.2 intensity multiplier (set from train.augment)
    evaluation_resolution: str = "model"  # "model" | "ground-truth": where metrics are computed
    num_train_timesteps: int = 1000  # T, to turn t into the augmentation strength t/T

    def dataset(self, source, resolution: int):
        """A torch Dataset of this task's items over a :class:`~genperc.data.record.SceneSource`."""
        raise NotImplementedError

    def prepare(self, batch: dict) -> TaskBatch:
        """Encode a collated batch of dataset items into the target image and the conditions."""
        raise NotImplementedError

    def augment(self, batch: TaskBatch, t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Diffusion-tailored augmentation of the clean target at timestep t (ADDP §3.2).

        Returns the corrupted target image (pixel space, like ``batch.x0``) that is noised to x_t;
        the loss target stays the clean ``batch.x0``. Identity by default (returns ``batch.x0`` itself,
        which the trainer recognises to skip a second encoding).
        """
        return batch.x0

    def decode(self, x0: Tensor, batch: dict) -> Any:
        """Generated target image(s) → prediction."""
        raise NotImplementedError

    def decode_ensemble(self, members: list[Tensor], batch: dict | None = None) -> Any:
        """N generated images per item (a list of [B, C, H, W]) → one prediction per item.

        Default: decode the per-pixel median of the members. Depth overrides it with Marigold's
        scale-and-shift ensemble, referring segmentation with a majority vote of the masks."""
        return self.decode(torch.stack(members).median(0).values, batch)

    # -- the discriminative counterpart (``model.mode: discriminative``, ADDP Table 2) ---------

    def discriminative_loss(self, output: Tensor, batch: TaskBatch) -> dict[str, Tensor]:
        """The task's own loss ``{name: scalar}`` of the one-step estimate ``output`` [B, C, H, W]
        (x̂0 in the target image's space, unclamped, :mod:`genperc.models.discriminative`) against
        the ground truth of ``batch``. The names are the same at every step (they are logged as
        columns); the trainer sums them."""
        raise UserError(f"the {self.name} task has no discriminative loss",
                        "train it with model.mode=generative")

    def decode_discriminative(self, output: Tensor, batch: dict | None = None) -> Any:
        """The one-step estimate ``output`` → the same prediction :meth:`decode` returns, so that
        :meth:`metrics` and :meth:`export` are unchanged."""
        raise UserError(f"the {self.name} task has no discriminative decoding",
                        "evaluate a run trained with model.mode=generative")

    def metrics(self, prediction: Any, batch: dict) -> dict[str, Tensor | list]:
        """Per-sample metric values: tensors of shape [B] (NaN where a value does not apply), or
        lists of length B for values that only the split-level summary can use (e.g. detections)."""
        raise NotImplementedError

    def summarize(self, per_sample: dict[str, Tensor | list]) -> dict[str, float]:
        """Aggregate per-sample values over a split (default: the mean of each 1-d tensor)."""
        return {k: float(v.float().mean()) for k, v in per_sample.items() if isinstance(v, Tensor) and v.ndim == 1}

    def at_ground_truth_resolution(self, prediction: Any, batch: dict) -> tuple[Any, dict]:
        """The prediction resized to the ground truth's own resolution and the batch whose ground
        truth is that full-resolution one, for :meth:`metrics` (Marigold's evaluation protocol).
        Tasks whose dataset keeps no full-resolution ground truth do not offer it."""
        raise UserError(f"the {self.name} task has no evaluation at the ground truth's resolution",
                        "evaluate at the model's resolution")

    def settings(self) -> dict:
        """The evaluation settings printed with every result (thresholds, alignment, resolution)."""
        return {}

    def describe(self, batch: dict) -> list[dict]:
        """Identifying columns of each item of a batch for per-sample result tables."""
        n = len(batch["image"])
        rows = [{"index": int(batch["index"][i]) if "index" in batch else i} for i in range(n)]
        for i, row in enumerate(rows):
            meta = batch.get("meta", [{}] * n)[i]
            if "record_index" in meta:
                row["record_index"] = meta["record_index"]
            for key in ("subtask", "family", "text"):
                if key in batch:
                    row[key] = batch[key][i]
        return rows

    # -- prediction on user images (``genperc predict``) ------------------------------------

    def request(self, image: Tensor, prompts: list[str] | None = None) -> tuple[TaskBatch, dict]:
        """Conditions for images [B, 3, H, W] in [−1, 1] and prompts, without ground truth:
        a TaskBatch whose ``x0`` is only a placeholder of the target's shape, and the ``batch`` dict
        that :meth:`decode` receives. Raise :class:`~genperc.errors.UserError` for a bad prompt."""
        raise NotImplementedError

    def export(self, prediction: Any, out_dir, image, stem: str = "prediction") -> list:
        """Write one item's prediction files and visualisations at the size of ``image`` (uint8
        [H, W, 3], the user's original image); return the paths written."""
        raise NotImplementedError
