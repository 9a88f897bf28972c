"""``genperc serve``: the web page of ADDP §3.3 — the denoising process as an interactive interface
(Fig. 1c: predict, see the wrong object, name it as D⁻, correct).

A Gradio Blocks app over one loaded run, with one
:class:`~genperc.interactive.session.CorrectionSession` per browser session (``gr.State``):

* pick a held-out scene of the run's data (a gallery of the split's first scenes, or any scene by
  its number) or upload an image (byte size, resolution and format checked: :func:`read_upload`);
* type an expression D (a scene offers its own) and **Predict**: the page streams the denoising —
  the generated target x̂0 and its decoded mask at every step (:func:`streamed`: the synchronous
  sampler runs in a worker thread and its per-step callback feeds the event generator);
* correct with ADDP Eq. 5: type D⁻ (comma-separated: several negatives, each its own term) or
  **click the object the model wrongly chose** — on a scene with instance annotations the click
  resolves to that instance's shortest unique description (``session.describe_click``) — then
  **Correct** streams the next round; the rounds side by side (mask, D, D⁻, IoU when the scene
  knows the target), undo, the history exported as JSON;
* **Agent**: the agentic workflow of §3.3 (caption → the language model's likely confusers → k
  corrections in one batched run → pixel-wise vote) with its reasoning and the k masks shown.

Offline and safe (issue 13): analytics off, never a share link, served on 127.0.0.1 unless told,
an upload size and resolution limit, one queue in which the model-running events run one at a
time (``concurrency_limit=1`` on a shared ``concurrency_id``), and a user's mistake is one line in
the page (:class:`~genperc.errors.UserError`), never a traceback.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import io
import math
import os
import queue
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: it reads this once

import gradio as gr  # noqa: E402

from genperc.errors import UserError  # noqa: E402
from genperc.images import overlay_mask, resize_mask, upscale  # noqa: E402
from genperc.inference import load_image  # noqa: E402
from genperc.interactive.session import CorrectionSession, StepView  # noqa: E402

MAX_UPLOAD_BYTES = 20 * 2**20  # also Gradio's max_file_size: larger uploads never reach a handler
MAX_SIDE = 4096  # the resolution limit of an uploaded image, in pixels on its longer side
WORK_SIDE = 1024  # larger uploads are reduced to this (the model sees 16-128 px; the page stays fast)
DISPLAY_SIDE = 320  # small images are enlarged (nearest) to at least this on their shorter side
THUMBNAILS = 12  # held-out scenes in the gallery (any other scene of the split: by its number)
QUEUE_SIZE = 16  # waiting events beyond this are refused ("queue full")
MODEL = dict(concurrency_limit=1, concurrency_id="model")  # every event that runs the denoiser
BUTTONS = ["download", "fullscreen"]  # no "share" button on images: it would post to the Hugging Face Hub


# --------------------------------------------------------------------------- pure helpers


def read_upload(path: str | Path, *, max_bytes: int = MAX_UPLOAD_BYTES,
                max_side: int = MAX_SIDE) -> tuple[np.ndarray, list[str]]:
    """An uploaded file as uint8 RGB [H, W, 3] and notes on its conversion, or a one-line
    :class:`UserError`: over ``max_bytes``, over ``max_side`` pixels on a side (read from the
    header, before decoding), or refused by :func:`genperc.inference.load_image` (not an image,
    16/32-bit single channel, smaller than 8 px). Messages name the file, not the server's path."""
    from PIL import Image

    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise UserError(f"{path.name} is {size / 2**20:.1f} MB, over the {max_bytes / 2**20:.0f} MB upload limit",
                        "upload a smaller image")
    try:
        with Image.open(path) as img:
            w, h = img.size
    except Image.DecompressionBombError:
        w = h = math.inf
    except OSError:  # not an image: load_image says so
        w = h = 0
    if max(w, h) > max_side:
        raise UserError(f"{path.name} is larger than {max_side} pixels on a side", "upload a smaller image")
    try:
        return load_image(path)
    except UserError as e:
        raise UserError(e.problem.replace(str(path), path.name), e.fix) from None


