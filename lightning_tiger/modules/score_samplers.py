"""Samplers for score SDEs (SPEC §4.2): reverse-SDE Euler–Maruyama, predictor–corrector, probability-flow ODE
(Euler, Heun, adaptive Dormand–Prince RK45) and NCSN annealed Langevin dynamics.

Every sampler takes ``score_fn(x [batch, *shape], t [batch]) -> score [batch, *shape]`` and an :class:`SDE`,
integrates from t = T down to ``t_end`` (1e-3 by default, as score_sde_pytorch) on a uniform grid, keeps the
state in fp32 with autocast disabled for the update arithmetic, and returns the *noise-free mean* of the last
step (the last stochastic step's noise is not added, score_sde_pytorch's ``denoise`` convention).

With ``return_trajectory=True`` a sampler returns ``(x, trajectory)`` where trajectory ``[k, batch, *shape]``
holds the state after each step (k = steps + 1 with the start; adaptive: accepted steps + 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from lightning_tiger.modules.flow_solvers import _DP_A, _DP_C
from lightning_tiger.modules.sde import SDE, VESDE, VPSDE, _bcast, randn
from lightning_tiger.validation import check_int, check_real

ScoreFn = Callable[[Tensor, Tensor], Tensor]

SAMPLERS: tuple[str, ...] = ("em", "pc", "ode_euler", "ode_heun", "ode_adaptive", "annealed_langevin")


def _progress(iterable: range, enabled: bool, desc: str) -> range:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)  # type: ignore[return-value]


def _check(x: Tensor, steps: int, t_end: float, sde: SDE) -> None:
    check_int("steps", steps, low=1)
    check_real("t_end", t_end, low=0.0, high=float(sde.T), high_open=True)
    if x.ndim < 1:
        raise ValueError(f"x must have shape [batch, *shape], got {tuple(x.shape)}")


def _grid(sde: SDE, steps: int, t_end: float, device: torch.device) -> Tensor:
    return torch.linspace(sde.T, t_end, steps + 1, device=device, dtype=torch.float64).float()


def _score(score_fn: ScoreFn, x: Tensor, t: float | Tensor) -> Tensor:
    tt = torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)
    return score_fn(x, tt).float()


def _finish(x: Tensor, traj: list[Tensor] | None, return_trajectory: bool) -> Tensor | tuple[Tensor, Tensor]:
    if return_trajectory:
        assert traj is not None
        return x, torch.stack(traj)
    return x


def euler_maruyama(score_fn: ScoreFn, sde: SDE, x: Tensor, steps: int, *, t_end: float = 1e-3,
                   generator: torch.Generator | None = None, return_trajectory: bool = False,
                   progress: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Euler–Maruyama on the reverse SDE dx = [f − g² s] dt + g dw̄ (Song et al. 2021 eq. 6).

    With h = t_i − t_{i+1} > 0: x̄ = x − (f(x, t_i) − g(t_i)² s(x, t_i)) h, x = x̄ + g(t_i) sqrt(h) z;
    the last step returns x̄.

    Args:
        score_fn: the score model.
        sde: the forward SDE.
        x: start ``[batch, *shape]`` (usually ``sde.prior_sample``).
        steps: number of steps N (>= 1).
        t_end: final time (default 1e-3).
        generator: noise generator (may live on another device than ``x``).
        return_trajectory: also return the ``[steps + 1, batch, *shape]`` path.
        progress: tqdm progress bar.
    """
    _check(x, steps, t_end, sde)
    ts = _grid(sde, steps, t_end, x.device)
    x = x.float()
    traj = [x] if return_trajectory else None
    for i in _progress(range(steps), progress, "em"):
        t, h = ts[i], float(ts[i] - ts[i + 1])
        score = _score(score_fn, x, t)
        with torch.autocast(device_type=x.device.type, enabled=False):
            tb = t.expand(x.shape[0])
            mean = x - sde.reverse_drift(x, tb, score) * h
            if i < steps - 1:
                x = mean + _bcast(sde.diffusion(tb), x) * math.sqrt(h) * randn(
                    x.shape, generator=generator, device=x.device)
            else:
                x = mean
        if traj is not None:
            traj.append(x)
    return _finish(x, traj, return_trajectory)


