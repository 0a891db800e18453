"""Checkpoints users write the ordinary way resume the ordinary way (``trainer.fit(ckpt_path=...)``, Lightning's
default ``weights_only``), and a checkpoint that is intact is never reported as corrupt."""

from __future__ import annotations

import warnings
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_tiger.data import sample_toy
from lightning_tiger.optim import Tiger
from lightning_tiger.plugins import CorruptCheckpointError, VerifiedCheckpointIO
from tests.reliability._faults import loader


def _fit(module: L.LightningModule, tmp_path: Path, steps: int, ckpt_path: str | None = None) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, num_sanity_val_steps=0, limit_val_batches=0, plugins=[VerifiedCheckpointIO()],
        callbacks=[ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=2, save_top_k=-1)],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = [sample_toy("moons", 16, generator=torch.Generator().manual_seed(i)) for i in range(4)]
        trainer.fit(module, train_dataloaders=loader(batches), ckpt_path=ckpt_path)
    return trainer


class Custom:
    """A user object stored in a checkpoint (weights_only loading refuses it)."""


@pytest.mark.parametrize("name", ["RectifiedFlowModule", "ScoreMatchingModule"])
def test_diffusion_module_with_custom_net_resumes(name: str, tmp_path: Path) -> None:
    """A module built in Python with its own ``net`` (the documented way) must resume with the defaults.

    Found by the kill-and-resume test: RectifiedFlowModule keeps ``net`` (an nn.Module) in its hparams, so the
    checkpoint pickles a TimeMLP and Lightning's default ``weights_only=True`` resume refuses it.
    """
    import lightning_tiger.modules as mods
    from lightning_tiger.nn import TimeMLP

    def build() -> Any:
        return getattr(mods, name)(net=TimeMLP(data_dim=2, hidden_dim=16, depth=1, time_dim=8),
                                     optimizer=partial(Tiger, lr=0.01))

    _fit(build(), tmp_path, 2)
    _fit(build(), tmp_path, 4, ckpt_path=str(tmp_path / "step=2.ckpt"))


def test_intact_checkpoint_refused_by_weights_only_is_not_called_corrupt(tmp_path: Path) -> None:
    """A weights_only refusal (an intact file holding a custom class) must not read "truncated or corrupted":
    users would throw away a good checkpoint. Either it loads, or the error says what really happened."""
    path = tmp_path / "custom.ckpt"
    io = VerifiedCheckpointIO()
    io.save_checkpoint({"state_dict": {}, "obj": Custom()}, path)
    try:
        io.load_checkpoint(path, weights_only=True)
    except CorruptCheckpointError as exc:
        pytest.fail(f"an intact checkpoint was reported as corrupt: {str(exc)[:300]}")
    except Exception as exc:
        assert "weights_only" in str(exc), exc
