"""Samplers for score SDEs: reverse-SDE Euler–Maruyama, predictor–corrector, probability-flow ODE (Euler, Heun,
adaptive Dormand–Prince RK45) and NCSN annealed Langevin dynamics, with a registry of them by name.

Sources: Song et al., "Score-Based Generative Modeling through Stochastic Differential Equations", ICLR 2021
(reverse SDE eq. 6, probability-flow ODE eq. 13, predictor–corrector Algorithms 1, 4 and 5) and their code
score_sde_pytorch (defaults: t_end = 1e-3, snr = 0.16, rtol = atol = 1e-5); Song & Ermon, "Generative
Modeling by Estimating Gradients of the Data Distribution", NeurIPS 2019 (annealed Langevin, Algorithm 1).

Every sampler takes ``score_fn(x [batch, *shape], t [batch]) -> score [batch, *shape]`` and an :class:`SDE`,
integrates from t = T down to ``t_end`` (1e-3 by default) on a uniform grid, keeps the state in fp32 with
autocast disabled for the update arithmetic, and returns the *noise-free mean* of the last step (the last
stochastic step's noise is not added, score_sde_pytorch's ``denoise`` convention). The ODE samplers run on the
shared integrator core :mod:`lightning_tiger.generative.ode`.

With ``return_trajectory=True`` a sampler returns ``(x, trajectory)`` where trajectory ``[k, batch, *shape]``
holds the state after each step (k = steps + 1 with the start; adaptive: accepted steps + 1).

:func:`sample` draws from the prior and runs a sampler chosen by name from :data:`SAMPLERS`;
:func:`register_sampler` adds one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_tiger.generative.ode import integrate_adaptive, integrate_fixed, progress_range
from lightning_tiger.generative.sde import SDE, VESDE, VPSDE
from lightning_tiger.generative.tensors import batch_broadcast, randn
from lightning_tiger.validation import check_int, check_real

__all__ = [
    "SAMPLERS",
    "SampleResult",
    "SamplerOptions",
    "ScoreFn",
    "annealed_langevin",
    "euler_maruyama",
    "geometric_sigmas",
    "langevin_corrector",
    "ode_adaptive",
    "ode_euler",
    "ode_heun",
    "predictor_corrector",
    "register_sampler",
    "sample",
]

ScoreFn = Callable[[Tensor, Tensor], Tensor]


def _check(x: Tensor, steps: int, t_end: float, sde: SDE) -> None:
    check_int("steps", steps, low=1)
    check_real("t_end", t_end, low=0.0, high=float(sde.T), high_open=True)
    if x.ndim < 1:
        raise ValueError(f"x must have shape [batch, *shape], got {tuple(x.shape)}")


def _grid(sde: SDE, steps: int, t_end: float) -> list[float]:
    """The uniform grid T = t_0 > … > t_N = t_end, as the fp32 times the score model sees."""
    return torch.linspace(sde.T, t_end, steps + 1, dtype=torch.float64).float().tolist()


def _score(score_fn: ScoreFn, x: Tensor, t: float) -> Tensor:
    tt = torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)
    return score_fn(x, tt).float()


def _finish(x: Tensor, traj: list[Tensor] | None, return_trajectory: bool) -> Tensor | tuple[Tensor, Tensor]:
    if return_trajectory:
        assert traj is not None
        return x, torch.stack(traj)
    return x


def langevin_corrector(score_fn: ScoreFn, sde: SDE, x: Tensor, t: Tensor | float, h: float, *,
                       snr: float = 0.16, n_steps: int = 1, generator: torch.Generator | None = None
                       ) -> tuple[Tensor, Tensor]:
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
    a = math.exp(-float(sde.beta(torch.as_tensor(t))) * h) if isinstance(sde, VPSDE) else 1.0
    mean = x
    for _ in range(n_steps):
        score = _score(score_fn, x, float(t))
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
    step to t_{i+1} (see :func:`euler_maruyama`). 2 score evaluations per step with the default. The last
    predictor step is noise-free.

    The reference code uses the "reverse diffusion" (discretised DDPM ancestral) predictor for its VP/VE
    configs; Euler–Maruyama is the predictor of Song et al.'s Alg. 1 form and converges to the same limit.
    """
    _check(x, steps, t_end, sde)
    check_real("snr", snr, low=0.0, low_open=True)
    check_int("corrector_steps", corrector_steps, low=0)
    ts = _grid(sde, steps, t_end)
    x = x.float()
    traj = [x] if return_trajectory else None
    for i in progress_range(steps, progress, "pc" if corrector_steps else "em"):
        t, h = ts[i], ts[i] - ts[i + 1]
        if corrector_steps:
            x, _ = langevin_corrector(score_fn, sde, x, t, h, snr=snr, n_steps=corrector_steps,
                                      generator=generator)
        score = _score(score_fn, x, t)
        with torch.autocast(device_type=x.device.type, enabled=False):
            tb = torch.full((x.shape[0],), t, device=x.device)
            mean = x - sde.reverse_drift(x, tb, score) * h
            if i < steps - 1:
                x = mean + batch_broadcast(sde.diffusion(tb), x) * math.sqrt(h) * randn(
                    x.shape, generator=generator, device=x.device)
            else:
                x = mean
        if traj is not None:
            traj.append(x)
    return _finish(x, traj, return_trajectory)


