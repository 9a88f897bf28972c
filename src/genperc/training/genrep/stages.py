"""GenRep's stage orchestration: stage 0 (generator), the posterior, stage 1 (perception), stage 2
(unified), each a named step of :class:`GenRepRun` (package docstring)."""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from genperc.config import RunConfig, load_config
from genperc.diffusion.schedule import NoiseSchedule
from genperc.errors import UserError
from genperc.models.semantic import GenRepModel, build_genrep_model
from genperc.training.combiners import AlignConfig, GradientAlignmentCombiner
from genperc.training.genrep.config import GenRepConfig, with_genrep
from genperc.training.genrep.objectives import PerceptionObjective, RepAlignObjective
from genperc.training.genrep.posterior_provider import PosteriorProvider, build_posterior_cache, cache_labels
from genperc.training.genrep.semantic_teacher import SemanticTeacher
from genperc.training.objectives import HybridDiffusionObjective
from genperc.training.posterior import PosteriorCache, fit_temperature, kept_states
from genperc.training.trainer import Trainer, make_accelerator


@dataclass
class GenRepResult:
    run_dir: Path
    model: GenRepModel
    semantic: GenRepModel | None
    generator_dir: Path
    timing: dict
    temperature: float | None = None
    align_history: list = field(default_factory=list)


def open_split(cfg: RunConfig, split: str):
    """The scene source of a split (the digits need no ``data.path``)."""
    if cfg.data.source == "digits" and cfg.data.path is None:
        from genperc.data.formats import open_source

        return open_source("digits", None, split, **dict(cfg.data.options))
    from genperc.data.sources import open_scene_source

    return open_scene_source(cfg.data, split)


def class_text_embeddings(names: list[str]) -> Tensor:
    """Mean-pooled MiniLM embeddings of "a photo of a {name}" (the cosine head's class vectors)."""
    from genperc.models.text import build_text_encoder

    enc = build_text_encoder("minilm", cache=False)
    states, mask = enc.encode([f"a photo of a {n}" for n in names])
    m = mask.float().unsqueeze(-1)
    return ((states.float() * m).sum(1) / m.sum(1).clamp_min(1)).cpu()


