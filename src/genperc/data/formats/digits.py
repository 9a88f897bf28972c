"""The handwritten digits that scikit-learn ships (``sklearn.datasets.load_digits``).

1,797 grey 8x8 images with values 0..16, ten classes; real data that needs no download
(REFERENCE.md, "This workplace"). Here each image is scaled to uint8 (v·255/16, rounded),
upsampled to ``size`` pixels (nearest keeps the 8x8 blocks; bilinear smooths them) and
replicated to three channels; ``class_label`` is the digit.

Splits are stratified per class and deterministic: a ``torch.Generator`` seeded with ``seed``
shuffles each class once, then the first ``test_fraction`` go to ``test``, the next
``val_fraction`` to ``val`` and the rest to ``train``. Within a split, items keep the order of
``load_digits``. With the defaults (0.1 / 0.2, seed 0) the sizes are 1,259 / 179 / 359.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from genperc.data.record import SceneRecord
from genperc.errors import UserError

SPLITS = ("train", "val", "test", "all")


@lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(np.asarray(d.images, dtype=np.float64) * (255.0 / 16.0)).clip(0, 255)
    return images.astype(np.uint8), np.asarray(d.target, dtype=np.int64)


def split_indices(labels: np.ndarray, split: str, seed: int = 0, val_fraction: float = 0.1,
                  test_fraction: float = 0.2) -> list[int]:
    """Indices of ``split`` in a stratified, seeded train/val/test partition (sorted)."""
    if split not in SPLITS:
        raise UserError(f"unknown digits split '{split}'", f"use one of {', '.join(SPLITS)}")
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise UserError(f"bad split fractions val={val_fraction}, test={test_fraction}",
                        "use fractions >= 0 that sum to less than 1")
    if split == "all":
        return list(range(len(labels)))
    g = torch.Generator().manual_seed(int(seed))
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        perm = members[torch.randperm(len(members), generator=g).numpy()]
        n_test = round(len(members) * test_fraction)
        n_val = round(len(members) * val_fraction)
        part = {"test": perm[:n_test], "val": perm[n_test:n_test + n_val],
                "train": perm[n_test + n_val:]}[split]
        chosen.extend(int(i) for i in part)
    return sorted(chosen)


class DigitsSource:
    """scikit-learn's digits as a :class:`~genperc.data.record.SceneSource` (classification)."""

    def __init__(self, split: str = "train", size: int = 32, interpolation: str = "nearest",
                 seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2,
                 invert: bool = False):
        if interpolation not in ("nearest", "bilinear"):
            raise UserError(f"unknown interpolation '{interpolation}'", "use nearest or bilinear")
        if int(size) < 1:
            raise UserError(f"size must be positive, got {size}", "e.g. size=32")
        self.images, self.labels = _load()
        self.indices = split_indices(self.labels, split, seed, val_fraction, test_fraction)
        self.split, self.size, self.interpolation = split, int(size), interpolation
        self.seed, self.invert = int(seed), bool(invert)
        self.categories = [str(d) for d in range(10)]
        self.classes = self.categories

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> SceneRecord:
        from PIL import Image

        if not 0 <= index < len(self):
            raise IndexError(index)
        j = self.indices[index]
        grey = self.images[j]
        if self.invert:
            grey = 255 - grey
        if self.size != grey.shape[0]:
            resample = Image.NEAREST if self.interpolation == "nearest" else Image.BILINEAR
            grey = np.asarray(Image.fromarray(grey).resize((self.size, self.size), resample))
        image = np.repeat(grey[:, :, None], 3, axis=2)
        label = int(self.labels[j])
        return SceneRecord(image=np.ascontiguousarray(image), class_label=label,
                           meta={"source": "digits", "split": self.split, "digit_index": j,
                                 "seed": self.seed})
