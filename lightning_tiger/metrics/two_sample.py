"""The shared state handling of the two-sample metrics (W2, sliced W2, MMD): accumulate both samples whole.

Both samples live in ``cat`` states, so under DDP ``compute()`` sees the union of all ranks' samples
(torchmetrics gathers list states with ``dist_reduce_fx="cat"``) and every rank returns the same value.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from lightning_tiger.metrics.sample_checks import check_pair

__all__ = ["TwoSampleMetric"]


def _is_empty(state: list[Tensor] | Tensor) -> bool:
    # After a DDP sync torchmetrics replaces a list state by the concatenated tensor.
    return state.numel() == 0 if isinstance(state, Tensor) else len(state) == 0


class TwoSampleMetric(Metric):
    """Base of the two-sample metrics: ``update(preds, target)`` appends both samples (sizes may differ per call).

    Subclasses implement ``compute()`` on :meth:`gathered`; set ``equal_size = True`` when the statistic needs
    as many ``preds`` as ``target`` samples.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    equal_size = False

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

    def gathered(self, limit: int | None = None) -> tuple[Tensor, Tensor]:
        """All accumulated ``(preds, target)``, the first ``limit`` of each when given, checked as a pair.

        Checked here so that errors name this metric's arguments (preds, target), not the functional's x, y.
        """
        if _is_empty(self.preds) or _is_empty(self.target):
            raise ValueError(
                f"{type(self).__name__}.compute() needs at least one update with preds and target"
            )
        preds, target = dim_zero_cat(self.preds), dim_zero_cat(self.target)
        if limit is not None:
            preds, target = preds[:limit], target[:limit]
        check_pair(preds, target, equal_size=self.equal_size, names=("preds", "target"))
        return preds, target
