"""Text encoders: the real MiniLM offline (hash-checked), a tiny local CLIP, and the cache."""

from __future__ import annotations

import shutil

import pytest
import torch

from genperc.errors import UserError
from genperc.models import text as text_mod
from genperc.models.text import (
    MINILM_SHA256,
    CachedTextEncoder,
    CLIPTextEncoderLocal,
    MiniLMTextEncoder,
    TextEncoder,
    build_text_encoder,
    sha256_file,
)


@pytest.fixture(scope="module")
def minilm():
    return MiniLMTextEncoder()


def test_minilm_loads_offline_and_verifies_hash(minilm):
    assert isinstance(minilm, TextEncoder) and minilm.dim == 384
    assert sha256_file(minilm.path / "model.safetensors") == MINILM_SHA256
    hidden, mask = minilm.encode(["", "the red cube left of the sphere"])
    assert hidden.dtype == torch.float32 and mask.dtype == torch.bool
    assert hidden.shape[:2] == mask.shape and hidden.shape[0] == 2 and hidden.shape[2] == 384
    assert mask[0].sum() == 2 and mask[1].all()  # "" = [CLS] [SEP]; right padding
    assert not hidden.requires_grad


def test_minilm_null_is_not_zeros_and_texts_differ(minilm):
    null_h, null_m = minilm.null()
    assert null_h.shape[0] == 1 and null_m.all()
    assert null_h.abs().sum() > 0
    a, ma = minilm.encode(["a red cube"])
    b, mb = minilm.encode(["a blue sphere"])
    assert not torch.allclose(a, b)
    # Padding in a batch does not change a text's states (the mask covers the padding).
    both, mboth = minilm.encode(["a red cube", "the small cylinder behind the large metal sphere"])
    n = int(ma.sum())
    torch.testing.assert_close(both[0, :n], a[0, :n], rtol=1e-4, atol=1e-4)
    assert not mboth[0, n:].any()


def test_max_length_truncates(minilm):
    enc = MiniLMTextEncoder(max_length=8)
    h, m = enc.encode(["one two three four five six seven eight nine ten"])
    assert h.shape[1] == 8 and m.all()


