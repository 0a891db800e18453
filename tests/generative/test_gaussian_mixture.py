"""The analytic Gaussian mixture against explicit formulas (scipy densities, finite differences, sampling)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from lightning_tiger.generative.gaussian_mixture import GaussianMixture


def _mixture() -> GaussianMixture:
    return GaussianMixture([[0.0, 0.0], [2.0, -1.0], [-1.5, 1.0]], [0.5, 0.3, 0.8], [0.2, 0.5, 0.3])


def test_log_prob_matches_scipy_sum_of_components() -> None:
    mix = _mixture()
    x = torch.randn(50, 2, dtype=torch.float64) * 2
    ref = np.log(sum(w * multivariate_normal(m, s**2 * np.eye(2)).pdf(x.numpy())
                     for m, s, w in zip(mix.means.numpy(), mix.stds.numpy(), mix.weights.numpy())))
    assert np.allclose(mix.log_prob(x).double().numpy(), ref, rtol=1e-5, atol=1e-6)


def test_score_is_gradient_of_log_prob() -> None:
    mix = GaussianMixture(torch.tensor([[0.0, 0.0], [2.0, -1.0]], dtype=torch.float64),
                          torch.tensor([0.5, 0.7], dtype=torch.float64))
    x = torch.randn(20, 2, dtype=torch.float64)
    h = 1e-5
    fd = torch.stack([(mix.log_prob(x + h * e) - mix.log_prob(x - h * e)) / (2 * h)
                      for e in torch.eye(2, dtype=torch.float64)], dim=1)
    assert torch.allclose(mix.score(x), fd, atol=1e-6)


def test_perturbed_law_moments_and_per_row_score() -> None:
    mix = _mixture()
    alpha, sigma = 0.8, 0.6
    pert = mix.perturbed(alpha, sigma)
    assert torch.allclose(pert.means, 0.8 * mix.means)
    assert torch.allclose(pert.stds, torch.sqrt(0.64 * mix.stds**2 + 0.36))
    x = torch.randn(30, 2)
    assert torch.allclose(mix.perturbed_score(x, alpha, sigma), pert.score(x), atol=1e-5)
    # Per-row (alpha, sigma): row i must equal the scalar version at (alpha_i, sigma_i).
    alphas, sigmas = torch.rand(30) + 0.1, torch.rand(30) + 0.1
    rows = torch.stack([mix.perturbed(float(a), float(s)).score(x[i:i + 1])[0]
                        for i, (a, s) in enumerate(zip(alphas, sigmas))])
    assert torch.allclose(mix.perturbed_score(x, alphas, sigmas), rows, atol=1e-5)
    # Sampled moments of alpha X + sigma eps match the perturbed mixture's.
    gen = torch.Generator().manual_seed(0)
    xs = alpha * mix.sample(200_000, gen) + sigma * torch.randn(200_000, 2, generator=gen)
    assert torch.allclose(xs.mean(0), pert.mean(), atol=0.01)
    assert float((xs.pow(2).sum(-1)).mean()) == pytest.approx(float(pert.second_moment()), rel=0.01)


def test_mixture_validation() -> None:
    with pytest.raises(ValueError, match="means"):
        GaussianMixture(torch.zeros(3), 1.0)
    with pytest.raises(ValueError, match="stds"):
        GaussianMixture(torch.zeros(2, 2), [1.0, -1.0])
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture(torch.zeros(2, 2), 1.0, [1.0])