def reduce(image: np.ndarray, side: int = WORK_SIDE) -> tuple[np.ndarray, list[str]]:
    """``image`` reduced (Lanczos, aspect kept) to at most ``side`` pixels on its longer side."""
    from PIL import Image

    h, w = image.shape[:2]
    if max(h, w) <= side:
        return image, []
    s = side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    small = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))
    return small, [f"reduced from {w}x{h} to {size[0]}x{size[1]} for the page"]


def display_factor(image: np.ndarray) -> int:
    """How many display pixels one image pixel becomes: small images are enlarged (nearest) to
    at least :data:`DISPLAY_SIDE` on their shorter side; larger ones are shown as they are."""
    return max(1, math.ceil(DISPLAY_SIDE / max(1, min(image.shape[:2]))))


def enlarge(image: np.ndarray) -> np.ndarray:
    """``image`` enlarged by :func:`display_factor`, nearest neighbour."""
    k = display_factor(image)
    return image.repeat(k, 0).repeat(k, 1) if k > 1 else image


def overlay(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """The image with ``mask`` in red, enlarged for display. A mask at the model's resolution
    (a streamed step) is first resized to the image's size, nearest."""
    if mask is not None:
        m = resize_mask(torch.from_numpy(np.asarray(mask, dtype=bool)), tuple(image.shape[:2]))
        image = overlay_mask(image, m)
    return enlarge(image)


def click_pixel(index, image: np.ndarray) -> tuple[int, int]:
    """``gr.SelectData.index`` (x, y) on the displayed image → the image pixel (x, y) under it."""
    k = display_factor(image)
    h, w = image.shape[:2]
    return min(max(int(index[0]) // k, 0), w - 1), min(max(int(index[1]) // k, 0), h - 1)


def parse_negatives(text: str | None) -> list[str]:
    """The D⁻ box: comma-separated phrases → their list (stripped, empty and repeated ones dropped)."""
    phrases = (p.strip() for p in (text or "").replace("\n", ",").split(","))
    return list(dict.fromkeys(p for p in phrases if p))


def add_negative(text: str | None, phrase: str) -> str:
    """The D⁻ box with ``phrase`` appended (a clicked object), unless it is already there."""
    return ", ".join(dict.fromkeys([*parse_negatives(text), phrase]))


def scene_target(scene, expression: str) -> np.ndarray | None:
    """The ground-truth mask of ``expression`` when it is one of the scene's own expressions."""
    for e in getattr(scene, "expressions", None) or []:
        if e.text == expression.strip() and scene.instances is not None:
            return scene.object_mask(e.object_ids)
    return None


def step_label(view: StepView) -> str:
    """The streamed step as the page shows it: ``step i/N, t=…`` (i from 1)."""
    return f"step {view.index + 1}/{view.num_steps}, t={view.timestep}"


def describe_round(number: int, rnd) -> str:
    """One round in a line: its kind, D, D⁻, IoU (when the target is known) and seed."""
    parts = [f"round {number} ({rnd.kind}): “{rnd.expression}”"]
    if rnd.negatives:
        parts.append("D⁻ = " + ", ".join(f"“{n}”" for n in rnd.negatives))
    if rnd.iou is not None:
        parts.append(f"IoU {rnd.iou:.2f}")
    parts.append(f"seed {rnd.seed}")
    return ", ".join(parts)


def agent_reasoning(info: dict) -> str:
    """The agent's reasoning (``Round.agent``) as Markdown: caption, prompt, the language model's
    answer, the confusers it yields (at most k), the vote rule and the agent's summary."""
    confusers = ", ".join(f"“{c}”" for c in info.get("confusers", [])) or "none"
    return "\n\n".join([
        f"**Caption** — {info.get('caption', '')}",
        f"**Prompt** — {info.get('prompt', '')}",
        f"**Language model's answer** — {info.get('answer', '')}",
        f"**Confusers (k = {info.get('k', '?')})** — {confusers}",
        f"**Vote** — {info.get('vote', '')}",
        info.get("reasoning", ""),
    ]).strip()


class Pictures:
    """Displayed images as PNG files named by their content, each written once (atomically).

    Gradio rewrites the cache file of an image handed over as an array on every update, so a
    browser fetching the identical picture of the previous step can read a truncated file; a file
    path it copies once, atomically. Only the newest :attr:`keep` files stay (Gradio has its copy)."""

    keep = 512

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="genperc-serve-"))
        self.lock = threading.Lock()

    def __call__(self, image: np.ndarray) -> str:
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buffer, format="png")
        data = buffer.getvalue()
        path = self.dir / f"{hashlib.sha256(data).hexdigest()[:32]}.png"
        with self.lock:
            if path.exists():
                os.utime(path)  # newest again: pruning keeps it
            else:
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(data)
                os.replace(tmp, path)
                self._prune()
        return str(path)

    def _prune(self) -> None:
        files = sorted(self.dir.glob("*.png"), key=lambda f: f.stat().st_mtime)
        for old in files[: max(0, len(files) - self.keep)]:
            old.unlink(missing_ok=True)


