"""2-D toy distributions that need no download, an analytic Gaussian mixture, and their DataModule.

Scales (documented because SPEC §6's W2 floors refer to raw coordinates):

========================  ====================================================================================
name                      definition
========================  ====================================================================================
``"moons"``               ``sklearn.datasets.make_moons(noise=0.05)``, sklearn's raw coordinates
                          (x ∈ [-1.1, 2.1], y ∈ [-0.6, 1.1]); W2 floor of two independent 1000-point
                          samples ≈ 0.035 (SPEC §6, re-checked in ``tests/data/test_toy2d.py``).
``"8gaussians"``          8 isotropic Gaussians on a circle of radius 2, std 0.3, equal weights (SPEC §4.1).
``"checkerboard"``        FFJORD's 8-square checkerboard on [-4, 4]² (Grathwohl et al. 2019 code).
``"spirals"``             FFJORD's "2spirals" (two interleaved spirals, range ≈ [-4, 4]²).
``"scurve"``              ``sklearn.datasets.make_s_curve(noise=0.05)`` projected to its (x, z) coordinates
                          (x ∈ [-1, 1], z ∈ [-2, 2]).
``"gmm"``                 a fixed, asymmetric 3-component :class:`GaussianMixture` (analytic score).
========================  ====================================================================================

``noise`` overrides the default noise of moons / s-curve (0.05), the component std of 8gaussians (0.3), and
adds isotropic Gaussian jitter of that std to checkerboard / spirals (default none / FFJORD's own jitter).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from lightning_tiger.data.in_memory import InMemoryDataModule
from lightning_tiger.validation import check_int, check_real

TOY_NAMES: tuple[str, ...] = ("moons", "8gaussians", "checkerboard", "spirals", "scurve", "gmm")


class GaussianMixture:
    """Mixture of isotropic Gaussians with closed-form density, score and Gaussian perturbation.

    p(x) = Σ_k w_k N(x; μ_k, s_k² I).  The law of αX + σε (X ~ p, ε ~ N(0, I)) is again a mixture with means
    α μ_k and stds sqrt(α² s_k² + σ²): this gives the exact marginal score ∇log p_t of every score SDE
    (SPEC §4.1/§4.2), which the analytic tests and metrics use.

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


def eight_gaussians(radius: float = 2.0, std: float = 0.3) -> GaussianMixture:
    """8 equal-weight Gaussians at angles 2πk/8 on a circle of ``radius`` (SPEC §4.1: radius 2, std 0.3)."""
    angles = torch.arange(8, dtype=torch.get_default_dtype()) * (2 * math.pi / 8)
    means = radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    return GaussianMixture(means, std)


def default_gmm() -> GaussianMixture:
    """The ``"gmm"`` toy: 3 unequal isotropic components (asymmetric, so bugs in weights/stds show)."""
    return GaussianMixture([[-1.0, -0.5], [1.0, 1.0], [1.5, -1.0]], [0.35, 0.2, 0.3], [0.5, 0.3, 0.2])


def analytic_toy(name: str, noise: float | None = None) -> GaussianMixture | None:
    """The :class:`GaussianMixture` behind ``name`` ("8gaussians", "gmm"), ``None`` for the other toys."""
    if name == "8gaussians":
        return eight_gaussians(std=0.3 if noise is None else noise)
    if name == "gmm":
        return default_gmm()
    return None


def _sklearn_seed(generator: torch.Generator | None) -> int:
    # sklearn wants an int seed: draw it from the torch generator so one generator controls everything.
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator).item())


