"""A batch sampler whose order depends only on (seed, epoch) and that resumes mid-epoch.

Lightning restores model, optimizer and loop counters from a checkpoint, but a plain shuffled
``DataLoader`` restarts its epoch with a new random order, so a resumed run trains on different batches
than the run that never stopped (Lightning warns about it). :class:`ResumableBatchSampler` draws the
permutation of epoch ``e`` from its own generator seeded with ``(seed, e)`` and, when the Trainer resumes
mid-epoch, skips the batches the restored loop has already completed. Under DDP each rank takes a strided
share of every global batch (like ``DistributedSampler``), so the global batch is the same for any world size
that divides ``batch_size * world_size``. :class:`ResumableLoader` packages that order as a loader whose
position Lightning saves in its checkpoints (what ``ToyDataModule`` and ``DigitsDataModule`` return);
:class:`RandomWindowLoader` draws random windows of a token stream in the same resumable way (``CharCorpusDataModule``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from lightning_tiger.validation import check_int, check_real

if TYPE_CHECKING:
    import lightning as L

__all__ = ["EpochCursor", "RandomWindowLoader", "ResumableBatchSampler", "ResumableLoader"]


class ResumableBatchSampler(Sampler[list[int]]):
    """Shuffled (or sequential) batches, deterministic by ``(seed, epoch)``, resumable mid-epoch.

    Args:
        num_samples: dataset length.
        batch_size: samples per batch *per process*.
        seed: base seed of the permutations.
        shuffle: draw a new permutation every epoch (else sequential order).
        drop_last: drop the last incomplete batch.
        trainer: the Trainer whose ``current_epoch`` and restored batch progress drive the order; attach it
            later with :meth:`attach` (data modules do it in ``train_dataloader``).
        rank: this process's rank; ``world_size``: number of processes (default: from ``trainer``).
        world_size: see ``rank``.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        trainer: L.Trainer | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        check_int("num_samples", num_samples, low=1)
        check_int("batch_size", batch_size, low=1)
        check_int("seed", seed)
        check_int("world_size", world_size, low=1, allow_none=True)
        check_int("rank", rank, low=0, high=None if world_size is None else world_size - 1, allow_none=True)
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.trainer, self._rank, self._world_size = trainer, rank, world_size
        self.epoch = 0

    def attach(self, trainer: L.Trainer) -> ResumableBatchSampler:
        """Follow ``trainer``'s epoch and resume position. Returns ``self``."""
        self.trainer = trainer
        return self

    @property
    def rank(self) -> int:
        return self._rank if self._rank is not None else (self.trainer.global_rank if self.trainer else 0)

    @property
    def world_size(self) -> int:
        return self._world_size if self._world_size is not None else (self.trainer.world_size if self.trainer else 1)

    def _global_batch(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self._global_batch())
        return full if self.drop_last or rest == 0 else full + 1

    def _skip(self) -> int:
        """Batches of this epoch already completed by the restored fit loop (0 on a fresh epoch)."""
        if self.trainer is None:
            return 0
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return int(progress.completed)

    def batches(self, epoch: int, start: int = 0) -> Iterator[list[int]]:
        """This rank's index lists of ``epoch``, from its batch ``start`` on (a pure function of the arguments,
        the seed and the sizes)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        g, rank, world = self._global_batch(), self.rank, self.world_size
        for b in range(start, len(self)):
            chunk = order[b * g : (b + 1) * g]
            yield chunk[rank::world].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        if self.trainer is not None:
            self.epoch = self.trainer.current_epoch
        yield from self.batches(self.epoch, self._skip())


class EpochCursor:
    """Where a resumable loader stands: (epoch, batches yielded in it), saved and restored by Lightning.

    Lightning calls ``state_dict()`` when it writes a checkpoint and ``load_state_dict()`` before it iterates
    again after a restore (``lightning.fabric.utilities.types._Stateful``). A loader with a length is not
    prefetched from, so "batches yielded" equals "batches trained on" at save time. Subclasses call
    :meth:`_begin_epoch` when an iteration draws its first batch (Lightning calls ``iter()`` once just to check
    that the object is iterable: that must have no side effect) and advance ``_offset`` per yielded batch.
    """

    def __init__(self) -> None:
        self._epoch = 0
        self._offset = 0  # batches yielded in the current epoch
        self._started = False  # whether any epoch has begun
        self._resume: tuple[int, int] | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def _begin_epoch(self) -> tuple[int, int]:
        if self._resume is not None:
            epoch, offset = self._resume
            self._resume = None
            if offset >= len(self):
                epoch, offset = epoch + 1, 0
        elif self._started:
            epoch, offset = self._epoch + 1, 0
        else:
            epoch, offset = 0, 0
        self._epoch, self._offset, self._started = epoch, offset, True
        return epoch, offset

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "offset", "started"}``: where the next batch comes from."""
        return {"epoch": self._epoch, "offset": self._offset, "started": int(self._started)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from ``state`` at the next ``iter()`` (a fresh state with ``started = 0`` restarts)."""
        if state.get("started", 1):
            self._resume = (int(state["epoch"]), int(state["offset"]))
            self._started = True


class ResumableLoader(EpochCursor):
    """Shuffled batches of a map-style dataset, deterministic by ``(seed, epoch)``, resumable mid-epoch.

    A plain iterable with ``__len__`` (not a ``DataLoader``) whose position is saved in Lightning checkpoints
    (:class:`EpochCursor`), so a run resumed from a mid-epoch checkpoint trains on exactly the batches the
    uninterrupted run would have seen. The order is :class:`ResumableBatchSampler`'s; under DDP each rank
    takes a strided share of every global batch (``batch_size`` is per process), and since this is no
    ``DataLoader`` Lightning injects no ``DistributedSampler``. Samples are loaded and collated by a
    ``DataLoader`` over the epoch's index lists (``num_workers`` applies).

    Args:
        dataset: map-style dataset (a tensor indexes its first dimension).
        batch_size: samples per batch per process, >= 1.
        seed: base seed of the permutations.
        shuffle: new permutation every epoch (else sequential order).
        drop_last: drop the last incomplete global batch.
        rank, world_size: this process and the number of processes.
        num_workers: ``DataLoader`` workers.
    """

    def __init__(self, dataset: Any, batch_size: int, seed: int = 0, shuffle: bool = True, drop_last: bool = True,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0) -> None:
        super().__init__()
        self.dataset = dataset
        self.sampler = ResumableBatchSampler(len(dataset), batch_size, seed=seed, shuffle=shuffle,
                                             drop_last=drop_last, rank=rank, world_size=world_size)
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Any]:
        def generate() -> Iterator[Any]:
            epoch, offset = self._begin_epoch()
            index_lists = list(self.sampler.batches(epoch, offset))
            loader = DataLoader(self.dataset, batch_sampler=index_lists, num_workers=self.num_workers)
            for k, batch in enumerate(loader):
                self._offset = offset + k + 1
                yield batch

        return generate()


class RandomWindowLoader(EpochCursor):
    """Resumable loader of random training windows (a plain iterable with ``__len__``, not a DataLoader).

    Batch ``b`` of epoch ``e`` holds ``batch_size`` windows ``data[s : s + seq_len + 1]`` with starts ``s``
    drawn uniformly from a generator seeded by ``(seed, rank, e, b)``, so the data order depends on nothing
    but those four numbers. Windows are cut by one gather (no per-sample collation).

    With ``repeat_fraction > 0`` each window is, with that probability, replaced by a *tiled* one: a segment
    ``data[s : s + P]`` repeated to ``seq_len + 1`` tokens, the period ``P`` drawn uniformly from
    ``[max(1, L // 8), max(1, L // 2)]`` (drawn from the same generator after the starts, so
    ``repeat_fraction=0`` gives exactly the windows above). Everything after the first period can be predicted
    by copying from ``P`` tokens back: a curriculum that makes a small model learn to copy (an induction
    mechanism) in a CPU-sized budget, which natural text alone did not teach it there (``docs/attention.md``).
    With ``repeat_noise > 0`` a tiled window's segment is, with that probability, ``P`` characters drawn
    independently from the data (its unigram distribution) instead of a contiguous span: nothing but copying
    predicts its repeats, the signal that makes the copying circuit form quickly.

    Its position is saved in Lightning checkpoints and restored (:class:`~lightning_tiger.data.resumable.
    EpochCursor`). Being no ``DataLoader``, it gets no ``DistributedSampler`` under DDP: each rank draws its own
    windows because the rank enters the seed.

    Args:
        data: ``[n_chars]`` token ids (any integer dtype; batches are returned as int64).
        seq_len: training length L (a window holds ``L + 1`` tokens).
        batch_size: windows per batch.
        batches_per_epoch: length of one epoch.
        seed: data seed.
        rank: process rank (different ranks draw different windows).
        repeat_fraction: probability that a window is a tiled segment instead, in [0, 1] (default 0).
        repeat_noise: probability that a tiled window's segment is i.i.d. characters, in [0, 1] (default 0).

    Raises:
        ValueError: ``data`` is not 1-D or shorter than ``seq_len + 1``; ``repeat_fraction`` or
            ``repeat_noise`` outside [0, 1].
    """

    def __init__(
        self, data: Tensor, seq_len: int, batch_size: int, batches_per_epoch: int, seed: int, rank: int = 0,
        repeat_fraction: float = 0.0, repeat_noise: float = 0.0,
    ) -> None:
        if data.ndim != 1 or data.numel() < seq_len + 1:
            raise ValueError(
                f"data must be a 1-D tensor of at least seq_len + 1 = {seq_len + 1} tokens, "
                f"got shape {tuple(data.shape)}"
            )
        check_real("repeat_fraction", repeat_fraction, low=0.0, high=1.0)
        check_real("repeat_noise", repeat_noise, low=0.0, high=1.0)
        super().__init__()
        self.data, self.seq_len, self.batch_size = data, seq_len, batch_size
        self.batches_per_epoch, self.seed, self.rank = batches_per_epoch, seed, rank
        self.repeat_fraction, self.repeat_noise = float(repeat_fraction), float(repeat_noise)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def batch(self, epoch: int, index: int) -> Tensor:
        """The training batch ``index`` of ``epoch``: ``LongTensor [batch_size, seq_len + 1]``."""
        state = np.random.SeedSequence([self.seed, self.rank, epoch, index]).generate_state(2)
        generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        high = self.data.numel() - self.seq_len  # exclusive bound: last start leaves seq_len + 1 tokens
        starts = torch.randint(0, high, (self.batch_size,), generator=generator)
        offsets = torch.arange(self.seq_len + 1).expand(self.batch_size, -1)
        if self.repeat_fraction > 0:
            tiled = torch.rand(self.batch_size, generator=generator) < self.repeat_fraction
            low, high_period = max(1, self.seq_len // 8), max(1, self.seq_len // 2)
            period = torch.randint(low, high_period + 1, (self.batch_size,), generator=generator)
            offsets = offsets % torch.where(tiled, period, self.seq_len + 1)[:, None]
        index = starts[:, None] + offsets
        if self.repeat_fraction > 0 and self.repeat_noise > 0:
            noise = tiled & (torch.rand(self.batch_size, generator=generator) < self.repeat_noise)
            scattered = torch.randint(0, self.data.numel(), (self.batch_size, self.seq_len + 1), generator=generator)
            index = torch.where(noise[:, None], scattered.gather(1, offsets), index)
        return self.data[index].long()

    def __iter__(self) -> Iterator[Tensor]:
        def generate() -> Iterator[Tensor]:
            epoch, offset = self._begin_epoch()
            for index in range(offset, self.batches_per_epoch):
                self._offset = index + 1
                yield self.batch(epoch, index)

        return generate()

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "offset", "started", "seed"}``: where the next batch comes from."""
        return {**super().state_dict(), "seed": self.seed}