_DONE = object()


def streamed(call):
    """Run ``call(callback)`` in a worker thread; yield every :class:`StepView` its callback
    receives as it comes, then what ``call`` returned (its exception is raised here instead).

    The sampler is synchronous and calls back once per step; a Gradio generator event streams it
    by yielding each step (ADDP Fig. 1c: the user watches the denoising)."""
    items: queue.Queue = queue.Queue()
    outcome: dict = {}

    def work():
        try:
            with torch.no_grad():
                outcome["value"] = call(items.put)
        except BaseException as e:  # noqa: BLE001 - handed to the consuming thread
            outcome["error"] = e
        finally:
            items.put(_DONE)

    worker = threading.Thread(target=work, name="genperc-serve-round", daemon=True)
    worker.start()
    while (item := items.get()) is not _DONE:
        yield item
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    yield outcome["value"]


def load_agent(captioner: str = "scene", language_model: str = "minilm"):
    """The agentic workflow with its backends bound — ``agent(session, expression, **options)``
    → Round — or ``(None, why)`` when :mod:`genperc.interactive.agent` cannot be imported."""
    try:
        from genperc.interactive import agent
    except ImportError as e:
        return None, f"the agent is not available ({e})"
    return functools.partial(agent.run_agent, captioner=agent.build_captioner(captioner),
                             language_model=agent.build_language_model(language_model)), None


# --------------------------------------------------------------------------- the page


HEADER = """# genperc — correct the denoising
The denoising process as an interactive interface (ADDP §3.3, Fig. 1c). Pick a held-out scene or
upload an image, type an expression and **Predict**: watch x̂0 and its mask at every step. If the
model chose the wrong object, **click it** (or type it as D⁻) and **Correct**: the next round adds
correctional guidance away from D⁻ (ADDP Eq. 5). **Agent** names likely confusers itself."""


