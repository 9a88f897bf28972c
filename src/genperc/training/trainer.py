"""The one training loop for every task (DESIGN.md), on Hugging Face Accelerate.

One step, for each of ``grad_accum`` micro-batches::

    batch → task.prepare → (x0, condition image, texts)      task codec
    x0, image → image space (pixels or VAE latents)
    texts → cached text encoder → Conditioning; IP2P dropout  dropout.conditioning_dropout
    t, w ~ timestep strategy                                 diffusion.timesteps (ADDP §3.1)
    x0' = task.augment(x0, t)                                task codec (ADDP §3.2)
    x_t = add_noise(x0', ε, t); out = model(x_t, t, cond)
    groups = {obj.group: obj(ctx)}                           objectives.DiffusionObjective, …
    (model.mode discriminative: no t / noise / dropout; the objective's own forward at t = T−1 on 0)
    combiner.backward(groups)                                combiners.SumCombiner, …

then clip, optimizer and LR-schedule step, EMA update, and each hook's ``after_step(trainer)``.

Strategy contracts (duck-typed):

* an **objective** is a callable ``objective(ctx) -> {name: loss}`` with an optional ``group``
  (default ``"generation"``: the losses of the diffusion output) and an optional ``uses_output``
  (default True). The trainer collects ``{group: {name: loss}}``; names are unique across groups
  (they are logged flat, e.g. ``metrics.csv`` columns). When no objective ``uses_output`` (GenRep's
  perception stage), the denoiser forward is skipped and ``ctx.output`` is None. When no objective
  ``uses_noise`` (default True; the discriminative counterpart, ``model.mode: discriminative``,
  runs its own deterministic forward), the trainer draws no timestep, noise or conditioning
  dropout and does no augmentation: ``ctx.x0/x_t/noise/t/weights/output`` are None and
  ``ctx.cond`` is ``ctx.clean_cond``. An objective with its own forward runs it under
  ``ctx.autocast()`` (the trainer's mixed precision) and reads the conditions before dropout from
  ``ctx.clean_cond``. Default objectives: :func:`objectives.default_objectives` (by ``model.mode``;
  DDAE++'s contrastive self-distillation with ``train.contrastive.enabled``). An objective's own random
  draws come from ``ctx.generator`` (the trainer's, saved in checkpoints).
* a **combiner** has ``backward(groups, accelerator, scale)``. A combiner that averages gradients
  over processes itself sets ``reduces_gradients = True``: the trainer then runs every micro-batch
  under ``accelerator.no_sync`` so that DDP does not reduce them a second time.
* a **hook** has ``after_step(trainer)``, called after every optimizer step (``trainer.step`` is
  already the number of finished steps), e.g. GenRep's EMA semantic network. An objective with an
  ``after_step`` is a hook too (DDAE++'s contrastive teacher).
* an objective or hook with ``save_state(checkpoint_dir)`` / ``load_state(checkpoint_dir)`` keeps
  state of its own in every checkpoint (written by the main process into the checkpoint's temp
  directory, read by every process on resume), e.g. the contrastive teacher.

Every random draw (data order, timesteps, noise, dropout) comes from generators owned by the
trainer and saved in checkpoints, so a resumed run continues bit for bit. Mixed precision, gradient
accumulation and multi-process DDP (``accelerate launch``) come from Accelerate. Checkpoints are
written atomically (temp dir, then rename); a non-finite loss stops training and leaves the last
good checkpoint in place.

What :meth:`Trainer.train` guarantees about its run directory (docs/guarantees.md):

* **one writer**: the main process holds the directory's lock (:mod:`genperc.runlock`) while it
  trains; a second trainer stops at once with one line naming the holder;
* **no clobbering**: a directory that already holds a run (``config.yaml`` or a checkpoint) is
  continued only with ``resume=True`` and replaced only with ``overwrite=True``
  (:meth:`Trainer.claim`); a trainer may continue its own run in memory;
* **validated resume**: the weight-shaping config keys (:data:`genperc.config.WEIGHT_KEYS`) must
  match the run's, and the checkpoint must read whole, before anything is written; the newest
  intact checkpoint is used, a corrupt newer one is skipped with a warning
  (:func:`genperc.checkpoints.choose`); ``config.yaml`` is written last, atomically;
* **exact resume**: a run killed at any point (``kill -9`` included) and resumed ends with the
  same weights, bit for bit on the CPU, as one never interrupted: every random draw comes from
  saved generators (the data loader's own generator included, so making a loader never draws from
  torch's global one), the text cache encodes at a fixed length (:class:`CachedTextEncoder`), the
  fp16 gradient scaler is saved; ``metrics.csv`` and TensorBoard drop the rows of steps after the
  checkpoint, so replayed steps appear once. Leftover temporary checkpoint folders of a killed run
  are removed when training starts. (Exactness on a GPU is as deterministic as its kernels; data
  workers, ``data.num_workers > 0``, restart their own RNG on resume.)
* **Ctrl-C** stops training with one line on stderr naming the last checkpoint, then re-raises
  ``KeyboardInterrupt``.

``GENPERC_FAULT_SLEEP_IN_SAVE=seconds[@step]`` (for fault-injection tests only) makes
:meth:`Trainer.save_checkpoint` (of that step only, when given) print ``[genperc] fault: in
save_checkpoint <temp folder>`` on stderr and sleep that long with the checkpoint half written
(weights written, ``optimizer.pt`` and ``state.json`` not yet), so a test can kill the process there.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from genperc import build, checkpoints, runlock, runtime
from genperc.config import WEIGHT_KEYS, RunConfig, check_same_run
from genperc.diffusion.conditioning import Conditioning
from genperc.diffusion.timesteps import build_timestep_sampler
from genperc.errors import UserError
from genperc.models.conditioning import make_conditioning, null_conditioning
from genperc.training.combiners import SumCombiner
from genperc.training.dropout import conditioning_dropout
from genperc.training.objectives import StepContext, default_objectives


class TrainingDiverged(UserError):
    """The loss became NaN or Inf; the run directory keeps its last good checkpoint."""


@dataclass
class TrainResult:
    step: int
    loss: float
    run_dir: Path
    images_per_s: float


class SeededBatchOrder:
    """An endless, seeded, resumable stream of index batches, sharded over processes.

    Epoch e is a permutation drawn from a generator seeded with (seed, e); the global stream is
    the concatenation of the epochs; micro-batch m of rank r takes the stream positions
    [(m·W + r)·B, (m·W + r + 1)·B). The position is a single integer, saved in checkpoints.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0):
        if n == 0:
            raise UserError("the training set is empty", "check data.source / data.path / data.train_split")
        self.n, self.bs, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.position = start  # next micro-batch of this rank
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g)}
        return self._perms[epoch]

    def __iter__(self):
        while True:
            start = (self.position * self.world + self.rank) * self.bs
            idx = [int(self._perm(k // self.n)[k % self.n]) for k in range(start, start + self.bs)]
            self.position += 1
            yield idx


class Trainer:
    """Train ``cfg`` into ``run_dir``; parts may be injected (tests, experiments)."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path, *, task=None, train_source=None, model=None,
                 text_encoder=None, objectives=None, combiner=None, hooks=None,
                 accelerator: Accelerator | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        tc = cfg.train
        self.accelerator = accelerator or make_accelerator(cfg)
        self.precision = self.accelerator.mixed_precision
        self.task = task or build.build_task(cfg)
        self.schedule = build.build_schedule(cfg)
        self.space = build.build_space(cfg).to(self.accelerator.device)
        self.text_encoder = text_encoder if text_encoder is not None else build.build_text_encoder(cfg, self.task)
        source = train_source if train_source is not None else _open_train_source(cfg)
        self.dataset = self.task.dataset(source, cfg.data.resolution)
        model = model or build.build_model(cfg, self.task, self.space, self.text_encoder)
        self.speed = runtime.speed_options(self.accelerator.device, self.precision)
        if self.speed.classic_attention:
            runtime.use_classic_attention(model)
        self.timesteps = build_timestep_sampler(tc, self.schedule)
        self.combiner = combiner or SumCombiner()

        self.optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay,
                                           fused=self.speed.fused_adamw or None)
        self.lr_scheduler = _lr_schedule(self.optimizer, tc)
        self.model, self.optimizer = self.accelerator.prepare(model, self.optimizer)
        self.ema = None
        if tc.ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.unwrapped.parameters(), decay=tc.ema_decay, foreach=True)
        self.objectives = objectives or default_objectives(cfg, self.task, self.unwrapped)
        hooks = list(hooks or [])
        self.hooks = hooks + [o for o in self.objectives if hasattr(o, "after_step") and all(o is not h for h in hooks)]
        self.step = 0
        self.generator = torch.Generator(device=self.accelerator.device)
        self.generator.manual_seed(tc.seed * 7919 + self.accelerator.process_index)
        self.data_position = 0  # micro-batches consumed by this rank (saved in checkpoints)
        self._null = None
        self._claimed = False  # train() wrote this run (a second train() continues it)

    # -- helpers --------------------------------------------------------------------------------

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def null_conditioning(self) -> Conditioning:
        """The null text (embedding of "") used by conditioning dropout."""
        if self._null is None:
            null = null_conditioning(self.text_encoder, self.accelerator.device)
            num_classes = getattr(getattr(self.unwrapped, "config", None), "num_classes", 0) or 0
            if num_classes:  # the null class is index num_classes (models.denoiser)
                null = null.replace(class_labels=torch.tensor([num_classes], device=self.accelerator.device))
            self._null = null
        return self._null

    def _loader(self) -> DataLoader:
        from genperc.data.datasets import collate

        order = SeededBatchOrder(len(self.dataset), self.cfg.train.batch_size, self.cfg.train.seed,
                                 self.accelerator.process_index, self.accelerator.num_processes,
                                 start=self.data_position)
        # its own generator: making the loader's iterator never draws from torch's global RNG, which a
        # resumed run has just restored (a draw there would shift every later global draw)
        return DataLoader(self.dataset, batch_sampler=order, collate_fn=collate,
                          num_workers=self.cfg.data.num_workers, persistent_workers=False,
                          generator=torch.Generator().manual_seed(self.cfg.train.seed))

    # -- one step -------------------------------------------------------------------------------

    def compute_loss_groups(self, batch: dict) -> dict[str, dict[str, torch.Tensor]]:
        """Losses of one micro-batch by group, ``{group: {name: loss}}`` (no backward)."""
        device = self.accelerator.device
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        task_batch = self.task.prepare(batch)
        b = task_batch.x0.shape[0]
        with torch.no_grad():
            clean_cond = make_conditioning(task_batch, self.text_encoder, self.space, device)
        cond, x0, x_t, noise, t, weights, out = clean_cond, None, None, None, None, None, None
        if any(getattr(objective, "uses_noise", True) for objective in self.objectives):
            t, weights = self.timesteps.sample(b, self.generator, device)
            with torch.no_grad():
                x0_pixels = task_batch.x0.to(device)
                augmented = self.task.augment(task_batch, t, self.generator)
                x0 = self.space.encode(x0_pixels)
                x0_aug = x0 if augmented is task_batch.x0 else self.space.encode(augmented.to(device))
            cond = conditioning_dropout(clean_cond, self.null_conditioning(), self.cfg.train.cond_dropout,
                                        self.generator)
            noise = torch.randn(x0.shape, generator=self.generator, device=self.generator.device).to(device)
            x_t = self.schedule.add_noise(x0_aug, noise, t)
            if any(getattr(objective, "uses_output", True) for objective in self.objectives):
                with self.accelerator.autocast():
                    out = self.model(x_t, t, cond)
        ctx = StepContext(output=out, x0=x0, x_t=x_t, noise=noise, t=t, weights=weights,
                          schedule=self.schedule, cond=cond, model=self.model, batch=task_batch,
                          clean_cond=clean_cond, space=self.space, autocast=self.accelerator.autocast,
                          generator=self.generator)
        groups: dict[str, dict[str, torch.Tensor]] = {}
        owner: dict[str, str] = {}
        for objective in self.objectives:
            group = getattr(objective, "group", "generation")
            for name, loss in objective(ctx).items():
                if name in owner:
                    raise ValueError(f"loss name {name!r} is returned twice (groups {owner[name]!r} and "
                                     f"{group!r}); loss names must be unique across groups")
                owner[name] = group
                groups.setdefault(group, {})[name] = loss
        return groups

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """Losses of one micro-batch by name, every group together (no backward)."""
        return _flat(self.compute_loss_groups(batch))

    def _check_finite(self, losses: dict[str, torch.Tensor]) -> None:
        bad = torch.tensor([0.0 if all(torch.isfinite(v).all() for v in losses.values()) else 1.0],
                           device=self.accelerator.device)
        if self.accelerator.reduce(bad, reduction="sum").item() > 0:
            last = _last_checkpoint_name(self.run_dir)
            names = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
            raise TrainingDiverged(
                f"loss is not finite at step {self.step + 1} ({names}); last good checkpoint: {last or 'none'}",
                "lower train.lr, keep train.max_grad_norm > 0, or resume with --resume after changing the config",
            )

    def _sync_context(self, last_micro_batch: bool):
        """DDP reduces gradients on the last micro-batch of a step only, and never for a combiner
        that reduces them itself (``reduces_gradients``)."""
        if last_micro_batch and not getattr(self.combiner, "reduces_gradients", False):
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self.model)

    def _agree(self, flag: bool) -> bool:
        """True on every rank when it is true on the main rank (ranks must stop together)."""
        if self.accelerator.num_processes == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(t, reduction="max").item() > 0)

    def _stateful(self) -> list:
        """Objectives and hooks that keep state in checkpoints (``save_state`` / ``load_state``), once each."""
        parts: list = []
        for part in [*self.objectives, *self.hooks]:
            if hasattr(part, "save_state") and not any(part is p for p in parts):
                parts.append(part)
        return parts

    # -- the loop -------------------------------------------------------------------------------

    def train(self, resume: bool = False, max_steps: int | None = None,
              time_limit_s: float | None = None, overwrite: bool = False) -> TrainResult:
        """Train to ``train.steps`` (or ``max_steps``); ``time_limit_s`` stops early with a checkpoint.

        ``resume``: continue from the run's newest intact checkpoint; ``overwrite``: replace the run
        the directory holds. Without either, a directory that holds a run is refused (:meth:`claim`).
        The run directory is locked while training (:mod:`genperc.runlock`); Ctrl-C prints the last
        checkpoint and re-raises ``KeyboardInterrupt``."""
        with self._run_lock():
            self.claim(resume=resume, overwrite=overwrite)
            try:
                return self._loop(max_steps, time_limit_s)
            except KeyboardInterrupt:
                if self.is_main:
                    last = _last_checkpoint_name(self.run_dir)
                    print(f"interrupted at step {self.step}; last checkpoint: "
                          + (f"{last} — continue with --resume" if last else "none — start over with --overwrite"),
                          file=sys.stderr, flush=True)
                raise

    def claim(self, resume: bool = False, overwrite: bool = False) -> None:
        """Make ``run_dir`` this trainer's run, changing nothing until every check has passed.

        A directory that holds a run (:func:`holds_run`) is refused unless ``resume`` (load the
        newest intact checkpoint, :meth:`load_checkpoint`) or ``overwrite`` (remove its checkpoints,
        metrics, TensorBoard log and config first; other folders, e.g. ``eval/``, are left) — or this
        trainer wrote it (a second ``train()`` continues in memory). Temporary folders of a killed
        run are removed; ``config.yaml`` is written last, atomically."""
        if not self._claimed:
            check_claim(self.run_dir, resume, overwrite)
        self.accelerator.wait_for_everyone()  # every rank has looked before the main one changes anything
        if self.is_main:
            clear_run(self.run_dir, everything=overwrite)
        self.accelerator.wait_for_everyone()
        if resume:
            if _last_checkpoint_name(self.run_dir) is None:
                raise UserError(f"no checkpoint in {self.run_dir / 'checkpoints'} to resume from",
                                "start the run over with --overwrite (overwrite=True)")
            self.load_checkpoint()
        if self.is_main:
            self.cfg.save(self.run_dir / "config.yaml")
        self.accelerator.wait_for_everyone()
        self._claimed = True

    @contextlib.contextmanager
    def _run_lock(self):
        """The run directory's lock, held by the main process; every rank stops when it is taken."""
        with contextlib.ExitStack() as stack:
            error = None
            if self.is_main:
                try:
                    stack.enter_context(runlock.locked(self.run_dir, "genperc train"))
                except runlock.RunLocked as e:
                    error = e
            if self._agree(error is not None):
                raise error or runlock.RunLocked(f"{self.run_dir} is in use", "see the main process's message")
            yield

    def _loop(self, max_steps: int | None, time_limit_s: float | None) -> TrainResult:
        tc = self.cfg.train
        total = tc.steps if max_steps is None else min(tc.steps, max_steps)
        logger = _Logger(self.run_dir, enabled=self.is_main, last_step=self.step)
        loader = iter(self._loader())
        per_step_images = tc.batch_size * tc.grad_accum * self.accelerator.num_processes
        if self.is_main and tc.progress:
            print(f"[genperc] training {self.run_dir}: steps {self.step}→{total}, precision {self.precision}, "
                  f"{torch.get_num_threads()} torch thread(s)" + (", classic attention" if self.speed.classic_attention
                                                                   else ""), file=sys.stderr, flush=True)
        bar = _progress(total, self.step, enabled=self.is_main and tc.progress)
        t_start, step_start, loss_value = time.perf_counter(), self.step, float("nan")
        self.model.train()
        while self.step < total:
            step_losses: dict[str, float] = {}
            for micro in range(tc.grad_accum):
                batch = next(loader)
                self.data_position += 1
                with self._sync_context(last_micro_batch=micro == tc.grad_accum - 1):
                    groups = self.compute_loss_groups(batch)
                    losses = _flat(groups)
                    self._check_finite(losses)
                    self.combiner.backward(groups, self.accelerator, scale=1.0 / tc.grad_accum)
                for k, v in losses.items():
                    step_losses[k] = step_losses.get(k, 0.0) + float(v.detach()) / tc.grad_accum
            if tc.max_grad_norm and tc.max_grad_norm > 0:
                self.accelerator.clip_grad_norm_(self.model.parameters(), tc.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.step(self.unwrapped.parameters())
            self.step += 1
            for hook in self.hooks:
                hook.after_step(self)
            loss_value = sum(step_losses.values())
            elapsed = time.perf_counter() - t_start
            ips = (self.step - step_start) * per_step_images / max(elapsed, 1e-9)
            if self.step % tc.log_every == 0 or self.step == total:
                logger.log(self.step, {"loss": loss_value, **step_losses, "lr": self.lr_scheduler.get_last_lr()[0],
                                       "images_per_s": ips})
            if bar is not None:
                bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{ips:.1f}", refresh=False)
                bar.update(1)
            out_of_time = time_limit_s is not None and self._agree(elapsed > time_limit_s)
            if self.step % tc.checkpoint_every == 0 or self.step == total or out_of_time:
                self.save_checkpoint()
            if out_of_time:
                break
        if bar is not None:
            bar.close()
        logger.close()
        elapsed = time.perf_counter() - t_start
        ips = (self.step - step_start) * per_step_images / max(elapsed, 1e-9)
        return TrainResult(step=self.step, loss=loss_value, run_dir=self.run_dir, images_per_s=ips)

    # -- checkpoints ----------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-XXXXXXXX`` atomically: a temp dir filled by every rank, then a rename."""
        acc = self.accelerator
        ckpt_root = self.run_dir / "checkpoints"
        name = f"step-{self.step:08d}"
        tmp = ckpt_root / f".tmp-{name}"
        if self.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        save_file({"generator": self.generator.get_state(), "torch": torch.get_rng_state()},
                  str(tmp / f"rng-rank{acc.process_index}.safetensors"))
        if self.is_main:
            model = self.unwrapped
            model.save_pretrained(tmp / "model")
            if self.ema is not None:
                self.ema.store(model.parameters())
                self.ema.copy_to(model.parameters())
                model.save_pretrained(tmp / "ema")
                self.ema.restore(model.parameters())
            _fault_pause(tmp, self.step)
            scaler = getattr(acc, "scaler", None)
            torch.save({"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(),
                        "ema_step": self.ema.optimization_step if self.ema is not None else 0,
                        "scaler": scaler.state_dict() if scaler is not None else None},
                       tmp / "optimizer.pt")
            for part in self._stateful():
                part.save_state(tmp)
            (tmp / "state.json").write_text(json.dumps(
                {"step": self.step, "data_position": self.data_position, "world_size": acc.num_processes}, indent=1))
            self.cfg.save(tmp / "config.yaml")
        acc.wait_for_everyone()
        final = ckpt_root / name
        if self.is_main:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in sorted(ckpt_root.glob("step-*"))[: -max(1, self.cfg.train.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, path: str | Path | None = None) -> Path:
        """Restore the trainer from ``path`` (a step or a folder) or the run's newest intact
        checkpoint (:func:`genperc.checkpoints.choose`): the run's weight-shaping config keys must be
        this config's, and every file is read and checked before anything is applied."""
        if (self.run_dir / "config.yaml").is_file():
            check_same_run(self.run_dir, self.cfg, "resume with the run's own model settings, or train into "
                           "another run directory", only=WEIGHT_KEYS)
        quiet = None if self.is_main else (lambda line: None)  # skipped checkpoints are told once
        ckpt, parts = checkpoints.choose(self.run_dir, self._read_checkpoint, path, warn=quiet)
        self.unwrapped.load_state_dict(parts["model"])
        opt = parts["optimizer"]
        self.optimizer.load_state_dict(opt["optimizer"])
        self.lr_scheduler.load_state_dict(opt["lr_scheduler"])
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and opt.get("scaler"):
            scaler.load_state_dict(opt["scaler"])
        if self.ema is not None:
            device = self.accelerator.device
            self.ema.shadow_params = [parts["ema"][name].to(device) for name, _ in self.unwrapped.named_parameters()]
            self.ema.optimization_step = opt["ema_step"]
        for part in self._stateful():
            part.load_state(ckpt)
        self.generator.set_state(parts["rng"]["generator"])
        torch.set_rng_state(parts["rng"]["torch"])
        self.step = parts["state"]["step"]
        self.data_position = parts["state"]["data_position"]
        return ckpt

    def _read_checkpoint(self, ckpt: Path) -> dict:
        """Every file of a checkpoint this trainer restores, read and checked, nothing applied
        (:class:`genperc.checkpoints.CorruptCheckpoint` when one cannot be used)."""
        state = checkpoints.read_state(ckpt)
        if state["world_size"] != self.accelerator.num_processes:
            raise UserError(f"checkpoint {ckpt} was written by {state['world_size']} processes, this run has "
                            f"{self.accelerator.num_processes}", "resume with the same --num_processes")
        parts = {"state": state}
        for sub in ("model", "ema") if self.ema is not None else ("model",):
            parts[sub] = checkpoints.read_tensors(ckpt / sub / "model.safetensors")
            checkpoints.check_fits(parts[sub], self.unwrapped, f"{sub}/model.safetensors")
        opt = checkpoints.read_torch(ckpt / "optimizer.pt", map_location=self.accelerator.device)
        if not isinstance(opt, dict) or not {"optimizer", "lr_scheduler", "ema_step"} <= set(opt):
            raise checkpoints.CorruptCheckpoint("optimizer.pt lacks the optimizer, lr_scheduler or ema_step")
        checkpoints.check_finite(((f"optimizer state {i}.{k}", v) for i, st in opt["optimizer"].get("state", {}).items()
                                  for k, v in st.items() if isinstance(v, torch.Tensor)), "optimizer.pt")
        parts["optimizer"] = opt
        parts["rng"] = checkpoints.read_tensors(ckpt / f"rng-rank{self.accelerator.process_index}.safetensors")
        if not {"generator", "torch"} <= set(parts["rng"]):
            raise checkpoints.CorruptCheckpoint(f"rng-rank{self.accelerator.process_index}.safetensors lacks a state")
        return parts


# ---------------------------------------------------------------------------------------------


def _open_train_source(cfg: RunConfig):
    from genperc.data.sources import open_scene_source

    return open_scene_source(cfg.data, cfg.data.train_split)


def make_accelerator(cfg: RunConfig) -> Accelerator:
    """The Accelerator of a run: ``train.mixed_precision`` (``auto`` resolved for the device by
    :func:`genperc.runtime.resolve_precision`); gloo DDP when several CPU processes run."""
    cpu = _multi_cpu()
    device = "cuda" if torch.cuda.is_available() and not cpu else "cpu"
    precision = runtime.resolve_precision(cfg.train.mixed_precision, device)
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, precision) and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # One process training runs of different precisions one after another (experiments, tests):
        # Accelerate's process-wide state refuses a second precision; a single process may reset it.
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=precision, cpu=cpu)


def _multi_cpu() -> bool:
    """Several processes (torchrun / ``accelerate launch --multi_gpu``) on a machine without CUDA:
    Accelerate then needs ``cpu=True`` to set up gloo DDP instead of one process per rank."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _lr_schedule(optimizer, tc):
    from diffusers.optimization import get_scheduler

    if tc.lr_schedule not in ("cosine", "constant"):
        raise UserError(f"train.lr_schedule={tc.lr_schedule!r} is not valid", "use cosine or constant")
    name = "cosine" if tc.lr_schedule == "cosine" else "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=tc.warmup_steps, num_training_steps=tc.steps)


def _last_checkpoint_name(run_dir: Path) -> str | None:
    try:
        return str(checkpoints.listing(run_dir)[0])
    except UserError:
        return None


def holds_run(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` already holds a run: its ``config.yaml`` or a published checkpoint."""
    run_dir = Path(run_dir)
    return (run_dir / "config.yaml").exists() or any((run_dir / "checkpoints").glob("step-*"))


def check_claim(run_dir: str | Path, resume: bool, overwrite: bool) -> None:
    """A :class:`UserError` when training into ``run_dir`` would clobber a run: it holds one and
    neither ``resume`` nor ``overwrite`` is given (or both are)."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other",
                        "pass --resume to continue the run or --overwrite to replace it")
    if not (resume or overwrite) and holds_run(run_dir):
        raise UserError(f"{run_dir} already holds a run", "pass --resume to continue it or --overwrite to replace it")


def clear_run(run_dir: Path, everything: bool = False) -> None:
    """Remove what a killed trainer leaves behind (temporary checkpoint folders and config files);
    ``everything``: also the run a trainer wrote (checkpoints, ``metrics.csv``, ``tb/``, ``config.yaml``)."""
    leftovers = [*(run_dir / "checkpoints").glob(".tmp-step-*"), *run_dir.glob(".config.yaml.tmp-*")]
    if everything:
        leftovers += [run_dir / name for name in ("checkpoints", "tb", "metrics.csv", "config.yaml")]
    for path in leftovers:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _fault_pause(where: Path, step: int) -> None:
    """``GENPERC_FAULT_SLEEP_IN_SAVE=seconds[@step]``: announce and sleep with a checkpoint half written
    (of that step only, when given), so that fault-injection tests can kill the process there
    (module docstring). Unset: nothing."""
    value = os.environ.get("GENPERC_FAULT_SLEEP_IN_SAVE")
    if not value:
        return
    seconds, _, at = value.partition("@")
    if not at or int(at) == step:
        print(f"[genperc] fault: in save_checkpoint {where}", file=sys.stderr, flush=True)
        time.sleep(float(seconds))


def _flat(groups: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: loss for losses in groups.values() for name, loss in losses.items()}


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    # In a log file (not a terminal) refresh rarely instead of writing a line per step.
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 30.0)


class _Logger:
    """CSV (``metrics.csv``) and TensorBoard (``tb/``) scalars, main process only.

    Rows of steps after ``last_step`` (the step training starts from) are dropped when it opens, so a
    resumed run's replayed steps appear once; TensorBoard purges them likewise (``purge_step``)."""

    def __init__(self, run_dir: Path, enabled: bool, last_step: int = 0):
        self.enabled = enabled
        self.path = run_dir / "metrics.csv"
        self._fields: list[str] | None = None
        self.tensorboard = None
        if not enabled:
            return
        if self.path.exists():
            self._fields = _truncate_metrics(self.path, last_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(run_dir / "tb"), purge_step=last_step + 1 if last_step else None)
        except ImportError:  # tensorboard is optional at run time
            self.tensorboard = None

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: (v if math.isfinite(v) else float("nan")) for k, v in values.items()}}
        new = self._fields is None
        if new:
            self._fields = list(row)
        with self.path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self._fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)
        if self.tensorboard is not None:
            for k, v in values.items():
                self.tensorboard.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def _truncate_metrics(path: Path, last_step: int) -> list[str] | None:
    """Keep the header and the rows of steps ≤ ``last_step`` (rewritten atomically); the header, or
    None when no row is left (the file is then removed)."""
    from genperc.atomic import atomic_write_text

    text = path.read_text()
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):  # a row half written when the process was killed
        lines.pop()
    rows = list(csv.reader(lines))
    kept = [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= last_step]
    if not rows or not kept:
        path.unlink()
        return None
    if len(kept) < len(rows) - 1 or len(lines) < len(text.splitlines()):
        buffer = io.StringIO()
        csv.writer(buffer).writerows([rows[0], *kept])
        atomic_write_text(path, buffer.getvalue())
    return rows[0]
