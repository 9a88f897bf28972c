"""The DDAE linear probe: how linearly separable a frozen denoiser's features are — the measuring
stick of DDAE++.

DDAE (Xiang et al., "Denoising Diffusion Autoencoders are Unified Self-supervised Learners", ICCV
2023; code FutureXiang/ddae, ``linear.py`` and ``DiT/linear.py``) reads a diffusion model as a
representation learner: noise a clean image to x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε at one noise level t, run
the frozen (EMA) denoiser once, global-average-pool the output of one block and train a bare linear
layer on it. DDAE++ (self-conditioning, contrastive self-distillation; REFERENCE.md "DDAE / DDAE++")
reports its gains with the same probe. As implemented here:

* **Features** (:class:`FeatureExtractor`): forward hooks (:class:`~genperc.models.heads.FeatureTaps`)
  on every block — UNet ``down0 …``, ``mid``, ``up0 …`` (a block's output after its down- or
  upsampler), DiT ``blk0 …`` (the transformer blocks; ``down.0``, ``up.2``, ``dit.13`` are accepted
  too). The map is averaged over H×W (DiT: over the tokens); no normalisation. The condition is the
  *null* one, so that the probe is never told the label: the null class of a class-conditional model
  (nothing for an unconditional one), the null text (the embedding of "") if the model takes text,
  and a zero image condition (in the model's space: the null image of conditioning dropout) if it
  takes one. Images go through the run's space (pixels or VAE latents) and are noised with the
  run's schedule; ε comes from the probe's seeded generator.
* **Probe**: ``nn.Linear(C, K)`` with PyTorch's default initialisation (drawn from the probe's
  seed), cross-entropy, Adam lr 1e-3, cosine annealing over 15 epochs (stepped once per epoch, as
  ``CosineAnnealingLR(optim, epochs)`` in linear.py), batch 128, RandomHorizontalFlip +
  RandomCrop(size, padding, black fill) of the training images, the padding 1/8 of the side (DDAE's 4
  at 32 px; a fixed 4 would shift 8 px digits by half their size). Reported: top-1 on the test split,
  whose features use one fixed noise draw of the seed.
* **Updates** (:attr:`ProbeConfig.min_updates`): DDAE's 15 epochs are 15 × 391 = 5,865 Adam updates
  on CIFAR-10's 50,000 images. On a small training split 15 epochs are far fewer updates (the
  digits' 1,259 images: 150), and a bare linear layer on unnormalised features is then undertrained —
  measured on a 1,000-step ``ddae-cpu`` run: 39% top-1 after 150 updates, 69% after 3,000, while the
  raw-pixel anchor moved only from 96% to 98%. So the epochs grow until the updates reach DDAE's
  count (:meth:`ProbeConfig.epochs_for`); the cosine schedule spans the grown epochs. ``min_updates=0``
  is the literal 15 epochs.
* **Noise** (:attr:`ProbeConfig.cache` and ``cache_draws``): by default the training features are
  extracted anew for every batch of every epoch — fresh ε, fresh crop and flip — as DDAE does, so the
  probe fits the distribution of features the denoiser produces at t, not one draw of it (epochs × N
  denoiser passes per t). ``cache=True`` extracts ``cache_draws`` views of the training split once —
  the clean images, then ``cache_draws − 1`` crops and flips, each with its own ε — and epoch e trains
  on view e mod ``cache_draws``: ``cache_draws`` passes instead of epochs, a cheaper approximation
  of DDAE's number (one view: a quick look).
* **Anchors** (DESIGN.md): the chance level, the same probe on the clean pixels
  (:func:`pixel_anchor`) and the best cell of the same probe on a freshly initialised denoiser of
  the same architecture (:func:`random_init_anchor`: what training added), reported beside the
  cells. Features below the random-init anchor are a defect; the pixel anchor keeps the spatial
  layout that global average pooling removes and can lie above both on small centred images.
* **Grid** (DDAE's ``--grid``): every block at every t of a list. One denoiser pass per batch serves
  all blocks, and each cell is trained exactly as a single probe of that cell (the same seed, batches,
  crops and noise), so a grid cell equals the single run. Default ts: DDAE's {1, 11, 21} widened to
  {1, 11, 21, 51, 101, 201} of 1,000 steps, scaled to the run's ``num_train_timesteps``. Without a
  grid: DDAE's best setting, t = 11 for a UNet and t = 121 for a DiT (of 1,000), every block. DDAE
  counts t from 1 (its t = k has the ᾱ of diffusers' k − 1); genperc's t is diffusers', one step
  noisier at the same number — negligible at these levels (β ≈ 3·10⁻⁴).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genperc.errors import UserError
from genperc.inference import LoadedRun, load_run, machine_info
from genperc.models.heads import FeatureTaps, available_taps

DDAE_GRID = (1, 11, 21, 51, 101, 201)  # of 1,000 steps
DDAE_BEST_T = {"unet": 11, "dit": 121}  # DDAE's configs: DDPM UNet on CIFAR-10; DiT transfer
DATASET_KINDS = ("digits", "world", "cifar10", "cifar100", "folder")


@dataclass
class ProbeConfig:
    """How the linear layer is trained (DDAE's linear.py settings by default; module docstring)."""

    epochs: int = 15
    batch_size: int = 128
    lr: float = 1e-3
    padding: int | None = None  # RandomCrop(size, padding); None = size // 8 (DDAE's 4 at 32 px); 0 = no crop
    flip: bool = True  # RandomHorizontalFlip
    cache: bool = False  # False: fresh noise and augmentation every epoch (DDAE); True: cache_draws views cached
    cache_draws: int = 1  # with cache: the clean view + (cache_draws − 1) augmented ones, epoch e reads e mod draws
    min_updates: int = 15 * 391  # DDAE's Adam updates (15 epochs of CIFAR-10 at batch 128); 0 = epochs as given
    seed: int = 0
    eval_batch_size: int = 256

    def crop_padding(self, size: int) -> int:
        return self.padding if self.padding is not None else size // 8

    def epochs_for(self, items: int) -> int:
        """The epochs run on ``items`` training images: ``epochs``, grown until the updates reach
        ``min_updates`` (module docstring, "Updates")."""
        per_epoch = math.ceil(items / self.batch_size)
        return max(self.epochs, math.ceil(self.min_updates / per_epoch))

    def __post_init__(self):
        if self.min_updates < 0:
            raise UserError(f"probe min_updates must be >= 0, got {self.min_updates}", "use 0 for the epochs as given")
        for name in ("epochs", "batch_size", "eval_batch_size", "cache_draws"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"probe {name} must be at least 1, got {getattr(self, name)}", f"set {name} >= 1")
        if (self.padding or 0) < 0 or self.lr <= 0:
            raise UserError(f"probe padding {self.padding} / lr {self.lr} out of range", "use padding >= 0, lr > 0")


# ------------------------------------------------------------------------------------ blocks, t


def probe_blocks(model) -> list[str]:
    """Every block the probe can read, in network order (UNet ``down*``, ``mid``, ``up*``; DiT ``blk*``)."""
    return available_taps(model)


def resolve_blocks(model, names: Sequence[str] | None = None) -> list[str]:
    """The blocks named (``up0`` or ``up.0``, ``blk13`` or ``dit.13``), or every block (None / empty)."""
    valid = probe_blocks(model)
    if not names:
        return valid
    out = []
    for name in names:
        key = name.strip().replace(".", "")
        key = "blk" + key[3:] if key.startswith("dit") else key
        if key not in valid:
            raise UserError(f"unknown block {name!r}", f"blocks of this model: {', '.join(valid)}")
        out.append(key)
    return list(dict.fromkeys(out))


def probe_timesteps(model, num_train_timesteps: int, timesteps: Sequence[int] | None = None,
                    grid: bool = False) -> list[int]:
    """``timesteps`` as given (the run's own steps), else DDAE's grid (``grid``) or its best t for the
    backbone, as fractions of 1,000 steps scaled to ``num_train_timesteps``."""
    n = int(num_train_timesteps)
    if timesteps:
        bad = [int(t) for t in timesteps if not 0 <= int(t) < n]
        if bad:
            raise UserError(f"timesteps {bad} are outside the run's schedule", f"use t in 0 … {n - 1}")
        return list(dict.fromkeys(int(t) for t in timesteps))
    base = DDAE_GRID if grid else (DDAE_BEST_T["dit" if model.config.backbone == "dit" else "unet"],)
    return list(dict.fromkeys(min(n - 1, round(t * n / 1000)) for t in base))


def random_crop_flip(images: Tensor, padding: int, flip: bool, generator: torch.Generator) -> Tensor:
    """torchvision's RandomHorizontalFlip then RandomCrop(size, padding) per image, batched, on
    [B, C, H, W] images in [−1, 1]; the padding is black (−1, torchvision's fill 0 on [0, 1] images)."""
    b, c, h, w = images.shape
    if flip:
        mirror = torch.rand(b, generator=generator) < 0.5
        images = torch.where(mirror[:, None, None, None], images.flip(-1), images)
    if padding:
        padded = F.pad(images, (padding,) * 4, value=-1.0)
        dy, dx = torch.randint(0, 2 * padding + 1, (2, b, 1), generator=generator)
        rows, cols = dy + torch.arange(h), dx + torch.arange(w)  # [B, H], [B, W]
        images = padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None],
                        rows[:, None, :, None], cols[:, None, None, :]]
    return images


# ------------------------------------------------------------------------------------ features


class FeatureExtractor:
    """Pooled block features of a loaded run's frozen denoiser at one t (module docstring).

    ``extractor(images, t, generator)`` → ``{block: [B, C]}`` for images [B, 3, H, W] in [−1, 1];
    :meth:`close` removes the hooks."""

    def __init__(self, run: LoadedRun, blocks: Sequence[str]):
        self.run, self.blocks = run, list(blocks)
        cfg = run.model.config
        if cfg.text_dim and run.text_encoder is None:
            raise UserError(f"the denoiser of {run.run_dir} takes text but the run has no text encoder",
                            "load the run with its text encoder (model.text_encoder)")
        from genperc.models.conditioning import null_conditioning

        self._null = null_conditioning(run.text_encoder if cfg.text_dim else None, run.device)
        self.taps = FeatureTaps(run.model, self.blocks)

    @property
    def device(self) -> torch.device:
        return self.run.device

    def dims(self) -> dict[str, int]:
        """Channels of each block (one dummy pass at the model's input size)."""
        return self.taps.channels(self.run.model, self.run.resolution // self.run.space.scale_factor)

    def _condition(self, x0: Tensor):
        b, cfg = x0.shape[0], self.run.model.config
        cond = self._null.broadcast_to_batch(b) if self._null.batch_size else self._null
        if cfg.cond_channels:
            cond = cond.replace(image=torch.zeros(b, cfg.cond_channels, *x0.shape[-2:], device=x0.device,
                                                  dtype=x0.dtype))
        return cond

    @torch.no_grad()
    def __call__(self, images: Tensor, t: int, generator: torch.Generator) -> dict[str, Tensor]:
        run = self.run
        x0 = run.space.encode(images.to(run.device))
        noise = torch.randn(x0.shape, generator=generator).to(run.device, x0.dtype)
        steps = torch.full((x0.shape[0],), int(t), dtype=torch.long, device=run.device)
        run.model(run.schedule.add_noise(x0, noise, steps), steps, self._condition(x0))
        return {name: f.float().mean(dim=(2, 3)) for name, f in self.taps.pop().items()}

    def close(self) -> None:
        self.taps.remove()


class PixelFeatures:
    """The probe's anchor (DESIGN.md: every result beside its anchors): the same linear probe on the
    clean image's pixels, flattened — no denoiser, so t and the noise are unused."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    def __call__(self, images: Tensor, t: int, generator: torch.Generator) -> dict[str, Tensor]:
        return {"pixels": images.to(self.device).flatten(1)}


def _extract(features, images: Tensor, t: int, generator: torch.Generator, batch_size: int) -> dict[str, Tensor]:
    """Features of every image, in order, in batches (one noise draw from ``generator``)."""
    parts = [features(chunk.float(), t, generator) for chunk in images.split(batch_size)]
    return {b: torch.cat([p[b] for p in parts]) for b in parts[0]}


# ------------------------------------------------------------------------------------ data


@dataclass
class ProbeData:
    """A train and a test split as tensors: images float16 [N, 3, R, R] in [−1, 1] (CPU), labels int64."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    classes: list[str]
    name: str = "data"

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _split_tensors(dataset, limit: int | None, seed: int, progress: bool, what: str) -> tuple[Tensor, Tensor]:
    from torch.utils.data import DataLoader, Subset
    from tqdm.auto import tqdm

    from genperc.data.datasets import collate

    n = len(dataset)
    if n == 0:
        raise UserError(f"the probe's {what} split is empty", "check --dataset and its splits")
    if limit is not None and limit < n:  # a seeded subset, in data order (classes stay mixed)
        dataset = Subset(dataset, torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort()[0])
    images, labels = [], []
    for batch in tqdm(DataLoader(dataset, batch_size=256, collate_fn=collate), disable=not progress,
                      desc=f"reading {what}", unit="batch"):
        images.append(batch["image"].half())
        labels.append(batch["label"].long())
    return torch.cat(images), torch.cat(labels)


def _open_split(data_cfg, candidates: Sequence[str]):
    """The first of ``candidates`` that the source has (test splits are "test" or "val")."""
    from genperc.data.sources import open_scene_source

    for split in candidates[:-1]:
        try:
            return open_scene_source(data_cfg, split), split
        except UserError:
            pass
    return open_scene_source(data_cfg, candidates[-1]), candidates[-1]


def probe_data_config(run: LoadedRun, dataset: str | None = None):
    """The ``DataConfig`` and (train, test) split candidates of a ``--dataset`` spec: ``digits``,
    ``world:PATH``, ``cifar10:PATH``, ``cifar100:PATH``, ``folder:PATH``, or None for the run's own
    data (its ``data.train_split`` / ``data.val_split``). Images come at the run's data.resolution."""
    from genperc.config import DataConfig

    own = run.cfg.data
    if dataset is None:
        return own, (own.train_split,), (own.val_split,)
    kind, _, path = dataset.partition(":")
    kind = kind.strip().lower()
    if kind not in DATASET_KINDS or (kind != "digits" and not path):
        raise UserError(f"--dataset {dataset!r} is not a class-labelled source",
                        "use digits, world:PATH, cifar10:PATH, cifar100:PATH or folder:PATH (or leave it out for "
                        "the run's own data)")
    if kind == "world" and (Path(path) / "manifest.json").is_file():
        raise UserError(f"{path} is one world split; the probe needs a train and a test split",
                        f"pass the folder above it, {Path(path).parent}")
    options = {"size": own.resolution} if kind == "digits" else {}
    cfg = DataConfig(source=kind, path=path or None, resolution=own.resolution, options=options)
    tests = ("test",) if kind in ("digits", "cifar10", "cifar100") else ("test", "val")
    return cfg, ("train",), tests


def load_probe_data(run: LoadedRun, dataset: str | None = None, *, limit: int | None = None, seed: int = 0,
                    progress: bool = False) -> ProbeData:
    """Both splits of a ``--dataset`` source (:func:`probe_data_config`) as :class:`ProbeData`.

    Labels are the source's classes: the digits, the world's classes (single-object splits rendered
    with a label scheme, ``genperc data render --single-object``), CIFAR-100's fine labels, a folder's
    subfolders. The run's own data keeps its classification task's ``classes`` option. ``limit``:
    at most this many items per split (a seeded subset)."""
    from genperc.data.datasets import ClassificationDataset

    cfg, train_splits, test_splits = probe_data_config(run, dataset)
    task = run.task if dataset is None and run.task.name == "classification" else None
    out, class_lists = [], []
    for what, candidates in (("train", train_splits), ("test", test_splits)):
        source, split = _open_split(cfg, candidates)
        ds = task.dataset(source, cfg.resolution) if task is not None else ClassificationDataset(source, cfg.resolution)
        class_lists.append(list(task.class_names if task is not None else ds.classes))
        if not class_lists[-1]:
            raise UserError(f"{cfg.source} split {split!r} has no class list",
                            "probe a class-labelled source: digits, a world rendered with --single-object, "
                            "cifar10/cifar100, or a folder of class subfolders")
        out += _split_tensors(ds, limit, seed, progress, f"{what} ({split})")
    if class_lists[0] != class_lists[1]:
        raise UserError(f"the train and test splits of {dataset or cfg.source} have different classes "
                        f"({len(class_lists[0])} vs {len(class_lists[1])})", "give both splits the same classes")
    return ProbeData(*out, classes=class_lists[0], name=dataset or cfg.source)


# ------------------------------------------------------------------------------------ the probe


@dataclass
class ProbeResult:
    """Top-1 test accuracy of every (t, block) cell, with the settings that produced it."""

    top1: dict[tuple[int, str], float]
    timesteps: list[int]
    blocks: list[str]
    settings: dict = field(default_factory=dict)

    @property
    def best(self) -> tuple[int, str, float]:
        """(t, block, top-1) of the best cell (the first in t-then-block order on ties)."""
        (t, block), acc = max(self.top1.items(), key=lambda kv: kv[1])
        return t, block, acc

    def matrix(self) -> np.ndarray:
        """Top-1 as [blocks, timesteps]."""
        return np.array([[self.top1[(t, b)] for t in self.timesteps] for b in self.blocks])

    def format(self) -> str:
        """The cells as a text table (blocks × t) and the best cell."""
        lines = ["  block     " + "".join(f"{'t=' + str(t):>9}" for t in self.timesteps)]
        lines += [f"  {b:<10}" + "".join(f"{v:>9.4f}" for v in row) for b, row in zip(self.blocks, self.matrix(),
                                                                                     strict=True)]
        t, b, acc = self.best
        lines.append(f"best: t={t}, block {b}: top-1 {acc:.4f}")
        if "anchors" in self.settings:
            a = self.settings["anchors"]
            lines.append(f"anchors: chance {a['chance']:.4f}, the same probe on the clean pixels {a['pixels']:.4f}"
                         + (f", on a freshly initialised denoiser {a['random_init']['top1']:.4f} (t={a['random_init']['t']}"
                            f", {a['random_init']['block']})" if "random_init" in a else ""))
        return "\n".join(lines)

    def write(self, out: str | Path) -> list[Path]:
        """``probe.csv`` (t, block, top1 per cell), ``probe.json`` (cells, best, settings) and the
        heat map ``probe.png``, in ``out``."""
        from genperc.atomic import atomic_write_text

        out = Path(out)
        rows = [f"{t},{b},{self.top1[(t, b)]:.6f}" for t in self.timesteps for b in self.blocks]
        t, b, acc = self.best
        record = {"best": {"t": t, "block": b, "top1": acc}, "timesteps": self.timesteps, "blocks": self.blocks,
                  "top1": [{"t": t, "block": b, "top1": v} for (t, b), v in self.top1.items()],
                  "settings": self.settings}
        return [atomic_write_text(out / "probe.csv", "t,block,top1\n" + "\n".join(rows) + "\n"),
                atomic_write_text(out / "probe.json", json.dumps(record, indent=1) + "\n"),
                plot_heatmap(self, out / "probe.png")]


def plot_heatmap(result: ProbeResult, path: str | Path) -> Path:
    """DDAE's grid plot: top-1 (%) per block (rows, network order) and t (columns), best cell boxed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from genperc.images import save_figure

    m = 100 * result.matrix()
    fig, ax = plt.subplots(figsize=(max(3.6, 1.6 + 0.75 * len(result.timesteps)), 1.4 + 0.34 * len(result.blocks)),
                           dpi=120)
    im = ax.imshow(m, cmap="viridis", aspect="auto")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{m[i, j]:.1f}", ha="center", va="center", fontsize=7,
                    color="white" if m[i, j] < m.min() + 0.6 * (np.ptp(m) or 1) else "black")
    t, b, acc = result.best
    bi, tj = result.blocks.index(b), result.timesteps.index(t)
    ax.add_patch(plt.Rectangle((tj - 0.5, bi - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
    ax.set_xticks(range(len(result.timesteps)), [str(t) for t in result.timesteps])
    ax.set_yticks(range(len(result.blocks)), result.blocks)
    ax.set_xlabel("t (noise level)")
    ax.set_ylabel("block")
    dataset = str(result.settings.get("dataset", "")).split(":")[0]
    anchor = result.settings.get("anchors", {}).get("pixels")
    ax.set_title(f"linear probe top-1 (%), {dataset}\nbest {acc:.1%} at t={t}, {b}"
                 + ("" if anchor is None else f"; pixels {anchor:.1%}"), fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    return save_figure(fig, path)


def _linear(dim: int, classes: int, seed: int) -> nn.Linear:
    """``nn.Linear`` with PyTorch's default initialisation (U(±1/√dim)), drawn from ``seed``."""
    layer = nn.utils.skip_init(nn.Linear, dim, classes)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.weight, layer.bias):
            p.copy_(torch.empty(p.shape).uniform_(-1 / math.sqrt(dim), 1 / math.sqrt(dim), generator=g))
    return layer


