"""A batch sampler whose order depends only on (seed, epoch) and that resumes mid-epoch.

Lightning restores model, optimizer and loop counters from a checkpoint, but a plain shuffled
``DataLoader`` restarts its epoch with a new random order, so a resumed run trains on different batches
than the run that never stopped (Lightning warns about it). :class:`ResumableBatchSampler` draws the
permutation of epoch ``e`` from its own generator seeded with ``(seed, e)`` and, when the Trainer resumes
mid-epoch, skips the batches the restored loop has already completed. Under DDP each rank takes a strided
share of every global batch (like ``DistributedSampler``), so the global batch is the same for any world size
that divides ``batch_size * world_size``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch.utils.data import Sampler

if TYPE_CHECKING:
    import lightning as L

__all__ = ["ResumableBatchSampler"]


class ResumableBatchSampler(Sampler[list[int]]):
    """Shuffled (or sequential) batches, deterministic by ``(seed, epoch)``, resumable mid-epoch.

    Args:
        num_samples: dataset length.
        batch_size: samples per batch *per process*.
        seed: base seed of the permutations.
        shuffle: draw a new permutation every epoch (else sequential order).
        drop_last: drop the last incomplete batch.
        trainer: the Trainer whose ``current_epoch`` and restored batch progress drive the order; attach it
            later with :meth:`attach` (data modules do it in ``train_dataloader``).
        rank: this process's rank; ``world_size``: number of processes (default: from ``trainer``).
        world_size: see ``rank``.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        trainer: L.Trainer | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size is not None and world_size < 1:
            raise ValueError(f"world_size must be >= 1 or None, got {world_size}")
        if rank is not None and (rank < 0 or (world_size is not None and rank >= world_size)):
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.trainer, self._rank, self._world_size = trainer, rank, world_size
        self.epoch = 0

    def attach(self, trainer: L.Trainer) -> ResumableBatchSampler:
        """Follow ``trainer``'s epoch and resume position. Returns ``self``."""
        self.trainer = trainer
        return self

    @property
    def rank(self) -> int:
        return self._rank if self._rank is not None else (self.trainer.global_rank if self.trainer else 0)

    @property
    def world_size(self) -> int:
        return self._world_size if self._world_size is not None else (self.trainer.world_size if self.trainer else 1)

    def _global_batch(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self._global_batch())
        return full if self.drop_last or rest == 0 else full + 1

    def _skip(self) -> int:
        """Batches of this epoch already completed by the restored fit loop (0 on a fresh epoch)."""
        if self.trainer is None:
            return 0
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return int(progress.completed)

    def __iter__(self) -> Iterator[list[int]]:
        if self.trainer is not None:
            self.epoch = self.trainer.current_epoch
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        g, rank, world = self._global_batch(), self.rank, self.world_size
        for b in range(self._skip(), len(self)):
            chunk = order[b * g : (b + 1) * g]
            yield chunk[rank::world].tolist()
