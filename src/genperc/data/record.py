"""The format-independent record every data source yields.

The shapes world, RefCOCO, NYUv2, COCO, ADE20K, the generic folder layout and the scikit-learn
digits all produce :class:`SceneRecord` values; the task datasets (``genperc.data.datasets``)
turn them into tensors. A source fills in what it has and leaves the rest ``None`` / empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass
class ObjectAnn:
    """One object instance. ``box`` is ``(x0, y0, x1, y1)`` in pixels, exclusive right/bottom."""

    id: int  # instance id: the value of this object's pixels in ``SceneRecord.instances``
    category: str  # e.g. "cube", or a COCO category name
    category_id: int  # index into ``SceneSource.categories``
    box: tuple[float, float, float, float] | None = None
    attributes: dict = field(default_factory=dict)  # colour, material, size, 3-D position, pixels...


@dataclass
class Expression:
    """A referring expression that picks out ``object_ids`` (exactly one on the world)."""

    text: str
    object_ids: list[int]
    family: str = "unknown"  # template family on the world ("attribute", "relation", "ordinal")
    id: int | str | None = None


@dataclass
class SceneRecord:
    image: np.ndarray  # uint8 [H, W, 3] RGB
    depth: np.ndarray | None = None  # float32 [H, W], planar depth in metres
    depth_valid: np.ndarray | None = None  # bool [H, W]
    instances: np.ndarray | None = None  # int32 [H, W]; 0 = background, k = ObjectAnn.id k
    semantic: np.ndarray | None = None  # int32 [H, W]; category index, -1 = ignore
    objects: list[ObjectAnn] = field(default_factory=list)
    expressions: list[Expression] = field(default_factory=list)
    class_label: int | None = None
    meta: dict = field(default_factory=dict)  # source, image id, split, file names

    def object_mask(self, object_ids: list[int]) -> np.ndarray:
        """Union of the visible pixels of the given instance ids, bool [H, W]."""
        if self.instances is None:
            raise ValueError("this record has no instance map")
        return np.isin(self.instances, np.asarray(object_ids, dtype=self.instances.dtype))


class SceneSource(Protocol):
    """A random-access collection of :class:`SceneRecord` (one split of one data set)."""

    categories: list[str]  # semantic / detection classes, index = category_id

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> SceneRecord: ...
