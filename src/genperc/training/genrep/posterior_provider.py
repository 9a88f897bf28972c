"""Where the distillation target p(y|x) of a training step comes from (GenRep Eq. 1–3, Algorithm 1
Steps 1–3): a per-image cache of the chains' log-densities and/or the teacher's chains run on the
fly (:mod:`genperc.training.posterior` holds the chain itself)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch
from torch import Tensor

from genperc.diffusion.bayes import posterior_from_log_densities
from genperc.diffusion.schedule import NoiseSchedule
from genperc.training.posterior import PosteriorCache, PosteriorConfig, chain_log_densities, kept_states


@contextlib.contextmanager
def teacher_mode(model):
    """Run ``model`` as a posterior teacher: eval mode, restored on exit, and the tapped features of
    its last training forward (``last_features``, which REPA reads) left as they were — the chain's
    forwards (B·K rows, no gradient) must not replace them (the model may be its own teacher)."""
    was_training = getattr(model, "training", None)
    features = getattr(model, "last_features", None)
    if was_training is not None:
        model.eval()
    try:
        yield model
    finally:
        if was_training is not None:
            model.train(was_training)
        if features is not None:
            model.last_features = features


def build_posterior_cache(teacher, dataset, cfg: PosteriorConfig, schedule: NoiseSchedule, num_classes: int,
                          *, seed: int = 0, device="cpu", progress: bool = False) -> tuple[PosteriorCache, dict]:
    """Per-state log-densities of every image in ``dataset`` (or the seeded ``cfg.subset``).

    Returns the cache and a timing record (seconds, images, denoiser calls).
    """
    from torch.utils.data import DataLoader

    from genperc.data.datasets import collate

    chosen = _cached_subset(len(dataset), cfg.subset, seed)
    per_batch = max(1, cfg.batch_size // num_classes)
    loader = DataLoader(torch.utils.data.Subset(dataset, chosen.tolist()), batch_size=per_batch, shuffle=False,
                        collate_fn=collate)
    cache = PosteriorCache(len(dataset), num_classes, cfg.steps)
    chain_generator = torch.Generator().manual_seed(seed * 7919 + 3)
    batches = loader
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc="posterior cache", unit="batch")
    t0 = time.perf_counter()
    with teacher_mode(teacher):
        for batch in batches:
            log_densities, timesteps = chain_log_densities(
                teacher, batch["image"].to(device), torch.arange(num_classes), schedule=schedule, steps=cfg.steps,
                generator=chain_generator, density=cfg.density, batch_size=cfg.batch_size)
            cache.put(batch["index"], log_densities, 0, timesteps)
    seconds = time.perf_counter() - t0
    images = int(chosen.numel())
    return cache, {"seconds": seconds, "images": images, "denoiser_calls": images * num_classes * cfg.steps,
                   "seconds_per_image": seconds / max(1, images)}


def _cached_subset(n: int, subset: int, seed: int) -> Tensor:
    """The sorted dataset indices that get a cached posterior: all, or the first ``subset`` of a
    permutation seeded with ``seed``."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + 17))
    chosen = order[:subset] if 0 < subset < n else order
    return chosen.sort().values


def cache_labels(dataset, indices: Tensor) -> Tensor:
    """True labels of dataset items (for fitting the temperature)."""
    return torch.tensor([int(dataset[i]["label"]) for i in indices.tolist()], dtype=torch.long)


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
        """(log p(y|x) [B, K] float32, present [B] bool) for a batch of images (dataset ``indices``)."""
        step = self.step_fn()
        log_densities = torch.zeros(images.shape[0], self.num_classes, self.cfg.steps, dtype=torch.float64)
        present = torch.zeros(images.shape[0], dtype=torch.bool)
        if self.cache is not None and indices is not None:
            present, log_densities = self.cache.lookup(indices, step, self.max_age)
        if self.teacher is not None and not bool(present.all()):
            rows = self._rows_to_compute(present)
            new, timesteps = self._run_teacher(images[rows])
            log_densities[rows] = new
            present[rows] = True
            if self.cache is not None and indices is not None:
                self.cache.put(indices[rows.to(indices.device)].cpu(), new, step, timesteps)
        _, log_post = posterior_from_log_densities(log_densities, self.kept, self.temperature)
        return log_post.float(), present

    def _rows_to_compute(self, present: Tensor) -> Tensor:
        """The missing rows, or a seeded ``fraction`` of the batch drawn from them."""
        missing = (~present).nonzero().flatten()
        take = max(1, round(self.cfg.fraction * present.numel())) if self.cfg.fraction < 1 else missing.numel()
        if take < missing.numel():
            missing = missing[torch.randperm(missing.numel(), generator=self.generator)[:take]].sort().values
        return missing

    def _run_teacher(self, images: Tensor) -> tuple[Tensor, Tensor]:
        t0 = time.perf_counter()
        with teacher_mode(self.teacher):
            out = chain_log_densities(self.teacher, images, torch.arange(self.num_classes), schedule=self.schedule,
                                      steps=self.cfg.steps, generator=self.generator, density=self.cfg.density,
                                      batch_size=self.cfg.batch_size)
        self.compute_seconds += time.perf_counter() - t0
        self.computed_rows += int(images.shape[0])
        return out
