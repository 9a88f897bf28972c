"""Denoiser architectures (the registry), forward conventions and genperc checkpoints (tiny random models, CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from genperc.diffusion.conditioning import Conditioning
from genperc.errors import UserError
from genperc.models.denoiser import Denoiser, DenoiserConfig
from genperc.models.registry import create_denoiser, denoiser_config, list_architectures


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=_gen(seed))


def _text(b=2, length=5, dim=384, seed=1):
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[0, 3:] = False
    return _randn(b, length, dim, seed=seed), mask


# ---- architectures-----------------------------------------------------------------------------


def test_architectures_listed():
    assert {"unet-tiny", "unet-small", "unet-base", "dit-small"} <= set(list_architectures())


@pytest.mark.parametrize(
    "arch,text_dim,lo,hi",
    [
        ("unet-tiny", 384, 1.5e6, 2.5e6),
        ("unet-tiny", 0, 0.8e6, 2.5e6),
        ("unet-small", 384, 10e6, 20e6),
        ("unet-small", 0, 10e6, 20e6),
        ("unet-base", 384, 60e6, 100e6),
        ("unet-base", 0, 60e6, 100e6),
        ("dit-small", 384, 25e6, 40e6),
        ("dit-small", 0, 25e6, 40e6),
    ],
)
def test_arch_param_counts(arch, text_dim, lo, hi):
    n = create_denoiser(arch, text_dim=text_dim).num_parameters()
    assert lo <= n <= hi, f"{arch} text_dim={text_dim}: {n / 1e6:.2f} M parameters"


@pytest.mark.parametrize(
    "arch,overrides,size",
    [
        ("unet-tiny", dict(text_dim=384, cond_channels=3, num_classes=4, learned_variance=True), 32),
        ("unet-tiny", dict(num_classes=4), 32),  # text-free, class-conditional
        ("unet-tiny", dict(), 16),  # unconditional
        ("unet-small", dict(text_dim=384, cond_channels=4, in_channels=4), 16),
        ("unet-base", dict(text_dim=384, cond_channels=1), 8),
        ("dit-small", dict(text_dim=384, cond_channels=3, sample_size=8, num_layers=2), 8),  # PixArt
        ("dit-small", dict(num_classes=10, learned_variance=True, sample_size=8, num_layers=2), 8),  # DiT
        ("dit-small", dict(sample_size=8, num_layers=2), 8),  # unconditional DiT
    ],
)
def test_every_arch_runs_forward(arch, overrides, size):
    d = create_denoiser(arch, **overrides)
    cfg = d.config
    b = 2
    cond = Conditioning(
        text=_text(dim=cfg.text_dim)[0] if cfg.text_dim else None,
        text_mask=_text(dim=cfg.text_dim)[1] if cfg.text_dim else None,
        image=_randn(b, cfg.cond_channels, size, size, seed=2) if cfg.cond_channels else None,
        class_labels=torch.tensor([0, cfg.num_classes]) if cfg.num_classes else None,
    )
    with torch.no_grad():
        out = d(_randn(b, cfg.in_channels, size, size), torch.tensor([3, 900]), cond)
    want_out = cfg.in_channels * (2 if cfg.learned_variance else 1)
    assert cfg.out_channels == want_out
    assert out.shape == (b, want_out, size, size)
    assert torch.isfinite(out).all()


def test_backbone_choice_follows_conditioning():
    assert create_denoiser("unet-tiny").config.backbone_class == "UNet2DConditionModel"
    kinds = {d.down_block_types for d in [create_denoiser("unet-tiny").backbone.config]}
    assert kinds == {("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")}  # text-free: self-attention
    assert create_denoiser("unet-tiny", text_dim=384).backbone.config.down_block_types[1] == "CrossAttnDownBlock2D"
    assert create_denoiser("dit-small", text_dim=16, num_layers=1).config.backbone_class == "PixArtTransformer2DModel"
    assert create_denoiser("dit-small", num_layers=1).config.backbone_class == "DiTTransformer2DModel"
    with pytest.raises(UserError, match="not both"):
        create_denoiser("dit-small", text_dim=16, num_classes=3, num_layers=1)


# ---- forward conventions ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["unet-tiny", "dit-small"])
def test_masked_text_tokens_are_ignored(arch):
    kw = dict(sample_size=8, num_layers=1) if arch == "dit-small" else {}
    d = create_denoiser(arch, text_dim=16, **kw).eval()
    text, mask = _text(dim=16)
    x, size = _randn(2, 3, 8, 8), 8
    assert x.shape[-1] == size
    changed = text.clone()
    changed[0, 3:] = 100.0  # masked-out tokens of sample 0
    with torch.no_grad():
        a = d(x, 10, Conditioning(text=text, text_mask=mask))
        b = d(x, 10, Conditioning(text=changed, text_mask=mask))
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[1], b[1])


def test_missing_class_labels_mean_null_class():
    d = create_denoiser("unet-tiny", num_classes=3).eval()
    assert d.null_class == 3
    x = _randn(2, 3, 16, 16)
    with torch.no_grad():
        a = d(x, 5, Conditioning())
        b = d(x, 5, Conditioning(class_labels=torch.tensor([3, 3])))
    torch.testing.assert_close(a, b)
    with pytest.raises(UserError, match=r"\[0, 3\]"):
        d(x, 5, Conditioning(class_labels=torch.tensor([0, 4])))


def test_dit_has_no_global_rng_label_dropout():
    d = create_denoiser("dit-small", num_classes=5, sample_size=8, num_layers=1).train()
    x, labels = _randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(0)
    a = d(x, 7, Conditioning(class_labels=labels))
    torch.manual_seed(1)
    b = d(x, 7, Conditioning(class_labels=labels))
    torch.testing.assert_close(a, b)


def test_gradients_reach_all_input_paths():
    d = create_denoiser("unet-tiny", text_dim=8, cond_channels=1, num_classes=2)
    text, mask = _text(dim=8)
    out = d(
        _randn(2, 3, 16, 16), torch.tensor([1, 2]), Conditioning(text=text, text_mask=mask, image=_randn(2, 1, 16, 16))
    )
    out.square().mean().backward()
    bb = d.backbone
    assert [n for n, p in d.named_parameters() if p.grad is None] == []  # DDP: no unused parameters
    assert bb.conv_in.weight.grad is not None and bb.conv_in.weight.grad[:, 3].abs().sum() > 0
    assert bb.class_embedding.weight.grad[2].abs().sum() > 0  # the null row was used


def test_condition_errors_are_user_errors():
    d = create_denoiser("unet-tiny", cond_channels=3)
    x = _randn(1, 3, 16, 16)
    with pytest.raises(UserError, match="cond_channels=3") as e:
        d(x, 1, Conditioning(image=_randn(1, 4, 16, 16)))
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="cond.image is None"):
        d(x, 1, Conditioning())
    with pytest.raises(UserError, match="does not match x_t"):
        d(x, 1, Conditioning(image=_randn(1, 3, 8, 8)))
    with pytest.raises(UserError, match="channels but the denoiser denoises 3"):
        d(_randn(1, 4, 16, 16), 1, Conditioning(image=_randn(1, 3, 16, 16)))
    with pytest.raises(UserError, match="no text conditioning"):
        d(x, 1, Conditioning(image=x, text=_randn(1, 2, 8)))
    t = create_denoiser("unet-tiny", text_dim=8)
    with pytest.raises(UserError, match="text-conditioned"):
        t(x, 1, Conditioning())
    with pytest.raises(UserError, match=r"expected \[1, L, 8\]"):
        t(x, 1, Conditioning(text=_randn(1, 2, 9)))


def test_unknown_arch_and_option():
    with pytest.raises(UserError) as e:
        create_denoiser("unet-huge")
    msg = str(e.value)
    assert "unet-huge" in msg and all(p in msg for p in list_architectures())
    with pytest.raises(UserError, match="valid options:.*text_dim"):
        create_denoiser("unet-tiny", txt_dim=384)
    with pytest.raises(UserError, match="norm_num_groups"):
        create_denoiser("unet-tiny", block_out_channels=(30, 60, 60))


# ---- checkpoints -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch,overrides",
    [
        ("unet-tiny", dict(text_dim=16, cond_channels=2, num_classes=3, learned_variance=True)),
        ("dit-small", dict(num_classes=3, sample_size=8, num_layers=1, cond_channels=1)),
        ("dit-small", dict(text_dim=16, sample_size=8, num_layers=1)),
    ],
)
def test_save_load_round_trip(tmp_path, arch, overrides):
    d = create_denoiser(arch, **overrides).eval()
    cfg = d.config
    text, mask = _text(dim=16)
    cond = Conditioning(
        text=text if cfg.text_dim else None,
        text_mask=mask if cfg.text_dim else None,
        image=_randn(2, cfg.cond_channels, 8, 8) if cfg.cond_channels else None,
        class_labels=torch.tensor([1, 2]) if cfg.num_classes else None,
    )
    x = _randn(2, 3, 8, 8, seed=5)
    target = tmp_path / "ckpt"
    d.save_pretrained(target)
    d.save_pretrained(target)  # overwriting an existing checkpoint is atomic too
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name != "ckpt"]  # no temp dirs left behind
    saved = json.loads((target / "config.json").read_text())
    assert saved["arch"] == arch and saved["backbone_class"] == cfg.backbone_class

    loaded = Denoiser.from_pretrained(target).eval()
    assert loaded.config == cfg
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(x, torch.tensor([1, 500]), cond), d(x, torch.tensor([1, 500]), cond), rtol=0, atol=0
        )


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        Denoiser.from_pretrained(tmp_path / "nope")
    d = create_denoiser("unet-tiny")
    d.save_pretrained(tmp_path / "c")
    (tmp_path / "c" / "model.safetensors").unlink()
    with pytest.raises(UserError, match="missing .*model.safetensors"):
        Denoiser.from_pretrained(tmp_path / "c")
    d.save_pretrained(tmp_path / "c")
    raw = json.loads((tmp_path / "c" / "config.json").read_text())
    raw["blocks"] = 3
    (tmp_path / "c" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match="unknown key.*'blocks'"):
        Denoiser.from_pretrained(tmp_path / "c")


def test_config_dict_round_trip_and_caller_config_untouched():
    cfg = denoiser_config("unet-tiny", text_dim=384)
    assert cfg.backbone_class is None
    d = Denoiser(cfg)
    assert cfg.backbone_class is None and d.config.backbone_class == "UNet2DConditionModel"
    again = DenoiserConfig.from_dict(json.loads(json.dumps(d.config.to_dict())))
    assert again == d.config


def test_seeded_init_is_reproducible_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = create_denoiser("unet-tiny", seed=3)
    b = create_denoiser("unet-tiny", seed=3)
    c = create_denoiser("unet-tiny", seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_checkpoint_from_before_arch_and_image_first_loads_unchanged(tmp_path):
    """A config.json written before the rename says ``preset`` and has no ``image_first``: it loads
    with the same architecture name and genperc's own order ``[x_t, image]``, and the same output."""
    d = create_denoiser("unet-tiny", cond_channels=3, seed=0).eval()
    d.save_pretrained(tmp_path / "c")
    raw = json.loads((tmp_path / "c" / "config.json").read_text())
    raw["preset"] = raw.pop("arch")
    del raw["image_first"]
    (tmp_path / "c" / "config.json").write_text(json.dumps(raw))
    old = Denoiser.from_pretrained(tmp_path / "c").eval()
    assert old.config.arch == "unet-tiny" and old.config.image_first is False
    x, image = _randn(2, 3, 8, 8, seed=1), _randn(2, 3, 8, 8, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(old(x, 3, Conditioning(image=image)), d(x, 3, Conditioning(image=image)),
                                   rtol=0, atol=0)
        # the order is a real property: image-first reads the same weights differently
        d.config.image_first = True
        assert not torch.allclose(d(x, 3, Conditioning(image=image)), old(x, 3, Conditioning(image=image)))
