"""InMemoryDataModule: the serving part shared by ToyDataModule and DigitsDataModule."""

from __future__ import annotations

import pytest
import torch

from lightning_tiger.data import InMemoryDataModule, ResumableLoader


class Ramp(InMemoryDataModule):
    data_shape = (3,)

    def setup(self, stage: str | None = None) -> None:
        if self._train is None:
            self._train = torch.arange(60.0).view(20, 3)
            self._val = -torch.arange(15.0).view(5, 3)


def test_serves_its_tensors_in_resumable_shuffled_batches() -> None:
    dm = Ramp(batch_size=4, seed=1, num_workers=0)
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableLoader) and loader is dm.train_dataloader()  # one cursor per module
    epoch = list(loader)
    assert len(epoch) == 5 and all(b.shape == (4, 3) for b in epoch)
    rows = torch.cat(epoch)
    assert sorted(rows[:, 0].tolist()) == list(range(0, 60, 3))  # every sample once
    assert not torch.equal(rows, torch.arange(60.0).view(20, 3))  # shuffled
    assert torch.equal(torch.cat(list(dm.val_dataloader())), dm.val_reference())
    ref = dm.val_reference()
    ref += 1  # a copy: the module's reference is unchanged
    assert torch.equal(dm.val_reference(), -torch.arange(15.0).view(5, 3))


def test_base_setup_must_be_overridden() -> None:
    with pytest.raises(NotImplementedError, match="subclasses"):
        InMemoryDataModule(batch_size=2, seed=0, num_workers=0).train_dataloader()
