"""How a genperc process uses its machine: threads, precision and the fast kernels (issue 11).

No load-sensitive probing anywhere: what is chosen depends on the hardware and on the user's
settings only, so a seed gives the same numbers on a busy machine as on a quiet one.

* :func:`configure_threads` — the cores this process may run on (``os.sched_getaffinity``)
  unless the user names a count; printed, so logs say what was used.
* :func:`resolve_precision` — ``train.mixed_precision: auto`` becomes ``bf16`` on a CUDA GPU
  with bf16, and on a CPU with native bf16 arithmetic (AVX-512 BF16 or AMX), else ``no``.
* :func:`speed_options` / :func:`use_classic_attention` — the kernels that ``make bench``
  measured to pay on a device (``benchmarks/bench_train.py`` prints each lever's time ratio).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

PRECISIONS = ("auto", "no", "fp16", "bf16")


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def configure_threads(threads: int | None = None, announce: bool = True) -> int:
    """Set torch's intra-op threads to ``threads`` (None or 0: :func:`available_cores`) and
    return the count used. Never timed: a probe on a shared machine picks differently from run
    to run, and the thread count changes the summation order, hence the numbers."""
    n = threads if threads and threads > 0 else available_cores()
    torch.set_num_threads(n)
    if announce:
        print(f"[genperc] torch threads: {n}" + ("" if threads else " (the cores this process may run on)"),
              file=sys.stderr, flush=True)
    return n


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX-BF16: bf16 matmuls run at ~2× fp32 here (bench: matmul peak)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def resolve_precision(mixed_precision: str, device: str | torch.device = "cpu") -> str:
    """``auto`` → ``bf16`` where the device computes bf16 natively, else ``no``; other values as given."""
    if mixed_precision not in PRECISIONS:
        from genperc.errors import UserError

        raise UserError(f"train.mixed_precision={mixed_precision!r} is not valid", "use auto, no, fp16 or bf16")
    if mixed_precision != "auto":
        return mixed_precision
    if torch.device(device).type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_has_native_bf16() else "no"


@dataclass(frozen=True)
class SpeedOptions:
    """The kernels used on a device; each was kept because ``make bench`` showed it pays there."""

    bf16: bool
    classic_attention: bool
    fused_adamw: bool


def speed_options(device: str | torch.device = "cpu", precision: str = "auto") -> SpeedOptions:
    """What ``benchmarks/bench_train.py`` measured on the 2-core AMD EPYC (AVX-512 BF16), as step-time
    ratios over fp32 + SDPA for unet-tiny 32 px / unet-small 64 px (README, Benchmarks): bf16
    0.87 / 0.59; bf16 + classic attention 0.60 / 0.54; classic attention in fp32 1.15 / 1.00 (so only
    under bf16); channels_last 0.63 / 0.63 on top of bf16 + classic (not used); fused AdamW
    0.57 / 0.55 (kept)."""
    bf16 = resolve_precision(precision, device) == "bf16"
    cpu = torch.device(device).type == "cpu"
    return SpeedOptions(bf16=bf16, classic_attention=cpu and bf16, fused_adamw=True)


def use_classic_attention(model: torch.nn.Module) -> int:
    """Give every diffusers attention layer of ``model`` the classic processor (``baddbmm`` +
    softmax) instead of SDPA. On a CPU, torch's flash-attention kernel is slow for the narrow heads
    of the small presets (8 channels per head): bench_train measures the ratio. Same mathematics;
    returns the number of layers changed."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    changed = 0
    for module in model.modules():
        if isinstance(module, Attention) and type(module.processor).__name__ == "AttnProcessor2_0":
            module.set_processor(AttnProcessor())
            changed += 1
    return changed
