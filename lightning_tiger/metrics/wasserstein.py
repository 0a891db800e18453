"""torchmetrics ``Metric`` wrappers of the exact and sliced 2-Wasserstein distances.

Both accumulate the raw samples in ``cat`` states, so under DDP ``compute()`` sees the union of all ranks'
samples (torchmetrics gathers list states with ``dist_reduce_fx="cat"``) and every rank returns the same
value.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_tiger.metrics.functional import sliced_wasserstein2, wasserstein2
from lightning_tiger.metrics.two_sample import TwoSampleMetric

__all__ = ["SlicedWassersteinDistance", "WassersteinDistance"]


class WassersteinDistance(TwoSampleMetric):
    """Exact W2 between all accumulated ``preds`` and ``target`` (optimal assignment, O(n³)).

    Args:
        max_samples: if set, ``compute()`` uses the first ``max_samples`` of each (deterministic) to bound the
            O(n³) cost; ``None`` (default) needs equal totals of preds and target.
        backend: ``"auto"`` | ``"scipy"`` | ``"pot"``, see
            :func:`~lightning_tiger.metrics.functional.wasserstein2`.
        **kwargs: forwarded to :class:`torchmetrics.Metric` (e.g. ``sync_on_compute``).

    Example:
        >>> m = WassersteinDistance()
        >>> m.update(torch.zeros(4, 2), torch.ones(4, 2))
        >>> round(float(m.compute()), 4)
        1.4142
    """

    equal_size = True

    def __init__(self, max_samples: int | None = None, backend: str = "auto", **kwargs: Any) -> None:
        if max_samples is not None and (
            isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1
        ):
            raise ValueError(f"max_samples must be None or an integer >= 1, got {max_samples!r}")
        if backend not in ("auto", "scipy", "pot"):
            raise ValueError(f"backend must be one of 'auto', 'scipy', 'pot', got {backend!r}")
        super().__init__(**kwargs)
        self.max_samples = max_samples
        self.backend = backend

    def compute(self) -> Tensor:
        """Return W2 over everything accumulated since the last reset."""
        preds, target = self.gathered(limit=self.max_samples)
        return wasserstein2(preds, target, backend=self.backend)


class SlicedWassersteinDistance(TwoSampleMetric):
    """Sliced W2 (random projections, exact 1-D W2 per projection); sizes may differ.

    Args:
        num_projections: random directions, default 256.
        seed: seed of the directions, so every rank and every call uses the same ones (default 0).
        **kwargs: forwarded to :class:`torchmetrics.Metric`.
    """

    def __init__(self, num_projections: int = 256, seed: int = 0, **kwargs: Any) -> None:
        if isinstance(num_projections, bool) or not isinstance(num_projections, int) or num_projections < 1:
            raise ValueError(f"num_projections must be an integer >= 1, got {num_projections!r}")
        super().__init__(**kwargs)
        self.num_projections = num_projections
        self.seed = int(seed)

    def compute(self) -> Tensor:
        """Return sliced W2 over everything accumulated since the last reset."""
        preds, target = self.gathered()
        gen = torch.Generator().manual_seed(self.seed)
        return sliced_wasserstein2(preds, target, self.num_projections, generator=gen)
