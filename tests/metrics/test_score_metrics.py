"""SPEC §4.1 identity (L_CSM − L_SM constant, cross term 0), excess loss and the KFL bound on 8 Gaussians."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_tiger.data.toy2d import eight_gaussians
from lightning_tiger.generative.sde import VPSDE
from lightning_tiger.metrics.score_matching import (
    KFL_ASSUMPTION,
    dsm_constant,
    excess_score_loss,
    kfl_w2_bound,
    score_loss_terms,
)

ALPHA, SIGMA = 0.8, 0.6


def _models() -> dict:
    mix = eight_gaussians()
    torch.manual_seed(123)
    mlp = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
    lin = torch.tensor([[0.3, -1.0], [0.5, 0.2]])
    return {
        "true": lambda x, t: mix.perturbed_score(x.double(), ALPHA, SIGMA).float(),
        "zero": lambda x, t: torch.zeros_like(x),
        "linear": lambda x, t: x @ lin,
        "mlp": lambda x, t: mlp(x).detach(),
        "shifted_true": lambda x, t: mix.perturbed_score(x.double(), ALPHA, SIGMA).float() + 0.5,
    }


def _reference_constant(num: int = 100_000) -> tuple[float, float]:
    """C_t = d/σ² − E||∇log p_t||² written out with numpy loops over components (independent code path)."""
    rng = np.random.default_rng(7)
    ang = np.arange(8) * 2 * np.pi / 8
    means = ALPHA * 2.0 * np.stack([np.cos(ang), np.sin(ang)], 1)
    var = ALPHA**2 * 0.09 + SIGMA**2
    comp = rng.integers(0, 8, num)
    x = means[comp] + math.sqrt(var) * rng.standard_normal((num, 2))
    logw = np.stack([-((x - means[k]) ** 2).sum(1) / (2 * var) for k in range(8)], 1)
    r = np.exp(logw - logw.max(1, keepdims=True))
    r /= r.sum(1, keepdims=True)
    score = sum(r[:, k:k + 1] * (means[k] - x) / var for k in range(8))
    sq = (score**2).sum(1)
    return 2 / SIGMA**2 - sq.mean(), sq.std() / math.sqrt(num)


def test_csm_minus_sm_is_model_independent_and_cross_term_vanishes() -> None:
    ref, ref_se = _reference_constant()
    assert ref == pytest.approx(3.40, abs=0.03)  # SPEC §4.1: 3.399 … 3.408 at 2M samples
    mix = eight_gaussians()
    for name, fn in _models().items():
        terms = score_loss_terms(fn, mix, ALPHA, SIGMA, num_samples=60_000,
                                 generator=torch.Generator().manual_seed(1))
        # difference = C − 2·cross per sample; compare with the independent reference constant
        tol = 4 * math.hypot(float(terms["difference_se"]), ref_se)
        assert float(terms["difference"]) == pytest.approx(ref, abs=tol), name
        assert abs(float(terms["cross"])) <= 4 * float(terms["cross_se"]) + 1e-12, name
        # l_csm − l_sm equals the per-sample difference average exactly
        assert float(terms["l_csm"] - terms["l_sm"]) == pytest.approx(float(terms["difference"]), abs=1e-9)
    true = score_loss_terms(_models()["true"], mix, ALPHA, SIGMA, num_samples=20_000,
                            generator=torch.Generator().manual_seed(2))
    assert float(true["l_sm"]) < 1e-8


def test_dsm_constant_matches_reference() -> None:
    ref, ref_se = _reference_constant()
    c, se = dsm_constant(eight_gaussians(), ALPHA, SIGMA, num_samples=100_000,
                         generator=torch.Generator().manual_seed(3))
    assert float(c) == pytest.approx(ref, abs=4 * math.hypot(float(se), ref_se))


def test_excess_score_loss_zero_for_true_score_and_matches_l_sm() -> None:
    mix, sde = eight_gaussians(), VPSDE()

    def true_score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = sde.marginal_coefs(t.double())
        return mix.perturbed_score(x.double(), a, s).float()

    ts = torch.tensor([0.2, 0.5, 0.9])  # small t: the cross term is noisy (∝ 1/σ²); see score_loss_terms_se
    exact = excess_score_loss(true_score, mix, sde, ts, num_samples=20_000, generator=torch.Generator().manual_seed(0))
    assert exact.shape == (3,)
    assert float(exact.abs().max()) < 0.05  # ≈ 0 up to MC error of the cross term
    zero = excess_score_loss(lambda x, t: torch.zeros_like(x), mix, sde, ts, num_samples=20_000,
                             generator=torch.Generator().manual_seed(0))
    # for s = 0 the excess is E||∇log p_t||² exactly: compare with a direct estimate on fresh samples
    for ti, val in zip(ts.tolist(), zero.tolist()):
        a, s = (float(v) for v in sde.marginal_coefs(torch.tensor([ti], dtype=torch.float64)))
        xt = mix.perturbed(a, s).sample(50_000, torch.Generator().manual_seed(9)).double()
        direct = float(mix.perturbed_score(xt, a, s).pow(2).sum(-1).mean())
        assert val == pytest.approx(direct, rel=0.05)
    with pytest.raises(ValueError, match="t must"):
        excess_score_loss(true_score, mix, sde, 0.0)


def test_kfl_bound_matches_quadrature_reference() -> None:
    mix, sde = eight_gaussians(), VPSDE()
    bias = 0.3

    def biased_score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = sde.marginal_coefs(t.double())
        return mix.perturbed_score(x.double(), a, s).float() + bias  # E||err||² = 2·bias² exactly

    res = kfl_w2_bound(biased_score, mix, sde, num_times=33, num_samples=256,
                       generator=torch.Generator().manual_seed(0))
    int_g2 = 0.1 * (1 - 1e-3) + 0.5 * 19.9 * (1 - 1e-6)  # ∫_{1e-3}^{1} β
    assert res.g2_integral == pytest.approx(int_g2, rel=1e-6)
    # J_SM = ½ ∫ g² · 2 bias² dt (trapezoid on a linear integrand is exact)
    assert res.j_sm == pytest.approx(bias**2 * int_g2, rel=1e-6)
    alpha_1 = math.exp(-0.25 * 19.9 - 0.05)
    prior = math.sqrt(alpha_1**2 * float(mix.second_moment()) + 2 * (math.sqrt(1 - alpha_1**2) - 1) ** 2)
    assert res.prior_term == pytest.approx(prior, rel=1e-6)
    assert res.bound == pytest.approx(math.sqrt(2 * int_g2 * bias**2 * int_g2) + prior, rel=1e-6)
    assert res.bound_direct == pytest.approx(int_g2 * math.sqrt(2) * bias + prior, rel=1e-6)
    assert "I(t) = 1" in res.assumption and res.assumption == KFL_ASSUMPTION
