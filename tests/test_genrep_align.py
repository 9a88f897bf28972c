"""GenRep symmetric gradient alignment (Eq. 11–16): hand-made gradients, modes, the combiner."""

import math

import pytest
import torch

from genperc.errors import UserError
from genperc.training.combiners import (
    AlignConfig,
    GradientAlignmentCombiner,
    align_pair,
    alpha,
    symmetric_gradient_alignment,
)

W_P, W_G = 0.7, 0.3


def t(*v):
    return torch.tensor(v, dtype=torch.float64)


def test_alpha_endpoints_and_square():
    assert float(alpha(1.0)) == 1.0
    assert float(alpha(0.0)) == pytest.approx(0.25)
    assert float(alpha(-1.0)) == 0.0
    assert float(alpha(0.0, k=1)) == pytest.approx(0.5)


def test_cos_one_keeps_both_gradients():
    g_p, g_g = t(1.0, 0.0), t(2.0, 0.0)
    upd, info = align_pair(g_p, g_g, AlignConfig())
    assert info["cos"] == pytest.approx(1.0) and info["alpha"] == pytest.approx(1.0)
    assert torch.allclose(upd, W_P * g_p + W_G * g_g)


def test_cos_zero_has_no_parallel_part():
    g_p, g_g = t(1.0, 0.0), t(0.0, 3.0)
    upd, info = align_pair(g_p, g_g, AlignConfig())
    assert info["cos"] == pytest.approx(0.0) and info["alpha"] == pytest.approx(0.25)
    assert torch.allclose(upd, W_P * g_p + W_G * g_g)


def test_cos_minus_one_cancels_everything():
    g_p, g_g = t(1.0, 0.0), t(-2.0, 0.0)
    upd, info = align_pair(g_p, g_g, AlignConfig())
    assert info["cos"] == pytest.approx(-1.0) and info["alpha"] == 0.0
    assert torch.allclose(upd, torch.zeros(2, dtype=torch.float64))


def test_partial_conflict_matches_the_equations_by_hand():
    g_p, g_g = t(1.0, 1.0), t(-1.0, 0.0)
    cos = -1 / math.sqrt(2)
    a = ((cos + 1) / 2) ** 2
    # Eq. 11: g_g∥ = (g_p·g_g/|g_p|²) g_p = -1/2 (1, 1); Eq. 12: g_p∥ = (g_p·g_g/|g_g|²) g_g = (1, 0)
    al_g = t(-0.5, 0.5) + a * t(-0.5, -0.5)
    al_p = t(0.0, 1.0) + a * t(1.0, 0.0)
    upd = symmetric_gradient_alignment(g_p, g_g)
    assert torch.allclose(upd, W_P * al_p + W_G * al_g)
    one, _ = align_pair(g_p, g_g, AlignConfig(mode="one-sided", one_sided="genera"))
    assert torch.allclose(one, W_P * g_p + W_G * al_g)
    other, _ = align_pair(g_p, g_g, AlignConfig(mode="one-sided", one_sided="percept"))
    assert torch.allclose(other, W_P * al_p + W_G * g_g)


def test_pcgrad_projects_only_on_conflict():
    g_p, g_g = t(1.0, 1.0), t(-1.0, 0.0)
    upd, _ = align_pair(g_p, g_g, AlignConfig(mode="pcgrad"))
    assert torch.allclose(upd, W_P * t(0.0, 1.0) + W_G * t(-0.5, 0.5))
    ok, _ = align_pair(t(1.0, 0.0), t(1.0, 1.0), AlignConfig(mode="pcgrad"))
    assert torch.allclose(ok, W_P * t(1.0, 0.0) + W_G * t(1.0, 1.0))


def test_zero_gradient_falls_back_to_the_weighted_sum():
    upd, info = align_pair(t(0.0, 0.0), t(1.0, 2.0), AlignConfig())
    assert math.isnan(info["cos"]) and torch.allclose(upd, W_G * t(1.0, 2.0))


def test_bad_config_is_a_user_error():
    with pytest.raises(UserError, match="align.mode"):
        AlignConfig(mode="nope")


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.shared = torch.nn.Linear(3, 3)  # receives both gradients (the "aligned" set)
        self.head = torch.nn.Linear(3, 1)  # percept only
        self.gen = torch.nn.Linear(3, 3)  # genera only


def _losses(m, x):
    h = m.shared(x)
    return {"perception": {"disc": m.head(h).pow(2).mean()}, "generation": {"simple": (m.gen(h) - 1).pow(2).mean()}}


def _grads(m, names):
    return {n: p.grad.clone() for n, p in m.named_parameters() if n.split(".")[0] in names}


def test_combiner_aligns_the_shared_set_and_sums_the_rest():
    m = Toy()
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    comb = GradientAlignmentCombiner(m.parameters(), AlignConfig(), aligned=list(m.shared.parameters()))
    comb.backward(_losses(m, x))
    # by hand
    m2 = Toy()
    losses = _losses(m2, x)
    shared = list(m2.shared.parameters())
    gp = torch.autograd.grad(losses["perception"]["disc"], list(m2.parameters()), retain_graph=True,
                             allow_unused=True)
    gg = torch.autograd.grad(losses["generation"]["simple"], list(m2.parameters()), allow_unused=True)
    names = [n for n, _ in m2.named_parameters()]
    flat_p = torch.cat([g.reshape(-1) for n, g in zip(names, gp, strict=True) if n.startswith("shared")])
    flat_g = torch.cat([g.reshape(-1) for n, g in zip(names, gg, strict=True) if n.startswith("shared")])
    upd = symmetric_gradient_alignment(flat_p, flat_g)
    got = torch.cat([p.grad.reshape(-1) for p in m.shared.parameters()])
    assert torch.allclose(got, upd, atol=1e-6)
    assert sum(p.numel() for p in shared) == got.numel()
    for (n, p), a, b in zip(m.named_parameters(), gp, gg, strict=True):
        if n.startswith("head"):
            assert torch.allclose(p.grad, W_P * a) and b is None
        if n.startswith("gen"):
            assert torch.allclose(p.grad, W_G * b) and a is None
    cos = float(flat_p.double() @ flat_g.double() / (flat_p.double().norm() * flat_g.double().norm()))
    assert comb.last["cos"] == pytest.approx(cos, rel=1e-6)


def test_combiner_accumulates_and_scales():
    m = Toy()
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    comb = GradientAlignmentCombiner(m.parameters(), AlignConfig(mode="sum", w_p=1.0, w_g=1.0))
    comb.backward(_losses(m, x), scale=0.5)
    comb.backward(_losses(m, x), scale=0.5)
    m2 = Toy()
    sum(loss for group in _losses(m2, x).values() for loss in group.values()).backward()
    for p, q in zip(m.parameters(), m2.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)


def test_combiner_rejects_an_unknown_loss_group():
    m = Toy()
    comb = GradientAlignmentCombiner(m.parameters(), AlignConfig())
    with pytest.raises(ValueError, match="loss groups"):
        comb.backward({"perception": {"disc": m.head(m.shared(torch.ones(1, 3))).sum()}, "other": {}})