def test_corrupted_weights_raise_hash_error(tmp_path, minilm):
    copy = tmp_path / "minilm"
    shutil.copytree(minilm.path, copy)
    weights = copy / "model.safetensors"
    with open(weights, "r+b") as f:
        f.seek(-1000, 2)
        byte = f.read(1)
        f.seek(-1000, 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(UserError) as e:
        MiniLMTextEncoder(copy)
    msg = str(e.value)
    assert "SHA-256" in msg and str(weights) in msg and MINILM_SHA256 in msg and "\n" not in msg
    (copy / "model.safetensors").unlink()
    with pytest.raises(UserError, match="missing .*model.safetensors"):
        MiniLMTextEncoder(copy)


def test_hash_is_computed_once_per_file_version(tmp_path, monkeypatch):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    calls = []
    real = text_mod.hashlib.sha256
    monkeypatch.setattr(text_mod.hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    first = sha256_file(f)
    assert sha256_file(f) == first and len(calls) == 1
    f.write_bytes(b"abcd")  # new size -> hashed again
    assert sha256_file(f) != first and len(calls) == 2


class _Counting:
    """Wraps an encoder and counts the texts it is asked to encode."""

    def __init__(self, inner):
        self.inner, self.dim, self.device, self.calls = inner, inner.dim, torch.device("cpu"), []

    def encode(self, texts):
        self.calls.append(list(texts))
        return self.inner.encode(texts)

    def null(self):
        return self.encode([""])


def test_cache_hits_do_not_call_the_model(minilm):
    counting = _Counting(minilm)
    cached = CachedTextEncoder(counting)
    texts = ["a red cube", "a blue sphere that is large", "a red cube"]
    h1, m1 = cached.encode(texts)
    assert counting.calls == [["a red cube", "a blue sphere that is large"]]  # deduplicated
    h2, m2 = cached.encode(texts)
    assert len(counting.calls) == 1 and cached.hits >= 3
    torch.testing.assert_close(h1, h2, rtol=0, atol=0)
    assert torch.equal(m1, m2)
    torch.testing.assert_close(h1[0], h1[2], rtol=0, atol=0)

    # Re-padding per batch: a short text alone is unpadded, in a batch it is padded with zeros.
    alone, malone = cached.encode(["a red cube"])
    assert malone.all() and len(counting.calls) == 1
    n = alone.shape[1]
    torch.testing.assert_close(h1[0, :n], alone[0], rtol=0, atol=0)
    assert not m1[0, n:].any() and h1[0, n:].abs().sum() == 0

    # Against the uncached encoder.
    direct, dmask = minilm.encode(["a blue sphere that is large"])
    torch.testing.assert_close(h1[1, : dmask.shape[1]], direct[0], rtol=1e-4, atol=1e-4)

    cached.null()
    cached.null()
    assert counting.calls[-1] == [""] and len(counting.calls) == 2


def test_cache_bound():
    class Fake:
        dim, device = 2, torch.device("cpu")

        def encode(self, texts):
            h = torch.stack([torch.full((3, 2), float(len(t))) for t in texts])
            return h, torch.ones(len(texts), 3, dtype=torch.bool)

    c = CachedTextEncoder(Fake(), max_entries=2)
    c.encode(["a", "bb"])
    c.encode(["ccc"])
    assert len(c) == 2 and "a" not in c._cache


# ---- a tiny local CLIP -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = tmp_path_factory.mktemp("sd")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c + "</w>"] = len(vocab)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(root / "tokenizer")
    torch.manual_seed(0)  # tests only: transformers initialises from the global RNG
    cfg = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=24,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    CLIPTextModel(cfg).save_pretrained(root / "text_encoder")
    return root


def test_local_clip_same_interface(tiny_clip_dir):
    enc = CLIPTextEncoderLocal(tiny_clip_dir)
    assert isinstance(enc, TextEncoder) and enc.dim == 32 and enc.max_length == 24
    h, m = enc.encode(["a red cube", "a blue sphere"])
    assert h.shape == (2, 24, 32) and m.all()  # SD convention: padded to max length, all attended
    assert not torch.allclose(h[0], h[1])
    null_h, _ = enc.null()
    assert null_h.shape == (1, 24, 32) and null_h.abs().sum() > 0

    masked = CLIPTextEncoderLocal(tiny_clip_dir, padding="longest", attend_to_padding=False)
    h2, m2 = masked.encode(["a red cube", "ab"])
    assert m2[0].all() and m2[1].sum() == 4  # <bos> a b</w> <eos>

    built = build_text_encoder(str(tiny_clip_dir))
    assert isinstance(built, CachedTextEncoder) and built.dim == 32
    assert CachedTextEncoder(built).encoder is built.encoder  # wrapping twice does not cache twice
    torch.testing.assert_close(built.encode(["a red cube"])[0], h[:1], rtol=1e-5, atol=1e-5)


def test_local_clip_directory_errors(tmp_path, tiny_clip_dir):
    with pytest.raises(UserError, match="not found"):
        CLIPTextEncoderLocal(tmp_path / "nope")
    copy = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, copy)
    (copy / "text_encoder" / "model.safetensors").rename(copy / "text_encoder" / "pytorch_model.bin")
    with pytest.raises(UserError, match="pickle only"):
        CLIPTextEncoderLocal(copy)
    (copy / "text_encoder" / "pytorch_model.bin").unlink()
    with pytest.raises(UserError, match="missing .*model.safetensors"):
        CLIPTextEncoderLocal(copy)


def test_build_text_encoder_names():
    with pytest.raises(UserError, match="minilm"):
        build_text_encoder("t5-xxl")
    enc = build_text_encoder("minilm", cache=False)
    assert isinstance(enc, MiniLMTextEncoder)
