"""GenRep's unified model: a class-conditional learned-variance denoiser with perception heads and
semantic-driven modulation of the reverse process (GenRep Eq. 6–10).

:class:`GenRepModel` wraps a :class:`~genperc.models.denoiser.Denoiser` and adds

* :class:`~genperc.models.heads.PerceptionHeads` on tapped decoder features (``perceive``);
* :class:`SemanticModulation` — Eq. 6–9:

  - mean:      μ = μ_base(x_t, t) + W_t·concat(x_t, x_sem)                     (Eq. 6–7)
  - variance:  σ² = σ²_base(x_t, t)·(1 + f_σ(x_sem)),  f_σ = MLP(x_sem) ∈ ℝ     (Eq. 8–9)

* :class:`RepProjector` — the REPA projector for L_rep_align (Eq. 10).

Choices the paper leaves open, each a key of :class:`SemanticConfig`:

* **Where the mean correction is added.** The correction is added to the model's *prediction*
  (ε, x0 or v, the first C output channels) rather than to μ after the sampler computed it, so
  every sampler of the diffusion core sees it. For the single-step DDPM transition t → t−1 the
  posterior mean is affine in the prediction with a known per-t coefficient c(t), so this *is*
  μ += c(t)·W_t·concat(x_t, x_sem) — a per-timestep learned linear map, as Eq. 7 asks (c(t) is
  absorbed into W_t).
* **W_t (``buckets``).** Eq. 7 writes one W_t per timestep; genperc shares one 1×1
  channel-mixing matrix [C, 2C] within each of ``buckets`` equal ranges of the T training steps
  (t·buckets // T) — ``buckets: 10`` by default, a choice of genperc; ``buckets`` = T
  (``num_train_timesteps``, 1000) is one W_t per timestep as Eq. 7 writes. No bias,
  zero-initialised (the pretrained behaviour is kept at start).
* **Variance factor kept positive.** 1 + f_σ = exp(g) with g = MLP(x_sem) whose last layer is
  zero-initialised (factor 1 at start); the factor multiplies the *variance*. It is applied through
  the learned-variance channel: v' = v + 2g / w_t with w_t = max(log β_t − log β̃_t, 1e-6)
  (``MIN_LOG_BETA_RANGE``), which multiplies the ``learned_range`` variance of a single-step DDPM
  transition by exp(g·(log β_t − log β̃_t)/w_t): **exactly exp(g) wherever the β range is at least
  1e-6, and less where the clamp bites** — at t near T, where β̃_t → β_t (for the linear schedule
  of T = 1000 the last few steps; ``variance_factor_exponent`` gives the exact exponent per t).
  The clamp keeps v finite: without it the shift 2g/w_t grows without bound as w_t → 0. Strided
  DDPM steps see the factor approximately, through their own β range. Even above the clamp a
  large shift of v costs precision in float32 (frac·log β + (1 − frac)·log β̃ loses about 1e-2
  in log σ² at large t) — a limit of the learned-range parameterisation. The MLP reads x_sem
  average-pooled to ``var_pool``×``var_pool``.
* **What x_sem is.** In training, x_sem comes from the EMA semantic network ε_sem run on the same
  (x_t, t, y): its x̂0 prediction (``representation: x0``, clipped to [−1, 1]) or its raw output
  (``raw``). x_sem must be a function of x_t only — feeding a representation of the clean image
  would leak the target into the mean correction. Image-shaped, so that at inference it can be
  replaced by x_t as the paper says (``inference: x_t``; ``none`` disables the modulation at
  inference; ``semantic_dropout`` replaces x_sem by x_t for that fraction of training rows, an
  option the paper does not have, to narrow the train/inference gap).
* **L_rep_align.** REPA (Yu et al. 2024): negative cosine similarity, per spatial position,
  between a 3-layer MLP projection (1×1 convolutions) of the unified denoiser's hidden state at
  tap ``rep_student_tap`` on x_t and the semantic network's features at ``rep_target_tap`` on the
  clean image (``rep_target_input: clean``, REPA's choice) or on x_t (``noisy``: the ε_sem pass of
  the same micro-batch's x_t, one per micro-batch); the target is average-pooled / resized to the
  student's grid. Weight ``rep_weight``: 1 by default, as Eq. 10 writes L_genera = L_LDM +
  L_rep_align; REPA's own λ is 0.5 (``rep_weight: 0.5``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genperc.diffusion.conditioning import Conditioning
from genperc.diffusion.variance import log_beta_range
from genperc.errors import UserError
from genperc.models.denoiser import Denoiser, DenoiserConfig
from genperc.models.heads import FeatureTaps, HeadConfig, PerceptionHeads, available_taps, default_taps

_FORMAT = "genperc.GenRepModel"
MIN_LOG_BETA_RANGE = 1e-6  # the clamp of the learned-range width in the variance factor
REPRESENTATIONS = ("x0", "raw")
INFERENCE_SEMANTICS = ("x_t", "none")


@dataclass
class SemanticConfig:
    """Semantic-driven generation (GenRep Eq. 6–10); see the module docstring for every key."""

    modulation: bool = True  # Eq. 6–9 noise adjustment on/off (Table 12 "Noise Adjust.")
    buckets: int = 10  # W_t shared within 10 timestep ranges; T = one W_t per timestep (Eq. 7)
    representation: str = "x0"  # x0 | raw
    var_pool: int = 4
    var_hidden: int = 64
    inference: str = "x_t"  # x_t | none
    semantic_dropout: float = 0.0
    rep_align: bool = True  # Eq. 10 L_rep_align on/off (Table 12)
    rep_weight: float = 1.0  # Eq. 10: 1; REPA: 0.5
    rep_student_tap: str = ""  # "" = mid (UNet) / a block at depth/3 (DiT)
    rep_target_tap: str = ""  # "" = the first (coarsest) perception tap
    rep_target_input: str = "clean"  # clean | noisy
    projector_hidden: int = 256
    ema: float = 0.999  # m of the EMA semantic network (stage 2)

    def __post_init__(self):
        if self.representation not in REPRESENTATIONS:
            raise UserError(f"semantic.representation={self.representation!r} is not valid", "use x0 or raw")
        if self.inference not in INFERENCE_SEMANTICS:
            raise UserError(f"semantic.inference={self.inference!r} is not valid", "use x_t or none")
        if self.rep_target_input not in ("clean", "noisy"):
            raise UserError(f"semantic.rep_target_input={self.rep_target_input!r} is not valid", "use clean or noisy")
        if self.buckets < 1:
            raise UserError("semantic.buckets must be >= 1", "use e.g. 10")
        if not 0 <= self.ema < 1:
            raise UserError(f"semantic.ema={self.ema} must lie in [0, 1)", "use e.g. 0.999")


class SemanticModulation(nn.Module):
    """Eq. 6–9 on a raw learned-variance output ``[prediction (C), v (C)]`` (module docstring)."""

    def __init__(self, channels: int, log_beta_range: Tensor, buckets: int = 10, var_pool: int = 4,
                 var_hidden: int = 64):
        super().__init__()
        self.channels, self.buckets = int(channels), int(buckets)
        self.num_train_timesteps = int(log_beta_range.shape[0])
        self.weight = nn.Parameter(torch.zeros(buckets, channels, 2 * channels))  # W_t, zero-init
        self.var_mlp = nn.Sequential(nn.AdaptiveAvgPool2d(var_pool), nn.Flatten(),
                                     nn.Linear(channels * var_pool * var_pool, var_hidden), nn.SiLU(),
                                     nn.Linear(var_hidden, 1))
        nn.init.zeros_(self.var_mlp[-1].weight)
        nn.init.zeros_(self.var_mlp[-1].bias)
        # log β_t − log β̃_t (clipped at t = 0), the width of the learned_range interval, clamped
        self.register_buffer("log_beta_range", log_beta_range.float().clamp(min=MIN_LOG_BETA_RANGE))

    def bucket(self, t: Tensor) -> Tensor:
        t = t.long().clamp(0, self.num_train_timesteps - 1)
        return (t * self.buckets) // self.num_train_timesteps

    def mean_correction(self, x_t: Tensor, x_sem: Tensor, t: Tensor) -> Tensor:
        w = self.weight[self.bucket(t)]  # [B, C, 2C]
        z = torch.cat([x_t, x_sem.to(x_t.dtype)], dim=1)
        return torch.einsum("boc,bchw->bohw", w.to(z.dtype), z)

    def variance_factor_exponent(self, true_log_beta_range: Tensor) -> Tensor:
        """Per t, the multiple of g by which the modulation shifts log σ²: (log β_t − log β̃_t)/w_t,
        1 where the clamp does not bite (module docstring)."""
        return true_log_beta_range.double() / self.log_beta_range.double()

    def log_variance_factor(self, x_sem: Tensor) -> Tensor:
        """g = log(1 + f_σ(x_sem)), [B]."""
        return self.var_mlp(x_sem).squeeze(1)

    def forward(self, raw: Tensor, x_t: Tensor, x_sem: Tensor, t: Tensor) -> Tensor:
        c = self.channels
        t = torch.as_tensor(t, device=raw.device)
        if t.ndim == 0:
            t = t.expand(raw.shape[0])
        pred = raw[:, :c] + self.mean_correction(x_t, x_sem, t).to(raw.dtype)
        if raw.shape[1] == c:
            return pred
        g = self.log_variance_factor(x_sem.to(raw.dtype))
        width = self.log_beta_range[t.long().clamp(0, self.num_train_timesteps - 1)].to(raw.dtype)
        v = raw[:, c:] + (2 * g / width).view(-1, 1, 1, 1)
        return torch.cat([pred, v], dim=1)


class RepProjector(nn.Module):
    """REPA's 3-layer MLP projector, applied per position (1×1 convolutions)."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_channels, hidden, 1), nn.SiLU(), nn.Conv2d(hidden, hidden, 1), nn.SiLU(),
                                 nn.Conv2d(hidden, out_channels, 1))

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h)


