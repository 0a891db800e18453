"""Sampling and diagnostics of rectified flows: Euler, Heun, adaptive Dormand–Prince RK45, straightness.

Liu, Gong & Liu, "Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified Flow",
ICLR 2023 (arXiv:2209.03003). Convention (the paper's): noise / source at t = 0, data at t = 1,
``dZ_t = v(Z_t, t) dt`` integrated forward from Z_0. A velocity is any callable ``v(x [b, *shape], t [b])``.

The notes (seed post "生成扩散模型漫谈(十七)") use the opposite convention (data at t = 0, noise at t = 1,
sampling from t = 1 down). The two map into each other by t ↦ 1 − t, v ↦ −v: :func:`flip_time_convention`
converts a velocity either way (the map is an involution).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_tiger.generative.ode import integrate_adaptive, integrate_fixed

__all__ = [
    "SOLVERS",
    "FlowSolution",
    "Velocity",
    "flip_time_convention",
    "gaussian_1rf_velocity",
    "integrate",
    "straightness",
]

Velocity = Callable[[Tensor, Tensor], Tensor]
SOLVERS = ("euler", "heun", "adaptive")


def flip_time_convention(velocity: Velocity) -> Velocity:
    """Convert a velocity between the paper's and the notes' conventions: ``v'(x, t) = −v(x, 1 − t)``.

    If ``Z_t`` solves ``dZ = v(Z, t) dt`` then ``Y_s = Z_{1−s}`` solves ``dY = −v(Y, 1 − s) ds``. Applying the
    map twice returns the original velocity.
    """

    def flipped(x: Tensor, t: Tensor) -> Tensor:
        return -velocity(x, 1.0 - t)

    return flipped


def gaussian_1rf_velocity(x: Tensor, t: Tensor, m: float = 3.0, s: float = 0.5) -> Tensor:
    """Exact 1-RF velocity from N(0, 1) to N(m, s²) under the independent coupling (a closed form of Liu et al.'s
    velocity E[X_1 − X_0 | X_t = x] for Gaussians).

    ``X_t = tX_1 + (1−t)X_0 ~ N(tm, t²s² + (1−t)²)`` and ``v(x, t) = E[X_1 − X_0 | X_t = x]
    = m + c(t)(x − tm)`` with ``c(t) = (ts² − (1−t)) / (t²s² + (1−t)²)``; elementwise, so it also serves
    isotropic d-dimensional targets.

    Args:
        x: ``[b, *shape]``.
        t: ``[b]`` or 0-d, in [0, 1].
        m: target mean (default 3). s: target std (default 0.5).

    Returns:
        ``[b, *shape]``.
    """
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 1:
        t = t.reshape(-1, *([1] * (x.ndim - 1)))
    c = (t * s * s - (1 - t)) / (t * t * s * s + (1 - t) ** 2)
    return m + c * (x - t * m)


@dataclass
class FlowSolution:
    """Result of :func:`integrate`.

    Attributes:
        z1: endpoint ``[b, *shape]``.
        nfe: number of velocity evaluations.
        times: accepted time points ``[k + 1]`` (0 … 1).
        trajectory: states at ``times`` ``[k + 1, b, *shape]`` when requested, else ``None``.
        straightness: ``Σ_k Δt_k · E||(Z_1 − Z_0) − v_k||²`` with v_k the velocity of step k (Euler: exactly
            the Riemann sum of Liu et al.'s S; Heun / RK45: the step's effective velocity (Z_{k+1} − Z_k)/Δt).
    """

    z1: Tensor
    nfe: int
    times: Tensor
    trajectory: Tensor | None
    straightness: Tensor


def _time(t: float, like: Tensor) -> Tensor:
    # t stays fp32 (or the state's dtype if wider) even under autocast: the velocity's time input is precise.
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return torch.full((like.shape[0],), float(t), dtype=dtype, device=like.device)


def _sq_norm_mean(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).pow(2).sum(1).mean()


def integrate(
    velocity: Velocity,
    z0: Tensor,
    steps: int = 100,
    solver: str = "euler",
    *,
    return_trajectory: bool = False,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 10_000,
) -> FlowSolution:
    """Integrate ``dZ = v(Z, t) dt`` from t = 0 to t = 1 starting at ``z0``.

    Solvers (all from :mod:`lightning_tiger.generative.ode`):
        - ``"euler"``: ``Z ← Z + v(Z, t_k)/N`` on the uniform grid t_k = k/N (Liu, Gong & Liu 2023);
          N velocity calls. One step from the 1-RF of N(0,1) → N(3, 0.5²) outputs exactly the mean.
        - ``"heun"``: explicit trapezoid (2nd order), 2N velocity calls.
        - ``"adaptive"``: Dormand–Prince RK45 with FSAL and the standard step-size controller (as scipy's
          ``RK45``): error norm = RMS over all elements of ``err / (atol + rtol·max(|z|, |z_new|))``; ``steps``
          is ignored (initial step 1/steps). Reported ``nfe`` counts every velocity call. A non-finite error
          estimate is rejected, never accepted (see :func:`~lightning_tiger.generative.ode.integrate_adaptive`).

    Args:
        velocity: ``v(x [b, *shape], t [b]) -> [b, *shape]``.
        z0: initial state ``[b, *shape]``.
        steps: N >= 1 for the fixed-step solvers (default 100).
        solver: ``"euler"`` | ``"heun"`` | ``"adaptive"``.
        return_trajectory: keep the states at every accepted time.
        rtol, atol: tolerances of the adaptive solver (default 1e-5 each).
        max_steps: cap on accepted + rejected adaptive steps (RuntimeError beyond it).

    Returns:
        :class:`FlowSolution`.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not isinstance(z0, Tensor) or z0.ndim < 1:
        raise ValueError("z0 must be a tensor of shape [batch, *shape]")

    def field(z: Tensor, t: float) -> Tensor:
        return velocity(z, _time(t, z))

    step_velocities: list[tuple[float, Tensor]] = []  # (dt, effective velocity) for the straightness sum

    def record(t: float, h: float, slope: Tensor) -> None:
        step_velocities.append((h, slope))

    if solver == "adaptive":
        sol = integrate_adaptive(field, z0, 0.0, 1.0, rtol=rtol, atol=atol, first_step=1.0 / steps,
                                 max_steps=max_steps, keep_trajectory=return_trajectory, on_step=record)
    else:
        dt = 1.0 / steps
        sol = integrate_fixed(field, z0, [k * dt for k in range(steps + 1)], solver,
                              keep_trajectory=return_trajectory, on_step=record)
    displacement = sol.x - z0
    s_val = sum(dt * _sq_norm_mean(displacement - v) for dt, v in step_velocities)
    return FlowSolution(
        z1=sol.x,
        nfe=sol.nfe,
        times=torch.tensor(sol.times, dtype=torch.float64),
        trajectory=torch.stack(sol.trajectory) if sol.trajectory is not None else None,
        straightness=torch.as_tensor(s_val).detach().to(torch.float64),
    )


def straightness(velocity: Velocity, z0: Tensor, steps: int = 100) -> tuple[Tensor, Tensor]:
    """Straightness S and transport cost of the flow started at ``z0`` (Liu, Gong & Liu 2023).

    ``S(Z) = ∫_0^1 E||(Z_1 − Z_0) − Ż_t||² dt`` (0 iff every path is a straight line at constant speed),
    estimated with the Euler Riemann sum on ``steps`` points; transport cost ``E||Z_1 − Z_0||²``.
    For the 1-RF of N(0,1) → N(3, 0.5²), whose coupling is Z_1 = 0.5·Z_0 + 3, S = 0.2146.

    Returns:
        ``(S, cost)``, both 0-d float64 tensors.
    """
    sol = integrate(velocity, z0, steps, "euler")
    return sol.straightness, _sq_norm_mean(sol.z1 - z0).detach().double()