def _train_heads(extractor: FeatureExtractor | PixelFeatures, data: ProbeData, t: int, dims: dict[str, int],
                 cfg: ProbeConfig, on_epoch=lambda: None) -> dict[str, nn.Linear]:
    """One linear layer per block, trained together on the same batches (DDAE's ClassifierDict)."""
    order, augment, noise = (torch.Generator().manual_seed(cfg.seed + k) for k in range(3))
    device = extractor.device
    padding = cfg.crop_padding(data.train_images.shape[-1])
    views = []
    if cfg.cache:  # view 0 the clean images, then augmented ones, each with its own noise draw
        for k in range(cfg.cache_draws):
            images = data.train_images if k == 0 else random_crop_flip(data.train_images.float(), padding,
                                                                       cfg.flip, augment)
            views.append(_extract(extractor, images, t, noise, cfg.eval_batch_size))

    def features(idx: Tensor, epoch: int) -> dict[str, Tensor]:
        if views:
            return {b: f[idx.to(device)] for b, f in views[epoch % len(views)].items()}
        images = data.train_images[idx].float()
        return extractor(random_crop_flip(images, padding, cfg.flip, augment), t, noise)

    heads = {b: _linear(d, data.num_classes, cfg.seed).to(device) for b, d in dims.items()}
    optims = {b: torch.optim.Adam(h.parameters(), lr=cfg.lr) for b, h in heads.items()}
    epochs = cfg.epochs_for(len(data.train_labels))
    schedules = [torch.optim.lr_scheduler.CosineAnnealingLR(o, epochs) for o in optims.values()]
    labels = data.train_labels.to(device)
    for epoch in range(epochs):
        for idx in torch.randperm(len(labels), generator=order).split(cfg.batch_size):
            feats, y = features(idx, epoch), labels[idx.to(device)]
            for b, head in heads.items():
                loss = F.cross_entropy(head(feats[b]), y)
                optims[b].zero_grad(set_to_none=True)
                loss.backward()
                optims[b].step()
        for s in schedules:
            s.step()
        on_epoch()
    return heads


