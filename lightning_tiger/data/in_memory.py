"""Base of the data modules whose training and validation sets are tensors held in memory."""

from __future__ import annotations

import lightning.pytorch as pl
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_tiger.data.resumable import ResumableLoader

__all__ = ["InMemoryDataModule"]


class InMemoryDataModule(pl.LightningDataModule):
    """Training / validation tensors in memory, a resumable training order and a held-out reference.

    Subclasses set :attr:`data_shape` and fill ``self._train`` and ``self._val`` (``[n, *data_shape]``) in
    :meth:`setup`; this class serves them. Training batches are plain tensors ``[batch_size, *data_shape]``,
    shuffled deterministically by ``(seed, epoch)`` and resumable mid-epoch (:class:`ResumableLoader`: the
    position is saved in Lightning checkpoints; under DDP every process takes ``batch_size`` samples of each
    global batch; the last incomplete global batch is dropped). Validation batches are in order.

    Args:
        batch_size: samples per batch (per process), >= 1.
        seed: seed of the data and of the training order.
        num_workers: ``DataLoader`` workers.
    """

    data_shape: tuple[int, ...] = ()

    def __init__(self, batch_size: int, seed: int, num_workers: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self._train: Tensor | None = None
        self._val: Tensor | None = None
        self._train_loader: ResumableLoader | None = None

    def setup(self, stage: str | None = None) -> None:
        raise NotImplementedError("subclasses fill self._train and self._val")

    def train_dataloader(self) -> ResumableLoader:
        """Shuffled training batches ``[batch_size, *data_shape]``, deterministic by ``(seed, epoch)``."""
        self.setup()
        assert self._train is not None
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        loader = self._train_loader
        if loader is None or (loader.rank, loader.world_size) != (rank, world):
            loader = self._train_loader = ResumableLoader(
                self._train, batch_size=min(self.batch_size, len(self._train) // world), seed=self.seed,
                rank=rank, world_size=world, num_workers=self.num_workers,
            )
        return loader

    def val_dataloader(self) -> DataLoader:
        """Validation batches ``[≤ batch_size, *data_shape]``, in order."""
        self.setup()
        return DataLoader(self._val, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    def val_reference(self) -> Tensor:
        """The held-out samples ``[num_val, *data_shape]`` (a copy; the same on every call)."""
        self.setup()
        assert self._val is not None
        return self._val.clone()
