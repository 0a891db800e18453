"""``TightFistedDDPStrategy`` from Lightning: 2 processes (gloo, spawned) with ``accumulate_grad_batches=k`` equal
one process on the global batch, communicate one flags table + one momentum bucket per optimizer step (counted
by wrapping ``torch.distributed.all_reduce`` in each rank), and refuse what cannot work, naming the setting.

Tolerances as in ``test_tight_fisted_ddp.py``: Tiger moves each element by ±η, so a momentum within rounding of 0
can take the other sign: >= 99% of the elements within 1e-6, every element within 2·η_max·steps; the ranks'
parameters bit-identical.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader, TensorDataset

from lightning_tiger.data import ResumableBatchSampler
from lightning_tiger.optim import Tiger
from lightning_tiger.plugins import TightFistedDDPStrategy
from tests.cli.tiny import TinyRegression

pytestmark = pytest.mark.distributed

K, STEPS, PER_RANK = 4, 3, 4  # micro-batches per optimizer step, optimizer steps, rows per rank and micro-batch
LR = 0.01


def _dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(K * STEPS * 2 * PER_RANK, 4, generator=g)
    return TensorDataset(x, x @ torch.randn(4, 1, generator=g))


class TightRegression(TinyRegression):
    """TinyRegression (Linear, LayerNorm, Linear) trained by tight-fisted Tiger on a fixed, unshuffled dataset."""

    def __init__(self, optimizer: str = "tiger_fold") -> None:
        super().__init__(hidden=16)
        self.optimizer_name = optimizer

    def train_dataloader(self) -> DataLoader:
        # each rank gets a strided half of every global micro-batch (2·PER_RANK rows), one process all of it
        ds = _dataset()
        per_rank = 2 * PER_RANK // self.trainer.world_size
        return DataLoader(ds, batch_sampler=ResumableBatchSampler(len(ds), per_rank, seed=1).attach(self.trainer))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=LR)
        return Tiger(self.parameters(), lr=LR, fold_in_backward=self.optimizer_name == "tiger_fold", seed=5)


class CountAndSave(L.Callback):
    """Counts this rank's all_reduce calls per optimizer step (inside training batches only) and saves the result."""

    def __init__(self, out: Path) -> None:
        self.out, self.windows, self.current = out, [], []
        self._orig = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._orig = orig = dist.all_reduce

        def counting(tensor: torch.Tensor, *args: Any, **kw: Any) -> Any:
            self.current.append((tensor.dtype, tensor.numel()))
            return orig(tensor, *args, **kw)

        dist.all_reduce = counting

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if (batch_idx + 1) % K == 0:
            self.windows.append(self.current)
            self.current = []
        assert all(p.grad is None for p in pl_module.parameters())  # folded and freed

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dist.all_reduce = self._orig
        opt = trainer.optimizers[0]
        torch.save({"params": {k: v.detach().clone() for k, v in pl_module.named_parameters()},
                    "moms": {k: opt.state[p]["momentum"].clone() for k, p in pl_module.named_parameters()},
                    "windows": self.windows, "numel": sum(p.numel() for p in pl_module.parameters())},
                   self.out / f"rank{trainer.global_rank}_of{trainer.world_size}.pt")


def _trainer(root: Path, strategy: Any, devices: int, **kw: Any) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=STEPS, logger=False,
                     accumulate_grad_batches=K, enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False, default_root_dir=root, num_sanity_val_steps=0,
                     limit_val_batches=0, use_distributed_sampler=False, **kw)


@pytest.fixture
def no_process_group() -> Iterator[None]:
    """A one-process DDP run leaves a process group behind: destroy it so that later tests run without one."""
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def _load(out: Path, rank: int, world: int) -> dict[str, Any]:
    return torch.load(out / f"rank{rank}_of{world}.pt", weights_only=False)


