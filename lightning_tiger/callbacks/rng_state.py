"""Save and restore every random number generator's state with the checkpoint, per rank.

Lightning checkpoints hold the model, optimizers, schedulers, loops and callbacks, but not the state of
``torch``'s, ``numpy``'s and Python's global generators. A run resumed from a checkpoint therefore draws
different noise (diffusion time steps, dropout masks, random positions) from the run that never stopped.
:class:`RNGStateCheckpoint` stores each rank's generator states and puts them back right before the first
training batch after the resume, i.e. after Lightning has rebuilt its dataloaders (a ``RandomSampler``
without its own generator draws its seed from the global generator when its iterator is created: use
:class:`~lightning_tiger.data.ResumableBatchSampler`, which owns its generator, for the data order).
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

__all__ = ["RNGStateCheckpoint"]


def _collect() -> dict[str, Any]:
    """Generator states as tensors and plain Python values, so checkpoints load with ``weights_only=True``."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [str(np_name), torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss),
                  float(np_gauss)],
        "python": [py_version, list(py_state), py_gauss],
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, state, py_gauss = states["python"]
    random.setstate((version, tuple(state), py_gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RNGStateCheckpoint(Callback):
    """Checkpoint the global RNG states (torch CPU/CUDA, numpy, Python) of every rank.

    Modules should draw validation/sampling noise from their own seeded generators so that validation does
    not advance the global generators between a checkpoint and the next training batch.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        states = _collect()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, states)  # every rank dumps the checkpoint; rank 0 writes it
            return {"per_rank": gathered}
        return {"per_rank": [states]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        per_rank = state_dict.get("per_rank") or []
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if rank < len(per_rank):
            self._pending = per_rank[rank]
        elif per_rank:
            raise RuntimeError(
                f"RNGStateCheckpoint: the checkpoint holds RNG states of {len(per_rank)} rank(s), but this is rank "
                f"{rank}; resume with the same number of processes, or drop the callback's state to re-seed."
            )

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is not None:
            _restore(self._pending)
            self._pending = None
