"""FrechetDistance Metric: sum states reproduce the one-shot formula; pluggable feature module."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from lightning_tiger.metrics import FrechetDistance


def _reference(a: np.ndarray, b: np.ndarray) -> float:
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def test_streaming_moments_match_reference_and_merge() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(300, 1, 2, 2, generator=gen)  # images are flattened to 4 features
    b = torch.randn(200, 1, 2, 2, generator=gen) * 1.5 + 0.3
    m1, m2 = FrechetDistance(), FrechetDistance()
    m1.update(a[:100], b[:50])
    m1.update(a[100:150], None)
    m2.update(a[150:], b[50:])
    m1.merge_state(m2)
    ref = _reference(a.reshape(300, -1).double().numpy(), b.reshape(200, -1).double().numpy())
    assert float(m1.compute()) == pytest.approx(ref, rel=1e-6)
    m1.reset()
    with pytest.raises(ValueError, match="at least 2"), pytest.warns(UserWarning, match="before"):
        m1.compute()


def test_feature_module_is_applied() -> None:
    feature = nn.Linear(4, 3)
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(64, 4, generator=gen), torch.randn(64, 4, generator=gen) + 1
    m = FrechetDistance(feature=feature)
    m.update(a, b)
    with torch.no_grad():
        ref = _reference(feature(a).double().numpy(), feature(b).double().numpy())
    assert float(m.compute()) == pytest.approx(ref, rel=1e-6)


def test_errors() -> None:
    with pytest.raises(TypeError, match="feature"):
        FrechetDistance(feature="inception")  # type: ignore[arg-type]
    m = FrechetDistance()
    m.update(torch.randn(4, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="size"):
        m.update(torch.randn(4, 5), None)
    with pytest.raises(TypeError, match="floating"):
        m.update(torch.ones(4, 3, dtype=torch.int64), None)
