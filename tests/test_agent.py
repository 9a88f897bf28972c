"""The agentic workflow of ADDP §3.3: parsing, the vote, the backends (tiny local transformers
models and a chat-completions server on 127.0.0.1, both made here) and run_agent on a fake session."""

from __future__ import annotations

import base64
import io
import json
import socket
import sys
import threading
import types
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from genperc.data.record import ObjectAnn, SceneRecord
from genperc.errors import UserError

torch.set_num_threads(1)

try:  # the session module is written beside this one; a stand-in with the spec's Round until then
    from genperc.interactive.session import Round
except ImportError:
    @dataclass
    class Round:
        kind: str
        expression: str
        negatives: list
        weights: dict
        seed: int
        mask: np.ndarray
        generated: np.ndarray
        iou: float | None
        seconds: float
        denoiser_calls: int
        agent: dict | None = None

    _module = types.ModuleType("genperc.interactive.session")
    _module.Round = Round
    sys.modules[_module.__name__] = _module

from genperc.interactive.agent import (  # noqa: E402
    TEASER_PROMPT,
    VOTE_RULE,
    build_prompt,
    majority_vote,
    parse_objects,
    run_agent,
)
from genperc.interactive.backends import (  # noqa: E402
    Captioner,
    LanguageModel,
    MiniLMRanker,
    OpenAICaptioner,
    OpenAIChatLM,
    SceneCaptioner,
    TransformersCaptioner,
    TransformersLM,
    build_captioner,
    build_language_model,
)

# --------------------------------------------------------------------------- parsing

PARSE_TABLE = [
    ("1. The blue cube – same shape\n2. The red sphere – same colour\n3. The green cylinder",
     ["blue cube", "red sphere", "green cylinder"]),
    ("- **Red sphere**: shares the red color\n- **Blue cube**: same shape", ["red sphere", "blue cube"]),
    ("The red sphere, the blue cube and the green cylinder.", ["red sphere", "blue cube", "green cylinder"]),
    ("The red cube might be confused with the blue cube because they share the same shape, and with the "
     "red sphere because of its color.", ["blue cube", "red sphere"]),
    ('Possible confusers: "blue cube", \'red sphere\'.', ["blue cube", "red sphere"]),
    ("The segmentation of the red cube could be confused by the small red sphere next to it, as well as "
     "the large blue cube.", ["small red sphere", "large blue cube"]),
    ("", []),
    ("   \n ", []),
    ("Here are the objects that might confuse the segmentation:\n\n1. **The large blue metal cube** — it "
     "has the same shape.\n2. **The small red rubber sphere** (same color).\n3. The red cube\n\nThese "
     "share colour or shape with the target.", ["large blue metal cube", "small red rubber sphere"]),
    ("blue cube, red sphere, Blue Cube, the blue cube", ["blue cube", "red sphere"]),
    ("None.", []),
    ("N/A", []),
    ("There are no confusing objects in this image.", []),
    ("Objects that might confuse the segmentation are the blue cube and the red sphere.",
     ["blue cube", "red sphere"]),
    ("<think>The user asks about the red cube. Maybe the green cone?</think>\nThe blue cube and the red sphere.",
     ["blue cube", "red sphere"]),
    ("1) blue cube 2) red sphere 3) green cylinder", ["blue cube", "red sphere", "green cylinder"]),
    ("The small red sphere could be mistaken for the red cube since both are red.", ["small red sphere"]),
    ("* The blue cube, which has the same shape\n* A red sphere", ["blue cube", "red sphere"]),
    ("Answer: the large blue cube or the small red sphere", ["large blue cube", "small red sphere"]),
    ("1. the cylinder in front of the red sphere\n2. the gray cone", ["cylinder in front of the red sphere",
                                                                      "gray cone"]),
    ("It could be confused with the blue cube. Also the red sphere may look similar.", ["blue cube", "red sphere"]),
    ("The red cube.", []),  # only the expression itself
    ("3 objects, from left to right: a small blue metal sphere, a yellow cone and a large gray rubber cube",
     ["small blue metal sphere", "yellow cone", "large gray rubber cube"]),
]


@pytest.mark.parametrize(("answer", "expected"), PARSE_TABLE)
def test_parse_objects_table(answer, expected):
    assert parse_objects(answer, 5, expression="the red cube") == expected


