"""Trainer plugins: checkpoint I/O that detects truncated or corrupted checkpoints."""

from typing import TYPE_CHECKING

from lightning_tiger._lazy import lazy_exports

_EXPORTS = {
    "VerifiedCheckpointIO": ".checkpoint_io",
    "CorruptCheckpointError": ".checkpoint_io",
}
__all__ = [
    "CorruptCheckpointError",
    "VerifiedCheckpointIO",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from .checkpoint_io import CorruptCheckpointError, VerifiedCheckpointIO
