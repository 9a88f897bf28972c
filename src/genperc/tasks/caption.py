"""Text-to-image generation on scene captions: the world's stand-in for Stable Diffusion's
pretraining (issue 12; ``genperc pretrain``).

ADDP, Marigold and InstructPix2Pix fine-tune a text-to-image model that already knows which words
go with which pixels. The shapes world has no such model, so this task trains one on the world
itself: the target ``x0`` is the scene image, there is no image condition, and the text is a
caption written from the scene's annotations by :func:`scene_caption` — every object's size,
colour, material and shape, listed from left to right ("from left to right: a large gray rubber
cube, a small blue metal sphere and a small yellow rubber cylinder"). A perception task then
starts from this denoiser with ``model.pretrained`` (the condition image widened into ``conv_in``,
as InstructPix2Pix and Marigold widen SD's).

The generated image is its own prediction. Its score, ``colour_overlap``, is the histogram
intersection of the generated and the real image's colours (4 bins per RGB channel, 64 cells; 1 =
the same colour distribution): a model that paints the caption's colours in about the right
amounts scores high, whatever the layout. It is a sanity check of the generator, not an image
quality metric.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from genperc.data.datasets import SceneDataset
from genperc.errors import UserError
from genperc.tasks.base import Task, TaskBatch

HISTOGRAM_BINS = 4  # per RGB channel


def _attribute(obj, *names: str):
    for name in names:
        value = obj.attributes.get(name)
        if value is not None:
            return value
    return None


def object_phrase(obj) -> str:
    """"a large gray rubber cube": the object's size, colour, material and category (what it has)."""
    words = [_attribute(obj, "size"), _attribute(obj, "color", "colour"), _attribute(obj, "material"), obj.category]
    phrase = " ".join(str(w) for w in words if w)
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def scene_caption(record) -> str:
    """The caption of a scene: its objects' phrases from left to right (box centres)."""
    objects = sorted(record.objects, key=lambda o: (0.0 if o.box is None else (o.box[0] + o.box[2]) / 2, o.id))
    phrases = [object_phrase(o) for o in objects]
    if not phrases:
        return "an empty floor"
    if len(phrases) == 1:
        return phrases[0]
    return "from left to right: " + ", ".join(phrases[:-1]) + " and " + phrases[-1]


class CaptionDataset(SceneDataset):
    """The scene image and its caption (``text``)."""

    def _targets(self, record_index, record, plan):
        return {"text": scene_caption(record)}


def colour_histogram(images: Tensor, bins: int = HISTOGRAM_BINS) -> Tensor:
    """Normalised joint RGB histograms [B, bins³] of images [B, 3, H, W] in [−1, 1]."""
    q = ((images.float().clamp(-1, 1) + 1) / 2 * bins).long().clamp(0, bins - 1)
    cell = (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]
    hist = torch.zeros(images.shape[0], bins**3, device=images.device)
    hist.scatter_add_(1, cell.flatten(1), torch.ones_like(cell.flatten(1), dtype=hist.dtype))
    return hist / hist.sum(1, keepdim=True)


class CaptionTask(Task):
    """Caption-to-image generation (module docstring)."""

    name: ClassVar[str] = "caption"
    target_channels: ClassVar[int] = 3
    cond_channels: ClassVar[int] = 0
    uses_text: ClassVar[bool] = True
    needs_prompt: ClassVar[bool] = True
    main_metric: ClassVar[str] = "colour_overlap"

    def dataset(self, source, resolution: int):
        return CaptionDataset(source, resolution)

    def prepare(self, batch: dict) -> TaskBatch:
        return TaskBatch(x0=batch["image"], texts=list(batch["text"]))

    def decode(self, x0: Tensor, batch: dict | None = None) -> Tensor:
        """A generated image is its own prediction (clipped to [−1, 1])."""
        return x0.clamp(-1, 1)

    def metrics(self, prediction: Tensor, batch: dict) -> dict[str, Tensor]:
        real = batch["image"].to(prediction.device)
        overlap = torch.minimum(colour_histogram(prediction), colour_histogram(real)).sum(1)
        return {"colour_overlap": overlap}

    def settings(self) -> dict:
        return {"colour_bins_per_channel": HISTOGRAM_BINS}

    def request(self, image: Tensor, prompts: list[str] | None = None) -> tuple[TaskBatch, dict]:
        if not prompts or any(not str(p).strip() for p in prompts):
            raise UserError("the caption task needs a caption per image", 'pass --prompt "a large blue metal cube"')
        if len(prompts) != image.shape[0]:
            raise UserError(f"{len(prompts)} caption(s) for {image.shape[0]} image(s)", "pass one caption per image")
        return TaskBatch(x0=torch.zeros_like(image), texts=[str(p) for p in prompts]), {"image": image}

    def export(self, prediction: Any, out_dir, image, stem: str = "prediction") -> list:
        from pathlib import Path

        from PIL import Image

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        array = ((torch.as_tensor(prediction).float().clamp(-1, 1) + 1) * 127.5).round().byte()
        path = out / f"{stem}.png"
        Image.fromarray(np.ascontiguousarray(array.permute(1, 2, 0).cpu().numpy())).save(path)
        return [path]
