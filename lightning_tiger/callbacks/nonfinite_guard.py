"""Skip (or skip-and-shrink) optimizer steps whose gradients or loss are not finite.

Where the decision is made (SPEC §2): Lightning runs ``training_step`` + ``backward`` inside
``optimizer.step(closure)``; ``on_before_optimizer_step`` fires after the closure, after AMP unscaling and
before gradient clipping and before the optimizer's own update, once per accumulation window. The guard
checks every gradient of the optimizer there with one fused reduction (``torch._foreach_norm``, one read of
the gradients, one host sync) and, if anything is non-finite, vetoes the step.

How a step is vetoed: every ``p.grad`` of that optimizer is set to ``None``. All ``torch.optim`` optimizers,
Lion and Tiger skip parameters whose ``grad`` is ``None``: no parameter, momentum, weight-decay or
per-parameter ``step`` counter change. Zeroing gradients would NOT be a skip (momentum still decays, sign/decay updates
still apply). Under a real ``GradScaler`` (``16-mixed``) the scaler has already unscaled and recorded ``found_inf``;
it skips the step by itself and lowers its scale, the guard only counts (and, for ``action="shrink"``,
shrinks) and never unscales a second time. For an optimizer that owns unscaling (``_step_supports_amp_scaling``, e.g.
fused AdamW) the gradients are still scaled when the hook runs (the check is scale-invariant); when only the
loss is non-finite the guard writes one ``inf`` into a gradient so that the scaler's own check vetoes the step
(setting the gradients to ``None`` would trip the scaler's "no inf checks were recorded" assertion).

Learning-rate schedule: Lightning still steps ``interval="step"`` schedulers (and ``global_step``) on a vetoed
step (SPEC §2, Lightning #18828, #5558). The guard keeps the schedule in step with the REAL optimizer steps by
swallowing the ``lr_scheduler_step`` call of every ``interval="step"`` scheduler attached to a vetoed
optimizer during that batch (it wraps ``LightningModule.lr_scheduler_step`` for the duration of ``fit``; a user override
of that hook is still called for every other step). Epoch-interval schedulers are left alone (epochs still
end). ``global_step`` keeps counting attempted steps, like it does under a ``GradScaler``, so ``max_steps``,
``log_every_n_steps`` and ``val_check_interval`` keep their meaning; the number of real steps is
``trainer.global_step - guard.skipped``. With ``frequency > 1`` only a scheduler call that falls on the vetoed
step is swallowed. In manual optimization Lightning does not step schedulers: check
``guard.last_step_skipped`` yourself.

``action="shrink"`` (Tiger's NaN rule, SPEC §1.2, for any optimizer): skip, and shrink every parameter whose
gradient is non-finite toward its centre, ``θ ← (θ − c)·s + c``, ``c = 1`` for norm scales (LayerNorm/RMSNorm/
BatchNorm/GroupNorm weights), ``0`` otherwise; the kind comes from the parameter group's ``"kind"`` key when
present (Tiger groups), else from :func:`lightning_tiger.optim.classify_parameters` on the LightningModule.
Under a ``GradScaler`` this is how Tiger's shrink rule becomes reachable at all (the scaler never calls
``step`` on a non-finite step). Note that loss-scale overflows while the scaler calibrates its scale also
count as non-finite steps and shrink too.

Tiger with ``fold_in_backward=True``: gradients are folded into the momentum during backward and
``p.grad`` is ``None`` by the time the hook runs, so no veto is possible any more. The guard then defers to
Tiger's own per-tensor rule (non-finite gradients are not folded, those tensors are shrunk at ``step()``) and
only counts the steps in which Tiger flagged tensors (``nonfinite/flagged``, and they count toward
``max_consecutive``). Gradient clipping cannot see folded gradients: the guard refuses
``Trainer(gradient_clip_val=...)`` in this mode.

Distributed: under DDP the hook sees all-reduced gradients, so every rank reaches the same decision; the
decision is still OR-reduced with ``trainer.strategy.reduce_boolean_decision(..., all=False)`` (one tiny
all-reduce per step) so that a rank-local non-finite value (or a sharded strategy) cannot make replicas
diverge. Under FSDP the per-tensor shrink works on each rank's shard.

Group-level counters: some optimizers advance an int in the parameter group even when no parameter has a
gradient (Tiger's ``micro_step``, the group ``step`` of many pytorch_optimizer classes). The guard saves them when it
vetoes and puts them back in a step post-hook right after that ``step()`` returns. torch.optim runs an
optimizer's post-hooks by iterating the ``OrderedDict`` that holds them, so a hook must not add or remove hooks
(a one-shot hook that removed itself crashed every later hook's step, e.g. OptimizerMonitor's on logging steps,
with "OrderedDict mutated during iteration"): the guard registers one post-hook per optimizer between steps (in
``on_train_batch_start``), which only consumes its own pending entry, and removes them in ``teardown``.

Weight averaging (Lightning's ``WeightAveraging``/``EMAWeightAveraging``): Lightning updates the average in
``on_train_batch_end`` whenever ``global_step`` passed its last update and ``should_update(step_idx)`` agrees, so
a vetoed step would average the unchanged weights once more. For the duration of ``fit`` the guard wraps the
``should_update`` of every ``WeightAveraging`` callback in ``trainer.callbacks`` (an instance attribute, removed
again at the end, like the ``lr_scheduler_step`` wrapper): it answers ``False`` for a batch whose step was vetoed
(or that took no optimizer step), and otherwise asks the callback with the REAL step index (``step_idx`` minus the
steps vetoed before it), so ``update_every_n_steps``/``update_starting_at_step`` count real steps like the
schedule. The average and its ``n_averaged`` then equal those of a run that never saw the vetoed batches; only the
averaging's ``latest_update_step``, a ``global_step`` value, still counts attempted steps. The veto is known in
``on_before_optimizer_step``, before any callback's ``on_train_batch_end``, so the order of the callbacks does not
matter. Epoch-end updates (``should_update(epoch_idx=...)``) are left alone.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, WeightAveraging
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torch.utils.hooks import RemovableHandle

log = logging.getLogger(__name__)

_NORM_TYPES: tuple[type[torch.nn.Module], ...] = (
    torch.nn.LayerNorm,
    torch.nn.GroupNorm,
    torch.nn.modules.batchnorm._NormBase,
    *((torch.nn.RMSNorm,) if hasattr(torch.nn, "RMSNorm") else ()),
)


class NonFiniteTrainingError(RuntimeError):
    """Raised by :class:`NonFiniteGuard` after ``max_consecutive`` vetoed optimizer steps in a row."""


def _kind_name(kind: Any) -> str:
    """Normalise a ParamKind enum member or a plain string to its lower-case name."""
    value = getattr(kind, "value", kind)
    name = value if isinstance(value, str) else getattr(kind, "name", str(kind))
    return str(name).lower()


def _is_folding(optimizer: torch.optim.Optimizer) -> bool:
    """True for an optimizer that folds gradients into its state during backward (Tiger fold mode)."""
    flag = getattr(optimizer, "fold_in_backward", None)
    if flag is None:
        flag = optimizer.defaults.get("fold_in_backward", False)
    return bool(flag)


def refuse_clipping_with_folding(trainer: pl.Trainer) -> None:
    """Raise if gradient clipping is configured while an optimizer folds gradients during backward.

    Clipping would see ``p.grad is None`` and silently do nothing (SPEC §1.2: global-norm clipping is impossible
    in that mode), so the lightning_tiger callbacks refuse it in ``on_fit_start``.
    """
    folding = [opt for opt in trainer.optimizers if _is_folding(opt)]
    if folding and trainer.gradient_clip_val:
        raise ValueError(
            "gradient_clip_val must be None or 0 with an optimizer that folds gradients during backward "
            f"({type(folding[0]).__name__}(fold_in_backward=True)): clipping cannot see folded gradients. "
            f"Got gradient_clip_val={trainer.gradient_clip_val}."
        )


def _log_step(trainer: pl.Trainer) -> int:
    """The step value Lightning's own loggers use for metrics logged during this batch."""
    try:
        return int(trainer.fit_loop.epoch_loop._batches_that_stepped)
    except AttributeError:  # pragma: no cover - Lightning internals moved
        return int(trainer.global_step)


