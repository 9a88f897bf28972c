"""Perception heads on a denoiser's decoder features (GenRep §3.1, App. A.4; VPD-style taps).

GenRep reads "intermediate outputs of four decoder blocks ... aggregated with FPN" from one
noise-free forward pass of the denoiser and feeds them to task decoders. Here:

* :class:`FeatureTaps` registers forward hooks on named blocks of the diffusers backbone inside a
  :class:`~genperc.models.denoiser.Denoiser` and keeps their outputs of the last forward call as
  ``[B, C, h, w]`` maps. UNet taps are ``down0 … down{n-1}``, ``mid`` and ``up0 … up{n-1}`` (the
  outputs of ``down_blocks[i]``, ``mid_block`` and ``up_blocks[i]``, i.e. after each block's
  down- or upsampler); DiT taps are ``blk{i}``
  (the token outputs of ``transformer_blocks[i]``, reshaped to the patch grid).
  :func:`default_taps` picks the decoder blocks (UNet: every ``up`` block; DiT: four evenly spaced
  blocks of the second half, as "decoder" has no meaning in a DiT — an explicit choice).
* :class:`FeatureFusion` turns a tap dict into (a) a pooled vector — ``"pool"``: the concatenation
  of each tap's global average, or ``"fpn"``: the global average of the FPN map — and (b) an FPN
  map: a 1×1 lateral convolution of each tap to ``width`` channels, bilinearly resized to the
  finest tap resolution and summed, then a 3×3 convolution (Lin et al. 2017, without the top-down
  ordering, which sums to the same map when every lateral is resized to the finest level).
* Heads: :class:`ClassificationHead` (``linear``, ``mlp`` — GenRep App. A.4 says "a single-layer
  MLP" — or ``cosine``: cosine similarity between the projected pooled feature and fixed text
  embeddings of the class names, times a learned scale, for open-vocabulary use),
  :class:`SegmentationHead` (FPN map → per-pixel logits at the input size) and
  :class:`DepthHead` (FPN map → softmax over fixed depth-bin centres, depth = the expected centre,
  the Binsformer/AdaBins-style "linear combination of bin centres" of App. A.4 with fixed bins).
* :class:`PerceptionHeads` bundles fusion and heads; it is what GenRep's unified model carries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genperc.errors import UserError

FUSIONS = ("pool", "fpn")
CLASSIFIER_KINDS = ("linear", "mlp", "cosine")


def named_blocks(backbone: nn.Module, what: str = "tap features of") -> dict[str, nn.Module]:
    """The backbone's blocks by name, in the order the forward pass runs them: UNet ``down{i}``,
    ``mid``, ``up{i}``; DiT ``blk{i}``. The one naming of feature taps, the probe and self-conditioning."""
    if hasattr(backbone, "up_blocks"):
        out = {f"down{i}": b for i, b in enumerate(backbone.down_blocks)}
        out["mid"] = backbone.mid_block
        return out | {f"up{i}": b for i, b in enumerate(backbone.up_blocks)}
    if hasattr(backbone, "transformer_blocks"):
        return {f"blk{i}": b for i, b in enumerate(backbone.transformer_blocks)}
    raise UserError(f"cannot {what} a {type(backbone).__name__} backbone",
                    "use a unet-* or dit-* architecture (model.arch)")


def available_taps(denoiser) -> list[str]:
    """Names of the blocks a :class:`FeatureTaps` can hook on this denoiser."""
    return list(named_blocks(denoiser.backbone))


def default_taps(denoiser) -> list[str]:
    """UNet: every decoder (``up``) block. DiT: four evenly spaced blocks of the second half."""
    names = available_taps(denoiser)
    if "mid" in names:
        return [n for n in names if n.startswith("up")]
    n = len(names)
    picks = sorted({min(n - 1, n // 2 + round(i * (n - 1 - n // 2) / 3)) for i in range(4)})
    return [f"blk{i}" for i in picks]


def _module(denoiser, name: str) -> nn.Module:
    blocks = named_blocks(denoiser.backbone)
    if name not in blocks:
        raise UserError(f"unknown feature tap {name!r}", f"valid taps: {', '.join(blocks)}")
    return blocks[name]


class FeatureTaps:
    """Forward hooks that record block outputs of the last forward call (``taps.features``).

    Not an ``nn.Module`` (it owns no weights). ``grid`` is the DiT patch grid (h, w), read from the
    denoiser's sample size and patch size; UNet outputs are maps already.
    """

    def __init__(self, denoiser, names: Sequence[str] | None = None):
        self.names = list(names) if names else default_taps(denoiser)
        valid = available_taps(denoiser)
        for n in self.names:
            if n not in valid:
                raise UserError(f"unknown feature tap {n!r}", f"valid taps: {', '.join(valid)}")
        self.features: dict[str, Tensor] = {}
        self.enabled = True
        cfg = denoiser.config
        self._dit = cfg.backbone_class in ("DiTTransformer2DModel", "PixArtTransformer2DModel")
        self._patch = int((cfg.backbone_config or {}).get("patch_size", 1) or 1)
        self._handles = [_module(denoiser, n).register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str):
        def fn(module, inputs, output):
            if not self.enabled:
                return
            out = output[0] if isinstance(output, tuple) else output
            if out.ndim == 3:  # DiT tokens [B, N, D] -> [B, D, h, w]
                b, n, d = out.shape
                side = int(round(n**0.5))
                if side * side != n:
                    raise UserError(f"tap {name}: {n} tokens do not form a square grid", "use square inputs")
                out = out.transpose(1, 2).reshape(b, d, side, side)
            self.features[name] = out

        return fn

    def channels(self, denoiser, size: int | None = None) -> dict[str, int]:
        """Channels of each tap, found with one dummy forward at ``size`` (default: the sample size)."""
        size = size or denoiser.config.sample_size
        p = next(denoiser.parameters())
        x = torch.zeros(1, denoiser.config.in_channels, size, size, device=p.device, dtype=p.dtype)
        image = None
        if denoiser.config.cond_channels:
            image = torch.zeros(1, denoiser.config.cond_channels, size, size, device=p.device, dtype=p.dtype)
        from genperc.diffusion.conditioning import Conditioning

        text = None
        if denoiser.config.text_dim:
            text = torch.zeros(1, 1, denoiser.config.text_dim, device=p.device, dtype=p.dtype)
        with torch.no_grad():
            denoiser(x, torch.zeros(1, dtype=torch.long, device=p.device), Conditioning(text=text, image=image))
        out = {n: int(self.features[n].shape[1]) for n in self.names}
        self.features = {}
        return out

    def pop(self) -> dict[str, Tensor]:
        """The features of the last forward call; clears the record."""
        f, self.features = self.features, {}
        return f

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class FeatureFusion(nn.Module):
    """Tap dict → (pooled vector, FPN map). See the module docstring for both modes."""

    def __init__(self, tap_channels: dict[str, int], width: int = 64, mode: str = "fpn"):
        super().__init__()
        if mode not in FUSIONS:
            raise UserError(f"unknown feature fusion {mode!r}", f"use one of {', '.join(FUSIONS)}")
        self.mode, self.width = mode, int(width)
        self.names = list(tap_channels)
        self.lateral = nn.ModuleDict({n: nn.Conv2d(c, width, 1) for n, c in tap_channels.items()})
        self.smooth = nn.Conv2d(width, width, 3, padding=1)
        self.pooled_dim = sum(tap_channels.values()) if mode == "pool" else width

    def fpn(self, feats: dict[str, Tensor]) -> Tensor:
        size = max((feats[n].shape[-2:] for n in self.names), key=lambda s: s[0] * s[1])
        total = None
        for n in self.names:
            y = self.lateral[n](feats[n])
            if y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            total = y if total is None else total + y
        return self.smooth(F.silu(total))

    def forward(self, feats: dict[str, Tensor], need_map: bool = True) -> tuple[Tensor, Tensor | None]:
        fmap = self.fpn(feats) if (need_map or self.mode == "fpn") else None
        if self.mode == "pool":
            pooled = torch.cat([feats[n].mean(dim=(2, 3)) for n in self.names], dim=1)
        else:
            pooled = fmap.mean(dim=(2, 3))
        return pooled, fmap


class ClassificationHead(nn.Module):
    """Pooled feature → class logits: ``linear``, ``mlp`` (one hidden layer) or ``cosine``.

    ``cosine``: logits = s · cos(P·f, e_c) with fixed class-name text embeddings e_c (a buffer) and a
    learned log-scale s (initialised to log 10); new classes are added by swapping the buffer.
    """

    def __init__(self, in_dim: int, num_classes: int, kind: str = "linear", hidden: int = 256,
                 text_embeddings: Tensor | None = None):
        super().__init__()
        if kind not in CLASSIFIER_KINDS:
            raise UserError(f"unknown classification head {kind!r}", f"use one of {', '.join(CLASSIFIER_KINDS)}")
        self.kind = kind
        self.norm = nn.LayerNorm(in_dim)
        if kind == "linear":
            self.net = nn.Linear(in_dim, num_classes)
        elif kind == "mlp":
            self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, num_classes))
        else:
            if text_embeddings is None or text_embeddings.shape[0] != num_classes:
                raise UserError("the cosine classification head needs one text embedding per class",
                                "pass text_embeddings [num_classes, D] (class names through the text encoder)")
            self.net = nn.Linear(in_dim, text_embeddings.shape[1])
            self.register_buffer("text_embeddings", F.normalize(text_embeddings.float(), dim=-1))
            self.log_scale = nn.Parameter(torch.tensor(2.302585))

    def forward(self, pooled: Tensor) -> Tensor:
        h = self.net(self.norm(pooled))
        if self.kind != "cosine":
            return h
        return self.log_scale.exp() * F.normalize(h, dim=-1) @ self.text_embeddings.to(h.dtype).T


class SegmentationHead(nn.Module):
    """FPN map → per-pixel class logits, bilinearly resized to the input size."""

    def __init__(self, width: int, num_classes: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(8 if width % 8 == 0 else 1, width),
                                 nn.SiLU(), nn.Conv2d(width, num_classes, 1))

    def forward(self, fmap: Tensor, size) -> Tensor:
        y = self.net(fmap)
        return y if y.shape[-2:] == tuple(size) else F.interpolate(y, size=size, mode="bilinear", align_corners=False)


class DepthHead(nn.Module):
    """FPN map → depth [B, 1, H, W] as the softmax-weighted mean of ``bins`` fixed centres in
    [min_depth, max_depth] (uniform in log depth)."""

    def __init__(self, width: int, bins: int = 64, min_depth: float = 0.5, max_depth: float = 20.0):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(8 if width % 8 == 0 else 1, width),
                                 nn.SiLU(), nn.Conv2d(width, bins, 1))
        centres = torch.logspace(torch.log10(torch.tensor(min_depth)), torch.log10(torch.tensor(max_depth)), bins)
        self.register_buffer("centres", centres)

    def forward(self, fmap: Tensor, size) -> Tensor:
        logits = self.net(fmap)
        if logits.shape[-2:] != tuple(size):
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return (logits.softmax(1) * self.centres.view(1, -1, 1, 1).to(logits.dtype)).sum(1, keepdim=True)


@dataclass
class HeadConfig:
    """Which heads the unified model carries and how they read the decoder (GenRep App. A.4).

    taps:           tap names (``available_taps``); empty = :func:`default_taps`.
    fusion:         "fpn" (pool the FPN map) | "pool" (concatenate per-tap global averages).
    width:          FPN channels.
    classifier:     "linear" | "mlp" | "cosine" (text embeddings of the class names).
    hidden:         MLP hidden width.
    segmentation:   number of semantic classes for a segmentation head (0 = none).
    depth:          add a depth head.
    depth_range:    (min, max) metres of the depth bins.
    """

    taps: list[str] = field(default_factory=list)
    fusion: str = "fpn"
    width: int = 64
    classifier: str = "linear"
    hidden: int = 256
    segmentation: int = 0
    depth: bool = False
    depth_bins: int = 64
    depth_range: tuple[float, float] = (0.5, 20.0)


class PerceptionHeads(nn.Module):
    """Fusion + classification (+ segmentation, + depth) heads over a tap dict.

    ``forward(feats, size)`` returns a dict with ``logits`` [B, K], ``pooled`` [B, D], ``fmap``
    (the FPN map) and, when configured, ``segmentation`` [B, S, H, W] and ``depth`` [B, 1, H, W].
    """

    def __init__(self, tap_channels: dict[str, int], num_classes: int, config: HeadConfig | None = None,
                 text_embeddings: Tensor | None = None):
        super().__init__()
        c = config or HeadConfig()
        self.config = c
        self.fusion = FeatureFusion(tap_channels, c.width, c.fusion)
        self.classifier = ClassificationHead(self.fusion.pooled_dim, num_classes, c.classifier, c.hidden,
                                             text_embeddings)
        self.segmentation = SegmentationHead(c.width, c.segmentation) if c.segmentation else None
        self.depth = DepthHead(c.width, c.depth_bins, *c.depth_range) if c.depth else None

    def forward(self, feats: dict[str, Tensor], size) -> dict[str, Tensor]:
        dense = self.segmentation is not None or self.depth is not None
        pooled, fmap = self.fusion(feats, need_map=dense)
        out = {"logits": self.classifier(pooled), "pooled": pooled}
        if fmap is not None:
            out["fmap"] = fmap
        if self.segmentation is not None:
            out["segmentation"] = self.segmentation(fmap, size)
        if self.depth is not None:
            out["depth"] = self.depth(fmap, size)
        return out
