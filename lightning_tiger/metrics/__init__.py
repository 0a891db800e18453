"""torchmetrics Metrics and their functional twins for offline sample quality."""

from typing import TYPE_CHECKING

from lightning_tiger._lazy import lazy_exports

_EXPORTS = {
    "WassersteinDistance": ".wasserstein",
    "SlicedWassersteinDistance": ".wasserstein",
    "MMD": ".mmd",
    "FrechetDistance": ".frechet",
}
__all__ = [
    "MMD",
    "FrechetDistance",
    "SlicedWassersteinDistance",
    "WassersteinDistance",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from .frechet import FrechetDistance
    from .mmd import MMD
    from .wasserstein import SlicedWassersteinDistance, WassersteinDistance
