"""genperc.runtime: threads from the affinity (never from timing), precision resolution, and the
classic attention processor computing the same function as SDPA."""

import os

import pytest
import torch

from genperc import runtime
from genperc.diffusion.conditioning import Conditioning
from genperc.errors import UserError
from genperc.models.registry import create_denoiser


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_default_to_the_affinity_and_obey_the_user(restore_threads, capsys):
    assert runtime.configure_threads(None, announce=True) == len(os.sched_getaffinity(0)) == torch.get_num_threads()
    assert "torch threads" in capsys.readouterr().err  # stderr: stdout stays the command's
    assert runtime.configure_threads(1, announce=False) == 1 == torch.get_num_threads()


def test_precision_resolution(monkeypatch):
    assert runtime.resolve_precision("no") == "no" and runtime.resolve_precision("bf16") == "bf16"
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert runtime.resolve_precision("auto", "cpu") == "bf16"
    assert runtime.speed_options("cpu") == runtime.SpeedOptions(bf16=True, classic_attention=True, fused_adamw=True)
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2"})
    assert runtime.resolve_precision("auto", "cpu") == "no"
    assert not runtime.speed_options("cpu").classic_attention  # slower than SDPA in fp32 (bench)
    with pytest.raises(UserError, match="mixed_precision='fp8'"):
        runtime.resolve_precision("fp8")


def test_classic_attention_is_the_same_function():
    model = create_denoiser("unet-tiny", seed=0, sample_size=16, in_channels=3, cond_channels=3, text_dim=32).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 16, generator=g)
    cond = Conditioning(text=torch.randn(2, 5, 32, generator=g), text_mask=torch.tensor([[1] * 5, [1, 1, 1, 0, 0]]).bool(),
                        image=torch.randn(2, 3, 16, 16, generator=g))
    t = torch.tensor([10, 900])
    with torch.no_grad():
        before = model(x, t, cond)
        changed = runtime.use_classic_attention(model)
        after = model(x, t, cond)
    assert changed > 0 and runtime.use_classic_attention(model) == 0
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_the_trainer_resolves_auto_precision(tmp_path, monkeypatch):
    from genperc.config import load_config
    from genperc.training.trainer import Trainer

    first = Trainer(load_config("cpu-tiny", ["model.text_encoder=none", "train.mixed_precision=bf16"]), tmp_path / "a")
    assert first.precision == "bf16"
    monkeypatch.setattr(runtime, "cpu_flags", lambda: set())
    cfg = load_config("cpu-tiny", ["model.text_encoder=none", "train.progress=false"])
    assert cfg.train.mixed_precision == "auto"
    trainer = Trainer(cfg, tmp_path / "b")  # a second precision in the same process is allowed
    assert trainer.precision == "no" and not trainer.speed.classic_attention
