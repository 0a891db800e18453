"""The ODE integrator core: Euler / Heun against their recurrences, Dormand–Prince against closed forms and
scipy, and what a non-finite error estimate does (rejected, then a clear FloatingPointError)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from lightning_tiger.generative.flow import integrate
from lightning_tiger.generative.ode import integrate_adaptive, integrate_fixed
from lightning_tiger.generative.samplers import ode_adaptive
from lightning_tiger.generative.sde import VPSDE

LAM = -1.3


def _linear(x: torch.Tensor, t: float) -> torch.Tensor:
    return LAM * x


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_fixed_step_methods_follow_their_recurrences(backward: bool) -> None:
    # dx/dt = λx: Euler multiplies by (1 + λh) per step, Heun by (1 + λh + (λh)²/2) (its stability polynomial).
    n = 7
    grid = [1 - k / n for k in range(n + 1)] if backward else [k / n for k in range(n + 1)]
    h = grid[1] - grid[0]
    x0 = torch.tensor([[1.0], [-2.0]], dtype=torch.float64)
    euler = integrate_fixed(_linear, x0, grid, "euler", keep_trajectory=True)
    heun = integrate_fixed(_linear, x0, grid, "heun")
    assert torch.allclose(euler.x, x0 * (1 + LAM * h) ** n, rtol=1e-13)
    assert torch.allclose(heun.x, x0 * (1 + LAM * h + (LAM * h) ** 2 / 2) ** n, rtol=1e-13)
    assert (euler.nfe, heun.nfe) == (n, 2 * n)
    assert euler.trajectory is not None and len(euler.trajectory) == n + 1 and euler.times == grid


def test_heun_uses_the_time_of_the_predictor_end() -> None:
    # dx/dt = t: one Heun step from 0 to h is exact (trapezoid of a linear function): h²/2.
    sol = integrate_fixed(lambda x, t: torch.full_like(x, t), torch.zeros(1, 1, dtype=torch.float64), [0.0, 0.4],
                          "heun")
    assert float(sol.x) == pytest.approx(0.08, abs=1e-15)


@pytest.mark.parametrize(("t0", "t1"), [(0.0, 2.0), (2.0, 0.1)], ids=["forward", "backward"])
def test_dormand_prince_meets_its_tolerance_and_agrees_with_scipy(t0: float, t1: float) -> None:
    # dx/dt = −t·x, x(t) = x(t0)·exp(−(t² − t0²)/2).
    x0 = torch.tensor([[1.0, 3.0]], dtype=torch.float64)
    sol = integrate_adaptive(lambda x, t: -t * x, x0, t0, t1, rtol=1e-8, atol=1e-8)
    exact = x0 * math.exp(-(t1**2 - t0**2) / 2)
    assert torch.allclose(sol.x, exact, rtol=1e-6, atol=1e-7)
    ref = solve_ivp(lambda t, y: -t * y, (t0, t1), x0.flatten().numpy(), method="RK45", rtol=1e-8, atol=1e-8)
    assert np.allclose(sol.x.flatten().numpy(), ref.y[:, -1], rtol=1e-6, atol=1e-7)
    assert (sol.nfe - 1) % 6 == 0 and sol.times[0] == t0 and sol.times[-1] == pytest.approx(t1, abs=1e-12)


def test_a_transient_nan_rejects_the_step_and_the_solve_recovers() -> None:
    # dx/dt = −50x with a "velocity" that overflows (NaN) when a too-large step throws a stage past |x| > 2:
    # the NaN error estimate must reject the step (never accept it), the smaller steps then resolve the ODE.
    calls = {"nan": 0}

    def overflowing(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        bad = x.abs() > 2
        calls["nan"] += int(bad.any())
        return torch.where(bad, torch.full_like(x, float("nan")), -50.0 * x)

    sol = integrate(overflowing, torch.ones(3, 1, dtype=torch.float64), steps=2, solver="adaptive",
                    rtol=1e-6, atol=1e-9)
    assert calls["nan"] > 0  # the first step (h = 0.5) did overflow
    assert torch.isfinite(sol.z1).all()
    assert torch.allclose(sol.z1, torch.full_like(sol.z1, math.exp(-50.0)), atol=1e-8)


def test_a_persistent_nan_raises_a_clear_error_quickly() -> None:
    # A model that returns NaN past t = 0.5: shrinking h cannot get through. The solver must say so, after a
    # few hundred evaluations (before: 10 000 rejected steps, 60 000 evaluations, then "exceeded max_steps").
    calls = {"n": 0}

    def broken(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return torch.where(t[:, None] > 0.5, torch.full_like(x, float("nan")), torch.ones_like(x))

    with pytest.raises(FloatingPointError, match=r"t=0\.5 with a non-finite error estimate"):
        integrate(broken, torch.zeros(4, 2), steps=10, solver="adaptive")
    assert calls["n"] < 5000


def test_a_nan_score_at_the_start_raises_at_once() -> None:
    calls = {"n": 0}

    def nan_score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return torch.full_like(x, float("nan"))

    with pytest.raises(FloatingPointError, match="non-finite"):
        ode_adaptive(nan_score, VPSDE(), torch.zeros(4, 2))
    assert calls["n"] == 1


def test_adaptive_arguments_are_checked() -> None:
    x = torch.zeros(2, 1)
    with pytest.raises(ValueError, match="rtol"):
        integrate_adaptive(_linear, x, 0.0, 1.0, rtol=0.0)
    with pytest.raises(ValueError, match="first_step"):
        integrate_adaptive(_linear, x, 0.0, 1.0, first_step=2.0)
    with pytest.raises(ValueError, match="t1"):
        integrate_adaptive(_linear, x, 1.0, 1.0)
    with pytest.raises(RuntimeError, match="max_steps"):
        integrate_adaptive(lambda x, t: math.cos(50 * t) * torch.ones_like(x), x, 0.0, 1.0, rtol=1e-9,
                           atol=1e-12, first_step=1.0, max_steps=3)
    with pytest.raises(ValueError, match="method"):
        integrate_fixed(_linear, x, [0.0, 1.0], "rk4")
    # An empty batch has nothing to control: it integrates without error.
    assert integrate_adaptive(_linear, torch.zeros(0, 2), 0.0, 1.0).x.shape == (0, 2)
