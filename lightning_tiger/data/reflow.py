"""Reflow pairs (Z_0, Z_1) from a trained rectified flow, as a LightningDataModule.

Reflow (Liu, Gong & Liu, "Flow Straight and Fast", ICLR 2023): the k-th rectified flow is trained on the
coupling produced by the (k−1)-th: draw Z_0 from the source, integrate the teacher to Z_1, train a new flow on
(Z_0, Z_1). The same pairs fit the one-step distilled generator. Pairs are generated in batches with a
progress bar, either

- stored: generated once (or read back from ``path`` when its shards match the requested setup) and served
  as a shuffled in-memory dataset (the paper's workflow); or
- online: regenerated for every batch from a frozen copy of the teacher (no disk, fresh pairs each epoch, at
  the cost of ``steps`` teacher evaluations per batch).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset
from tqdm.auto import tqdm

from lightning_tiger.generative.flow import integrate
from lightning_tiger.generative.nets import default_net, instantiate
from lightning_tiger.validation import check_int

__all__ = [
    "FlowTeacher",
    "PairTeacher",
    "ReflowPairsDataModule",
    "generate_reflow_pairs",
    "load_flow_teacher",
    "read_pair_shards",
    "write_pair_shards",
]


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


class PairTeacher(Protocol):
    """What pair generation needs from a trained flow (a ``RectifiedFlowModule`` or a :class:`FlowTeacher`)."""

    source_pool: Tensor | None
    data_shape: tuple[int, ...]

    def sample_source(self, n: int, generator: torch.Generator | None = None) -> Tensor: ...

    def sample(self, n: int, steps: int = 100, solver: str = "euler", z0: Tensor | None = None,
               **solver_kwargs: Any) -> Any: ...


class FlowTeacher:
    """A frozen velocity network with its source: what a reflow stage needs of the previous flow.

    Args:
        net: the velocity ``net(x [b, *shape], t [b]) -> [b, *shape]`` (put in eval mode, no gradients).
        data_shape: shape of one sample.
        source_pool: data-to-data source samples ``[k, *data_shape]``; ``None``: the N(0, I) source.
    """

    def __init__(self, net: nn.Module, data_shape: Sequence[int], source_pool: Tensor | None = None) -> None:
        self.net = net.eval().requires_grad_(False)
        self.data_shape = tuple(int(d) for d in data_shape)
        self.source_pool = source_pool

    def sample_source(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` source points ``[n, *data_shape]`` on CPU (from the pool, else N(0, I))."""
        if self.source_pool is not None:
            return self.source_pool[torch.randint(len(self.source_pool), (n,), generator=generator)].clone()
        return torch.randn(n, *self.data_shape, generator=generator)

    @torch.no_grad()
    def sample(self, n: int, steps: int = 100, solver: str = "euler", z0: Tensor | None = None,
               generator: torch.Generator | None = None, **solver_kwargs: Any) -> Tensor:
        """Integrate the flow from ``z0`` (default ``n`` source draws) to t = 1: ``z1 [n, *data_shape]``."""
        z0 = self.sample_source(n, generator) if z0 is None else z0
        param = next(self.net.parameters(), None)
        z0 = z0.to(*(() if param is None else (param.device, param.dtype)))
        return integrate(self.net, z0, steps, solver, **solver_kwargs).z1


