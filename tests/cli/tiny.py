"""A tiny LightningModule / DataModule pair importable by class_path from CLI tests."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset


class TinyRegression(L.LightningModule):
    """Linear regression on a fixed random problem.

    Args:
        hidden: hidden width.
        lr: learning rate of the fallback optimizer (the CLI's ``--optimizer`` replaces it).
    """

    def __init__(self, hidden: int = 8, lr: float = 0.01) -> None:
        super().__init__()
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, hidden), torch.nn.LayerNorm(hidden), torch.nn.Linear(hidden, 1)
        )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val/loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class TinyData(L.LightningDataModule):
    """64 samples of y = x·w + noise.

    Args:
        batch_size: samples per batch.
    """

    def __init__(self, batch_size: int = 8) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 4, generator=g)
        self.dataset = TensorDataset(x, x @ torch.randn(4, 1, generator=g) + 0.01 * torch.randn(64, 1, generator=g))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size)


class InterruptAt(L.Callback):
    """Raises KeyboardInterrupt after optimizer step ``step``, as Ctrl-C would.

    Args:
        step: the global step after which to interrupt.
    """

    def __init__(self, step: int = 3) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt
