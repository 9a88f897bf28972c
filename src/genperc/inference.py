"""The light inference path: load a run directory, evaluate it on a split, predict on one image.

A run directory describes itself (DESIGN.md): ``RUN/config.yaml`` names the task, its options, the
image space, the text encoder and the sampler defaults, and ``RUN/checkpoints/step-*/{ema,model}``
hold the weights, so ``genperc eval RUN`` and ``genperc predict RUN --image x.png`` need nothing
else. Everything task-specific goes through the task codec (``request``, ``decode``, ``export``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from genperc import build, checkpoints
from genperc.config import RunConfig, load_config, load_run_config
from genperc.errors import UserError
from genperc.evaluation.baselines import DEFAULT_FIT_ITEMS

# Modes PIL reads that are not photographs: 16/32-bit single channel (depth maps, label maps).
REFUSED_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
MIN_SIDE = 8


@dataclass
class LoadedRun:
    cfg: RunConfig
    task: object
    model: torch.nn.Module
    schedule: object
    space: object
    text_encoder: object
    checkpoint: Path
    weights: str
    device: torch.device
    run_dir: Path

    @property
    def resolution(self) -> int:
        return int(self.cfg.data.resolution)

    @property
    def mode(self) -> str:
        """``model.mode`` of the run: "generative" (sampled) or "discriminative" (one forward)."""
        return self.cfg.model.mode


def find_checkpoint(run_dir: str | Path, checkpoint: int | str | Path | None = None) -> Path:
    """A run's checkpoint directory: the newest (None), the one written after ``checkpoint``
    optimizer steps (an int, or a string of digits), or a path (``step-00000250`` inside
    ``RUN/checkpoints``, or any checkpoint directory). A :class:`UserError` lists the run's steps.
    Only named, not read: :func:`load_run` reads and checks it."""
    if checkpoint is None:
        return build.latest_checkpoint(run_dir)  # checks the run directory and that it has checkpoints
    return checkpoints.resolve(run_dir, checkpoint)


def load_run(run_dir: str | Path, *, weights: str = "ema", device: str | torch.device | None = None,
             text_encoder=None, overrides: list[str] | None = None,
             checkpoint: int | str | Path | None = None) -> LoadedRun:
    """Build a run's task, space, text encoder and denoiser from its directory.

    ``weights``: "ema" (default; falls back to "model" when the run kept no EMA) or "model".
    ``overrides``: dotted config keys applied on top of the saved config (``sample.steps=50``,
    ``data.path=…``, ``task_options.threshold=40``); architecture keys are ignored by loading.
    ``checkpoint``: which of the run's checkpoints (:func:`find_checkpoint`); by default the newest
    intact one — a corrupt newer one (unreadable or non-finite weights) is skipped with a warning on
    stderr (:func:`genperc.checkpoints.choose`); a given one that is corrupt is a :class:`UserError`.
    The run's ``config.yaml`` describes it."""
    if weights not in ("ema", "model"):
        raise UserError(f"weights={weights!r} is not valid", "use ema or model")
    run_dir = Path(run_dir)
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ckpt, (model, weights) = checkpoints.choose(run_dir, lambda c: _read_denoiser(c, weights, device), checkpoint)
    cfg = load_run_config(run_dir)
    if overrides:
        cfg = load_config(base=cfg.to_dict(), overrides=list(overrides))
    task = build.build_task(cfg)
    space = build.build_space(cfg).to(device)
    if text_encoder is None:
        text_encoder = build.build_text_encoder(cfg, task)
    return LoadedRun(cfg=cfg, task=task, model=model, schedule=build.build_schedule(cfg), space=space,
                     text_encoder=text_encoder, checkpoint=ckpt, weights=weights, device=device, run_dir=run_dir)


def _read_denoiser(ckpt: Path, weights: str, device: torch.device):
    """(the checkpoint's denoiser in eval mode, the weights used): ``ckpt/weights`` ("ema" falls back
    to "model" when the run kept no EMA); :class:`CorruptCheckpoint` when it cannot be used."""
    from genperc.models.denoiser import Denoiser

    if weights == "ema" and not (ckpt / "ema").is_dir():
        weights = "model"
    try:
        model = Denoiser.from_pretrained(ckpt / weights, device=device).eval()
    except UserError as e:
        raise checkpoints.CorruptCheckpoint(e.problem) from None
    checkpoints.check_finite(model.state_dict().items(), f"{weights}/model.safetensors")
    return model, weights


