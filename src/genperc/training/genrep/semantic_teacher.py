"""The EMA semantic network ε_sem of GenRep's unified stage (§3.3): it supplies x_sem (Eq. 6–9)
and the REPA target (Eq. 10), and follows the unified model after every optimizer step."""

from __future__ import annotations

import torch
from torch import Tensor

from genperc.diffusion.conditioning import Conditioning
from genperc.diffusion.schedule import NoiseSchedule
from genperc.models.semantic import GenRepModel, SemanticConfig


class SemanticTeacher:
    """ε_sem: a frozen copy of the unified model, updated as θ_sem ← m·θ_sem + (1 − m)·θ_unified
    (m = ``semantic.ema``) by :meth:`after_step` — a trainer hook, so the update follows each
    optimizer step.

    Called as ``teacher(x_t, t, cond)`` (the unified model's semantic source) it returns x_sem: the
    output of ε_sem's *denoiser* for (x_t, t, y) — its x̂0 (``representation: x0``, clipped) or raw
    prediction — without ε_sem's own modulation; ``semantic_dropout`` replaces x_sem by x_t on that
    share of rows. The features of that pass are kept for the ``noisy`` REPA target of the same x_t
    (:meth:`noisy_features` runs the pass itself when there was none for that x_t, e.g. with the
    modulation off), so every micro-batch gets its own target.
    """

    def __init__(self, unified: GenRepModel, schedule: NoiseSchedule, cfg: SemanticConfig,
                 generator: torch.Generator | None = None):
        self.unified = unified
        self.net = unified.clone()
        self.net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.schedule, self.cfg = schedule, cfg
        self.generator = generator or torch.Generator().manual_seed(1)
        self.momentum = float(cfg.ema)
        self.updates = 0
        self._last_pass: tuple[Tensor, dict[str, Tensor]] | None = None  # (x_t, ε_sem's features on it)

    def after_step(self, trainer=None) -> None:
        """The trainer hook: one EMA update per optimizer step."""
        self.ema_update()

    @torch.no_grad()
    def ema_update(self) -> None:
        for p_sem, p_unified in zip(self.net.parameters(), self.unified.parameters(), strict=True):
            p_sem.mul_(self.momentum).add_(p_unified.detach().to(p_sem.dtype), alpha=1 - self.momentum)
        self.updates += 1

    @torch.no_grad()
    def _denoise(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        raw = self.net.denoiser(x_t, t, cond)[:, :x_t.shape[1]]
        self._last_pass = (x_t, self.net.taps.pop())
        return raw

    @torch.no_grad()
    def __call__(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        raw = self._denoise(x_t, t, cond)
        if self.cfg.representation == "x0":
            x_sem = self.schedule.to_x0(raw.float(), x_t.float(), t).clamp(-1, 1).to(x_t.dtype)
        else:
            x_sem = raw
        if self.cfg.semantic_dropout > 0:
            r = torch.rand(x_t.shape[0], generator=self.generator).to(x_t.device)
            x_sem = torch.where((r < self.cfg.semantic_dropout).view(-1, 1, 1, 1), x_t, x_sem)
        return x_sem

    @torch.no_grad()
    def noisy_features(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> dict[str, Tensor]:
        """ε_sem's tapped features on this x_t (the pass made for x_sem when there was one)."""
        if self._last_pass is None or self._last_pass[0] is not x_t:
            self._denoise(x_t, t, cond)
        return self._last_pass[1]

    @torch.no_grad()
    def clean_features(self, x0: Tensor) -> dict[str, Tensor]:
        """ε_sem's tapped features on the clean image (REPA's target, noise-free pass)."""
        return self.net.features(x0)