def _should_update_logs(trainer: pl.Trainer) -> bool:
    try:
        return bool(trainer._logger_connector.should_update_logs)
    except AttributeError:  # pragma: no cover - Lightning internals moved
        n = trainer.log_every_n_steps
        return n > 0 and (trainer.global_step + 1) % n == 0


class NonFiniteGuard(Callback):
    """Veto optimizer steps with non-finite gradients (or loss) under any precision, optimizer and strategy.

    See the module docstring for exactly how a step is vetoed, how the learning-rate schedule is kept in step
    with the real optimizer steps, and how ``16-mixed``, Tiger's fold-in-backward mode and DDP are handled.

    Example::

        trainer = L.Trainer(precision="bf16-mixed", accumulate_grad_batches=4,
                            callbacks=[NonFiniteGuard(action="skip", max_consecutive=20)])

    Logged (to every logger of the Trainer, at Lightning's step index): ``nonfinite/skipped`` (total vetoed
    steps), ``nonfinite/consecutive`` (vetoed steps in a row), ``nonfinite/flagged`` (fold mode only), every
    ``log_every_n_steps`` and, with ``log_every_skip=True``, at every vetoed step.

    Args:
        action: ``"skip"`` vetoes the step; ``"shrink"`` vetoes it and shrinks the parameters whose gradient
            is non-finite toward their centre (SPEC §1.2). Default ``"skip"``.
        check_loss: also veto when the loss passed to ``backward`` is non-finite (checked without a host sync
            in ``on_before_backward``, any micro-batch of the accumulation window). Default ``False``.
        max_consecutive: after this many vetoed steps in a row, write a checkpoint with
            ``trainer.save_checkpoint`` (into the ``ModelCheckpoint`` dirpath, else the log dir) and raise
            :class:`NonFiniteTrainingError`. ``None`` never stops. Default 20.
        shrink_ratio: ``s`` in ``θ ← (θ − c)·s + c``, in (0, 1]. Default 0.99 (Tiger's default).
        log_every_skip: log the counters at every vetoed step, not only every ``log_every_n_steps``.
        sync_decision: OR-reduce the decision across ranks (recommended; a no-op on one process).
        checkpoint_on_stop: write the checkpoint before raising after ``max_consecutive`` vetoes.
        verbose: emit a ``logging`` warning on rank zero for every vetoed step, naming offending tensors.
    """

    def __init__(
        self,
        action: Literal["skip", "shrink"] = "skip",
        check_loss: bool = False,
        max_consecutive: int | None = 20,
        shrink_ratio: float = 0.99,
        log_every_skip: bool = True,
        sync_decision: bool = True,
        checkpoint_on_stop: bool = True,
        verbose: bool = True,
    ) -> None:
        if action not in ("skip", "shrink"):
            raise ValueError(f"action must be 'skip' or 'shrink', got {action!r}")
        if max_consecutive is not None and (
            isinstance(max_consecutive, bool) or not isinstance(max_consecutive, int) or max_consecutive < 1
        ):
            raise ValueError(f"max_consecutive must be an int >= 1 or None, got {max_consecutive!r}")
        if not isinstance(shrink_ratio, (int, float)) or not (0.0 < float(shrink_ratio) <= 1.0):
            raise ValueError(f"shrink_ratio must be in (0, 1], got {shrink_ratio!r}")
        self.action = action
        self.check_loss = bool(check_loss)
        self.max_consecutive = max_consecutive
        self.shrink_ratio = float(shrink_ratio)
        self.log_every_skip = bool(log_every_skip)
        self.sync_decision = bool(sync_decision)
        self.checkpoint_on_stop = bool(checkpoint_on_stop)
        self.verbose = bool(verbose)

        # Persistent counters (state_dict).
        self.skipped: int = 0
        """Total number of vetoed optimizer steps."""
        self.consecutive: int = 0
        """Vetoed optimizer steps in a row (reset by a real step)."""
        self.flagged: int = 0
        """Steps in which a fold-in-backward optimizer flagged non-finite tensors itself."""
        self.steps_seen: int = 0
        """Optimizer steps inspected (real + vetoed)."""
        self.last_skip_step: int | None = None
        """``trainer.global_step`` of the most recent vetoed step."""
        self.last_step_skipped: bool = False
        """Whether the most recently inspected optimizer step was vetoed."""

        # Transient state (never checkpointed: it is cleared at the start of every batch).
        self._loss_bad: Tensor | None = None
        self._vetoed_optimizers: set[int] = set()
        self._event_this_batch = False
        self._stepped_this_batch = False
        self._centres: dict[int, float] | None = None
        self._names: dict[int, str] | None = None
        self._wrapped_module: pl.LightningModule | None = None
        self._had_instance_hook = False
        self._orig_hook: Callable[..., Any] | None = None
        # One step post-hook per optimizer (registered between steps, never removed during one) and the group
        # counters it puts back after the step that was vetoed; see _veto.
        self._restore_hooks: dict[int, RemovableHandle] = {}
        self._pending_restore: dict[int, list[dict[str, int]]] = {}
        self._wrapped_averaging: list[tuple[WeightAveraging, bool, Callable[..., bool]]] = []
        self._stashed_clip: tuple[pl.Trainer, float] | None = None

    # ------------------------------------------------------------------ checkpointing
    @property
    def state_key(self) -> str:
        return self._generate_state_key(action=self.action)

    def state_dict(self) -> dict[str, Any]:
        return {
            "skipped": self.skipped,
            "consecutive": self.consecutive,
            "flagged": self.flagged,
            "steps_seen": self.steps_seen,
            "last_skip_step": self.last_skip_step,
            "last_step_skipped": self.last_step_skipped,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))
        self.flagged = int(state_dict.get("flagged", 0))
        self.steps_seen = int(state_dict.get("steps_seen", 0))
        last = state_dict.get("last_skip_step")
        self.last_skip_step = None if last is None else int(last)
        self.last_step_skipped = bool(state_dict.get("last_step_skipped", False))

    # ------------------------------------------------------------------ fit lifecycle
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        refuse_clipping_with_folding(trainer)
        self._centres = None
        self._names = None
        self._wrap_scheduler_hook(pl_module)
        self._wrap_averaging(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._unwrap_scheduler_hook()
        self._unwrap_averaging()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._unwrap_scheduler_hook()
        self._unwrap_averaging()
        self._remove_restore_hooks()
        self._restore_clip()

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

    # ------------------------------------------------------------------ per batch
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # The veto of the previous batch has been fully applied (schedulers included) by now.
        self._vetoed_optimizers.clear()
        self._pending_restore.clear()  # a GradScaler skipped step() itself: nothing to restore
        self._restore_clip()
        # Register the counter-restoring post-hook here, between steps: torch.optim iterates an optimizer's
        # post-hooks (an OrderedDict) while running them, so none may be added or removed during a step().
        for optimizer in trainer.optimizers:
            if id(optimizer) not in self._restore_hooks:
                self._restore_hooks[id(optimizer)] = optimizer.register_step_post_hook(self._restore_counters)
        self._event_this_batch = False
        self._stepped_this_batch = False

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if not self.check_loss:
            return
        # No host sync here: the flag is OR-ed on device and read together with the gradient check.
        bad = ~torch.isfinite(loss.detach()).all()
        self._loss_bad = bad if self._loss_bad is None else (self._loss_bad | bad.to(self._loss_bad.device))

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        loss_bad, self._loss_bad = self._loss_bad, None
        self._stepped_this_batch = True
        # A previous veto of this optimizer whose step() never ran (manual optimization under a GradScaler)
        # must not be restored onto this step.
        self._pending_restore.pop(id(optimizer), None)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        with_grad = [p for p in params if p.grad is not None]

        finite_per_tensor: Tensor | None = None
        bad: Tensor | None = None
        if with_grad:
            grads = [p.grad for p in with_grad]
            # One fused reduction over all gradients: a tensor's L2 norm is NaN/inf iff it holds a NaN/inf
            # (or its norm overflows fp32, i.e. elements of order 1e19: a blow-up in any case). fp32 output so
            # fp16 gradients cannot overflow the norm itself.
            norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
            device = norms[0].device
            stacked = torch.stack([n if n.device == device else n.to(device) for n in norms])
            finite_per_tensor = torch.isfinite(stacked)
            bad = ~finite_per_tensor.all()
        if loss_bad is not None:
            bad = loss_bad if bad is None else (bad | loss_bad.to(bad.device))

        folding = _is_folding(optimizer)
        fold_flags = self._fold_flagged(optimizer) if folding else 0
        decision = bool(bad.item()) if bad is not None else False  # the one host sync
        decision = decision or fold_flags > 0
        if self.sync_decision and trainer.world_size > 1:
            decision = bool(trainer.strategy.reduce_boolean_decision(decision, all=False))

        self.steps_seen += 1
        if not decision:
            self.consecutive = 0
            self.last_step_skipped = False
            return

        self.consecutive += 1
        self.last_skip_step = int(trainer.global_step)
        self._event_this_batch = True
        if folding:
            # Folds already happened during backward: Tiger's per-tensor rule handles the flagged tensors.
            self.flagged += 1
            self.last_step_skipped = False
            reason = f"{type(optimizer).__name__} (fold_in_backward) flagged non-finite gradients"
        else:
            self.skipped += 1
            self.last_step_skipped = True
            offenders: list[Tensor] = []
            if finite_per_tensor is not None:
                flags = finite_per_tensor.tolist()
                offenders = [p for p, ok in zip(with_grad, flags) if not ok]
            if self.action == "shrink" and offenders:
                self._shrink(pl_module, optimizer, offenders)
            self._veto(trainer, optimizer, with_grad, finite_per_tensor)
            self._vetoed_optimizers.add(id(optimizer))
            reason = self._describe(pl_module, offenders, loss_bad)
        if self.verbose:
            if folding:
                what = "not vetoed (gradients already folded): the optimizer's per-tensor rule applies"
            else:
                what = f"vetoed ({'skip + shrink' if self.action == 'shrink' else 'skip'})"
            self._warn(
                f"NonFiniteGuard: {reason}; step {trainer.global_step} {what}, {self.consecutive} in a row, "
                f"{self.skipped} skipped in total."
            )
        if self.max_consecutive is not None and self.consecutive >= self.max_consecutive:
            self._stop(trainer, reason)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._restore_clip()
        if not self._stepped_this_batch:
            return
        if _should_update_logs(trainer) or (self._event_this_batch and self.log_every_skip):
            self._log(trainer)

    # ------------------------------------------------------------------ helpers
    def _metrics(self) -> dict[str, float]:
        metrics = {"nonfinite/skipped": float(self.skipped), "nonfinite/consecutive": float(self.consecutive)}
        if self.flagged:
            metrics["nonfinite/flagged"] = float(self.flagged)
        return metrics

    def _log(self, trainer: pl.Trainer) -> None:
        step = _log_step(trainer)
        metrics = self._metrics()
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    @staticmethod
    @rank_zero_only
    def _warn(message: str) -> None:
        log.warning(message)

    def _fold_flagged(self, optimizer: torch.optim.Optimizer) -> int:
        """Number of tensors a fold-in-backward optimizer flagged in the current window (0 if unknown)."""
        getter = getattr(optimizer, "nonfinite_flagged", None)
        if getter is None:
            # Tiger keeps {param: [folded a finite grad, saw a non-finite grad]} for the current window.
            window = getattr(optimizer, "_window", None)
            if isinstance(window, dict):
                return sum(1 for flags in window.values() if len(flags) > 1 and flags[1])
            return 0
        value = getter() if callable(getter) else getter
        if isinstance(value, Tensor):
            return int(value.sum().item())
        if isinstance(value, (list, tuple, set, dict)):
            return len(value)
        return int(value)

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

    def _centre_map(self, pl_module: pl.LightningModule) -> dict[int, float]:
        if self._centres is None:
            centres: dict[int, float] = {}
            try:
                from lightning_tiger.optim.param_groups import classify_parameters

                kinds = classify_parameters(pl_module)
                by_name = dict(pl_module.named_parameters())
                for name, kind in kinds.items():
                    if name in by_name:
                        centres[id(by_name[name])] = 1.0 if _kind_name(kind) == "norm_scale" else 0.0
            except ImportError:
                # Fallback while lightning_tiger.optim is unavailable: norm-module weights are scales.
                for module in pl_module.modules():
                    weight = getattr(module, "weight", None)
                    if isinstance(module, _NORM_TYPES) and isinstance(weight, torch.nn.Parameter):
                        centres[id(weight)] = 1.0
            self._centres = centres
        return self._centres

    def _shrink(
        self, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer, offenders: list[Tensor]
    ) -> None:
        offending = {id(p) for p in offenders}
        centres = self._centre_map(pl_module)
        s = self.shrink_ratio
        with torch.no_grad():
            for group in optimizer.param_groups:
                kind = group.get("kind")
                for p in group["params"]:
                    if id(p) not in offending:
                        continue
                    if kind is not None:
                        c = 1.0 if _kind_name(kind) == "norm_scale" else 0.0
                    else:
                        c = centres.get(id(p), 0.0)
                    # θ ← (θ − c)·s + c, in this order (SPEC §1.2).
                    if c == 0.0:
                        p.mul_(s)
                    else:
                        p.sub_(c).mul_(s).add_(c)

    def _describe(
        self, pl_module: pl.LightningModule, offenders: list[Tensor], loss_bad: Tensor | None
    ) -> str:
        if not offenders:
            if loss_bad is not None and bool(loss_bad.item()):
                return "non-finite loss"
            return "non-finite value on another rank"
        if self._names is None:
            self._names = {id(p): n for n, p in pl_module.named_parameters()}
        names = [self._names.get(id(p), "<unnamed>") for p in offenders]
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        return f"non-finite gradient in {len(names)} tensor(s) ({shown})"

    def _stop(self, trainer: pl.Trainer, reason: str) -> None:
        path: str | None = None
        if self.checkpoint_on_stop:
            ckpt_cb = trainer.checkpoint_callback
            dirpath = getattr(ckpt_cb, "dirpath", None) if ckpt_cb is not None else None
            if dirpath is None:
                dirpath = trainer.log_dir or trainer.default_root_dir
            path = os.path.join(str(dirpath), f"nonfinite-stop-step={trainer.global_step}.ckpt")
            trainer.save_checkpoint(path)
        self._log(trainer)
        where = f"; checkpoint written to {path}" if path else ""
        raise NonFiniteTrainingError(
            f"NonFiniteGuard: {self.consecutive} consecutive optimizer steps had non-finite values "
            f"(max_consecutive={self.max_consecutive}), stopping at global_step {trainer.global_step} "
            f"(last: {reason}); {self.skipped} steps skipped in total{where}."
        )

