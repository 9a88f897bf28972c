"""GenRep training: one class-conditional diffusion model that perceives and generates (seed 003).

``train_genrep(cfg, run_dir)`` runs, with the one :class:`~genperc.training.trainer.Trainer` for
every stage (its objectives and gradient combiner are GenRep's):

* **stage 0 — the generator** (only when no ``stages.pretrained`` model is given): the
  class-conditional learned-variance denoiser trained with improved DDPM's hybrid loss. GenRep
  starts from a pretrained LDM/DiT; on the shapes world and the digits there is none, so genperc
  trains one. Its EMA weights are the starting point of stage 1 and the frozen teacher of the
  posterior (``posterior.teacher: frozen``).
* **the posterior cache** (``posterior.cache``, frozen teacher): every training image's per-state
  log-densities for every class (:mod:`genperc.training.posterior`), computed once.
* **stage 1 — perception** (§3.3): L_percept = L_disc + L_gen_distil (Eq. 5) only; heads and the
  denoiser's attention blocks train (``stages.trainable: attention``, Algorithm 1), the rest is
  frozen. No generation forward is made.
* **stage 2 — unified** (§3.3): ε_unified is a copy of ε_sem (the stage-1 model); each step
  computes L_percept (noise-free pass on the clean image) and L_genera = L_hybrid + L_rep_align
  (Eq. 10; the generation pass on x_t, modulated by x_sem, Eq. 6–9) for the same images, combines
  the two gradients with :class:`~genperc.training.grad_align.GradientAlignmentCombiner`
  (Eq. 11–16 on the attention blocks), and updates ε_sem ← m·ε_sem + (1 − m)·ε_unified
  (m = 0.999). ε_sem supplies x_sem and the REPA target.

Explicit choices beyond the paper (config keys in :class:`GenRepConfig`):

* L_disc for classification is cross-entropy; the segmentation head adds pixel cross-entropy
  (ignore −1) and the depth head an L1 loss on log depth over valid pixels, each weighted by
  ``seg_weight`` / ``depth_weight``; L_gen_distil is the KL of Eq. 4 averaged over the rows that
  have a posterior (``posterior.subset`` / ``fraction`` may leave some rows without one).
* The perception pass is noise-free (t = ``perception_t`` = 0) with the null class (the label is
  unknown at test time).
* Without ``posterior`` / ``semantic`` / alignment (Table 8's ablation rows) the gradient combiner
  is ``sum``: w_p·∇L_percept + w_g·∇L_genera, same weights.
* The EMA update of ε_sem happens at the start of the next step's forward pass (the trainer has no
  per-step hook; the result is the same as updating after each optimizer step), plus once at the
  end of the stage.
* Each stage's run directory is ``RUN/stage{0,1,2}``; a finished stage (final checkpoint present)
  is skipped on a rerun; an interrupted one restarts.
* DDP: the stage 1–2 models are used without the DDP wrapper; the combiner all-reduces each loss
  group's gradient itself (see :mod:`genperc.training.grad_align`).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from genperc.config import RunConfig, from_dict, load_config
from genperc.diffusion.conditioning import Conditioning
from genperc.diffusion.schedule import NoiseSchedule
from genperc.errors import UserError
from genperc.evaluation.genrep import EvalConfig
from genperc.models.heads import HeadConfig
from genperc.models.semantic import GenRepModel, SemanticConfig, build_genrep_model, rep_align_loss
from genperc.training.grad_align import AlignConfig, GradientAlignmentCombiner
from genperc.training.objectives import HybridDiffusionObjective
from genperc.training.posterior import (
    PosteriorCache,
    PosteriorConfig,
    chain_log_densities,
    fit_temperature,
    kept_states,
    posterior_from_log_densities,
)
from genperc.training.strategies import StepContext


@dataclass
class StageConfig:
    """The stages (module docstring). Steps use ``train.batch_size`` and ``train.lr`` unless set."""

    pretrained: str | None = None  # a Denoiser / GenRepModel directory; skips stage 0
    pretrain_steps: int = 2000
    perception_steps: int = 300
    unified_steps: int = 300
    perception_lr: float | None = None
    unified_lr: float | None = None
    trainable: str = "attention"  # attention | all: denoiser parameters trained in stages 1–2
    unified: bool = True  # run stage 2 (false: perception only)

    def __post_init__(self):
        if self.trainable not in ("attention", "all"):
            raise UserError(f"stages.trainable={self.trainable!r} is not valid", "use attention or all")


@dataclass
class GenRepConfig:
    """Every GenRep setting; lives in ``task_options.genrep`` of the run config."""

    heads: HeadConfig = field(default_factory=HeadConfig)
    posterior: PosteriorConfig = field(default_factory=PosteriorConfig)
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    stages: StageConfig = field(default_factory=StageConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    vlb_weight: float = 0.001  # λ of L_hybrid (improved DDPM, T = 1000)
    perception_t: int = 0
    seg_weight: float = 1.0
    depth_weight: float = 1.0

    @classmethod
    def from_dict(cls, d: dict | None) -> GenRepConfig:
        out = from_dict(cls, copy.deepcopy(d or {}), "task_options.genrep.")
        if isinstance(out.heads.depth_range, list):
            out.heads.depth_range = tuple(out.heads.depth_range)
        return out

    @classmethod
    def from_run(cls, cfg: RunConfig) -> GenRepConfig:
        return cls.from_dict(cfg.task_options.get("genrep", {}))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["heads"]["depth_range"] = list(d["heads"]["depth_range"])
        return d


def with_genrep(cfg: RunConfig, gcfg: GenRepConfig) -> RunConfig:
    """A copy of ``cfg`` whose ``task_options.genrep`` is ``gcfg``."""
    d = cfg.to_dict()
    d["task_options"] = {**d.get("task_options", {}), "genrep": gcfg.to_dict()}
    return load_config(base=d)


# ---------------------------------------------------------------------------------------------
# data


def open_split(cfg: RunConfig, split: str):
    """The scene source of a split (the digits need no ``data.path``)."""
    if cfg.data.source == "digits" and cfg.data.path is None:
        from genperc.data.formats import open_source

        return open_source("digits", None, split, **dict(cfg.data.options))
    from genperc.data.sources import open_scene_source

    return open_scene_source(cfg.data, split)


class RecordingTask:
    """Delegates to a task and remembers the last :class:`TaskBatch` it prepared, so that GenRep's
    objectives see the true labels, dataset indices and dense targets of the step (the trainer's
    StepContext carries only the conditioning, whose labels may be dropped)."""

    def __init__(self, task):
        object.__setattr__(self, "_task", task)
        object.__setattr__(self, "last", None)

    def __getattr__(self, name):
        return getattr(self._task, name)

    def __setattr__(self, name, value):
        if name == "last":
            object.__setattr__(self, name, value)
        else:
            setattr(self._task, name, value)

    def prepare(self, batch):
        tb = self._task.prepare(batch)
        object.__setattr__(self, "last", tb)
        return tb


def _unwrap(model):
    return getattr(model, "module", model)


def class_text_embeddings(names: list[str]) -> Tensor:
    """Mean-pooled MiniLM embeddings of "a photo of a {name}" (the cosine head's class vectors)."""
    from genperc.models.text import build_text_encoder

    enc = build_text_encoder("minilm", cache=False)
    states, mask = enc.encode([f"a photo of a {n}" for n in names])
    m = mask.float().unsqueeze(-1)
    return ((states.float() * m).sum(1) / m.sum(1).clamp_min(1)).cpu()


# ---------------------------------------------------------------------------------------------
# the posterior provider and the objectives



class _inference:
    """Eval mode with the generation pass on, restored on exit (a model used as its own teacher)."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        m = self.model
        self.state = (getattr(m, "training", None), getattr(m, "generation", None))
        if self.state[0] is not None:
            m.eval()
        if self.state[1] is not None:
            m.generation = True
        return m

    def __exit__(self, *exc):
        m = self.model
        if self.state[0] is not None:
            m.train(self.state[0])
        if self.state[1] is not None:
            m.generation = self.state[1]
        return False


def build_posterior_cache(teacher, dataset, cfg: PosteriorConfig, schedule: NoiseSchedule, num_classes: int,
                          *, seed: int = 0, device="cpu", progress: bool = False) -> tuple[PosteriorCache, dict]:
    """Per-state log-densities of every image in ``dataset`` (or the seeded ``cfg.subset``).

    Returns the cache and a timing record (seconds, images, denoiser calls).
    """
    from torch.utils.data import DataLoader

    from genperc.data.datasets import collate

    n = len(dataset)
    g = torch.Generator().manual_seed(seed * 1_000_003 + 17)
    order = torch.randperm(n, generator=g)
    chosen = order[: cfg.subset] if 0 < cfg.subset < n else order
    chosen = chosen.sort().values
    per = max(1, cfg.batch_size // num_classes)
    sub = torch.utils.data.Subset(dataset, chosen.tolist())
    loader = DataLoader(sub, batch_size=per, shuffle=False, collate_fn=collate)
    cache = PosteriorCache(n, num_classes, cfg.steps)
    chain_gen = torch.Generator().manual_seed(seed * 7919 + 3)
    it = loader
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(loader, desc="posterior cache", unit="batch")
    t0 = time.perf_counter()
    with _inference(teacher):
        for batch in it:
            x = batch["image"].to(device)
            ld, ts = chain_log_densities(teacher, x, torch.arange(num_classes), schedule=schedule, steps=cfg.steps,
                                         generator=chain_gen, density=cfg.density, batch_size=cfg.batch_size)
            cache.put(batch["index"], ld, 0, ts)
    seconds = time.perf_counter() - t0
    return cache, {"seconds": seconds, "images": int(chosen.numel()),
                   "denoiser_calls": int(chosen.numel()) * num_classes * cfg.steps,
                   "seconds_per_image": seconds / max(1, int(chosen.numel()))}


def cache_labels(dataset, indices: Tensor) -> Tensor:
    """True labels of dataset items (for fitting the temperature)."""
    lab = []
    for i in indices.tolist():
        lab.append(int(dataset[i]["label"]))
    return torch.tensor(lab, dtype=torch.long)


class PosteriorProvider:
    """p(y|x) for the rows of a step: from the cache, or computed with the teacher (on a
    ``fraction`` of the rows that miss), per :class:`PosteriorConfig`."""

    def __init__(self, cfg: PosteriorConfig, schedule: NoiseSchedule, num_classes: int, *,
                 cache: PosteriorCache | None = None, teacher=None, generator: torch.Generator | None = None,
                 temperature: float | None = None, step_fn: Callable[[], int] | None = None,
                 epoch_steps: int = 1):
        self.cfg, self.schedule, self.num_classes = cfg, schedule, num_classes
        self.cache, self.teacher = cache, teacher
        self.generator = generator or torch.Generator().manual_seed(0)
        self.temperature = float(temperature if temperature is not None else cfg.temperature)
        self.kept = kept_states(cfg.steps, cfg.burn_in, cfg.thinning, cfg.thinning_anchor)
        self.step_fn = step_fn or (lambda: 0)
        self.max_age = None if cfg.refresh_epochs <= 0 else max(1, round(cfg.refresh_epochs * epoch_steps))
        self.computed_rows = 0
        self.compute_seconds = 0.0

    def __call__(self, indices: Tensor | None, images: Tensor) -> tuple[Tensor, Tensor]:
        b = images.shape[0]
        step = self.step_fn()
        ld = torch.zeros(b, self.num_classes, self.cfg.steps, dtype=torch.float64)
        hit = torch.zeros(b, dtype=torch.bool)
        if self.cache is not None and indices is not None:
            hit, ld = self.cache.lookup(indices, step, self.max_age)
        if self.teacher is not None and not bool(hit.all()):
            miss = (~hit).nonzero().flatten()
            take = max(1, round(self.cfg.fraction * b)) if self.cfg.fraction < 1 else miss.numel()
            if take < miss.numel():
                miss = miss[torch.randperm(miss.numel(), generator=self.generator)[:take]].sort().values
            t0 = time.perf_counter()
            with _inference(self.teacher):
                new, ts = chain_log_densities(self.teacher, images[miss], torch.arange(self.num_classes),
                                              schedule=self.schedule, steps=self.cfg.steps,
                                              generator=self.generator, density=self.cfg.density,
                                              batch_size=self.cfg.batch_size)
            self.compute_seconds += time.perf_counter() - t0
            self.computed_rows += int(miss.numel())
            ld[miss] = new
            hit[miss] = True
            if self.cache is not None and indices is not None:
                self.cache.put(indices[miss.to(indices.device)].cpu(), new, step, ts)
        _, log_post = posterior_from_log_densities(ld, self.kept, self.temperature)
        return log_post.float(), hit


class PerceptionObjective:
    """L_percept = L_disc + L_gen_distil (GenRep Eq. 4–5), plus dense heads' losses."""

    def __init__(self, recorder: RecordingTask, posterior: PosteriorProvider | None = None,
                 distil_weight: float = 1.0, seg_weight: float = 1.0, depth_weight: float = 1.0,
                 prefix: str = "percept/"):
        self.recorder, self.posterior = recorder, posterior
        self.distil_weight, self.seg_weight, self.depth_weight = distil_weight, seg_weight, depth_weight
        self.prefix = prefix
        self.correct = self.seen = 0

    def __call__(self, ctx: StepContext) -> dict[str, Tensor]:
        tb = self.recorder.last
        model = _unwrap(ctx.model)
        x = ctx.x0
        out = model.perceive(x)
        logits = out["logits"].float()
        labels = tb.class_labels.to(logits.device).long()
        losses = {self.prefix + "disc": F.cross_entropy(logits, labels)}
        self.correct += int((logits.argmax(-1) == labels).sum())
        self.seen += int(labels.numel())
        if self.posterior is not None:
            index = tb.extras.get("index")
            log_p, mask = self.posterior(index, x.detach())
            log_p, mask = log_p.to(logits.device), mask.to(logits.device)
            log_q = torch.log_softmax(logits, -1)
            kl = (log_p.exp() * (log_p - log_q)).sum(-1)
            distil = kl[mask].mean() if bool(mask.any()) else logits.sum() * 0.0
            losses[self.prefix + "distil"] = self.distil_weight * distil
        if "segmentation" in out and "semantic" in tb.extras:
            losses[self.prefix + "seg"] = self.seg_weight * F.cross_entropy(
                out["segmentation"].float(), tb.extras["semantic"].to(logits.device).long(), ignore_index=-1)
        if "depth" in out and "depth" in tb.extras:
            gt = tb.extras["depth"].to(logits.device).float()
            valid = tb.extras.get("valid", gt > 0).to(logits.device).bool() & (gt > 0)
            if bool(valid.any()):
                err = (out["depth"].float().clamp_min(1e-3).log() - gt.clamp_min(1e-3).log()).abs()
                losses[self.prefix + "depth"] = self.depth_weight * err[valid].mean()
        return losses


class SemanticTeacher:
    """The EMA semantic network ε_sem of stage 2: supplies x_sem (Eq. 6–9) and the REPA target.

    ε_sem starts as a copy of the unified model and follows θ_sem ← m·θ_sem + (1 − m)·θ_unified
    once per optimizer step (``step_fn`` reports the trainer's step). x_sem is the output of ε_sem's
    *denoiser* for (x_t, t, y) — its x̂0 (``representation: x0``, clipped) or raw prediction —
    without ε_sem's own modulation. ``semantic_dropout`` replaces x_sem by x_t on that share of rows.
    """

    def __init__(self, unified: GenRepModel, schedule: NoiseSchedule, cfg: SemanticConfig,
                 step_fn: Callable[[], int], generator: torch.Generator | None = None):
        self.unified = unified
        self.net = unified.clone()
        self.net.eval()
        self.net.generation = True
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.schedule, self.cfg, self.step_fn = schedule, cfg, step_fn
        self.generator = generator or torch.Generator().manual_seed(1)
        self.updates = 0
        self.m = float(cfg.ema)
        self.last_features: dict[str, Tensor] = {}

    @torch.no_grad()
    def ema_update(self) -> None:
        for ps, pu in zip(self.net.parameters(), self.unified.parameters(), strict=True):
            ps.mul_(self.m).add_(pu.detach().to(ps.dtype), alpha=1 - self.m)

    def catch_up(self) -> None:
        while self.updates < self.step_fn():
            self.ema_update()
            self.updates += 1

    @torch.no_grad()
    def __call__(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        self.catch_up()
        c = x_t.shape[1]
        raw = self.net.denoiser(x_t, t, cond)[:, :c]
        self.last_features = self.net.taps.pop()
        if self.cfg.representation == "x0":
            x_sem = self.schedule.to_x0(raw.float(), x_t.float(), t).clamp(-1, 1).to(x_t.dtype)
        else:
            x_sem = raw
        if self.cfg.semantic_dropout > 0:
            r = torch.rand(x_t.shape[0], generator=self.generator).to(x_t.device)
            x_sem = torch.where((r < self.cfg.semantic_dropout).view(-1, 1, 1, 1), x_t, x_sem)
        return x_sem

    @torch.no_grad()
    def target_features(self, x0: Tensor) -> Tensor:
        """ε_sem's features at ``rep_target_tap`` on the clean image (REPA's target)."""
        return self.net.features(x0)[self.net.target_tap]


class RepAlignObjective:
    """L_rep_align (Eq. 10, REPA): −cos between the projected hidden state of the generation pass
    and ε_sem's features (clean image, or the x_t pass with ``rep_target_input: noisy``)."""

    def __init__(self, teacher: SemanticTeacher, cfg: SemanticConfig, prefix: str = "genera/"):
        self.teacher, self.cfg, self.prefix = teacher, cfg, prefix

    def __call__(self, ctx: StepContext) -> dict[str, Tensor]:
        model = _unwrap(ctx.model)
        if model.projector is None or model.student_tap not in model.last_features:
            return {}
        student = model.last_features[model.student_tap]
        if self.cfg.rep_target_input == "clean":
            target = self.teacher.target_features(ctx.x0)
        else:
            if model.target_tap not in self.teacher.last_features:
                self.teacher(ctx.x_t, ctx.t, ctx.cond)
            target = self.teacher.last_features[model.target_tap]
        loss = rep_align_loss(model.projector(student), target)
        return {self.prefix + "rep_align": self.cfg.rep_weight * loss}


# ---------------------------------------------------------------------------------------------
# the stages


@dataclass
class GenRepResult:
    run_dir: Path
    model: GenRepModel
    semantic: GenRepModel | None
    generator_dir: Path
    timing: dict
    temperature: float | None = None
    align_history: list = field(default_factory=list)


def _stage_cfg(cfg: RunConfig, steps: int, lr: float | None, ema: bool) -> RunConfig:
    d = cfg.to_dict()
    d["train"] = {**d["train"], "steps": int(steps), "ema": bool(ema),
                  "checkpoint_every": max(int(steps), 1), "keep_checkpoints": 1}
    if lr is not None:
        d["train"]["lr"] = float(lr)
    d["train"]["warmup_steps"] = min(d["train"]["warmup_steps"], max(0, int(steps) // 10))
    return load_config(base=d)


def _finished(stage_dir: Path, steps: int) -> Path | None:
    final = stage_dir / "checkpoints" / f"step-{steps:08d}"
    return final if (final / "model" / "model.safetensors").is_file() else None


def _manual_sync(trainer) -> None:
    """Drop the DDP wrapper: GenRep's combiner all-reduces each loss group's gradient itself."""
    trainer.model = trainer.unwrapped


def _set_trainable(model: GenRepModel, mode: str) -> list:
    for p in model.denoiser.parameters():
        p.requires_grad_(mode == "all")
    if mode == "attention":
        for p in model.attention_parameters():
            p.requires_grad_(True)
    for p in model.extra_parameters():
        p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def train_generator(cfg: RunConfig, run_dir: Path, task, source, gcfg: GenRepConfig, *, accelerator=None,
                    log: Callable[[str], None] = print) -> tuple[object, Path, float]:
    """Stage 0: the class-conditional learned-variance denoiser (hybrid loss); returns
    (denoiser with the EMA weights when EMA is on, its directory, seconds)."""
    from genperc.models.denoiser import Denoiser
    from genperc.models.registry import create_denoiser
    from genperc.training.trainer import Trainer

    stage_dir = Path(run_dir) / "stage0"
    steps = gcfg.stages.pretrain_steps
    done = _finished(stage_dir, steps)
    sub = "ema" if cfg.train.ema else "model"
    if done is not None:
        log(f"stage 0: reusing {done}")
        t = stage_dir / "timing.json"
        seconds = json.loads(t.read_text()).get("stage0_s", 0.0) if t.is_file() else 0.0
        return Denoiser.from_pretrained(done / sub), done / sub, seconds
    scfg = _stage_cfg(cfg, steps, None, cfg.train.ema)
    if not getattr(task, "num_classes", 0):
        task.dataset(source, cfg.data.resolution)  # resolves the class list
    den = create_denoiser(cfg.model.arch, sample_size=cfg.model.sample_size, in_channels=3,
                          num_classes=task.num_classes, learned_variance=cfg.diffusion.learned_variance,
                          seed=cfg.train.seed)
    t0 = time.perf_counter()
    tr = Trainer(scfg, stage_dir, task=task, train_source=source, model=den,
                 objectives=[HybridDiffusionObjective(gcfg.vlb_weight)], accelerator=accelerator)
    res = tr.train()
    seconds = time.perf_counter() - t0
    if tr.is_main:
        (stage_dir / "timing.json").write_text(json.dumps({"stage0_s": seconds}))
    log(f"stage 0 (generator): {res.step} steps, loss {res.loss:.4f}, {seconds:.0f} s")
    final = _finished(stage_dir, steps)
    return Denoiser.from_pretrained(final / sub), final / sub, seconds


def load_generator(path: str | Path):
    """A Denoiser from a Denoiser or GenRepModel directory (the model's denoiser)."""
    from genperc.models.denoiser import Denoiser

    p = Path(path)
    cfg = json.loads((p / "config.json").read_text()) if (p / "config.json").is_file() else {}
    if cfg.get("_format") == "genperc.GenRepModel":
        return GenRepModel.from_pretrained(p).denoiser
    return Denoiser.from_pretrained(p)


def train_genrep(cfg: RunConfig, run_dir: str | Path, *, train_source=None, gcfg: GenRepConfig | None = None,
                 generator=None, posterior_cache: PosteriorCache | None = None, temperature: float | None = None,
                 stage1_from: str | Path | None = None, accelerator=None,
                 log: Callable[[str], None] = print) -> GenRepResult:
    """Run the GenRep stages into ``run_dir`` (module docstring); returns the unified model.

    ``generator`` (a Denoiser) and ``posterior_cache`` may be passed in to share them between runs
    (the experiment does); ``temperature`` overrides the configured / fitted τ; ``stage1_from`` is
    another run directory whose finished stage 1 (same stage-1 settings) is copied instead of
    retrained (its recorded stage-1 time is carried over).
    """
    from genperc import build
    from genperc.training.trainer import Trainer

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    gcfg = gcfg or GenRepConfig.from_run(cfg)
    cfg = with_genrep(cfg, gcfg)
    if _is_main():
        cfg.save(run_dir / "config.yaml")
    if not cfg.diffusion.learned_variance:
        log("warning: diffusion.learned_variance is off — σ is fixed, L_vlb and the variance factor do nothing")
    task = build.build_task(cfg)
    source = train_source if train_source is not None else open_split(cfg, cfg.data.train_split)
    dataset = task.dataset(source, cfg.data.resolution)
    k = task.num_classes
    schedule = NoiseSchedule(cfg.diffusion)
    timing: dict = {}
    if (run_dir / "timing.json").is_file():  # a rerun keeps the times of the stages it reuses
        timing = {k: v for k, v in json.loads((run_dir / "timing.json").read_text()).items() if k != "temperature"}
    device = (accelerator.device if accelerator is not None else torch.device("cpu"))

    # stage 0 --------------------------------------------------------------------------------
    if generator is not None:
        gen_dir = Path(gcfg.stages.pretrained or "<given>")
    elif gcfg.stages.pretrained:
        generator = load_generator(gcfg.stages.pretrained)
        gen_dir = Path(gcfg.stages.pretrained)
    else:
        generator, gen_dir, timing["stage0_s"] = train_generator(cfg, run_dir, task, source, gcfg,
                                                                 accelerator=accelerator, log=log)
    generator = generator.to(device).eval()
    for p in generator.parameters():
        p.requires_grad_(False)
    if generator.config.num_classes != k:
        raise UserError(f"the generator has {generator.config.num_classes} classes, the data {k}",
                        "use a generator trained on the same classes")

    # posterior ------------------------------------------------------------------------------
    pc = gcfg.posterior
    provider_cache, tau = None, temperature
    if pc.enabled and pc.teacher == "frozen" and pc.cache:
        if posterior_cache is None:
            cache_path = run_dir / "posterior.safetensors"
            if cache_path.is_file():
                posterior_cache = PosteriorCache.load(cache_path)
            else:
                # every process computes the same (seeded) cache; the main one writes it
                posterior_cache, ct = build_posterior_cache(generator, dataset, pc, schedule, k,
                                                            seed=cfg.train.seed, device=device)
                if _is_main():
                    posterior_cache.save(cache_path)
                timing["posterior_cache_s"] = ct["seconds"]
                log(f"posterior cache: {ct['images']} images, {ct['seconds']:.0f} s")
        provider_cache = posterior_cache
        if tau is None and pc.fit_temperature:
            idx = posterior_cache.present.nonzero().flatten()
            tau = fit_temperature(posterior_cache.log_densities[idx], cache_labels(dataset, idx),
                                  kept_states(pc.steps, pc.burn_in, pc.thinning, pc.thinning_anchor))
            log(f"posterior temperature fitted: τ = {tau:.4g}")
    if tau is None:
        tau = pc.temperature

    # stage 1 --------------------------------------------------------------------------------
    text = class_text_embeddings(task.class_names) if gcfg.heads.classifier == "cosine" else None
    import copy as _copy

    den1 = _copy.deepcopy(generator)
    with torch.random.fork_rng(devices=[]):  # seeded heads / projector initialisation
        torch.manual_seed(cfg.train.seed)
        model = build_genrep_model(den1, k, schedule, copy.deepcopy(gcfg.heads), copy.deepcopy(gcfg.semantic),
                                   text, gcfg.perception_t)
    model.to(device)
    model.generation = False
    _set_trainable(model, gcfg.stages.trainable)
    s1_dir = run_dir / "stage1"
    steps1 = gcfg.stages.perception_steps
    if stage1_from is not None and _finished(s1_dir, steps1) is None:
        src = Path(stage1_from)
        if _finished(src / "stage1", steps1) is None:
            raise UserError(f"{src} has no finished stage 1 of {steps1} steps", "train it first or drop stage1_from")
        import shutil

        shutil.rmtree(s1_dir, ignore_errors=True)
        shutil.copytree(src / "stage1", s1_dir)
        prev = json.loads((src / "timing.json").read_text()) if (src / "timing.json").is_file() else {}
        for key in ("stage1_s", "stage1_posterior_s"):
            if key in prev:
                timing[key] = prev[key]
    recorder = RecordingTask(task)
    tr1 = None

    def make_provider(step_fn, teacher_current):
        if not pc.enabled:
            return None
        teacher = None
        if not (pc.teacher == "frozen" and pc.cache):
            teacher = teacher_current if pc.teacher == "current" else generator
        epoch_steps = max(1, len(dataset) // max(1, cfg.train.batch_size))
        return PosteriorProvider(pc, schedule, k, cache=provider_cache if pc.cache else None, teacher=teacher,
                                 generator=torch.Generator().manual_seed(cfg.train.seed * 31 + 7), temperature=tau,
                                 step_fn=step_fn, epoch_steps=epoch_steps)

    done1 = _finished(s1_dir, steps1)
    if done1 is not None:
        _load_stage1(model, GenRepModel.from_pretrained(done1 / "model").state_dict())
        log(f"stage 1: reusing {done1}")
    else:
        s1cfg = _stage_cfg(cfg, steps1, gcfg.stages.perception_lr, ema=False)
        ref: list = []
        provider = make_provider(lambda: ref[0].step if ref else 0, model)
        perc = PerceptionObjective(recorder, provider, pc.weight, gcfg.seg_weight, gcfg.depth_weight)
        comb = GradientAlignmentCombiner(model.parameters(), AlignConfig(mode="sum", w_p=1.0, w_g=1.0))
        t0 = time.perf_counter()
        tr1 = Trainer(s1cfg, s1_dir, task=recorder, train_source=source, model=model, objectives=[perc],
                      combiner=comb, accelerator=accelerator)
        ref.append(tr1)
        _manual_sync(tr1)
        res = tr1.train()
        timing["stage1_s"] = time.perf_counter() - t0
        if provider is not None:
            timing["stage1_posterior_s"] = provider.compute_seconds
        log(f"stage 1 (perception): {res.step} steps, loss {res.loss:.4f}, train top-1 "
            f"{perc.correct / max(1, perc.seen):.3f}, {timing['stage1_s']:.0f} s")
        model = tr1.unwrapped
    if not gcfg.stages.unified:
        model.generation = True
        _write_timing(run_dir, timing, tau)
        return GenRepResult(run_dir, model, None, gen_dir, timing, tau)

    # stage 2 --------------------------------------------------------------------------------
    s2_dir = run_dir / "stage2"
    steps2 = gcfg.stages.unified_steps
    unified = model.clone()
    unified.generation = True
    trainable = _set_trainable(unified, gcfg.stages.trainable)
    done2 = _finished(s2_dir, steps2)
    align_history: list = []
    if done2 is not None and (s2_dir / "semantic" / "model.safetensors").is_file():
        unified.load_state_dict(GenRepModel.from_pretrained(done2 / "model").state_dict())
        semantic = GenRepModel.from_pretrained(s2_dir / "semantic")
        log(f"stage 2: reusing {done2}")
    else:
        s2cfg = _stage_cfg(cfg, steps2, gcfg.stages.unified_lr, ema=False)
        ref2: list = []

        def step_fn() -> int:
            return ref2[0].step if ref2 else 0

        teacher = SemanticTeacher(unified, schedule, gcfg.semantic, step_fn,
                                  torch.Generator().manual_seed(cfg.train.seed * 13 + 5))
        if gcfg.semantic.modulation:
            unified.attach_semantic(teacher)
        provider = make_provider(step_fn, unified)
        objectives = [PerceptionObjective(recorder, provider, pc.weight, gcfg.seg_weight, gcfg.depth_weight),
                      HybridDiffusionObjective(gcfg.vlb_weight)]
        if gcfg.semantic.rep_align:
            objectives.append(RepAlignObjective(teacher, gcfg.semantic))
        aligned = unified.attention_parameters() if gcfg.align.params == "attention" else None
        combiner = _HistoryCombiner(trainable, gcfg.align, aligned)
        t0 = time.perf_counter()
        tr2 = Trainer(s2cfg, s2_dir, task=recorder, train_source=source, model=unified, objectives=objectives,
                      combiner=combiner, accelerator=accelerator)
        ref2.append(tr2)
        _manual_sync(tr2)
        res = tr2.train()
        teacher.catch_up()
        timing["stage2_s"] = time.perf_counter() - t0
        if provider is not None:
            timing["stage2_posterior_s"] = provider.compute_seconds
        align_history = combiner.history
        unified = tr2.unwrapped
        unified.attach_semantic(None)
        semantic = teacher.net
        if tr2.is_main:
            semantic.save_pretrained(s2_dir / "semantic")
            _write_align(s2_dir / "align.csv", align_history)
        log(f"stage 2 (unified, align={gcfg.align.mode}): {res.step} steps, loss {res.loss:.4f}, "
            f"{timing['stage2_s']:.0f} s")
    unified.eval()
    _write_timing(run_dir, timing, tau)
    return GenRepResult(run_dir, unified, semantic, gen_dir, timing, tau, align_history)


def _load_stage1(model: GenRepModel, state: dict) -> None:
    """Load a stage-1 state; the modulation and projector may differ (stage 1 never trains them:
    their initial values are the same seeded ones either way)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in list(missing) + list(unexpected) if not k.startswith(("modulation.", "projector."))]
    if bad:
        raise UserError(f"stage-1 checkpoint does not match the model: {bad[:3]}",
                        "reuse stage 1 only between runs with the same heads and denoiser")


class _HistoryCombiner(GradientAlignmentCombiner):
    """Keeps (cos, α) of every step for the run directory's ``align.csv``."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.history: list[dict] = []

    def backward(self, losses, accelerator=None, scale: float = 1.0) -> None:
        super().backward(losses, accelerator, scale)
        self.history.append(dict(self.last))


def _write_align(path: Path, history: list[dict]) -> None:
    lines = ["step,cos,alpha"] + [f"{i + 1},{h.get('cos', float('nan')):.6g},{h.get('alpha', float('nan')):.6g}"
                                  for i, h in enumerate(history)]
    path.write_text("\n".join(lines) + "\n")


def _is_main() -> bool:
    """The main process of a torchrun / accelerate launch (or the only one)."""
    import os

    return int(os.environ.get("RANK", "0")) == 0


def _write_timing(run_dir: Path, timing: dict, tau) -> None:
    if not _is_main():
        return
    (run_dir / "timing.json").write_text(json.dumps({**timing, "temperature": tau}, indent=1))