def euler_maruyama(score_fn: ScoreFn, sde: SDE, x: Tensor, steps: int, *, t_end: float = 1e-3,
                   generator: torch.Generator | None = None, return_trajectory: bool = False,
                   progress: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Euler–Maruyama on the reverse SDE dx = [f − g² s] dt + g dw̄ (Song et al. 2021 eq. 6).

    With h = t_i − t_{i+1} > 0: x̄ = x − (f(x, t_i) − g(t_i)² s(x, t_i)) h, x = x̄ + g(t_i) sqrt(h) z;
    the last step returns x̄. (The predictor of :func:`predictor_corrector` without corrector steps.)

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
    return predictor_corrector(score_fn, sde, x, steps, corrector_steps=0, t_end=t_end, generator=generator,
                               return_trajectory=return_trajectory, progress=progress)


def _pf_ode_field(score_fn: ScoreFn, sde: SDE) -> Callable[[Tensor, float], Tensor]:
    """Probability-flow ODE velocity dx/dt = f − ½g² s (Song et al. 2021 eq. 13) as a field f(x, t)."""

    def field(x: Tensor, t: float) -> Tensor:
        score = _score(score_fn, x, t)
        with torch.autocast(device_type=x.device.type, enabled=False):
            tb = torch.full((x.shape[0],), float(t), device=x.device)
            return sde.reverse_drift(x, tb, score, ode=True)

    return field


def _ode_fixed(method: str, score_fn: ScoreFn, sde: SDE, x: Tensor, steps: int, t_end: float,
               return_trajectory: bool, progress: bool) -> Tensor | tuple[Tensor, Tensor]:
    _check(x, steps, t_end, sde)
    sol = integrate_fixed(_pf_ode_field(score_fn, sde), x.float(), _grid(sde, steps, t_end), method,
                          keep_trajectory=return_trajectory, progress=progress, desc=f"ode_{method}")
    return _finish(sol.x, sol.trajectory, return_trajectory)


def ode_euler(score_fn: ScoreFn, sde: SDE, x: Tensor, steps: int, *, t_end: float = 1e-3,
              return_trajectory: bool = False, progress: bool = False, **_: object
              ) -> Tensor | tuple[Tensor, Tensor]:
    """Fixed-step Euler on the probability-flow ODE, t = T → t_end (1 score evaluation per step)."""
    return _ode_fixed("euler", score_fn, sde, x, steps, t_end, return_trajectory, progress)


def ode_heun(score_fn: ScoreFn, sde: SDE, x: Tensor, steps: int, *, t_end: float = 1e-3,
             return_trajectory: bool = False, progress: bool = False, **_: object
             ) -> Tensor | tuple[Tensor, Tensor]:
    """Fixed-step Heun (explicit trapezoid, 2nd order) on the probability-flow ODE (2 evaluations per step)."""
    return _ode_fixed("heun", score_fn, sde, x, steps, t_end, return_trajectory, progress)


def ode_adaptive(score_fn: ScoreFn, sde: SDE, x: Tensor, *, rtol: float = 1e-5, atol: float = 1e-5,
                 t_end: float = 1e-3, first_step: float | None = None, max_steps: int = 10_000,
                 return_trajectory: bool = False, progress: bool = False, return_nfe: bool = False, **_: object
                 ) -> Tensor | tuple[Tensor, ...]:
    """Adaptive Dormand–Prince RK45 on the probability-flow ODE
    (:func:`~lightning_tiger.generative.ode.integrate_adaptive`; no torchdiffeq/scipy).

    One step size for the whole batch (as scipy's ``solve_ivp`` on the flattened batch, the reference code's
    solver). FSAL: 6 evaluations per attempted step. Defaults rtol = atol = 1e-5 (score_sde_pytorch). A
    non-finite error estimate rejects the step; a score that stays non-finite raises ``FloatingPointError``.

    Args:
        rtol, atol: tolerances (> 0).
        t_end: final time.
        first_step: initial |h|; default 1% of the interval.
        max_steps: cap on attempted steps (raises RuntimeError beyond).
        return_nfe: also return the number of score evaluations (an int) as the last tuple element.
    """
    _check(x, 1, t_end, sde)
    sol = integrate_adaptive(_pf_ode_field(score_fn, sde), x.float(), float(sde.T), t_end, rtol=rtol, atol=atol,
                             first_step=first_step, max_steps=max_steps, keep_trajectory=return_trajectory,
                             progress=progress, desc="ode_adaptive")
    out: tuple[Tensor, ...] = (sol.x,)
    if return_trajectory:
        assert sol.trajectory is not None
        out = (*out, torch.stack(sol.trajectory))
    if return_nfe:
        out = (*out, sol.nfe)  # type: ignore[assignment]
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
    ts = sde.t_for_sigma(sig).clamp(0.0, 1.0).tolist()
    x = x.float()
    traj = [x] if return_trajectory else None
    sigma_last = float(sig[-1])
    for i in progress_range(len(sig), progress, "annealed_langevin"):
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


# ---------------------------------------------------------------------------------------------- the registry
@dataclass
class SamplerOptions:
    """What :func:`sample` passes to a registered sampler (each uses the fields it needs).

    Attributes:
        steps: steps (per noise level for annealed Langevin; ignored by ``ode_adaptive``).
        generator: seeds the start draw and the sampler noise (may live on another device).
        device: where the samples are drawn.
        t_end: where the reverse process stops.
        snr: predictor–corrector signal-to-noise ratio.
        rtol, atol: ``ode_adaptive`` tolerances.
        sigmas: annealed-Langevin noise levels (``None``: :func:`geometric_sigmas`).
        return_trajectory: keep the path.
        progress: tqdm bar.
    """

    steps: int
    generator: torch.Generator | None = None
    device: torch.device | str | None = None
    t_end: float = 1e-3
    snr: float = 0.16
    rtol: float = 1e-5
    atol: float = 1e-5
    sigmas: Tensor | None = None
    return_trajectory: bool = False
    progress: bool = False


@dataclass
class SampleResult:
    """Output of :func:`sample`: samples ``x [n, *shape]``, the path ``[k, n, *shape]`` when requested, and
    the number of score evaluations when the sampler counts them (``ode_adaptive``), else ``None``."""

    x: Tensor
    trajectory: Tensor | None = None
    nfe: int | None = None


RegisteredSampler = Callable[[ScoreFn, SDE, tuple[int, ...], SamplerOptions], SampleResult]


class _Registry(dict[str, RegisteredSampler]):
    """Name → sampler; prints as the tuple of names (what error messages want to list)."""

    def __repr__(self) -> str:
        return repr(tuple(self))

    __str__ = __repr__


SAMPLERS: dict[str, RegisteredSampler] = _Registry()
"""The samplers :func:`sample` knows, by name; ``name in SAMPLERS`` checks a name."""


def register_sampler(name: str) -> Callable[[RegisteredSampler], RegisteredSampler]:
    """Decorator: add ``fn(score_fn, sde, shape, options) -> SampleResult`` to :data:`SAMPLERS` as ``name``."""

    def decorate(fn: RegisteredSampler) -> RegisteredSampler:
        if name in SAMPLERS:
            raise ValueError(f"a sampler named {name!r} is already registered")
        SAMPLERS[name] = fn
        return fn

    return decorate


def _as_result(out: Tensor | tuple[Tensor, ...], return_trajectory: bool) -> SampleResult:
    if isinstance(out, Tensor):
        return SampleResult(out)
    return SampleResult(out[0], out[1] if return_trajectory else None)


def _common(o: SamplerOptions) -> dict[str, object]:
    return {"t_end": o.t_end, "return_trajectory": o.return_trajectory, "progress": o.progress}


def _prior(sde: SDE, shape: tuple[int, ...], o: SamplerOptions) -> Tensor:
    return sde.prior_sample(shape, generator=o.generator, device=o.device)


@register_sampler("em")
def _run_em(score_fn: ScoreFn, sde: SDE, shape: tuple[int, ...], o: SamplerOptions) -> SampleResult:
    out = euler_maruyama(score_fn, sde, _prior(sde, shape, o), o.steps, generator=o.generator, **_common(o))
    return _as_result(out, o.return_trajectory)


@register_sampler("pc")
def _run_pc(score_fn: ScoreFn, sde: SDE, shape: tuple[int, ...], o: SamplerOptions) -> SampleResult:
    out = predictor_corrector(score_fn, sde, _prior(sde, shape, o), o.steps, generator=o.generator, snr=o.snr,
                              **_common(o))
    return _as_result(out, o.return_trajectory)


@register_sampler("ode_euler")
def _run_ode_euler(score_fn: ScoreFn, sde: SDE, shape: tuple[int, ...], o: SamplerOptions) -> SampleResult:
    return _as_result(ode_euler(score_fn, sde, _prior(sde, shape, o), o.steps, **_common(o)), o.return_trajectory)


@register_sampler("ode_heun")
def _run_ode_heun(score_fn: ScoreFn, sde: SDE, shape: tuple[int, ...], o: SamplerOptions) -> SampleResult:
    return _as_result(ode_heun(score_fn, sde, _prior(sde, shape, o), o.steps, **_common(o)), o.return_trajectory)


@register_sampler("ode_adaptive")
def _run_ode_adaptive(score_fn: ScoreFn, sde: SDE, shape: tuple[int, ...], o: SamplerOptions) -> SampleResult:
    out = ode_adaptive(score_fn, sde, _prior(sde, shape, o), rtol=o.rtol, atol=o.atol, return_nfe=True,
                       **_common(o))
    assert isinstance(out, tuple)
    return SampleResult(out[0], out[1] if o.return_trajectory else None, int(out[-1]))


@register_sampler("annealed_langevin")
def _run_annealed_langevin(score_fn: ScoreFn, sde: SDE, shape: tuple[int, ...], o: SamplerOptions
                           ) -> SampleResult:
    if not isinstance(sde, VESDE):
        raise ValueError("annealed_langevin needs sde='ve' (noise-level model)")
    sig = geometric_sigmas() if o.sigmas is None else o.sigmas
    # NCSN starts from N(0, σ_1² I), σ_1 the largest level (Song & Ermon 2019, Alg. 1).
    x = randn(shape, generator=o.generator, device=o.device) * float(torch.as_tensor(sig).max())
    out = annealed_langevin(score_fn, sde, x, o.steps, sigmas=sig, generator=o.generator,
                            return_trajectory=o.return_trajectory, progress=o.progress)
    return _as_result(out, o.return_trajectory)


def sample(name: str, score_fn: ScoreFn, sde: SDE, shape: tuple[int, ...], options: SamplerOptions
           ) -> SampleResult:
    """Draw samples of ``shape`` (batch first) with the sampler registered as ``name``.

    The start is the SDE's prior (annealed Langevin: N(0, σ_1² I)); ``options`` carries steps, seeds and
    tolerances (:class:`SamplerOptions`).
    """
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {name!r}")
    return SAMPLERS[name](score_fn, sde, shape, options)
