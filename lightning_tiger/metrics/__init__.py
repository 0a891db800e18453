"""torchmetrics Metrics and their functional twins for offline sample quality (built on ``generative/``)."""

from typing import TYPE_CHECKING

from lightning_tiger._lazy import lazy_exports

_EXPORTS = {
    "ExcessScoreLoss": ".excess_score_loss",
    "KFLBound": ".score_matching",
    "dsm_constant": ".score_matching",
    "score_loss_terms": ".score_matching",
    "kfl_w2_bound": ".score_matching",
    "excess_score_loss": ".score_matching",
    "WassersteinDistance": ".wasserstein",
    "SlicedWassersteinDistance": ".wasserstein",
    "MMD": ".mmd",
    "FrechetDistance": ".frechet",
    "TwoSampleMetric": ".two_sample",
}
__all__ = [
    "MMD",
    "ExcessScoreLoss",
    "FrechetDistance",
    "KFLBound",
    "SlicedWassersteinDistance",
    "TwoSampleMetric",
    "WassersteinDistance",
    "dsm_constant",
    "excess_score_loss",
    "kfl_w2_bound",
    "score_loss_terms",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from .excess_score_loss import ExcessScoreLoss
    from .frechet import FrechetDistance
    from .mmd import MMD
    from .score_matching import KFLBound, dsm_constant, excess_score_loss, kfl_w2_bound, score_loss_terms
    from .two_sample import TwoSampleMetric
    from .wasserstein import SlicedWassersteinDistance, WassersteinDistance