class Page:
    """The components and event handlers of the page. Handlers return ``{component: value}``
    (only what changes); a :class:`UserError` becomes the one-line message (:meth:`_friendly`)."""

    def __init__(self, run, source, *, steps: int | None = None, agent=None, agent_note: str | None = None):
        self.run, self.source, self.steps = run, source, steps
        self.agent, self.agent_note = agent, agent_note
        self.picture = Pictures()

    # ---------------------------------------------------------------- layout

    def build(self, title: str = "genperc: correct the denoising") -> gr.Blocks:
        """The Blocks app: layout, then events."""
        sample = self.run.cfg.sample
        with gr.Blocks(analytics_enabled=False, title=title) as demo:
            self.state = gr.State(None)  # this browser session's CorrectionSession
            gr.Markdown(HEADER)
            with gr.Row():
                with gr.Column(scale=1):
                    self.gallery = gr.Gallery(self._thumbnails(), label=f"Held-out scenes ({self.source_name})",
                                              columns=3, height=300, allow_preview=False, format="png",
                                              buttons=[], elem_id="scenes")
                    self.scene_number = gr.Number(label=f"…or scene number 0–{len(self.source) - 1} (Enter)",
                                                  precision=0, elem_id="scene-number")
                    limits = f"PNG/JPEG, ≤ {MAX_UPLOAD_BYTES // 2**20} MB, ≤ {MAX_SIDE} px"
                    self.upload_box = gr.File(label=f"…or upload an image ({limits})", type="filepath",
                                              elem_id="upload")
                with gr.Column(scale=2):
                    with gr.Row():
                        self.view = gr.Image(label="Image and mask: click the object the model wrongly chose",
                                             interactive=False, format="png", buttons=BUTTONS, elem_id="view")
                        self.x0_view = gr.Image(label="x̂0: the generated target", interactive=False, format="png",
                                                buttons=BUTTONS, elem_id="x0")
                    self.step_md = gr.Markdown(label="Step", elem_id="step")
                    self.message = gr.Markdown(label="Message", elem_id="message")
                    self.expressions = gr.Dropdown(label="Expressions of this scene", choices=[], visible=False,
                                                   elem_id="expressions")
                    with gr.Row():
                        self.expression = gr.Textbox(label="Expression D", placeholder="the red cube", scale=3,
                                                     elem_id="expression")
                        self.predict_btn = gr.Button("Predict", variant="primary", elem_id="predict")
                    with gr.Row():
                        self.negatives = gr.Textbox(label="D⁻: what it wrongly chose (comma-separated, or click it)",
                                                    scale=3, elem_id="negatives")
                        self.correct_btn = gr.Button("Correct", elem_id="correct")
                    with gr.Row():
                        self.agent_btn = gr.Button("Agent", visible=self.agent is not None, elem_id="agent")
                        self.undo_btn = gr.Button("Undo", elem_id="undo")
                        self.export_btn = gr.Button("Export history", elem_id="export")
                    with gr.Accordion("Advanced", open=False):
                        self.w_d = gr.Slider(0, max(10.0, sample.text_scale), value=sample.text_scale, step=0.1,
                                             label="w_D: text guidance")
                        self.w_dminus = gr.Slider(0, 10, value=1.0, step=0.1, label="w_D⁻: correctional guidance")
                        self.w_i = gr.Slider(0, max(10.0, sample.image_scale), value=sample.image_scale, step=0.1,
                                             label="w_I: image guidance")
                        self.seed = gr.Number(0, precision=0, label="Seed")
                        self.k = gr.Slider(1, 6, value=3, step=1, label="Agent: k confusers",
                                           visible=self.agent is not None)
            self.rounds = gr.Gallery(label="Rounds", columns=6, height="auto", format="png", buttons=BUTTONS,
                                     elem_id="rounds")
            with gr.Row():
                self.agent_md = gr.Markdown(self.agent_note or "", label="Agent's reasoning",
                                            elem_id="agent-reasoning")
                self.agent_gallery = gr.Gallery(label="Agent: the k corrected masks and their vote", columns=4,
                                                height="auto", format="png", buttons=BUTTONS, elem_id="agent-masks")
            self.history_file = gr.File(label="History (JSON)", interactive=False, elem_id="history")
            self._events()
        return demo

    def _events(self) -> None:
        outputs = [self.state, self.gallery, self.scene_number, self.upload_box, self.view, self.x0_view,
                   self.step_md, self.message, self.expressions, self.expression, self.negatives, self.rounds,
                   self.agent_md, self.agent_gallery, self.history_file]
        weights = [self.w_d, self.w_dminus, self.w_i, self.seed]
        on = functools.partial(self._on, outputs=outputs)
        on(self.gallery.select, self.pick_scene, [self.state])
        on(self.scene_number.submit, self.load_scene, [self.scene_number, self.state], api_name="load_scene")
        on(self.upload_box.upload, self.upload, [self.upload_box, self.state], api_name="upload")
        on(self.expressions.input, self.choose_expression, [self.expressions])
        on(self.view.select, self.click, [self.negatives, self.state])
        on(self.predict_btn.click, self.predict, [self.expression, self.seed, self.state], api_name="predict", **MODEL)
        on(self.correct_btn.click, self.correct, [self.negatives, self.expression, *weights, self.state],
           api_name="correct", **MODEL)
        if self.agent is not None:
            on(self.agent_btn.click, self.run_agent, [self.expression, self.k, *weights, self.state], api_name="agent",
               **MODEL)
        on(self.undo_btn.click, self.undo, [self.state], api_name="undo", **MODEL)  # not while a round runs
        on(self.export_btn.click, self.export, [self.state], api_name="export")

    def _on(self, event, handler, inputs, *, outputs, api_name=None, **options) -> None:
        visibility = "public" if api_name else "private"  # clicks and gallery picks need a browser
        event(self._friendly(handler), inputs, outputs, api_name=api_name, api_visibility=visibility,
              show_progress="minimal", **options)

    def _warn(self, e: UserError) -> dict:
        return {self.message: f"⚠️ {e}"}

    def _friendly(self, handler):
        """``handler`` with a :class:`UserError` shown as the one-line message (generators too)."""
        if inspect.isgeneratorfunction(handler):
            @functools.wraps(handler)
            def stream(*args, **kwargs):
                try:
                    yield from handler(*args, **kwargs)
                except UserError as e:
                    yield self._warn(e)
            return stream

        @functools.wraps(handler)
        def call(*args, **kwargs):
            try:
                return handler(*args, **kwargs)
            except UserError as e:
                return self._warn(e)
        return call

    @property
    def source_name(self) -> str:
        meta = self.source[0].meta if len(self.source) else {}
        return f"{meta.get('source', 'data')}, {meta.get('split', '')}".rstrip(", ")

    def _thumbnails(self) -> list:
        return [(upscale(self.source[i].image, 96), str(i)) for i in range(min(THUMBNAILS, len(self.source)))]

    # ---------------------------------------------------------------- choosing the image

    def _fresh(self, image: np.ndarray, scene=None, notes=()) -> dict:
        """A new session on ``image``: the page shows it, with no rounds and its expressions."""
        session = CorrectionSession(self.run, image, scene=scene, steps=self.steps)
        texts = list(dict.fromkeys(e.text for e in (scene.expressions if scene is not None else [])))
        return {self.state: session, self.view: self.shown(image), self.x0_view: None, self.step_md: "",
                self.message: "; ".join(notes), self.rounds: [], self.negatives: "", self.agent_md: "",
                self.agent_gallery: [], self.history_file: None,
                self.expressions: gr.update(choices=texts, value=None, visible=bool(texts))}

    def load_scene(self, index, session=None) -> dict:
        """Scene ``index`` of the held-out split: its image, annotations and expressions."""
        if index is None or not 0 <= int(index) < len(self.source):
            raise UserError(f"there is no scene {index}", f"pick a scene number from 0 to {len(self.source) - 1}")
        scene = self.source[int(index)]
        h, w = scene.image.shape[:2]
        return {**self._fresh(scene.image, scene, [f"scene {int(index)} ({w}x{h}), {len(scene.objects)} objects"]),
                self.scene_number: int(index)}

    def pick_scene(self, session, evt: gr.SelectData) -> dict:
        """A gallery thumbnail was clicked."""
        return self.load_scene(evt.index, session)

    def upload(self, path, session=None) -> dict:
        """An uploaded image (checked by :func:`read_upload`); no annotations, so no clicks."""
        if path is None:
            return {}
        try:
            image, notes = read_upload(path)
        except UserError as e:
            return {**self._warn(e), self.upload_box: None}  # the box is ready for the next file
        h, w = image.shape[:2]
        image, reduced = reduce(image)
        return {**self._fresh(image, None, [f"uploaded {Path(path).name} ({w}x{h})", *notes, *reduced]),
                self.upload_box: None}

    def choose_expression(self, text) -> dict:
        return {self.expression: text or ""}

    # ---------------------------------------------------------------- rounds

    @staticmethod
    def _require(session) -> CorrectionSession:
        if session is None:
            raise UserError("no image yet", "pick a held-out scene or upload an image first")
        return session

    def predict(self, expression, seed, session):
        """Round 1: the model alone, streamed step by step."""
        session = self._require(session)
        expression = (expression or "").strip()
        if not expression:
            raise UserError("no expression", "type what to segment, e.g. “the red cube”")
        session.target_mask = scene_target(session.scene, expression)
        yield from self._stream(session, lambda cb: session.predict(expression, seed=int(seed or 0), callback=cb))

    def correct(self, negatives, expression, w_d, w_dminus, w_i, seed, session):
        """The next round with correctional guidance away from every D⁻ (ADDP Eq. 5), streamed."""
        session = self._require(session)
        phrases = parse_negatives(negatives)
        if not phrases:
            raise UserError("no D⁻", "type what the model wrongly chose, or click it on the image")
        expression = (expression or "").strip() or None
        if expression is not None:
            session.target_mask = scene_target(session.scene, expression)
        yield from self._stream(session, lambda cb: session.correct(
            phrases, expression=expression, w_d=w_d, w_dminus=w_dminus, w_i=w_i, seed=int(seed or 0), callback=cb))

    def run_agent(self, expression, k, w_d, w_dminus, w_i, seed, session):
        """The agentic workflow (§3.3), streamed: the prediction it builds on (unless this
        expression was predicted already), then its k corrections as one batched run (member 0
        shown), then the vote, the reasoning and the k member masks."""
        session = self._require(session)
        expression = (expression or "").strip() or (session.last.expression if session.last else "")
        if not expression:
            raise UserError("no expression", "type what to segment first")
        session.target_mask = scene_target(session.scene, expression)
        members: dict = {}
        yield from self._stream(session, lambda cb: self.agent(
            session, expression, k=int(k), w_d=w_d, w_dminus=w_dminus, w_i=w_i, seed=int(seed or 0), callback=cb,
            on_members=lambda confusers, masks: members.update(zip(confusers, masks, strict=True))), members)

    def _stream(self, session: CorrectionSession, call, members: dict | None = None):
        """Page updates while ``call(callback)`` runs: x̂0, mask and step label at every step, then
        the finished round (its mask, the rounds gallery, a summary; an agent's reasoning and its
        ``members``, {D⁻: mask})."""
        for item in streamed(call):
            if isinstance(item, StepView):
                yield {self.view: self.shown(session.image, item.mask),
                       self.x0_view: self.picture(enlarge(item.x0_image)), self.step_md: step_label(item)}
            else:
                yield self._shown_round(session, item, members or {})

    def _shown_round(self, session: CorrectionSession, rnd, members: dict) -> dict:
        number = len(session.history)
        cost = f"{rnd.denoiser_calls} denoiser calls, {rnd.seconds:.1f} s"
        out = {self.view: self.shown(session.image, rnd.mask), self.x0_view: self.picture(enlarge(rnd.generated)),
               self.rounds: self._rounds(session), self.message: f"{describe_round(number, rnd)}; {cost}"}
        if rnd.agent is not None:
            out[self.agent_md] = agent_reasoning(rnd.agent)
            shown = [(self.shown(session.image, m), f"D⁻ = “{c}”") for c, m in members.items()]
            out[self.agent_gallery] = [*shown, (self.shown(session.image, rnd.mask), "the vote")]
        return out

    def shown(self, image: np.ndarray, mask: np.ndarray | None = None) -> str:
        """:func:`overlay` as a file for the page (:class:`Pictures`)."""
        return self.picture(overlay(image, mask))

    def _rounds(self, session: CorrectionSession) -> list:
        return [(self.shown(session.image, r.mask), describe_round(i, r)) for i, r in enumerate(session.history, 1)]

    # ---------------------------------------------------------------- clicks, undo, export

    def click(self, negatives, session, evt: gr.SelectData) -> dict:
        """A click on the image: the instance under it, by its shortest unique description, joins D⁻."""
        session = self._require(session)
        x, y = click_pixel(evt.index, session.image)
        phrase = session.describe_click(x, y)
        if phrase is None:
            raise UserError(f"no object at pixel ({x}, {y})", "click on the object the model wrongly chose")
        return {self.negatives: add_negative(negatives, phrase),
                self.message: f"clicked ({x}, {y}): D⁻ += “{phrase}”"}

    def undo(self, session) -> dict:
        """Drop the last round; the page shows the one before it (or the bare image)."""
        session = self._require(session)
        gone = session.undo()
        if gone is None:
            raise UserError("nothing to undo", "predict first")
        last = session.last
        return {self.view: self.shown(session.image, last.mask if last else None),
                self.x0_view: self.picture(enlarge(last.generated)) if last else None,
                self.rounds: self._rounds(session),
                self.message: f"undid round {len(session.history) + 1} ({gone.kind})"}

    def export(self, session) -> dict:
        """The session's history as a JSON file to download."""
        session = self._require(session)
        if not session.history:
            raise UserError("no rounds to export", "predict first")
        path = session.export(Path(tempfile.mkdtemp(prefix="genperc-history-")) / "history.json")
        return {self.history_file: str(path), self.message: f"exported {len(session.history)} rounds"}


