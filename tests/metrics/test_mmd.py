"""MMD Metric: accumulation equals the explicit unbiased estimator; states merge like DDP."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_tiger.metrics import MMD


def _reference(x: torch.Tensor, y: torch.Tensor, h: float) -> float:
    def k(a: torch.Tensor, b: torch.Tensor) -> float:
        return math.exp(-float(((a - b) ** 2).sum()) / (2 * h * h))

    n, m = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return kxx + kyy - 2 * kxy


def test_mmd_metric_batches_and_merge() -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 2, generator=gen).double(), torch.randn(9, 2, generator=gen).double() + 1
    m = MMD(bandwidths=0.8)
    m.update(x[:6], y[:4])
    other = MMD(bandwidths=0.8)
    other.update(x[6:], y[4:])
    m.merge_state(other)
    assert float(m.compute()) == pytest.approx(_reference(x, y, 0.8), rel=1e-9)


def test_mmd_metric_errors() -> None:
    with pytest.raises(ValueError, match="bandwidths"):
        MMD(bandwidths=0.0)
    m = MMD()
    m.update(torch.randn(1, 2), torch.randn(5, 2))
    with pytest.raises(ValueError, match="at least 2"):
        m.compute()
    with pytest.raises(TypeError, match="floating"):
        m.update(torch.ones(3, 2, dtype=torch.long), torch.randn(3, 2))
