"""Lightning callbacks: non-finite step guard, optimizer swap and optimizer telemetry."""

from .nonfinite_guard import NonFiniteGuard as NonFiniteGuard
from .nonfinite_guard import NonFiniteTrainingError as NonFiniteTrainingError
from .optimizer_monitor import OptimizerMonitor as OptimizerMonitor
from .rng_state import RNGStateCheckpoint as RNGStateCheckpoint
from .use_optimizer import UseOptimizer as UseOptimizer