def rep_align_loss(projected: Tensor, target: Tensor) -> Tensor:
    """−cos(projected, target) per position, averaged; the target is resized to the projected grid."""
    if target.shape[-2:] != projected.shape[-2:]:
        th, tw = target.shape[-2:]
        ph, pw = projected.shape[-2:]
        if th >= ph and tw >= pw and th % ph == 0 and tw % pw == 0:
            target = F.adaptive_avg_pool2d(target, (ph, pw))
        else:
            target = F.interpolate(target, size=(ph, pw), mode="bilinear", align_corners=False)
    return -F.cosine_similarity(projected.float(), target.detach().float(), dim=1).mean()


class GenRepModel(nn.Module):
    """Denoiser + perception heads + semantic modulation + REPA projector, one ``nn.Module``.

    ``forward(x_t, t, cond)`` is a drop-in denoiser (the trainer and the sampler call it): the raw
    output, modulated by x_sem when the modulation is on. x_sem is the ``x_sem`` argument when given,
    else — in training, when a semantic source is attached with :meth:`attach_semantic` — the EMA
    semantic network's representation of (x_t, t, y), else x_t (``inference: x_t``) or nothing.
    The tapped decoder features of the last forward are kept in ``last_features`` (REPA reads the
    student's hidden state there).

    ``perceive(x)`` runs the noise-free perception pass (t = ``perception_t``, the null class —
    the true label is unknown at test time, an explicit choice; GenRep §3.1 conditions on y) and
    returns the heads' outputs. The perception stage (stage 1) calls only ``perceive``.
    """

    def __init__(self, denoiser: Denoiser, num_classes: int, heads: HeadConfig | None = None,
                 semantic: SemanticConfig | None = None, log_beta_range: Tensor | None = None,
                 text_embeddings: Tensor | None = None, perception_t: int = 0, tap_channels: dict | None = None):
        super().__init__()
        self.denoiser = denoiser
        self.num_classes = int(num_classes)
        self.head_config = heads or HeadConfig()
        self.semantic_config = semantic or SemanticConfig()
        self.perception_t = int(perception_t)
        sc = self.semantic_config
        head_taps = list(self.head_config.taps) or default_taps(denoiser)
        self.head_config.taps = head_taps
        names = available_taps(denoiser)
        self.student_tap = sc.rep_student_tap or ("mid" if "mid" in names else f"blk{max(0, len(names) // 3)}")
        self.target_tap = sc.rep_target_tap or head_taps[0]
        all_taps = list(dict.fromkeys(head_taps + [self.student_tap, self.target_tap]))
        self.taps = FeatureTaps(denoiser, all_taps)
        if tap_channels is None:
            tap_channels = self.taps.channels(denoiser)
        self.tap_channels = {k: int(v) for k, v in tap_channels.items()}
        self.heads = PerceptionHeads({n: self.tap_channels[n] for n in head_taps}, num_classes, self.head_config,
                                     text_embeddings)
        c = denoiser.config.in_channels
        self.modulation = None
        if sc.modulation:
            if log_beta_range is None:
                raise UserError("the semantic modulation needs the schedule's β range", "pass log_beta_range")
            self.modulation = SemanticModulation(c, log_beta_range, sc.buckets, sc.var_pool, sc.var_hidden)
        self.projector = (RepProjector(self.tap_channels[self.student_tap], self.tap_channels[self.target_tap],
                                       sc.projector_hidden) if sc.rep_align else None)
        self.last_features: dict[str, Tensor] = {}
        self._semantic_source = None  # a plain callable, never a registered submodule
        self._text_dim = 0 if text_embeddings is None else int(text_embeddings.shape[1])

    # -- configuration --------------------------------------------------------------------------

    @property
    def config(self) -> DenoiserConfig:
        """The denoiser's config (what samplers and the trainer look at)."""
        return self.denoiser.config

    def attach_semantic(self, source) -> None:
        """Use ``source(x_t, t, cond) -> x_sem`` in training (stage 2); None detaches it."""
        object.__setattr__(self, "_semantic_source", source)

    def attention_parameters(self) -> list[nn.Parameter]:
        """Parameters of the denoiser's attention modules (Algorithm 1's "hot params")."""
        from diffusers.models.attention_processor import Attention

        seen, out = set(), []
        for m in self.denoiser.modules():
            if isinstance(m, Attention):
                for p in m.parameters():
                    if id(p) not in seen:
                        seen.add(id(p))
                        out.append(p)
        return out

    def extra_parameters(self) -> list[nn.Parameter]:
        """Heads, modulation and projector: everything outside the denoiser."""
        mods = [self.heads] + [m for m in (self.modulation, self.projector) if m is not None]
        return [p for m in mods for p in m.parameters()]

    # -- forward passes -------------------------------------------------------------------------

    def forward(self, x_t: Tensor, t, cond: Conditioning | None = None, x_sem: Tensor | None = None) -> Tensor:
        cond = cond if cond is not None else Conditioning()
        raw = self.denoiser(x_t, t, cond)
        self.last_features = self.taps.pop()
        if self.modulation is None:
            return raw
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        if x_sem is None and self.training and self._semantic_source is not None:
            x_sem = self._semantic_source(x_t, t, cond)
        if x_sem is None:
            if self.semantic_config.inference == "none" and not self.training:
                return raw
            x_sem = x_t
        return self.modulation(raw, x_t, x_sem, t)

    def features(self, x: Tensor, t=None, cond: Conditioning | None = None) -> dict[str, Tensor]:
        """Tapped features of one denoiser pass (default: noise-free, null class)."""
        b = x.shape[0]
        t = self.perception_t if t is None else t
        t = torch.as_tensor(t, device=x.device).long()
        if t.ndim == 0:
            t = t.expand(b)
        self.denoiser(x, t, cond if cond is not None else Conditioning())
        return self.taps.pop()

    def perceive(self, x: Tensor, t=None, cond: Conditioning | None = None) -> dict[str, Tensor]:
        """Perception heads on the noise-free pass: logits (+ segmentation, depth, pooled)."""
        feats = self.features(x, t, cond)
        out = self.heads({n: feats[n] for n in self.head_config.taps}, x.shape[-2:])
        out["features"] = feats
        return out

    # -- copies and persistence -----------------------------------------------------------------

    def config_dict(self) -> dict[str, Any]:
        hc = asdict(self.head_config)
        hc["depth_range"] = list(hc["depth_range"])
        return {"_format": _FORMAT, "denoiser": self.denoiser.config.to_dict(), "num_classes": self.num_classes,
                "heads": hc, "semantic": asdict(self.semantic_config), "perception_t": self.perception_t,
                "tap_channels": self.tap_channels, "text_dim": self._text_dim}

    @classmethod
    def from_config_dict(cls, d: dict[str, Any]) -> GenRepModel:
        d = dict(d)
        if d.pop("_format", None) != _FORMAT:
            raise UserError("not a genperc GenRep model config", "pass a directory written by GenRepModel.save_pretrained")
        denoiser = Denoiser(DenoiserConfig.from_dict(d["denoiser"]))
        hc = dict(d["heads"])
        hc["depth_range"] = tuple(hc["depth_range"])
        heads = HeadConfig(**hc)
        sem = SemanticConfig(**d["semantic"])
        n = int(d["num_classes"])
        text = torch.zeros(n, d["text_dim"]) if d.get("text_dim") else None
        lbr = torch.ones(1)  # replaced by the saved buffer on load
        model = cls(denoiser, n, heads, sem, log_beta_range=lbr, text_embeddings=text,
                    perception_t=int(d.get("perception_t", 0)), tap_channels=d["tap_channels"])
        return model

    def clone(self) -> GenRepModel:
        """An independent copy (own hooks), same weights."""
        other = type(self).from_config_dict(self.config_dict())
        if other.modulation is not None:
            other.modulation.log_beta_range = self.modulation.log_beta_range.clone()
        other.load_state_dict(self.state_dict())
        return other.to(next(self.parameters()).device)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # the β range buffer has the schedule's length, which the config does not record
        key = "modulation.log_beta_range"
        if self.modulation is not None and key in state_dict and state_dict[key].shape != self.modulation.log_beta_range.shape:
            self.modulation.log_beta_range = torch.empty_like(state_dict[key])
            self.modulation.num_train_timesteps = int(state_dict[key].shape[0])
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """``config.json`` + ``model.safetensors`` (whole state dict), written atomically."""
        from safetensors.torch import save_file

        from genperc.atomic import atomic_directory

        target = Path(directory)
        with atomic_directory(target) as tmp:
            (tmp / "config.json").write_text(json.dumps(self.config_dict(), indent=2) + "\n")
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "genperc": _FORMAT})
        return target

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device=None) -> GenRepModel:
        from safetensors.torch import load_file

        d = Path(directory)
        for f in ("config.json", "model.safetensors"):
            if not (d / f).is_file():
                raise UserError(f"incomplete GenRep model directory: missing {d / f}",
                                "pass a directory written by GenRepModel.save_pretrained")
        model = cls.from_config_dict(json.loads((d / "config.json").read_text()))
        model.load_state_dict(load_file(str(d / "model.safetensors")))
        if device is not None:
            model.to(device)
        return model


def build_genrep_model(denoiser: Denoiser, num_classes: int, schedule, heads: HeadConfig | None = None,
                       semantic: SemanticConfig | None = None, text_embeddings: Tensor | None = None,
                       perception_t: int = 0) -> GenRepModel:
    """A :class:`GenRepModel` around ``denoiser`` with the schedule's β range for the variance factor."""
    if denoiser.config.num_classes != num_classes:
        raise UserError(f"the denoiser has {denoiser.config.num_classes} classes, the data {num_classes}",
                        "build the denoiser with num_classes matching the data set")
    return GenRepModel(denoiser, num_classes, heads=heads, semantic=semantic,
                       log_beta_range=log_beta_range(schedule), text_embeddings=text_embeddings,
                       perception_t=perception_t)


__all__ = ["GenRepModel", "RepProjector", "SemanticConfig", "SemanticModulation", "build_genrep_model",
           "rep_align_loss"]
