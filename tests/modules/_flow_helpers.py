"""Shared pieces of the rectified-flow tests: the closed-form velocity as a module, a 1-D Gaussian data module."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
from scipy.stats import norm
from torch import Tensor, nn
from torch.utils.data import DataLoader

M, S = 3.0, 0.5  # π_0 = N(0, 1), π_1 = N(3, 0.5²): the 1-RF of two Gaussians has a closed form


def exact_v(x: Tensor, t: Tensor) -> Tensor:
    """The 1-RF velocity of N(0, 1) -> N(m, s²), E[X_1 − X_0 | X_t = x] (Liu et al. 2023), written out:
    v(x,t) = m + c(t)(x − t m), c(t) = (t s² − (1−t)) / (t² s² + (1−t)²)."""
    t = t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    c = (t * S**2 - (1 - t)) / (t**2 * S**2 + (1 - t) ** 2)
    return M + c * (x - t * M)


class ExactVelocity(nn.Module):
    """The exact 1-RF velocity as a network (one dummy parameter so optimizers and devices work)."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return exact_v(x, t) + 0 * self.dummy


def normal_quantiles(n: int, mean: float = 0.0, std: float = 1.0) -> Tensor:
    """Deterministic 'perfect' sample: the (i + 0.5)/n quantiles, [n, 1] float64."""
    q = norm.ppf((np.arange(n) + 0.5) / n)
    return torch.tensor(mean + std * q, dtype=torch.float64)[:, None]


def w2_1d_reference(a: Tensor, b: Tensor) -> float:
    """1-D W2 from sorted equal-size samples (numpy, no library code)."""
    x, y = np.sort(a.double().numpy().ravel()), np.sort(b.double().numpy().ravel())
    return float(np.sqrt(np.mean((x - y) ** 2)))


class Gaussian1DDataModule(pl.LightningDataModule):
    """Samples of N(3, 0.5²) as [n, 1] tensors; val_reference = exact quantiles."""

    data_shape = (1,)

    def __init__(self, n: int = 4096, batch_size: int = 256, num_val: int = 512) -> None:
        super().__init__()
        self.n, self.batch_size, self.num_val = n, batch_size, num_val

    def train_dataloader(self) -> DataLoader:
        x = M + S * torch.randn(self.n, 1, generator=torch.Generator().manual_seed(0))
        return DataLoader(x, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_reference(), batch_size=self.batch_size)

    def val_reference(self) -> Tensor:
        return normal_quantiles(self.num_val, M, S).float()
