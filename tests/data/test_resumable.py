"""ResumableBatchSampler + RNGStateCheckpoint: a run resumed mid-epoch equals the run that never stopped."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_tiger.callbacks import RNGStateCheckpoint
from lightning_tiger.data import ResumableBatchSampler
from tests.cli.tiny import TinyData, TinyRegression


class NoisyRegression(TinyRegression):
    """Adds input noise from the global generator, so resuming must restore RNG state too."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return super().training_step((x + 0.1 * torch.randn_like(x), y), batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.01)


class ResumableData(TinyData):
    def train_dataloader(self) -> DataLoader:
        sampler = ResumableBatchSampler(len(self.dataset), self.batch_size, seed=7).attach(self.trainer)
        return DataLoader(self.dataset, batch_sampler=sampler)


def test_order_depends_on_seed_and_epoch_only() -> None:
    a = list(ResumableBatchSampler(20, 4, seed=1))
    assert a == list(ResumableBatchSampler(20, 4, seed=1))
    assert a != list(ResumableBatchSampler(20, 4, seed=2))
    assert sorted(i for b in a for i in b) == list(range(20))
    s = ResumableBatchSampler(10, 4, seed=0, drop_last=False)
    assert len(s) == 3 and [len(b) for b in s] == [4, 4, 2]
    # two ranks split each global batch of 2 x 3 = 6 samples
    r0, r1 = (list(ResumableBatchSampler(12, 3, seed=0, rank=r, world_size=2)) for r in (0, 1))
    assert len(r0) == 2 and not {i for b in r0 for i in b} & {i for b in r1 for i in b}


@pytest.mark.parametrize("bad", [{"num_samples": 0}, {"batch_size": 0}])
def test_validation(bad: dict[str, int]) -> None:
    kwargs = {"num_samples": 4, "batch_size": 2, **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        ResumableBatchSampler(**kwargs)


def _fit(tmp_path: Path, max_steps: int, ckpt_path: str | None = None, every: int | None = None) -> NoisyRegression:
    L.seed_everything(0)
    model = NoisyRegression()
    callbacks: list = [RNGStateCheckpoint()]
    if every:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=every, save_top_k=-1))
    trainer = L.Trainer(
        default_root_dir=tmp_path, max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(model, ResumableData(batch_size=8), ckpt_path=ckpt_path)
    return model


def test_resume_mid_epoch_is_bit_for_bit(tmp_path: Path) -> None:
    reference = _fit(tmp_path / "ref", 13)  # 8 batches per epoch: resume inside the second epoch
    _fit(tmp_path / "a", 11, every=11)
    resumed = _fit(tmp_path / "b", 13, ckpt_path=str(tmp_path / "a" / "epoch=1-step=11.ckpt"))
    for p, q in zip(reference.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_without_rng_state_the_resume_differs(tmp_path: Path) -> None:
    """Guards the test above: the noise really matters, so dropping RNG restoration must break equality."""
    reference = _fit(tmp_path / "ref", 13)
    _fit(tmp_path / "a", 11, every=11)
    ckpt = torch.load(tmp_path / "a" / "epoch=1-step=11.ckpt", weights_only=False)
    ckpt["callbacks"] = {k: v for k, v in ckpt["callbacks"].items() if "RNGState" not in k}
    torch.save(ckpt, tmp_path / "no_rng.ckpt")
    torch.manual_seed(123)
    resumed = _fit(tmp_path / "b", 13, ckpt_path=str(tmp_path / "no_rng.ckpt"))
    assert any(not torch.equal(p, q) for p, q in zip(reference.parameters(), resumed.parameters()))