@torch.no_grad()
def _test_top1(extractor: FeatureExtractor | PixelFeatures, heads: dict[str, nn.Linear], data: ProbeData, t: int,
               cfg: ProbeConfig) -> dict[str, float]:
    noise = torch.Generator().manual_seed(cfg.seed + 3)
    feats = _extract(extractor, data.test_images, t, noise, cfg.eval_batch_size)
    labels = data.test_labels.to(extractor.device)
    return {b: float((head(feats[b]).argmax(-1) == labels).float().mean()) for b, head in heads.items()}


def pixel_anchor(data: ProbeData, config: ProbeConfig | None = None, device: torch.device | str = "cpu") -> float:
    """Top-1 of the same probe (settings, seed, augmentation) on the clean pixels: the bar the denoiser's
    features must clear (:class:`PixelFeatures`)."""
    cfg, pixels = config or ProbeConfig(), PixelFeatures(device)
    heads = _train_heads(pixels, data, 0, {"pixels": data.train_images[0].numel()}, cfg)
    return _test_top1(pixels, heads, data, 0, cfg)["pixels"]


def random_init_anchor(run: LoadedRun, data: ProbeData, timesteps: Sequence[int], blocks: Sequence[str],
                       config: ProbeConfig | None = None) -> dict:
    """The best cell of the same probe (cells, settings, seed) on a *freshly initialised* denoiser of
    the run's architecture and config (its ``train.seed``): what training added to the features.
    Global-average-pooled features of an untrained network are the anchor a learned representation
    must clear; the raw-pixel anchor keeps the spatial layout that pooling removes, so on small
    centred images (the digits) it can lie above both."""
    from dataclasses import replace

    from genperc import build

    fresh = build.build_model(run.cfg, run.task, run.space, run.text_encoder).to(run.device).eval()
    result = linear_probe(replace(run, model=fresh), data, timesteps, blocks, config, anchors=False)
    t, block, top1 = result.best
    return {"top1": top1, "t": t, "block": block}


