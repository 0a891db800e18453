"""Score-matching diagnostics for data with an analytic law (Gaussian mixtures): the SM = CSM identity,
the excess denoising loss L_DSM − C_t (SPEC §4.1) and the Kwon–Fan–Lee W2 bound estimate (SPEC §4.3).

All functions take ``score_fn(x [n, d], t [n]) -> [n, d]`` (a trained model's score, or any fixed function),
a :class:`~lightning_tiger.generative.GaussianMixture` ``p_0``, and either a perturbation (α, σ) or an SDE.
Monte-Carlo estimates come with their standard errors so tests and logs can say how sure they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_tiger.generative.gaussian_mixture import GaussianMixture
from lightning_tiger.generative.sde import SDE

ScoreFn = Callable[[Tensor, Tensor], Tensor]

KFL_ASSUMPTION = (
    "KFL W2 bound estimate (Kwon, Fan, Lee 2022; SPEC 4.3) with weighting g^2 and I(t) = 1, i.e. assuming "
    "L_f + L_s g^2 <= 0 (no Lipschitz growth of drift and model score). Holds for the reverse-SDE sampler only; "
    "an estimate, not a guarantee."
)


def _mean_se(v: Tensor) -> tuple[Tensor, Tensor]:
    v = v.double()
    return v.mean(), v.std(unbiased=True) / math.sqrt(max(v.numel(), 1))


def _check_n(num_samples: int) -> None:
    if not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples must be an int >= 2, got {num_samples!r}")


@torch.no_grad()
def score_loss_terms(score_fn: ScoreFn, mixture: GaussianMixture, alpha: float, sigma: float, *,
                     t: float = 0.5, num_samples: int = 100_000, generator: torch.Generator | None = None,
                     batch_size: int = 65_536) -> dict[str, Tensor]:
    """Monte-Carlo estimates of every term of SPEC §4.1 at one perturbation x_t = α x_0 + σ ε.

    With c = ∇log p(x_t|x_0) = −ε/σ, m = ∇log p_t(x_t) (exact, from ``mixture.perturbed_score``), s = score:

    - ``l_csm`` = E||c − s||², ``l_sm`` = E||m − s||², ``constant`` C_t = E||c||² − E||m||² = d/σ² − E||m||²
    - ``cross`` = E[s·(c − m)] (0 in expectation: E[c | x_t] = m), ``difference`` = per-sample
      (||c − s||² − ||m − s||²) averaged, which equals C_t − 2·cross sample by sample
    - ``excess`` = L_DSM − C_t estimated from the same samples (an unbiased estimate of ``l_sm``).

    Args:
        score_fn: s(x, t); receives t as a ``[n]`` tensor filled with ``t``.
        mixture: p_0.
        alpha, sigma: perturbation (σ > 0).
        t: time passed to ``score_fn`` (default 0.5; fixed functions ignore it).
        num_samples: Monte-Carlo samples (>= 2), processed in chunks of ``batch_size``.
        generator: torch generator for x_0 and ε.

    Returns:
        ``{name: value}`` and ``{name + "_se": standard error}`` as fp64 0-d tensors.
    """
    _check_n(num_samples)
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    parts: dict[str, list[Tensor]] = {k: [] for k in ("l_csm", "l_sm", "constant", "cross", "difference",
                                                      "excess")}
    done = 0
    while done < num_samples:
        n = min(batch_size, num_samples - done)
        done += n
        x0 = mixture.sample(n, generator).double()
        eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        xt = alpha * x0 + sigma * eps
        s = score_fn(xt.float(), torch.full((n,), float(t))).double()
        c = -eps / sigma
        m = mixture.perturbed_score(xt, alpha, sigma)
        l_csm = (c - s).pow(2).sum(-1)
        l_sm = (m - s).pow(2).sum(-1)
        const = c.pow(2).sum(-1) - m.pow(2).sum(-1)
        parts["l_csm"].append(l_csm)
        parts["l_sm"].append(l_sm)
        parts["constant"].append(const)
        parts["cross"].append((s * (c - m)).sum(-1))
        parts["difference"].append(l_csm - l_sm)
        parts["excess"].append(l_csm - const)
    out: dict[str, Tensor] = {}
    for key, chunks in parts.items():
        out[key], out[key + "_se"] = _mean_se(torch.cat(chunks))
    return out


@torch.no_grad()
def dsm_constant(mixture: GaussianMixture, alpha: float, sigma: float, *, num_samples: int = 100_000,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """C_t = d/σ² − E||∇log p_t(x_t)||² (SPEC §4.1) by Monte Carlo over the exact perturbed mixture.

    Returns:
        (C_t, standard error), fp64 0-d tensors.
    """
    _check_n(num_samples)
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    xt = mixture.perturbed(alpha, sigma).sample(num_samples, generator).double()
    m2 = mixture.perturbed_score(xt, alpha, sigma).pow(2).sum(-1)
    mean, se = _mean_se(m2)
    return mixture.dim / sigma**2 - mean, se


@torch.no_grad()
def excess_score_loss(score_fn: ScoreFn, mixture: GaussianMixture, sde: SDE, t: Tensor | Sequence[float] | float,
                      *, num_samples: int = 20_000, generator: torch.Generator | None = None) -> Tensor:
    """Excess denoising loss L_DSM(t) − C_t at each time in ``t`` (SPEC §4.1), unweighted.

    For each t: x_t = α_t x_0 + σ_t ε with (α_t, σ_t) = ``sde.marginal_coefs(t)``; L_DSM = E||s + ε/σ_t||²;
    C_t = E[||ε/σ_t||² − ||∇log p_t(x_t)||²] from the closed-form mixture score, estimated on the same samples
    (which cancels most of the Monte-Carlo noise). 0 for the exact score; multiply by λ(t) to compare with a
    weighted training loss.

    Args:
        score_fn: s(x [n, d], t [n]).
        mixture: p_0.
        sde: supplies (α_t, σ_t).
        t: one time or ``[k]`` times in (0, 1].
        num_samples: per time.
        generator: torch generator.

    Returns:
        ``[k]`` fp64 (0-d for a scalar ``t``).
    """
    tt = torch.as_tensor(t, dtype=torch.float64)
    flat = tt.reshape(-1)
    if bool((flat <= 0).any()) or bool((flat > sde.T).any()):
        raise ValueError(f"t must lie in (0, {sde.T}], got {flat.tolist()}")
    values = []
    for ti in flat.tolist():
        alpha, sigma = (float(v) for v in sde.marginal_coefs(torch.tensor([ti], dtype=torch.float64)))
        terms = score_loss_terms(score_fn, mixture, alpha, sigma, t=ti, num_samples=num_samples,
                                 generator=generator)
        values.append(terms["excess"])
    return torch.stack(values).reshape(tt.shape)


@dataclass
class KFLBound:
    """Result of :func:`kfl_w2_bound` (all floats).

    Attributes:
        bound: sqrt(2·(∫g² dt)·J_SM) + W2_prior, the λ = g² form of SPEC §4.3 with I ≡ 1.
        bound_direct: ∫ g² (E||∇log p_t − s||²)^{1/2} dt + W2_prior (first line of SPEC §4.3; ≤ ``bound``).
        j_sm: J_SM = ½ ∫ g² E||∇log p_t − s_θ||² dt over [t_min, T].
        g2_integral: ∫_{t_min}^{T} g² dt (closed form).
        prior_term: upper bound of W2(p_T, q_T) from the synchronous coupling,
            sqrt(α_T² E||x_0||² + d (σ_T − σ_prior)²).
        assumption: the assumption text (log it with the value).
    """

    bound: float
    bound_direct: float
    j_sm: float
    g2_integral: float
    prior_term: float
    assumption: str = KFL_ASSUMPTION


@torch.no_grad()
def kfl_w2_bound(score_fn: ScoreFn, mixture: GaussianMixture, sde: SDE, *, t_min: float = 1e-3,
                 num_times: int = 33, num_samples: int = 4096, generator: torch.Generator | None = None
                 ) -> KFLBound:
    """Kwon–Fan–Lee estimate of W2(p_{t_min}, q_{t_min}) for the reverse-SDE sampler (SPEC §4.3).

    W2 ≤ sqrt(2·(∫ g² I² dt)·J_SM) + I(T)·W2(p_T, q_T), J_SM = ½∫ g² E_{p_t}||∇log p_t − s_θ||² dt, evaluated
    with **I(t) ≡ 1** (assumes L_f + L_s g² ≤ 0: neither the drift nor the model score expands distances; the
    true I(t) = exp(∫(L_f + L_s g²)) is not computable for a neural score). E||∇log p_t − s||² uses the exact
    mixture score on Monte-Carlo samples of p_t; the time integral is the trapezoid rule on ``num_times``
    points uniform in t ∈ [t_min, T]; ∫g² is exact. With VP defaults, ∫_0^1 g² = 10.05, so W2 ≲ sqrt(20.1 J_SM).
    Not a guarantee: the I ≡ 1 assumption, quadrature and MC error all enter (and the probability-flow ODE
    sampler is not covered). See :data:`KFL_ASSUMPTION`.

    Args:
        score_fn: s_θ(x [n, d], t [n]).
        mixture: p_0 (exact law of the data).
        sde: the SDE the model was trained with.
        t_min: lower end of the integral (the sampler's ``t_end``), default 1e-3.
        num_times: quadrature points (>= 2), default 33.
        num_samples: MC samples per time, default 4096.
        generator: torch generator.
    """
    if not 0.0 < t_min < sde.T:
        raise ValueError(f"t_min must be in (0, {sde.T}), got {t_min}")
    if not isinstance(num_times, int) or num_times < 2:
        raise ValueError(f"num_times must be an int >= 2, got {num_times!r}")
    _check_n(num_samples)
    ts = torch.linspace(t_min, sde.T, num_times, dtype=torch.float64)
    alphas, sigmas = sde.marginal_coefs(ts)
    g2 = sde.diffusion(ts).double() ** 2
    errs = []
    for ti, a, s in zip(ts.tolist(), alphas.tolist(), sigmas.tolist()):
        xt = mixture.perturbed(a, s).sample(num_samples, generator).double()
        model = score_fn(xt.float(), torch.full((num_samples,), ti)).double()
        errs.append((mixture.perturbed_score(xt, a, s) - model).pow(2).sum(-1).mean())
    err = torch.stack(errs)
    j_sm = 0.5 * float(torch.trapezoid(g2 * err, ts))
    direct = float(torch.trapezoid(g2 * err.sqrt(), ts))
    g2_int = float(sde.g2_integral(torch.tensor(t_min, dtype=torch.float64), torch.tensor(sde.T,
                                                                                          dtype=torch.float64)))
    alpha_t, sigma_t = (float(v) for v in sde.marginal_coefs(torch.tensor([sde.T], dtype=torch.float64)))
    prior = math.sqrt(alpha_t**2 * float(mixture.second_moment()) + mixture.dim * (sigma_t - sde.prior_std) ** 2)
    return KFLBound(bound=math.sqrt(2.0 * g2_int * j_sm) + prior, bound_direct=direct + prior, j_sm=j_sm,
                    g2_integral=g2_int, prior_term=prior)
