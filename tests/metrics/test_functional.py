"""Functional metrics against explicit references (permutations, loops, numpy/scipy) and the moons W2 floors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from sklearn.datasets import load_digits, make_moons

from lightning_tiger.metrics.functional import (
    frechet_distance,
    median_bandwidth,
    mmd2_unbiased,
    sliced_wasserstein2,
    wasserstein2,
    wasserstein2_1d,
)


def _moons(n: int, seed: int) -> torch.Tensor:
    return torch.tensor(make_moons(n, noise=0.05, random_state=seed)[0], dtype=torch.float32)


def _pair_and_brute_force_w2() -> tuple[torch.Tensor, torch.Tensor, float]:
    """Two 6-point clouds and their exact W2 by trying every one of the 720 assignments."""
    gen = torch.Generator().manual_seed(1)
    x, y = (
        torch.randn(6, 3, generator=gen, dtype=torch.float64),
        torch.randn(6, 3, generator=gen).double() + 1,
    )
    best = min(
        sum(float(((x[i] - y[p[i]]) ** 2).sum()) for i in range(6)) / 6
        for p in itertools.permutations(range(6))
    )
    return x, y, math.sqrt(best)


def test_w2_matches_brute_force_over_permutations() -> None:
    x, y, ref = _pair_and_brute_force_w2()
    assert float(wasserstein2(x, y)) == pytest.approx(ref, rel=1e-10)


def test_w2_pot_backend_matches_brute_force_over_permutations() -> None:
    pytest.importorskip("ot", reason="backend='pot' needs POT (pip install pot; it is in the test extra)")
    x, y, ref = _pair_and_brute_force_w2()
    assert float(wasserstein2(x, y, backend="pot")) == pytest.approx(ref, rel=1e-8)


def test_w2_one_dimensional_equals_sorted_and_translation() -> None:
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(200, generator=gen).double(), 3 + 0.5 * torch.randn(200, generator=gen).double()
    ref = np.sqrt(np.mean((np.sort(x.numpy()) - np.sort(y.numpy())) ** 2))
    assert float(wasserstein2(x, y)) == pytest.approx(ref, rel=1e-10)
    assert float(wasserstein2_1d(x, y)) == pytest.approx(ref, rel=1e-10)
    # Pure translation by a vector a: W2 = ||a|| exactly (identity coupling is optimal).
    z = torch.randn(50, 2, generator=gen).double()
    assert float(wasserstein2(z, z + torch.tensor([3.0, 4.0]).double())) == pytest.approx(5.0, rel=1e-10)


def test_w2_1d_unequal_sizes_matches_replicated_samples() -> None:
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, generator=gen).double(), torch.randn(4, generator=gen).double() + 1
    # Replicating each point lcm/n times gives equal-size samples of the same empirical measures.
    xr, yr = x.repeat_interleave(2), y.repeat_interleave(3)
    ref = np.sqrt(np.mean((np.sort(xr.numpy()) - np.sort(yr.numpy())) ** 2))
    assert float(wasserstein2_1d(x, y)) == pytest.approx(ref, rel=1e-10)
    assert float(sliced_wasserstein2(x[:, None], y[:, None], num_projections=3)) == pytest.approx(
        ref, rel=1e-10
    )


def test_sliced_w2_translation_and_bounds() -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(300, 3, generator=gen).double()
    shift = torch.tensor([1.0, -2.0, 2.0]).double()
    # Projection θ·x is shifted by θ·a, so SW2² = E(θ·a)² = ||a||²/d for θ uniform on the sphere.
    sw = sliced_wasserstein2(x, x + shift, num_projections=20000, generator=torch.Generator().manual_seed(0))
    assert float(sw) == pytest.approx(3.0 / math.sqrt(3), rel=0.02)
    y = torch.randn(300, 3, generator=gen).double() * 2
    g = torch.Generator().manual_seed(5)
    a = sliced_wasserstein2(x, y, 64, generator=g)
    b = sliced_wasserstein2(x, y, 64, generator=torch.Generator().manual_seed(5))
    assert float(a) == float(b)  # same seed, same value
    assert float(a) <= float(wasserstein2(x, y)) + 1e-9


def test_w2_moons_floors() -> None:
    # Two independent moons samples give W2 ≈ 0.059 / 0.035 at n = 256 / 1000.
    w256 = np.mean([float(wasserstein2(_moons(256, 2 * s), _moons(256, 2 * s + 1))) for s in range(3)])
    w1000 = float(wasserstein2(_moons(1000, 10), _moons(1000, 11)))
    assert w256 == pytest.approx(0.059, abs=0.006)
    assert w1000 == pytest.approx(0.035, abs=0.004)


def test_mmd_matches_explicit_loops() -> None:
    gen = torch.Generator().manual_seed(6)
    x, y = torch.randn(7, 2, generator=gen).double(), torch.randn(5, 2, generator=gen).double() + 0.5
    hs = [0.5, 2.0]

    def k(a: torch.Tensor, b: torch.Tensor) -> float:
        d2 = float(((a - b) ** 2).sum())
        return sum(math.exp(-d2 / (2 * h * h)) for h in hs) / len(hs)

    n, m = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    assert float(mmd2_unbiased(x, y, hs)) == pytest.approx(kxx + kyy - 2 * kxy, rel=1e-10)
    # Median heuristic: median pairwise distance of the pooled sample (numpy reference).
    z = torch.cat([x, y]).numpy()
    dists = [np.linalg.norm(z[i] - z[j]) for i in range(len(z)) for j in range(len(z)) if i != j]
    # torch.median returns the lower of the two middle values for even counts.
    assert float(median_bandwidth(x, y)) == pytest.approx(sorted(dists)[(len(dists) - 1) // 2], rel=1e-10)


def test_mmd_separates_distributions() -> None:
    same = mmd2_unbiased(_moons(500, 0), _moons(500, 1))
    shifted = mmd2_unbiased(_moons(500, 0), _moons(500, 1) + 0.3)
    assert abs(float(same)) < 0.005
    assert float(shifted) > 20 * abs(float(same))


def test_frechet_matches_scipy_sqrtm_reference() -> None:
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(400, 4, generator=gen).double() @ torch.randn(4, 4, generator=gen).double()
    b = torch.randn(300, 4, generator=gen).double() * 0.7 + 1.0
    an, bn = a.numpy(), b.numpy()
    s1, s2 = np.cov(an, rowvar=False), np.cov(bn, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    ref = np.sum((an.mean(0) - bn.mean(0)) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert float(frechet_distance(a, b)) == pytest.approx(ref, rel=1e-7)
    # 1-D Gaussians: (μ1 − μ2)² + (σ1 − σ2)² for the fitted moments.
    x, y = torch.randn(1000, 1, generator=gen).double(), 2 + 3 * torch.randn(1000, 1, generator=gen).double()
    ref1 = (x.mean() - y.mean()) ** 2 + (x.std() - y.std()) ** 2
    assert float(frechet_distance(x, y)) == pytest.approx(float(ref1), rel=1e-9)


def test_frechet_digits_halves_vs_noise() -> None:
    # On raw 64-d pixels in [0, 1]: two halves of digits ≈ 0.097, uniform noise ≈ 9.85.
    x = torch.tensor(load_digits().images, dtype=torch.float64).reshape(-1, 64) / 16
    x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))]
    halves = float(frechet_distance(x[:898], x[898:]))
    noise = float(
        frechet_distance(x[:898], torch.rand(899, 64, generator=torch.Generator().manual_seed(1)).double())
    )
    assert halves < 0.2
    assert 8.0 < noise < 12.0


@pytest.mark.parametrize("fn", [wasserstein2, sliced_wasserstein2, mmd2_unbiased, frechet_distance])
def test_input_validation(fn) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(8, 2)
    with pytest.raises(TypeError, match="dtype"):
        fn(x, x.double())
    with pytest.raises(TypeError, match="floating"):
        fn(x, torch.ones(8, 2, dtype=torch.long))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        fn(x.numpy(), x)
    with pytest.raises(ValueError, match="features"):
        fn(x, torch.randn(8, 3))
    with pytest.raises(ValueError, match="NaN"):
        fn(x, torch.full((8, 2), float("nan")))


def test_specific_errors() -> None:
    x = torch.randn(8, 2)
    with pytest.raises(ValueError, match="same number of samples"):
        wasserstein2(x, torch.randn(9, 2))
    with pytest.raises(ValueError, match="backend"):
        wasserstein2(x, x, backend="cuda")
    with pytest.raises(ValueError, match="num_projections"):
        sliced_wasserstein2(x, x, num_projections=0)
    with pytest.raises(ValueError, match="bandwidths"):
        mmd2_unbiased(x, x, bandwidths=[1.0, -1.0])
    with pytest.raises(ValueError, match="at least 2"):
        mmd2_unbiased(x[:1], x)
    # Images are flattened: [n, 1, 8, 8] compares as [n, 64].
    imgs = torch.randn(10, 1, 8, 8)
    assert float(wasserstein2(imgs, imgs)) == 0.0