def machine_info() -> dict:
    """The machine a number was measured on (recorded with every result)."""
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": cores, "torch_threads": torch.get_num_threads(), "gpu": gpu, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform()}


def machine_line() -> str:
    """The machine a table was measured on, in words (CPU model, cores, GPU, torch)."""
    m = machine_info()
    return f"{m['cpu']}, {m['cores']} cores, " + (f"GPU {m['gpu']}" if m["gpu"] else "no GPU") + f", torch {m['torch']}"


def sampling(run: LoadedRun, *, steps=None, sampler=None, spacing=None, eta=None, batch_size=None,
             text_scale=None, image_scale=None):
    """The sample settings and the noise schedule a sampler receives for this run: the run's
    ``sample`` section and ``diffusion.timestep_spacing``, each value given here in place of the
    run's (None = the run's). ``spacing`` (leading | trailing | linspace) gives a copy of the run's
    schedule (:meth:`NoiseSchedule.with_spacing`); the run's own schedule, and so training, keeps its
    spacing. η is DDIM's only: 0 for the other samplers unless given."""
    schedule = run.schedule.with_spacing(spacing)
    sc = run.cfg.sample
    changes = {k: v for k, v in dict(steps=steps, sampler=sampler, eta=eta, batch_size=batch_size,
                                      text_scale=text_scale, image_scale=image_scale).items() if v is not None}
    if changes.get("sampler", sc.sampler) != "ddim" and eta is None:
        changes["eta"] = 0.0
    return replace(sc, **changes), schedule


def correction_guidance(run: LoadedRun, negatives: list[list[str]], *, text_scale: float,
                        negative_scale: float, image_scale: float):
    """ADDP's correctional guidance (§3.3, Eq. 5) for a batch of B images of a text-and-image run:
    ``negatives[b]`` lists the negative descriptions D⁻ of image b (the same count K for every
    image; K > 1 composes as the mean, see :class:`~genperc.diffusion.guidance.CorrectionalGuidance`).
    ``text_scale`` = w_D, ``negative_scale`` = w_D⁻, ``image_scale`` = w_I."""
    from genperc.diffusion.conditioning import Conditioning
    from genperc.diffusion.guidance import CorrectionalGuidance

    task = run.task
    if not (task.uses_text and task.cond_channels) or run.text_encoder is None:
        raise UserError(f"correctional guidance needs a text- and image-conditioned run; {run.run_dir} "
                        f"({task.name}) is not", "use a referring run (InstructPix2Pix-style)")
    counts = {len(n) for n in negatives}
    if len(counts) != 1 or 0 in counts:
        raise UserError(f"every image needs the same number (≥ 1) of negative descriptions, got {sorted(counts)}",
                        "pass one D⁻ list per image, all of one length")
    terms = []
    for j in range(counts.pop()):
        text, mask = run.text_encoder.encode([n[j].strip() for n in negatives])
        terms.append(Conditioning(text=text.to(run.device), text_mask=mask.to(run.device)))
    return CorrectionalGuidance(image_scale=image_scale, negative_scale=negative_scale, text_scale=text_scale,
                                negative=tuple(terms))


