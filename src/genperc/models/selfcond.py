"""DDAE++ self-conditioning inside the denoiser, and the heads of contrastive self-distillation.

DDAE++ (Xiang et al. 2025, seed 004) "introduces self-conditioning, a mechanism that internally
leverages the rich semantics inherent in denoising network to guide its own decoding layers,
forming a tighter bottleneck that condenses high-level semantics", "with 1% computational overhead"
and across "diverse diffusion architectures". What is known beyond the abstract (REFERENCE.md,
"DDAE / DDAE++"): features aggregated at an intermediate layer are routed into the later layers
*together with the timestep condition*, with a "time-adaptive scaling"; the layer is chosen by the
training loss of short runs (:mod:`genperc.training.layer_selection`). Everything else is genperc's
choice, stated here:

* **Where the features are read.** The output of one named block of the diffusers backbone
  (``block``): UNet ``down{i}`` / ``mid`` / ``up{i}`` (the outputs of ``down_blocks[i]`` (its
  hidden state), ``mid_block`` and ``up_blocks[i]``), DiT / PixArt ``blk{i}`` (the tokens of
  ``transformer_blocks[i]``). ``mid`` is the default: the UNet bottleneck, and on a DiT the last
  block of the first half (block L/2 − 1), the transformer's counterpart of a bottleneck.
* **Pooling and projection.** Global average over H×W (UNet) or the tokens (DiT) → LayerNorm →
  Linear(C, ``hidden``) → SiLU → Linear(``hidden``, D), D the width of the conditioning embedding.
* **Time-adaptive scaling.** A per-channel gate g(t) ∈ ℝ^D multiplies the projection:
  g(t) = W·[sin, cos](t·ω) (128 sinusoidal features, diffusers' ``get_timestep_embedding``), W and
  its bias **zero-initialised**, so a new model computes exactly the baseline (the offset is exact
  zeros) and learns how much to listen at each noise level — the adaLN-Zero idea. With
  ``time_adaptive: false`` g is a zero-initialised vector constant in t.
* **Where it goes.** The offset s = g(t)⊙MLP(pool(h)) is added to the conditioning embedding of
  every block that runs *after* the chosen one: UNet — the timestep(+class) embedding ``emb``
  (``temb``) that the later blocks' resnets receive (AdaGN), added by a forward pre-hook on each
  block; DiT — the adaLN conditioning c = emb(t, y) computed inside each later block's
  ``norm1.emb`` (a forward hook adds s), and the final layer's adaLN, which diffusers computes
  from block 0's embedder after the last block, so it receives s too; PixArt (the text DiT) — the
  adaLN-single vector of the later blocks, recomputed as ``linear(silu(embedded_t + s))`` (its final
  layer reads ``embedded_t`` inline and does not receive s).
* **Gradient.** ``stop_grad: false`` (default) lets the diffusion loss train the encoder through
  the routed path ("a tighter bottleneck"); ``true`` detaches the pooled features in the route.

The backbone stays the plain diffusers model: hooks are bound methods of :class:`SelfConditioning`
(a submodule of the :class:`~genperc.models.denoiser.Denoiser`, so its weights are saved and loaded
with the denoiser's and a ``copy.deepcopy`` re-binds them to the copy). The hooks act only inside
:meth:`SelfConditioning.running` (which ``Denoiser.forward`` enters); a call of the bare backbone
is the baseline. GenRep's feature taps read the same blocks with their own hooks.

:class:`ContrastiveHeads` are the MoCo v3 projector and predictor of contrastive self-distillation
(:mod:`genperc.training.contrastive`) on the pooled self-conditioning features, and the optional
EDM-style embedding of the augmentation parameters (``aug_dim`` > 0, a bias-free zero-initialised
linear map added to the conditioning of *every* block, so "no augmentation" — the zero vector — is
exactly the model without it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from genperc.config import SelfConditioningConfig
from genperc.errors import UserError
from genperc.models.heads import named_blocks

#: backbones self-conditioning knows how to route into
BACKBONES = ("UNet2DConditionModel", "DiTTransformer2DModel", "PixArtTransformer2DModel")
#: length of the augmentation vector of ``genperc.training.contrastive.augment_views``
AUGMENT_DIM = 9
TIME_FEATURES = 128


def selectable_blocks(backbone: nn.Module) -> list[str]:
    """Blocks self-conditioning may read: every block that has a later block to condition."""
    return list(named_blocks(backbone, "self-condition"))[:-1]


def resolve_block(backbone: nn.Module, name: str) -> str:
    """``name`` checked against :func:`selectable_blocks` (``mid`` on a DiT: block L/2 − 1)."""
    names = selectable_blocks(backbone)
    if name == "mid" and hasattr(backbone, "transformer_blocks"):
        name = f"blk{len(backbone.transformer_blocks) // 2 - 1}"
    if name not in names:
        raise UserError(f"unknown self-conditioning block {name!r} (or it has no later block to condition)",
                        f"valid blocks: {', '.join(names)} (model.self_conditioning.block)")
    return name


def _block_channels(backbone: nn.Module, name: str) -> int:
    c = backbone.config
    if name.startswith("blk"):
        return int(c.num_attention_heads * c.attention_head_dim)
    if name == "mid":
        return int(c.block_out_channels[-1])
    if name.startswith("down"):
        return int(c.block_out_channels[int(name[4:])])
    return int(list(reversed(c.block_out_channels))[int(name[2:])])


def conditioning_width(backbone: nn.Module) -> int:
    """Width D of the conditioning embedding the blocks receive (UNet ``emb``, DiT adaLN c)."""
    if hasattr(backbone, "time_embedding"):
        return int(backbone.time_embedding.linear_2.out_features)
    return int(backbone.config.num_attention_heads * backbone.config.attention_head_dim)


class StopForward(Exception):
    """Raised by the block hook to end a forward pass once the pooled features exist."""


@dataclass
class Pass:
    """What the hooks share during one forward pass (:meth:`SelfConditioning.running`)."""

    t: Tensor
    extra: Tensor | None = None  # added to every block's conditioning (the augmentation embedding)
    stop: bool = False  # end the pass after the chosen block (features only)
    pooled: Tensor | None = None  # [B, C] pooled features of the chosen block
    offset: Tensor | None = None  # [B, D] the self-conditioning offset, once the block has run
    embedded: Tensor | None = None  # PixArt: adaLN-single's embedded timestep


class TimeGate(nn.Module):
    """g(t) ∈ ℝ^D: zero-initialised; a linear map of sinusoidal features of t, or a constant vector."""

    def __init__(self, width: int, time_adaptive: bool = True):
        super().__init__()
        self.time_adaptive = bool(time_adaptive)
        if self.time_adaptive:
            self.proj = nn.Linear(TIME_FEATURES, width)
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        else:
            self.scale = nn.Parameter(torch.zeros(width))

    def forward(self, t: Tensor) -> Tensor:
        if not self.time_adaptive:
            return self.scale.expand(t.shape[0], -1)
        from diffusers.models.embeddings import get_timestep_embedding

        feats = get_timestep_embedding(t.float().reshape(-1), TIME_FEATURES, flip_sin_to_cos=True,
                                       downscale_freq_shift=0)
        return self.proj(feats.to(self.proj.weight.dtype))


class SelfConditioning(nn.Module):
    """Pool → MLP → time gate → offset of the later blocks' conditioning (module docstring)."""

    def __init__(self, backbone: nn.Module, config: SelfConditioningConfig):
        super().__init__()
        name = type(backbone).__name__
        if name not in BACKBONES:
            raise UserError(f"self-conditioning does not support a {name} backbone", f"use one of {', '.join(BACKBONES)}")
        self.config = config
        self.block = resolve_block(backbone, config.block)
        self.channels, self.width = _block_channels(backbone, self.block), conditioning_width(backbone)
        self.norm = nn.LayerNorm(self.channels)
        self.mlp = nn.Sequential(nn.Linear(self.channels, config.hidden), nn.SiLU(), nn.Linear(config.hidden, self.width))
        self.gate = TimeGate(self.width, config.time_adaptive)
        self.current: Pass | None = None
        self._attach(backbone, name)

    # -- hooks ------------------------------------------------------------------------------------

    def _attach(self, backbone: nn.Module, name: str) -> None:
        blocks = named_blocks(backbone, "self-condition")
        blocks[self.block].register_forward_hook(self._read)
        if name == "UNet2DConditionModel":
            for block in blocks.values():
                block.register_forward_pre_hook(self._add_to_temb, with_kwargs=True)
        elif name == "DiTTransformer2DModel":
            for block in blocks.values():
                block.norm1.emb.register_forward_hook(self._add_to_output)
        else:  # PixArt: adaLN-single runs once; the later blocks get its vector recomputed
            self._adaln = [backbone.adaln_single]  # a list: not a registered submodule
            backbone.adaln_single.register_forward_hook(self._keep_embedded)
            for block in blocks.values():
                block.register_forward_pre_hook(self._add_to_adaln_single, with_kwargs=True)

    def _added(self) -> Tensor | None:
        p = self.current
        if p is None:
            return None
        parts = [x for x in (p.extra, p.offset) if x is not None]
        return sum(parts[1:], parts[0]) if parts else None

    def _read(self, module, args, output) -> None:
        p = self.current
        if p is None:
            return
        h = output[0] if isinstance(output, tuple) else output
        p.pooled = h.mean(dim=(2, 3)) if h.ndim == 4 else h.mean(dim=1)
        if p.stop:
            raise StopForward
        p.offset = self.offset(p.pooled.detach() if self.config.stop_grad else p.pooled, p.t)

    def _add_to_temb(self, module, args, kwargs):
        add = self._added()
        if add is None:
            return None
        if "temb" in kwargs:
            return args, {**kwargs, "temb": kwargs["temb"] + add.to(kwargs["temb"].dtype)}
        return (args[0], args[1] + add.to(args[1].dtype), *args[2:]), kwargs  # mid_block(sample, emb)

    def _add_to_output(self, module, args, output):
        add = self._added()
        return None if add is None else output + add.to(output.dtype)

    def _keep_embedded(self, module, args, output) -> None:
        if self.current is not None:
            self.current.embedded = output[1]

    def _add_to_adaln_single(self, module, args, kwargs):
        add = self._added()
        if add is None:
            return None
        adaln = self._adaln[0]
        return args, {**kwargs, "timestep": adaln.linear(adaln.silu(self.current.embedded + add.to(self.current.embedded.dtype)))}

    # -- the method -------------------------------------------------------------------------------

    def offset(self, pooled: Tensor, t: Tensor) -> Tensor:
        """s = g(t) ⊙ MLP(LayerNorm(pooled)), [B, D]: what the later blocks' conditioning receives."""
        return self.gate(t).to(pooled.dtype) * self.mlp(self.norm(pooled))

    @contextlib.contextmanager
    def running(self, t: Tensor, extra: Tensor | None = None, stop: bool = False) -> Iterator[Pass]:
        """The hooks act inside this context, for one forward pass at timesteps ``t`` [B]."""
        self.current = Pass(t=t, extra=extra, stop=stop)
        try:
            yield self.current
        finally:
            self.current = None


