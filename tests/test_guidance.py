"""Guidance combinations (genperc.diffusion.guidance), incl. InstructPix2Pix parity with diffusers."""

import json

import pytest
import torch

from genperc.diffusion.conditioning import Conditioning
from genperc.diffusion.guidance import (
    ClassifierFreeGuidance,
    CorrectionalGuidance,
    Guidance,
    InstructPix2PixGuidance,
    NoGuidance,
    combine_weighted,
)
from genperc.diffusion.sampler import sample
from genperc.diffusion.schedule import DiffusionConfig, NoiseSchedule
from genperc.errors import UserError

B, L, D = 2, 3, 4


def _text(value, length=L, batch=B):
    return Conditioning(text=torch.full((batch, length, D), float(value)),
                        text_mask=torch.ones(batch, length, dtype=torch.bool))


def _cond():
    g = torch.Generator().manual_seed(0)
    return Conditioning(text=torch.randn(B, L, D, generator=g), text_mask=torch.ones(B, L, dtype=torch.bool),
                        image=torch.randn(B, 3, 4, 4, generator=g))


NULL = _text(0.0, length=2, batch=1)  # "embedding of ''", batch 1, broadcast
NEG = _text(5.0, length=4, batch=1)


def _f(c: Conditioning) -> torch.Tensor:
    """A deterministic, nonlinear 'denoiser' of the conditions alone."""
    text = (c.text * c.text_mask[..., None]).sum(1).mean(-1).view(-1, 1, 1, 1)
    return torch.tanh(c.image) * (1 + text) + text**2


def _guidances():
    return [NoGuidance(), ClassifierFreeGuidance(4.0), InstructPix2PixGuidance(7.5, 1.5),
            CorrectionalGuidance(image_scale=1.5, negative_scale=2.0, text_scale=7.5, negative=NEG)]


def test_hand_computed_combinations():
    def c(v):
        return torch.full((1, 1, 2, 2), float(v))

    assert torch.equal(NoGuidance().combine([c(2)]), c(2))
    # ε_u + s(ε_c − ε_u) = 1 + 3·(2 − 1)
    assert torch.equal(ClassifierFreeGuidance(3.0).combine([c(2), c(1)]), c(4))
    # ε(∅,∅) + s_T[ε(I,T) − ε(I,∅)] + s_I[ε(I,∅) − ε(∅,∅)] = 1 + 2·(3 − 2) + 0.5·(2 − 1)
    assert torch.equal(InstructPix2PixGuidance(2.0, 0.5).combine([c(3), c(2), c(1)]), c(3.5))
    # ADDP Eq. 5: 1 + 1.5·(2 − 1) + 1·(3 − 2) + 3·(4 − 3)
    cg = CorrectionalGuidance(image_scale=1.5, negative_scale=1.0, text_scale=3.0, negative=NEG)
    assert torch.equal(cg.combine([c(4), c(3), c(2), c(1)]), c(6.5))
    assert sum(cg.weights()) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(1)
    preds = [torch.randn(2, 3, 4, 4, generator=g) for _ in range(4)]
    torch.testing.assert_close(cg.combine(preds), combine_weighted(preds, cg.weights()))


def test_ip2p_unit_scales_give_the_conditional_prediction():
    g = torch.Generator().manual_seed(2)
    preds = [torch.randn(B, 3, 4, 4, generator=g) for _ in range(3)]
    torch.testing.assert_close(InstructPix2PixGuidance(1.0, 1.0).combine(preds), preds[0])
    torch.testing.assert_close(ClassifierFreeGuidance(1.0).combine(preds[:2]), preds[0])


def test_branches_follow_the_documented_layout():
    cond = _cond()
    for guidance in _guidances():
        assert isinstance(guidance, Guidance)
        branches = guidance.branches(cond, NULL)
        assert branches[0] is cond  # fully conditional first
        for b in branches:
            assert b.batch_size == B
    cfg = ClassifierFreeGuidance(2.0).branches(cond, NULL)
    assert torch.equal(cfg[1].image, cond.image) and torch.equal(cfg[1].text, NULL.text.expand(B, -1, -1))
    ip = InstructPix2PixGuidance().branches(cond, NULL)
    assert torch.equal(ip[1].image, cond.image) and (ip[1].text == 0).all()
    assert (ip[2].image == 0).all() and (ip[2].text == 0).all()  # null image = zeros by default
    own_null_image = NULL.replace(image=torch.full((1, 3, 4, 4), -1.0))
    assert (InstructPix2PixGuidance().branches(cond, own_null_image)[2].image == -1).all()
    cg = _guidances()[3].branches(cond, NULL)
    assert (cg[1].text == 5).all() and torch.equal(cg[1].image, cond.image)
    assert (cg[2].text == 0).all() and torch.equal(cg[2].image, cond.image)
    assert (cg[3].text == 0).all() and (cg[3].image == 0).all()
    # a class-conditional model: the null class replaces the label
    cls = Conditioning(class_labels=torch.tensor([3, 4]))
    null_cls = ClassifierFreeGuidance(2.0).branches(cls, Conditioning(class_labels=torch.tensor([10])))[1]
    assert null_cls.class_labels.tolist() == [10, 10]
    # all branches fit in one batch
    assert Conditioning.cat(cg).batch_size == 4 * B


