"""The agentic workflow of ADDP §3.3 (Fig. 1c, Fig. 5): caption → confusers → k corrections → vote.

The paper's proof of concept: (1) a captioner (LLaVA) describes the image; (2) a language-only
model (GPT-4o) guesses the top-k objects that might be confused with the referring expression D,
asked with the teaser's prompt :data:`TEASER_PROMPT`; (3) the diffusion model makes k corrected
predictions, one per proposed D⁻, with correctional guidance (Eq. 5) — here in one batched sampling
run, ``session.correct_each`` — and (4) a pixel-wise majority vote gives the final mask.
The appendix values (k, prompts, vote) are unpublished; ours are stated where they are used.

The backends (captioners, language models) live in :mod:`genperc.interactive.backends`; any object
with ``caption(image, scene) -> str`` / ``generate(prompt) -> str`` plugs in. Free-text answers
become object phrases with :func:`parse_objects`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import numpy as np
import torch

from genperc.errors import UserError
from genperc.images import from_uint8, resize_mask, to_uint8
from genperc.interactive.backends import build_captioner, build_language_model  # noqa: F401  (re-exported)
from genperc.interactive.session import Round
from genperc.tasks.referring import overlay_colour

#: The teaser's prompt to the language model (ADDP Fig. 1c), verbatim.
TEASER_PROMPT = "This is an image of <CAPTION>. What might confuse the segmentation of <REFERRING>?"
VOTE_RULE = ("pixel-wise majority of the k corrected masks; a tied pixel (even k) keeps the value of "
             "the uncorrected prediction")

# --------------------------------------------------------------------------- parsing free text

_LEADING = {"the", "a", "an", "another", "other", "any", "also", "possibly", "perhaps", "maybe", "both",
            "some", "potentially", "likely", "probably", "especially", "e.g.", "i.e."}
_PRONOUNS = {"it", "its", "they", "them", "their", "this", "these", "those", "that", "there", "here",
             "which", "who", "i", "we", "you", "he", "she", "one", "what"}
_NONE = {"none", "nothing", "n/a", "na", "unknown", "no", "not"}
_GENERIC_WORDS = {"segmentation", "segmenting", "segment", "mask", "model", "confusion", "prediction",
                  "answer", "caption", "referring", "image", "picture", "photo", "scene"}
_GENERIC_PHRASES = {"shape", "shapes", "color", "colors", "colour", "colours", "size", "sizes", "material",
                    "materials", "texture", "position", "location", "lighting", "background", "foreground",
                    "object", "thing", "item", "similar", "same", "floor", "empty floor"}
_PLURAL_HEADS = {"objects", "things", "items", "ones", "elements"}
_PREAMBLE = re.compile(r"\b(?:object|confus|here\b|possib|candidate|answer|following|include|distract|might|"
                       r"could|likely|list\b|top\b|left to right|right to left)", re.I)
_MARKER = re.compile(r"^\s*(?:\d+[.)]|[-*•+])\s+")
_EXPLANATION = re.compile(
    r"\s(?:because|since|due to|as (?:it|they|both|its|their|this)|given|whose|so that|making|sharing|"
    r"with (?:the )?same|with (?:a )?similar|in terms of|owing to|which|who)\b|\s[-–—]\s|\s—|—\s", re.I)
_VERB = re.compile(r"\b(?:might|could|may|can|would|will|should|is|are|was|were|looks?|resembles?|appears?|"
                   r"seems?|includes?|shares?|has|have)\b", re.I)
_CUE = re.compile(r"\b(?:confused with|mistaken for|confused for|confused by|such as|like|including|with|by|"
                  r"for|as|are|is|be)\b", re.I)
_LEADING_CUE = re.compile(r"^\s*(?:with|by|for|as|like|such as|including)\s+", re.I)
_TRAILING_REF = re.compile(r"\s+(?:next to|near|beside|behind|close to|around|near to|in front of|left of|"
                           r"right of)\s+(?:it|them)$")


def _clean(text: str) -> str:
    """Markdown, quotes, parentheses, reasoning blocks and "an image of" prefixes removed."""
    text = re.sub(r"<think>.*?</think>", " ", text, flags=re.S | re.I)
    text = re.sub(r"\*\*|__|`|^\s*#+\s*", "", text, flags=re.M)
    text = re.sub(r"[\"“”«»]|(?<!\w)['‘’]|['‘’](?!\w)", "", text)
    text = re.sub(r"\([^)]*\)|\[[^\]]*\]", "", text)
    text = re.sub(r"\b(?:an?|the) (?:image|picture|photo|photograph|rendering|scene) of\b", "", text, flags=re.I)
    return re.sub(r"\s+(?=\d+[.)]\s)", "\n", text)  # inline "1) … 2) …" → one item a line


def _items(text: str) -> list[str]:
    """List items (first sentence of each; preamble and epilogue lines dropped) or prose sentences."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if any(_MARKER.match(ln) for ln in lines):
        items = [_MARKER.sub("", ln) for ln in lines if _MARKER.match(ln)]
        return [re.split(r"(?<=[.!?])\s+", it.strip())[0] for it in items]
    return [s for ln in lines for s in re.split(r"(?<=[.!?])\s+", ln.strip())]