def langevin_corrector(score_fn: ScoreFn, sde: SDE, x: Tensor, t: Tensor, h: float, *, snr: float = 0.16,
                       n_steps: int = 1, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Langevin corrector of Song et al. 2021 (Algorithm 4/5, score_sde_pytorch ``LangevinCorrector``).

    step = 2·a·(snr·||z|| / ||s||)² with ||·|| the per-sample L2 norm averaged over the batch (as the reference
    code); a = exp(−β(t)·h) for VP/sub-VP and 1 otherwise; x̄ = x + step·s, x = x̄ + sqrt(2·step)·z.
    Returns (x, x̄). The reference uses DDPM's discrete α_i = 1 − β(t)·h, which agrees to first order but turns
    negative (NaN steps) for coarse grids (β(1)·h > 1, e.g. 10 steps of VP); exp(−β h) stays in (0, 1).
    A fixed ``snr`` keeps a Langevin bias that does not vanish as steps → ∞ (ULA at relative step ≈ snr²).
    """
    if x.numel() == 0:
        # An empty batch has no norms to average (reshape(0, -1) is ambiguous); nothing to correct.
        return x, x
    a = math.exp(-float(sde.beta(t)) * h) if isinstance(sde, VPSDE) else 1.0
    mean = x
    for _ in range(n_steps):
        score = _score(score_fn, x, t)
        with torch.autocast(device_type=x.device.type, enabled=False):
            z = randn(x.shape, generator=generator, device=x.device)
            s_norm = score.reshape(score.shape[0], -1).norm(dim=-1).mean()
            z_norm = z.reshape(z.shape[0], -1).norm(dim=-1).mean()
            step = 2.0 * a * (snr * z_norm / s_norm.clamp_min(1e-12)) ** 2
            mean = x + step * score
            x = mean + torch.sqrt(2.0 * step) * z
    return x, mean


def predictor_corrector(score_fn: ScoreFn, sde: SDE, x: Tensor, steps: int, *, snr: float = 0.16,
                        corrector_steps: int = 1, t_end: float = 1e-3, generator: torch.Generator | None = None,
                        return_trajectory: bool = False, progress: bool = False
                        ) -> Tensor | tuple[Tensor, Tensor]:
    """Predictor–corrector sampling (Song et al. 2021 Alg. 1): per step, ``corrector_steps`` Langevin
    corrections at t_i (:func:`langevin_corrector`, ``snr`` default 0.16) then one Euler–Maruyama predictor
    step to t_{i+1}. 2 score evaluations per step with the default. The last predictor step is noise-free.

    The reference code uses the "reverse diffusion" (discretised DDPM ancestral) predictor for its VP/VE
    configs; Euler–Maruyama is the predictor of Song et al.'s Alg. 1 form and converges to the same limit.
    """
    _check(x, steps, t_end, sde)
    check_real("snr", snr, low=0.0, low_open=True)
    check_int("corrector_steps", corrector_steps, low=0)
    ts = _grid(sde, steps, t_end, x.device)
    x = x.float()
    traj = [x] if return_trajectory else None
    for i in _progress(range(steps), progress, "pc"):
        t, h = ts[i], float(ts[i] - ts[i + 1])
        if corrector_steps:
            x, _ = langevin_corrector(score_fn, sde, x, t, h, snr=snr, n_steps=corrector_steps,
                                      generator=generator)
        score = _score(score_fn, x, t)
        with torch.autocast(device_type=x.device.type, enabled=False):
            tb = t.expand(x.shape[0])
            mean = x - sde.reverse_drift(x, tb, score) * h
            if i < steps - 1:
                x = mean + _bcast(sde.diffusion(tb), x) * math.sqrt(h) * randn(
                    x.shape, generator=generator, device=x.device)
            else:
                x = mean
        if traj is not None:
            traj.append(x)
    return _finish(x, traj, return_trajectory)


def _ode_velocity(score_fn: ScoreFn, sde: SDE, x: Tensor, t: Tensor | float) -> Tensor:
    """Probability-flow ODE velocity dx/dt = f − ½g² s (Song et al. 2021 eq. 13)."""
    score = _score(score_fn, x, t)
    with torch.autocast(device_type=x.device.type, enabled=False):
        tb = torch.full((x.shape[0],), float(t), device=x.device)
        return sde.reverse_drift(x, tb, score, ode=True)


def ode_euler(score_fn: ScoreFn, sde: SDE, x: Tensor, steps: int, *, t_end: float = 1e-3,
              return_trajectory: bool = False, progress: bool = False, **_: object
              ) -> Tensor | tuple[Tensor, Tensor]:
    """Fixed-step Euler on the probability-flow ODE, t = T → t_end (1 score evaluation per step)."""
    _check(x, steps, t_end, sde)
    ts = _grid(sde, steps, t_end, x.device)
    x = x.float()
    traj = [x] if return_trajectory else None
    for i in _progress(range(steps), progress, "ode_euler"):
        x = x + _ode_velocity(score_fn, sde, x, ts[i]) * float(ts[i + 1] - ts[i])
        if traj is not None:
            traj.append(x)
    return _finish(x, traj, return_trajectory)


def ode_heun(score_fn: ScoreFn, sde: SDE, x: Tensor, steps: int, *, t_end: float = 1e-3,
             return_trajectory: bool = False, progress: bool = False, **_: object
             ) -> Tensor | tuple[Tensor, Tensor]:
    """Fixed-step Heun (explicit trapezoid, 2nd order) on the probability-flow ODE (2 evaluations per step)."""
    _check(x, steps, t_end, sde)
    ts = _grid(sde, steps, t_end, x.device)
    x = x.float()
    traj = [x] if return_trajectory else None
    for i in _progress(range(steps), progress, "ode_heun"):
        dt = float(ts[i + 1] - ts[i])
        d1 = _ode_velocity(score_fn, sde, x, ts[i])
        x_pred = x + d1 * dt
        d2 = _ode_velocity(score_fn, sde, x_pred, ts[i + 1])
        x = x + 0.5 * (d1 + d2) * dt
        if traj is not None:
            traj.append(x)
    return _finish(x, traj, return_trajectory)


# Dormand–Prince 5(4): the tableau (_DP_C, _DP_A) is the flow solvers'; _DP_E = b5 − b4, the error weights.
_DP_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)  # b5 − b4


def ode_adaptive(score_fn: ScoreFn, sde: SDE, x: Tensor, *, rtol: float = 1e-5, atol: float = 1e-5,
                 t_end: float = 1e-3, first_step: float | None = None, max_steps: int = 10_000,
                 return_trajectory: bool = False, progress: bool = False, return_nfe: bool = False, **_: object
                 ) -> Tensor | tuple[Tensor, ...]:
    """Adaptive Dormand–Prince RK45 on the probability-flow ODE (our own; no torchdiffeq/scipy).

    One step size for the whole batch (as scipy's ``solve_ivp`` on the flattened batch, the reference code's
    solver): error = RMS over all elements of e / (atol + rtol·max(|x|, |x_new|)), accept when ≤ 1, next
    h = h·clip(0.9·error^(−1/5), 0.2, 10) (Hairer, Nørsett & Wanner I, II.4). FSAL: 6 evaluations per accepted
    step. Defaults rtol = atol = 1e-5 (score_sde_pytorch).

    Args:
        rtol, atol: tolerances (> 0).
        t_end: final time.
        first_step: initial |h|; default 1% of the interval.
        max_steps: cap on attempted steps (raises RuntimeError beyond).
        return_nfe: also return the number of score evaluations (an int) as the last tuple element.
    """
    _check(x, 1, t_end, sde)
    check_real("rtol", rtol, low=0.0, low_open=True)
    check_real("atol", atol, low=0.0, low_open=True)
    check_int("max_steps", max_steps, low=1)
    span = sde.T - t_end
    h = -(first_step if first_step is not None else 0.01 * span)
    if h >= 0 or -h > span:
        raise ValueError(f"first_step must be in (0, {span}], got {first_step}")
    x = x.float()
    t = float(sde.T)
    traj = [x] if return_trajectory else None
    k1 = _ode_velocity(score_fn, sde, x, t)
    nfe, attempts = 1, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=span, desc="ode_adaptive", leave=False)
    while t > t_end + 1e-12:
        attempts += 1
        if attempts > max_steps:
            raise RuntimeError(f"ode_adaptive exceeded max_steps={max_steps} (t={t:.4g}); loosen rtol/atol")
        h = max(h, t_end - t)  # do not step past t_end (h < 0)
        ks = [k1]
        for stage in range(1, 7):
            xs = x + h * sum(a * k for a, k in zip(_DP_A[stage], ks) if a != 0.0)
            ks.append(_ode_velocity(score_fn, sde, xs, t + _DP_C[stage] * h))
        nfe += 6
        x_new = xs  # stage 7 input is the 5th-order solution (FSAL)
        err_vec = h * sum(e * k for e, k in zip(_DP_E, ks) if e != 0.0)
        scale = atol + rtol * torch.maximum(x.abs(), x_new.abs())
        err = float(torch.sqrt(torch.mean((err_vec / scale) ** 2)))
        accept = math.isfinite(err) and err <= 1.0
        if accept:
            if bar is not None:
                bar.update(-h)
            t = t + h
            x, k1 = x_new, ks[6]
            if traj is not None:
                traj.append(x)
        if not math.isfinite(err):
            factor = 0.2
        elif err == 0.0:
            factor = 10.0
        else:
            factor = min(10.0, max(0.2, 0.9 * err**-0.2))
        if not accept:
            factor = min(factor, 1.0)
        h = h * factor
    if bar is not None:
        bar.close()
    out: tuple[Tensor, ...] = (x,)
    if return_trajectory:
        assert traj is not None
        out = (*out, torch.stack(traj))
    if return_nfe:
        out = (*out, nfe)  # type: ignore[assignment]
    return out[0] if len(out) == 1 else out


def geometric_sigmas(sigma_max: float = 1.0, sigma_min: float = 0.01, num_levels: int = 10) -> Tensor:
    """NCSN noise levels σ_1 > … > σ_L, geometric from ``sigma_max`` to ``sigma_min`` (defaults 1 → 0.01, 10)."""
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    check_int("num_levels", num_levels, low=2)
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), num_levels, dtype=torch.float64)
                     ).float()


def annealed_langevin(score_fn: ScoreFn, sde: VESDE, x: Tensor, steps: int = 100, *, sigmas: Tensor | None = None,
                      eps: float = 2e-5, generator: torch.Generator | None = None, return_trajectory: bool = False,
                      progress: bool = False, **_: object) -> Tensor | tuple[Tensor, Tensor]:
    """NCSN annealed Langevin dynamics (Song & Ermon 2019, Alg. 1) with a VE-trained score model.

    For each level σ_i (default :func:`geometric_sigmas`: 10 levels 1 → 0.01), ``steps`` (default 100) updates
    x ← x + a_i s(x, σ_i) + sqrt(2 a_i) z with a_i = ε (σ_i/σ_L)², ε = 2e-5; the score at level σ is the VE
    model's score at t = ``sde.t_for_sigma(σ)``, so levels must lie in [σ_min, σ_max] of the SDE. The very last
    update omits the noise (noise-free mean). Start ``x`` is usually N(0, σ_1² I).

    Trajectory: the state after each level (``[num_levels + 1, batch, *shape]``).
    """
    if not isinstance(sde, VESDE):
        raise ValueError(f"annealed_langevin needs a VESDE-trained model (noise levels σ), got {sde!r}")
    check_int("steps", steps, low=1)
    check_real("eps", eps, low=0.0, low_open=True)
    sig = geometric_sigmas() if sigmas is None else torch.as_tensor(sigmas, dtype=torch.float32).flatten()
    if float(sig.min()) < sde.sigma_min * (1 - 1e-6) or float(sig.max()) > sde.sigma_max * (1 + 1e-6):
        raise ValueError(f"sigmas must lie in [sigma_min, sigma_max]=[{sde.sigma_min}, {sde.sigma_max}] of the "
                         f"SDE, got [{float(sig.min())}, {float(sig.max())}]")
    ts = sde.t_for_sigma(sig).clamp(0.0, 1.0)
    x = x.float()
    traj = [x] if return_trajectory else None
    sigma_last = float(sig[-1])
    for i in _progress(range(len(sig)), progress, "annealed_langevin"):
        step = eps * (float(sig[i]) / sigma_last) ** 2
        for j in range(steps):
            score = _score(score_fn, x, ts[i])
            with torch.autocast(device_type=x.device.type, enabled=False):
                x = x + step * score
                if not (i == len(sig) - 1 and j == steps - 1):
                    x = x + math.sqrt(2.0 * step) * randn(x.shape, generator=generator, device=x.device)
        if traj is not None:
            traj.append(x)
    return _finish(x, traj, return_trajectory)
