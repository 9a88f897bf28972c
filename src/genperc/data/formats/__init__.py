"""Loaders for real data set formats, each a :class:`~genperc.data.record.SceneSource`.

``open_source(kind, path, split, **kw)`` opens one split of one data set by name:

=============  ==========================================  ==========================================
kind           path                                        loader
=============  ==========================================  ==========================================
refcoco        refer root (holds refcoco/, images/)         :class:`RefCocoSource` (split_by unc)
refcoco+       refer root                                   :class:`RefCocoSource` (split_by unc)
refcocog       refer root                                   :class:`RefCocoSource` (split_by umd)
nyuv2          nyu_depth_v2_labeled.mat                     :class:`NYUv2Source`
coco           COCO root, or an instances_*.json            :class:`CocoSource`
ade20k         ADEChallengeData2016/                        :class:`ADE20KSource`
folder         generic folder (docs/data-formats.md)        :class:`FolderSource`, or
                                                            :class:`ClassFolderSource` (class subfolders)
cifar10        cifar-10-batches-bin/ (binary)               :class:`CifarSource`
cifar100       cifar-100-binary/ (binary; ``labels=``)      :class:`CifarSource`
digits         ignored (scikit-learn ships the data)        :class:`DigitsSource`
=============  ==========================================  ==========================================

Other sources (the shapes world) join with :func:`register_format`. On-disk layouts are described
in docs/data-formats.md.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from genperc.data.formats.ade20k import ADE20KSource
from genperc.data.formats.cifar import CifarSource
from genperc.data.formats.coco import CocoSource, find_coco_files
from genperc.data.formats.common import PlainUnpickler, load_plain_pickle
from genperc.data.formats.digits import DigitsSource
from genperc.data.formats.folder import ClassFolderSource, FolderSource, is_class_folder
from genperc.data.formats.nyuv2 import NYUv2Source, eigen_crop_mask
from genperc.data.formats.refcoco import RefCocoSource
from genperc.errors import UserError

__all__ = [
    "ADE20KSource", "CifarSource", "ClassFolderSource", "CocoSource", "DigitsSource", "FolderSource",
    "NYUv2Source", "RefCocoSource",
    "PlainUnpickler", "load_plain_pickle", "eigen_crop_mask", "open_source", "register_format",
    "available_formats",
]

#: kind -> factory(path, split, **kw) returning a SceneSource
_FORMATS: dict[str, Callable] = {}

#: modules imported on first use of a kind they register (kept lazy: they may be heavy)
_LAZY = {"world": "genperc.data.world"}


def register_format(kind: str, factory: Callable | None = None):
    """Register ``factory(path, split, **kw) -> SceneSource`` under ``kind``; usable as a
    decorator. Re-registering a kind replaces it."""

    def _add(f):
        _FORMATS[kind.lower()] = f
        return f

    return _add(factory) if factory is not None else _add


def available_formats() -> list[str]:
    return sorted(set(_FORMATS) | set(_LAZY))


def open_source(kind: str, path=None, split: str | None = None, **kw):
    """Open one split of a data set: ``open_source("coco", "/data/coco", "val2017")``."""
    key = kind.lower()
    if key not in _FORMATS and key in _LAZY:
        try:
            importlib.import_module(_LAZY[key])
        except ImportError as exc:
            raise UserError(f"data format '{kind}' is not available ({exc})",
                            "install the missing package") from None
    if key not in _FORMATS:
        raise UserError(f"unknown data format '{kind}'",
                        f"use one of {', '.join(available_formats())}")
    return _FORMATS[key](path, split, **kw)


def _need(path, kind):
    if path is None:
        raise UserError(f"data format '{kind}' needs a path", "pass the data set's folder or file")
    return path


def _refer(dataset):
    def factory(path, split, **kw):
        return RefCocoSource(_need(path, dataset), dataset=kw.pop("dataset", dataset),
                             split=split or "val", **kw)

    return factory


for _name in ("refcoco", "refcoco+", "refcocog"):
    register_format(_name, _refer(_name))


@register_format("nyuv2")
def _nyuv2(path, split, **kw):
    return NYUv2Source(_need(path, "nyuv2"), split=split or "test", **kw)


@register_format("coco")
def _coco(path, split, **kw):
    path = Path(_need(path, "coco"))
    if path.suffix == ".json":
        return CocoSource(path, split=split, **kw)
    ann, image_dir = find_coco_files(path, split or "val2017")
    kw.setdefault("image_dir", image_dir)
    return CocoSource(ann, split=split, **kw)


@register_format("ade20k")
def _ade20k(path, split, **kw):
    return ADE20KSource(_need(path, "ade20k"), split=split or "val", **kw)


@register_format("folder")
def _folder(path, split, **kw):
    if is_class_folder(_need(path, "folder"), split):
        return ClassFolderSource(path, split=split, **kw)
    return FolderSource(path, split=split, **kw)


@register_format("cifar10")
def _cifar10(path, split, **kw):
    return CifarSource(_need(path, "cifar10"), split=split or "train", variant="cifar10", **kw)


@register_format("cifar100")
def _cifar100(path, split, **kw):
    return CifarSource(_need(path, "cifar100"), split=split or "train", variant="cifar100", **kw)


@register_format("digits")
def _digits(path, split, **kw):
    return DigitsSource(split=split or "train", **kw)
