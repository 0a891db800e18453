"""Streaming excess score-matching loss, the Metric twin of :func:`~lightning_tiger.metrics.excess_score_loss`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["ExcessScoreLoss"]


class ExcessScoreLoss(Metric):
    """L_SM = E‖s_θ(x_t, t) − ∇log p_t(x_t)‖², i.e. the denoising loss minus its floor C_t
    (Vincent 2011, "A Connection Between Score Matching and Denoising Autoencoders": the two losses differ by
    a constant C_t that does not depend on the model).

    For data with an analytic marginal score (Gaussian mixtures: ``GaussianMixture.perturbed_score``) feed the
    model's score and the true score at the same noisy points, batch after batch; the states are sums, so the
    value is exact under DDP (each sample counted once). The Monte-Carlo functional
    :func:`~lightning_tiger.metrics.excess_score_loss` estimates the same quantity from a score function.

    ``update(score_pred, score_true)``: both ``[batch, *shape]``, same shape, floating point.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("sum_sq", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, score_pred: Tensor, score_true: Tensor) -> None:
        if not (isinstance(score_pred, Tensor) and isinstance(score_true, Tensor)):
            raise TypeError("score_pred and score_true must be tensors")
        if not (score_pred.is_floating_point() and score_true.is_floating_point()):
            dtypes = f"{score_pred.dtype}, {score_true.dtype}"
            raise TypeError(f"score_pred and score_true must be floating point, got {dtypes}")
        if score_pred.shape != score_true.shape or score_pred.ndim < 2:
            raise ValueError(
                f"score_pred and score_true must have the same shape [batch, *shape], got "
                f"{tuple(score_pred.shape)} and {tuple(score_true.shape)}"
            )
        diff = (score_pred.double() - score_true.double()).flatten(1)
        self.sum_sq += diff.pow(2).sum()
        self.count += diff.shape[0]

    def compute(self) -> Tensor:
        if int(self.count) == 0:
            raise ValueError("ExcessScoreLoss.compute() called before any update()")
        return self.sum_sq / self.count
