"""A correction session: the denoising process as an interactive interface (ADDP §3.3, Fig. 1c).

One loaded referring run and one image. :meth:`CorrectionSession.predict` segments an expression D
and streams every denoising step (x̂0, its decoded mask, the timestep) to a callback;
:meth:`CorrectionSession.correct` re-runs the same image with correctional guidance (Eq. 5) away
from one or several negative descriptions D⁻ — typed, or found by clicking the wrongly chosen object
(:meth:`CorrectionSession.describe_click`); :meth:`CorrectionSession.correct_each` runs k
corrections, one D⁻ each, in one batched sampler call (the agent's step, Fig. 5). Every round is
kept in a history (undo, JSON export) with its IoU when the ground truth is known.

Nothing here re-implements the denoising loop: every round goes through
:func:`genperc.evaluation.evaluate.sample_targets` and so through the one sampler, with the
run's own sampler settings; only the guidance differs (:func:`genperc.inference.correction_guidance`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np
import torch

from genperc.atomic import atomic_write_text
from genperc.errors import UserError
from genperc.inference import LoadedRun, correction_guidance, prepare_image, sampling

KINDS = ("predict", "correct", "agent")


@dataclass
class StepView:
    """One streamed denoising step of member ``member`` (0 = noisiest step first)."""

    index: int
    num_steps: int
    timestep: int
    x0_image: np.ndarray  # uint8 [r, r, 3]: x̂0 at this step, the generated target image
    mask: np.ndarray  # bool [r, r]: the task's decoding of x̂0 at this step (model resolution)
    member: int = 0


def encode_mask(mask: np.ndarray) -> dict:
    """A bool mask as JSON: its shape, pixel count and run lengths (row-major, first run = False)."""
    flat = np.asarray(mask, dtype=bool).ravel()
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0, *runs]
    return {"shape": list(mask.shape), "pixels": int(flat.sum()), "runs": runs}


def decode_mask(data: dict) -> np.ndarray:
    """The inverse of :func:`encode_mask`."""
    values = np.concatenate([np.full(n, i % 2 == 1) for i, n in enumerate(data["runs"])]) if data["runs"] else []
    return np.asarray(values, dtype=bool).reshape(data["shape"])


@dataclass
class Round:
    """One round of the session: a prediction, a correction or the agent's workflow."""

    kind: str
    expression: str
    negatives: list[str]
    weights: dict  # {"w_d", "w_dminus", "w_i"}: text, negative and image scales of Eq. 5
    seed: int
    mask: np.ndarray  # bool [H, W] at the input image's size
    generated: np.ndarray  # uint8 [r, r, 3]: the final generated target image
    iou: float | None
    seconds: float
    denoiser_calls: int  # network evaluations per image: steps × guidance branches
    agent: dict | None = None

    def to_dict(self) -> dict:
        """JSON-safe: the mask run-length encoded, the generated image left out."""
        d = {k: v for k, v in asdict(self).items() if k not in ("mask", "generated")}
        d["mask"] = encode_mask(self.mask)
        return d


class _CountingModel:
    """The denoiser, counting the items it evaluates (so cost is measured, not assumed)."""

    def __init__(self, model):
        self.model, self.items = model, 0

    def __call__(self, x, t, cond):
        self.items += int(x.shape[0])
        return self.model(x, t, cond)

    def __getattr__(self, name):
        return getattr(self.model, name)


