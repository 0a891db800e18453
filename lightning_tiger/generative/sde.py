"""Score SDEs of Song et al. 2021 (VP, sub-VP, VE) with the defaults of their code (score_sde_pytorch).

Song, Sohl-Dickstein, Kingma, Kumar, Ermon, Poole, "Score-Based Generative Modeling through Stochastic
Differential Equations", ICLR 2021: VE eq. 9, VP eq. 11, sub-VP eq. 12, reverse SDE eq. 6, probability-flow
ODE eq. 13.

Every SDE here is linear, dx = f(t)·x dt + g(t) dw, so the perturbation kernel is Gaussian,
p_t(x_t | x_0) = N(α_t x_0, σ_t² I), and the samplers only need ``drift``, ``diffusion``, ``marginal_coefs``
and the prior. All arithmetic is done in fp32 (or fp64 when given fp64), with autocast disabled, whatever the
caller's precision: σ_t spans four decades near t = 0 and bf16 would round it visibly.

Subclass :class:`SDE` to add a process: implement ``drift_coef``, ``diffusion``, ``marginal_coefs``,
``prior_std`` and ``g2_integral``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_tiger.generative.tensors import as_time, batch_broadcast, randn

__all__ = ["SDE", "SDE_NAMES", "VESDE", "VPSDE", "SubVPSDE", "make_sde"]


def _checked_bounds(low_name: str, low: float, high_name: str, high: float) -> tuple[float, float]:
    """A schedule's (low, high) parameters as floats: 0 < low < high, both finite (``not >`` also refuses NaN)."""
    if not (math.isfinite(low) and low > 0):
        raise ValueError(f"{low_name} must be finite and > 0, got {low}")
    if not (math.isfinite(high) and high > low):
        raise ValueError(f"{high_name} must be > {low_name}={low}, got {high}")
    return float(low), float(high)