def test_correctional_reduces_to_ip2p_when_negative_is_null():
    cond = _cond()
    ip2p = InstructPix2PixGuidance(text_scale=6.0, image_scale=1.7)
    corr = CorrectionalGuidance(image_scale=1.7, negative_scale=2.5, text_scale=6.0, negative=NULL)
    a = ip2p.combine([_f(b) for b in ip2p.branches(cond, NULL)])
    b = corr.combine([_f(b) for b in corr.branches(cond, NULL)])
    torch.testing.assert_close(a, b)


def test_user_errors():
    with pytest.raises(UserError, match="w_D > w_D⁻"):
        CorrectionalGuidance(image_scale=1.5, negative_scale=3.0, text_scale=3.0, negative=NEG)
    with pytest.raises(UserError, match="negative"):
        CorrectionalGuidance(negative=None)
    with pytest.raises(UserError, match="null"):
        ClassifierFreeGuidance(2.0).branches(_cond(), None)
    with pytest.raises(UserError, match="image"):
        InstructPix2PixGuidance().branches(_cond().replace(image=None), NULL)
    with pytest.raises(UserError, match="batch size"):
        InstructPix2PixGuidance().branches(_cond(), _text(0.0, batch=3))


@pytest.mark.parametrize("space", ["x0", "v"])
def test_combining_eps_x0_or_v_is_equivalent(space):
    """Weights sum to 1 and conversions are affine in the prediction, so the space does not matter."""
    sched = NoiseSchedule(DiffusionConfig(prediction_type="eps"))
    g = torch.Generator().manual_seed(3)
    x_t = torch.randn(B, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([120, 870])
    for guidance in _guidances():
        n = len(guidance.branches(_cond(), NULL))
        eps = [torch.randn(B, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(n)]
        in_space = guidance.combine([sched.convert(e, "eps", space, x_t, t) for e in eps])
        after = sched.convert(guidance.combine(eps), "eps", space, x_t, t)
        torch.testing.assert_close(in_space, after, rtol=0, atol=1e-9)


# ---- parity with diffusers' StableDiffusionInstructPix2PixPipeline on tiny random models ------


def _tiny_ip2p(tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=12)
    torch.manual_seed(0)  # weight init only; sampling randomness comes from explicit generators
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=12, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )).eval()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=8, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
    ).eval()
    vae = AutoencoderKL(
        block_out_channels=(4,), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=2, sample_size=8,
    ).eval()
    return tokenizer, text_encoder, unet, vae


@pytest.mark.parametrize("kind", ["euler-a", "ddim"])
def test_ip2p_guidance_and_sampler_match_diffusers_pipeline(tmp_path, kind):
    from diffusers import StableDiffusionInstructPix2PixPipeline

    tokenizer, text_encoder, unet, vae = _tiny_ip2p(tmp_path)
    sched = NoiseSchedule(DiffusionConfig())  # SD's scaled_linear betas, eps, "leading"
    eta = 0.3 if kind == "ddim" else 0.0
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sched.make_scheduler(kind),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    prompts = ["make it red", "segment the cube"]
    g = torch.Generator().manual_seed(0)
    image_latents = torch.randn(2, 4, 8, 8, generator=g)  # 4 channels: used as latents directly
    x_T = torch.randn(2, 4, 8, 8, generator=g)
    steps, s_text, s_image = 4, 3.0, 1.5

    with torch.no_grad():
        expected = pipe(prompts, image=image_latents, num_inference_steps=steps, guidance_scale=s_text,
                        image_guidance_scale=s_image, latents=x_T, eta=eta, output_type="latent",
                        generator=torch.Generator().manual_seed(42)).images

        def embed(texts):
            ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            return text_encoder(ids)[0], torch.ones(ids.shape, dtype=torch.bool)

    text, mask = embed(prompts)
    null_text, null_mask = embed([""])

    def model(x, t, c):
        return unet(torch.cat([x, c.image], dim=1), t, encoder_hidden_states=c.text).sample

    ours = sample(
        model, x_T, Conditioning(text=text, text_mask=mask, image=image_latents), schedule=sched,
        sampler=kind, num_steps=steps, guidance=InstructPix2PixGuidance(text_scale=s_text, image_scale=s_image),
        null_cond=Conditioning(text=null_text, text_mask=null_mask), eta=eta,
        generator=torch.Generator().manual_seed(42),
    ).sample
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
