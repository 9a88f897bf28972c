"""CIFAR-10 and CIFAR-100 in their **binary** distribution (Krizhevsky 2009; no pickle is read).

Layout, as the archives ``cifar-10-binary.tar.gz`` / ``cifar-100-binary.tar.gz`` unpack::

    cifar-10-batches-bin/data_batch_1.bin … data_batch_5.bin, test_batch.bin, batches.meta.txt
    cifar-100-binary/train.bin, test.bin, fine_label_names.txt, coarse_label_names.txt

Every file is a sequence of fixed-size records: CIFAR-10 has 1 label byte, CIFAR-100 a coarse then
a fine label byte, then 3,072 image bytes — the 1,024 red, then green, then blue values of the
32×32 image, row-major. ``path`` is that folder or the folder that holds it. Class names come from
the ``*.txt`` files (one per line) when present, else the class indices. CIFAR-100's label is the
fine one (100 classes) by default; ``labels="coarse"`` gives the 20 superclasses.

Files are memory-mapped, so opening the 50,000 training images costs nothing until they are read.
A file whose size is not a whole number of records, or whose labels are out of range, is refused
with a :class:`~genperc.errors.UserError` (the usual cause: the Python/pickle or MATLAB
distribution instead of the binary one).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from genperc.data.formats.common import existing
from genperc.data.record import SceneRecord
from genperc.errors import UserError

IMAGE_BYTES = 3 * 32 * 32

#: variant -> (folder name, label bytes, {split: file glob}, {labels: (names file, classes)})
VARIANTS = {
    "cifar10": ("cifar-10-batches-bin", 1, {"train": "data_batch_*.bin", "test": "test_batch.bin"},
                {"fine": ("batches.meta.txt", 10)}),
    "cifar100": ("cifar-100-binary", 2, {"train": "train.bin", "test": "test.bin"},
                 {"coarse": ("coarse_label_names.txt", 20), "fine": ("fine_label_names.txt", 100)}),
}
_FIX = "use the binary distribution (cifar-10-binary.tar.gz / cifar-100-binary.tar.gz), unpacked"


def _folder(path, variant: str) -> Path:
    root = existing(path, f"{variant} folder", _FIX)
    inner = root / VARIANTS[variant][0]
    return inner if inner.is_dir() else root


def _class_names(root: Path, file: str, count: int) -> list[str]:
    names_path = root / file
    if names_path.is_file():
        names = [line.strip() for line in names_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(names) == count:
            return names
    return [str(i) for i in range(count)]


def _records(path: Path, label_bytes: int, classes: int, column: int) -> np.ndarray:
    size = label_bytes + IMAGE_BYTES
    n_bytes = path.stat().st_size
    if n_bytes == 0 or n_bytes % size:
        raise UserError(f"{path} has {n_bytes} bytes, not a whole number of {size}-byte CIFAR records",
                        f"{_FIX}; the file may be truncated or of the other CIFAR variant")
    records = np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, size)
    if int(records[:, column].max()) >= classes:
        raise UserError(f"{path} holds labels up to {int(records[:, column].max())}, but this CIFAR variant has "
                        f"{classes} classes", f"{_FIX}; check cifar10: vs cifar100:")
    return records


class CifarSource:
    """One split of CIFAR-10 or CIFAR-100 (binary) as a :class:`~genperc.data.record.SceneSource`."""

    def __init__(self, path, split: str = "train", variant: str = "cifar10", labels: str = "fine"):
        if variant not in VARIANTS:
            raise UserError(f"unknown CIFAR variant {variant!r}", f"use one of {', '.join(VARIANTS)}")
        folder_name, label_bytes, files, label_sets = VARIANTS[variant]
        if split not in files:
            raise UserError(f"unknown {variant} split {split!r}", f"use one of {', '.join(files)}")
        if labels not in label_sets:
            raise UserError(f"unknown {variant} labels {labels!r}", f"use one of {', '.join(label_sets)}")
        self.root = _folder(path, variant)
        paths = sorted(self.root.glob(files[split]))
        if not paths:
            raise UserError(f"no {files[split]} in {self.root}", _FIX + f" ({folder_name}/)")
        names_file, count = label_sets[labels]
        self.column = label_bytes - 1 if labels == "fine" else 0
        self._parts = [_records(p, label_bytes, count, self.column) for p in paths]
        self._starts = np.cumsum([0] + [len(r) for r in self._parts])
        self.label_bytes, self.split, self.variant = label_bytes, split, variant
        self.classes = _class_names(self.root, names_file, count)
        self.categories = self.classes

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> SceneRecord:
        if not 0 <= index < len(self):
            raise IndexError(index)
        part = int(np.searchsorted(self._starts, index, side="right")) - 1
        record = self._parts[part][index - self._starts[part]]
        image = np.asarray(record[self.label_bytes:]).reshape(3, 32, 32).transpose(1, 2, 0)
        return SceneRecord(image=np.ascontiguousarray(image), class_label=int(record[self.column]),
                           meta={"source": self.variant, "split": self.split, "index": int(index)})
