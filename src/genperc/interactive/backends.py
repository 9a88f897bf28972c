"""Pluggable captioners and language models for the agentic workflow (ADDP §3.3, Fig. 1c).

The paper captions with LLaVA and asks a language-only GPT-4o. Here each role is a small protocol
with three implementations, chosen by a spec string (:func:`build_captioner`,
:func:`build_language_model`):

=========================  =====================================  =====================================
spec                       captioner                              language model
=========================  =====================================  =====================================
``scene`` / ``minilm``     :class:`SceneCaptioner` (default)      :class:`MiniLMRanker` (default)
``transformers:DIR``       :class:`TransformersCaptioner`         :class:`TransformersLM`
``openai:URL#MODEL``       :class:`OpenAICaptioner`               :class:`OpenAIChatLM`
=========================  =====================================  =====================================

The defaults need no download: the scene describer reads the scene annotation (the stand-in for
LLaVA) and the ranker orders caption phrases by MiniLM similarity to D (language-only, like GPT-4o
in the paper). Local directories load with ``local_files_only=True``; OpenAI-compatible servers
(vLLM, Ollama, llama.cpp) take the key from ``OPENAI_API_KEY`` (``"none"`` when unset).
"""

from __future__ import annotations

import base64
import io
import os
import re
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from genperc.data.record import SceneRecord
from genperc.errors import UserError
from genperc.tasks.caption import scene_caption

CAPTION_PROMPT = "Describe this image in detail, naming every object."
CAPTIONERS = ("scene", "transformers:DIR", "openai:URL#MODEL")
LANGUAGE_MODELS = ("minilm", "transformers:DIR", "openai:URL#MODEL")


@runtime_checkable
class Captioner(Protocol):
    def caption(self, image: np.ndarray, scene: SceneRecord | None) -> str: ...


@runtime_checkable
class LanguageModel(Protocol):
    def generate(self, prompt: str) -> str: ...


# --------------------------------------------------------------------------- defaults (no download)


class SceneCaptioner:
    """The world's scene describer — a caption from the scene annotation, the stand-in for LLaVA.

    "3 objects, from left to right: a small blue metal sphere, a yellow cone and a large gray rubber
    cube" — :func:`genperc.tasks.caption.scene_caption` (the world generator's captions): every
    object's size, colour, material and category, so on other data sets with objects the category
    names. It describes every object alike and never says which one an expression refers to.
    """

    def caption(self, image: np.ndarray, scene: SceneRecord | None) -> str:
        if scene is None:
            raise UserError("the scene captioner reads the scene annotation, and this image has none",
                            "pick a world scene, or caption with transformers:DIR or openai:URL#MODEL")
        n = len(scene.objects)
        return f"{n} objects, {scene_caption(scene)}" if n > 1 else scene_caption(scene)


def _head_words(expression: str) -> set[str]:
    """The content words of D's head noun phrase: the words before the first relation word, without
    articles, ordinals and placeholders ("the second red cube from the left" → {"red", "cube"})."""
    words = re.findall(r"[a-z]+", expression.lower())
    stop = {"left", "right", "front", "behind", "of", "in", "on", "at", "from", "with", "near", "next", "to",
            "that", "which", "who", "closest", "nearest", "farthest", "between", "under", "above", "below",
            "beside", "and", "or", "is", "wearing", "holding"}
    cut = next((i for i, w in enumerate(words) if w in stop), len(words))
    skip = {"the", "a", "an", "object", "thing", "one", "first", "second", "third", "fourth", "fifth", "last"}
    return {w for w in words[:cut] if w not in skip}


