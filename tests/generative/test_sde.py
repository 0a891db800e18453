"""VP / sub-VP / VE SDEs: closed forms written from SPEC §4.2 and a forward Euler–Maruyama simulation."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_tiger.generative.sde import VESDE, VPSDE, SubVPSDE, make_sde


def test_vp_closed_forms() -> None:
    sde = VPSDE()
    t = torch.tensor([1e-5, 0.1, 0.5, 1.0])
    for ti, (a, s) in zip(t.tolist(), zip(*sde.marginal_coefs(t))):
        alpha = math.exp(-0.25 * ti**2 * (20 - 0.1) - 0.5 * ti * 0.1)
        assert float(a) == pytest.approx(alpha, rel=1e-6)
        assert float(s) == pytest.approx(math.sqrt(1 - alpha**2), rel=1e-4)
        assert float(sde.diffusion(torch.tensor([ti]))) == pytest.approx(math.sqrt(0.1 + ti * 19.9), rel=1e-6)
    assert float(sde.g2_integral(0.0, 1.0)) == pytest.approx(10.05, rel=1e-6)  # SPEC §4.3: ∫β = 10.05
    x = torch.randn(4, 3)
    assert torch.allclose(sde.drift(x, t), -0.5 * (0.1 + t[:, None] * 19.9) * x)


def test_subvp_closed_forms() -> None:
    sde = SubVPSDE()
    for ti in (1e-3, 0.3, 1.0):
        b = 0.1 * ti + 0.5 * 19.9 * ti**2
        a, s = sde.marginal_coefs(torch.tensor([ti]))
        assert float(a) == pytest.approx(math.exp(-0.5 * b), rel=1e-6)
        assert float(s) == pytest.approx(1 - math.exp(-b), rel=1e-5)
        g2 = (0.1 + 19.9 * ti) * (1 - math.exp(-2 * b))
        assert float(sde.diffusion(torch.tensor([ti]))) ** 2 == pytest.approx(g2, rel=1e-5)
    # ∫ g² by a fine trapezoid rule
    ts = torch.linspace(0.2, 0.9, 20001, dtype=torch.float64)
    num = torch.trapezoid(sde.diffusion(ts).double() ** 2, ts)
    assert float(sde.g2_integral(0.2, 0.9)) == pytest.approx(float(num), rel=1e-6)


def test_ve_closed_forms() -> None:
    sde = VESDE(0.01, 50.0)
    for ti in (0.0, 0.4, 1.0):
        sigma = 0.01 * (50 / 0.01) ** ti
        a, s = sde.marginal_coefs(torch.tensor([ti]))
        assert float(a) == 1.0 and float(s) == pytest.approx(sigma, rel=1e-5)
        g = sigma * math.sqrt(2 * math.log(50 / 0.01))
        assert float(sde.diffusion(torch.tensor([ti]))) == pytest.approx(g, rel=1e-5)
        assert float(sde.t_for_sigma(sigma)) == pytest.approx(ti, abs=1e-5)
    assert sde.prior_std == 50.0
    assert float(sde.g2_integral(0.0, 1.0)) == pytest.approx(50.0**2 - 0.01**2, rel=1e-5)


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE(0.01, 3.0)], ids=["vp", "subvp", "ve"])
def test_forward_simulation_matches_marginals(sde) -> None:
    """Simulate dx = f x dt + g dw from x_0 ~ N(m0, s0²) with fine Euler–Maruyama; compare mean and std at
    t = 0.3 and 1 with α_t m0 and sqrt(α_t² s0² + σ_t² − α_t² σ_0²) (σ_0 = σ_min for VE, 0 otherwise)."""
    gen = torch.Generator().manual_seed(0)
    n, m0, s0 = 20_000, 1.5, 0.5
    x = m0 + s0 * torch.randn(n, 1, generator=gen, dtype=torch.float64)
    steps = 500
    dt = 1.0 / steps
    checkpoints = {150: 0.3, 500: 1.0}
    sigma0 = float(sde.marginal_coefs(torch.zeros(1))[1])
    for i in range(1, steps + 1):
        t = torch.full((n,), (i - 0.5) * dt, dtype=torch.float64)  # midpoint time: second-order in the coefs
        x = x + sde.drift(x, t) * dt + sde.diffusion(t)[:, None] * math.sqrt(dt) * torch.randn(
            x.shape, generator=gen, dtype=torch.float64)
        if i in checkpoints:
            a, s = (float(v) for v in sde.marginal_coefs(torch.tensor([checkpoints[i]], dtype=torch.float64)))
            std = math.sqrt(a**2 * s0**2 + s**2 - a**2 * sigma0**2)
            se_mean, se_std = std / math.sqrt(n), std / math.sqrt(2 * n)
            assert float(x.mean()) == pytest.approx(a * m0, abs=5 * se_mean + 5e-3 * abs(a * m0))
            assert float(x.std()) == pytest.approx(std, abs=5 * se_std + 5e-3 * std)


def test_prior_sample_and_make_sde_errors() -> None:
    gen = torch.Generator().manual_seed(0)
    x = VESDE(0.01, 4.0).prior_sample((20000, 2), generator=gen)
    assert float(x.std()) == pytest.approx(4.0, rel=0.03)
    assert isinstance(make_sde("subvp"), SubVPSDE)
    assert make_sde("ve", {"sigma_max": 4.0}).sigma_max == 4.0
    with pytest.raises(ValueError, match="sde must be"):
        make_sde("ddpm")
    with pytest.raises(ValueError, match="beta_max"):
        VPSDE(0.1, 0.05)
    with pytest.raises(ValueError, match="sigma_min"):
        VESDE(0.0, 1.0)


def test_fp32_under_autocast() -> None:
    sde = VPSDE()
    x = torch.randn(8, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xt = sde.marginal(x, torch.full((8,), 1e-4), torch.randn(8, 2))
        _, s = sde.marginal_coefs(torch.full((8,), 1e-4))
    assert xt.dtype == torch.float32 and s.dtype == torch.float32
    # σ at t = 1e-4 is ≈ 3.2e-3; 1 − α² without expm1 would lose digits
    assert float(s[0]) == pytest.approx(math.sqrt(1 - math.exp(-(1e-4 * 0.1 + 0.5 * 19.9e-8))), rel=1e-4)
