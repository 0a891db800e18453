"""Tiger's tight-fisted mode (``fold_in_backward=True``): gradients are folded into the momentum during backward.

A post-accumulate-grad hook on every parameter folds ``p.grad`` into the momentum and frees it at once, so
training never holds a full set of gradients (Su 2023, kexue.fm/archives/9512, "tight-fisted" Tiger: the
momentum is the only state). ``step()`` then moves the parameters from the folded momenta. The rationale and the
exact fold rule are in the optimizer docs (``docs/optim.md``). Under data parallelism, :meth:`sync_momenta` makes
``step()`` average the ranks' momenta first (``lightning_tiger.optim.fold_sync``: exact, one reduction per step).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Any

import torch
from torch import Tensor

from lightning_tiger.optim._functional import tiger_fold_, tiger_fold_update_
from lightning_tiger.optim._rounding import is_low_precision, sr_advance, sr_fold_key, sr_keys_of
from lightning_tiger.optim.fold_sync import FoldSync, FoldWindow, momentum_sync_key
from lightning_tiger.optim.sharding import is_dtensor

__all__ = ["FoldHooks", "TigerFoldMixin", "refuse_distributed", "refuse_sharded"]


def _fold_hook(opt_ref: weakref.ReferenceType[TigerFoldMixin], param: Tensor) -> None:
    # Module-level function + weakref: the hook stored on the parameter must not keep the optimizer alive.
    opt = opt_ref()
    if opt is not None and opt._hooks.active:
        opt._fold(param)


class FoldHooks:
    """Fold-mode bookkeeping, one object shared by reference with wrappers that copy the optimizer's __dict__."""

    def __init__(self) -> None:
        self.active = False
        self.handles: list[Any] = []
        self.owner_id: int | None = None
        self.sync: FoldSync | None = None  # set by sync_momenta (data parallelism)


def refuse_distributed(sync: FoldSync | None = None) -> None:
    """Raise under ``torch.distributed`` with more than one process unless the momenta are reduced (``sync``).

    Raises:
        RuntimeError: world size > 1 and ``sync`` is None (the hooks see each rank's local gradient).
    """
    dist = torch.distributed
    if sync is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError(
            f"Tiger(fold_in_backward=True) under torch.distributed (world_size={dist.get_world_size()}) needs its "
            "momenta averaged across ranks at every step(): its hooks fold each rank's local gradient. With "
            "Lightning use Trainer(strategy=lightning_tiger.plugins.TightFistedDDPStrategy()); in plain PyTorch "
            "call opt.sync_momenta() and do not let DistributedDataParallel all-reduce the gradients. Data "
            "parallelism only: under FSDP / ModelParallelStrategy the gradients are sharded and reduce-scattered "
            "by their own hooks, so there is no whole local gradient to fold; use fold_in_backward=False there."
        )


def refuse_sharded(params: list[Tensor], where: str) -> None:
    """Raise if a parameter is a DTensor: the tight-fisted mode folds whole local gradients (data parallelism).

    Checked when the hooks are registered, so the error comes before any backward: raised from inside a hook, it
    would leave FSDP2's reduce-scatters of that backward half-issued.

    Raises:
        RuntimeError: ``params[i]`` is a DTensor (sharded by FSDP2 / ``ModelParallelStrategy`` / tensor parallelism).
    """
    sharded = next((i for i, p in enumerate(params) if is_dtensor(p)), None)
    if sharded is not None:
        raise RuntimeError(
            f"{where}: parameter {sharded} is a DTensor (sharded by FSDP / ModelParallelStrategy): the tight-fisted "
            "mode folds whole local gradients (data parallelism only); use fold_in_backward=False with sharded "
            "strategies"
        )