@pytest.mark.slow
def test_two_processes_equal_one_on_global_batch_with_one_reduction_per_step(tmp_path: Path,
                                                                             no_process_group: None) -> None:
    torch.manual_seed(0)
    _trainer(tmp_path, TightFistedDDPStrategy(start_method="spawn"), 2,
             callbacks=[CountAndSave(tmp_path)]).fit(TightRegression())
    r0, r1 = _load(tmp_path, 0, 2), _load(tmp_path, 1, 2)
    for what in ("params", "moms"):
        for k, v in r0[what].items():
            assert torch.equal(v, r1[what][k]), f"ranks diverged on {what} {k}"
    torch.manual_seed(0)
    _trainer(tmp_path, "auto", 1, callbacks=[CountAndSave(tmp_path)]).fit(TightRegression())
    single = _load(tmp_path, 0, 1)
    diffs = torch.cat([(r0["params"][k] - v).abs().flatten() for k, v in single["params"].items()])
    assert (diffs <= 1e-6).float().mean().item() >= 0.99, diffs.max()
    assert diffs.max().item() <= 2 * LR * 1.0 * STEPS
    for k, m in single["moms"].items():
        torch.testing.assert_close(r0["moms"][k], m, rtol=1e-5, atol=1e-7)
    # per optimizer step of K micro-batches: one int64 flags table (6 tensors + 1 row, 5 columns) and ONE float32
    # bucket of all momenta; no gradient reduction at all (DDP would do one per bucket per synced micro-batch)
    assert len(r0["windows"]) == STEPS
    for rank in (r0, r1):
        for calls in rank["windows"]:
            assert calls == [(torch.int64, 7 * 5), (torch.float32, rank["numel"])], calls
    assert single["windows"] == [[]] * STEPS  # one process: nothing to communicate


@pytest.mark.parametrize(("kwargs", "optimizer", "match"), [
    ({"gradient_clip_val": 1.0}, "tiger_fold", "gradient_clip_val must be None or 0"),
    # Trainer(precision="16-mixed") becomes bf16-mixed on CPU: the plugin with its GradScaler, explicitly
    ({"plugins": [MixedPrecision("16-mixed", "cpu")]}, "tiger_fold", "precision='16-mixed' uses a GradScaler"),
    ({}, "adamw", "optimizer 0 is AdamW"),
    ({}, "tiger", r"optimizer 0 is Tiger\(fold_in_backward=False\)"),
])
def test_refusals_name_the_setting(kwargs: dict[str, Any], optimizer: str, match: str, tmp_path: Path,
                                   no_process_group: None) -> None:
    trainer = _trainer(tmp_path, TightFistedDDPStrategy(), 1, **kwargs)
    with pytest.raises(ValueError, match=match):
        trainer.fit(TightRegression(optimizer))


def test_ddp_wrapper_options_are_refused() -> None:
    with pytest.raises(TypeError, match="find_unused_parameters"):
        TightFistedDDPStrategy(find_unused_parameters=True)
    with pytest.raises(ValueError, match="bucket_cap_mb"):
        TightFistedDDPStrategy(bucket_cap_mb=0)


def test_cli_profile_instantiates_the_strategy(tmp_path: Path, no_process_group: None) -> None:
    """examples/configs/trainer/ddp_tight.yaml through the CLI (one CPU process): LightningCLI fills in every
    argument of the strategy's signature, so it must list only DDPStrategy's own (not DistributedDataParallel's)."""
    from lightning_tiger.cli import main

    configs = Path(__file__).resolve().parents[2] / "examples" / "configs"
    cli = main(["fit", "--config", str(configs / "flow" / "moons.yaml"),
                "--config", str(configs / "optim" / "tiger.yaml"),
                "--config", str(configs / "trainer" / "ddp_tight.yaml"), "--trainer.accelerator=cpu",
                "--trainer.devices=1", "--trainer.max_steps=2", "--trainer.precision=32-true",
                "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
                f"--trainer.default_root_dir={tmp_path}"])
    assert isinstance(cli.trainer.strategy, TightFistedDDPStrategy)
    opt = cli.trainer.optimizers[0]
    assert isinstance(opt, Tiger) and opt.fold_in_backward and cli.trainer.global_step == 2
