"""GenRep's settings: :class:`GenRepConfig` (``task_options.genrep`` of a run config) and its stages."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

from genperc.config import GenRepEvalConfig, RunConfig, from_dict, in_range, load_config
from genperc.errors import UserError
from genperc.models.heads import HeadConfig
from genperc.models.semantic import SemanticConfig
from genperc.training.combiners import AlignConfig
from genperc.training.posterior import PosteriorConfig


@dataclass
class StageConfig:
    """The stages (package docstring). Steps use ``train.batch_size`` and ``train.lr`` unless set."""

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
        key = "task_options.genrep.stages."
        for name in ("pretrain_steps", "perception_steps", "unified_steps"):
            in_range(key + name, getattr(self, name), 0)
        for name in ("perception_lr", "unified_lr"):
            if getattr(self, name) is not None:
                in_range(key + name, getattr(self, name), 0, lo_open=True)


@dataclass
class GenRepConfig:
    """Every GenRep setting; lives in ``task_options.genrep`` of the run config."""

    heads: HeadConfig = field(default_factory=HeadConfig)
    posterior: PosteriorConfig = field(default_factory=PosteriorConfig)
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    stages: StageConfig = field(default_factory=StageConfig)
    eval: GenRepEvalConfig = field(default_factory=GenRepEvalConfig)
    vlb_weight: float = 0.001  # λ of L_hybrid (improved DDPM, T = 1000)
    perception_t: int = 0
    seg_weight: float = 1.0
    depth_weight: float = 1.0

    def __post_init__(self):
        for name in ("vlb_weight", "seg_weight", "depth_weight", "perception_t"):
            in_range(f"task_options.genrep.{name}", getattr(self, name), 0)

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