@dataclass
class CorrectionSession:
    """A referring run and one image (uint8 [H, W, 3]); see the module docstring.

    ``scene``: the image's annotation (instances and objects) when it is a dataset scene, for
    click-to-describe; ``target_mask``: bool [H, W] ground truth, for the IoU of every round;
    ``steps`` / ``sampler``: in place of the run's sample settings.
    Default weights: w_D = the run's ``sample.text_scale``, w_I = its ``sample.image_scale``,
    w_D⁻ = 1 (InstructPix2Pix guidance when D⁻ = φ_D)."""

    run: LoadedRun
    image: np.ndarray
    scene: object | None = None
    target_mask: np.ndarray | None = None
    steps: int | None = None
    sampler: str | None = None
    history: list[Round] = field(default_factory=list)

    def __post_init__(self):
        if self.run.task.name != "referring":
            raise UserError(f"correction needs a referring run, {self.run.run_dir} is a {self.run.task.name} run",
                            "load a run trained with task=referring")
        if self.run.mode != "generative":
            raise UserError(f"{self.run.run_dir} is a discriminative run: one forward pass, no denoising to guide",
                            "load a generative referring run (model.mode=generative)")
        image = np.asarray(self.image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise UserError(f"the session image must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)}",
                            "load it with genperc.inference.load_image")
        self.image = image
        if self.target_mask is not None and np.asarray(self.target_mask).shape != image.shape[:2]:
            raise UserError(f"target_mask is {list(np.shape(self.target_mask))}, the image {list(image.shape[:2])}",
                            "pass the ground-truth mask at the image's size")
        self.x, self.notes = prepare_image(image, self.run.resolution)
        self.sample_cfg, self.schedule = sampling(self.run, steps=self.steps, sampler=self.sampler, batch_size=1)

    # ------------------------------------------------------------------ rounds

    @property
    def last(self) -> Round | None:
        return self.history[-1] if self.history else None

    def default_weights(self, w_d=None, w_dminus=None, w_i=None) -> dict:
        return {"w_d": float(self.sample_cfg.text_scale if w_d is None else w_d),
                "w_dminus": float(1.0 if w_dminus is None else w_dminus),
                "w_i": float(self.sample_cfg.image_scale if w_i is None else w_i)}

    def predict(self, expression: str, *, seed: int = 0, callback: Callable[[StepView], None] | None = None) -> Round:
        """Segment ``expression`` with the run's own guidance (InstructPix2Pix, s_T = w_D, s_I = w_I)."""
        weights = self.default_weights()
        masks, generated, seconds, calls = self._sample([expression], None, weights, seed, callback)
        return self._record("predict", expression, [], weights, seed, masks[0], generated[0], seconds, calls)

    def correct(self, negatives: str | list[str], *, expression: str | None = None, w_d=None, w_dminus=None,
                w_i=None, seed: int | None = None, callback: Callable[[StepView], None] | None = None) -> Round:
        """The next round with Eq. 5 away from ``negatives`` (several: their mean, see
        :class:`~genperc.diffusion.guidance.CorrectionalGuidance`). The expression and seed default
        to the last round's, so a correction changes nothing but the guidance."""
        negatives = _negatives(negatives)
        expression, seed = self._defaults(expression, seed)
        weights = self.default_weights(w_d, w_dminus, w_i)
        masks, generated, seconds, calls = self._sample([expression], [negatives], weights, seed, callback)
        return self._record("correct", expression, negatives, weights, seed, masks[0], generated[0], seconds, calls)

    def correct_each(self, negatives: list[str], *, expression: str | None = None, w_d=None, w_dminus=None,
                     w_i=None, seed: int | None = None, callback: Callable[[StepView], None] | None = None,
                     ) -> tuple[list[np.ndarray], dict]:
        """k corrections of one image, member j guided away from ``negatives[j]`` alone, in ONE
        batched sampler call (each member its own noise from ``seed``). Not added to the history.
        Returns (k bool masks [H, W], {"seconds", "denoiser_calls" per image, "weights", "seed"})."""
        negatives = _negatives(negatives)
        expression, seed = self._defaults(expression, seed)
        weights = self.default_weights(w_d, w_dminus, w_i)
        masks, _, seconds, calls = self._sample([expression] * len(negatives), [[n] for n in negatives], weights,
                                                seed, callback)
        return masks, {"seconds": seconds, "denoiser_calls": calls, "weights": weights, "seed": seed}

    def predict_each(self, k: int, *, expression: str | None = None, w_d=None, w_i=None, seed: int | None = None,
                     ) -> tuple[list[np.ndarray], dict]:
        """k uncorrected samples of one image in one batched call, drawn exactly as
        :meth:`correct_each` draws its members — the anchor an agent's vote is measured against
        (the same vote without correction). Not added to the history."""
        if k < 1:
            raise UserError(f"k={k} samples", "ask for at least one")
        expression, seed = self._defaults(expression, seed)
        weights = self.default_weights(w_d, None, w_i)
        masks, _, seconds, calls = self._sample([expression] * k, None, weights, seed, None)
        return masks, {"seconds": seconds, "denoiser_calls": calls, "weights": weights, "seed": seed}

    def add_round(self, round: Round) -> Round:
        if round.kind not in KINDS:
            raise ValueError(f"round kind {round.kind!r} not in {KINDS}")
        self.history.append(round)
        return round

    def undo(self) -> Round | None:
        """Drop the last round and return it (None when the history is empty)."""
        return self.history.pop() if self.history else None

    def iou(self, mask: np.ndarray) -> float | None:
        """IoU with the ground truth (None when unknown; 1 when both are empty)."""
        if self.target_mask is None:
            return None
        t, m = np.asarray(self.target_mask, dtype=bool), np.asarray(mask, dtype=bool)
        union = np.logical_or(t, m).sum()
        return 1.0 if union == 0 else float(np.logical_and(t, m).sum() / union)

    def export(self, path: str | Path) -> Path:
        """The history as JSON (rounds in order, masks run-length encoded) plus what produced it."""
        payload = {"run": str(self.run.run_dir), "checkpoint": str(self.run.checkpoint), "weights": self.run.weights,
                   "image_size": list(self.image.shape[:2]), "sampler": self.sample_cfg.sampler,
                   "steps": self.sample_cfg.steps, "notes": self.notes,
                   "rounds": [r.to_dict() for r in self.history]}
        path = Path(path)
        atomic_write_text(path, json.dumps(payload, indent=1))
        return path

    # ------------------------------------------------------------------ clicks

    def describe_click(self, x: int, y: int) -> str | None:
        """The shortest unique description of the instance at image pixel (x, y), or None on the
        background. Needs ``scene`` with instances at the image's size (a world scene, or any
        source with instance annotations)."""
        if self.scene is None or getattr(self.scene, "instances", None) is None:
            raise UserError("this image has no instance annotation to resolve a click",
                            "pick a dataset scene, or type the description of the object")
        inst = self.scene.instances
        h, w = inst.shape
        if not (0 <= x < w and 0 <= y < h):
            raise UserError(f"click ({x}, {y}) is outside the {w}x{h} image", "click on the image")
        oid = int(inst[int(y), int(x)])
        if oid == 0:
            return None
        return unique_description(self.scene, oid)

    # ------------------------------------------------------------------ internals

    def _defaults(self, expression, seed) -> tuple[str, int]:
        if expression is None:
            if self.last is None:
                raise UserError("nothing to correct yet", "predict an expression first, or pass expression=")
            expression = self.last.expression
        return expression, (self.last.seed if seed is None and self.last is not None else int(seed or 0))

    def _record(self, kind, expression, negatives, weights, seed, mask, generated, seconds, calls) -> Round:
        return self.add_round(Round(kind=kind, expression=expression, negatives=list(negatives), weights=weights,
                                    seed=int(seed), mask=mask, generated=generated, iou=self.iou(mask),
                                    seconds=seconds, denoiser_calls=calls))

    @torch.no_grad()
    def _sample(self, expressions: list[str], negatives: list[list[str]] | None, weights: dict, seed: int,
                callback) -> tuple[list[np.ndarray], list[np.ndarray], float, int]:
        from genperc.evaluation.evaluate import sample_targets
        from genperc.images import resize_mask, to_uint8

        run, task = self.run, self.run.task
        expressions = [e.strip() for e in expressions]
        x = self.x.expand(len(expressions), -1, -1, -1)
        task_batch, batch = task.request(x, expressions)
        guidance = None
        if negatives is not None:
            guidance = correction_guidance(run, negatives, text_scale=weights["w_d"],
                                           negative_scale=weights["w_dminus"], image_scale=weights["w_i"])
        else:
            from genperc.evaluation.evaluate import make_guidance

            guidance = make_guidance(task, weights["w_d"], weights["w_i"])
        model = _CountingModel(run.model)
        step_callback = None
        if callback is not None:
            num_steps = self.sample_cfg.steps

            def step_callback(step):
                x0 = run.space.decode(step.pred_x0[:1], clamp=False).float().cpu().clamp(-1, 1)
                callback(StepView(index=step.index, num_steps=num_steps, timestep=int(step.timestep),
                                  x0_image=to_uint8(x0[0]), mask=task.decode(x0, batch)[0, 0].numpy()))

        t0 = time.perf_counter()
        members = sample_targets(model, task, task_batch, schedule=self.schedule, space=run.space,
                                 text_encoder=run.text_encoder, sample_cfg=self.sample_cfg,
                                 generator=torch.Generator().manual_seed(int(seed)), device=run.device,
                                 guidance=guidance, callback=step_callback)
        seconds = time.perf_counter() - t0
        pred = task.decode(members[0], batch)
        hw = self.image.shape[:2]
        masks = [resize_mask(p.reshape(p.shape[-2:]), hw).numpy().astype(bool) for p in pred]
        generated = [to_uint8(m) for m in members[0]]
        return masks, generated, round(seconds, 4), model.items // len(expressions)


def _negatives(negatives: str | list[str]) -> list[str]:
    """D⁻ as a list of non-empty phrases; a string may hold several, comma-separated."""
    if isinstance(negatives, str):
        negatives = negatives.split(",")
    out = [n.strip() for n in negatives if n and n.strip()]
    if not out:
        raise UserError("a correction needs at least one negative description D⁻",
                        'pass e.g. "the red cube" (several: comma-separated)')
    return out


# ---------------------------------------------------------------------- click → description

_ATTRIBUTE_KEYS = {"size": ("size",), "color": ("color", "colour"), "material": ("material",)}
_ORDER = ("size", "color", "material", "shape")


def _attributes(obj) -> dict:
    """size / color / material / shape of an :class:`~genperc.data.record.ObjectAnn`, where known."""
    out = {}
    for name, keys in _ATTRIBUTE_KEYS.items():
        for k in keys:
            if obj.attributes.get(k) is not None:
                out[name] = str(obj.attributes[k])
                break
    out["shape"] = str(obj.category)
    return out


def _phrase(values: dict) -> str:
    words = [values[a] for a in ("size", "color", "material") if a in values]
    return " ".join(words + [values.get("shape", "object")])


def unique_description(scene, object_id: int) -> str:
    """The shortest description that singles out ``object_id`` among the scene's objects: the fewest
    of size / colour / material / shape that no other object shares (the world's "attribute"
    family, :mod:`genperc.data.world.expressions`); among equally short ones those that name the
    shape first, then canonical attribute order ("the small cube" before "the small metal object"); when
    every attribute is shared (two identical objects), the full description with its rank from the
    left, by the mean column of the instance masks ("the second red cube from the left")."""
    objects = {o.id: _attributes(o) for o in scene.objects}
    if object_id not in objects:
        raise UserError(f"instance {object_id} has no object annotation", "check the scene's annotation file")
    target = objects[object_id]
    keys = [k for k in _ORDER if k in target]
    for n in range(1, len(keys) + 1):
        for subset in sorted(combinations(keys, n), key=lambda sub: "shape" not in sub):  # nouns read best
            if not any(all(v.get(a) == target[a] for a in subset) for oid, v in objects.items() if oid != object_id):
                return "the " + _phrase({a: target[a] for a in subset})
    twins = [oid for oid, v in objects.items() if v == target]
    cols = {oid: float(np.nonzero(scene.instances == oid)[1].mean()) if (scene.instances == oid).any() else 0.0
            for oid in twins}
    rank = sorted(twins, key=lambda oid: cols[oid]).index(object_id)
    ordinals = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")
    which = ordinals[rank] if rank < len(ordinals) else f"{rank + 1}th"
    return f"the {which} {_phrase(target)} from the left"