class SDE:
    """Base class: a linear forward SDE dx = f(t) x dt + g(t) dw on t ∈ [0, T], T = 1.

    Attributes:
        T: final time (1.0).
    """

    T: float = 1.0

    def __repr__(self) -> str:
        """The class with its public attributes (the constructor's arguments), e.g. ``VPSDE(beta_min=0.1, ...)``."""
        args = ", ".join(f"{k}={v}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"

    def drift_coef(self, t: Tensor) -> Tensor:
        """f(t) ``[batch]`` such that the drift is f(t)·x."""
        raise NotImplementedError

    def diffusion(self, t: Tensor) -> Tensor:
        """g(t) ``[batch]``."""
        raise NotImplementedError

    def marginal_coefs(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(α_t, σ_t), each ``[batch]``: p_t(x_t | x_0) = N(α_t x_0, σ_t² I)."""
        raise NotImplementedError

    @property
    def prior_std(self) -> float:
        """Std of the isotropic Gaussian prior p_T the samplers start from."""
        raise NotImplementedError

    def g2_integral(self, t0: Tensor | float, t1: Tensor | float) -> Tensor:
        """∫_{t0}^{t1} g(t)² dt in closed form (used by the W2 bound of Kwon, Fan & Lee, NeurIPS 2022)."""
        raise NotImplementedError

    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        """f(t)·x ``[batch, *shape]`` for x ``[batch, *shape]``, t ``[batch]``."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            return batch_broadcast(self.drift_coef(as_time(t, x)), x) * x

    def marginal(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = α_t x_0 + σ_t ε ``[batch, *shape]`` (fp32)."""
        with torch.autocast(device_type=x0.device.type, enabled=False):
            alpha, sigma = self.marginal_coefs(as_time(t, x0))
            return batch_broadcast(alpha, x0) * x0.float() + batch_broadcast(sigma, x0) * noise.float()

    def prior_sample(self, shape: tuple[int, ...], *, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> Tensor:
        """Draw x_T ~ N(0, prior_std² I) of ``shape`` in fp32 on ``device``.

        The generator may live on another device (e.g. a CPU generator for reproducible GPU sampling).
        """
        return randn(shape, generator=generator, device=device) * self.prior_std

    def reverse_drift(self, x: Tensor, t: Tensor, score: Tensor, ode: bool = False) -> Tensor:
        """f − g²·s (reverse SDE, Song et al. 2021 eq. 6) or f − ½g²·s (probability-flow ODE, eq. 13) as dx/dt."""
        g2 = batch_broadcast(self.diffusion(as_time(t, x)) ** 2, x)
        return self.drift(x, t) - (0.5 if ode else 1.0) * g2 * score


class VPSDE(SDE):
    """Variance-preserving SDE (DDPM in continuous time), Song et al. 2021 eq. 11.

    β(t) = β_min + t(β_max − β_min), f = −½β(t), g = sqrt(β(t)); α_t = exp(−¼t²(β_max−β_min) − ½tβ_min),
    σ_t = sqrt(1 − α_t²); prior N(0, I). Defaults β_min = 0.1, β_max = 20 (score_sde_pytorch).

    Args:
        beta_min: β(0) > 0.
        beta_max: β(1) > beta_min.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        self.beta_min, self.beta_max = _checked_bounds("beta_min", beta_min, "beta_max", beta_max)

    def beta(self, t: Tensor) -> Tensor:
        """β(t) ``[batch]``."""
        return self.beta_min + as_time(t) * (self.beta_max - self.beta_min)

    def beta_integral(self, t: Tensor | float) -> Tensor:
        """B(t) = ∫_0^t β = β_min t + ½(β_max − β_min) t²."""
        t = as_time(t)
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def drift_coef(self, t: Tensor) -> Tensor:
        return -0.5 * self.beta(t)

    def diffusion(self, t: Tensor) -> Tensor:
        return torch.sqrt(self.beta(t))

    def marginal_coefs(self, t: Tensor) -> tuple[Tensor, Tensor]:
        log_alpha = -0.5 * self.beta_integral(t)
        # σ² = 1 − α² = −expm1(2 log α): exact near t = 0 where 1 − α² would cancel catastrophically.
        return torch.exp(log_alpha), torch.sqrt(-torch.expm1(2.0 * log_alpha))

    @property
    def prior_std(self) -> float:
        return 1.0

    def g2_integral(self, t0: Tensor | float, t1: Tensor | float) -> Tensor:
        return self.beta_integral(t1) - self.beta_integral(t0)


class SubVPSDE(VPSDE):
    """sub-VP SDE (Song et al. 2021 eq. 12): VP drift, g² = β(t)(1 − exp(−2B(t))), B(t) = ∫_0^t β.

    α_t = exp(−½B(t)) as for VP, σ_t = 1 − exp(−B(t)) (≤ the VP std: "sub"-VP); prior N(0, I).
    Same defaults as :class:`VPSDE`.
    """

    def diffusion(self, t: Tensor) -> Tensor:
        return torch.sqrt(self.beta(t) * -torch.expm1(-2.0 * self.beta_integral(t)))

    def marginal_coefs(self, t: Tensor) -> tuple[Tensor, Tensor]:
        b = self.beta_integral(t)
        return torch.exp(-0.5 * b), -torch.expm1(-b)

    def g2_integral(self, t0: Tensor | float, t1: Tensor | float) -> Tensor:
        # ∫ β(1 − e^{−2B}) dt = [B + ½e^{−2B}] since dB = β dt.
        b0, b1 = self.beta_integral(t0), self.beta_integral(t1)
        return (b1 - b0) + 0.5 * (torch.exp(-2.0 * b1) - torch.exp(-2.0 * b0))


class VESDE(SDE):
    """Variance-exploding SDE (NCSN in continuous time), Song et al. 2021 eq. 9.

    σ(t) = σ_min (σ_max/σ_min)^t, f = 0, g = σ(t)·sqrt(2 log(σ_max/σ_min)); α_t = 1, σ_t = σ(t);
    prior N(0, σ_max² I). Defaults σ_min = 0.01, σ_max = 50 (score_sde_pytorch's CIFAR-10 value). Choose σ_max
    near the largest pairwise distance of the data (Song & Ermon 2020, technique 1): ≈ 4 for moons.

    Note (as in score_sde_pytorch): the kernel std σ(t) treats x_0 as data already blurred by N(0, σ_min²);
    the SDE started from clean data has std sqrt(σ(t)² − σ_min²) at t. The difference (≤ σ_min = 0.01) is
    below the sampling floor; ``marginal_coefs`` follows the reference implementation.

    Args:
        sigma_min: σ(0) > 0.
        sigma_max: σ(1) > sigma_min.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0) -> None:
        self.sigma_min, self.sigma_max = _checked_bounds("sigma_min", sigma_min, "sigma_max", sigma_max)
        # In log space: for a subnormal sigma_min the quotient σ_max/σ_min and the factor (σ_max/σ_min)^t overflow
        # to inf while σ_min itself rounds to 0 in fp32, and 0·inf = NaN.
        self._log_sigma_min = math.log(self.sigma_min)
        self._log_ratio = math.log(self.sigma_max) - self._log_sigma_min

    def sigma(self, t: Tensor | float) -> Tensor:
        """σ(t) = σ_min (σ_max/σ_min)^t."""
        return torch.exp(self._log_sigma_min + as_time(t) * self._log_ratio)

    def t_for_sigma(self, sigma: Tensor | float) -> Tensor:
        """Inverse of σ(t): t = log(σ/σ_min) / log(σ_max/σ_min)."""
        return (torch.log(as_time(sigma)) - self._log_sigma_min) / self._log_ratio

    def drift_coef(self, t: Tensor) -> Tensor:
        return torch.zeros_like(as_time(t))

    def diffusion(self, t: Tensor) -> Tensor:
        return self.sigma(t) * math.sqrt(2.0 * self._log_ratio)

    def marginal_coefs(self, t: Tensor) -> tuple[Tensor, Tensor]:
        sigma = self.sigma(t)
        return torch.ones_like(sigma), sigma

    @property
    def prior_std(self) -> float:
        return self.sigma_max

    def g2_integral(self, t0: Tensor | float, t1: Tensor | float) -> Tensor:
        # d/dt σ(t)² = 2 log(σ_max/σ_min) σ(t)² = g(t)².
        return self.sigma(t1) ** 2 - self.sigma(t0) ** 2


SDE_NAMES: dict[str, type[SDE]] = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}


def make_sde(sde: str | SDE, sde_kwargs: dict | None = None) -> SDE:
    """Build an SDE from a name ("vp", "subvp", "ve") and keyword arguments, or pass an instance through."""
    if isinstance(sde, SDE):
        if sde_kwargs:
            raise ValueError("sde_kwargs must be empty when sde is an SDE instance")
        return sde
    if not isinstance(sde, str) or sde.lower() not in SDE_NAMES:
        raise ValueError(f"sde must be one of {tuple(SDE_NAMES)} or an SDE instance, got {sde!r}")
    return SDE_NAMES[sde.lower()](**(sde_kwargs or {}))
