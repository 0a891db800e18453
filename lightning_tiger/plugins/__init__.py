"""Checkpoint safety (I/O that detects truncated or corrupted checkpoints, a ``last.ckpt`` kept at train end) and
the data-parallel strategy of tight-fisted Tiger."""

from typing import TYPE_CHECKING

from lightning_tiger._lazy import lazy_exports

_EXPORTS = {
    "VerifiedCheckpointIO": ".checkpoint_io",
    "CorruptCheckpointError": ".checkpoint_io",
    "verify_checkpoint": ".checkpoint_io",
    "verified_checkpoints": ".checkpoint_io",
    "LastCheckpoint": ".last_checkpoint",
    "TightFistedDDPStrategy": ".tight_fisted",
}
__all__ = [
    "CorruptCheckpointError",
    "LastCheckpoint",
    "TightFistedDDPStrategy",
    "VerifiedCheckpointIO",
    "verified_checkpoints",
    "verify_checkpoint",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from .checkpoint_io import CorruptCheckpointError, VerifiedCheckpointIO, verified_checkpoints, verify_checkpoint
    from .last_checkpoint import LastCheckpoint
    from .tight_fisted import TightFistedDDPStrategy
