"""Evaluation of a GenRep unified model: perception, calibration, robustness, generation.

Perception (heads on the noise-free pass): top-1, NLL, expected calibration error (ECE, 15
equal-width bins, Guo et al. 2017) with a reliability diagram, and — for world scenes with dense
heads — mIoU and depth AbsRel / δ1. Robustness (GenRep Table 14): the same metrics on inputs
forward-noised to t ∈ ``noise_levels`` (x_t = √ᾱ_t·x + √(1 − ᾱ_t)·ε, seeded ε); the perception pass
then receives the true t (``robust_timestep: true``; ``zero`` keeps t = 0, i.e. the model is not
told the input is noisy).

Generation: ``samples_per_class`` DDPM samples per class (the model's learned variance, x_sem = x_t
as the paper does at inference), compared with the real images of the evaluation split by

* FID (Fréchet distance of Gaussian fits), and precision / recall (Kynkäänniemi et al. 2019,
  k-NN manifolds, k = ``pr_k``) **in the feature space of a small classifier trained on the same
  training data** (:class:`FeatureNet`, penultimate 128-d layer): there is no Inception network
  offline, and Inception features of 16–32 px digits or renders would say little anyway. The
  numbers are therefore comparable between runs of one data set here, not with published FIDs.
  ``feature_extractor: torchscript:PATH`` uses a local feature network instead — TorchScript (e.g.
  the StyleGAN2-ADA ``inception-2015-12-05.pt`` detector, called with ``return_features=True`` on
  uint8 images) or a ``torch.export`` program (``.pt2``) — if a user has one;
* class consistency: the feature classifier's top-1 on the samples against their conditioning
  class;
* a sample grid PNG (one row per class).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from genperc.config import GenRepEvalConfig
from genperc.diffusion.bayes import posterior_from_log_densities
from genperc.diffusion.conditioning import Conditioning
from genperc.errors import UserError
from genperc.metrics import expected_calibration_error, reliability_bins

# ---------------------------------------------------------------------------------------------
# perception


def _loader(dataset, batch_size: int) -> DataLoader:
    from genperc.data.datasets import collate

    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)


def _miou(conf: Tensor) -> float:
    inter = conf.diag().double()
    union = conf.sum(0).double() + conf.sum(1).double() - inter
    valid = union > 0
    return float((inter[valid] / union[valid]).mean()) if bool(valid.any()) else float("nan")


@torch.no_grad()
def perception_outputs(model, dataset, *, batch_size: int = 256, schedule=None, t_noise: int = 0,
                       robust_timestep: str = "true", generator: torch.Generator | None = None) -> dict:
    """Logits and labels over a dataset (and dense predictions / targets when present)."""
    model.eval()
    device = next(model.parameters()).device
    logits, labels = [], []
    seg_conf, depth_abs, depth_d1, depth_n = None, 0.0, 0.0, 0
    for batch in _loader(dataset, batch_size):
        x = batch["image"].to(device)
        t = 0
        if t_noise > 0:
            eps = torch.randn(x.shape, generator=generator).to(device)
            tt = torch.full((x.shape[0],), int(t_noise), dtype=torch.long)
            x = schedule.add_noise(x, eps, tt)
            t = int(t_noise) if robust_timestep == "true" else 0
        out = model.perceive(x, t=t if t else None)
        logits.append(out["logits"].float().cpu())
        labels.append(batch["label"].long())
        if "segmentation" in out and "semantic" in batch:
            k = out["segmentation"].shape[1]
            pred = out["segmentation"].argmax(1).cpu().reshape(-1)
            gt = batch["semantic"].long().reshape(-1)
            keep = (gt >= 0) & (gt < k)
            conf = torch.bincount(gt[keep] * k + pred[keep], minlength=k * k).view(k, k)
            seg_conf = conf if seg_conf is None else seg_conf + conf
        if "depth" in out and "depth" in batch:
            gt = batch["depth"].float()
            valid = batch.get("valid", gt > 0).bool() & (gt > 0)
            pred = out["depth"].float().cpu().clamp_min(1e-3)
            if bool(valid.any()):
                depth_abs += float(((pred - gt).abs() / gt)[valid].sum())
                ratio = torch.maximum(pred / gt.clamp_min(1e-3), gt / pred)
                depth_d1 += float((ratio[valid] < 1.25).float().sum())
                depth_n += int(valid.sum())
    out = {"logits": torch.cat(logits), "labels": torch.cat(labels)}
    if seg_conf is not None:
        out["miou"] = _miou(seg_conf)
    if depth_n:
        out["absrel"] = depth_abs / depth_n
        out["delta1"] = depth_d1 / depth_n
    return out


def classification_summary(logits: Tensor, labels: Tensor, bins: int = 15) -> dict[str, float]:
    logp = torch.log_softmax(logits.float(), -1)
    conf, pred = logp.exp().max(-1)
    correct = (pred == labels).float()
    return {"top1": float(correct.mean()), "nll": float(-logp.gather(-1, labels[:, None]).mean()),
            "ece": expected_calibration_error(conf, correct, bins), "confidence": float(conf.mean())}


def reliability_diagram(logits: Tensor, labels: Tensor, path, title: str = "", bins: int = 15) -> Path:
    """Bar chart of accuracy per confidence bin against the diagonal (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prob = logits.float().softmax(-1)
    conf, pred = prob.max(-1)
    correct = (pred == labels).float()
    rb = reliability_bins(conf, correct, bins)
    fig, ax = plt.subplots(figsize=(3.6, 3.6), dpi=110)
    centres = [(lo + hi) / 2 for lo, hi in zip(rb["lower"], rb["upper"], strict=True)]
    acc = [0 if math.isnan(a) else a for a in rb["accuracy"]]
    ax.bar(centres, acc, width=1 / bins, edgecolor="black", color="#4c72b0", label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ece = expected_calibration_error(conf, correct, bins)
    ax.set_title(f"{title} ECE={ece:.3f}".strip(), fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left")
    from genperc.images import save_figure

    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# the feature network for FID / precision / recall


class FeatureNet(nn.Module):
    """A small CNN classifier; its penultimate 128-d layer is the feature space of FID/PR here."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * w), nn.SiLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.GroupNorm(8, 4 * w), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4 * w, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


def train_feature_net(dataset, num_classes: int, *, epochs: int = 8, batch_size: int = 64, lr: float = 2e-3,
                      seed: int = 0, device="cpu") -> FeatureNet:
    """Train :class:`FeatureNet` on ``dataset`` (seeded, deterministic order per epoch)."""
    from genperc.data.datasets import collate

    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FeatureNet(num_classes).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    n = len(dataset)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g).tolist()
        for s in range(0, n, batch_size):
            batch = collate([dataset[i] for i in perm[s:s + batch_size]])
            x, y = batch["image"].to(device), batch["label"].long().to(device)
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval()


def cached_feature_net(path, dataset, num_classes: int, seed: int = 0) -> FeatureNet:
    """The :class:`FeatureNet` saved at ``path`` (safetensors), else trained on ``dataset`` and saved
    there: an experiment's generation metrics share one feature space across its runs."""
    from safetensors.torch import load_file, save_file

    path = Path(path)
    if path.is_file():
        net = FeatureNet(num_classes)
        net.load_state_dict(load_file(str(path)))
        return net.eval()
    net = train_feature_net(dataset, num_classes, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # processes sharing an experiment may race here
    save_file(net.state_dict(), str(tmp))
    os.replace(tmp, path)
    return net


class FeatureExtractor:
    """Images in [−1, 1] → features: a :class:`FeatureNet` or a local TorchScript network."""

    def __init__(self, net: nn.Module | None = None, torchscript: str | None = None):
        if (net is None) == (torchscript is None):
            raise UserError("FeatureExtractor needs a FeatureNet or a TorchScript path", "pass exactly one")
        self.net = net
        self.script = None
        if torchscript is not None:
            path = Path(torchscript)
            if not path.is_file():
                raise UserError(f"feature network not found: {path}", "pass a local TorchScript .pt file")
            if path.suffix == ".pt2":  # a torch.export program
                self.script = torch.export.load(str(path)).module()
            else:  # TorchScript (e.g. StyleGAN2-ADA's inception-2015-12-05.pt)
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    self.script = torch.jit.load(str(path), map_location="cpu").eval()

    @torch.no_grad()
    def __call__(self, images: Tensor, batch_size: int = 256) -> Tensor:
        feats = []
        for s in range(0, images.shape[0], batch_size):
            x = images[s:s + batch_size]
            if self.script is not None:
                u8 = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
                try:
                    f = self.script(u8, return_features=True)
                except (RuntimeError, TypeError):
                    f = self.script(u8)
            else:
                dev = next(self.net.parameters()).device
                f = self.net.features(x.to(dev))
            feats.append(f.float().cpu().reshape(f.shape[0], -1))
        return torch.cat(feats)

    @torch.no_grad()
    def classify(self, images: Tensor) -> Tensor | None:
        if self.net is None:
            return None
        dev = next(self.net.parameters()).device
        return torch.cat([self.net(images[s:s + 256].to(dev)).argmax(-1).cpu() for s in range(0, len(images), 256)])


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2(Σ_a Σ_b)^½) of Gaussian fits to two feature sets."""
    from scipy import linalg

    a64, b64 = a.double().numpy(), b.double().numpy()
    mu_a, mu_b = a64.mean(0), b64.mean(0)
    sa, sb = np.cov(a64, rowvar=False), np.cov(b64, rowvar=False)
    covmean = linalg.sqrtm(sa @ sb)
    if not np.isfinite(covmean).all():
        eps = np.eye(sa.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sa + eps) @ (sb + eps))
    covmean = np.real(covmean)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * np.trace(covmean))


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision / recall (Kynkäänniemi et al. 2019): the share of fake samples inside the
    union of real k-NN balls, and of real samples inside the fake ones."""

    def radii(x: Tensor) -> Tensor:
        d = torch.cdist(x.double(), x.double())
        return d.kthvalue(k + 1, dim=1).values  # the k-th neighbour, skipping the point itself

    def inside(points: Tensor, ref: Tensor, r: Tensor) -> float:
        d = torch.cdist(points.double(), ref.double())
        return float((d <= r[None, :]).any(1).float().mean())

    r_real, r_fake = radii(real), radii(fake)
    return inside(fake, real, r_real), inside(real, fake, r_fake)


# ---------------------------------------------------------------------------------------------
# generation


@torch.no_grad()
def generate(model, num_classes: int, per_class: int, *, schedule, steps: int = 50,
             generator: torch.Generator, batch_size: int = 256, size: int | None = None) -> tuple[Tensor, Tensor]:
    """``per_class`` DDPM samples of every class (labels in class order), in [−1, 1]."""
    from genperc.diffusion.sampler import sample

    model.eval()
    cfg = model.config
    size = size or cfg.sample_size
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    out = []
    for s in range(0, labels.numel(), batch_size):
        lab = labels[s:s + batch_size]
        res = sample(model, (lab.numel(), cfg.in_channels, size, size), Conditioning(class_labels=lab),
                     schedule=schedule, sampler="ddpm", num_steps=steps, generator=generator)
        out.append(res.sample.clamp(-1, 1).cpu())
    return torch.cat(out), labels


def sample_grid(images: Tensor, labels: Tensor, per_row: int, path, names: list[str] | None = None) -> Path:
    """A PNG with one row per class (the first ``per_row`` samples of each)."""
    from PIL import Image

    rows = []
    for c in labels.unique(sorted=True).tolist():
        imgs = images[labels == c][:per_row]
        if imgs.shape[0] < per_row:
            imgs = torch.cat([imgs, -torch.ones(per_row - imgs.shape[0], *imgs.shape[1:])])
        rows.append(torch.cat(list(imgs), dim=2))
    grid = torch.cat(rows, dim=1)
    arr = ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    img = Image.fromarray(arr)
    scale = max(1, 48 // images.shape[-1])
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def real_images(dataset, limit: int | None = None) -> tuple[Tensor, Tensor]:
    xs, ys = [], []
    for batch in _loader(dataset, 256):
        xs.append(batch["image"])
        ys.append(batch["label"].long())
    x, y = torch.cat(xs), torch.cat(ys)
    return (x, y) if limit is None else (x[:limit], y[:limit])


def generation_metrics(model, eval_dataset, extractor: FeatureExtractor, num_classes: int, *, schedule,
                       cfg: GenRepEvalConfig, out_dir=None, names=None) -> dict:
    """FID / precision / recall / class consistency of fresh samples vs the evaluation split."""
    g = torch.Generator().manual_seed(cfg.seed * 101 + 1)
    fake, lab = generate(model, num_classes, cfg.samples_per_class, schedule=schedule, steps=cfg.sample_steps,
                         generator=g, batch_size=cfg.batch_size)
    real, _ = real_images(eval_dataset)
    fr, ff = extractor(real), extractor(fake)
    p, r = precision_recall(fr, ff, cfg.pr_k)
    out = {"fid": frechet_distance(fr, ff), "precision": p, "recall": r, "samples": int(fake.shape[0])}
    pred = extractor.classify(fake)
    if pred is not None:
        out["class_consistency"] = float((pred == lab).float().mean())
    if out_dir is not None:
        out["grid"] = str(sample_grid(fake, lab, cfg.grid_per_class, Path(out_dir) / "samples.png", names))
    return out


def evaluate_genrep(model, eval_dataset, *, schedule, num_classes: int, cfg: GenRepEvalConfig | None = None,
                    extractor: FeatureExtractor | None = None, out_dir=None, names=None) -> dict:
    """Every GenRep metric of ``model`` on ``eval_dataset`` (module docstring)."""
    cfg = cfg or GenRepEvalConfig()
    g = torch.Generator().manual_seed(cfg.seed)
    res: dict = {}
    clean = perception_outputs(model, eval_dataset, batch_size=cfg.batch_size)
    res.update(classification_summary(clean["logits"], clean["labels"]))
    for k in ("miou", "absrel", "delta1"):
        if k in clean:
            res[k] = clean[k]
    if out_dir is not None:
        res["reliability"] = str(reliability_diagram(clean["logits"], clean["labels"],
                                                     Path(out_dir) / "reliability.png"))
    for t in cfg.noise_levels:
        noisy = perception_outputs(model, eval_dataset, batch_size=cfg.batch_size, schedule=schedule, t_noise=t,
                                   robust_timestep=cfg.robust_timestep, generator=g)
        res[f"top1_t{t}"] = classification_summary(noisy["logits"], noisy["labels"])["top1"]
    if cfg.generation and extractor is not None:
        res.update(generation_metrics(model, eval_dataset, extractor, num_classes, schedule=schedule, cfg=cfg,
                                      out_dir=out_dir, names=names))
    return res


def teacher_accuracy(log_densities: Tensor, labels: Tensor, kept: Tensor, temperature: float) -> dict:
    """Top-1 / ECE of the generative posterior itself (the distillation target)."""
    _, log_post = posterior_from_log_densities(log_densities, kept, temperature)
    return classification_summary(log_post.float(), labels)