def sample_toy(name: str, n: int, *, generator: torch.Generator | None = None,
               noise: float | None = None) -> Tensor:
    """Sample ``n`` points ``[n, 2]`` (float32) of the toy ``name`` (see the module docstring for scales).

    Args:
        name: one of :data:`TOY_NAMES`.
        n: number of points (>= 0).
        generator: torch generator; the same seed gives the same points.
        noise: override of the default noise (module docstring); ``None`` = default.
    """
    if name not in TOY_NAMES:
        raise ValueError(f"name must be one of {TOY_NAMES}, got {name!r}")
    check_int("n", n, low=0)
    noise = check_real("noise", noise, low=0.0, allow_none=True)  # -0.0 comes back as 0.0 (sklearn refuses -0.0)
    if n == 0:
        return torch.zeros(0, 2)
    if name == "moons":
        from sklearn.datasets import make_moons

        x, _ = make_moons(n, noise=0.05 if noise is None else noise, random_state=_sklearn_seed(generator))
        return torch.from_numpy(np.asarray(x, dtype=np.float32))
    if name == "scurve":
        from sklearn.datasets import make_s_curve

        x, _ = make_s_curve(n, noise=0.05 if noise is None else noise, random_state=_sklearn_seed(generator))
        return torch.from_numpy(np.asarray(x[:, [0, 2]], dtype=np.float32))
    mixture = analytic_toy(name, noise)
    if mixture is not None:
        return mixture.sample(n, generator).float()
    if name == "checkerboard":
        # FFJORD (Grathwohl et al. 2019) toy_data.py "checkerboard".
        x1 = torch.rand(n, generator=generator) * 4 - 2
        x2_ = torch.rand(n, generator=generator) - torch.randint(0, 2, (n,), generator=generator).float() * 2
        x2 = x2_ + torch.floor(x1) % 2
        out = torch.stack([x1, x2], dim=1) * 2
    else:  # spirals: FFJORD "2spirals"
        m = torch.sqrt(torch.rand(n // 2 + n % 2, 1, generator=generator)) * 540 * (2 * math.pi) / 360
        d1x = -torch.cos(m) * m + torch.rand(m.shape, generator=generator) * 0.5
        d1y = torch.sin(m) * m + torch.rand(m.shape, generator=generator) * 0.5
        arm = torch.cat([d1x, d1y], dim=1)
        out = torch.cat([arm, -arm], dim=0)[:n] / 3
        out = out + 0.1 * torch.randn(out.shape, generator=generator)
        out = out[torch.randperm(n, generator=generator)]
    if noise:
        out = out + noise * torch.randn(out.shape, generator=generator)
    return out.float()


class ToyDataModule(InMemoryDataModule):
    """A 2-D toy as a LightningDataModule: fixed train / validation samples drawn from ``seed``.

    Batches are plain tensors ``[batch_size, 2]`` (no labels, no tuples). Train, validation and nothing else
    share samples: train uses seed ``seed``, validation ``seed + 1``; both are deterministic.

    Args:
        name: toy name (:data:`TOY_NAMES`), default ``"moons"``.
        num_train: training points (default 20000).
        num_val: held-out points (default 1000); also :meth:`val_reference`.
        batch_size: default 256; train batches drop the last incomplete batch.
        seed: data seed (default 0).
        noise: noise override, see :func:`sample_toy`.
        num_workers: DataLoader workers (default 0: data is in memory).
    """

    def __init__(self, name: str = "moons", num_train: int = 20000, num_val: int = 1000, batch_size: int = 256,
                 seed: int = 0, noise: float | None = None, num_workers: int = 0) -> None:
        super().__init__(batch_size, seed, num_workers)
        if name not in TOY_NAMES:
            raise ValueError(f"name must be one of {TOY_NAMES}, got {name!r}")
        for pname, value, low in (("num_train", num_train, 1), ("num_val", num_val, 1),
                                  ("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
            check_int(pname, value, low=low)
        check_int("seed", seed)
        check_real("noise", noise, low=0.0, allow_none=True)
        self.save_hyperparameters()
        self.name = name
        self.num_train = num_train
        self.num_val = num_val
        self.noise = noise
        self.data_shape: tuple[int, ...] = (2,)

    def _sample(self, n: int, seed: int) -> Tensor:
        return sample_toy(self.name, n, generator=torch.Generator().manual_seed(seed), noise=self.noise)

    def setup(self, stage: str | None = None) -> None:
        if self._train is None:
            self._train = self._sample(self.num_train, self.seed)
        if self._val is None:
            self._val = self._sample(self.num_val, self.seed + 1)

    def analytic_distribution(self) -> GaussianMixture | None:
        """The exact data law when it is a Gaussian mixture ("8gaussians", "gmm"), else ``None``."""
        return analytic_toy(self.name, self.noise)
