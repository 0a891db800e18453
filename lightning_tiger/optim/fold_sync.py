"""Tiger's tight-fisted mode under data parallelism: one momentum all-reduce per window, no gradient all-reduce.

Tiger folds gradient accumulation into its momentum (Su 2023, "Tiger: 一个'抠'到极致的优化器",
kexue.fm/archives/9512; official code bojone/tiger ``tiger.py``): with k micro-batches per window,
``m ← β·m`` at the window's first micro-step, then ``m += (1 − β)/k · g_j`` for each micro-batch j, and θ moves
with ``sign(m)`` at the window's end. With R data-parallel ranks that each fold their *local* gradients
``g_{r,j}`` (the gradient of rank r's mean loss on its micro-batch j) and start the window from the same momentum
``m0`` (identical on every rank, since every previous window ended with identical momenta)::

    m_r = β·m0 + (1 − β)/k · Σ_j g_{r,j}
    (1/R)·Σ_r m_r = β·m0 + (1 − β)/k · Σ_j (1/R)·Σ_r g_{r,j}

and ``(1/R)·Σ_r g_{r,j}`` is the gradient of the mean loss over the concatenated micro-batch j (equal per-rank
batch sizes): averaging the ranks' momenta once at the window's end gives exactly the single-process momentum
of the global batch (to float rounding), and no gradient needs to be communicated at all. Bytes per window: one
momentum (fp32) instead of one gradient per micro-step (DDP without ``no_sync``) or one per window (with it).

This module holds the communication: :class:`FoldSync` reduces, in a fixed order,

1. the per-tensor window flags with ONE int64 ``all_reduce(MAX)`` (a logical OR): "saw a gradient", "folded a
   finite gradient", "saw a non-finite gradient", so that every rank makes the same non-finite decision; the same
   tensor carries each tensor's ``numel`` and the rounding seed as ``(x, −x)`` pairs, whose maxima agree only
   if every rank holds the same value: a different bucket layout or seed on some rank raises on every rank
   instead of silently mixing unrelated tensors;
2. the momenta folded on any rank, averaged in float32 (float64 for float64 momenta) even when stored in
   bf16/fp16, in buckets of at most ``bucket_cap_mb`` (one ``all_reduce(SUM)`` per bucket: a single one for a
   model below the cap), filled in the optimizer's parameter order (identical on every rank), then rounded
   once to the storage dtype: stochastically, with a key computed from the tensor's rounding stream
   (:func:`momentum_sync_key`), identical on every rank, so the ranks' momenta stay bit-identical.

The reduced flags are read back to the host once per ``step()`` (they decide which tensors enter the momentum
buckets, a layout every rank must agree on); the collective synchronises the ranks at that point anyway.

Non-finite gradients (Tiger's rule: such a gradient is not folded and the tensor shrinks toward its centre
instead of moving): each rank drops its own non-finite micro-batches from its fold; the flags are OR-ed, so a
tensor flagged on any rank shrinks on every rank. The averaged momentum then holds every rank's finite folds:
exactly what single-process fold mode gives over the R·k per-rank micro-batches (one window of R·k
micro-steps), which in the single-process tight-fisted mode is the "pre-window momentum" rule: finite folds are
already in m and stay, only non-finite micro-batches are dropped. A tensor folded on no rank keeps its momentum
untouched everywhere (no reduction). A rank that folded nothing for a tensor another rank did fold contributes
``b1·m0`` (``b1 = β`` at a window's first micro-step, what its first finite fold would have applied), so the
average still decays m0 exactly once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_tiger.optim.stochastic_rounding import MASK32, MOMENTUM_SALT, hash32, momentum_round, step_key

__all__ = ["SYNC_SALT", "FoldSync", "FoldWindow", "WindowFlags", "momentum_sync_key"]

SYNC_SALT = 0x3C6EF372
"""Salt of the rounding key of an averaged momentum (distinct from the per-fold keys of the same step)."""

_SEED_MOD = 1 << 62  # seeds are compared modulo this (torch.initial_seed() may exceed int64)


def momentum_sync_key(stream: Tensor, step: Tensor) -> Tensor:
    """Key rounding the averaged momentum of a tensor with rounding stream ``stream`` at step ``step``.

    ``hash32(step_key(stream, step) ^ MOMENTUM_SALT ^ SYNC_SALT)``: a function of optimizer state that is
    identical on every rank (same seed, same parameter index, same step count), so every rank rounds the same
    float32 average to the same bf16/fp16 value (with the momentum's rule,
    :func:`~lightning_tiger.optim.stochastic_rounding.momentum_round`).

    Args:
        stream: int64 0-dim tensor, the tensor's ``sr_stream``.
        step: int64 0-dim tensor, its ``sr_step``.

    Returns:
        int64 0-dim tensor in ``[0, 2**32)``.
    """
    return hash32((step_key(stream, step) ^ (MOMENTUM_SALT ^ SYNC_SALT)) & MASK32)


@dataclasses.dataclass
class FoldWindow:
    """One tensor's accumulation window on this rank, as the optimizer hands it to :meth:`FoldSync.reduce_`.

    Attributes:
        param: the parameter (its ``numel`` enters the layout check; its device holds the flags).
        seen: this rank ran a fold for the tensor in this window (0-dim bool tensor or bool).
        folded: it folded a finite gradient (0-dim bool tensor or bool).
        bad: it saw a non-finite gradient (0-dim bool tensor or bool).
        decay: the ``b1`` this rank's first finite fold would have applied (β at a window's first micro-step,
            else 1); applied to the momentum of a rank that folded nothing when another rank did.
    """

    param: Tensor
    seen: Tensor | bool
    folded: Tensor | bool
    bad: Tensor | bool
    decay: float = 1.0


@dataclasses.dataclass(frozen=True)
class WindowFlags:
    """The flags of one tensor OR-ed over all ranks (identical on every rank after :meth:`FoldSync.reduce_`)."""

    seen: bool
    folded: bool
    bad: bool


class FoldSync:
    """Reduces the fold-in-backward windows of one optimizer over a process group (see the module docstring).

    Args:
        process_group: the data-parallel group (None: the default group).
        bucket_cap_mb: largest float32 bucket of momenta reduced by one ``all_reduce``, in MiB (default 25, like
            ``DistributedDataParallel``); it bounds the transient buffer (the momenta themselves are not
            reduced in place because bf16/fp16 momenta are averaged in float32).

    Attributes:
        collectives: number of all-reduce calls issued so far (flags and momentum buckets).
        bytes_reduced: payload bytes of those calls (this rank's tensor bytes: flags table + fp32 buckets).
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None, bucket_cap_mb: float = 25.0) -> None:
        if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)) or not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be a number > 0, got {bucket_cap_mb!r}")
        self.process_group = process_group
        self.bucket_cap_bytes = max(1, int(bucket_cap_mb * 2**20))
        self.collectives = 0
        self.bytes_reduced = 0

    @property
    def world_size(self) -> int:
        """Number of ranks in the group (1 when torch.distributed is not initialised)."""
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def _all_reduce(self, t: Tensor, op: dist.ReduceOp) -> None:
        if self.world_size == 1:
            return
        # looked up on the module at call time, so that tests and benchmarks can count the calls by wrapping it
        dist.all_reduce(t, op=op, group=self.process_group)
        self.collectives += 1
        self.bytes_reduced += t.numel() * t.element_size()

    @torch.no_grad()
    def reduce_flags(self, windows: Sequence[FoldWindow], seed: int) -> list[WindowFlags]:
        """OR the windows' flags over all ranks (one ``all_reduce(MAX)``) and check that the ranks agree on layout.

        Args:
            windows: one per tensor of the optimizer, in its parameter order.
            seed: the optimizer's rounding seed (Python int).

        Returns:
            The OR-ed flags, one per window (identical on every rank).

        Raises:
            RuntimeError: on every rank, if some rank has another tensor size at some position or another seed.
        """
        n = len(windows)
        device = windows[0].param.device if windows else torch.device("cpu")
        table = torch.zeros(n + 1, 5, dtype=torch.int64, device=device)
        if n:
            flags = torch.stack([torch.as_tensor(v, device=device) for w in windows
                                 for v in (w.seen, w.folded, w.bad)])
            table[:n, :3] = flags.view(n, 3).to(torch.int64)
            sizes = torch.tensor([w.param.numel() for w in windows], dtype=torch.int64, device=device)
            table[:n, 3], table[:n, 4] = sizes, -sizes
        table[n, 3], table[n, 4] = seed % _SEED_MOD, -(seed % _SEED_MOD)
        self._all_reduce(table, dist.ReduceOp.MAX)
        rows = table.tolist()
        bad_rows = [i for i, r in enumerate(rows) if r[3] != -r[4]]
        if bad_rows:
            what = ("the rounding seed differs between ranks: pass the same Tiger(seed=...) on every rank or call "
                    "lightning.seed_everything(<int>) before building the optimizer" if bad_rows[0] == n else
                    f"tensor {bad_rows[0]} of the optimizer has a different size on some rank: build the model and "
                    "the optimizer identically on every rank")
            raise RuntimeError(f"Tiger(fold_in_backward=True) momentum reduction: {what}")
        return [WindowFlags(bool(r[0]), bool(r[1]), bool(r[2])) for r in rows[:n]]

    @torch.no_grad()
    def average_(self, moms: Sequence[Tensor], scales: Sequence[float], keys: Sequence[Tensor | None]) -> None:
        """``m_i ← round((1/R)·Σ_ranks scales_i·m_i)`` in place, float32 (float64) buckets in the given order.

        Args:
            moms: momenta, in the same order on every rank.
            scales: factor applied to this rank's ``m_i`` before the sum (exact 1.0 for most tensors).
            keys: stochastic-rounding key per momentum (bf16/fp16 only; None rounds to nearest).
        """
        world = self.world_size
        for bucket in self._buckets(moms):
            first = moms[bucket[0]]
            dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
            flat = torch.empty(sum(moms[i].numel() for i in bucket), dtype=dtype, device=first.device)
            views, offset = [], 0
            for i in bucket:
                m = moms[i]
                view = flat[offset:offset + m.numel()].view(m.shape)
                view.copy_(m)
                if scales[i] != 1.0:
                    view.mul_(scales[i])
                views.append(view)
                offset += m.numel()
            self._all_reduce(flat, dist.ReduceOp.SUM)
            flat.div_(world)
            for i, view in zip(bucket, views):
                m, key = moms[i], keys[i]
                if key is not None and m.dtype in (torch.bfloat16, torch.float16) and view.dtype == torch.float32:
                    m.copy_(momentum_round(view, m.dtype, key))
                else:
                    m.copy_(view)

    def _buckets(self, moms: Sequence[Tensor]) -> list[list[int]]:
        """Consecutive runs of tensors of one device and compute dtype within the byte cap (a larger tensor alone)."""
        out: list[list[int]] = []
        cur: list[int] = []
        size, kind = 0, None
        for i, m in enumerate(moms):
            k = (m.device, m.dtype == torch.float64)
            n = m.numel() * (8 if k[1] else 4)
            if cur and (k != kind or size + n > self.bucket_cap_bytes):
                out.append(cur)
                cur, size = [], 0
            cur.append(i)
            size += n
            kind = k
        if cur:
            out.append(cur)
        return out

    def reduce_(self, windows: Sequence[FoldWindow], seed: int,
                momentum_of: Callable[[int], tuple[Tensor, Tensor | None]]) -> list[WindowFlags]:
        """Make every rank's window identical: OR the flags, then average the momenta folded on any rank.

        Args:
            windows: one per tensor of the optimizer, in its parameter order (the same on every rank).
            seed: the optimizer's rounding seed.
            momentum_of: ``i -> (momentum, key)`` of ``windows[i]``'s tensor (the momentum created if missing;
                the key rounding a bf16/fp16 momentum, :func:`momentum_sync_key`, or None to round to nearest);
                called only for tensors folded on some rank.

        Returns:
            The OR-ed flags per window; the optimizer applies its update with them (identical on every rank).
        """
        flags = self.reduce_flags(windows, seed)
        idx = [i for i, f in enumerate(flags) if f.folded]
        if self.world_size > 1 and idx:
            # this rank's own "folded" flags decide the decay of the ranks that folded nothing
            local = torch.stack([torch.as_tensor(windows[i].folded, device=windows[i].param.device).cpu()
                                 for i in idx]).tolist()
            moms, keys = zip(*(momentum_of(i) for i in idx))
            self.average_(moms, [1.0 if did else windows[i].decay for i, did in zip(idx, local)], keys)
        return flags
