"""Open the :class:`~genperc.data.record.SceneSource` a run's ``data`` config names.

Also the checks of what a ``data`` config may name, shared by :class:`genperc.config.DataConfig`
and :func:`open_scene_source`: the source (:func:`check_source`), its split names
(:func:`check_split_name`: plain names, never a path) and its ``data.options``
(:func:`check_options`: the keyword arguments of the source's constructor).
"""

from __future__ import annotations

import importlib
import inspect
import re

from genperc.errors import UserError, note_once

SOURCES = ("toy", "world", "refcoco", "nyuv2", "coco", "ade20k", "folder", "digits", "cifar10", "cifar100")

#: source → (module, constructors, arguments the source fills itself rather than data.options)
_CONSTRUCTORS = {
    "toy": ("genperc.data.toy", ("ToyShapes",), ("split", "resolution")),
    "world": ("genperc.data.world.format", ("WorldSource",), ("root", "split")),
    "refcoco": ("genperc.data.formats.refcoco", ("RefCocoSource",), ("root", "split")),
    "nyuv2": ("genperc.data.formats.nyuv2", ("NYUv2Source",), ("path", "split")),
    "coco": ("genperc.data.formats.coco", ("CocoSource",), ("annotations", "split")),
    "ade20k": ("genperc.data.formats.ade20k", ("ADE20KSource",), ("root", "split")),
    "folder": ("genperc.data.formats.folder", ("FolderSource", "ClassFolderSource"), ("root", "split")),
    "digits": ("genperc.data.formats.digits", ("DigitsSource",), ("split",)),
    "cifar10": ("genperc.data.formats.cifar", ("CifarSource",), ("path", "split", "variant")),
    "cifar100": ("genperc.data.formats.cifar", ("CifarSource",), ("path", "split", "variant")),
}

#: a split is a name (train, val2017, testA, all), never a path: it becomes a folder and file name
SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_+\-.]*$")


def check_source(source: str) -> None:
    if source not in SOURCES:
        raise UserError(f"unknown data source {source!r}", "choose data.source from: " + ", ".join(SOURCES))


def check_split_name(split, what: str = "split") -> None:
    """A one-line :class:`UserError` unless ``split`` is a plain name (letters, digits, ``_+-.``,
    no ``..``): split names become folder and file names, so ``../x`` must not escape a run or data folder."""
    if split is None:
        return
    if not isinstance(split, str) or not SPLIT_NAME.match(split) or ".." in split:
        raise UserError(f"{what} {split!r} is not a split name",
                        "use a plain name such as train, val or test (letters, digits, _ - + .)")


def source_options(source: str) -> list[str]:
    """The ``data.options`` keys ``source`` accepts: its constructors' keyword arguments."""
    check_source(source)
    module, classes, fixed = _CONSTRUCTORS[source]
    mod = importlib.import_module(module)
    names = set()
    for cls in classes:
        names |= {p.name for p in inspect.signature(getattr(mod, cls)).parameters.values()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return sorted(names - set(fixed) - {"self"})


def check_options(source: str, options: dict) -> None:
    """A one-line :class:`UserError` naming the first unknown ``data.options`` key and the valid ones."""
    valid = source_options(source)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        fix = (f"valid options of {source}: {', '.join(valid)}" if valid
               else f"data.source={source} takes no options; remove data.options")
        raise UserError(f"unknown data.options key {unknown[0]!r} for data.source={source}", fix)


def open_scene_source(cfg, split: str):
    """``cfg`` is a :class:`genperc.config.DataConfig`; ``split`` e.g. "train" or "val"."""
    check_source(cfg.source)
    check_split_name(split)
    opts = dict(cfg.options)
    check_options(cfg.source, opts)
    if cfg.source == "toy":
        from genperc.data.toy import ToyShapes

        size = opts.pop("size", 2048 if split == "train" else 128)
        return ToyShapes(size=size, resolution=cfg.resolution, split=split, **opts)
    if cfg.path is None and cfg.source != "digits":  # the digits ship with scikit-learn
        raise UserError(f"data.source={cfg.source} needs data.path", f"add data.path=<directory of the {cfg.source} data>")
    if cfg.source == "world":
        from genperc.data.world.format import WorldSource

        source = WorldSource(cfg.path, split=split, **opts)
        if source.summary.skipped:
            note_once(f"{source.split_dir}: {source.summary} (data.options.skip_bad=true)")
        return source
    from genperc.data.formats import open_source

    return open_source(cfg.source, cfg.path, split, **opts)
