"""Classification as class-conditional generation (GenRep's data, the digits, the shapes world).

The target ``x0`` is the image itself and the condition is the class label (no image condition,
no text): the denoiser learns p(x|y). Perception does not decode a generated target here — the
GenRep heads read the denoiser's features — so ``metrics`` takes class logits (or probabilities)
and ``decode`` returns generated images (clipped to [−1, 1]).

Options:

* ``classes``: keep only these classes (names or indices of the source's class list), relabelled
  0 … K−1 in the given order — e.g. a shape × colour subset of the world.
* ``dense``: also load ``semantic`` (category map, −1 = ignore) and ``depth`` / ``valid`` when the
  source has them (world scenes), for GenRep's segmentation and depth heads.
* ``genrep``: GenRep training settings (:class:`genperc.training.genrep.GenRepConfig` as a dict),
  carried in the run config so that a GenRep run directory describes itself. The codec ignores
  them.

Per-sample metrics: ``correct`` (top-1), ``correct5`` (top-5, when K ≥ 5), ``nll``,
``confidence`` (max probability). :meth:`summarize` adds ``top1``, ``top5`` and ``ece``
(15 equal-width confidence bins, :func:`expected_calibration_error`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from genperc.data.datasets import ClassificationDataset, DepthDataset, SemanticDataset
from genperc.errors import UserError
from genperc.metrics import expected_calibration_error
from genperc.tasks.base import Task, TaskBatch


class _Subset(torch.utils.data.Dataset):
    """Items of ``base`` whose label is in ``keep`` (old index → new label)."""

    def __init__(self, base, keep: dict[int, int], names: list[str]):
        self.base, self.keep = base, keep
        self.classes = names
        self.source = base.source
        self.indices = [i for i in range(len(base.source)) if _label_of(base.source, i) in keep]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        item = self.base[self.indices[i]]
        item["label"] = torch.tensor(self.keep[int(item["label"])], dtype=torch.int64)
        item["index"] = i
        return item


def _label_of(source, i: int) -> int | None:
    labels = getattr(source, "labels", None)
    indices = getattr(source, "indices", None)
    if labels is not None and indices is not None:  # DigitsSource: no image decoding needed
        return int(labels[indices[i]])
    return source[i].class_label


class ClassificationItems(ClassificationDataset):
    """:class:`ClassificationDataset` plus, with ``dense``, the semantic and depth targets."""

    def __init__(self, source, resolution=None, fit: str = "stretch", dense: bool = False):
        super().__init__(source, resolution, fit)
        self.dense = dense
        self.depth_resize, self.valid_threshold, self.ground_truth = "masked_average", 0.5, False

    def _targets(self, record_index, record, plan):
        out = super()._targets(record_index, record, plan)
        if self.dense:
            if record.semantic is not None or record.instances is not None:
                out.update(SemanticDataset._targets(self, record_index, record, plan))
            if record.depth is not None:
                out.update(DepthDataset._targets(self, record_index, record, plan))
        return out


class ClassificationTask(Task):
    """Class-conditional generation codec with classification metrics (module docstring)."""

    name: ClassVar[str] = "classification"
    target_channels: ClassVar[int] = 3
    cond_channels: ClassVar[int] = 0
    uses_text: ClassVar[bool] = False
    needs_prompt: ClassVar[bool] = False
    main_metric: ClassVar[str] = "top1"
    headline: ClassVar[tuple[str, ...]] = ("nll",)

    def __init__(self, classes: list | None = None, dense: bool = False, genrep: dict | None = None):
        self.classes_option = None if classes is None else list(classes)
        self.dense = bool(dense)
        self.genrep = dict(genrep or {})
        self.class_names: list[str] = []
        self.num_classes = 0

    def dataset(self, source, resolution: int):
        base = ClassificationItems(source, resolution, dense=self.dense)
        names = list(base.classes)
        if not names:
            raise UserError(f"{type(source).__name__} has no class list", "use a source with class labels "
                            "(digits, or a world split rendered with a label scheme)")
        if self.classes_option is None:
            self.class_names, self.num_classes = names, len(names)
            return base
        keep: dict[int, int] = {}
        chosen = []
        for new, c in enumerate(self.classes_option):
            old = names.index(c) if isinstance(c, str) and c in names else (int(c) if str(c).isdigit() else None)
            if old is None or not 0 <= old < len(names):
                raise UserError(f"task_options.classes: unknown class {c!r}", "valid classes: " + ", ".join(names))
            keep[old] = new
            chosen.append(names[old])
        self.class_names, self.num_classes = chosen, len(chosen)
        return _Subset(base, keep, chosen)

    def prepare(self, batch: dict) -> TaskBatch:
        extras = {"index": batch["index"]} if "index" in batch else {}
        for k in ("semantic", "depth", "valid"):
            if k in batch:
                extras[k] = batch[k]
        return TaskBatch(x0=batch["image"], class_labels=batch["label"].long(), extras=extras)

    def decode(self, x0: Tensor, batch: dict | None = None) -> Tensor:
        """A generated image is its own prediction (clipped to [−1, 1])."""
        return x0.clamp(-1, 1)

    def metrics(self, prediction: Tensor, batch: dict) -> dict[str, Tensor]:
        """Per-sample metrics of class logits [B, K] (or probabilities, when rows sum to 1)."""
        logits = prediction.float()
        labels = batch["label"].long().to(logits.device)
        if logits.min() >= 0 and torch.allclose(logits.sum(-1), torch.ones_like(logits[:, 0]), atol=1e-4):
            logp = logits.clamp_min(1e-12).log()
        else:
            logp = torch.log_softmax(logits, -1)
        prob = logp.exp()
        conf, top = prob.max(-1)
        out = {"correct": (top == labels).float(), "nll": -logp.gather(-1, labels[:, None])[:, 0],
               "confidence": conf}
        if logits.shape[-1] >= 5:
            out["correct5"] = (logp.topk(5, -1).indices == labels[:, None]).any(-1).float()
        return out

    def summarize(self, per_sample: dict[str, Tensor | list]) -> dict[str, float]:
        out: dict[str, Any] = {}
        if "correct" in per_sample:
            out["top1"] = float(per_sample["correct"].float().mean())
        if "correct5" in per_sample:
            out["top5"] = float(per_sample["correct5"].float().mean())
        if "nll" in per_sample:
            out["nll"] = float(per_sample["nll"].float().mean())
        if "confidence" in per_sample and "correct" in per_sample:
            out["ece"] = expected_calibration_error(per_sample["confidence"], per_sample["correct"], 15)
            out["confidence"] = float(per_sample["confidence"].float().mean())
        return out

    def settings(self) -> dict:
        return {"classes": self.class_names, "ece_bins": 15}

    def describe(self, batch: dict) -> list[dict]:
        rows = super().describe(batch)
        for i, row in enumerate(rows):
            row["label"] = int(batch["label"][i])
        return rows

    def request(self, image: Tensor, prompts: list[str] | None = None) -> tuple[TaskBatch, dict]:
        b = image.shape[0]
        return TaskBatch(x0=torch.zeros_like(image)), {"image": image, "label": torch.zeros(b, dtype=torch.long)}

    def export(self, prediction: Any, out_dir, image, stem: str = "prediction") -> list:
        from pathlib import Path

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        probs = torch.as_tensor(prediction).float().reshape(-1)
        if probs.min() < 0 or abs(float(probs.sum()) - 1) > 1e-3:
            probs = probs.softmax(-1)
        order = probs.argsort(descending=True)[:5].tolist()
        lines = [f"{(self.class_names[i] if i < len(self.class_names) else i)}\t{float(probs[i]):.4f}" for i in order]
        path = out / f"{stem}.tsv"
        path.write_text("class\tprobability\n" + "\n".join(lines) + "\n")
        return [path]
