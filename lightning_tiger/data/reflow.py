"""Reflow pairs (Z_0, Z_1) from a trained rectified flow, as a LightningDataModule (SPEC §5).

The k-th rectified flow is trained on the coupling produced by the (k−1)-th: draw Z_0 from the source,
integrate the teacher to Z_1, train a new flow on (Z_0, Z_1). The same pairs fit the one-step distilled
generator. Pairs are generated in batches with a progress bar, either

- stored: generated once (or read back from ``path`` when its shards match the requested setup) and served
  as a shuffled in-memory dataset (the paper's workflow); or
- online: regenerated for every batch from a frozen copy of the teacher (no disk, fresh pairs each epoch, at
  the cost of ``steps`` teacher evaluations per batch).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

__all__ = ["ReflowPairsDataModule", "read_pair_shards", "write_pair_shards"]


def write_pair_shards(
    path: str | os.PathLike[str], z0s: Sequence[Tensor], z1s: Sequence[Tensor], meta: dict[str, Any]
) -> None:
    """Write pairs as ``pairs_00000.pt`` … (``{"z0": [b, *shape], "z1": [b, *shape]}``) plus ``meta.pt``.

    Old shards in the folder are removed first, so a folder never mixes two generations.
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob("pairs_*.pt"):
        old.unlink()
    for i, (z0, z1) in enumerate(zip(z0s, z1s)):
        torch.save({"z0": z0.contiguous(), "z1": z1.contiguous()}, root / f"pairs_{i:05d}.pt")
    # meta is written last: its presence marks a complete set of shards.
    torch.save({**meta, "num_shards": len(z0s)}, root / "meta.pt")