def _colon(item: str) -> str:
    """"label: explanation" → the label; "preamble: the list" → the list."""
    if ":" not in item:
        return item
    head, tail = item.split(":", 1)
    return tail if (_PREAMBLE.search(head) or not head.strip()) and tail.strip() else head


def _extract(fragment: str) -> list[str]:
    """The object phrases of one clause: the subject before a verb, the object after the last cue."""
    verb = _VERB.search(fragment)
    if verb is None:
        return [_LEADING_CUE.sub("", fragment)]
    rest = fragment[verb.end():]
    cues = list(_CUE.finditer(rest))
    return [fragment[: verb.start()]] + ([rest[cues[-1].end():]] if cues else [])


def _normalise(phrase: str) -> str:
    """Lower case, no leading article or hedge, no trailing pronoun reference; "" if not an object."""
    words = re.sub(r"[^\w\s'/-]", " ", phrase.lower()).split()
    while words and words[0] in _LEADING:
        words = words[1:]
    while words and words[-1] in {"that", "which", "who", "too", "also", "etc"}:
        words = words[:-1]
    p = _TRAILING_REF.sub("", " ".join(words))
    words = p.split()
    if (not words or len(words) > 10 or words[0] in _PRONOUNS or words[0] in _NONE or p in _GENERIC_PHRASES
            or words[-1] in _PLURAL_HEADS or _GENERIC_WORDS & set(words)):
        return ""
    return p


def parse_objects(answer: str, k: int, *, expression: str | None = None) -> list[str]:
    """Up to ``k`` object phrases from a language model's free-text answer, in order of appearance.

    Handles numbered and bulleted lists (the preamble before the first item and every sentence after
    an item's first are ignored), inline "1) … 2) …", comma / "and" / "or" lists, quotes, markdown
    bold, parenthetical remarks, "label: explanation" items, explanations after "because", "since",
    " – " …, sentences such as "The red cube might be confused with the blue cube because …" (both
    the subject and the object of the confusion are candidates) and ``<think>`` blocks. Phrases are
    lower case without a leading article ("the blue cube" → "blue cube"); duplicates, generic words
    ("other objects", "the segmentation", "none") and ``expression`` itself are dropped.
    An empty answer gives ``[]``.
    """
    out: list[str] = []
    skip = {_normalise(expression)} if expression else set()
    for item in _items(_clean(answer or "")):
        for clause in re.split(r"[,;]", _colon(item)):
            clause = _EXPLANATION.split(" " + clause, maxsplit=1)[0]
            for fragment in re.split(r"\b(?:and|or|as well as|along with)\b|&", clause):
                for p in map(_normalise, _extract(fragment)):
                    if p and p not in skip and p not in out:
                        out.append(p)
    return out[: max(0, k)]


def build_prompt(template: str, caption: str, expression: str) -> str:
    """The language model's prompt: ``template`` with ``<CAPTION>`` and ``<REFERRING>`` filled in."""
    missing = [p for p in ("<CAPTION>", "<REFERRING>") if p not in template]
    if missing:
        raise UserError(f"agent prompt template lacks {' and '.join(missing)}: {template!r}",
                        f"write both placeholders, e.g. {TEASER_PROMPT!r}")
    return template.replace("<CAPTION>", caption.strip().rstrip(".")).replace("<REFERRING>", expression.strip())


# --------------------------------------------------------------------------- the vote


def majority_vote(masks: list[np.ndarray], tie: np.ndarray) -> np.ndarray:
    """Pixel-wise majority of ``masks`` (bool [H, W] each); where exactly half vote yes (even k) the
    pixel takes ``tie``'s value — the agent passes the uncorrected prediction, so a correction must
    win a strict majority to change a pixel. (Equivalently: a plain majority of k + 1 voters, the
    uncorrected prediction among them.)"""
    if not masks:
        raise ValueError("majority_vote needs at least one mask")
    votes = np.stack([np.asarray(m, dtype=bool) for m in masks]).sum(0)
    out = 2 * votes > len(masks)
    tied = 2 * votes == len(masks)
    out[tied] = np.asarray(tie, dtype=bool)[tied]
    return out


