"""Worker for the 2-process gloo tests of the metric states (picklable, importable by spawn)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def metric_worker(rank: int, world: int, port: int, out_path: str) -> None:
    from lightning_tiger.metrics import MMD, FrechetDistance, SlicedWassersteinDistance, WassersteinDistance

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(2 * 40, 3, generator=gen)
    y = torch.randn(2 * 40, 3, generator=gen) + 0.5
    mine = slice(rank * 40, (rank + 1) * 40)
    out = {}
    for name, metric in (
        ("w2", WassersteinDistance()),
        ("sw2", SlicedWassersteinDistance(num_projections=32)),
        ("mmd", MMD(bandwidths=1.0)),
        ("fd", FrechetDistance()),
    ):
        metric.update(x[mine], y[mine])
        out[name] = float(metric.compute())
    if rank == 0:
        torch.save(out, out_path)
    dist.barrier()
    dist.destroy_process_group()