def linear_probe(run: LoadedRun, data: ProbeData, timesteps: Sequence[int], blocks: Sequence[str],
                 config: ProbeConfig | None = None, progress: bool = False, anchors: bool = True) -> ProbeResult:
    """Train and test a linear probe on every (t, block) cell (module docstring). ``anchors``: also
    the chance level and :func:`pixel_anchor`, in ``settings["anchors"]``."""
    from tqdm.auto import tqdm

    cfg = config or ProbeConfig()
    if int(data.train_labels.max()) >= data.num_classes or int(data.test_labels.max()) >= data.num_classes:
        raise UserError(f"labels exceed the {data.num_classes} classes of {data.name}", "check the data's classes")
    start = time.perf_counter()
    run.model.eval()
    extractor = FeatureExtractor(run, blocks)
    top1: dict[tuple[int, str], float] = {}
    epochs = cfg.epochs_for(len(data.train_labels))
    bar = tqdm(total=len(timesteps) * epochs, disable=not progress, desc="probe", unit="epoch")
    try:
        dims = extractor.dims()
        for t in timesteps:
            bar.set_postfix_str(f"t={t}")
            heads = _train_heads(extractor, data, int(t), dims, cfg, on_epoch=bar.update)
            top1.update({(int(t), b): acc for b, acc in _test_top1(extractor, heads, data, int(t), cfg).items()})
    finally:
        extractor.close()
        bar.close()
    settings = {"run": str(run.run_dir), "checkpoint": run.checkpoint.name, "weights": run.weights,
                "dataset": data.name, "classes": data.num_classes, "train_items": len(data.train_labels),
                "test_items": len(data.test_labels), "resolution": int(data.train_images.shape[-1]),
                "noise": f"cached ({cfg.cache_draws} views)" if cfg.cache else "fresh", **asdict(cfg),
                "epochs_run": epochs, "updates": epochs * math.ceil(len(data.train_labels) / cfg.batch_size),
                "padding": cfg.crop_padding(int(data.train_images.shape[-1])),
                "seconds": round(time.perf_counter() - start, 2), "machine": machine_info()}
    if anchors:
        settings["anchors"] = {"chance": 1 / data.num_classes, "pixels": pixel_anchor(data, cfg, run.device),
                               "random_init": random_init_anchor(run, data, timesteps, blocks, cfg)}
    return ProbeResult(top1=top1, timesteps=[int(t) for t in timesteps], blocks=list(blocks), settings=settings)


