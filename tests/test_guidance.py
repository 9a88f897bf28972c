"""Guidance combinations (genperc.diffusion.guidance), incl. InstructPix2Pix parity with diffusers."""

import json
import warnings

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
    # Eq. 5 expanded: w_D·ε(D,I) + (w_D⁻ − w_D)·ε(D⁻,I) + (w_I − w_D⁻)·ε(φ_D,I) + (1 − w_I)·ε(φ_D,φ_I)
    assert cg.weights() == [3.0, -2.0, 0.5, -0.5]
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


@pytest.mark.parametrize("negative,w_dminus", [(NULL, 2.5), (NEG, 6.0)])
def test_correctional_reduces_to_ip2p(negative, w_dminus):
    """Eq. 5 is InstructPix2Pix (s_T = w_D) when D⁻ is the null text, and — whatever D⁻ is — when
    w_D = w_D⁻: w·[ε(D⁻,I) − ε(φ,I)] + w·[ε(D,I) − ε(D⁻,I)] = w·[ε(D,I) − ε(φ,I)]."""
    cond = _cond()
    ip2p = InstructPix2PixGuidance(text_scale=6.0, image_scale=1.7)
    corr = CorrectionalGuidance(image_scale=1.7, negative_scale=w_dminus, text_scale=6.0, negative=negative)
    a = ip2p.combine([_f(b) for b in ip2p.branches(cond, NULL)])
    b = corr.combine([_f(b) for b in corr.branches(cond, NULL)])
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("text_scale,negative_scale", [(3.0, 3.0), (2.0, 4.0)])
def test_correctional_accepts_w_d_not_above_w_d_minus_without_warning(text_scale, negative_scale):
    """ADDP only recommends w_D > w_D⁻ (§3.3); the ablation needs the other side too."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cg = CorrectionalGuidance(image_scale=1.5, negative_scale=negative_scale, text_scale=text_scale,
                                  negative=NEG)

    def c(v):
        return torch.full((1, 1, 2, 2), float(v))

    e_d, e_neg, e_img, e_null = 4.0, 3.0, 2.0, 1.0
    expected = (e_null + 1.5 * (e_img - e_null) + negative_scale * (e_neg - e_img)
                + text_scale * (e_d - e_neg))
    assert torch.equal(cg.combine([c(e_d), c(e_neg), c(e_img), c(e_null)]), c(expected))


def test_user_errors():
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


# ---- text of different token lengths ------------------------------------------------------------


def test_pad_text_appends_masked_zero_tokens():
    text = torch.arange(2 * 3 * D, dtype=torch.float32).view(2, 3, D) + 1
    c = Conditioning(text=text, text_mask=torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool),
                     image=torch.ones(2, 3, 4, 4))
    padded = c.pad_text(5)
    assert torch.equal(padded.text[:, :3], text) and torch.equal(padded.text[:, 3:], torch.zeros(2, 2, D))
    assert padded.text_mask.tolist() == [[True, True, True, False, False], [True, True, False, False, False]]
    assert padded.image is c.image
    assert c.pad_text(3) is c
    with pytest.raises(ValueError):
        c.pad_text(2)


def test_cat_pads_every_part_to_the_longest_text():
    short = _text(1.0, length=2, batch=1)
    long = _text(2.0, length=4, batch=2)
    both = Conditioning.cat([short, long])
    assert both.text.shape == (3, 4, D)
    assert both.text_mask.tolist() == [[True, True, False, False]] + [[True] * 4] * 2
    assert (both.text[0, 2:] == 0).all() and (both.text[0, :2] == 1).all() and (both.text[1:] == 2).all()
    unmasked = Conditioning.cat([Conditioning(text=torch.ones(1, 1, D)), Conditioning(text=torch.ones(1, 2, D))])
    assert unmasked.text_mask.tolist() == [[True, False], [True, True]]


def test_conditioning_dropout_pads_a_prompt_shorter_than_the_null_text():
    from genperc.training.dropout import conditioning_dropout

    b = 64
    cond = Conditioning(text=torch.full((b, 1, D), 3.0), text_mask=torch.ones(b, 1, dtype=torch.bool))
    null = _text(7.0, length=3, batch=1)
    out = conditioning_dropout(cond, null, 0.2, torch.Generator().manual_seed(0))
    dropped = torch.rand(b, generator=torch.Generator().manual_seed(0)) < 0.4
    assert 0 < dropped.sum() < b
    assert out.text.shape == (b, 3, D)
    assert (out.text[dropped] == 7).all() and out.text_mask[dropped].all()
    assert (out.text[~dropped, 0] == 3).all() and (out.text[~dropped, 1:] == 0).all()
    assert out.text_mask[~dropped].tolist() == [[True, False, False]] * int((~dropped).sum())


# ---- correctional guidance in a full sampling run ---------------------------------------------

_W_TEXT = torch.randn(D, 3, generator=torch.Generator().manual_seed(9))


def _text_model(x, t, c):
    """A deterministic stand-in denoiser that reads the text through its mask (as cross-attention
    does), so padding is neutral and D, D⁻ and φ_D give different outputs."""
    m = c.text_mask[..., None].to(c.text.dtype)
    pooled = (c.text * m).sum(1) / m.sum(1).clamp(min=1)
    text = torch.tanh(pooled @ _W_TEXT).view(-1, 3, 1, 1)
    return 0.5 * x + text * (1 + torch.tanh(c.image)) + 0.1 * torch.sin(t.float() / 100).view(-1, 1, 1, 1)


@pytest.mark.parametrize("kind", ["ddim", "euler-a"])
@pytest.mark.parametrize("w_i,w_neg,w_d", [(1.5, 1.0, 3.0), (1.2, 4.0, 2.0)])
def test_correctional_guidance_in_a_sampling_run_is_eq5_of_separate_calls(kind, w_i, w_neg, w_d):
    """ADDP Eq. 5 for every step of a run: D (3 tokens, items of 3/2/1 real tokens), D⁻ (5 tokens,
    one per item) and φ_D (2 tokens, broadcast) go through the model in one padded batch; each
    step's combined x̂0 (x0-parameterisation: the prediction itself) equals Eq. 5 computed from
    four separate, unpadded calls."""
    b, g = 3, torch.Generator().manual_seed(5)
    image = torch.randn(b, 3, 4, 4, generator=g)
    d = Conditioning(text=torch.randn(b, 3, D, generator=g), image=image,
                     text_mask=torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=torch.bool))
    neg = Conditioning(text=torch.randn(b, 5, D, generator=g),
                       text_mask=torch.tensor([[1] * 5, [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool))
    null = Conditioning(text=torch.randn(1, 2, D, generator=g), text_mask=torch.ones(1, 2, dtype=torch.bool))
    guidance = CorrectionalGuidance(image_scale=w_i, negative_scale=w_neg, text_scale=w_d, negative=neg)
    sched = NoiseSchedule(DiffusionConfig(prediction_type="x0"))
    out = sample(_text_model, (b, 3, 4, 4), d, schedule=sched, sampler=kind, num_steps=4, guidance=guidance,
                 null_cond=null, generator=torch.Generator().manual_seed(1), record=True)
    null_text = dict(text=null.text.expand(b, -1, -1), text_mask=null.text_mask.expand(b, -1))
    for k in range(4):
        x_t, t = out.trajectory.x_t[k], torch.full((b,), int(out.trajectory.timesteps[k]))
        e_d = _text_model(x_t, t, d)
        e_neg = _text_model(x_t, t, neg.replace(image=image))
        e_img = _text_model(x_t, t, Conditioning(image=image, **null_text))
        e_null = _text_model(x_t, t, Conditioning(image=torch.zeros_like(image), **null_text))
        expected = e_null + w_i * (e_img - e_null) + w_neg * (e_neg - e_img) + w_d * (e_d - e_neg)
        assert (e_d - e_neg).flatten(1).abs().amax(1).min() > 0.05  # the branches do differ per item
        torch.testing.assert_close(out.trajectory.pred_x0[k], expected, rtol=1e-5, atol=1e-5)


def test_several_negatives_use_their_mean_and_one_negative_is_eq5():
    """K negatives: ε(D⁻,I) of Eq. 5 becomes the mean of the K branches, computed by hand here;
    the weights sum to 1 and K = 1 (a list of one) equals the single-negative form."""
    g = torch.Generator().manual_seed(3)
    e_d, n1, n2, n3, e_img, e_null = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(6))
    cg = CorrectionalGuidance(image_scale=1.5, negative_scale=2.0, text_scale=5.0,
                              negative=[NEG, _text(-1.0), _text(2.0, length=1)])
    mean = (n1 + n2 + n3) / 3
    expected = e_null + 1.5 * (e_img - e_null) + 2.0 * (mean - e_img) + 5.0 * (e_d - mean)
    torch.testing.assert_close(cg.combine([e_d, n1, n2, n3, e_img, e_null]), expected)
    assert sum(cg.weights()) == pytest.approx(1.0) and len(cg.weights()) == 6
    single = CorrectionalGuidance(image_scale=1.5, negative_scale=2.0, text_scale=5.0, negative=NEG)
    as_list = CorrectionalGuidance(image_scale=1.5, negative_scale=2.0, text_scale=5.0, negative=[NEG])
    assert single.weights() == as_list.weights()
    branches = cg.branches(_cond(), NULL)
    assert len(branches) == 6 and torch.equal(branches[2].text, _text(-1.0).text)
    with pytest.raises(ValueError, match="expects 6"):
        cg.combine([e_d, n1, e_img, e_null])
    with pytest.raises(UserError, match="negative"):
        CorrectionalGuidance(negative=[])


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