class ContrastiveHeads(nn.Module):
    """MoCo v3's projector and predictor over pooled features, and the augmentation embedding.

    Projector: Linear(C, ``hidden``) → LayerNorm → GELU → Linear(``hidden``, ``proj_dim``); predictor:
    Linear(``proj_dim``, ``pred_dim``) → LayerNorm → GELU → Linear(``pred_dim``, ``proj_dim``). MoCo v3
    uses (synchronised) BatchNorm and 3/2 layers; LayerNorm here, so a sample's loss does not depend
    on the batch statistics or on the number of processes, and two layers each (the pooled input is
    already a projection-sized vector) — genperc's choice.
    """

    def __init__(self, in_dim: int, cond_width: int, hidden: int = 1024, proj_dim: int = 256, pred_dim: int = 1024,
                 aug_dim: int = 0):
        super().__init__()
        self.projector = _mlp(in_dim, hidden, proj_dim)
        self.predictor = _mlp(proj_dim, pred_dim, proj_dim)
        self.augment = None
        if aug_dim:
            self.augment = nn.Linear(aug_dim, cond_width, bias=False)
            nn.init.zeros_(self.augment.weight)


def _mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.LayerNorm(h), nn.GELU(), nn.Linear(h, o))


__all__ = ["AUGMENT_DIM", "ContrastiveHeads", "SelfConditioning", "StopForward", "TimeGate", "named_blocks",
           "resolve_block", "selectable_blocks"]