def test_parse_objects_keeps_k_in_order_and_the_expression_only_when_not_given():
    answer = "1. the red cube\n2. the blue cube\n3. the red sphere\n4. the green cylinder"
    assert parse_objects(answer, 2, expression="The Red Cube") == ["blue cube", "red sphere"]
    assert parse_objects(answer, 2) == ["red cube", "blue cube"]
    assert parse_objects(answer, 0) == []


def test_build_prompt_is_the_teaser_prompt_and_checks_templates():
    assert TEASER_PROMPT == ("This is an image of <CAPTION>. What might confuse the segmentation of "
                             "<REFERRING>?")
    assert build_prompt(TEASER_PROMPT, "a red cube and a blue cube.", "the red cube") == (
        "This is an image of a red cube and a blue cube. What might confuse the segmentation of the red cube?")
    with pytest.raises(UserError, match="<REFERRING>"):
        build_prompt("Describe <CAPTION>.", "x", "y")


# --------------------------------------------------------------------------- the vote


def test_majority_vote_odd_k_and_ties_keep_the_uncorrected_prediction():
    a = np.array([[1, 1, 0, 0]], bool)
    b = np.array([[1, 0, 1, 0]], bool)
    c = np.array([[1, 0, 0, 1]], bool)
    first = np.array([[0, 1, 1, 0]], bool)
    np.testing.assert_array_equal(majority_vote([a, b, c], tie=first), [[1, 0, 0, 0]])  # no ties at odd k
    # k = 2: agreement wins; a 1–1 split keeps the uncorrected pixel.
    np.testing.assert_array_equal(majority_vote([a, b], tie=first), [[1, 1, 1, 0]])
    np.testing.assert_array_equal(majority_vote([a, b], tie=~first), [[1, 0, 0, 0]])
    np.testing.assert_array_equal(majority_vote([c], tie=first), c)
    with pytest.raises(ValueError):
        majority_vote([], tie=first)


# --------------------------------------------------------------------------- default backends


def _obj(i, shape, box, **attrs):
    return ObjectAnn(id=i, category=shape, category_id=1, box=box, attributes=attrs)


def test_scene_captioner_describes_every_object_from_left_to_right():
    scene = SceneRecord(image=np.zeros((8, 8, 3), np.uint8), objects=[
        _obj(1, "cube", (20, 0, 30, 10), size="large", color="red", material="metal"),
        _obj(2, "sphere", (0, 0, 6, 6), size="small", color="blue", material="rubber")])
    captioner = SceneCaptioner()
    assert isinstance(captioner, Captioner)
    assert captioner.caption(scene.image, scene) == (
        "2 objects, from left to right: a small blue rubber sphere and a large red metal cube")
    coco = SceneRecord(image=scene.image, objects=[_obj(1, "elephant", None)])
    assert captioner.caption(coco.image, coco) == "an elephant"
    with pytest.raises(UserError, match="scene annotation"):
        captioner.caption(scene.image, None)


@pytest.fixture(scope="module")
def ranker():
    return MiniLMRanker()


CAPTION = "4 objects: a red sphere, a blue cube, a green cylinder and a red cube"


def test_minilm_ranker_excludes_the_referent_and_ranks_the_confusers(ranker):
    assert isinstance(ranker, LanguageModel)
    answer = ranker.generate(build_prompt(TEASER_PROMPT, CAPTION, "the red cube"))
    ranked = parse_objects(answer, 3, expression="the red cube")
    assert answer.startswith("1. the ") and "similarity" in answer
    assert sorted(ranked) == ["blue cube", "green cylinder", "red sphere"]  # the red cube itself is gone
    assert ranked[0] in {"blue cube", "red sphere"} and ranked[-1] == "green cylinder"
    # A relation: every phrase D's head ("sphere") might mean is dropped; the anchor ranks first.
    answer = ranker.generate(build_prompt(TEASER_PROMPT, "a small red sphere, a large green cylinder and a blue "
                                          "sphere", "the sphere left of the green cylinder"))
    assert parse_objects(answer, 3) == ["large green cylinder"]
    assert parse_objects(ranker.generate(build_prompt(TEASER_PROMPT, "a red cube", "the red cube")), 3) == []
    with pytest.raises(UserError, match="template"):
        ranker.generate("What is in this picture?")