def stage_config(cfg: RunConfig, steps: int, lr: float | None, ema: bool) -> RunConfig:
    """The run config of one stage: its steps, LR and EMA; one final checkpoint."""
    d = cfg.to_dict()
    d["train"] = {**d["train"], "steps": int(steps), "ema": bool(ema),
                  "checkpoint_every": max(int(steps), 1), "keep_checkpoints": 1}
    if lr is not None:
        d["train"]["lr"] = float(lr)
    d["train"]["warmup_steps"] = min(d["train"]["warmup_steps"], max(0, int(steps) // 10))
    return load_config(base=d)


def finished_checkpoint(stage_dir: Path, steps: int) -> Path | None:
    """The stage's final checkpoint when the stage finished, else None."""
    final = stage_dir / "checkpoints" / f"step-{steps:08d}"
    return final if (final / "model" / "model.safetensors").is_file() else None


def set_trainable(model: GenRepModel, mode: str) -> list:
    """Algorithm 1 lines 10–11: freeze the denoiser but its attention blocks (``attention``) or train
    it all (``all``); heads, modulation and projector train. Returns the trainable parameters."""
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

    stage_dir = Path(run_dir) / "stage0"
    steps = gcfg.stages.pretrain_steps
    weights = "ema" if cfg.train.ema else "model"
    done = finished_checkpoint(stage_dir, steps)
    if done is not None:
        log(f"stage 0: reusing {done}")
        timing = stage_dir / "timing.json"
        seconds = json.loads(timing.read_text()).get("stage0_s", 0.0) if timing.is_file() else 0.0
        return Denoiser.from_pretrained(done / weights), done / weights, seconds
    if not getattr(task, "num_classes", 0):
        task.dataset(source, cfg.data.resolution)  # resolves the class list
    denoiser = create_denoiser(cfg.model.arch, sample_size=cfg.model.sample_size, in_channels=3,
                               num_classes=task.num_classes, learned_variance=cfg.diffusion.learned_variance,
                               seed=cfg.train.seed)
    t0 = time.perf_counter()
    trainer = Trainer(stage_config(cfg, steps, None, cfg.train.ema), stage_dir, task=task, train_source=source,
                      model=denoiser, objectives=[HybridDiffusionObjective(gcfg.vlb_weight)], accelerator=accelerator)
    res = trainer.train(overwrite=True)  # an unfinished stage starts over
    seconds = time.perf_counter() - t0
    if trainer.is_main:
        (stage_dir / "timing.json").write_text(json.dumps({"stage0_s": seconds}))
    log(f"stage 0 (generator): {res.step} steps, loss {res.loss:.4f}, {seconds:.0f} s")
    final = finished_checkpoint(stage_dir, steps)
    return Denoiser.from_pretrained(final / weights), final / weights, seconds


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
    """Run the GenRep stages into ``run_dir`` (package docstring); returns the unified model.

    ``generator`` (a Denoiser) and ``posterior_cache`` may be passed in to share them between runs
    (the experiment does); ``temperature`` overrides the configured / fitted τ; ``stage1_from`` is
    another run directory whose finished stage 1 (same stage-1 settings) is copied instead of
    retrained (its recorded stage-1 time is carried over).
    """
    run = GenRepRun(cfg, Path(run_dir), gcfg or GenRepConfig.from_run(cfg), train_source, accelerator, log)
    run.obtain_generator(generator)
    run.prepare_posterior(posterior_cache, temperature)
    model = run.build_model()
    model = run.perception_stage(model, stage1_from)
    if not run.gcfg.stages.unified:
        run.write_timing()
        return GenRepResult(run.run_dir, model, None, run.generator_dir, run.timing, run.temperature)
    unified, semantic, history = run.unified_stage(model)
    run.write_timing()
    return GenRepResult(run.run_dir, unified, semantic, run.generator_dir, run.timing, run.temperature, history)


class GenRepRun:
    """The state shared by the stages of one GenRep run (config, data, schedule, timing)."""

    def __init__(self, cfg: RunConfig, run_dir: Path, gcfg: GenRepConfig, train_source, accelerator, log):
        from genperc import build

        self.run_dir, self.gcfg, self.log = run_dir, gcfg, log
        self.cfg = with_genrep(cfg, gcfg)
        self.accelerator = accelerator or make_accelerator(self.cfg)
        self.is_main = self.accelerator.is_main_process
        self.device = self.accelerator.device
        run_dir.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            self.cfg.save(run_dir / "config.yaml")
        if not self.cfg.diffusion.learned_variance:
            log("warning: diffusion.learned_variance is off — σ is fixed, L_vlb and the variance factor do nothing")
        self.task = build.build_task(self.cfg)
        self.source = train_source if train_source is not None else open_split(self.cfg, self.cfg.data.train_split)
        self.dataset = self.task.dataset(self.source, self.cfg.data.resolution)
        self.num_classes = self.task.num_classes
        self.schedule = NoiseSchedule(self.cfg.diffusion)
        self.timing = self._previous_timing()
        self.generator = self.generator_dir = None
        self.cache: PosteriorCache | None = None
        self.temperature: float | None = None

    def _previous_timing(self) -> dict:
        """A rerun keeps the times of the stages it reuses."""
        path = self.run_dir / "timing.json"
        if not path.is_file():
            return {}
        return {k: v for k, v in json.loads(path.read_text()).items() if k != "temperature"}

    # -- stage 0 ----------------------------------------------------------------------------------

    def obtain_generator(self, generator=None) -> None:
        """The given generator, ``stages.pretrained``, or stage 0; frozen, on the device."""
        stages = self.gcfg.stages
        if generator is not None:
            self.generator_dir = Path(stages.pretrained or "<given>")
        elif stages.pretrained:
            generator, self.generator_dir = load_generator(stages.pretrained), Path(stages.pretrained)
        else:
            generator, self.generator_dir, self.timing["stage0_s"] = train_generator(
                self.cfg, self.run_dir, self.task, self.source, self.gcfg, accelerator=self.accelerator, log=self.log)
        generator = generator.to(self.device).eval()
        for p in generator.parameters():
            p.requires_grad_(False)
        if generator.config.num_classes != self.num_classes:
            raise UserError(f"the generator has {generator.config.num_classes} classes, the data {self.num_classes}",
                            "use a generator trained on the same classes")
        self.generator = generator

    # -- the posterior ----------------------------------------------------------------------------

    def prepare_posterior(self, cache: PosteriorCache | None, temperature: float | None) -> None:
        """The frozen teacher's cache (loaded, given or computed once) and the temperature τ."""
        pc = self.gcfg.posterior
        self.temperature = temperature
        if pc.enabled and pc.teacher == "frozen" and pc.cache:
            self.cache = cache if cache is not None else self._frozen_cache()
            if self.temperature is None and pc.fit_temperature:
                present = self.cache.present.nonzero().flatten()
                self.temperature = fit_temperature(self.cache.log_densities[present],
                                                   cache_labels(self.dataset, present),
                                                   kept_states(pc.steps, pc.burn_in, pc.thinning, pc.thinning_anchor))
                self.log(f"posterior temperature fitted: τ = {self.temperature:.4g}")
        if self.temperature is None:
            self.temperature = pc.temperature

    def _frozen_cache(self) -> PosteriorCache:
        path = self.run_dir / "posterior.safetensors"
        if path.is_file():
            return PosteriorCache.load(path)
        # every process computes the same (seeded) cache; the main one writes it
        cache, cost = build_posterior_cache(self.generator, self.dataset, self.gcfg.posterior, self.schedule,
                                            self.num_classes, seed=self.cfg.train.seed, device=self.device)
        if self.is_main:
            cache.save(path)
        self.timing["posterior_cache_s"] = cost["seconds"]
        self.log(f"posterior cache: {cost['images']} images, {cost['seconds']:.0f} s")
        return cache

    def posterior_provider(self, step_fn: Callable[[], int], current_model) -> PosteriorProvider | None:
        """p(y|x) for a stage: the frozen cache, or the teacher (``current_model`` for
        ``teacher: current``) on the fly; None when L_gen_distil is off."""
        pc = self.gcfg.posterior
        if not pc.enabled:
            return None
        teacher = None
        if not (pc.teacher == "frozen" and pc.cache):
            teacher = current_model if pc.teacher == "current" else self.generator
        epoch_steps = max(1, len(self.dataset) // max(1, self.cfg.train.batch_size))
        return PosteriorProvider(pc, self.schedule, self.num_classes, cache=self.cache if pc.cache else None,
                                 teacher=teacher, generator=torch.Generator().manual_seed(self.cfg.train.seed * 31 + 7),
                                 temperature=self.temperature, step_fn=step_fn, epoch_steps=epoch_steps)

    # -- stage 1 ----------------------------------------------------------------------------------

    def build_model(self) -> GenRepModel:
        """The unified model around a copy of the generator (seeded heads / projector)."""
        gcfg = self.gcfg
        text = class_text_embeddings(self.task.class_names) if gcfg.heads.classifier == "cosine" else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.train.seed)
            model = build_genrep_model(copy.deepcopy(self.generator), self.num_classes, self.schedule,
                                       copy.deepcopy(gcfg.heads), copy.deepcopy(gcfg.semantic), text,
                                       gcfg.perception_t)
        model.to(self.device)
        set_trainable(model, gcfg.stages.trainable)
        return model

    def perception_stage(self, model: GenRepModel, stage1_from: str | Path | None) -> GenRepModel:
        """Stage 1 (§3.3): L_percept only (no generation forward); reused when finished, or copied
        from ``stage1_from``."""
        stage_dir, steps = self.run_dir / "stage1", self.gcfg.stages.perception_steps
        if stage1_from is not None and finished_checkpoint(stage_dir, steps) is None:
            self._copy_stage1(Path(stage1_from), stage_dir, steps)
        done = finished_checkpoint(stage_dir, steps)
        if done is not None:
            _load_stage1(model, GenRepModel.from_pretrained(done / "model").state_dict())
            self.log(f"stage 1: reusing {done}")
            return model
        pc, gcfg = self.gcfg.posterior, self.gcfg
        trainer_ref: list[Trainer] = []
        provider = self.posterior_provider(lambda: trainer_ref[0].step if trainer_ref else 0, model)
        perception = PerceptionObjective(provider, pc.weight, gcfg.seg_weight, gcfg.depth_weight)
        combiner = GradientAlignmentCombiner(model.parameters(), AlignConfig(mode="sum", w_p=1.0, w_g=1.0))
        t0 = time.perf_counter()
        trainer = Trainer(stage_config(self.cfg, steps, gcfg.stages.perception_lr, ema=False), stage_dir,
                          task=self.task, train_source=self.source, model=model, objectives=[perception],
                          combiner=combiner, accelerator=self.accelerator)
        trainer_ref.append(trainer)
        res = trainer.train(overwrite=True)  # an unfinished stage starts over
        self.timing["stage1_s"] = time.perf_counter() - t0
        if provider is not None:
            self.timing["stage1_posterior_s"] = provider.compute_seconds
        self.log(f"stage 1 (perception): {res.step} steps, loss {res.loss:.4f}, train top-1 "
                 f"{perception.correct / max(1, perception.seen):.3f}, {self.timing['stage1_s']:.0f} s")
        return trainer.unwrapped

    def _copy_stage1(self, source_run: Path, stage_dir: Path, steps: int) -> None:
        if finished_checkpoint(source_run / "stage1", steps) is None:
            raise UserError(f"{source_run} has no finished stage 1 of {steps} steps",
                            "train it first or drop stage1_from")
        shutil.rmtree(stage_dir, ignore_errors=True)
        shutil.copytree(source_run / "stage1", stage_dir)
        timing = source_run / "timing.json"
        previous = json.loads(timing.read_text()) if timing.is_file() else {}
        self.timing.update({k: previous[k] for k in ("stage1_s", "stage1_posterior_s") if k in previous})

    # -- stage 2 ----------------------------------------------------------------------------------

    def unified_stage(self, model: GenRepModel) -> tuple[GenRepModel, GenRepModel, list]:
        """Stage 2 (§3.3): ε_unified (a copy of the stage-1 model) trains L_percept and L_genera
        combined by the gradient alignment; ε_sem follows it by EMA. Returns (ε_unified, ε_sem,
        the alignment history)."""
        stage_dir, steps = self.run_dir / "stage2", self.gcfg.stages.unified_steps
        unified = model.clone()
        trainable = set_trainable(unified, self.gcfg.stages.trainable)
        done = finished_checkpoint(stage_dir, steps)
        if done is not None and (stage_dir / "semantic" / "model.safetensors").is_file():
            unified.load_state_dict(GenRepModel.from_pretrained(done / "model").state_dict())
            self.log(f"stage 2: reusing {done}")
            return unified.eval(), GenRepModel.from_pretrained(stage_dir / "semantic"), []
        gcfg, pc = self.gcfg, self.gcfg.posterior
        trainer_ref: list[Trainer] = []

        def step_fn() -> int:
            return trainer_ref[0].step if trainer_ref else 0

        teacher = SemanticTeacher(unified, self.schedule, gcfg.semantic,
                                  torch.Generator().manual_seed(self.cfg.train.seed * 13 + 5))
        if gcfg.semantic.modulation:
            unified.attach_semantic(teacher)
        provider = self.posterior_provider(step_fn, unified)
        objectives = [PerceptionObjective(provider, pc.weight, gcfg.seg_weight, gcfg.depth_weight),
                      HybridDiffusionObjective(gcfg.vlb_weight)]
        if gcfg.semantic.rep_align:
            objectives.append(RepAlignObjective(teacher, gcfg.semantic))
        aligned = unified.attention_parameters() if gcfg.align.params == "attention" else None
        combiner = _HistoryCombiner(trainable, gcfg.align, aligned)
        t0 = time.perf_counter()
        trainer = Trainer(stage_config(self.cfg, steps, gcfg.stages.unified_lr, ema=False), stage_dir,
                          task=self.task, train_source=self.source, model=unified, objectives=objectives,
                          combiner=combiner, hooks=[teacher], accelerator=self.accelerator)
        trainer_ref.append(trainer)
        res = trainer.train(overwrite=True)  # an unfinished stage starts over
        self.timing["stage2_s"] = time.perf_counter() - t0
        if provider is not None:
            self.timing["stage2_posterior_s"] = provider.compute_seconds
        unified = trainer.unwrapped
        unified.attach_semantic(None)
        if trainer.is_main:
            teacher.net.save_pretrained(stage_dir / "semantic")
            _write_align(stage_dir / "align.csv", combiner.history)
        self.log(f"stage 2 (unified, align={gcfg.align.mode}): {res.step} steps, loss {res.loss:.4f}, "
                 f"{self.timing['stage2_s']:.0f} s")
        return unified.eval(), teacher.net, combiner.history

    def write_timing(self) -> None:
        if self.is_main:
            (self.run_dir / "timing.json").write_text(json.dumps({**self.timing, "temperature": self.temperature},
                                                                 indent=1))


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

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.history: list[dict] = []

    def backward(self, groups, accelerator=None, scale: float = 1.0) -> None:
        super().backward(groups, accelerator, scale)
        self.history.append(dict(self.last))


def _write_align(path: Path, history: list[dict]) -> None:
    lines = ["step,cos,alpha"] + [f"{i + 1},{h.get('cos', float('nan')):.6g},{h.get('alpha', float('nan')):.6g}"
                                  for i, h in enumerate(history)]
    path.write_text("\n".join(lines) + "\n")