class MiniLMRanker:
    """The default language model: ranks the caption's object phrases by similarity to D.

    Language-only, like the paper's GPT-4o: it reads the caption and D out of the prompt (``template``
    must be the one the agent used, the teaser's by default) and never sees the target's annotation. It splits the caption
    with :func:`parse_objects`, drops the phrases D most plausibly refers to — every phrase that
    contains all content words of D's head noun phrase ("the red cube left of the sphere" drops
    every red cube; a head with no content word drops nothing) — and orders the rest by cosine
    similarity of mean-pooled MiniLM sentence embeddings (all-MiniLM-L6-v2's own pooling) to D. The
    answer is a numbered list, the most similar first, parsed like any model's answer.
    """

    def __init__(self, encoder=None, *, template: str | None = None):
        from genperc.interactive.agent import TEASER_PROMPT  # agent.py imports this module

        self._encoder = encoder
        template = template or TEASER_PROMPT
        pattern = re.escape(template).replace("<CAPTION>", "(?P<caption>.*)").replace("<REFERRING>", "(?P<d>.*)")
        self._pattern = re.compile(pattern, re.S)

    @property
    def encoder(self):
        if self._encoder is None:
            from genperc.models.text import MiniLMTextEncoder

            self._encoder = MiniLMTextEncoder()
        return self._encoder

    @torch.no_grad()
    def _embed(self, texts: list[str]) -> torch.Tensor:
        hidden, mask = self.encoder.encode(texts)
        m = mask[..., None].to(hidden.dtype)
        return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)

    def generate(self, prompt: str) -> str:
        from genperc.interactive.agent import parse_objects

        found = self._pattern.fullmatch(prompt.strip())
        if found is None:
            raise UserError("the MiniLM ranker cannot find the caption and the expression in the prompt",
                            "give MiniLMRanker(template=...) the agent's prompt template")
        expression = found["d"].strip()
        head = _head_words(expression)
        phrases = [p for p in parse_objects(found["caption"], 1000)
                   if not (head and head <= set(re.findall(r"[a-z]+", p)))]
        if not phrases:
            return "None — the caption names no object other than the one referred to."
        sims = (self._embed([f"the {p}" for p in phrases]) @ self._embed([expression]).T)[:, 0].tolist()
        ranked = sorted(zip(sims, phrases, strict=True), key=lambda t: -t[0])
        return "\n".join(f"{i}. the {p} (similarity {s:.2f})" for i, (s, p) in enumerate(ranked, 1))


# --------------------------------------------------------------------------- local transformers directories


def _model_dir(path, what: str) -> Path:
    root = Path(path).expanduser()
    if not (root / "config.json").is_file():
        raise UserError(f"{what} directory not found or not a transformers model (no config.json): {root}",
                        "pass a folder written by save_pretrained (config.json, weights, tokenizer)")
    return root


def _loading(what: str, root: Path, load):
    try:
        return load()
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the {what} in {root}: {first}",
                        "pass a complete local transformers directory (nothing is downloaded)") from e


class TransformersLM:
    """A local text-generation directory (AutoTokenizer + AutoModelForCausalLM), greedy decoding;
    the prompt goes through the tokenizer's chat template when it has one."""

    def __init__(self, path, *, max_new_tokens: int = 128, device: str = "cpu"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path = _model_dir(path, "language model")
        self.max_new_tokens, self.device = max_new_tokens, torch.device(device)
        self.tokenizer = _loading("tokenizer", self.path,
                                  lambda: AutoTokenizer.from_pretrained(self.path, local_files_only=True))
        self.model = _loading("language model", self.path, lambda: AutoModelForCausalLM.from_pretrained(
            self.path, local_files_only=True)).eval().to(self.device)

    @torch.no_grad()
    def generate(self, prompt: str) -> str:
        tok = self.tokenizer
        if tok.chat_template:
            inputs = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             return_dict=True, return_tensors="pt")
        else:
            inputs = tok(prompt, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad)
        return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


class TransformersCaptioner:
    """A local image-to-text directory (BLIP, GIT, ViT-GPT2, Florence-2, LLaVA-style) through
    AutoModelForImageTextToText and its processor, greedy. ``prompt`` is sent with the image when
    the model takes one (LLaVA-style chat templates get :data:`CAPTION_PROMPT` by default; Florence-2
    wants ``prompt="<MORE_DETAILED_CAPTION>"``); captioning-only models get the image alone."""

    def __init__(self, path, *, prompt: str | None = None, max_new_tokens: int = 64, device: str = "cpu"):
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

        self.path = _model_dir(path, "captioner")
        self.prompt, self.max_new_tokens, self.device = prompt, max_new_tokens, torch.device(device)
        load = lambda cls: lambda: cls.from_pretrained(self.path, local_files_only=True)  # noqa: E731
        self.model = _loading("captioner", self.path, load(AutoModelForImageTextToText)).eval().to(self.device)
        try:
            processor = AutoProcessor.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError):
            processor = None
        if hasattr(processor, "image_processor"):  # a multimodal processor (BLIP, LLaVA, Florence-2)
            self.processor, self.tokenizer = processor, processor.tokenizer
        else:  # an encoder-decoder folder with an image processor and a tokenizer side by side
            self.processor = _loading("image processor", self.path, load(AutoImageProcessor))
            self.tokenizer = _loading("tokenizer", self.path, load(AutoTokenizer))

    def _inputs(self, image: Image.Image) -> dict:
        p = self.processor
        if getattr(p, "chat_template", None) and hasattr(p, "image_processor"):
            chat = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": self.prompt or CAPTION_PROMPT}]}]
            return p(images=image, text=p.apply_chat_template(chat, add_generation_prompt=True), return_tensors="pt")
        if self.prompt and hasattr(p, "image_processor"):
            return p(images=image, text=self.prompt, return_tensors="pt")
        return p(images=image, return_tensors="pt")

    @torch.no_grad()
    def caption(self, image: np.ndarray, scene: SceneRecord | None = None) -> str:
        inputs = {k: v.to(self.device) for k, v in self._inputs(Image.fromarray(image)).items()}
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        if not self.model.config.is_encoder_decoder and "input_ids" in inputs:
            out = out[:, inputs["input_ids"].shape[1]:]  # a decoder-only model repeats its prompt
        return self.tokenizer.decode(out[0], skip_special_tokens=True).strip()