def load_flow_teacher(checkpoint_path: str | os.PathLike[str], net: nn.Module | None = None) -> FlowTeacher:
    """Read the frozen flow of a ``RectifiedFlowModule`` checkpoint (plain Python or LightningCLI).

    The network is rebuilt from the saved hyperparameters (a LightningCLI ``class_path`` spec, or the default
    net of ``data_shape``) unless ``net`` gives the architecture (modules built in Python with their own net
    keep none); its weights are the checkpoint's ``net.*`` entries (the EMA average under
    ``EMAWeightAveraging``). Uses ``torch.load(weights_only=False)``: load only checkpoints you trust.
    """
    ckpt = torch.load(os.fspath(checkpoint_path), map_location="cpu", weights_only=False)
    hp = ckpt.get("hyper_parameters") or {}
    data_shape = tuple(hp.get("data_shape") or ckpt.get("rf_data_shape") or (2,))
    if net is not None:
        net = copy.deepcopy(net)
    else:
        net = instantiate(hp.get("net"))
        net = default_net(data_shape) if net is None else net
    if not isinstance(net, nn.Module):
        raise ValueError(f"cannot rebuild the network from the checkpoint's hyperparameters: {net!r}")
    state = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    if not state:
        raise ValueError(f"{checkpoint_path} holds no 'net.*' weights: not a RectifiedFlowModule checkpoint")
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(
            f"{checkpoint_path}: its weights do not fit the network {type(net).__name__}; a module built in "
            "Python with its own net keeps no architecture in the checkpoint: pass the same one as net=..."
        ) from exc
    return FlowTeacher(net, data_shape, ckpt.get("rf_source_pool"))


@torch.no_grad()
def generate_reflow_pairs(
    teacher: PairTeacher,
    n: int,
    steps: int = 100,
    batch_size: int = 1000,
    path: str | os.PathLike[str] | None = None,
    *,
    solver: str = "euler",
    generator: torch.Generator | None = None,
    progress: bool = True,
    **solver_kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """Sample ``n`` coupled pairs ``(Z_0, Z_1)`` from ``teacher``, in batches (for reflow / distillation).

    Args:
        teacher: the trained flow.
        n: number of pairs.
        steps: solver steps (default 100).
        batch_size: pairs integrated at once (memory bound), default 1000.
        path: if given, a folder where the pairs are written as ``.pt`` shards (one per batch, see
            :func:`write_pair_shards`) that :class:`ReflowPairsDataModule` reads back.
        solver: ``"euler"`` | ``"heun"`` | ``"adaptive"``.
        generator: CPU generator for the source draws (seed it for reproducible pairs).
        progress: show a tqdm progress bar.
        **solver_kwargs: forwarded to the solver (``rtol``, ``atol`` of the adaptive one).

    Returns:
        ``(z0, z1)`` on CPU, each ``[n, *data_shape]``.
    """
    check_int("n", n, low=1)
    check_int("batch_size", batch_size, low=1)
    z0s, z1s = [], []
    with tqdm(total=n, desc="reflow pairs", unit="pair", disable=not progress) as bar:
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            z0 = teacher.sample_source(b, generator)
            z1 = teacher.sample(b, steps=steps, solver=solver, z0=z0, **solver_kwargs)
            z0s.append(z0.cpu())
            z1s.append(z1.float().cpu())
            bar.update(b)
    if path is not None:
        write_pair_shards(path, z0s, z1s, meta={"steps": steps, "solver": solver, "n": n})
    return torch.cat(z0s), torch.cat(z1s)


class _OnlinePairs(IterableDataset):
    """Endless-per-epoch stream of freshly integrated pair batches from a frozen teacher."""

    def __init__(self, teacher: PairTeacher, batch_size: int, num_batches: int, steps: int, solver: str,
                 seed: int) -> None:
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
            (see :func:`load_flow_teacher`); not needed for CLI checkpoints.
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
        self.teacher: PairTeacher | None = None
        self.source_pool: Tensor | None = None
        self.data_shape: tuple[int, ...] | None = None
        self._train: tuple[Tensor, Tensor] | None = None
        self._val: tuple[Tensor, Tensor] | None = None

    # ------------------------------------------------------------------ generation
    def _load_teacher(self) -> PairTeacher:
        if self.teacher is None:
            if self.teacher_ckpt is None:
                raise ValueError("teacher_ckpt is needed to generate pairs")
            self.teacher = load_flow_teacher(self.teacher_ckpt, net=self.teacher_net)
            self.source_pool = self.teacher.source_pool
            self.data_shape = self.teacher.data_shape
        return self.teacher

    def _generate(self, n: int, seed: int, path: str | None) -> tuple[Tensor, Tensor]:
        return generate_reflow_pairs(
            self._load_teacher(), n, self.steps, self.generate_batch_size, path, solver=self.solver,
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
