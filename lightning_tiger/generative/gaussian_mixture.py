"""A mixture of isotropic Gaussians with closed-form density, score and Gaussian perturbation.

The exact score of every perturbed marginal makes it the analytic reference of the score-matching tests and
metrics (:mod:`lightning_tiger.metrics.score_matching`) and of the analytic 2-D toys
(:func:`lightning_tiger.data.toy2d.eight_gaussians`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["GaussianMixture"]


class GaussianMixture:
    """Mixture of isotropic Gaussians with closed-form density, score and Gaussian perturbation.

    p(x) = Σ_k w_k N(x; μ_k, s_k² I).  The law of αX + σε (X ~ p, ε ~ N(0, I)) is again a mixture with means
    α μ_k and stds sqrt(α² s_k² + σ²): this gives the exact marginal score ∇log p_t of every linear score SDE
    (Song et al. 2021, whose perturbation kernels are N(α_t x_0, σ_t² I)), which the analytic tests and the
    excess-loss metrics (Vincent 2011's denoising score matching minus its constant) use.

    Args:
        means: component means ``[K, d]``.
        stds: component stds ``[K]`` or one float for all (> 0).
        weights: mixture weights ``[K]`` (non-negative, normalised here); ``None`` = uniform.
    """

    def __init__(
        self, means: Tensor | Sequence[Sequence[float]], stds: Tensor | Sequence[float] | float,
        weights: Tensor | Sequence[float] | None = None,
    ) -> None:
        try:
            means_t = torch.as_tensor(means)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"means must be a [K, d] array of floats, got {means!r} ({exc})") from None
        if not torch.is_floating_point(means_t):
            means_t = means_t.to(torch.get_default_dtype())
        if means_t.ndim != 2 or means_t.shape[0] < 1 or means_t.shape[1] < 1:
            raise ValueError(f"means must have shape [K, d] with K, d >= 1, got {tuple(means_t.shape)}")
        if not bool(torch.isfinite(means_t).all()):
            raise ValueError(f"means must be finite, got {means_t.tolist()}")
        k = means_t.shape[0]
        stds_t = torch.as_tensor(stds, dtype=means_t.dtype)
        if stds_t.ndim == 0:
            stds_t = stds_t.expand(k).clone()
        if stds_t.shape != (k,):
            raise ValueError(f"stds must be a float or have shape [K]=[{k}], got {tuple(stds_t.shape)}")
        if not bool((stds_t > 0).all()):
            raise ValueError("stds must all be > 0")
        if weights is None:
            weights_t = torch.full((k,), 1.0 / k, dtype=means_t.dtype)
        else:
            weights_t = torch.as_tensor(weights, dtype=means_t.dtype)
            if weights_t.shape != (k,):
                raise ValueError(f"weights must have shape [K]=[{k}], got {tuple(weights_t.shape)}")
            finite = bool(torch.isfinite(weights_t).all())
            if not finite or bool((weights_t < 0).any()) or float(weights_t.sum()) <= 0:
                raise ValueError(
                    f"weights must be finite and non-negative with a positive sum, got {weights_t.tolist()}"
                )
            weights_t = weights_t / weights_t.sum()
        self.means = means_t
        self.stds = stds_t
        self.weights = weights_t

    @property
    def dim(self) -> int:
        """Data dimension d."""
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        """Number of components K."""
        return self.means.shape[0]

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.num_components}, d={self.dim})"

    def mean(self) -> Tensor:
        """Mixture mean ``[d]``."""
        return self.weights @ self.means

    def second_moment(self) -> Tensor:
        """E||X||² (scalar): Σ_k w_k (||μ_k||² + d s_k²)."""
        return (self.weights * (self.means.pow(2).sum(-1) + self.dim * self.stds.pow(2))).sum()

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` samples ``[n, d]`` (dtype of ``means``, on the CPU)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator) if n else \
            torch.zeros(0, dtype=torch.long)
        eps = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype)
        return self.means[comp] + self.stds[comp, None] * eps

    def _component_log_terms(self, x: Tensor, alpha: Tensor | float = 1.0, sigma: Tensor | float = 0.0
                             ) -> tuple[Tensor, Tensor, Tensor]:
        """log(w_k N(x; α μ_k, v_k I)) ``[n, K]``, the scaled means ``[.., K, d]`` and variances ``[n|1, K]``."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape [n, {self.dim}], got {tuple(x.shape)}")
        means = self.means.to(x)
        stds = self.stds.to(x)
        alpha_t = torch.as_tensor(alpha, dtype=x.dtype, device=x.device).reshape(-1, 1)  # [n|1, 1]
        sigma_t = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1)
        var = alpha_t.pow(2) * stds.pow(2) + sigma_t.pow(2)  # [n|1, K]
        mu = alpha_t[..., None] * means  # [n|1, K, d]
        diff = x[:, None, :] - mu  # [n, K, d]
        sq = diff.pow(2).sum(-1)  # [n, K]
        log_norm = -0.5 * self.dim * torch.log(2 * math.pi * var)
        log_terms = torch.log(self.weights.to(x)) + log_norm - 0.5 * sq / var
        return log_terms, diff, var

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) ``[n]`` for x ``[n, d]``."""
        log_terms, _, _ = self._component_log_terms(x)
        return torch.logsumexp(log_terms, dim=1)

    def score(self, x: Tensor) -> Tensor:
        """∇_x log p(x) ``[n, d]`` = Σ_k r_k(x) (μ_k − x) / s_k², r = posterior responsibilities."""
        return self.perturbed_score(x, 1.0, 0.0)

    def perturbed_score(self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
        """Score ``[n, d]`` of the law of αX + σε at x ``[n, d]``; ``alpha``/``sigma`` float or per-row ``[n]``.

        Lets a batch carry one diffusion time per row (training-style t ~ U[ε, 1]).
        """
        log_terms, diff, var = self._component_log_terms(x, alpha, sigma)
        resp = torch.softmax(log_terms, dim=1)  # [n, K]
        return -(resp[..., None] * diff / var[..., None]).sum(1)

    def perturbed(self, alpha: float, sigma: float) -> GaussianMixture:
        """The law of αX + σε as a new mixture (means α μ_k, stds sqrt(α² s_k² + σ²))."""
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        if alpha == 0 and sigma == 0:
            raise ValueError("alpha and sigma cannot both be 0 (degenerate law)")
        return GaussianMixture(alpha * self.means, torch.sqrt(alpha**2 * self.stds**2 + sigma**2), self.weights)
