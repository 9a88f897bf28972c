"""Reading helpers shared by the format loaders.

Every function here turns a bad file a user handed us into a one-line
:class:`~genperc.errors.UserError` that names the file and says what to do (DESIGN.md,
"Conventions"). Nothing here loads a pickle except through :class:`PlainUnpickler`, which admits
only plain containers, strings and numbers (DESIGN.md: "No pickle from files a user hands us";
REFERENCE.md, "Referring segmentation evaluation").
"""

from __future__ import annotations

import io
import json
import pickle
import warnings
from pathlib import Path

import numpy as np

from genperc.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def existing(path, what: str, fix: str | None = None) -> Path:
    """``Path(path)`` if it exists, else a :class:`UserError` naming it."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} not found: {p}", fix or "check the path")
    return p


def contained(root, relpath, what: str = "file") -> Path:
    """``root / relpath`` for a path an annotation file names, or a one-line :class:`UserError`
    when it is not a relative path that stays inside ``root`` once symlinks are resolved: an
    absolute path, ``..`` out of the folder, a link that leads out, a NUL byte, not a string.
    ``root`` is the folder the format keeps that kind of file in (a split folder, ``images/``, a
    COCO image folder); it may itself be a link. Every loader joins annotation paths through here."""
    if isinstance(relpath, Path):
        relpath = str(relpath)
    if not isinstance(relpath, str) or not relpath.strip() or "\0" in relpath:
        raise UserError(f"{what} {relpath!r} is not a file path", "name the file relative to its folder")
    rel = Path(relpath)
    base = Path(root).resolve()
    target = (base / rel).resolve()
    if rel.is_absolute() or not target.is_relative_to(base):
        raise UserError(f"{what} {relpath!r} is outside its folder {base}",
                        "annotation files may only name files inside the data folder, by relative path")
    return target


def read_image(path) -> np.ndarray:
    """An image file as uint8 ``[H, W, 3]`` RGB (grey and RGBA are converted, 16-bit colour is
    reduced to 8 bits with a note; EXIF is ignored, as COCO-style annotations are in stored-pixel
    coordinates). Over the pixel limit, corrupt or not an image: a one-line error naming the file."""
    from genperc.images import image_to_rgb8, open_image

    p = existing(path, "image")
    with open_image(p) as im:
        return image_to_rgb8(im, p)


def read_label_png(path, what: str = "label image") -> np.ndarray:
    """A single-channel 8- or 16-bit PNG (labels, instance ids, 16-bit depth) as an integer
    ``[H, W]`` array with the stored values (no palette-to-RGB conversion)."""
    from genperc.images import open_image

    p = existing(path, what)
    with open_image(p, what) as im:
        if im.mode in ("RGB", "RGBA"):
            raise UserError(
                f"{what} {p} has {im.mode} pixels, expected one channel of integer values",
                "save labels as a single-channel 8- or 16-bit (or palette) PNG",
            )
        arr = np.asarray(im)
    if arr.ndim != 2:
        raise UserError(f"{what} {p} has shape {arr.shape}, expected [H, W]", "save one channel")
    return arr.astype(np.int64) if arr.dtype.kind in "ui" else arr


def read_json(path, what: str = "JSON file"):
    """Parse a JSON file; a syntax error names the file, line and column."""
    p = existing(path, what)
    try:
        with open(p, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"corrupt {what} {p}: {exc.msg} at line {exc.lineno}, column {exc.colno}",
            "fix or re-download the file",
        ) from None
    except UnicodeDecodeError as exc:
        raise UserError(f"corrupt {what} {p}: not UTF-8 ({exc.reason})", "save it as UTF-8") from None


def read_jsonl(path, what: str = "JSONL file") -> list[dict]:
    """Parse a JSON-lines file (one object per line, blank lines skipped)."""
    p = existing(path, what)
    rows = []
    with open(p, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(
                    f"corrupt {what} {p}: line {lineno}: {exc.msg}",
                    "each line must be one JSON object",
                ) from None
            if not isinstance(row, dict):
                raise UserError(
                    f"corrupt {what} {p}: line {lineno} is a {type(row).__name__}, not an object",
                    "each line must be one JSON object",
                )
            rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# Restricted pickle
# --------------------------------------------------------------------------------------------


class PlainUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global, so only data the pickle opcodes build without
    calling anything get through: list, dict, tuple, set, str, bytes, int, float, bool, None.

    ``find_class`` is the only way a pickle reaches a callable (``GLOBAL``/``STACK_GLOBAL``, then
    ``REDUCE``/``BUILD``/``INST``/``OBJ``); refusing it refuses code execution.
    ``persistent_load`` is refused too (the base class already raises).
    """

    def find_class(self, module, name):  # noqa: D401 - pickle API
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not admitted")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not admitted")