def default_out(run_dir: str | Path, dataset: str | None = None, checkpoint: int | str | None = None) -> Path:
    """``RUN/probe/<dataset kind>-<checkpoint>``, e.g. ``RUN/probe/cifar10-step-00002000``."""
    from genperc.inference import find_checkpoint

    return Path(run_dir) / "probe" / f"{(dataset or 'data').split(':')[0]}-{find_checkpoint(run_dir, checkpoint).name}"


def probe_run(run_dir: str | Path, dataset: str | None = None, *, timesteps: Sequence[int] | None = None,
              blocks: Sequence[str] | None = None, grid: bool = False, out: str | Path | None = None,
              config: ProbeConfig | None = None, weights: str = "ema", checkpoint: int | str | None = None,
              limit: int | None = None, progress: bool = False) -> ProbeResult:
    """``genperc probe``: load a run (EMA weights by default), read ``dataset`` (:func:`load_probe_data`),
    probe every (t, block) cell (:func:`probe_timesteps`, :func:`resolve_blocks`) and write
    ``probe.csv``, ``probe.json`` and ``probe.png`` into ``out`` when given."""
    cfg = config or ProbeConfig()
    run = load_run(run_dir, weights=weights, checkpoint=checkpoint)
    ts = probe_timesteps(run.model, run.schedule.num_train_timesteps, timesteps, grid)
    names = resolve_blocks(run.model, blocks)
    data = load_probe_data(run, dataset, limit=limit, seed=cfg.seed, progress=progress)
    result = linear_probe(run, data, ts, names, cfg, progress=progress)
    result.settings["grid"] = bool(grid)
    if out is not None:
        result.write(out)
    return result
