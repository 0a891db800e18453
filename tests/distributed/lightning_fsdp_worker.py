"""Worker of ``test_lightning_fsdp.py``: Tiger/Lion through Lightning's ``ModelParallelStrategy`` (FSDP2) with 2 CPU
processes (gloo), and the same LightningModule in one process.

Usage: ``python lightning_fsdp_worker.py OUT MODE OPTIMIZER [CKPT]`` with MODE one of

- ``fsdp2``: ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` on 2 CPU processes (Lightning
  starts the second one by running this script again), ``STEPS`` steps, a sharded checkpoint (Lightning's
  distributed checkpoint: a folder) saved after ``STEPS // 2`` steps (mid-epoch); then rank 0 runs the same
  module in one process (a plain loop) into ``OUT/single.pt``;
- ``resume``: as ``fsdp2``, resumed from CKPT.

Both ranks read the same batches (``use_distributed_sampler=False``, a ``ResumableBatchSampler`` of world size 1),
so FSDP2's averaged gradient equals the single process's bit for bit and differences come from the optimizer only.
Rank 0 writes ``OUT/MODE.pt`` (full parameters) at the end of training.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tiger.data import ResumableBatchSampler

STEPS = 20


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.norm = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc1(self.norm(self.emb(tokens)).mean(dim=1))))


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(5)
    return TensorDataset(torch.randint(0, 11, (STEPS * 6, 5), generator=g), torch.randn(STEPS * 6, 3, generator=g))


def single_process_run(optimizer: str, out: Path) -> None:
    """The same module, optimizer and batches in one process, as a plain PyTorch loop (what Lightning's automatic
    optimization does on one device: training_step, backward, step, zero_grad)."""
    torch.manual_seed(0)
    module = Module(optimizer)
    opt = module.configure_optimizers()
    for i, batch in enumerate(DataLoader(dataset(), batch_size=6)):
        if i == STEPS:
            break
        module.training_step(batch, i).backward()
        opt.step()
        opt.zero_grad()
    torch.save({n: p.detach().clone() for n, p in module.named_parameters()}, out / "single.pt")


class Module(L.LightningModule):
    def __init__(self, optimizer: str) -> None:
        super().__init__()
        self.optimizer_name = optimizer
        self.net = Net()

    def configure_model(self) -> None:
        if self.device_mesh is None:  # one process: nothing to shard
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for m in (self.net.emb, self.net.norm, self.net.fc1, self.net.head):
            fully_shard(m, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def train_dataloader(self) -> DataLoader:
        ds = dataset()
        # rank=0, world_size=1: every rank reads the same batches; resumable: a mid-epoch resume skips the batches
        # the restored loop already completed (a plain DataLoader would restart the epoch)
        sampler = ResumableBatchSampler(len(ds), 6, shuffle=False, rank=0, world_size=1).attach(self.trainer)
        return DataLoader(ds, batch_sampler=sampler)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        from lightning_tiger.optim import Lion, Tiger, tiger_param_groups

        if self.optimizer_name == "Lion":
            return Lion(self.parameters(), lr=3e-3, weight_decay=0.1, seed=3)
        return Tiger(tiger_param_groups(self), lr=0.02, beta=0.9, seed=3)

    def on_train_end(self) -> None:
        params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                  for n, p in self.named_parameters()}  # full_tensor: a collective, on every rank
        if self.trainer.global_rank == 0:
            torch.save(params, Path(sys.argv[1]) / f"{sys.argv[2]}.pt")


def main() -> None:
    out, mode, optimizer = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    torch.manual_seed(0)
    torch.set_num_threads(1)
    module = Module(optimizer)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        callbacks=[ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=STEPS // 2, save_top_k=-1)],
        max_steps=STEPS, use_distributed_sampler=False, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=out, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, ckpt_path=sys.argv[4] if mode == "resume" else None)
    if mode == "fsdp2" and trainer.global_rank == 0:
        single_process_run(optimizer, out)


if __name__ == "__main__":
    main()
