"""Checkpoint I/O that never leaves a half-written checkpoint and names a bad one clearly.

Lightning's :class:`~lightning.fabric.plugins.io.torch_io.TorchCheckpointIO` already serialises to memory
and writes through an fsspec transaction (a temporary file moved into place), so a process killed while
saving leaves the previous file intact. What it lacks is *detection*: a checkpoint truncated or damaged
later (a full disk, a copy cut short, bit rot) fails deep inside ``torch.load`` with
``PytorchStreamReader failed reading zip archive``. :class:`VerifiedCheckpointIO` writes a SHA-256 sidecar
(``<file>.sha256``) after each checkpoint and, on load, checks it (when present) and turns any read failure
into a :class:`CorruptCheckpointError` that names the file and lists the other checkpoints beside it.

Example::

    trainer = L.Trainer(plugins=[VerifiedCheckpointIO()], callbacks=[ModelCheckpoint(save_last=True)])
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _load as pl_load
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = ["CorruptCheckpointError", "VerifiedCheckpointIO"]


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file that is truncated, damaged, or does not match its recorded checksum."""


def _sidecar(path: _PATH) -> Path:
    return Path(str(path) + ".sha256")


class VerifiedCheckpointIO(TorchCheckpointIO):
    """Atomic ``torch.save`` checkpoints with a SHA-256 sidecar, verified on load.

    Args:
        verify: check the sidecar on load (a missing sidecar, e.g. a checkpoint from plain Lightning, is
            accepted; only a mismatch is an error).
    """

    def __init__(self, verify: bool = True) -> None:
        super().__init__()
        self.verify = verify

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getbuffer()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._write_atomic(path, data)
        # Written after the checkpoint: a kill in between leaves a valid checkpoint without sidecar (accepted),
        # never a sidecar describing a file that is not there yet.
        self._write_atomic(_sidecar(path), hashlib.sha256(data).hexdigest().encode())

    @staticmethod
    def _write_atomic(path: Path, data: bytes | memoryview) -> None:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows: readers see the old or the new file, never half

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Callable | Any | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        data = path.read_bytes()
        sidecar = _sidecar(path)
        if self.verify and sidecar.exists():
            expected = sidecar.read_text().strip()
            actual = hashlib.sha256(data).hexdigest()
            if actual != expected:
                reason = f"SHA-256 {actual[:12]}… != recorded {expected[:12]}…"
                raise CorruptCheckpointError(self._explain(path, reason))
        try:
            return pl_load(io.BytesIO(data), map_location=map_location, weights_only=weights_only)
        except pickle.UnpicklingError as exc:
            if "weights only load failed" in str(exc).lower():
                raise  # an intact file holding non-tensor objects, refused by weights_only: not corruption
            raise CorruptCheckpointError(self._explain(path, f"{type(exc).__name__}: {exc}")) from exc
        except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
            raise CorruptCheckpointError(self._explain(path, f"{type(exc).__name__}: {exc}")) from exc

    def remove_checkpoint(self, path: _PATH) -> None:
        super().remove_checkpoint(path)
        _sidecar(path).unlink(missing_ok=True)

    @staticmethod
    def _explain(path: Path, reason: str) -> str:
        others = sorted(
            (p for p in path.parent.glob("*.ckpt") if p != path), key=lambda p: p.stat().st_mtime, reverse=True
        )
        listing = ", ".join(str(p) for p in others[:5]) or "none"
        return (
            f"checkpoint {path} is truncated or corrupted ({reason}, {path.stat().st_size} bytes). "
            f"Resume from an earlier checkpoint instead (newest first): {listing}"
        )