# --------------------------------------------------------------------------- the workflow


def _predict_round(session, expression: str) -> Round | None:
    return next((r for r in reversed(session.history) if r.kind == "predict" and r.expression == expression), None)


def _as_expression(phrase: str, expression: str) -> str:
    """A parsed phrase worded like D: "blue cube" → "the blue cube" when D starts with "the"."""
    return f"the {phrase}" if expression.strip().lower().startswith("the ") else phrase


def _vote_picture(image: np.ndarray, mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The referring-format target of a mask: the input at the model's size, masked pixels pure red."""
    x = torch.nn.functional.interpolate(from_uint8(image), size=size, mode="bilinear", align_corners=False)
    return to_uint8(overlay_colour(x, resize_mask(torch.from_numpy(mask), size)[None]))


def run_agent(session, expression: str, *, captioner, language_model, k: int = 3, w_d: float | None = None,
              w_dminus: float | None = None, w_i: float | None = None, seed: int = 0,
              callback: Callable | None = None, template: str = TEASER_PROMPT,
              on_members: Callable[[list[str], list[np.ndarray]], None] | None = None) -> Round:
    """ADDP §3.3's agentic workflow on a correction session; appends and returns a Round of kind "agent".

    Predicts ``expression`` first when the session has no predict round for it; captions the image;
    asks ``language_model`` ``template`` (the teaser's prompt by default); parses up to ``k``
    confusers (:func:`parse_objects`, worded like D); runs one batched ``session.correct_each`` with
    them as D⁻ (Eq. 5; weights ``None`` = the session's defaults) and votes (:func:`majority_vote`,
    ties → the uncorrected prediction). With no confuser proposed the uncorrected prediction stands
    and the reasoning says so. ``denoiser_calls`` and ``seconds`` are the whole workflow's cost for the
    one input image: the prediction it builds on (run now or reused from the history), captioning,
    the language model and the k corrections (k × the calls per member that ``correct_each``
    measured). ``on_members(confusers, masks)``, if given, receives the k member masks (a UI shows
    them; the Round keeps their pixel counts). :func:`build_captioner` and
    :func:`build_language_model` (from :mod:`~genperc.interactive.backends`) make the backends.
    """
    if k < 1:
        raise UserError(f"agent: k={k} confusers", "ask for at least one (k ≥ 1)")
    start = time.perf_counter()
    first = _predict_round(session, expression)
    earlier = 0.0 if first is None else first.seconds  # a reused prediction's time, counted like a new one's
    if first is None:
        first = session.predict(expression, seed=seed, callback=callback)
    calls = first.denoiser_calls
    caption = captioner.caption(session.image, session.scene)
    prompt = build_prompt(template, caption, expression)
    answer = language_model.generate(prompt)
    confusers = [_as_expression(p, expression) for p in parse_objects(answer, k, expression=expression)]
    masks: list[np.ndarray] = []
    if confusers:
        masks, info = session.correct_each(confusers, expression=expression, w_d=w_d, w_dminus=w_dminus, w_i=w_i,
                                           seed=seed, callback=callback)
        calls += len(masks) * info["denoiser_calls"]
        mask = majority_vote(masks, tie=first.mask)
        generated = _vote_picture(session.image, mask, first.generated.shape[:2])
        reasoning = (f"The language model proposed {len(confusers)} confuser(s); one corrected prediction each "
                     f"(D⁻ = {', '.join(repr(c) for c in confusers)}), then a pixel-wise majority vote.")
    else:
        mask, generated = np.asarray(first.mask, dtype=bool).copy(), first.generated
        reasoning = ("The language model proposed no confusing object, so the agent keeps the uncorrected "
                     "prediction.")
    if on_members is not None:
        on_members(confusers, masks)
    agent = {"caption": caption, "prompt": prompt, "answer": answer, "confusers": confusers, "k": k,
             "vote": VOTE_RULE, "members": [int(np.count_nonzero(m)) for m in masks], "reasoning": reasoning}
    result = Round(kind="agent", expression=expression, negatives=list(confusers), seed=seed,
                   weights=session.default_weights(w_d, w_dminus, w_i),
                   mask=mask, generated=generated, iou=session.iou(mask), seconds=round(time.perf_counter() - start + earlier, 4),
                   denoiser_calls=calls, agent=agent)
    session.add_round(result)
    return result