# --------------------------------------------------------------------------- app and server


def build_app(run, *, split: str = "test", source=None, steps: int | None = None, captioner: str = "scene",
              language_model: str = "minilm") -> gr.Blocks:
    """The page for a loaded run (:func:`genperc.inference.load_run`). ``source``: the scenes of
    the gallery (default: the run's data, ``split``, via ``open_scene_source``); ``steps``:
    sampling steps (default the run's); ``captioner``/``language_model``: the agent's backends
    (its button is hidden, with a note, when :mod:`genperc.interactive.agent` is missing).
    A run the session cannot correct (not referring, discriminative) is refused here, not at the
    first click."""
    CorrectionSession(run, np.zeros((8, 8, 3), np.uint8), steps=steps)  # the session's own checks
    if source is None:
        from genperc.data.sources import open_scene_source

        source = open_scene_source(run.cfg.data, split)
    agent, note = load_agent(captioner, language_model)
    return Page(run, source, steps=steps, agent=agent, agent_note=note).build()


def launch(demo: gr.Blocks, *, host: str = "127.0.0.1", port: int | None = 7860,
           prevent_thread_lock: bool = False, quiet: bool = False):
    """Serve ``demo`` locally: one bounded queue, the upload size limit, never a share link, no
    server-side rendering (it would need Node), no run history (its page offers a Hugging Face
    bucket) and nothing that calls out. Returns Gradio's ``(app, local_url, share_url)``; blocks
    unless ``prevent_thread_lock``."""
    demo.queue(max_size=QUEUE_SIZE)
    return demo.launch(server_name=host, server_port=port, share=False, inbrowser=False, show_error=False,
                       max_file_size=MAX_UPLOAD_BYTES, prevent_thread_lock=prevent_thread_lock, quiet=quiet,
                       ssr_mode=False, pwa=False, mcp_server=False, enable_monitoring=False, run_history=False,
                       footer_links=["api", "settings"])


def serve(run_dir: str | Path, *, host: str = "127.0.0.1", port: int = 7860, split: str = "test",
          steps: int | None = None, weights: str = "ema", captioner: str = "scene",
          language_model: str = "minilm") -> None:
    """``genperc serve RUN``: load the run, build the page and serve it until interrupted."""
    from genperc.inference import load_run

    run = load_run(run_dir, weights=weights)
    launch(build_app(run, split=split, steps=steps, captioner=captioner, language_model=language_model),
           host=host, port=port)