def read_pair_shards(path: str | os.PathLike[str]) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Read the shards written by :func:`write_pair_shards`: ``(z0 [n, *shape], z1 [n, *shape], meta)``."""
    root = Path(path)
    meta_file = root / "meta.pt"
    if not meta_file.exists():
        raise FileNotFoundError(f"no complete reflow pairs in {root} (meta.pt missing)")
    meta = torch.load(meta_file, weights_only=True)
    shards = [torch.load(root / f"pairs_{i:05d}.pt", weights_only=True) for i in range(meta["num_shards"])]
    return torch.cat([s["z0"] for s in shards]), torch.cat([s["z1"] for s in shards]), meta


class _OnlinePairs(IterableDataset):
    """Endless-per-epoch stream of freshly integrated pair batches from a frozen teacher."""

    def __init__(self, teacher: Any, batch_size: int, num_batches: int, steps: int, solver: str, seed: int) -> None:
        self.teacher, self.batch_size, self.num_batches = teacher, batch_size, num_batches
        self.steps, self.solver, self.seed = steps, solver, seed
        self.epoch = 0

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        # A new seed per epoch: fresh pairs each pass, still reproducible from (seed, epoch).
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        for _ in range(self.num_batches):
            z0 = self.teacher.sample_source(self.batch_size, gen)
            z1 = self.teacher.sample(self.batch_size, steps=self.steps, solver=self.solver, z0=z0)
            yield z0, z1.float().cpu()


class ReflowPairsDataModule(pl.LightningDataModule):
    """Pairs ``(z0, z1)`` of a trained :class:`~lightning_tiger.modules.RectifiedFlowModule` (the teacher).

    Train batches are tuples ``(z0 [b, *shape], z1 [b, *shape])``; validation batches are held-out pairs
    (seed + 1) so the reflow / distillation loss has a validation curve. :meth:`val_reference` returns the
    real data's reference sample when ``data`` is given (what W2 should be measured against), else the
    held-out teacher outputs.

    Args:
        teacher_ckpt: checkpoint of the previous stage (required unless ``path`` already holds pairs).
        teacher_net: the teacher's network architecture when its module was built in Python with its own net
            (see :func:`~lightning_tiger.modules.load_rectified_flow`); not needed for CLI checkpoints.
        data: the original data module (e.g. ``ToyDataModule``), used only for :meth:`val_reference`.
        num_pairs: training pairs (default 20000; stored mode) or pairs per epoch (online mode).
        num_val_pairs: held-out pairs for the validation loss (default 1000).
        steps: teacher solver steps (default 100, Euler).
        solver: ``"euler"`` | ``"heun"`` | ``"adaptive"``.
        batch_size: training batch size (default 256).
        generate_batch_size: pairs integrated at once while generating (default 2000).
        path: folder for the ``.pt`` shards; reused when it holds pairs with the same ``num_pairs``,
            ``steps`` and ``solver``, generated and written otherwise. ``None``: keep in memory only.
        online: regenerate pairs for every batch from the frozen teacher instead of storing them.
        seed: seed of the source draws (default 0).
        progress: tqdm progress bar while generating (default True).
    """

    def __init__(
        self,
        teacher_ckpt: str | None = None,
        teacher_net: nn.Module | None = None,
        data: pl.LightningDataModule | None = None,
        num_pairs: int = 20000,
        num_val_pairs: int = 1000,
        steps: int = 100,
        solver: str = "euler",
        batch_size: int = 256,
        generate_batch_size: int = 2000,
        path: str | None = None,
        online: bool = False,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("num_pairs", num_pairs, 1),
            ("num_val_pairs", num_val_pairs, 2),
            ("steps", steps, 1),
            ("batch_size", batch_size, 1),
            ("generate_batch_size", generate_batch_size, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if solver not in ("euler", "heun", "adaptive"):
            raise ValueError(f"solver must be one of 'euler', 'heun', 'adaptive', got {solver!r}")
        if teacher_ckpt is None and (path is None or online):
            raise ValueError("teacher_ckpt is required unless path points at stored pairs (and online=False)")
        self.save_hyperparameters(ignore=["data"])
        self.teacher_ckpt = teacher_ckpt
        self.teacher_net = teacher_net
        self.data = data
        self.num_pairs, self.num_val_pairs = num_pairs, num_val_pairs
        self.steps, self.solver = steps, solver
        self.batch_size, self.generate_batch_size = batch_size, generate_batch_size
        self.path, self.online, self.seed, self.progress = path, online, seed, progress
        self.teacher: Any = None
        self.source_pool: Tensor | None = None
        self.data_shape: tuple[int, ...] | None = None
        self._train: tuple[Tensor, Tensor] | None = None
        self._val: tuple[Tensor, Tensor] | None = None

    # ------------------------------------------------------------------ generation
    def _load_teacher(self) -> Any:
        if self.teacher is None:
            if self.teacher_ckpt is None:
                raise ValueError("teacher_ckpt is needed to generate pairs")
            from lightning_tiger.modules.rectified_flow import load_rectified_flow

            self.teacher = load_rectified_flow(self.teacher_ckpt, frozen=True, net=self.teacher_net)
            self.source_pool = self.teacher.source_pool
            self.data_shape = self.teacher.data_shape
        return self.teacher

    def _generate(self, n: int, seed: int, path: str | None) -> tuple[Tensor, Tensor]:
        teacher = self._load_teacher()
        return teacher.generate_pairs(
            n, self.steps, self.generate_batch_size, path, solver=self.solver,
            generator=torch.Generator().manual_seed(seed), progress=self.progress,
        )

    def _stored_pairs(self) -> tuple[Tensor, Tensor]:
        if self.path is not None and (Path(self.path) / "meta.pt").exists():
            z0, z1, meta = read_pair_shards(self.path)
            wanted = {"n": self.num_pairs, "steps": self.steps, "solver": self.solver}
            if all(meta.get(k) == v for k, v in wanted.items()):
                return z0, z1
        trainer = self.trainer
        distributed = trainer is not None and trainer.world_size > 1 and self.path is not None
        if distributed:
            # Rank 0 writes the shards, the other ranks wait and read them: one generation, identical data.
            if trainer.global_rank == 0:
                pairs = self._generate(self.num_pairs, self.seed, self.path)
            trainer.strategy.barrier("reflow_pairs")
            if trainer.global_rank != 0:
                z0, z1, _ = read_pair_shards(self.path)  # type: ignore[arg-type]
                pairs = (z0, z1)
            return pairs
        return self._generate(self.num_pairs, self.seed, self.path)

    # ------------------------------------------------------------------ LightningDataModule API
    def setup(self, stage: str | None = None) -> None:
        if self.teacher_ckpt is not None:
            self._load_teacher()
        if self.online:
            if self._val is None:
                self._val = self._generate(self.num_val_pairs, self.seed + 1, None)
            return
        if self._train is None:
            self._train = self._stored_pairs()
            if self.data_shape is None:
                self.data_shape = tuple(self._train[0].shape[1:])
        if self._val is None:
            if self.teacher_ckpt is not None:
                self._val = self._generate(self.num_val_pairs, self.seed + 1, None)
            else:  # stored pairs without a teacher: hold out the tail
                z0, z1 = self._train
                k = min(self.num_val_pairs, len(z0) // 2)
                self._val = (z0[-k:], z1[-k:])
                self._train = (z0[:-k], z1[:-k])

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        if self.online:
            ds = _OnlinePairs(self.teacher, self.batch_size, max(1, self.num_pairs // self.batch_size),
                              self.steps, self.solver, self.seed)
            return DataLoader(ds, batch_size=None)
        assert self._train is not None
        return DataLoader(
            TensorDataset(*self._train), batch_size=min(self.batch_size, len(self._train[0])), shuffle=True,
            drop_last=True, generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        assert self._val is not None
        return DataLoader(TensorDataset(*self._val), batch_size=self.batch_size, shuffle=False)

    def val_reference(self) -> Tensor:
        """Reference sample of the *data* (``data.val_reference()``), else the held-out teacher outputs."""
        if self.data is not None and hasattr(self.data, "val_reference"):
            return self.data.val_reference()
        self.setup("validate")
        assert self._val is not None
        return self._val[1].clone()

    def pairs(self) -> tuple[Tensor, Tensor]:
        """The stored training pairs ``(z0, z1)`` (generating them if needed; not in online mode)."""
        if self.online:
            raise ValueError("pairs() is not available with online=True (pairs are regenerated per batch)")
        self.setup("fit")
        assert self._train is not None
        return self._train