def evaluate_run(run: LoadedRun, split: str = "val", *, steps=None, sampler=None, spacing=None, eta=None,
                 ensemble: int = 1, limit: int | None = None, seed: int = 0, batch_size=None, text_scale=None,
                 image_scale=None, out: str | Path | None = None, progress: bool = False, keep: int = 0,
                 resolution: str | None = None, baselines: bool = False,
                 baseline_fit_items: int = DEFAULT_FIT_ITEMS):
    """Evaluate a loaded run on a split of its data; write ``metrics.json`` and ``samples.csv``
    into ``out`` (when given). Returns the :class:`~genperc.evaluation.evaluate.EvalResult`.
    Sampling settings: see :func:`sampling`; every one is recorded in ``settings`` with the
    checkpoint and the weights. ``resolution``: "model" (default) or "ground-truth" (Marigold's
    protocol, depth only). ``baselines``: also score the task's trivial baselines
    (:mod:`genperc.evaluation.baselines`, fitted on up to ``baseline_fit_items`` items of the run's
    training split) on the same items, in ``result.baselines`` and ``metrics.json``'s ``"baselines"``."""
    from genperc.data.sources import open_scene_source
    from genperc.evaluation.evaluate import check_ensemble, check_resolution, evaluate

    check_ensemble(ensemble, run.mode)
    if resolution is not None:
        run.task.evaluation_resolution = check_resolution(resolution)
    sample_cfg, schedule = sampling(run, steps=steps, sampler=sampler, spacing=spacing, eta=eta,
                                    batch_size=batch_size, text_scale=text_scale, image_scale=image_scale)
    predictors = None
    if baselines:  # fitted first: building the training set adopts its settings, the eval set's win
        from genperc.evaluation.baselines import fit_baselines

        train_source = open_scene_source(run.cfg.data, run.cfg.data.train_split)
        predictors = fit_baselines(run.task, train_source, run.cfg.data.resolution, fit_items=baseline_fit_items)
    source = open_scene_source(run.cfg.data, split)
    dataset = run.task.dataset(source, run.cfg.data.resolution)
    t0 = time.perf_counter()
    res = evaluate(run.model, run.task, dataset, schedule=schedule, space=run.space,
                   text_encoder=run.text_encoder, sample_cfg=sample_cfg, device=run.device, seed=seed,
                   limit=limit, keep=keep, progress=progress, ensemble=ensemble, mode=run.mode)
    seconds = time.perf_counter() - t0
    res.settings.update({"split": split, "data": {"source": run.cfg.data.source, "path": run.cfg.data.path,
                                                  "resolution": run.cfg.data.resolution},
                         "checkpoint": str(run.checkpoint), "weights": run.weights, "seconds": round(seconds, 4)})
    if predictors is not None:
        from genperc.evaluation.baselines import score_baselines

        res.baselines = score_baselines(run.task, dataset, predictors, limit=limit,
                                        batch_size=sample_cfg.batch_size)
        res.settings["baselines"] = {"fit_split": run.cfg.data.train_split, "fit_items": baseline_fit_items,
                                     "predictors": {b.name: b.description for b in predictors}}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        payload = {"task": run.task.name, "main_metric": run.task.main_metric, "summary": res.summary,
                   "settings": res.settings, **({"baselines": res.baselines} if predictors is not None else {}),
                   "machine": machine_info(),
                   "when": time.strftime("%Y-%m-%d %H:%M:%S")}
        (out / "metrics.json").write_text(json.dumps(payload, indent=1, default=str))
        res.write_csv(out / "samples.csv")
    return res


# --------------------------------------------------------------------------- prediction


