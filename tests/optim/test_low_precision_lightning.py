"""``Trainer(precision="bf16-true")`` with Tiger/Lion learns like ``32-true`` (stochastic rounding, the default).

A small regression (a GELU MLP fitted to a fixed random teacher), the same data and initial weights under both
precisions. Tiger's relative step (lr = 1e-3 of RMS(θ)) is below half a bf16 ulp (2**-9), so rounding to nearest
throws most updates away: that run is the control that shows the test can fail.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tiger.optim import Lion, Tiger, tiger_param_groups

STEPS = 150
pytestmark = pytest.mark.slow  # six short Trainer runs: ~25 s of CPU


class Regression(L.LightningModule):
    def __init__(self, optimizer: str, **opt_kw: Any) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
        self.optimizer_name = optimizer
        self.opt_kw = opt_kw

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x).float(), y.float())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "tiger":
            return Tiger(tiger_param_groups(self), lr=1e-3, seed=0, **self.opt_kw)
        return Lion(self.parameters(), lr=1e-4, seed=0, **self.opt_kw)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
    x = torch.randn(STEPS * 32, 16, generator=g)
    with torch.no_grad():
        return x, teacher(x)


def _final_mse(precision: str, optimizer: str, **opt_kw: Any) -> float:
    x, y = _data()
    module = Regression(optimizer, **opt_kw)
    trainer = L.Trainer(accelerator="cpu", precision=precision, max_steps=STEPS, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=32))
    if precision == "bf16-true":
        assert all(p.dtype == torch.bfloat16 for p in module.parameters())
    with torch.no_grad():  # evaluated in fp32 on the whole set: what the optimizer achieved
        return nn.functional.mse_loss(module.net.float()(x), y).item()


@pytest.mark.parametrize("optimizer", ["tiger", "lion"])
def test_bf16_true_learns_like_32_true(optimizer: str) -> None:
    fp32 = _final_mse("32-true", optimizer)
    bf16 = _final_mse("bf16-true", optimizer)
    nearest = _final_mse("bf16-true", optimizer, stochastic_rounding=False)
    assert bf16 <= 1.1 * fp32, (bf16, fp32)
    assert nearest >= 1.3 * fp32, (nearest, fp32)  # the control: round-to-nearest stalls
