"""Samplers recover a 1-D Gaussian target from its exact score; the error shrinks with steps.

Target p_0 = N(m, s²); under any linear SDE p_t = N(α_t m, α_t² s² + σ_t²), so the exact score is
−(x − α_t m)/(α_t² s² + σ_t²). The ODE samplers are affine maps of the prior draw here, so their output law is
measured exactly by pushing two points; the stochastic samplers use 20k samples with a shared seed.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_tiger.generative import samplers as S
from lightning_tiger.generative.sde import VESDE, VPSDE, SubVPSDE

M, SD = 1.5, 0.5


def _score(sde):
    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = sde.marginal_coefs(t)
        a, s = a[:, None], s[:, None]
        return -(x - a * M) / (a**2 * SD**2 + s**2)

    return fn


def _limit(sde, stochastic: bool, t_end: float = 1e-3) -> tuple[float, float]:
    """Exact law at t_end of the continuous-time sampler started from the prior N(0, P²) instead of p_T.

    Forward process: x_e ~ N(α_e m, v_e), x_T = (α_T/α_e) x_e + noise, v_t = α_t² s² + σ_t². The probability-
    flow ODE is the monotone transport x ↦ α_e m + sqrt(v_e/v_T)(x − α_T m); the reverse SDE draws from the
    Gaussian posterior x_e | x_T = N(α_e m + k(x_T − α_T m), v_e − k² v_T), k = (α_T/α_e) v_e / v_T.
    """
    (a_e, a_t), (s_e, s_t) = (v.tolist() for v in sde.marginal_coefs(torch.tensor([t_end, 1.0],
                                                                                   dtype=torch.float64)))
    v_e, v_t, p = a_e**2 * SD**2 + s_e**2, a_t**2 * SD**2 + s_t**2, sde.prior_std
    if not stochastic:
        r = math.sqrt(v_e / v_t)
        return a_e * M - r * a_t * M, r * p
    k = (a_t / a_e) * v_e / v_t
    return a_e * M - k * a_t * M, math.sqrt(v_e - k**2 * v_t + k**2 * p**2)


def _gauss_w2(mean: float, std: float, target: tuple[float, float] = (M, SD)) -> float:
    return math.sqrt((mean - target[0]) ** 2 + (std - target[1]) ** 2)


def _ode_law(sampler, sde, **kw) -> tuple[float, float]:
    """Exact output law of a deterministic sampler that is affine in the prior draw x_T ~ N(0, prior_std²)."""
    x = torch.tensor([[0.0], [1.0]])
    out = sampler(_score(sde), sde, x, **kw)
    out = out[0] if isinstance(out, tuple) else out
    b, a = float(out[0, 0]), float(out[1, 0] - out[0, 0])
    return b, abs(a) * sde.prior_std


def _mc_law(sampler, sde, steps, n=20_000, **kw) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(0)
    x = sde.prior_sample((n, 1), generator=gen)
    out = sampler(_score(sde), sde, x, steps, generator=gen, **kw)
    return float(out.mean()), float(out.std())


SDES = [VPSDE(), SubVPSDE(), VESDE(0.01, 5.0)]
IDS = ["vp", "subvp", "ve"]


@pytest.mark.parametrize("sde", SDES, ids=IDS)
@pytest.mark.parametrize("sampler", [S.ode_euler, S.ode_heun], ids=["euler", "heun"])
def test_fixed_step_ode_converges(sde, sampler) -> None:
    lim = _limit(sde, stochastic=False)
    errs = [_gauss_w2(*_ode_law(sampler, sde, steps=k), lim) for k in (16, 64, 256)]
    assert errs[2] < errs[1] < errs[0]
    assert errs[2] < (0.03 if sampler is S.ode_euler else 1e-3)  # Euler on VE (exponential σ) is slowest
    # the prior mismatch (p_T ≠ N(0, P²)) is the only other error: small for VP, visible for VE σ_max = 5
    assert _gauss_w2(*lim) < (0.01 if not isinstance(sde, VESDE) else 0.2)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_adaptive_ode_meets_tolerance_and_counts_nfe(sde) -> None:
    out, nfe = S.ode_adaptive(_score(sde), sde, torch.tensor([[0.0], [1.0]]), rtol=1e-6, atol=1e-6,
                              return_nfe=True)
    b, a = float(out[0, 0]), float(out[1, 0] - out[0, 0])
    assert _gauss_w2(b, abs(a) * sde.prior_std, _limit(sde, stochastic=False)) < 1e-3
    assert 7 <= nfe < 2000 and (nfe - 1) % 6 == 0
    # looser tolerance: fewer evaluations
    _, nfe_loose = S.ode_adaptive(_score(sde), sde, torch.tensor([[0.0], [1.0]]), rtol=1e-3, atol=1e-3,
                                  return_nfe=True)
    assert nfe_loose < nfe


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_euler_maruyama_converges(sde) -> None:
    lim = _limit(sde, stochastic=True)
    coarse = _gauss_w2(*_mc_law(S.euler_maruyama, sde, 8), lim)
    fine = _gauss_w2(*_mc_law(S.euler_maruyama, sde, 200), lim)
    assert fine < coarse
    assert fine < 0.03  # MC error of (mean, std) at 20k samples ≈ 0.005


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_predictor_corrector_converges(sde) -> None:
    lim = _limit(sde, stochastic=True)
    coarse = _gauss_w2(*_mc_law(S.predictor_corrector, sde, 8), lim)
    fine = _gauss_w2(*_mc_law(S.predictor_corrector, sde, 200), lim)
    assert math.isfinite(coarse) and fine < coarse
    assert fine < 0.04  # fixed-snr Langevin keeps a small bias (documented)


def test_annealed_langevin_recovers_target() -> None:
    sde = VESDE(0.01, 5.0)
    gen = torch.Generator().manual_seed(0)
    errs = []
    for steps in (3, 100):
        x = torch.randn(20_000, 1, generator=gen)
        out = S.annealed_langevin(_score(sde), sde, x, steps, generator=gen)
        errs.append(_gauss_w2(float(out.mean()), float(out.std())))
    assert errs[1] < errs[0] and errs[1] < 0.05
    with pytest.raises(ValueError, match="VESDE"):
        S.annealed_langevin(_score(VPSDE()), VPSDE(), torch.zeros(2, 1))


def test_trajectory_shapes_and_noise_free_last_step() -> None:
    sde = VPSDE()
    gen = torch.Generator().manual_seed(1)
    x0 = sde.prior_sample((7, 1), generator=gen)
    out, traj = S.euler_maruyama(_score(sde), sde, x0, 5, generator=gen, return_trajectory=True)
    assert traj.shape == (6, 7, 1) and torch.equal(traj[-1], out) and torch.equal(traj[0], x0)
    # last step = mean of the EM transition: recompute it from the state before
    h = (1 - 1e-3) / 5
    t = torch.full((7,), 1.0 - 4 * h)
    x = traj[-2]
    expect = x - (sde.drift(x, t) - sde.diffusion(t)[:, None] ** 2 * _score(sde)(x, t)) * h
    assert torch.allclose(out, expect, atol=1e-5)
    with pytest.raises(ValueError, match="steps"):
        S.ode_euler(_score(sde), sde, x0, 0)
    with pytest.raises(ValueError, match="t_end"):
        S.ode_heun(_score(sde), sde, x0, 3, t_end=1.0)


def test_pc_coarse_grid_is_finite() -> None:
    """DDPM's α = 1 − β h turns negative at 10 VP steps (β(1)·h ≈ 2); we use exp(−β h)."""
    sde = VPSDE()
    gen = torch.Generator().manual_seed(0)
    out = S.predictor_corrector(_score(sde), sde, sde.prior_sample((100, 1), generator=gen), 5, generator=gen)
    assert bool(torch.isfinite(out).all())
