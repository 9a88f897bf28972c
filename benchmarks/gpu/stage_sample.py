"""Stage 3: genperc's sampler against diffusers' StableDiffusionInstructPix2PixPipeline on the same
UNet (genperc's denoiser backbone, random weights), scheduler, steps, guidance and text encoder."""

from __future__ import annotations

import torch
from common import Ctx, timed, tiny_clip, tiny_vae

# (arch, latent pixels, batch, DDIM steps)
GPU_CASES = [("unet-small", 64, 64, 20), ("unet-base", 64, 32, 20)]
SMOKE_CASES = [("unet-tiny", 8, 2, 3)]
TEXT_SCALE, IMAGE_SCALE = 7.5, 1.5


def _case(ctx: Ctx, arch: str, size: int, batch: int, steps: int, dtype: torch.dtype) -> dict:
    from diffusers import StableDiffusionInstructPix2PixPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    from genperc.diffusion.conditioning import Conditioning
    from genperc.diffusion.guidance import InstructPix2PixGuidance
    from genperc.diffusion.sampler import sample
    from genperc.diffusion.schedule import DiffusionConfig, NoiseSchedule
    from genperc.models.registry import create_denoiser

    clip = tiny_clip(ctx.work / "tiny-clip")
    tokenizer = CLIPTokenizer.from_pretrained(str(clip / "tokenizer"))
    text_encoder = CLIPTextModel.from_pretrained(str(clip / "text_encoder")).to(ctx.device, dtype).eval()
    model = create_denoiser(arch, seed=0, sample_size=size, in_channels=4, cond_channels=4, text_dim=384)
    model = model.to(ctx.device, dtype).eval()
    sched = NoiseSchedule(DiffusionConfig(prediction_type="eps", timestep_spacing="trailing"))
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=tiny_vae().to(ctx.device, dtype), text_encoder=text_encoder, tokenizer=tokenizer, unet=model.backbone,
        scheduler=sched.make_scheduler("ddim"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    prompts = [f"segment the {c} cube" for c in ("red", "blue", "green", "gray")] * (batch // 4 + 1)
    prompts = prompts[:batch]
    image = (torch.randn(batch, 4, size, size, generator=g)).to(ctx.device, dtype)  # 4 channels: used as latents
    x_T = torch.randn(batch, 4, size, size, generator=g).to(ctx.device, dtype)
    outputs = {}

    def embed(texts):
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(ctx.device)
        return text_encoder(ids)[0], torch.ones(ids.shape, dtype=torch.bool, device=ctx.device)

    @torch.no_grad()
    def ours():
        text, mask = embed(prompts)
        null_text, null_mask = embed([""])
        outputs["genperc"] = sample(
            model, x_T, Conditioning(text=text, text_mask=mask, image=image), schedule=sched, sampler="ddim",
            num_steps=steps, guidance=InstructPix2PixGuidance(text_scale=TEXT_SCALE, image_scale=IMAGE_SCALE),
            null_cond=Conditioning(text=null_text, text_mask=null_mask),
            generator=torch.Generator(device=ctx.device).manual_seed(1),
        ).sample

    @torch.no_grad()
    def theirs():
        outputs["diffusers"] = pipe(prompts, image=image, num_inference_steps=steps, guidance_scale=TEXT_SCALE,
                                    image_guidance_scale=IMAGE_SCALE, latents=x_T, output_type="latent",
                                    generator=torch.Generator(device=ctx.device).manual_seed(1)).images

    repeats = 2 if ctx.smoke else 3
    sec = timed({"genperc": ours, "diffusers": theirs}, ctx.device, repeats, 1)
    a, b = outputs["genperc"].float(), outputs["diffusers"].float()
    return {"arch": arch, "latent_pixels": size, "batch": batch, "steps": steps, "unet_evals_per_step": 3,
            "genperc_images_per_s": round(batch / sec["genperc"], 2),
            "diffusers_images_per_s": round(batch / sec["diffusers"], 2),
            "genperc_over_diffusers_speed": round(sec["diffusers"] / sec["genperc"], 3),
            "max_abs_diff": round(float((a - b).abs().max()), 5), "output_abs_max": round(float(b.abs().max()), 3)}


def sampling(ctx: Ctx) -> dict:
    """Stage 3: images/s of both samplers (DDIM, IP2P guidance s_T=7.5, s_I=1.5), and how far apart
    their outputs are (same x_T; deterministic DDIM, so equal up to rounding)."""
    ctx.result.update(sampler="ddim (eta 0), trailing spacing, eps", text_encoder="random 2-layer CLIP (both)")
    dtypes = {"fp32": torch.float32} if ctx.smoke else {"bf16": torch.bfloat16, "fp32": torch.float32}
    cases = ctx.result.setdefault("cases", {})
    for arch, size, batch, steps in SMOKE_CASES if ctx.smoke else GPU_CASES:
        for name, dtype in dtypes.items():
            ctx.part(f"{arch}_{size}px_{name}", lambda a=arch, s=size, b=batch, n=steps, d=dtype: _case(ctx, a, s, b, n, d),
                     need_s=5.0 if ctx.smoke else 15.0, into=cases)
    return ctx.result