# --------------------------------------------------------------------------- tiny local transformers models

WORDS = ("<pad> <s> </s> <unk> a the red blue green cube sphere cylinder cone is of image this what might "
         "confuse segmentation").split()


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def _gpt2_config(**kw):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=len(WORDS), n_positions=128, n_embd=32, n_layer=1, n_head=2, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0, **kw)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A tiny random GPT-2 (with a chat template) and a ViT→GPT-2 captioner, saved locally."""
    from transformers import (
        GPT2LMHeadModel,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
    )

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    tok = _tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    GPT2LMHeadModel(_gpt2_config()).save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    vit = ViTConfig(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=37)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        vit, _gpt2_config(add_cross_attention=True, is_decoder=True))
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 1, 0, 2
    VisionEncoderDecoderModel(config=config).save_pretrained(root / "captioner")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "captioner")
    _tokenizer().save_pretrained(root / "captioner")
    return root


def test_transformers_backends_run_tiny_local_models(tiny_dirs):
    lm = build_language_model(f"transformers:{tiny_dirs / 'lm'}")
    assert isinstance(lm, TransformersLM) and lm.tokenizer.chat_template
    lm.max_new_tokens = 6
    answer = lm.generate("what might confuse the red cube")
    assert isinstance(answer, str) and 0 < len(answer.split()) <= 6 and set(answer.split()) <= set(WORDS)
    assert lm.generate("what might confuse the red cube") == answer  # greedy
    captioner = build_captioner(f"transformers:{tiny_dirs / 'captioner'}")
    assert isinstance(captioner, TransformersCaptioner)
    caption = captioner.caption(np.full((20, 30, 3), 90, np.uint8), None)
    assert isinstance(caption, str) and set(caption.split()) <= set(WORDS)


def test_transformers_backends_refuse_missing_or_broken_directories(tmp_path, tiny_dirs):
    with pytest.raises(UserError, match="no config.json"):
        TransformersLM(tmp_path / "missing")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_dirs / "lm" / "config.json").read_text())
    with pytest.raises(UserError, match="cannot load"):
        TransformersLM(broken)


# --------------------------------------------------------------------------- a chat-completions server


class _ChatHandler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        status, answer = self.server.status, self.server.answer
        reply = {"id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                 "choices": [{"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": answer}}]}
        data = json.dumps(reply if status == 200 else {"error": {"message": "no such model"}}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def chat_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ChatHandler)
    server.requests, server.status, server.answer = [], 200, ""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield server
    server.shutdown()
    server.server_close()


def test_openai_captioner_sends_the_image_as_a_data_url(chat_server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "secret")
    chat_server.answer = "A red cube beside a blue sphere."
    captioner = build_captioner(f"openai:{chat_server.url}#llava")
    assert isinstance(captioner, OpenAICaptioner)
    image = np.random.default_rng(0).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    assert captioner.caption(image, None) == "A red cube beside a blue sphere."
    request = chat_server.requests[-1]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer secret"
    assert request["body"]["model"] == "llava"
    parts = request["body"]["messages"][0]["content"]
    url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
    assert url.startswith("data:image/png;base64,")
    sent = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
    np.testing.assert_array_equal(sent, image)


def test_openai_errors_are_one_line_user_errors(chat_server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    chat_server.status = 404
    lm = OpenAIChatLM(chat_server.url, "no-such-model")
    with pytest.raises(UserError, match="HTTP 404") as err:
        lm.generate("hello")
    assert chat_server.requests[-1]["auth"] == "Bearer none" and "\n" not in str(err.value)
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError, match=f"127.0.0.1:{port}/v1.*start the server"):
        OpenAIChatLM(f"http://127.0.0.1:{port}/v1", "m", timeout=5).generate("hello")


def test_spec_strings():
    from genperc.interactive import agent

    assert agent.build_captioner is build_captioner and agent.build_language_model is build_language_model
    assert isinstance(build_captioner("scene"), SceneCaptioner)
    assert isinstance(build_language_model("minilm"), MiniLMRanker)
    with pytest.raises(UserError, match="scene, transformers:DIR, openai:URL#MODEL"):
        build_captioner("llava")
    with pytest.raises(UserError, match="minilm, transformers:DIR"):
        build_language_model("gpt4o")
    with pytest.raises(UserError, match="#MODEL-NAME"):
        build_language_model("openai:http://127.0.0.1:1/v1")


# --------------------------------------------------------------------------- run_agent on a fake session

STEPS = 5
FIRST = np.array([[1, 1, 0, 0], [0, 0, 0, 0]], bool)  # the uncorrected prediction


class FakeSession:
    """predict / correct_each / default_weights / add_round / last / iou as CorrectionSession has them;
    records every call and streams STEPS steps per sampling run."""

    def __init__(self, members, *, image=None, scene=None):
        self.image = np.zeros((2, 4, 3), np.uint8) if image is None else image
        self.scene, self.history, self.calls = scene, [], []
        self.target_mask = np.array([[1, 0, 0, 0], [0, 0, 0, 0]], bool)
        self.members = members

    def iou(self, mask):
        return float((mask & self.target_mask).sum() / max((mask | self.target_mask).sum(), 1))

    def default_weights(self, w_d=None, w_dminus=None, w_i=None):
        return {"w_d": 3.0 if w_d is None else w_d, "w_dminus": 1.0 if w_dminus is None else w_dminus,
                "w_i": 1.5 if w_i is None else w_i}

    @staticmethod
    def _stream(callback):
        for i in range(STEPS):
            if callback is not None:
                callback(types.SimpleNamespace(index=i, num_steps=STEPS, member=0))

    def predict(self, expression, *, seed=0, callback=None):
        self.calls.append(("predict", expression, seed))
        self._stream(callback)
        return self.add_round(Round(kind="predict", expression=expression, negatives=[], seed=seed, mask=FIRST.copy(),
                                    weights=self.default_weights(), generated=np.zeros((8, 8, 3), np.uint8),
                                    iou=self.iou(FIRST), seconds=0.0, denoiser_calls=STEPS * 3))

    def correct_each(self, negatives, *, expression=None, w_d=None, w_dminus=None, w_i=None, seed=None,
                     callback=None):
        self.calls.append(("correct_each", list(negatives), {"expression": expression, "w_d": w_d,
                                                             "w_dminus": w_dminus, "w_i": w_i, "seed": seed}))
        self._stream(callback)
        info = {"seconds": 0.0, "denoiser_calls": STEPS * 4, "weights": self.default_weights(w_d, w_dminus, w_i),
                "seed": seed}
        return [m.copy() for m in self.members[: len(negatives)]], info

    def add_round(self, round):
        self.history.append(round)
        return round

    @property
    def last(self):
        return self.history[-1] if self.history else None


class Canned:
    def __init__(self, text):
        self.text, self.prompts = text, []

    def caption(self, image, scene):
        return self.text

    def generate(self, prompt):
        self.prompts.append(prompt)
        return self.text


MEMBERS = [np.array([[1, 0, 1, 0], [0, 0, 0, 0]], bool), np.array([[1, 1, 0, 1], [0, 0, 0, 0]], bool),
           np.array([[1, 0, 0, 0], [0, 0, 0, 1]], bool)]


def test_run_agent_predicts_corrects_in_one_batch_and_votes():
    session, steps = FakeSession(MEMBERS), []
    lm = Canned("1. **The blue cube** – same shape\n2. The red sphere (same colour)\n3. the red cube\n4. a cone")
    r = run_agent(session, "the red cube", captioner=Canned("a red cube, a blue cube and a red sphere"),
                  language_model=lm, k=3, w_dminus=0.5, seed=7, callback=steps.append)
    assert [c[0] for c in session.calls] == ["predict", "correct_each"]  # exactly one batched run
    assert session.calls[1][1] == ["the blue cube", "the red sphere", "the cone"]
    assert session.calls[1][2] == {"expression": "the red cube", "w_d": None, "w_dminus": 0.5, "w_i": None, "seed": 7}
    assert lm.prompts == ["This is an image of a red cube, a blue cube and a red sphere. What might confuse "
                          "the segmentation of the red cube?"]
    np.testing.assert_array_equal(r.mask, [[1, 0, 0, 0], [0, 0, 0, 0]])
    assert session.last is r and r.kind == "agent" and r.negatives == session.calls[1][1] and r.seed == 7
    assert r.weights == {"w_d": 3.0, "w_dminus": 0.5, "w_i": 1.5} and r.iou == 1.0
    assert r.denoiser_calls == STEPS * 3 + 3 * STEPS * 4 and len(steps) == 2 * STEPS and r.seconds >= 0
    assert r.generated.shape == (8, 8, 3) and tuple(r.generated[0, 0]) == (255, 0, 0)
    assert r.agent["answer"] == lm.text and r.agent["caption"] == "a red cube, a blue cube and a red sphere"
    assert r.agent["confusers"] == r.negatives and r.agent["k"] == 3 and r.agent["members"] == [2, 3, 2]
    assert r.agent["vote"] == VOTE_RULE and r.agent["prompt"] == lm.prompts[0]


def test_run_agent_reuses_the_prediction_and_breaks_ties_with_it():
    session = FakeSession(MEMBERS)
    session.predict("the red cube").seconds = 2.5
    got = {}
    r = run_agent(session, "the red cube", captioner=Canned("x"), language_model=Canned("blue cube, red sphere"),
                  k=2, on_members=lambda c, m: got.update(confusers=c, masks=m))
    assert [c[0] for c in session.calls] == ["predict", "correct_each"]  # the prediction is not redone
    # votes [[2, 1, 1, 1], [0, 0, 0, 0]] of 2: (0, 0) wins; the 1–1 ties take FIRST's [1, 0, 0]
    np.testing.assert_array_equal(r.mask, [[1, 1, 0, 0], [0, 0, 0, 0]])
    assert r.iou == 0.5
    assert r.denoiser_calls == STEPS * 3 + 2 * STEPS * 4  # the reused prediction's cost is counted too
    assert r.seconds >= 2.5 and got["confusers"] == ["the blue cube", "the red sphere"] and len(got["masks"]) == 2


def test_run_agent_without_confusers_keeps_the_uncorrected_prediction():
    session = FakeSession(MEMBERS)
    r = run_agent(session, "the red cube", captioner=Canned("a red cube"), language_model=Canned("None."))
    assert [c[0] for c in session.calls] == ["predict"]
    np.testing.assert_array_equal(r.mask, FIRST)
    assert r.negatives == [] and r.agent["members"] == [] and "no confusing object" in r.agent["reasoning"]
    assert session.history[-1] is r and len(session.history) == 2
    with pytest.raises(UserError, match="k ≥ 1"):
        run_agent(session, "the red cube", captioner=Canned("x"), language_model=Canned("x"), k=0)


def test_run_agent_end_to_end_with_the_default_ranker_and_tiny_transformers(ranker, tiny_dirs, chat_server):
    scene = SceneRecord(image=np.zeros((2, 4, 3), np.uint8), objects=[
        _obj(1, "cube", (0, 0, 1, 1), size="large", color="red", material="metal"),
        _obj(2, "cube", (1, 0, 2, 1), size="large", color="blue", material="metal"),
        _obj(3, "cylinder", (2, 0, 3, 1), size="small", color="green", material="rubber")])
    session = FakeSession(MEMBERS, scene=scene)
    r = run_agent(session, "the large red metal cube", captioner=SceneCaptioner(), language_model=ranker, k=1)
    assert r.negatives == ["the large blue metal cube"]
    # the chat server as the language model: the prompt carries the caption and the expression
    chat_server.answer = "The small green rubber cylinder might be confused with it."
    r = run_agent(session, "the large red metal cube", captioner=SceneCaptioner(),
                  language_model=build_language_model(f"openai:{chat_server.url}#qwen"), k=2)
    prompt = chat_server.requests[-1]["body"]["messages"][0]["content"]
    assert "a large blue metal cube" in prompt and prompt.endswith("segmentation of the large red metal cube?")
    assert r.negatives == ["the small green rubber cylinder"]
    # the tiny transformers models through the whole workflow
    captioner = TransformersCaptioner(tiny_dirs / "captioner", max_new_tokens=4)
    lm = TransformersLM(tiny_dirs / "lm", max_new_tokens=8)
    r = run_agent(session, "the red cube", captioner=captioner, language_model=lm, k=2)
    assert r.kind == "agent" and isinstance(r.agent["answer"], str) and session.last is r
    assert len(r.negatives) <= 2 and r.mask.shape == FIRST.shape
