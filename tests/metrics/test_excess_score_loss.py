"""ExcessScoreLoss equals L_DSM − C_t, per batch and accumulated, against a numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_tiger.generative import GaussianMixture
from lightning_tiger.metrics import ExcessScoreLoss


def test_matches_numpy_reference_over_batches() -> None:
    g = torch.Generator().manual_seed(0)
    pred, true = torch.randn(100, 3, generator=g), torch.randn(100, 3, generator=g)
    metric = ExcessScoreLoss()
    for a, b in zip(pred.split(30), true.split(30)):
        metric.update(a, b)
    expected = np.mean(np.sum((pred.numpy().astype(np.float64) - true.numpy()) ** 2, axis=1))
    assert metric.compute().item() == pytest.approx(expected, rel=1e-12)


def test_true_score_gives_zero_and_zero_model_gives_mean_squared_score() -> None:
    mixture = GaussianMixture(torch.tensor([[-2.0, 0.0], [2.0, 0.0]]), 0.5)
    x = mixture.perturbed(0.8, 0.6).sample(500, torch.Generator().manual_seed(1))
    true = mixture.perturbed(0.8, 0.6).score(x)
    metric = ExcessScoreLoss()
    metric.update(true, true)
    assert metric.compute().item() == 0.0
    metric.reset()
    metric.update(torch.zeros_like(true), true)
    assert metric.compute().item() == pytest.approx(true.double().pow(2).sum(1).mean().item(), rel=1e-10)


@pytest.mark.parametrize(
    ("pred", "true", "error"),
    [
        (torch.zeros(4, 2), torch.zeros(4, 3), ValueError),
        (torch.zeros(4), torch.zeros(4), ValueError),
        (torch.zeros(4, 2, dtype=torch.long), torch.zeros(4, 2), TypeError),
    ],
)
def test_bad_input(pred: torch.Tensor, true: torch.Tensor, error: type[Exception]) -> None:
    with pytest.raises(error, match="score_pred"):
        ExcessScoreLoss().update(pred, true)
    with pytest.raises(ValueError, match="before any update"):
        ExcessScoreLoss().compute()