# --------------------------------------------------------------------------- OpenAI-compatible endpoints


class _OpenAIEndpoint:
    """One chat-completions call (temperature 0) with network and HTTP errors as one-line UserErrors."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *, timeout: float = 120.0):
        from openai import OpenAI

        self.base_url, self.model = base_url, model
        key = api_key or os.environ.get("OPENAI_API_KEY") or "none"
        self.client = OpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=0)

    def _chat(self, content) -> str:
        import openai

        try:
            reply = self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": content}], temperature=0)
        except openai.APIStatusError as e:
            raise UserError(f"{self.base_url} answered HTTP {e.status_code} for model {self.model!r}",
                            "check the model name after '#' and OPENAI_API_KEY") from e
        except openai.APIError as e:  # connection refused, timeout, a reply that is not JSON
            raise UserError(f"no answer from the chat endpoint {self.base_url} ({type(e).__name__})",
                            "start the server (vLLM, Ollama, llama.cpp) or fix the URL: openai:http://HOST:PORT/v1#MODEL"
                            ) from e
        if not reply.choices:
            raise UserError(f"{self.base_url} returned no choices", "check the server's logs")
        return reply.choices[0].message.content or ""


class OpenAIChatLM(_OpenAIEndpoint):
    """An OpenAI-compatible chat endpoint (vLLM, Ollama, llama.cpp ``/v1``) as the language model."""

    def generate(self, prompt: str) -> str:
        return self._chat(prompt)


class OpenAICaptioner(_OpenAIEndpoint):
    """An OpenAI-compatible vision chat endpoint: the image goes as a ``data:image/png`` URL."""

    prompt = CAPTION_PROMPT

    def caption(self, image: np.ndarray, scene: SceneRecord | None = None) -> str:
        png = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(png, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode("ascii")
        return self._chat([{"type": "text", "text": self.prompt}, {"type": "image_url", "image_url": {"url": url}}])


# --------------------------------------------------------------------------- specs


def _build(spec: str, role: str, default, local, endpoint, choices):
    kind, _, arg = (spec or "").strip().partition(":")
    if kind == "openai" and arg:
        url, _, model = arg.partition("#")
        if not model:
            raise UserError(f"{role} {spec!r} names no model", f"append it: openai:{url}#MODEL-NAME")
        return endpoint(url, model)
    if kind == "transformers" and arg:
        return local(arg)
    if (spec or "").strip() == default[0]:
        return default[1]()
    raise UserError(f"unknown {role} {spec!r}", f"choose one of {', '.join(choices)}")


def build_captioner(spec: str = "scene") -> Captioner:
    """``"scene"`` (default), ``"transformers:/path/dir"`` or ``"openai:http://host:port/v1#model"``."""
    return _build(spec, "captioner", ("scene", SceneCaptioner), TransformersCaptioner, OpenAICaptioner, CAPTIONERS)


def build_language_model(spec: str = "minilm") -> LanguageModel:
    """``"minilm"`` (default), ``"transformers:/path/dir"`` or ``"openai:http://host:port/v1#model"``."""
    return _build(spec, "language model", ("minilm", MiniLMRanker), TransformersLM, OpenAIChatLM, LANGUAGE_MODELS)
