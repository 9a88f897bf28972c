"""The shapes world: CLEVR-style scenes path traced with Mitsuba 3, with exact ground truth.

* :mod:`.scene` — :class:`WorldConfig`, scene specs and their seeded sampling
* :mod:`.render` — Mitsuba scene construction, RGB and pixel-centre label passes, planar depth
* :mod:`.relations` / :mod:`.expressions` — camera-relative relations, verified referring expressions
* :mod:`.annotate` — boxes, pixel counts, class labels: the per-scene record
* :mod:`.format` — the on-disk format (documented there and in docs/world-format.md) and
  :class:`WorldSource`, its validating reader
* :mod:`.render_job` — the deterministic, resumable, multi-worker render job
* :mod:`.show` — contact sheets

Mitsuba is imported lazily: reading a rendered split needs only numpy and Pillow.
"""

from genperc.data.formats import register_format
from genperc.data.world.format import WorldSource
from genperc.data.world.scene import CATEGORIES, WORLD_PRESETS, WorldConfig

# open_source("world", path, split) imports this package lazily (formats._LAZY); it registers here.
register_format("world", lambda path, split, **kw: WorldSource(path, split=split or "train", **kw))

__all__ = ["CATEGORIES", "WORLD_PRESETS", "WorldConfig", "WorldSource", "render_scene", "render_split", "render_world"]


def __getattr__(name):
    if name in ("render_split", "render_scene", "render_world"):
        from genperc.data.world import render_job

        return getattr(render_job, name)
    raise AttributeError(name)
