"""scikit-learn's 8×8 digits (1797 images, shipped inside the sklearn wheel) as a LightningDataModule."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lightning_tiger.data.in_memory import InMemoryDataModule
from lightning_tiger.validation import check_int, check_real


def load_digits_images() -> Tensor:
    """All 1797 digits as float32 ``[1797, 1, 8, 8]`` scaled from sklearn's 0..16 to [-1, 1]."""
    from sklearn.datasets import load_digits

    images = np.asarray(load_digits().images, dtype=np.float32)  # [1797, 8, 8], values 0..16
    return torch.from_numpy(images / 8.0 - 1.0).unsqueeze(1)


class DigitsDataModule(InMemoryDataModule):
    """``sklearn.datasets.load_digits`` images ``[1, 8, 8]`` in [-1, 1], split by a seeded permutation.

    Batches are plain tensors ``[batch, 1, 8, 8]``. A Fréchet distance on raw 64-d pixels separates the
    two halves (≈ 0.1) from uniform noise (≈ 9.85), which makes the held-out half a usable reference.

    Args:
        batch_size: default 128 (train batches drop the last incomplete batch).
        val_fraction: share of images held out for validation / :meth:`val_reference`, in (0, 1); default 0.5.
        seed: seed of the split permutation and of the train shuffling (default 0).
        num_workers: DataLoader workers (default 0).
    """

    def __init__(self, batch_size: int = 128, val_fraction: float = 0.5, seed: int = 0,
                 num_workers: int = 0) -> None:
        super().__init__(batch_size, seed, num_workers)
        check_int("batch_size", batch_size, low=1)
        check_real("val_fraction", val_fraction, low=0.0, high=1.0, low_open=True, high_open=True)
        check_int("seed", seed)
        check_int("num_workers", num_workers, low=0)
        self.save_hyperparameters()
        self.val_fraction = val_fraction
        self.data_shape: tuple[int, ...] = (1, 8, 8)

    def setup(self, stage: str | None = None) -> None:
        if self._train is not None:
            return
        images = load_digits_images()
        perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(self.seed))
        num_val = round(self.val_fraction * images.shape[0])
        num_val = min(max(num_val, 1), images.shape[0] - 1)
        self._val = images[perm[:num_val]].contiguous()
        self._train = images[perm[num_val:]].contiguous()

