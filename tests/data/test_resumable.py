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


# ------------------------------------------------------------------------------------------ ResumableLoader
def test_loader_state_resumes_mid_epoch_exactly_and_ranks_partition() -> None:
    from lightning_tiger.data import ResumableLoader

    data = torch.arange(40.0).unsqueeze(1)
    ref = ResumableLoader(data, 4, seed=3)
    reference = [b for _ in range(3) for b in ref]  # 3 epochs of 10 batches
    assert len(ref) == 10 and len(reference) == 30
    assert not torch.equal(reference[0], reference[10])  # a new permutation per epoch
    run = ResumableLoader(data, 4, seed=3)
    seen = list(run)
    it = iter(run)
    seen += [next(it) for _ in range(4)]  # 4 batches into epoch 1, then "checkpoint"
    resumed = ResumableLoader(data, 4, seed=3)
    resumed.load_state_dict(run.state_dict())
    seen += list(resumed) + list(resumed)
    assert len(seen) == 30 and all(torch.equal(a, b) for a, b in zip(seen, reference))
    # two processes take disjoint halves of every global batch of 2 x 4
    r0, r1 = (list(ResumableLoader(data, 4, seed=3, rank=r, world_size=2)) for r in (0, 1))
    assert len(r0) == len(r1) == 5
    for a, b in zip(r0, r1):
        assert not set(a.flatten().tolist()) & set(b.flatten().tolist())


class _Recorder(L.LightningModule):
    """Records every training batch (weights never change: lr 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch.clone())
        return self.layer(batch.flatten(1)[:, :1]).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("which", ["toy", "digits"])
def test_toy_and_digits_resume_mid_epoch_with_the_uninterrupted_batches(tmp_path: Path, which: str) -> None:
    from lightning_tiger.data import DigitsDataModule, ToyDataModule

    def make() -> L.LightningDataModule:
        return ToyDataModule("moons", num_train=80, num_val=10, batch_size=16, seed=4) if which == "toy" \
            else DigitsDataModule(batch_size=256, seed=4)

    def fit(root: Path, max_steps: int, ckpt: str | None = None, every: int | None = None) -> list[torch.Tensor]:
        module = _Recorder()
        callbacks = [ModelCheckpoint(dirpath=root, every_n_train_steps=every, save_top_k=-1)] if every else []
        trainer = L.Trainer(default_root_dir=root, max_steps=max_steps, accelerator="cpu", logger=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            num_sanity_val_steps=0, callbacks=callbacks, enable_checkpointing=bool(every))
        trainer.fit(module, datamodule=make(), ckpt_path=ckpt)
        return module.seen

    per_epoch = len(make().train_dataloader())
    total, stop = 2 * per_epoch + 2, per_epoch + 2  # stop inside the second epoch
    reference = fit(tmp_path / "ref", total)
    first = fit(tmp_path / "a", stop, every=stop)
    ckpt = next((tmp_path / "a").glob("*.ckpt"))
    rest = fit(tmp_path / "b", total, ckpt=str(ckpt))
    assert len(first) + len(rest) == len(reference) == total
    assert all(torch.equal(a, b) for a, b in zip(first + rest, reference))
