"""GenRep's two objectives beyond the hybrid diffusion loss: L_percept (Eq. 4–5, group
``perception``) and L_rep_align (Eq. 10, group ``generation``, beside L_hybrid)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from genperc.models.semantic import SemanticConfig, rep_align_loss
from genperc.training.genrep.posterior_provider import PosteriorProvider
from genperc.training.genrep.semantic_teacher import SemanticTeacher
from genperc.training.objectives import StepContext


def unwrap(model):
    """The module inside a DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


class PerceptionObjective:
    """L_percept = L_disc + L_gen_distil (GenRep Eq. 4–5), plus dense heads' losses.

    Runs the noise-free perception pass on the clean image itself (the trainer's denoiser output is
    not used: ``uses_output = False``). L_disc is cross-entropy with the true labels of the task
    batch; L_gen_distil = KL(p(y|x) ‖ q(y|x)) averaged over the rows that have a posterior; the
    segmentation head adds pixel cross-entropy (ignore −1), the depth head an L1 loss on log depth
    over valid pixels.
    """

    group = "perception"
    uses_output = False

    def __init__(self, posterior: PosteriorProvider | None = None, distil_weight: float = 1.0,
                 seg_weight: float = 1.0, depth_weight: float = 1.0):
        self.posterior = posterior
        self.distil_weight, self.seg_weight, self.depth_weight = distil_weight, seg_weight, depth_weight
        self.correct = self.seen = 0

    def __call__(self, ctx: StepContext) -> dict[str, Tensor]:
        task_batch = ctx.batch
        out = unwrap(ctx.model).perceive(ctx.x0)
        logits = out["logits"].float()
        labels = task_batch.class_labels.to(logits.device).long()
        losses = {"disc": F.cross_entropy(logits, labels)}
        self.correct += int((logits.argmax(-1) == labels).sum())
        self.seen += int(labels.numel())
        if self.posterior is not None:
            losses["distil"] = self.distil_weight * self._distillation(logits, task_batch.extras.get("index"), ctx.x0)
        losses.update(self._dense_losses(out, task_batch.extras, logits.device))
        return losses

    def _distillation(self, logits: Tensor, index: Tensor | None, x0: Tensor) -> Tensor:
        """KL(p(y|x) ‖ q(y|x)) (Eq. 4) averaged over the rows with a posterior."""
        log_p, present = self.posterior(index, x0.detach())
        log_p, present = log_p.to(logits.device), present.to(logits.device)
        kl = (log_p.exp() * (log_p - torch.log_softmax(logits, -1))).sum(-1)
        return kl[present].mean() if bool(present.any()) else logits.sum() * 0.0

    def _dense_losses(self, out: dict, extras: dict, device) -> dict[str, Tensor]:
        losses = {}
        if "segmentation" in out and "semantic" in extras:
            losses["seg"] = self.seg_weight * F.cross_entropy(
                out["segmentation"].float(), extras["semantic"].to(device).long(), ignore_index=-1)
        if "depth" in out and "depth" in extras:
            gt = extras["depth"].to(device).float()
            valid = extras.get("valid", gt > 0).to(device).bool() & (gt > 0)
            if bool(valid.any()):
                err = (out["depth"].float().clamp_min(1e-3).log() - gt.clamp_min(1e-3).log()).abs()
                losses["depth"] = self.depth_weight * err[valid].mean()
        return losses


class RepAlignObjective:
    """L_rep_align (Eq. 10, REPA): −cos between the projected hidden state of the generation pass
    and ε_sem's features (on the clean image, or on the same x_t with ``rep_target_input: noisy``),
    weighted by ``semantic.rep_weight``."""

    group = "generation"

    def __init__(self, teacher: SemanticTeacher, cfg: SemanticConfig):
        self.teacher, self.cfg = teacher, cfg

    def __call__(self, ctx: StepContext) -> dict[str, Tensor]:
        model = unwrap(ctx.model)
        if model.projector is None or model.student_tap not in model.last_features:
            return {}
        student = model.last_features[model.student_tap].float()  # bf16 when captured under autocast
        if self.cfg.rep_target_input == "clean":
            target = self.teacher.clean_features(ctx.x0)[model.target_tap]
        else:
            target = self.teacher.noisy_features(ctx.x_t, ctx.t, ctx.cond)[model.target_tap]
        return {"rep_align": self.cfg.rep_weight * rep_align_loss(model.projector(student), target)}
