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
__all__ = sorted(_EXPORTS)  # the names are listed once, in _EXPORTS
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # pragma: no cover  (static re-exports: `name as name`)
    from .checkpoint_io import CorruptCheckpointError as CorruptCheckpointError
    from .checkpoint_io import VerifiedCheckpointIO as VerifiedCheckpointIO
    from .checkpoint_io import verified_checkpoints as verified_checkpoints
    from .checkpoint_io import verify_checkpoint as verify_checkpoint
    from .last_checkpoint import LastCheckpoint as LastCheckpoint
    from .tight_fisted import TightFistedDDPStrategy as TightFistedDDPStrategy
