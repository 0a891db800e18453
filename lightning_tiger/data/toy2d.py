"""2-D toy distributions that need no download (two of them analytic Gaussian mixtures) and their DataModule.

Scales (documented because the W2 floors quoted in the metrics refer to raw coordinates):

========================  ====================================================================================
name                      definition
========================  ====================================================================================
``"moons"``               ``sklearn.datasets.make_moons(noise=0.05)``, sklearn's raw coordinates
                          (x ∈ [-1.1, 2.1], y ∈ [-0.6, 1.1]); W2 floor of two independent 1000-point
                          samples ≈ 0.035 (measured in ``tests/data/test_toy2d.py``).
``"8gaussians"``          8 isotropic Gaussians on a circle of radius 2, std 0.3, equal weights (the
                          mixture of Su's notes "生成扩散模型漫谈(十八)").
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

import numpy as np
import torch
from torch import Tensor

from lightning_tiger.data.in_memory import InMemoryDataModule
from lightning_tiger.generative.gaussian_mixture import GaussianMixture
from lightning_tiger.validation import check_int, check_real

TOY_NAMES: tuple[str, ...] = ("moons", "8gaussians", "checkerboard", "spirals", "scurve", "gmm")


def eight_gaussians(radius: float = 2.0, std: float = 0.3) -> GaussianMixture:
    """8 equal-weight Gaussians at angles 2πk/8 on a circle of ``radius`` (defaults radius 2, std 0.3)."""
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
