"""ODE solvers and diagnostics for rectified flows: Euler, Heun, adaptive Dormand–Prince RK45, straightness.

Convention (Liu, Gong, Liu, ICLR 2023; SPEC §5): noise / source at t = 0, data at t = 1,
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
    """Exact 1-RF velocity from N(0, 1) to N(m, s²) under the independent coupling (SPEC §5 closed form).

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
            the Riemann sum of SPEC §5's S; Heun / RK45: the step's effective velocity (Z_{k+1} − Z_k)/Δt).
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


# Dormand–Prince 5(4) tableau (Dormand & Prince 1980; the coefficients of scipy's RK45 / torchdiffeq dopri5).
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DP_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)


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

    Solvers:
        - ``"euler"``: ``Z ← Z + v(Z, t_k)/N`` on the uniform grid t_k = k/N (SPEC §5); N velocity calls.
          One step from the 1-RF of N(0,1) → N(3, 0.5²) outputs exactly the mean.
        - ``"heun"``: explicit trapezoid (2nd order), 2N velocity calls.
        - ``"adaptive"``: Dormand–Prince RK45 with FSAL and the standard step-size controller (as scipy's
          ``RK45``): error norm = RMS over all elements of ``err / (atol + rtol·max(|z|, |z_new|))``; ``steps``
          is ignored (initial step 1/steps). Reported ``nfe`` counts every velocity call.

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
    z = z0
    times = [0.0]
    traj = [z0] if return_trajectory else None
    step_velocities: list[tuple[float, Tensor]] = []  # (dt, effective velocity) for the straightness sum
    nfe = 0
    if solver in ("euler", "heun"):
        dt = 1.0 / steps
        for k in range(steps):
            t = k * dt
            v = velocity(z, _time(t, z))
            nfe += 1
            if solver == "heun":
                z_pred = z + dt * v
                v2 = velocity(z_pred, _time(t + dt, z))
                nfe += 1
                v = 0.5 * (v + v2)
            z = z + dt * v
            step_velocities.append((dt, v))
            times.append((k + 1) * dt)
            if traj is not None:
                traj.append(z)
    else:
        t, h = 0.0, 1.0 / steps
        k1 = velocity(z, _time(0.0, z))
        nfe += 1
        attempts = 0
        while t < 1.0 - 1e-12:
            attempts += 1
            if attempts > max_steps:
                raise RuntimeError(f"adaptive solver exceeded max_steps={max_steps} (t = {t:.4g})")
            h = min(h, 1.0 - t)
            ks = [k1]
            for i in range(1, 7):
                zi = z + h * sum(a * kj for a, kj in zip(_DP_A[i], ks) if a != 0.0)
                ks.append(velocity(zi, _time(t + _DP_C[i] * h, z)))
                nfe += 1
            z_new = z + h * sum(b * kj for b, kj in zip(_DP_B5, ks) if b != 0.0)
            err = h * sum((b5 - b4) * kj for b5, b4, kj in zip(_DP_B5, _DP_B4, ks) if b5 != b4)
            scale = atol + rtol * torch.maximum(z.abs(), z_new.abs())
            err_norm = float((err / scale).detach().pow(2).mean().sqrt())
            if err_norm <= 1.0:
                step_velocities.append((h, (z_new - z) / h))
                t += h
                z = z_new
                k1 = ks[6]  # FSAL: the 7th stage is the velocity at the accepted point
                times.append(t)
                if traj is not None:
                    traj.append(z)
            # Standard controller with safety 0.9, growth in [0.2, 10] (Hairer, Nørsett, Wanner II.4).
            factor = 10.0 if err_norm == 0 else min(10.0, max(0.2, 0.9 * err_norm ** (-1 / 5)))
            h = h * factor
    displacement = z - z0
    s_val = sum(dt * _sq_norm_mean(displacement - v) for dt, v in step_velocities)
    return FlowSolution(
        z1=z,
        nfe=nfe,
        times=torch.tensor(times, dtype=torch.float64),
        trajectory=torch.stack(traj) if traj is not None else None,
        straightness=torch.as_tensor(s_val).detach().to(torch.float64),
    )


def straightness(velocity: Velocity, z0: Tensor, steps: int = 100) -> tuple[Tensor, Tensor]:
    """Straightness S and transport cost of the flow started at ``z0`` (SPEC §5).

    ``S(Z) = ∫_0^1 E||(Z_1 − Z_0) − Ż_t||² dt`` (0 iff every path is a straight line at constant speed),
    estimated with the Euler Riemann sum on ``steps`` points; transport cost ``E||Z_1 − Z_0||²``.
    For the 1-RF of N(0,1) → N(3, 0.5²), S = 0.2146 (SPEC §5).

    Returns:
        ``(S, cost)``, both 0-d float64 tensors.
    """
    sol = integrate(velocity, z0, steps, "euler")
    return sol.straightness, _sq_norm_mean(sol.z1 - z0).detach().double()
