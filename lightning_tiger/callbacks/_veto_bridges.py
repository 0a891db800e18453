"""How :class:`~lightning_tiger.callbacks.NonFiniteGuard` keeps the learning-rate schedule and weight averaging in
step with the real optimizer steps when it vetoes one.

Lightning still steps ``interval="step"`` schedulers on a vetoed step (Lightning issues #18828, #5558) and
``WeightAveraging`` would average the unchanged weights once more; for the duration of ``fit`` the guard wraps
``LightningModule.lr_scheduler_step`` and every ``WeightAveraging.should_update`` (instance attributes, removed
again at the end).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import WeightAveraging

__all__ = ["VetoBridgesMixin"]


class VetoBridgesMixin:
    """The scheduler and weight-averaging wrappers of the guard.

    Reads the guard's ``_vetoed_optimizers`` (ids of the optimizers vetoed in this batch), ``_stepped_this_batch``
    and ``skipped``; owns ``_wrapped_module``, ``_had_instance_hook``, ``_orig_hook`` and ``_wrapped_averaging``.
    """

    skipped: int
    _vetoed_optimizers: set[int]
    _stepped_this_batch: bool

    def _init_bridges(self) -> None:
        self._wrapped_module: pl.LightningModule | None = None
        self._had_instance_hook = False
        self._orig_hook: Callable[..., Any] | None = None
        self._wrapped_averaging: list[tuple[WeightAveraging, bool, Callable[..., bool]]] = []

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
