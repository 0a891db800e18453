"""Lightning callbacks: non-finite step guard, optimizer swap and optimizer telemetry."""

from typing import TYPE_CHECKING

from lightning_tiger._lazy import lazy_exports

_EXPORTS = {
    "RNGStateCheckpoint": ".rng_state",
    "NonFiniteGuard": ".nonfinite_guard",
    "NonFiniteTrainingError": ".nonfinite_guard",
    "OptimizerMonitor": ".optimizer_monitor",
    "UseOptimizer": ".use_optimizer",
}
__all__ = [
    "NonFiniteGuard",
    "NonFiniteTrainingError",
    "OptimizerMonitor",
    "RNGStateCheckpoint",
    "UseOptimizer",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from .nonfinite_guard import NonFiniteGuard, NonFiniteTrainingError
    from .optimizer_monitor import OptimizerMonitor
    from .rng_state import RNGStateCheckpoint
    from .use_optimizer import UseOptimizer
