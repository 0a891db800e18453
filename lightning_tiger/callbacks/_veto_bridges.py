"""How :class:`~lightning_tiger.callbacks.NonFiniteGuard` vetoes an optimizer step and keeps the group counters,
the learning-rate schedule and weight averaging in step with the real optimizer steps.

A veto sets every ``p.grad`` of the optimizer to None (or, for an optimizer that unscales inside ``step()``,
makes the ``GradScaler``'s own check fail), and puts back the group-level int counters that ``step()`` advances
anyway (Tiger's ``micro_step``) from a step post-hook registered between steps.

Lightning still steps ``interval="step"`` schedulers on a vetoed step (Lightning issues #18828, #5558) and
``WeightAveraging`` would average the unchanged weights once more; for the duration of ``fit`` the guard wraps
``LightningModule.lr_scheduler_step`` and every ``WeightAveraging.should_update`` (instance attributes, removed
again at the end).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch import Tensor
from torch.utils.hooks import RemovableHandle

__all__ = ["VetoBridgesMixin"]


class VetoBridgesMixin:
    """The veto, counter restore, scheduler and weight-averaging wrappers of the guard.

    Reads the guard's ``_vetoed_optimizers`` (ids of the optimizers vetoed in this batch), ``_stepped_this_batch``
    and ``skipped``; owns the attributes set in :meth:`_init_bridges`.
    """

    skipped: int
    _vetoed_optimizers: set[int]
    _stepped_this_batch: bool

    def _init_bridges(self) -> None:
        self._wrapped_module: pl.LightningModule | None = None
        self._had_instance_hook = False
        self._orig_hook: Callable[..., Any] | None = None
        self._wrapped_averaging: list[tuple[WeightAveraging, bool, Callable[..., bool]]] = []
        # One step post-hook per optimizer (registered between steps, never removed during one) and the group
        # counters it puts back after the step that was vetoed; see _veto.
        self._restore_hooks: dict[int, RemovableHandle] = {}
        self._pending_restore: dict[int, list[dict[str, int]]] = {}
        self._stashed_clip: tuple[pl.Trainer, float] | None = None

    def _veto(
        self,
        trainer: pl.Trainer,
        optimizer: torch.optim.Optimizer,
        with_grad: list[Tensor],
        finite_per_tensor: Tensor | None,
    ) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False) and with_grad:
            # The optimizer unscales inside step(): the scaler's own inf check is what vetoes the step.
            grads_finite = finite_per_tensor is None or bool(finite_per_tensor.all())
            target = next((p.grad for p in with_grad if p.grad.numel() > 0), None)
            if grads_finite and target is not None:
                with torch.no_grad():
                    target.mul_(float("inf"))  # every element becomes ±inf or NaN: layout-agnostic
            return
        for p in with_grad:
            p.grad = None
        if trainer.gradient_clip_val and trainer.gradient_clip_algorithm == "value":
            # torch.nn.utils.clip_grad_value_ raises on an all-None gradient list (clip_grad_norm_ does not):
            # turn clipping off for this vetoed step only (restored at the end of the batch).
            self._stashed_clip = (trainer, trainer.gradient_clip_val)
            trainer.gradient_clip_val = None
        # Some optimizers advance group-level counters even when no parameter has a gradient (Tiger's
        # "micro_step", many pytorch_optimizer classes' group "step"): _restore_counters puts them back right
        # after this step() returns, so that a vetoed step changes no counter at all.
        saved = [
            {k: v for k, v in group.items() if k != "params" and type(v) is int} for group in optimizer.param_groups
        ]
        if any(saved):
            self._pending_restore[id(optimizer)] = saved

    def _restore_counters(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Step post-hook (one per optimizer, for the whole fit): undo the counters of a vetoed step().

        It only reads and clears the guard's own pending entry: adding or removing a hook here would mutate the
        ``OrderedDict`` that torch.optim is iterating and crash any post-hook registered after this one (e.g.
        OptimizerMonitor's on a logging step).
        """
        saved = self._pending_restore.pop(id(optimizer), None)
        if saved is None:
            return
        for group, values in zip(optimizer.param_groups, saved):
            group.update(values)

    def _restore_clip(self) -> None:
        if self._stashed_clip is not None:
            trainer, value = self._stashed_clip
            trainer.gradient_clip_val = value
            self._stashed_clip = None

    def _remove_restore_hooks(self) -> None:
        for handle in self._restore_hooks.values():
            handle.remove()
        self._restore_hooks.clear()
        self._pending_restore.clear()

    def _wrap_scheduler_hook(self, pl_module: pl.LightningModule) -> None:
        if self._wrapped_module is not None:
            return
        self._had_instance_hook = "lr_scheduler_step" in vars(pl_module)
        orig = pl_module.lr_scheduler_step
        self._orig_hook = orig

        def lr_scheduler_step(scheduler: Any, metric: Any = None) -> None:
            if self._swallow_scheduler_step(scheduler):
                return None
            return orig(scheduler, metric)

        pl_module.lr_scheduler_step = lr_scheduler_step  # type: ignore[method-assign]
        self._wrapped_module = pl_module

    def _unwrap_scheduler_hook(self) -> None:
        module = self._wrapped_module
        if module is None:
            return
        if self._had_instance_hook:
            module.lr_scheduler_step = self._orig_hook  # type: ignore[method-assign]
        else:
            vars(module).pop("lr_scheduler_step", None)
        self._wrapped_module = None
        self._orig_hook = None

    def _swallow_scheduler_step(self, scheduler: Any) -> bool:
        if not self._vetoed_optimizers or self._wrapped_module is None:
            return False
        trainer = self._wrapped_module._trainer
        if trainer is None:
            return False
        for config in trainer.lr_scheduler_configs:
            if config.scheduler is scheduler:
                optimizer = getattr(scheduler, "optimizer", None)
                return config.interval == "step" and id(optimizer) in self._vetoed_optimizers
        return False

    def _wrap_averaging(self, trainer: pl.Trainer) -> None:
        """Route every ``WeightAveraging`` callback's ``should_update`` through :meth:`_averaging_should_update`."""
        if self._wrapped_averaging:
            return
        for callback in trainer.callbacks:
            if not isinstance(callback, WeightAveraging):
                continue
            had_instance_attr = "should_update" in vars(callback)
            orig = callback.should_update

            def should_update(
                step_idx: int | None = None, epoch_idx: int | None = None, _orig: Callable[..., bool] = orig
            ) -> bool:
                return self._averaging_should_update(_orig, step_idx, epoch_idx)

            callback.should_update = should_update  # type: ignore[method-assign]
            self._wrapped_averaging.append((callback, had_instance_attr, orig))

    def _unwrap_averaging(self) -> None:
        for callback, had_instance_attr, orig in self._wrapped_averaging:
            if had_instance_attr:
                callback.should_update = orig  # type: ignore[method-assign]
            else:
                vars(callback).pop("should_update", None)
        self._wrapped_averaging.clear()

    def _averaging_should_update(
        self, orig: Callable[..., bool], step_idx: int | None, epoch_idx: int | None
    ) -> bool:
        """``WeightAveraging.should_update`` as a run that never saw the vetoed batches would answer it.

        ``WeightAveraging.on_train_batch_end`` asks after every batch in which ``global_step`` passed its last
        update; ``step_idx`` is ``global_step - 1``. A vetoed step is no optimizer step: no update, and the
        question is asked again after the next real step, which happens in a later batch (a batch without an
        optimizer step, e.g. inside an accumulation window, never updates either). The real step's index is
        ``step_idx`` minus the steps vetoed before it, so ``update_every_n_steps``/``update_starting_at_step``
        count real steps, like the learning-rate schedule. Epoch-end questions pass through unchanged.
        """
        if step_idx is None:
            return orig(step_idx=step_idx, epoch_idx=epoch_idx)
        if self._vetoed_optimizers or not self._stepped_this_batch:
            return False
        return orig(step_idx=step_idx - self.skipped, epoch_idx=epoch_idx)