def load_image(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """An 8-bit RGB image as uint8 [H, W, 3] and notes on any conversion; a :class:`UserError` for
    a missing or unreadable file, a 16/32-bit single-channel image or one smaller than 8 px."""
    from genperc.images import image_to_rgb8, open_image

    path = Path(path)
    if not path.is_file():
        raise UserError(f"image not found: {path}", "pass the path of a PNG or JPEG file")
    img = open_image(path)  # pixel limit, corrupt files: one line naming the file
    notes = []
    if img.mode in REFUSED_MODES:
        raise UserError(f"{path} is a {img.mode} (16/32-bit single-channel) image, not a photograph",
                        "pass an 8-bit RGB image (a depth or label map cannot be the input)")
    if img.mode != "RGB":
        what = {"RGBA": "alpha channel dropped", "LA": "gray replicated, alpha dropped", "L": "gray replicated to RGB",
                "P": "palette expanded", "1": "bilevel expanded"}.get(img.mode, "converted")
        notes.append(f"image mode {img.mode} → RGB ({what})")
    w, h = img.size
    if min(w, h) < MIN_SIDE:
        raise UserError(f"{path} is {w}x{h} pixels, smaller than {MIN_SIDE} on a side", "pass a larger image")
    return image_to_rgb8(img, path, notes), notes


def prepare_image(image: np.ndarray, resolution: int) -> tuple[torch.Tensor, list[str]]:
    """uint8 [H, W, 3] → [1, 3, r, r] in [-1, 1], resized (stretched) to the model's resolution."""
    from genperc.data.transforms import plan_resize

    h, w = image.shape[:2]
    notes = []
    if (h, w) != (resolution, resolution):
        notes.append(f"image resized from {w}x{h} to the model's {resolution}x{resolution}"
                     + (" (aspect ratio not kept)" if h != w else "") + f"; predictions are resized back to {w}x{h}")
    return plan_resize((h, w), resolution, "stretch").image(image)[None], notes


@torch.no_grad()
def predict(run: LoadedRun, image: np.ndarray, prompt: str | None = None, *, seed: int = 0, steps=None,
            sampler=None, spacing=None, eta=None, ensemble: int = 1, text_scale=None, image_scale=None,
            negatives: list[str] | None = None, negative_scale: float = 1.0):
    """One image (uint8 [H, W, 3]) and prompt → (prediction, generated target [3, r, r], notes).
    Sampling settings: see :func:`sampling` (one image per sampler call, its ensemble members with it).
    ``negatives``: ADDP's correctional guidance (Eq. 5) away from these descriptions D⁻, with
    w_D = the text scale, w_I = the image scale and w_D⁻ = ``negative_scale``."""
    from genperc.evaluation.evaluate import decode_members, sample_targets

    x, notes = prepare_image(image, run.resolution)
    prompts = [prompt] if prompt is not None else None
    if not run.task.needs_prompt and prompt:
        notes.append(f"the {run.task.name} task takes no prompt; '{prompt}' ignored")
        prompts = None
    task_batch, batch = run.task.request(x, prompts)
    generator = torch.Generator().manual_seed(seed)
    sample_cfg, schedule = sampling(run, steps=steps, sampler=sampler, spacing=spacing, eta=eta, batch_size=1,
                                    text_scale=text_scale, image_scale=image_scale)
    guidance = None
    if negatives:
        guidance = correction_guidance(run, [list(negatives)] * ensemble, text_scale=sample_cfg.text_scale,
                                       negative_scale=negative_scale, image_scale=sample_cfg.image_scale)
    members = sample_targets(run.model, run.task, task_batch, schedule=schedule, space=run.space,
                             text_encoder=run.text_encoder, sample_cfg=sample_cfg, generator=generator,
                             device=run.device, ensemble=ensemble, mode=run.mode, guidance=guidance)
    pred = decode_members(run.task, members, batch, run.mode)
    return pred[0], members[0][0], notes


def predict_files(run: LoadedRun, image_path: str | Path, out: str | Path, prompt: str | None = None, *,
                  seed: int = 0, steps=None, sampler=None, spacing=None, eta=None, ensemble: int = 1,
                  stem: str = "prediction", text_scale=None, image_scale=None, negatives: list[str] | None = None,
                  negative_scale: float = 1.0) -> tuple[list[Path], list[str]]:
    """``genperc predict``: read the image, predict, write the task's files, the generated target
    image and ``<stem>.json`` (what was done: every sampling setting as used, the checkpoint and
    the weights, the correction when ``negatives`` are given) into ``out``. Returns (paths, notes)."""
    from genperc.evaluation.evaluate import check_ensemble, sample_settings
    from genperc.images import save_rgb, to_uint8, upscale

    options = dict(steps=steps, sampler=sampler, spacing=spacing, eta=eta, text_scale=text_scale,
                   image_scale=image_scale)
    sample_cfg, schedule = sampling(run, batch_size=1, **options)  # checks the settings before reading the image
    check_ensemble(ensemble, run.mode)
    negatives = [n.strip() for n in negatives or [] if n.strip()]
    if negatives and run.mode != "generative":
        raise UserError("--correct guides the denoising process; a discriminative run has none",
                        "use a generative referring run")
    if negatives:
        correction_guidance(run, [negatives], text_scale=1.0, negative_scale=1.0, image_scale=1.0)  # checks the run
    image, notes = load_image(image_path)
    pred, generated, more = predict(run, image, prompt, seed=seed, ensemble=ensemble, negatives=negatives,
                                    negative_scale=negative_scale, **options)
    notes += more
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = run.task.export(pred, out, image, stem=stem)
    paths.append(save_rgb(upscale(to_uint8(generated), 256), out / f"{stem}_generated.png"))
    info = {"image": str(image_path), "prompt": prompt, "task": run.task.name, "run": str(run.run_dir),
            "checkpoint": str(run.checkpoint), "weights": run.weights,
            **sample_settings(sample_cfg, schedule, ensemble, seed, run.mode), "files": [p.name for p in paths], "notes": notes}
    if negatives:
        info["correction"] = {"negatives": negatives, "w_d": sample_cfg.text_scale, "w_dminus": negative_scale,
                              "w_i": sample_cfg.image_scale, "guidance": "ADDP Eq. 5"}
    if isinstance(pred, dict) and "subtask" in pred:
        info["subtask"] = pred["subtask"]
    meta = out / f"{stem}.json"
    meta.write_text(json.dumps(info, indent=1))
    return [*paths, meta], notes
