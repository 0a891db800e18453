"""Checkpoint I/O that never leaves a half-written checkpoint and names a bad one clearly.

Lightning's :class:`~lightning.fabric.plugins.io.torch_io.TorchCheckpointIO` already serialises to memory
and writes through an fsspec transaction (a temporary file moved into place), so a process killed while
saving leaves the previous file intact. What it lacks is *detection*: a checkpoint truncated or damaged
later (a full disk, a copy cut short, bit rot) fails deep inside ``torch.load`` with
``PytorchStreamReader failed reading zip archive``. :class:`VerifiedCheckpointIO` writes a SHA-256 sidecar
(``<file>.sha256``) after each checkpoint and, on load, checks it (when present) and turns any read failure
into a :class:`CorruptCheckpointError` that names the file and lists the other checkpoints beside it that
verify. :func:`verify_checkpoint` runs the same checks without unpickling anything (the ``lightning-tiger``
command runs it on ``--ckpt_path`` before LightningCLI reads the checkpoint's hyperparameters).

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

__all__ = ["CorruptCheckpointError", "VerifiedCheckpointIO", "verified_checkpoints", "verify_checkpoint"]


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file that is truncated, damaged, or does not match its recorded checksum."""


def _sidecar(path: _PATH) -> Path:
    return Path(str(path) + ".sha256")


def _sha256_of_file(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks (a checkpoint may be larger than the memory to spare)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _damage(path: Path) -> str | None:
    """Why ``path`` is not an intact checkpoint, or ``None`` when it is.

    Checks, without unpickling and without reading the file into memory: the SHA-256 sidecar when present;
    otherwise the zip container that ``torch.save`` has written since torch 1.6 (central directory present, every
    member's CRC-32 matches its bytes), which catches truncation, 0-byte files and flipped bits in the stored data.
    """
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        sidecar = _sidecar(path)
        if sidecar.is_file():
            expected = sidecar.read_text().strip()
            actual = _sha256_of_file(path)
            if actual != expected:
                return f"SHA-256 {actual[:12]}… != recorded {expected[:12]}…"
    except OSError as exc:
        return f"unreadable: {exc}"
    try:
        with zipfile.ZipFile(path) as archive:  # testzip streams each member through its CRC check
            bad = archive.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError) as exc:
        return f"not a readable torch.save zip archive ({type(exc).__name__}: {exc})"
    if bad is not None:
        return f"CRC-32 mismatch in the archive member {bad!r}"
    return None


def verify_checkpoint(path: _PATH) -> None:
    """Raise :class:`CorruptCheckpointError` when the checkpoint at ``path`` is truncated or damaged.

    Args:
        path: a checkpoint file written by ``torch.save`` (Lightning's ``.ckpt``), with or without the
            ``<file>.sha256`` sidecar of :class:`VerifiedCheckpointIO`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CorruptCheckpointError: the file fails its checksum or its zip container is broken; the message names
            the file and the checkpoints beside it that do verify.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint file not found: {path}")
    reason = _damage(path)
    if reason is not None:
        raise CorruptCheckpointError(_explain(path, reason))


def verified_checkpoints(folder: _PATH, exclude: _PATH | None = None) -> list[Path]:
    """The ``*.ckpt`` files in ``folder`` that verify (see :func:`verify_checkpoint`), newest first.

    Args:
        folder: the directory to list.
        exclude: a file to leave out (the damaged one being reported).
    """
    skip = Path(exclude).resolve() if exclude is not None else None
    found = [p for p in Path(folder).glob("*.ckpt") if p.is_file() and p.resolve() != skip]
    return sorted((p for p in found if _damage(p) is None), key=lambda p: p.stat().st_mtime, reverse=True)


def _explain(path: Path, reason: str) -> str:
    intact = verified_checkpoints(path.parent, exclude=path)
    listing = ", ".join(str(p) for p in intact[:5]) if intact else f"none that verify in {path.parent}"
    return (
        f"checkpoint {path} is truncated or corrupted ({reason}, {path.stat().st_size} bytes). "
        f"Resume from an earlier checkpoint instead (newest first, each verified): {listing}"
    )


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
        sidecar = _sidecar(path)
        if self.verify and sidecar.exists():
            expected = sidecar.read_text().strip()
            actual = _sha256_of_file(path)  # streamed: the file is read twice, but never held in memory whole
            if actual != expected:
                reason = f"SHA-256 {actual[:12]}… != recorded {expected[:12]}…"
                raise CorruptCheckpointError(_explain(path, reason))
        try:
            return pl_load(path, map_location=map_location, weights_only=weights_only)
        except pickle.UnpicklingError as exc:
            if "weights only load failed" in str(exc).lower():
                raise  # an intact file holding non-tensor objects, refused by weights_only: not corruption
            raise CorruptCheckpointError(_explain(path, f"{type(exc).__name__}: {exc}")) from exc
        except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
            raise CorruptCheckpointError(_explain(path, f"{type(exc).__name__}: {exc}")) from exc

    def remove_checkpoint(self, path: _PATH) -> None:
        super().remove_checkpoint(path)
        _sidecar(path).unlink(missing_ok=True)