def load_plain_pickle(path, what: str = "pickle file"):
    """Load a pickle that holds only plain data, with :class:`PlainUnpickler`.

    Pickles written by Python 2 (as the refer toolkit's ``refs(*).p`` files are) store ``str`` as
    bytes; they are decoded as UTF-8, then Latin-1 if that fails.
    """
    p = existing(path, what)
    data = p.read_bytes()
    last = None
    for encoding in ("utf-8", "latin1"):
        try:
            return PlainUnpickler(io.BytesIO(data), encoding=encoding).load()
        except UnicodeDecodeError as exc:
            last = exc
            continue
        except pickle.UnpicklingError as exc:
            if "is not admitted" in str(exc):
                raise UserError(
                    f"refused to load {what} {p}: {exc}; only lists, dicts, strings and numbers "
                    "are loaded from pickles",
                    "use the original file from its publisher, or convert it to JSON "
                    "with a trusted tool",
                ) from None
            raise UserError(f"corrupt {what} {p}: {exc}", "re-download the file") from None
        except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
            raise UserError(
                f"corrupt {what} {p}: {type(exc).__name__}: {exc}", "re-download the file"
            ) from None
    raise UserError(f"corrupt {what} {p}: {last}", "re-download the file")


# --------------------------------------------------------------------------------------------
# COCO geometry and masks
# --------------------------------------------------------------------------------------------


def xywh_to_xyxy(box) -> tuple[float, float, float, float]:
    """COCO ``[x, y, width, height]`` to ``(x0, y0, x1, y1)``."""
    x, y, w, h = (float(v) for v in box)
    return (x, y, x + w, y + h)


def mask_to_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Tight box ``(x0, y0, x1, y1)`` (exclusive right/bottom) of a bool mask; None if empty."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def coco_segmentation_to_mask(segmentation, height: int, width: int, overlap: str = "union",
                              where: str = "annotation") -> np.ndarray:
    """Decode one COCO ``segmentation`` (polygons, uncompressed or compressed RLE) to bool [H, W].

    ``overlap="union"`` is pycocotools' ``annToMask``: the parts are merged, so a pixel inside two
    polygons of the object is 1. ``overlap="refer"`` reproduces the refer toolkit's ``getMask``
    followed by ``mask == 1`` (as LAVT-style RefCOCO loaders do): the parts are summed, and pixels
    covered by two parts (value 2) are dropped. Which one the authors' RefCOCO loaders used is
    unverified; ``union`` is the default.
    """
    if overlap not in ("union", "refer"):
        raise UserError(f"unknown polygon overlap rule '{overlap}'", "use 'union' or 'refer'")
    try:
        with warnings.catch_warnings():
            # pycocotools 2.0.x + numpy 2: a harmless DeprecationWarning about __array__(copy=)
            warnings.simplefilter("ignore", DeprecationWarning)
            return _decode_segmentation(segmentation, int(height), int(width), overlap, where)
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"{where}: invalid segmentation ({type(exc).__name__}: {exc})",
                        "the annotation file is corrupt") from None


def _decode_segmentation(segmentation, h: int, w: int, overlap: str, where: str) -> np.ndarray:
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        polys = [
            [float(v) for v in poly]
            for poly in segmentation
            if isinstance(poly, list | tuple) and len(poly) >= 6 and len(poly) % 2 == 0
        ]
        if not polys:
            return np.zeros((h, w), dtype=bool)
        parts = mask_utils.decode(mask_utils.frPyObjects(polys, h, w))  # [H, W, K] uint8
        if overlap == "union":
            return parts.max(axis=2) > 0
        return parts.sum(axis=2, dtype=np.int32) == 1
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        rle = segmentation
        if isinstance(rle["counts"], list):  # uncompressed RLE (iscrowd)
            rle = mask_utils.frPyObjects(rle, h, w)
        elif isinstance(rle["counts"], str):
            rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
        m = mask_utils.decode(rle)
        if m.shape[:2] != (h, w):
            raise UserError(
                f"{where}: RLE size {list(m.shape[:2])} differs from the image size {[h, w]}",
                "the annotation file does not match its images",
            )
        return m > 0
    raise UserError(
        f"{where}: unsupported segmentation of type {type(segmentation).__name__}",
        "expected COCO polygons (list of lists) or RLE ({'counts', 'size'})",
    )
