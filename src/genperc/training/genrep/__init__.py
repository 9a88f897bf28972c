"""GenRep training: one class-conditional diffusion model that perceives and generates (seed 003).

``train_genrep(cfg, run_dir)`` runs, with the one :class:`~genperc.training.trainer.Trainer` for
every stage (its objectives, gradient combiner and hooks are GenRep's):

* **stage 0 — the generator** (only when no ``stages.pretrained`` model is given): the
  class-conditional learned-variance denoiser trained with improved DDPM's hybrid loss. GenRep
  starts from a pretrained LDM/DiT; on the shapes world and the digits there is none, so genperc
  trains one. Its EMA weights are the starting point of stage 1 (and the teacher of the posterior
  with ``posterior.teacher: frozen``).
* **the posterior** (Algorithm 1 Steps 1–3, :mod:`genperc.training.posterior`): by default
  (``teacher: current``, Algorithm 1) the model being trained runs the chains of every step's
  images; ``teacher: frozen`` + ``cache: true`` is the cheap option — the stage-0 generator's
  per-state log-densities of every training image, computed once (the run configs of
  ``genperc experiment genrep`` use it).
* **stage 1 — perception** (§3.3): L_percept = L_disc + L_gen_distil (Eq. 5) only; heads and the
  denoiser's attention blocks train (``stages.trainable: attention``, Algorithm 1), the rest is
  frozen. The perception objective runs its own noise-free pass, so the trainer makes no
  generation forward (no objective uses it).
* **stage 2 — unified** (§3.3): ε_unified is a copy of ε_sem (the stage-1 model); each step
  computes L_percept (noise-free pass on the clean image; loss group ``perception``) and
  L_genera = L_hybrid + L_rep_align (Eq. 10; the generation pass on x_t, modulated by x_sem,
  Eq. 6–9; group ``generation``) for the same images, combines the two gradients with
  :class:`~genperc.training.combiners.GradientAlignmentCombiner` (Eq. 11–16 on the attention
  blocks), and after each optimizer step updates ε_sem ← m·ε_sem + (1 − m)·ε_unified (m = 0.999;
  :class:`SemanticTeacher`, a trainer hook). ε_sem supplies x_sem and the REPA target.

Explicit choices beyond the paper (config keys in :class:`GenRepConfig`):

* L_disc for classification is cross-entropy; the segmentation head adds pixel cross-entropy
  (ignore −1) and the depth head an L1 loss on log depth over valid pixels, each weighted by
  ``seg_weight`` / ``depth_weight``; L_gen_distil is the KL of Eq. 4 averaged over the rows that
  have a posterior (``posterior.subset`` / ``fraction`` may leave some rows without one).
* The perception pass is noise-free (t = ``perception_t`` = 0) with the null class (the label is
  unknown at test time).
* Without ``posterior`` / ``semantic`` / alignment (Table 8's ablation rows) the gradient combiner
  is ``sum``: w_p·∇L_percept + w_g·∇L_genera, same weights.
* Each stage's run directory is ``RUN/stage{0,1,2}``; a finished stage (final checkpoint present)
  is skipped on a rerun; an interrupted one restarts.
* DDP: the combiner all-reduces each loss group's gradient itself (``reduces_gradients``; see
  :mod:`genperc.training.combiners`), so the trainer keeps DDP from reducing them again.

Where the parts live: :mod:`.config` (settings), :mod:`.posterior_provider` (the distillation
target of a step), :mod:`.semantic_teacher` (ε_sem), :mod:`.objectives` (L_percept,
L_rep_align), :mod:`.stages` (the orchestration).
"""

from genperc.training.genrep.config import GenRepConfig, StageConfig, with_genrep
from genperc.training.genrep.objectives import PerceptionObjective, RepAlignObjective
from genperc.training.genrep.posterior_provider import (
    PosteriorProvider,
    build_posterior_cache,
    cache_labels,
    teacher_mode,
)
from genperc.training.genrep.semantic_teacher import SemanticTeacher
from genperc.training.genrep.stages import (
    GenRepResult,
    GenRepRun,
    class_text_embeddings,
    load_generator,
    open_split,
    train_generator,
    train_genrep,
)

__all__ = ["GenRepConfig", "GenRepResult", "GenRepRun", "PerceptionObjective", "PosteriorProvider",
           "RepAlignObjective", "SemanticTeacher", "StageConfig", "build_posterior_cache", "cache_labels",
           "class_text_embeddings", "load_generator", "open_split", "teacher_mode", "train_generator",
           "train_genrep", "with_genrep"]
