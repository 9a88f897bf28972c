"""Parity with diffusers' ``MarigoldDepthPipeline`` on tiny random models (Ke et al. 2024, §3.3).

A Marigold UNet reads ``cat([image_latent, noisy_latent])``; genperc loads the same UNet through
``Denoiser.from_diffusers`` with the Marigold widening and must produce the same depth latent and
the same depth from the same starting latents (DDIM, v-prediction, empty prompt).
"""

from __future__ import annotations

import json

import pytest
import torch

from genperc.diffusion.conditioning import Conditioning
from genperc.diffusion.sampler import sample
from genperc.diffusion.schedule import DiffusionConfig, NoiseSchedule
from genperc.models.denoiser import Denoiser
from genperc.models.latent import LatentSpace
from genperc.tasks.depth import DepthTask

TEXT_WIDTH = 16


def _tiny_clip(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=8)
    encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=TEXT_WIDTH, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )).eval()
    return tokenizer, encoder


def _tiny_marigold(tmp_path):
    """An 8-channel UNet (Marigold's layout) whose two input halves have different weights, so a
    swapped concatenation changes the output, and a VAE with a 2× downsampling."""
    from diffusers import AutoencoderKL, MarigoldDepthPipeline, UNet2DConditionModel

    torch.manual_seed(0)  # weight init only; the sampling inputs come from explicit generators
    tokenizer, text_encoder = _tiny_clip(tmp_path)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=8, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=2, norm_num_groups=4,
    ).eval()
    vae = AutoencoderKL(
        block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
    ).eval()
    schedule = NoiseSchedule(DiffusionConfig(prediction_type="v", timestep_spacing="trailing"))
    pipe = MarigoldDepthPipeline(unet=unet, vae=vae, scheduler=schedule.make_scheduler("ddim"),
                                 text_encoder=text_encoder, tokenizer=tokenizer, prediction_type="depth")
    pipe.set_progress_bar_config(disable=True)
    root = tmp_path / "marigold"
    pipe.save_pretrained(root)
    return pipe, schedule, root


STEPS = 3


def _pipeline_run(pipe):
    """An image in the pipeline's input range [0, 1], the starting latents, and the pipeline's
    output for them (native processing resolution, no ensemble)."""
    g = torch.Generator().manual_seed(0)
    image01 = torch.rand(1, 3, 16, 16, generator=g)
    x_T = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        out = pipe(image01, num_inference_steps=STEPS, processing_resolution=0, match_input_resolution=False,
                   latents=x_T, output_type="pt", output_latent=True)
    return image01, x_T, out


def test_marigold_depth_matches_diffusers_pipeline(tmp_path):
    pipe, schedule, root = _tiny_marigold(tmp_path)
    image01, x_T, expected = _pipeline_run(pipe)
    empty_text = pipe.empty_text_embedding

    denoiser = Denoiser.from_diffusers(root, cond_channels=4, widen_mode="tile").eval()
    assert denoiser.config.image_first
    space = LatentSpace(root)
    task = DepthTask()
    with torch.no_grad():
        image_latent = space.encode(image01 * 2 - 1)
        cond = Conditioning(text=empty_text, image=image_latent)
        latent = sample(denoiser, x_T, cond, schedule=schedule, sampler="ddim", num_steps=STEPS).sample
        # what evaluation does for a task that clamps after its own decoding (Marigold: mean, then clip)
        assert task.clamps_own_decode
        generated = space.decode(latent, clamp=False)
        depth = task.decode(generated)

    assert (expected.latent - x_T).abs().max() > 0.1  # the sampler moved the latents
    torch.testing.assert_close(latent, expected.latent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((depth + 1) / 2, expected.prediction, rtol=1e-5, atol=1e-5)
    # clipping each channel before the mean (the order before) would not match here
    assert generated.abs().max() > 1
    per_channel_first = (task.decode(generated.clamp(-1, 1)) + 1) / 2
    assert (per_channel_first - expected.prediction).abs().max() > 1e-3


def test_swapped_order_breaks_parity(tmp_path):
    """The same UNet with genperc's default order ``[x_t, image]`` gives a different latent: the
    parity above really depends on the order."""
    pipe, schedule, root = _tiny_marigold(tmp_path)
    image01, x_T, expected = _pipeline_run(pipe)
    with torch.no_grad():
        swapped = Denoiser.from_diffusers(root, cond_channels=4, widen_mode="tile", image_first=False).eval()
        cond = Conditioning(text=pipe.empty_text_embedding, image=LatentSpace(root).encode(image01 * 2 - 1))
        latent = sample(swapped, x_T, cond, schedule=schedule, sampler="ddim", num_steps=STEPS).sample
    with pytest.raises(AssertionError):
        torch.testing.assert_close(latent, expected.latent, rtol=1e-5, atol=1e-5)
