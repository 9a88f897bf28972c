"""Gradient combiners: the plain sum, and symmetric gradient alignment (GenRep Eq. 11–16) with its
comparisons.

A combiner turns the losses of one micro-batch, grouped by objective (``{group: {name: loss}}``),
into gradients: ``combiner.backward(groups, accelerator, scale)``. :class:`SumCombiner` is the
plain gradient of every task; :class:`GradientAlignmentCombiner` is GenRep's.

With g_p = ∇L_percept and g_g = ∇L_genera flattened over the aligned parameters::

    g_g∥ = (g_p·g_g / ‖g_p‖²)·g_p,   g_g⊥ = g_g − g_g∥                     (Eq. 11)
    g_p∥ = (g_p·g_g / ‖g_g‖²)·g_g,   g_p⊥ = g_p − g_p∥                     (Eq. 12)
    cos  = g_p·g_g / (‖g_p‖·‖g_g‖),  α = ((cos + 1)/2)^k                   (Eq. 15, k = 2)
    ĝ_g  = g_g⊥ + α·g_g∥,            ĝ_p = g_p⊥ + α·g_p∥                   (Eq. 13–14)
    update = w_p·ĝ_p + w_g·ĝ_g                                              (Eq. 16, 0.7 / 0.3)

Modes (``AlignConfig.mode``): ``symmetric`` (Eq. 16); ``one-sided`` (Table 13: only one gradient
is aligned, ``one_sided: genera`` — Eq. 13, the table's row — or ``percept``; the other enters
unchanged); ``pcgrad`` (Yu et al. 2020, for comparison: when cos < 0 each gradient loses its
projection on the other, then w_p·ĝ_p + w_g·ĝ_g); ``sum`` (no alignment: w_p·g_p + w_g·g_g).

Explicit choices:

* **Which parameters are aligned.** ``params: attention`` (default, Algorithm 1's "hot params"
  and §3.3: "update weights of attention blocks"): the parameters of the denoiser's attention
  modules that receive both gradients; ``shared``: every parameter that receives both. The cosine
  and the projections use the *concatenation* of those parameters' gradients (one vector, not one
  per tensor). Parameters outside the aligned set (heads, which only L_percept reaches; the
  modulation and projector, which only L_genera reaches; shared non-attention weights when
  ``params: attention``) get the plain w_p·g_p + w_g·g_g, so that the task weights apply
  everywhere.
* **Zero gradients.** If either aligned gradient is zero the projections are undefined; the
  update is then w_p·g_p + w_g·g_g (α and cos are reported as NaN).
* **Loss groups.** The trainer hands the combiner its losses by the objectives' ``group``:
  ``perception`` sums to L_percept, ``generation`` to L_genera; any other group is an error.
* **DDP.** The combiner does its own reduction: it computes each group's local gradient with
  ``torch.autograd.grad``, all-reduces (averages) *each* group's gradient over the processes, and
  only then aligns — so every rank computes the same update, equal to the single-process update
  on the concatenated batch (the projections are nonlinear: aligning per rank and averaging would
  not be). It says so with ``reduces_gradients = True``, and the trainer then keeps DDP from
  reducing the gradients a second time (every micro-batch runs under ``no_sync``).
* **Gradient accumulation.** Alignment is per micro-batch; updates are accumulated into ``.grad``.
* fp16 loss scaling is not supported (bf16 and fp32 are).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from genperc.errors import UserError

MODES = ("symmetric", "one-sided", "pcgrad", "sum")
PARAM_SETS = ("attention", "shared")


@dataclass
class AlignConfig:
    """Gradient combination of L_percept and L_genera (module docstring)."""

    mode: str = "symmetric"  # symmetric | one-sided | pcgrad | sum
    one_sided: str = "genera"  # which gradient the one-sided mode aligns: genera (Eq. 13) | percept (Eq. 14)
    k: float = 2.0  # sharpness of α
    w_p: float = 0.7
    w_g: float = 0.3
    params: str = "attention"  # attention | shared

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserError(f"align.mode={self.mode!r} is not valid", f"use one of {', '.join(MODES)}")
        if self.one_sided not in ("genera", "percept"):
            raise UserError(f"align.one_sided={self.one_sided!r} is not valid", "use genera or percept")
        if self.params not in PARAM_SETS:
            raise UserError(f"align.params={self.params!r} is not valid", f"use one of {', '.join(PARAM_SETS)}")


def alpha(cos: Tensor | float, k: float = 2.0) -> Tensor:
    """α = ((cos + 1)/2)^k (Eq. 15's retention factor)."""
    cos = torch.as_tensor(cos, dtype=torch.float64)
    return ((cos.clamp(-1, 1) + 1) / 2) ** k


def _parallel(g: Tensor, onto: Tensor, dot: Tensor) -> Tensor:
    return (dot / onto.dot(onto)) * onto


def align_pair(g_p: Tensor, g_g: Tensor, cfg: AlignConfig) -> tuple[Tensor, dict[str, float]]:
    """The combined update of two flat gradients (module docstring); returns (update, info)."""
    g_p64, g_g64 = g_p.double(), g_g.double()
    n_p, n_g = g_p64.norm(), g_g64.norm()
    if cfg.mode == "sum" or n_p == 0 or n_g == 0:
        info = {"cos": float("nan") if (n_p == 0 or n_g == 0) else float(g_p64.dot(g_g64) / (n_p * n_g)),
                "alpha": float("nan")}
        return (cfg.w_p * g_p64 + cfg.w_g * g_g64).to(g_p.dtype), info
    dot = g_p64.dot(g_g64)
    cos = dot / (n_p * n_g)
    info = {"cos": float(cos)}
    if cfg.mode == "pcgrad":
        a_p, a_g = g_p64, g_g64
        if cos < 0:
            a_p = g_p64 - _parallel(g_p64, g_g64, dot)
            a_g = g_g64 - _parallel(g_g64, g_p64, dot)
        info["alpha"] = float("nan")
        return (cfg.w_p * a_p + cfg.w_g * a_g).to(g_p.dtype), info
    a = alpha(cos, cfg.k)
    info["alpha"] = float(a)
    par_g = _parallel(g_g64, g_p64, dot)  # Eq. 11
    par_p = _parallel(g_p64, g_g64, dot)  # Eq. 12
    al_g = (g_g64 - par_g) + a * par_g  # Eq. 13
    al_p = (g_p64 - par_p) + a * par_p  # Eq. 14
    if cfg.mode == "one-sided":
        if cfg.one_sided == "genera":
            al_p = g_p64
        else:
            al_g = g_g64
    return (cfg.w_p * al_p + cfg.w_g * al_g).to(g_p.dtype), info


def symmetric_gradient_alignment(g_p: Tensor, g_g: Tensor, k: float = 2.0, w_p: float = 0.7,
                                 w_g: float = 0.3) -> Tensor:
    """GenRep Eq. 11–16 on two flat gradient vectors."""
    return align_pair(g_p, g_g, AlignConfig(mode="symmetric", k=k, w_p=w_p, w_g=w_g))[0]


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce_mean(tensors: list[Tensor]) -> None:
    """Average a list of tensors over processes in place (one flat buffer, one collective)."""
    import torch.distributed as dist

    world = _world()
    if world == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


GROUPS = ("perception", "generation")


def group_sums(groups: dict[str, dict[str, Tensor]]) -> tuple[Tensor | None, Tensor | None]:
    """(L_percept, L_genera): the sums of the ``perception`` and ``generation`` loss groups."""
    unknown = set(groups) - set(GROUPS)
    if unknown:
        raise ValueError(f"gradient alignment combines the loss groups {GROUPS}, got {sorted(unknown)}")
    sums = [sum(groups[g].values()) if groups.get(g) else None for g in GROUPS]
    return sums[0], sums[1]


class GradientAlignmentCombiner:
    """A gradient combiner for the one trainer: ``backward(groups, accelerator, scale)``.

    ``parameters``: every trainable parameter; ``aligned``: the subset aligned (``params:
    attention``) or None for every parameter that receives both gradients (``shared``).
    ``last`` holds the cosine and α of the last call (logged by the GenRep driver).
    """

    reduces_gradients = True  # all-reduces each loss group's gradient itself (no DDP wrapper)

    def __init__(self, parameters, cfg: AlignConfig | None = None, aligned=None):
        self.cfg = cfg or AlignConfig()
        self.params = [p for p in parameters if p.requires_grad]
        if not self.params:
            raise UserError("no trainable parameters to combine gradients for", "check which parameters are trainable")
        ids = None if aligned is None else {id(p) for p in aligned}
        self.aligned_mask = [ids is None or id(p) in ids for p in self.params]
        self.last: dict[str, float] = {}

    def backward(self, groups: dict[str, dict[str, Tensor]], accelerator=None, scale: float = 1.0) -> None:
        if accelerator is not None and getattr(accelerator, "mixed_precision", "no") == "fp16":
            raise UserError("gradient alignment does not support fp16 loss scaling", "use train.mixed_precision=bf16 or no")
        l_p, l_g = group_sums(groups)
        grads = {}
        for name, loss in (("p", l_p), ("g", l_g)):
            if loss is None or not loss.requires_grad:
                grads[name] = [None] * len(self.params)
                continue
            keep = name == "p" and l_g is not None and l_g.requires_grad
            grads[name] = list(torch.autograd.grad(loss, self.params, retain_graph=keep, allow_unused=True))
        # average each group's gradient over processes before any nonlinearity
        for name in ("p", "g"):
            gl = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads[name], strict=True)]
            present = torch.tensor([float(g is not None) for g in grads[name]], device=self.params[0].device)
            _all_reduce_mean(gl)
            if _world() > 1:
                _all_reduce_max(present)
            grads[name] = [g if present[i] > 0 else None for i, g in enumerate(gl)]
        both = [i for i in range(len(self.params))
                if self.aligned_mask[i] and grads["p"][i] is not None and grads["g"][i] is not None]
        w_p, w_g = self.cfg.w_p, self.cfg.w_g
        updates: list[Tensor | None] = [None] * len(self.params)
        both_set = set(both)
        for i in range(len(self.params)):
            if i in both_set:
                continue
            gp, gg = grads["p"][i], grads["g"][i]
            if gp is None and gg is None:
                continue
            u = (w_p * gp if gp is not None else 0) + (w_g * gg if gg is not None else 0)
            updates[i] = u
        if both:
            flat_p = torch.cat([grads["p"][i].reshape(-1) for i in both])
            flat_g = torch.cat([grads["g"][i].reshape(-1) for i in both])
            upd, info = align_pair(flat_p, flat_g, self.cfg)
            self.last = info
            offset = 0
            for i in both:
                n = self.params[i].numel()
                updates[i] = upd[offset:offset + n].view_as(self.params[i]).to(self.params[i].dtype)
                offset += n
        else:
            self.last = {"cos": float("nan"), "alpha": float("nan")}
        for p, u in zip(self.params, updates, strict=True):
            if u is None:
                continue
            u = u * scale
            p.grad = u.detach().clone() if p.grad is None else p.grad + u.detach()


def _all_reduce_max(t: Tensor) -> None:
    import torch.distributed as dist

    dist.all_reduce(t, op=dist.ReduceOp.MAX)


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine similarity of two flat tensors (NaN if either is zero)."""
    na, nb = a.double().norm(), b.double().norm()
    if na == 0 or nb == 0:
        return math.nan
    return float(a.double().dot(b.double()) / (na * nb))


class SumCombiner:
    """Backpropagate the sum of every loss of every group (the plain gradient); DDP reduces it."""

    reduces_gradients = False

    def backward(self, groups: dict[str, dict[str, Tensor]], accelerator, scale: float = 1.0) -> None:
        accelerator.backward(sum(loss for losses in groups.values() for loss in losses.values()) * scale)
