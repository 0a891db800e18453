"""One ODE integrator core for every sampler: fixed-step Euler / Heun and adaptive Dormand–Prince RK45.

Used by the rectified-flow sampler (:mod:`lightning_tiger.generative.flow`, t = 0 → 1) and by the
probability-flow ODE of the score SDEs (:mod:`lightning_tiger.generative.samplers`, t = T → t_end); time may run
either way. A field is any callable ``f(x [b, *shape], t: float) -> dx/dt [b, *shape]``; the callers build the
time tensor their model wants.

Every step is written ``x ← x + h·slope``; ``on_step(t, h, slope)`` sees each accepted step (the flow's
straightness is a sum over them).

References:
    Heun's method = the explicit trapezoidal rule (Süli & Mayers, "An Introduction to Numerical Analysis",
    2003, §12.5). Dormand & Prince, "A family of embedded Runge–Kutta formulae", J. Comput. Appl. Math. 6
    (1980) 19–26 (RK5(4)7M, the 5(4) pair with FSAL, the coefficients of scipy's ``RK45`` and torchdiffeq's ``dopri5``);
    step-size control as Hairer, Nørsett & Wanner, "Solving Ordinary Differential Equations I", 2nd ed. 1993,
    §II.4 "Automatic Step Size Control" (RMS error norm, step update with safety factor 0.9 and the growth
    factor clipped to [0.2, 10]).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lightning_tiger.validation import check_int, check_real

__all__ = [
    "FIXED_STEP_METHODS",
    "Field",
    "ODESolution",
    "StepHook",
    "integrate_adaptive",
    "integrate_fixed",
    "progress_range",
]

Field = Callable[[Tensor, float], Tensor]
StepHook = Callable[[float, float, Tensor], None]


@dataclass
class ODESolution:
    """Result of :func:`integrate_fixed` / :func:`integrate_adaptive`.

    Attributes:
        x: the state at the final time ``[b, *shape]``.
        nfe: number of field evaluations.
        times: the accepted time points, start and end included.
        trajectory: the states at ``times`` when requested, else ``None``.
    """

    x: Tensor
    nfe: int
    times: list[float]
    trajectory: list[Tensor] | None


def progress_range(n: int, enabled: bool, desc: str) -> Iterable[int]:
    """``range(n)``, wrapped in a tqdm bar when ``enabled``."""
    return tqdm(range(n), desc=desc, leave=False) if enabled else range(n)


def _euler_slope(f: Field, x: Tensor, t: float, h: float) -> tuple[Tensor, int]:
    return f(x, t), 1


def _heun_slope(f: Field, x: Tensor, t: float, h: float) -> tuple[Tensor, int]:
    # Explicit trapezoid: average the slope at the start and at the Euler predictor's end point.
    d1 = f(x, t)
    d2 = f(x + h * d1, t + h)
    return 0.5 * (d1 + d2), 2


FIXED_STEP_METHODS: dict[str, Callable[[Field, Tensor, float, float], tuple[Tensor, int]]] = {
    "euler": _euler_slope,
    "heun": _heun_slope,
}


def integrate_fixed(f: Field, x: Tensor, grid: Sequence[float], method: str = "euler", *,
                    keep_trajectory: bool = False, on_step: StepHook | None = None, progress: bool = False,
                    desc: str = "ode") -> ODESolution:
    """Fixed-step integration of ``dx/dt = f(x, t)`` along ``grid`` (increasing or decreasing times).

    Args:
        f: the field.
        x: the state at ``grid[0]`` ``[b, *shape]``.
        grid: times t_0, …, t_N (N >= 1 steps).
        method: ``"euler"`` (1 evaluation per step) or ``"heun"`` (explicit trapezoid, 2nd order, 2 per step).
        keep_trajectory: record the state at every grid point.
        on_step: called as ``on_step(t_i, h_i, slope)`` after each step ``x ← x + h_i·slope``.
        progress: tqdm bar titled ``desc``.
    """
    if method not in FIXED_STEP_METHODS:
        raise ValueError(f"method must be one of {tuple(FIXED_STEP_METHODS)}, got {method!r}")
    if len(grid) < 2:
        raise ValueError(f"grid must hold at least 2 times, got {len(grid)}")
    slope_of = FIXED_STEP_METHODS[method]
    traj = [x] if keep_trajectory else None
    nfe = 0
    for i in progress_range(len(grid) - 1, progress, desc):
        t, h = grid[i], grid[i + 1] - grid[i]
        slope, calls = slope_of(f, x, t, h)
        nfe += calls
        x = x + h * slope
        if on_step is not None:
            on_step(t, h, slope)
        if traj is not None:
            traj.append(x)
    return ODESolution(x=x, nfe=nfe, times=list(grid), trajectory=traj)


# Dormand–Prince RK5(4)7M (Dormand & Prince 1980): nodes c, matrix a, 5th-order weights b5 (= the last row
# of a: first same as last), and the error weights b5 − b4 with the embedded 4th-order weights b4.
DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
DP_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)


def _error_norm(err: Tensor, x: Tensor, x_new: Tensor, rtol: float, atol: float) -> float:
    """RMS over all elements of err / (atol + rtol·max(|x|, |x_new|)) (Hairer, Nørsett & Wanner §II.4)."""
    if err.numel() == 0:
        return 0.0  # an empty batch has nothing to control
    scale = atol + rtol * torch.maximum(x.abs(), x_new.abs())
    return float((err / scale).detach().pow(2).mean().sqrt())


def integrate_adaptive(f: Field, x: Tensor, t0: float, t1: float, *, rtol: float = 1e-5, atol: float = 1e-5,
                       first_step: float | None = None, max_steps: int = 10_000, keep_trajectory: bool = False,
                       on_step: StepHook | None = None, progress: bool = False, desc: str = "ode_adaptive"
                       ) -> ODESolution:
    """Adaptive Dormand–Prince RK45 from ``t0`` to ``t1`` (either direction), one step size for the batch.

    As scipy's ``solve_ivp(method="RK45")`` on the flattened batch: a step is accepted when the error norm
    (RMS over all elements of e / (atol + rtol·max(|x|, |x_new|))) is ≤ 1; the next step is
    h·clip(0.9·err^(−1/5), 0.2, 10) (never larger after a rejection). FSAL: 6 evaluations per attempted step,
    plus one at the start.

    Non-finite values: a NaN/inf error estimate is never accepted. The step is rejected and h shrinks by 0.2 (a
    too-large step can overflow the field); when h falls below the float resolution of t the solver raises
    :class:`FloatingPointError` naming t (a model that returns NaN there). A non-finite field at the start (a
    NaN/inf input) raises at once: shrinking h cannot help there.

    Args:
        f: the field.
        x: state at ``t0`` ``[b, *shape]``.
        t0, t1: start and end time (``t0 != t1``).
        rtol, atol: tolerances (> 0), default 1e-5 each.
        first_step: initial |h| in (0, |t1 − t0|]; default 1% of the interval.
        max_steps: cap on attempted (accepted + rejected) steps; RuntimeError beyond it.
        keep_trajectory: record the state at every accepted time.
        on_step: called as ``on_step(t, h, slope)`` for each accepted step ``x ← x + h·slope``.
        progress: tqdm bar over the time interval, titled ``desc``.

    Raises:
        RuntimeError: more than ``max_steps`` attempts.
        FloatingPointError: non-finite field or error estimate that no step size resolves.
    """
    check_real("rtol", rtol, low=0.0, low_open=True)
    check_real("atol", atol, low=0.0, low_open=True)
    check_int("max_steps", max_steps, low=1)
    span = abs(t1 - t0)
    if not (math.isfinite(span) and span > 0):
        raise ValueError(f"t0 and t1 must be finite and differ, got t0={t0}, t1={t1}")
    if first_step is None:
        first_step = 0.01 * span
    if not (isinstance(first_step, (int, float)) and 0 < first_step <= span):
        raise ValueError(f"first_step must be in (0, {span}], got {first_step}")
    direction = 1.0 if t1 > t0 else -1.0
    h = direction * float(first_step)
    t = float(t0)
    traj = [x] if keep_trajectory else None
    times = [t]
    k1 = f(x, t)
    if not bool(torch.isfinite(k1).all()):
        raise FloatingPointError(
            f"the adaptive ODE solver got a non-finite velocity/score at the start t={t:.6g} (non-finite input "
            "or model output): no step size can fix it; check the input and the model"
        )
    nfe, attempts = 1, 0
    bar = tqdm(total=span, desc=desc, leave=False) if progress else None
    try:
        while direction * (t1 - t) > 1e-12:
            attempts += 1
            if attempts > max_steps:
                raise RuntimeError(f"the adaptive solver exceeded max_steps={max_steps} (t={t:.4g}); "
                                   "loosen rtol/atol or raise max_steps")
            if direction * (t + h - t1) > 0:
                h = t1 - t  # do not step past t1
            ks = [k1]
            for stage in range(1, 7):
                xs = x + h * sum(a * k for a, k in zip(DP_A[stage], ks) if a != 0.0)
                ks.append(f(xs, t + DP_C[stage] * h))
            nfe += 6
            x_new = xs  # the last stage's input is the 5th-order solution (FSAL)
            err = _error_norm(h * sum(e * k for e, k in zip(DP_E, ks) if e != 0.0), x, x_new, rtol, atol)
            finite = math.isfinite(err)
            if finite and err <= 1.0:
                if on_step is not None:
                    on_step(t, h, (x_new - x) / h)
                if bar is not None:
                    bar.update(abs(h))
                t, x, k1 = t + h, x_new, ks[6]  # k1 is finite here: it enters err with weight −1/40
                times.append(t)
                if traj is not None:
                    traj.append(x)
                h *= 10.0 if err == 0.0 else min(10.0, max(0.2, 0.9 * err**-0.2))
                continue
            # Rejected: shrink (a NaN/inf estimate by the smallest allowed factor, 0.2), down to the float
            # resolution of t, where stepping stops making progress (scipy's RK45 fails there too).
            h *= min(1.0, max(0.2, 0.9 * err**-0.2)) if finite else 0.2
            if abs(h) < 16 * math.ulp(max(1.0, abs(t))):
                cause = "a non-finite error estimate" if not finite else f"error norm {err:.3g} > 1"
                raise FloatingPointError(
                    f"the adaptive solver's step size underflowed at t={t:.6g} with {cause}: the velocity/score "
                    "is non-finite or not resolvable near this time; check the model"
                )
    finally:
        if bar is not None:
            bar.close()
    return ODESolution(x=x, nfe=nfe, times=times, trajectory=traj)
