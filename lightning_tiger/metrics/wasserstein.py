"""torchmetrics ``Metric`` wrappers of the exact and sliced 2-Wasserstein distances (SPEC §6).

Both accumulate the raw samples in ``cat`` states, so under DDP ``compute()`` sees the union of all ranks'
samples (torchmetrics gathers list states with ``dist_reduce_fx="cat"``) and every rank returns the same
value.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from lightning_tiger.metrics.functional import _check_pair, sliced_wasserstein2, wasserstein2

__all__ = ["SlicedWassersteinDistance", "WassersteinDistance"]


def _is_empty(state: list[Tensor] | Tensor) -> bool:
    # After a DDP sync torchmetrics replaces a list state by the concatenated tensor.
    return state.numel() == 0 if isinstance(state, Tensor) else len(state) == 0


class _TwoSampleMetric(Metric):
    """Shared state handling: ``update(preds, target)`` appends both samples (sizes may differ per call)."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    _equal_size = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Append generated samples ``preds [b, *features]`` and reference ``target [b', *features]``.

        Either may be empty (``[0, *features]``) so that generated and reference samples can arrive in
        different calls.
        """
        for name, v in (("preds", preds), ("target", target)):
            if not isinstance(v, Tensor) or not v.is_floating_point():
                raise TypeError(f"{name} must be a floating torch.Tensor, got {getattr(v, 'dtype', type(v))}")
        if preds.ndim == 1:
            preds = preds[:, None]
        if target.ndim == 1:
            target = target[:, None]
        # flatten(1) (not reshape(n, -1)) so that empty batches [0, *features] keep their feature count.
        preds, target = preds.flatten(1), target.flatten(1)
        if preds.shape[1] != target.shape[1]:
            raise ValueError(
                f"preds and target must have the same features, got {preds.shape[1]} and {target.shape[1]}"
            )
        if preds.numel():
            self.preds.append(preds.detach())
        if target.numel():
            self.target.append(target.detach())

    def _gathered(self) -> tuple[Tensor, Tensor]:
        if _is_empty(self.preds) or _is_empty(self.target):
            raise ValueError(
                f"{type(self).__name__}.compute() needs at least one update with preds and target"
            )
        preds, target = dim_zero_cat(self.preds), dim_zero_cat(self.target)
        _check_pair(preds, target, equal_size=self._equal_size, names=("preds", "target"))
        return preds, target


class WassersteinDistance(_TwoSampleMetric):
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

    _equal_size = True

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
        if _is_empty(self.preds) or _is_empty(self.target):
            raise ValueError("WassersteinDistance.compute() needs at least one update with preds and target")
        preds, target = dim_zero_cat(self.preds), dim_zero_cat(self.target)
        if self.max_samples is not None:
            preds, target = preds[: self.max_samples], target[: self.max_samples]
        # Checked here so that errors name this metric's arguments, not wasserstein2's x and y.
        _check_pair(preds, target, equal_size=True, names=("preds", "target"))
        return wasserstein2(preds, target, backend=self.backend)


class SlicedWassersteinDistance(_TwoSampleMetric):
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
        preds, target = self._gathered()
        gen = torch.Generator().manual_seed(self.seed)
        return sliced_wasserstein2(preds, target, self.num_projections, generator=gen)
