"""Image conversions and visualisations at the edges of the library (files a person looks at).

Inside the library images are float tensors in [−1, 1], NCHW (DESIGN.md); here they become uint8
arrays and PNG files: 16-bit depth, colourised depth, mask overlays, boxes with scores.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

MASK_COLOUR = (255, 40, 40)
BOX_COLOUR = (40, 255, 40)

#: Images with more pixels are refused before decoding (a "decompression bomb": a small file that
#: decodes to gigabytes). PIL's own default; the environment variable GENPERC_MAX_IMAGE_PIXELS raises it.
MAX_IMAGE_PIXELS = 89_478_485


def max_image_pixels() -> int:
    raw = os.environ.get("GENPERC_MAX_IMAGE_PIXELS", "")
    return int(raw) if raw.strip().isdigit() and int(raw) > 0 else MAX_IMAGE_PIXELS


def open_image(source, what: str = "image", name=None) -> Image.Image:
    """A decoded PIL image from a path or bytes, or a one-line :class:`~genperc.errors.UserError`
    naming the file: not found, over :func:`max_image_pixels` (checked from the header, before
    decoding), corrupt or not an image. ``name`` is the file named in messages (default: the path)."""
    from genperc.errors import UserError

    name = name if name is not None else source
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise UserError(f"{what} not found: {name}", "check the path")
    limit = max_image_pixels()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            w, h = im.size
            if w * h > limit:
                im.close()
                raise UserError(f"{what} {name} is {w}x{h} = {w * h:,} pixels, over the limit of {limit:,}",
                                "shrink it, or raise the limit with GENPERC_MAX_IMAGE_PIXELS=<pixels>")
            sixteen = is_16bit_colour(im)  # the tile is gone after load()
            im.load()
            im.info["genperc_16bit"] = sixteen
    except Image.DecompressionBombError:
        raise UserError(f"{what} {name} is over the limit of {limit:,} pixels",
                        "shrink it, or raise the limit with GENPERC_MAX_IMAGE_PIXELS=<pixels>") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # PIL's decoders raise these on bad data
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0]}" if str(exc) else type(exc).__name__
        head = f"cannot read {name} as an image" if what == "image" else f"cannot read {what} {name}"
        raise UserError(f"{head} ({why})", "the file is corrupt or not an image; replace it or remove it") from None
    return im


def is_16bit_colour(im: Image.Image) -> bool:
    """Whether the file stores more than 8 bits per colour channel (PIL decodes 48-bit RGB PNGs to 8 bits)."""
    args = [getattr(t, "args", t[3] if len(t) > 3 else None) for t in (getattr(im, "tile", None) or [])]
    return im.mode in ("RGB", "RGBA") and any(isinstance(a, str) and ";16" in a for a in args)


def image_to_rgb8(im: Image.Image, name, notes: list[str] | None = None) -> np.ndarray:
    """uint8 [H, W, 3] from a PIL image opened by :func:`open_image`; 16-bit colour reduced to 8 bits
    is said once on stderr, or appended to ``notes`` when given."""
    from genperc.errors import note_once

    if im.info.get("genperc_16bit"):
        message = f"{name} has 16-bit colour; genperc reads images as 8-bit RGB (the low 8 bits are dropped)"
        note_once(message) if notes is None else notes.append(message)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8).copy()


def save_figure(fig, path) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure; returns the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] (or [1, 3, H, W]) in [−1, 1] → uint8 [H, W, 3]."""
    x = image.detach().float().cpu()
    if x.ndim == 4:
        x = x[0]
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().byte()
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return x.permute(1, 2, 0).numpy().copy()


def from_uint8(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] → float [1, 3, H, W] in [−1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 127.5 - 1


def resize_float(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """[H, W] float → [h, w] bilinear (identity when the size matches)."""
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    return F.interpolate(x[None, None].float(), size=tuple(hw), mode="bilinear", align_corners=False)[0, 0]


def resize_mask(mask: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """[H, W] bool → [h, w] nearest."""
    if tuple(mask.shape[-2:]) == tuple(hw):
        return mask.bool()
    return F.interpolate(mask[None, None].float(), size=tuple(hw), mode="nearest")[0, 0] > 0.5


def save_png16(d01: torch.Tensor, path: Path) -> Path:
    """[H, W] in [0, 1] → 16-bit gray PNG (0..65535)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (d01.clamp(0, 1).cpu().numpy() * 65535).round().astype(np.uint16)
    Image.fromarray(arr).save(path)
    return path


def save_rgb(rgb: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), mode="RGB").save(path)
    return path


def save_mask(mask: torch.Tensor, path: Path) -> Path:
    """bool [H, W] → 8-bit PNG, 0 / 255."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.cpu().numpy().astype(np.uint8) * 255, mode="L").save(path)
    return path


def colorize_depth(d01: torch.Tensor, cmap: str = "Spectral") -> np.ndarray:
    """[H, W] in [0, 1] (0 = near) → uint8 RGB with a matplotlib colour map (near = red end)."""
    from matplotlib import colormaps

    rgba = colormaps[cmap](d01.clamp(0, 1).cpu().numpy())
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def overlay_mask(image: np.ndarray, mask: torch.Tensor, colour=MASK_COLOUR, alpha: float = 0.55) -> np.ndarray:
    m = mask.cpu().numpy().astype(bool)
    out = image.astype(np.float32).copy()
    out[m] = (1 - alpha) * out[m] + alpha * np.asarray(colour, np.float32)
    return out.round().clip(0, 255).astype(np.uint8)


def upscale(image: np.ndarray, min_side: int = 128) -> np.ndarray:
    """Nearest-neighbour enlargement of small images so that a person can see the pixels."""
    h, w = image.shape[:2]
    k = max(1, int(np.ceil(min_side / max(1, min(h, w)))))
    return image.repeat(k, 0).repeat(k, 1) if k > 1 else image


def draw_boxes(image: np.ndarray, boxes, scores=None, labels=None, colour=BOX_COLOUR, min_side: int = 256) -> np.ndarray:
    """Boxes (xyxy in ``image`` pixels) with their scores, drawn on an enlarged copy."""
    big = upscale(image, min_side)
    k = big.shape[0] / image.shape[0]
    pil = Image.fromarray(big)
    draw = ImageDraw.Draw(pil)
    for i, b in enumerate(boxes):
        x0, y0, x1, y1 = (float(v) * k for v in b)
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=colour, width=max(1, int(k // 4)))
        text = []
        if labels is not None:
            text.append(str(labels[i]))
        if scores is not None:
            text.append(f"{float(scores[i]):.2f}")
        if text:
            draw.text((x0 + 2, max(0, y0 - 11)), " ".join(text), fill=colour)
    return np.asarray(pil)
