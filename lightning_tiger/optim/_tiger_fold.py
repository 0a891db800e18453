"""Tiger's tight-fisted mode (``fold_in_backward=True``): gradients are folded into the momentum during backward.

A post-accumulate-grad hook on every parameter folds ``p.grad`` into the momentum and frees it at once, so
training never holds a full set of gradients (Su 2023, kexue.fm/archives/9512, "tight-fisted" Tiger: the
momentum is the only state). ``step()`` then moves the parameters from the folded momenta. The rationale and the
exact fold rule are in the optimizer docs (``docs/optim.md``).
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

__all__ = ["FoldHooks", "TigerFoldMixin", "refuse_distributed"]


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


def refuse_distributed() -> None:
    """Raise under ``torch.distributed`` with more than one process (the hooks see un-reduced gradients).

    Raises:
        RuntimeError: world size > 1.
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError(
            "Tiger(fold_in_backward=True) is not supported with torch.distributed world_size > 1: the "
            "post-accumulate-grad hooks see each rank's local, un-reduced gradient (before DDP's all-reduce), "
            "so the replicas' momenta would diverge. Use fold_in_backward=False under DDP."
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

    def _register_hooks(self, group: dict[str, Any]) -> None:
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
        refuse_distributed()
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
        refuse_distributed()
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
        self._window.clear()

    def __del__(self) -> None:
        # Only the optimizer that registered the hooks removes them: wrappers that copy our __dict__ (Lightning's
        # LightningOptimizer subclasses the optimizer's class) share ``_hooks`` and die earlier.
        with contextlib.suppress(Exception):  # interpreter shutdown: attributes may already be gone
            if self._hooks.owner_id == id(self):
                self.remove_hooks()
