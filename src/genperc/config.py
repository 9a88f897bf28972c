"""Typed run configuration: dataclasses <-> YAML, named presets, dotted overrides.

A run is described by one :class:`RunConfig`. Presets are YAML files in ``genperc/configs/``
(``genperc presets`` lists them); a user's own YAML file works the same way. Command-line
overrides use dotted keys (``train.lr=3e-4 model.arch=unet-small``); values are parsed as YAML
and checked against the field's type. An unknown key is a :class:`~genperc.errors.UserError`
that lists the valid keys. The resolved config is saved next to every checkpoint, so a run
directory describes itself (DESIGN.md, "Checkpoints describe themselves").
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from genperc.diffusion.schedule import SCHEDULER_KINDS, DiffusionConfig
from genperc.diffusion.timesteps import STRATEGIES
from genperc.errors import UserError
from genperc.runtime import PRECISIONS

PRESET_DIR = Path(__file__).parent / "configs"


MODEL_MODES = ("generative", "discriminative")
SELF_CONDITIONING_BLOCK = re.compile(r"^(mid|down\d+|up\d+|blk\d+)$")


def in_range(key: str, value, lo, hi=None, *, lo_open: bool = False, hi_open: bool = False,
              fix: str = "") -> None:
    """A :class:`UserError` naming ``key`` and its valid range unless ``value`` is a finite number in
    it: lo ≤ value ≤ hi (lo < value with ``lo_open``, value < hi with ``hi_open``; no ``hi``: unbounded).
    NaN and ±inf are never in range (``train.lr=.nan`` is refused, not trained on)."""
    ok = (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
          and (lo < value if lo_open else lo <= value)
          and (hi is None or (value < hi if hi_open else value <= hi)))
    if ok:
        return
    if hi is None:
        where = f"must be {'>' if lo_open else '≥'} {lo}"
    else:
        where = f"must lie in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if isinstance(value, float) and not math.isfinite(value):
        where = f"is not a finite number; it {where}"
    raise UserError(f"{key}={value} {where}", fix or f"set {key} in that range")


def one_of(key: str, value, valid) -> None:
    if value not in valid:
        raise UserError(f"{key}={value!r} is not valid", f"use one of: {', '.join(map(str, valid))}")


@dataclass
class SelfConditioningConfig:
    """DDAE++ self-conditioning (``model.self_conditioning``; :mod:`genperc.models.selfcond` has the method).

    enabled:       route pooled features of ``block`` back into the conditioning of the later blocks.
    block:         ``mid`` (default: the UNet bottleneck; on a DiT the last block of the first half),
                   ``down{i}`` / ``up{i}`` (UNet) or ``blk{i}`` (DiT); a block without a later block is refused.
    hidden:        hidden width of the projection MLP (pooled features → conditioning width).
    time_adaptive: scale by a zero-initialised per-channel gate that is a learned function of t
                   (False: a zero-initialised per-channel gate constant in t — the ablation).
    stop_grad:     stop the gradient of the routed path at the pooled features (default False: the
                   encoder is trained through the route, the "tighter bottleneck" of the abstract).
    """

    enabled: bool = False
    block: str = "mid"
    hidden: int = 256
    time_adaptive: bool = True
    stop_grad: bool = False

    def __post_init__(self):
        if not SELF_CONDITIONING_BLOCK.match(str(self.block)):
            raise UserError(f"model.self_conditioning.block={self.block!r} is not a block name",
                            "use mid, down<i>, up<i> (UNet) or blk<i> (DiT), e.g. model.self_conditioning.block=mid")
        in_range("model.self_conditioning.hidden", self.hidden, 1, 65536)


@dataclass
class ModelConfig:
    """Which denoiser to build (``arch``: an architecture of ``genperc.models.registry``) and from what.

    ``mode`` is how the run uses that denoiser, saved with the run so that ``genperc eval`` and
    ``predict`` use it the same way:

    * ``generative`` (default): a diffusion model — trained by the denoising loss on noised
      targets, evaluated by sampling (ADDP);
    * ``discriminative``: ADDP Table 2's counterpart — the same denoiser, text encoder and image
      conditioning, one deterministic forward at t = T−1 on a zero input (Garcia et al., WACV 2025,
      :mod:`genperc.models.discriminative`) trained with the task's own loss
      (``Task.discriminative_loss``) and evaluated by that same single forward (no sampler, no ensemble).
    """

    arch: str = "unet-tiny"
    sample_size: int = 32
    pretrained: str | None = None  # local diffusers directory (SD / InstructPix2Pix / Marigold)
    vae: str | None = None  # local AutoencoderKL directory → latent space; None = pixel space
    text_encoder: str = "minilm"  # "minilm", "none" or a local CLIP text-encoder directory
    text_max_length: int = 32
    mode: str = "generative"  # generative | discriminative (see the class docstring)
    self_conditioning: SelfConditioningConfig = field(default_factory=SelfConditioningConfig)  # DDAE++

    def __post_init__(self):
        in_range("model.sample_size", self.sample_size, 1, 16384)
        in_range("model.text_max_length", self.text_max_length, 1, 4096)
        if self.mode not in MODEL_MODES:
            raise UserError(f"model.mode={self.mode!r} is not valid",
                            "use model.mode=generative (diffusion) or model.mode=discriminative (one forward, task loss)")


@dataclass
class DataConfig:
    """Where training and evaluation samples come from (``genperc.data``)."""

    source: str = "toy"  # toy | world | refcoco | nyuv2 | coco | ade20k | folder | digits | cifar10 | cifar100
    path: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    resolution: int = 32
    num_workers: int = 0
    options: dict = field(default_factory=dict)  # source-specific keyword arguments (checked when opened)

    def __post_init__(self):
        from genperc.data.sources import check_source, check_split_name

        check_source(self.source)
        check_split_name(self.train_split, "data.train_split")
        check_split_name(self.val_split, "data.val_split")
        in_range("data.resolution", self.resolution, 1, 16384)
        in_range("data.num_workers", self.num_workers, 0, 1024)


@dataclass
class ContrastiveConfig:
    """DDAE++ contrastive self-distillation (``train.contrastive``; :mod:`genperc.training.contrastive`).

    enabled:      add the InfoNCE loss of two augmented views (needs ``model.self_conditioning.enabled``:
                  the student reads the self-conditioning features).
    weight:       its weight next to the diffusion loss (0.03: at 0.1 the loss is ~5× the diffusion loss
                  and cost sample precision on the digits and the world; docs/ddae.md, "Ablations").
    temperature:  τ of MoCo v3's InfoNCE (the loss is scaled by 2τ, as MoCo v3 does).
    momentum:     m of the EMA teacher, θ_teacher ← m·θ_teacher + (1 − m)·θ_student, every optimizer step
                  (constant; not the sampling EMA ``train.ema_decay``).
    t:            the distillation timestep of both views (a training timestep, 0 … T−1) …
    t_range:      … or ``[lo, hi]``: one t per view and sample, uniform in lo … hi (inclusive); [] = use ``t``.
    hidden:       hidden width of the projector (MoCo v3: 4096).
    proj_dim:     output width of projector and predictor (MoCo v3: 256).
    pred_dim:     hidden width of the predictor (MoCo v3: 4096).
    aug_strength: scale of crop, colour-jitter ranges (1 = the module's documented ranges, 0 = none).
    color:        scale of the colour jitter on top of ``aug_strength``; 0 (default) = crop and flip only,
                  EDM's geometric-only choice — any colour jitter (even 0.25) collapsed world samples to
                  saturated frames (docs/ddae.md, "Ablations"); 1 = MoCo v3's colour recipe.
    flip:         random horizontal flips of the views.
    aug_cond:     feed the augmentation parameters to the network as a conditioning vector (EDM-style).
    """

    enabled: bool = False
    weight: float = 0.03
    temperature: float = 0.2
    momentum: float = 0.99
    t: int = 11
    t_range: list[int] = field(default_factory=list)
    hidden: int = 1024
    proj_dim: int = 256
    pred_dim: int = 1024
    aug_strength: float = 1.0
    color: float = 0.0
    flip: bool = True
    aug_cond: bool = False

    def __post_init__(self):
        key = "train.contrastive."
        in_range(key + "weight", self.weight, 0, 100)
        in_range(key + "temperature", self.temperature, 0, 10, lo_open=True)
        in_range(key + "momentum", self.momentum, 0, 1, fix="use e.g. 0.99 (1 freezes the teacher)")
        in_range(key + "t", self.t, 0, 10**6)
        if self.t_range and (len(self.t_range) != 2 or not 0 <= self.t_range[0] <= self.t_range[1]):
            raise UserError(f"{key}t_range={self.t_range} is not [lo, hi] with 0 <= lo <= hi",
                            f"write e.g. {key}t_range=[0,100], or {key}t_range=[] to use {key}t")
        for name in ("hidden", "proj_dim", "pred_dim"):
            in_range(key + name, getattr(self, name), 1, 65536)
        in_range(key + "aug_strength", self.aug_strength, 0, 2)
        in_range(key + "color", self.color, 0, 2)


@dataclass
class TrainConfig:
    """The one training loop (``genperc.training.trainer``)."""

    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"  # cosine | constant
    warmup_steps: int = 50
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"  # auto (bf16 where the device computes it natively, genperc.runtime) | no | fp16 | bf16
    ema: bool = True
    ema_decay: float = 0.999
    seed: int = 0
    timesteps: str = "uniform"  # timestep strategy: uniform | loss-scaling | prob-scaling (ADDP §3.1)
    contributions: str = "diffusion"  # c_t² for the strategy: diffusion | addp-depth | addp-referring | a c.json path | "[1, 3, …]"
    augment: float = 0.0  # ADDP §3.2 diffusion-tailored augmentation intensity multiplier (0 = off)
    cond_dropout: float = 0.05  # InstructPix2Pix conditioning dropout p (0 disables)
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    progress: bool = True
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)  # DDAE++

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "log_every", "checkpoint_every", "keep_checkpoints"):
            in_range(f"train.{name}", getattr(self, name), 1)
        in_range("train.lr", self.lr, 0, lo_open=True, fix="use e.g. train.lr=3e-4")
        in_range("train.weight_decay", self.weight_decay, 0)
        in_range("train.warmup_steps", self.warmup_steps, 0)
        in_range("train.max_grad_norm", self.max_grad_norm, 0, fix="use e.g. 1.0 (0 turns clipping off)")
        in_range("train.ema_decay", self.ema_decay, 0, 1, hi_open=True, fix="use e.g. 0.999 (1 would never update)")
        in_range("train.seed", self.seed, 0, 2**63 - 1)
        in_range("train.augment", self.augment, 0, 100)
        in_range("train.cond_dropout", self.cond_dropout, 0, 1)
        one_of("train.lr_schedule", self.lr_schedule, ("cosine", "constant"))
        one_of("train.mixed_precision", self.mixed_precision, PRECISIONS)
        one_of("train.timesteps", self.timesteps, sorted(STRATEGIES))


@dataclass
class SampleConfig:
    """Defaults for sampling at evaluation / prediction time (``genperc.diffusion.sampler``)."""

    sampler: str = "ddim"  # ddpm | ddim | euler-a
    steps: int = 20
    text_scale: float = 1.0  # InstructPix2Pix s_T (1 = no text guidance)
    image_scale: float = 1.0  # InstructPix2Pix s_I (1 = no image guidance)
    eta: float = 0.0
    batch_size: int = 32

    def __post_init__(self):
        one_of("sample.sampler", self.sampler, SCHEDULER_KINDS)
        in_range("sample.steps", self.steps, 1)
        in_range("sample.text_scale", self.text_scale, 0)
        in_range("sample.image_scale", self.image_scale, 0)
        in_range("sample.eta", self.eta, 0, 1)
        in_range("sample.batch_size", self.batch_size, 1)


@dataclass
class GenRepEvalConfig:
    """What ``genperc.evaluation.genrep.evaluate_genrep`` measures (its module docstring); the
    ``eval`` section of GenRep's settings. Kept here, below training and evaluation, because both read it."""

    batch_size: int = 256
    noise_levels: list[int] = field(default_factory=lambda: [10, 20, 50])
    robust_timestep: str = "true"  # true | zero
    generation: bool = True
    samples_per_class: int = 25
    sample_steps: int = 50
    feature_extractor: str = "classifier"  # classifier | torchscript:PATH
    pr_k: int = 3
    grid_per_class: int = 8
    seed: int = 0

    def __post_init__(self):
        key = "task_options.genrep.eval."
        for name in ("batch_size", "sample_steps", "pr_k"):
            in_range(key + name, getattr(self, name), 1)
        for name in ("samples_per_class", "grid_per_class", "seed"):
            in_range(key + name, getattr(self, name), 0)
        for t in self.noise_levels:
            in_range(key + "noise_levels[]", t, 0)
        one_of(key + "robust_timestep", self.robust_timestep, ("true", "zero"))
        if not (self.feature_extractor == "classifier" or self.feature_extractor.startswith("torchscript:")):
            raise UserError(f"{key}feature_extractor={self.feature_extractor!r} is not valid",
                            "use classifier or torchscript:PATH")


@dataclass
class RunConfig:
    task: str = "referring"
    task_options: dict = field(default_factory=dict)  # keyword arguments of the task codec
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self):
        if self.train.contrastive.enabled and not self.model.self_conditioning.enabled:
            raise UserError("train.contrastive.enabled needs model.self_conditioning.enabled "
                            "(the student reads the self-conditioning features, DDAE++)",
                            "set model.self_conditioning.enabled=true, or train.contrastive.enabled=false")
        c, steps = self.train.contrastive, self.diffusion.num_train_timesteps
        key, last = ("t_range", c.t_range[1]) if c.t_range else ("t", c.t)
        if last >= steps:
            raise UserError(f"train.contrastive.{key}={c.t_range or c.t} must lie in [0, {steps - 1}]",
                            f"the distillation timestep is a training timestep (diffusion.num_train_timesteps={steps})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the YAML atomically (a reader or a crash sees the old file or the new one)."""
        from genperc.atomic import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass with key and type checking


def valid_keys(cls=RunConfig, prefix: str = "") -> list[str]:
    """All dotted keys of a config class, e.g. ``train.lr``."""
    keys = []
    for f in dataclasses.fields(cls):
        ftype = _hints(cls)[f.name]
        if dataclasses.is_dataclass(ftype):
            keys += valid_keys(ftype, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


# Keys renamed since configs were first saved: (section class, old name) → new name. A run
# directory's config.yaml written before the rename still loads, with a one-line warning.
RENAMED_KEYS = {("ModelConfig", "preset"): "arch"}


def _renamed(cls, data: dict, where: str) -> dict:
    out = {}
    for key, value in data.items():
        new = RENAMED_KEYS.get((cls.__name__, key))
        if new is not None and new not in data:
            warnings.warn(f"config key '{where}{key}' is now '{where}{new}'; read as {where}{new}={value}",
                          FutureWarning, stacklevel=4)
            key = new
        out[key] = value
    return out


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass ``cls`` from a (possibly partial) nested dict, checking keys and types."""
    if not isinstance(data, dict):
        raise UserError(f"config section '{where or 'top'}' must be a mapping, got {type(data).__name__}")
    data = _renamed(cls, data, where)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = where + unknown[0]
        raise UserError(
            f"unknown config key '{key}'",
            "valid keys: " + ", ".join(valid_keys(cls, where)),
        )
    kwargs = {}
    hints = _hints(cls)
    for name, value in data.items():
        ftype = hints[name]
        if dataclasses.is_dataclass(ftype):
            kwargs[name] = from_dict(ftype, value or {}, where + name + ".")
        else:
            kwargs[name] = _coerce(value, ftype, where + name)
    return cls(**kwargs)


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _coerce(value, ftype, key: str):
    origin = typing.get_origin(ftype)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ftype) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if ftype is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if ftype is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if ftype is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if ftype is str and isinstance(value, bool):  # YAML 1.1 reads no / off / false (yes / on / true) as a bool
        return "no" if value is False else "yes"  # e.g. train.mixed_precision=no
    if ftype is str and isinstance(value, list):  # e.g. train.contributions=[1, 3, 7] → "[1, 3, 7]"
        return json.dumps(value)
    check = origin or ftype
    if check in (list, tuple) and isinstance(value, (list, tuple)):
        return list(value)
    if not isinstance(value, check) or (check is int and isinstance(value, bool)):
        raise UserError(
            f"config key '{key}' expects {getattr(ftype, '__name__', ftype)}, got {value!r}",
            f"write e.g. {key}=<{getattr(ftype, '__name__', ftype)}>",
        )
    return value


# ---------------------------------------------------------------------------------------------
# presets, files and overrides


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"cannot parse config file {path}: {str(e).splitlines()[0]}", "fix the YAML syntax") from e
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping at the top level")
    return data


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_preset_dict(name_or_path: str, _seen: tuple[Path, ...] = (), _folder: Path | None = None) -> dict:
    """A preset name (``cpu-tiny``) or a YAML path; ``base: <preset or path>`` inherits another preset.

    A relative ``base:`` path is read from the folder of the file that names it (not the working
    directory); a chain of ``base:`` that comes back to a file already in it is refused."""
    path = Path(name_or_path)
    if _folder is not None and not path.is_absolute():
        path = _folder / path
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        path = PRESET_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            where = f" (the base: of {_seen[-1]})" if _seen else ""
            raise UserError(
                f"unknown preset '{name_or_path}'{where}",
                "choose one of: " + ", ".join(list_presets()) + " (or give a path to a .yaml file)",
            )
    path = path.resolve()
    if path in _seen:
        chain = " → ".join(p.name for p in (*_seen, path))
        raise UserError(f"config base: cycle {chain}", f"remove the base: line of {_seen[-1]} that leads back")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is not None and not isinstance(base, str):
        raise UserError(f"{path}: base: must be a preset name or a YAML path, got {base!r}", "e.g. base: cpu-tiny")
    return _merge(load_preset_dict(base, (*_seen, path), path.parent), data) if base else data


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.lr=3e-4", "model.arch=unet-small"]`` → nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' is not of the form key=value", "write e.g. train.lr=3e-4")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def load_config(preset: str | None = None, overrides: list[str] | None = None, base: dict | None = None) -> RunConfig:
    """Resolve defaults ← preset ← ``base`` dict ← dotted overrides into a checked RunConfig."""
    data: dict = {}
    if preset:
        data = load_preset_dict(preset)
    if base:
        data = _merge(data, base)
    if overrides:
        data = _merge(data, parse_overrides(overrides))
    return from_dict(RunConfig, data)


#: config keys that do not change what a run trains (left out when a run is resumed with a config)
BOOKKEEPING = ("sample.", "train.progress", "train.log_every", "data.num_workers")

#: config keys that shape the weights a checkpoint holds: ``train --resume`` refuses to change them
WEIGHT_KEYS = ("task", "model.", "diffusion.", "data.resolution")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def check_same_run(run_dir: str | Path, cfg: RunConfig, fix: str, only: tuple[str, ...] | None = None) -> None:
    """A one-line :class:`UserError` (with ``fix``) when the run in ``run_dir`` was trained with
    another config than ``cfg`` (:data:`BOOKKEEPING` keys aside): resuming it would mix two runs.
    ``only``: compare just the keys that start with one of these (e.g. :data:`WEIGHT_KEYS`)."""
    saved = _flat(json.loads(json.dumps(load_run_config(run_dir).to_dict())))
    wanted = _flat(json.loads(json.dumps(cfg.to_dict())))
    diff = [k for k in sorted(set(saved) | set(wanted))
            if not k.startswith(BOOKKEEPING) and (only is None or k.startswith(only)) and saved.get(k) != wanted.get(k)]
    if diff:
        shown = ", ".join(f"{k}={saved.get(k)!r} (now {wanted.get(k)!r})" for k in diff[:3])
        raise UserError(f"{run_dir} was trained with another config: {shown}" + (" …" if len(diff) > 3 else ""), fix)


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The resolved config saved in a run directory."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise UserError(f"no config.yaml in run directory {run_dir}", "pass a directory written by 'genperc train'")
    return from_dict(RunConfig, _read_yaml(path))
