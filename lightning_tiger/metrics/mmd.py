"""torchmetrics ``Metric`` wrapper of the unbiased RBF MMD² (Gretton, Borgwardt, Rasch, Schölkopf & Smola, "A Kernel
Two-Sample Test", JMLR 2012, eq. 3)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from lightning_tiger.metrics.functional import mmd2_unbiased
from lightning_tiger.metrics.two_sample import TwoSampleMetric

__all__ = ["MMD"]


class MMD(TwoSampleMetric):
    """Unbiased squared MMD with a Gaussian kernel between all accumulated ``preds`` and ``target``.

    Samples live in ``cat`` states (DDP gathers them), and the kernel matrices are formed in ``compute()``:
    O((n + m)²) memory, fine for the few thousand samples of offline evaluation.

    Args:
        bandwidths: kernel bandwidth h (or a list, kernel = mean over them); ``None`` (default) uses the
            median heuristic on the pooled sample at compute time.
        **kwargs: forwarded to :class:`torchmetrics.Metric`.
    """

    def __init__(self, bandwidths: float | Sequence[float] | None = None, **kwargs: Any) -> None:
        if bandwidths is not None:
            values = [bandwidths] if isinstance(bandwidths, (int, float)) else list(bandwidths)
            if not values or any(
                isinstance(h, bool) or not isinstance(h, (int, float)) or h <= 0 for h in values
            ):
                raise ValueError(
                    "bandwidths must be a positive float, a non-empty list of them, or None, "
                    f"got {bandwidths!r}"
                )
        super().__init__(**kwargs)
        self.bandwidths = bandwidths

    def compute(self) -> Tensor:
        """Return MMD²_u over everything accumulated since the last reset (can be slightly negative)."""
        preds, target = self.gathered()
        return mmd2_unbiased(preds, target, self.bandwidths)
