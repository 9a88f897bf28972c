"""Local diffusers-format checkpoints: loading, conv_in widening, wrapping, and the VAE latent space.

Every model here is a tiny random diffusers model written with ``save_pretrained`` into a
Stable Diffusion-style folder; nothing is downloaded.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from genperc.diffusion.conditioning import Conditioning
from genperc.errors import UserError
from genperc.models.denoiser import Denoiser
from genperc.models.latent import ImageSpace, LatentSpace, PixelSpace, build_image_space
from genperc.models.pretrained import load_pretrained_unet, load_pretrained_vae, widen_conv_in

TEXT_DIM = 12


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _tiny_unet(in_channels=4, out_channels=4, seed=0) -> UNet2DConditionModel:
    torch.manual_seed(seed)  # diffusers initialises from the global RNG; tests only
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=out_channels,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=2,
    ).eval()
    with torch.no_grad():  # a non-zero bias, so that forgetting to copy it shows
        unet.conv_in.bias.normal_(generator=torch.Generator().manual_seed(seed + 1))
    return unet


def _write_pipeline(root, unet=None, vae=None):
    root.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1"}
    if unet is not None:
        unet.save_pretrained(root / "unet")
        index["unet"] = ["diffusers", "UNet2DConditionModel"]
    if vae is not None:
        vae.save_pretrained(root / "vae")
        index["vae"] = ["diffusers", "AutoencoderKL"]
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def _run(unet, x, text):
    with torch.no_grad():
        return unet(x, torch.tensor([10, 700]), encoder_hidden_states=text).sample


@pytest.fixture(scope="module")
def inputs():
    return _randn(2, 4, 8, 8, seed=3), _randn(2, 3, TEXT_DIM, seed=4)


# ---- loading -------------------------------------------------------------------------------


def test_load_sd_layout_and_bare_folder(tmp_path, inputs):
    x, text = inputs
    unet = _tiny_unet()
    root = _write_pipeline(tmp_path / "sd", unet=unet)
    for loaded in (load_pretrained_unet(root), load_pretrained_unet(root / "unet")):
        torch.testing.assert_close(_run(loaded.eval(), x, text), _run(unet, x, text), rtol=0, atol=0)


def test_incomplete_directories_are_one_line_errors(tmp_path):
    def err(path, **kw) -> str:
        with pytest.raises(UserError) as e:
            load_pretrained_unet(path, **kw)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "not found" in err(tmp_path / "missing")

    root = _write_pipeline(tmp_path / "nounet")  # model_index.json only
    assert "unet/config.json" in err(root)

    root = _write_pipeline(tmp_path / "sd", unet=_tiny_unet())
    weights = root / "unet" / "diffusion_pytorch_model.safetensors"
    cfg = root / "unet" / "config.json"

    cfg.rename(cfg.with_suffix(".bak"))
    assert "missing" in (msg := err(root)) and str(cfg) in msg
    cfg.with_suffix(".bak").rename(cfg)

    weights.rename(root / "unet" / "moved")
    assert "missing" in (msg := err(root)) and str(weights) in msg

    (root / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not really a pickle")
    assert "pickle only" in (msg := err(root)) and "safetensors" in msg

    (root / "unet" / "moved").rename(weights)
    cfg.write_text("{not json")
    assert "not valid JSON" in err(root)

    vae_root = _write_pipeline(tmp_path / "vae_only", vae=_tiny_vae())
    assert "AutoencoderKL, not a UNet2DConditionModel" in err(vae_root / "vae")


# ---- widening conv_in ------------------------------------------------------------------------


def test_widen_zero_keeps_outputs_and_copies_bias(inputs):
    x, text = inputs
    unet = _tiny_unet()
    ref = _run(unet, x, text)
    old_w, old_b = unet.conv_in.weight.detach().clone(), unet.conv_in.bias.detach().clone()

    widen_conv_in(unet, 8, mode="zero")
    assert unet.conv_in.in_channels == 8 and unet.config.in_channels == 8
    torch.testing.assert_close(unet.conv_in.bias, old_b, rtol=0, atol=0)  # diffusers issue #4960
    torch.testing.assert_close(unet.conv_in.weight[:, :4], old_w, rtol=0, atol=0)
    assert unet.conv_in.weight[:, 4:].abs().sum() == 0
    assert unet.conv_in.weight.requires_grad
    out = _run(unet, torch.cat([x, torch.zeros_like(x)], 1), text)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_widen_tile_marigold(inputs):
    x, text = inputs
    unet = _tiny_unet()
    ref = _run(unet, x, text)
    old_w, old_b = unet.conv_in.weight.detach().clone(), unet.conv_in.bias.detach().clone()
    widen_conv_in(unet, 8, mode="tile")
    torch.testing.assert_close(unet.conv_in.weight[:, 4:], old_w * 0.5)
    torch.testing.assert_close(unet.conv_in.bias, old_b, rtol=0, atol=0)
    # The same latent fed twice reproduces the old response.
    torch.testing.assert_close(_run(unet, torch.cat([x, x], 1), text), ref, rtol=1e-5, atol=1e-5)


def test_widen_errors():
    unet = _tiny_unet()
    with pytest.raises(UserError, match="mode"):
        widen_conv_in(unet, 8, mode="copy")
    with pytest.raises(UserError, match="fewer"):
        widen_conv_in(unet, 2)
    with pytest.raises(UserError, match="multiple of 4"):
        widen_conv_in(unet, 6, mode="tile")


def test_widened_unet_saves_and_reloads(tmp_path, inputs):
    x, text = inputs
    unet = widen_conv_in(_tiny_unet(), 8, mode="zero")
    with torch.no_grad():
        unet.conv_in.weight[:, 4:].normal_(generator=torch.Generator().manual_seed(9))  # "trained"
    xin = torch.cat([x, _randn(2, 4, 8, 8, seed=7)], 1)
    root = _write_pipeline(tmp_path / "ip2p", unet=unet)
    loaded = load_pretrained_unet(root).eval()
    assert loaded.config.in_channels == 8
    torch.testing.assert_close(_run(loaded, xin, text), _run(unet, xin, text), rtol=0, atol=0)


# ---- wrapping as a genperc Denoiser ------------------------------------------------------------


def test_from_diffusers_widens_and_round_trips(tmp_path, inputs):
    x, text = inputs
    unet = _tiny_unet()
    ref = _run(unet, x, text)
    root = _write_pipeline(tmp_path / "sd", unet=unet)

    d = Denoiser.from_diffusers(root, cond_channels=4).eval()  # InstructPix2Pix-style
    cfg = d.config
    assert (cfg.in_channels, cfg.cond_channels, cfg.text_dim, cfg.arch) == (4, 4, TEXT_DIM, "diffusers")
    assert d.backbone.config.in_channels == 8
    cond = Conditioning(text=text, image=torch.zeros_like(x))
    with torch.no_grad():
        torch.testing.assert_close(d(x, torch.tensor([10, 700]), cond), ref, rtol=0, atol=0)
        d.save_pretrained(tmp_path / "ckpt")
        again = Denoiser.from_pretrained(tmp_path / "ckpt").eval()
        torch.testing.assert_close(again(x, torch.tensor([10, 700]), cond), ref, rtol=0, atol=0)

    with pytest.raises(UserError, match="cond_channels=4"):
        d(x, 1, Conditioning(text=text, image=_randn(2, 3, 8, 8)))


def test_from_diffusers_text_projection_and_classes(tmp_path, inputs):
    x, text = inputs
    unet = _tiny_unet()
    root = _write_pipeline(tmp_path / "sd", unet=unet)
    d = Denoiser.from_diffusers(root, text_dim=384, num_classes=3).eval()  # MiniLM into a CLIP-width UNet
    assert d.config.text_dim == 384 and d.backbone.config.encoder_hid_dim == 384
    big_text = _randn(2, 3, 384, seed=8)
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        with_labels = d(x, 5, Conditioning(text=big_text, class_labels=labels))
        null_labels = d(x, 5, Conditioning(text=big_text))
        torch.testing.assert_close(with_labels, null_labels)  # class embedding starts at zero
        d.save_pretrained(tmp_path / "ckpt")
        again = Denoiser.from_pretrained(tmp_path / "ckpt").eval()
        torch.testing.assert_close(
            again(x, 5, Conditioning(text=big_text, class_labels=labels)), with_labels, rtol=0, atol=0
        )


@pytest.mark.parametrize(("widen_mode", "image_first"), [("tile", True), ("zero", False)])
def test_from_diffusers_already_wide_layout_channel_order(tmp_path, inputs, widen_mode, image_first):
    """A released 8-channel UNet is used as is; Marigold's (``tile``) sees ``[image, x_t]``
    (MarigoldDepthPipeline: ``cat([image_latent, pred_latent])``), InstructPix2Pix's (``zero``)
    ``[x_t, image]`` (StableDiffusionInstructPix2PixPipeline), and the order survives a save."""
    x, text = inputs
    unet = _tiny_unet(in_channels=8, out_channels=4)
    root = _write_pipeline(tmp_path / "wide", unet=unet)
    d = Denoiser.from_diffusers(root, cond_channels=4, widen_mode=widen_mode).eval()
    assert d.config.image_first is image_first
    torch.testing.assert_close(d.backbone.conv_in.weight, unet.conv_in.weight, rtol=0, atol=0)
    image = _randn(2, 4, 8, 8, seed=11)
    expected_input = torch.cat([image, x] if image_first else [x, image], 1)
    cond = Conditioning(text=text, image=image)
    with torch.no_grad():
        expected = _run(unet, expected_input, text)
        torch.testing.assert_close(d(x, torch.tensor([10, 700]), cond), expected)
        d.save_pretrained(tmp_path / "ckpt")
        again = Denoiser.from_pretrained(tmp_path / "ckpt").eval()
        torch.testing.assert_close(again(x, torch.tensor([10, 700]), cond), expected, rtol=0, atol=0)
    with pytest.raises(UserError, match="set cond_channels=4"):
        Denoiser.from_diffusers(root, cond_channels=0)


# ---- latent space ------------------------------------------------------------------------------


def _tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)  # tests only
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=0.5,
    ).eval()


def test_latent_space_round_trip(tmp_path):
    root = _write_pipeline(tmp_path / "sd", vae=_tiny_vae())
    space = LatentSpace(root)
    assert (space.channels(), space.channels(1), space.scale_factor, space.scaling_factor) == (4, 4, 2, 0.5)
    assert space.latent_shape((2, 1, 16, 16)) == (2, 4, 8, 8)
    images = _randn(2, 3, 16, 16).clamp(-1, 1)
    z = space.encode(images)
    assert z.shape == (2, 4, 8, 8) and not z.requires_grad
    torch.testing.assert_close(space.encode(images), z, rtol=0, atol=0)  # mean: deterministic
    with torch.no_grad():
        mean = space.vae.encode(images).latent_dist.mean
    torch.testing.assert_close(z, mean * 0.5)
    with torch.no_grad():
        raw = space.vae.decode(z / 0.5).sample  # x = D(z / scaling_factor)
    assert raw.abs().max() > 1  # the tiny VAE leaves [-1, 1], so the clamp below is exercised
    torch.testing.assert_close(space.decode(z), raw.clamp(-1, 1))
    torch.testing.assert_close(LatentSpace(root, clamp=False).decode(z), raw)

    sampler = LatentSpace(root / "vae", encode_mode="sample")
    a = sampler.encode(images, generator=torch.Generator().manual_seed(1))
    b = sampler.encode(images, generator=torch.Generator().manual_seed(1))
    c = sampler.encode(images, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    with pytest.raises(UserError, match="Generator"):
        sampler.encode(images)
    # A one-channel target (depth) is replicated to RGB before encoding (Marigold).
    depth = images[:, :1]
    torch.testing.assert_close(space.encode(depth), space.encode(depth.repeat(1, 3, 1, 1)), rtol=0, atol=0)
    with pytest.raises(UserError, match=r"\[B, 3, H, W\]"):
        space.encode(_randn(2, 2, 16, 16))


def test_pixel_space_and_builder(tmp_path):
    px = build_image_space(None)
    assert isinstance(px, ImageSpace) and isinstance(px, PixelSpace)
    assert (px.channels(), px.channels(1), px.scale_factor) == (3, 1, 1)
    assert px.latent_shape((2, 1, 8, 8)) == (2, 1, 8, 8)
    images = _randn(1, 3, 8, 8)
    assert px.encode(images) is images and px.decode(images) is images
    with pytest.raises(UserError, match="VAE directory not found"):
        build_image_space(tmp_path / "no_vae")
    root = _write_pipeline(tmp_path / "v", vae=_tiny_vae())
    latent = build_image_space(root)
    assert isinstance(latent, LatentSpace) and isinstance(latent, ImageSpace)
    assert load_pretrained_vae(root).config.latent_channels == 4
