"""Checkpoint safety (I/O that detects truncated or corrupted checkpoints, a ``last.ckpt`` kept at train end) and
the data-parallel strategy of tight-fisted Tiger."""

from .checkpoint_io import CorruptCheckpointError as CorruptCheckpointError
from .checkpoint_io import VerifiedCheckpointIO as VerifiedCheckpointIO
from .checkpoint_io import verified_checkpoints as verified_checkpoints
from .checkpoint_io import verify_checkpoint as verify_checkpoint
from .last_checkpoint import LastCheckpoint as LastCheckpoint
from .tight_fisted import TightFistedDDPStrategy as TightFistedDDPStrategy
