"""scikit-learn's 8×8 digits (1797 images, shipped inside the sklearn wheel) as a LightningDataModule."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_tiger.data.resumable import ResumableLoader


def load_digits_images() -> Tensor:
    """All 1797 digits as float32 ``[1797, 1, 8, 8]`` scaled from sklearn's 0..16 to [-1, 1]."""
    from sklearn.datasets import load_digits

    images = np.asarray(load_digits().images, dtype=np.float32)  # [1797, 8, 8], values 0..16
    return torch.from_numpy(images / 8.0 - 1.0).unsqueeze(1)


class DigitsDataModule(pl.LightningDataModule):
    """``sklearn.datasets.load_digits`` images ``[1, 8, 8]`` in [-1, 1], split by a seeded permutation.

    Batches are plain tensors ``[batch, 1, 8, 8]``. SPEC §6: a Fréchet distance on raw 64-d pixels separates the
    two halves (≈ 0.1) from uniform noise (≈ 9.85), which makes the held-out half a usable reference.

    Args:
        batch_size: default 128 (train batches drop the last incomplete batch).
        val_fraction: share of images held out for validation / :meth:`val_reference`, in (0, 1); default 0.5.
        seed: seed of the split permutation and of the train shuffling (default 0).
        num_workers: DataLoader workers (default 0).
    """

    def __init__(self, batch_size: int = 128, val_fraction: float = 0.5, seed: int = 0,
                 num_workers: int = 0) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.data_shape: tuple[int, ...] = (1, 8, 8)
        self._train: Tensor | None = None
        self._train_loader: ResumableLoader | None = None
        self._val: Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        if self._train is not None:
            return
        images = load_digits_images()
        perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(self.seed))
        num_val = round(self.val_fraction * images.shape[0])
        num_val = min(max(num_val, 1), images.shape[0] - 1)
        self._val = images[perm[:num_val]].contiguous()
        self._train = images[perm[num_val:]].contiguous()

    def train_dataloader(self) -> ResumableLoader:
        """Shuffled training batches, deterministic by ``(seed, epoch)`` and resumable mid-epoch: the loader's
        position is saved in Lightning checkpoints (:class:`~lightning_tiger.data.ResumableLoader`); under DDP
        every process takes ``batch_size`` samples of each global batch."""
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
        self.setup()
        return DataLoader(self._val, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    def val_reference(self) -> Tensor:
        """The held-out images ``[num_val, 1, 8, 8]`` (deterministic from ``seed``)."""
        self.setup()
        assert self._val is not None
        return self._val.clone()