class TigerFoldMixin:
    """The fold-in-backward half of :class:`~lightning_tiger.optim.Tiger` (hooks, fold, the parameter write).

    Uses the host optimizer's ``param_groups``, ``state``, ``momentum_sr`` and its ``_param_group``,
    ``_momentum``, ``_settings``, ``_sr_state``, ``_kahan``; owns ``_hooks`` and ``_window``
    (param -> [folded a finite grad, saw a non-finite grad, folds so far], the current window).
    """

    param_groups: list[dict[str, Any]]
    state: Any
    momentum_sr: bool
    seed: int
    _hooks: FoldHooks
    _window: dict[Tensor, list[Any]]
    _param_group: dict[Tensor, dict[str, Any]]

    def nonfinite_flagged(self) -> list[Tensor]:
        """The parameters whose gradient held a NaN or ±inf in the current accumulation window.

        Fold-in-backward mode: the window runs from the last ``step()`` call to now; each flagged parameter
        shrinks instead of moving at the next ``step()`` (and its non-finite gradient was not folded). Standard
        mode: always empty (gradients are checked inside ``step()``, nothing is pending between calls).
        Reads one flag per folded tensor back to the host: call it on checking steps only.

        Returns:
            The flagged parameters, in folding order.
        """
        return [p for p, window in self._window.items() if bool(window[1])]

    def sync_momenta(self, process_group: Any = None, bucket_cap_mb: float = 25.0) -> FoldSync:
        """Data parallelism: every ``step()`` first averages the ranks' momenta (tight-fisted mode only).

        Each rank folds its local gradients; ``step()`` then OR-s the non-finite flags over ``process_group`` (one
        int64 all-reduce) and averages the momenta folded on any rank (float32 buckets of ``bucket_cap_mb``, one
        all-reduce each, a fixed order), so every rank applies the same update: the single-process update of
        the global batch (``lightning_tiger.optim.fold_sync`` has the algebra). The gradients must not be
        all-reduced as well: do not wrap the model in ``DistributedDataParallel`` (or run every backward
        under its ``no_sync()``); Lightning: ``lightning_tiger.plugins.TightFistedDDPStrategy`` calls this.

        Args:
            process_group: the data-parallel group (None: the default group).
            bucket_cap_mb: largest float32 bucket per all-reduce, MiB (default 25).

        Returns:
            The :class:`~lightning_tiger.optim.fold_sync.FoldSync` (its ``collectives``/``bytes_reduced`` count
            the communication).

        Raises:
            RuntimeError: not in tight-fisted mode (DTensor parameters are refused earlier, by the constructor).
        """
        if not self._hooks.active:
            raise RuntimeError("Tiger.sync_momenta() is for the tight-fisted mode: construct Tiger with "
                               "fold_in_backward=True")
        self._hooks.sync = FoldSync(process_group, bucket_cap_mb)
        return self._hooks.sync

    def _reduce_windows(self, sync: FoldSync) -> None:
        """Replace this rank's windows by the ranks' common ones, averaging the momenta (``fold_sync``)."""
        flat = [p for g in self.param_groups for p in g["params"]]
        index = {id(p): i for i, p in enumerate(flat)}
        params = [p for p in flat if p.requires_grad]  # the hooked ones: the same list on every rank
        windows = []
        for p in params:
            group, w = self._param_group[p], self._window.get(p)
            decay = group["beta"] if group["micro_step"] % group["grad_accum_steps"] == 0 else 1.0
            windows.append(FoldWindow(p, w is not None, w is not None and w[0], w is not None and w[1], decay))

        def momentum_of(i: int) -> tuple[Tensor, Tensor | None]:
            p = params[i]
            m = self._momentum(p)  # type: ignore[attr-defined]
            st = self._sr_state(self.state[p], p, m, index[id(p)])  # type: ignore[attr-defined]
            use = st is not None and self.momentum_sr and is_low_precision(m)
            return m, momentum_sync_key(st["sr_stream"], st["sr_step"]) if use else None

        for p, flags in zip(params, sync.reduce_(windows, self.seed, momentum_of)):
            if flags.seen:
                self._window[p] = [torch.tensor(flags.folded, device=p.device),
                                   torch.tensor(flags.bad, device=p.device), 0]

    def _register_hooks(self, group: dict[str, Any]) -> None:
        refuse_sharded(group["params"], "Tiger(fold_in_backward=True)")
        self._hooks.owner_id = id(self)
        hook = functools.partial(_fold_hook, weakref.ref(self))
        for p in group["params"]:
            if p.requires_grad:
                self._hooks.handles.append(p.register_post_accumulate_grad_hook(hook))

    @torch.no_grad()
    def _fold(self, p: Tensor) -> None:
        """Fold ``p.grad`` into the momentum (hook body); never touches ``p`` itself. Frees ``p.grad``.

        No host synchronisation: the finiteness of the gradient, and whether a finite gradient was already
        folded in this window (which decides b1), stay on the device as 0-dim bool tensors.
        """
        g = p.grad
        if g is None:
            return
        refuse_distributed(self._hooks.sync)
        if g.is_sparse:
            raise RuntimeError("Tiger(fold_in_backward=True) does not support sparse gradients")
        group = self._param_group[p]
        window = self._window.get(p)  # [folded a finite grad, saw a non-finite grad, folds so far] or None
        t, k, beta = group["micro_step"], group["grad_accum_steps"], group["beta"]
        b1: float | Tensor = 1.0
        if t % k == 0:
            b1 = beta if window is None else torch.where(window[0], 1.0, beta)
        state = self.state[p]
        m = self._momentum(p)  # type: ignore[attr-defined]
        st = self._sr_state(state, p, m, None)  # type: ignore[attr-defined]
        key = None
        if st is not None and self.momentum_sr and is_low_precision(m):
            key = sr_fold_key(st, 0 if window is None else window[2])
        # Pure PyTorch on purpose: the fused op declares θ mutable, so calling it here would bump θ's
        # version counter inside backward (autograd may still need θ).
        bad = tiger_fold_(g, m, b1, (1.0 - beta) / k, key)
        if window is None:
            self._window[p] = [bad.logical_not(), bad, 1]
        else:
            window[0] = window[0] | bad.logical_not()
            window[1] = window[1] | bad
            window[2] += 1
        p.grad = None

    def _fold_step(self) -> None:
        refuse_distributed(self._hooks.sync)
        if self._hooks.sync is not None:
            self._reduce_windows(self._hooks.sync)
        first = 0
        for group in self.param_groups:
            update = (group["micro_step"] + 1) % group["grad_accum_steps"] == 0
            params, moms, bads, folded, settings, srs, kahans = [], [], [], [], [], [], []
            for index, p in enumerate(group["params"], start=first):
                window = self._window.get(p)
                if window is None:
                    continue
                state = self.state[p]
                params.append(p)
                moms.append(state["momentum"])
                folded.append(window[0])
                bads.append(window[1])
                settings.append(self._settings(p, group, group["lr"]))  # type: ignore[attr-defined]
                srs.append(self._sr_state(state, p, state["momentum"], index))  # type: ignore[attr-defined]
                kahans.append(self._kahan(state, p))  # type: ignore[attr-defined]
            first += len(group["params"])
            if params:
                modes, lrs, wds, centers, floors = (list(x) for x in zip(*settings))
                tiger_fold_update_(params, moms, bads, folded, lr_modes=modes, lrs=lrs, weight_decays=wds,
                                   centers=centers, rms_floor=floors, update=update,
                                   shrink_ratio=group["shrink_ratio"], keys=sr_keys_of(srs), kahan=kahans)
                sr_advance(srs)
            group["micro_step"] += 1
        self._window.clear()

    def remove_hooks(self) -> None:
        """Remove the fold-in-backward hooks; afterwards ``step()`` reads ``.grad`` like the standard mode."""
        for handle in self._hooks.handles:
            handle.remove()
        self._hooks.handles.clear()
        self._hooks.active = False
        self._hooks.sync = None
        self._window.clear()

    def __del__(self) -> None:
        # Only the optimizer that registered the hooks removes them: wrappers that copy our __dict__ (Lightning's
        # LightningOptimizer subclasses the optimizer's class) share ``_hooks`` and die earlier.
        with contextlib.suppress(Exception):  # interpreter shutdown: attributes may already be gone
            if self._hooks.owner_id == id(self):
                self.remove_hooks()
