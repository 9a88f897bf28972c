"""Open the :class:`~genperc.data.record.SceneSource` a run's ``data`` config names."""

from __future__ import annotations

from genperc.errors import UserError

SOURCES = ("toy", "world", "refcoco", "nyuv2", "coco", "ade20k", "folder", "digits", "cifar10", "cifar100")


def open_scene_source(cfg, split: str):
    """``cfg`` is a :class:`genperc.config.DataConfig`; ``split`` e.g. "train" or "val"."""
    opts = dict(cfg.options)
    if cfg.source == "toy":
        from genperc.data.toy import ToyShapes

        size = opts.pop("size", 2048 if split == "train" else 128)
        return ToyShapes(size=size, resolution=cfg.resolution, split=split, **opts)
    if cfg.path is None and cfg.source != "digits":  # the digits ship with scikit-learn
        raise UserError(f"data.source={cfg.source} needs data.path", f"add data.path=<directory of the {cfg.source} data>")
    if cfg.source == "world":
        from genperc.data.world.format import WorldSource

        return WorldSource(cfg.path, split=split, **opts)
    if cfg.source in SOURCES:
        from genperc.data.formats import open_source

        return open_source(cfg.source, cfg.path, split, **opts)
    raise UserError(f"unknown data source '{cfg.source}'", "choose one of: " + ", ".join(SOURCES))
