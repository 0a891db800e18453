"""2-D toys against explicit formulas (sklearn's raw coordinates, exact W2 by assignment)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from lightning_tiger.data.toy2d import (
    TOY_NAMES,
    ToyDataModule,
    analytic_toy,
    eight_gaussians,
    sample_toy,
)


def test_eight_gaussians_layout() -> None:
    mix = eight_gaussians()
    assert torch.allclose(mix.means.norm(dim=1), torch.full((8,), 2.0))
    assert torch.allclose(mix.stds, torch.full((8,), 0.3))
    assert analytic_toy("8gaussians") is not None and analytic_toy("moons") is None


@pytest.mark.parametrize("name", TOY_NAMES)
def test_sample_toy_shapes_determinism_and_scale(name: str) -> None:
    a = sample_toy(name, 500, generator=torch.Generator().manual_seed(3))
    b = sample_toy(name, 500, generator=torch.Generator().manual_seed(3))
    c = sample_toy(name, 500, generator=torch.Generator().manual_seed(4))
    assert a.shape == (500, 2) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.abs().max()) < 5.0


def test_moons_are_sklearn_raw_coordinates() -> None:
    x = sample_toy("moons", 4000, generator=torch.Generator().manual_seed(0))
    # make_moons: upper arc (cos, sin) on [0, pi], lower arc (1 - cos, 0.5 - sin); noise 0.05.
    assert -1.25 < float(x[:, 0].min()) < -0.9 and 1.9 < float(x[:, 0].max()) < 2.25
    assert float(x.mean(0)[0]) == pytest.approx(0.5, abs=0.03)
    assert float(x.mean(0)[1]) == pytest.approx(0.25, abs=0.03)


def test_moons_w2_floor_at_1000_points() -> None:
    """Two independent 1000-point moons samples are ≈ 0.035 apart in exact W2."""
    vals = []
    for seed in range(3):
        x = sample_toy("moons", 1000, generator=torch.Generator().manual_seed(2 * seed)).double().numpy()
        y = sample_toy("moons", 1000, generator=torch.Generator().manual_seed(2 * seed + 1)).double().numpy()
        cost = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
        r, c = linear_sum_assignment(cost)
        vals.append(math.sqrt(cost[r, c].mean()))
    assert 0.025 < float(np.mean(vals)) < 0.045


def test_datamodule_batches_reference_and_errors() -> None:
    dm = ToyDataModule("gmm", num_train=600, num_val=100, batch_size=128, seed=5)
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, torch.Tensor) and batch.shape == (128, 2)
    assert len(dm.train_dataloader()) == 600 // 128
    ref = dm.val_reference()
    assert ref.shape == (100, 2) and torch.equal(ref, ToyDataModule("gmm", 600, 100, seed=5).val_reference())
    assert not torch.equal(ref, ToyDataModule("gmm", 600, 100, seed=6).val_reference())
    assert dm.data_shape == (2,) and dm.analytic_distribution() is not None
    with pytest.raises(ValueError, match="name"):
        ToyDataModule("swissroll")
    with pytest.raises(ValueError, match="batch_size"):
        ToyDataModule(batch_size=0)
