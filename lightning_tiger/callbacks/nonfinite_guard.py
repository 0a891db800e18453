"""Skip (or skip-and-shrink) optimizer steps whose gradients or loss are not finite: :class:`NonFiniteGuard`.

The veto mechanics (schedulers, weight averaging, group counters, GradScaler, fold-in-backward mode, DDP) are
summarised in the class docstring and explained in the optimizer docs (``docs/optim.md``).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from typing_extensions import override

from lightning_tiger.callbacks._folding import is_folding, refuse_clipping_with_folding
from lightning_tiger.callbacks._steps import log_step, should_update_logs
from lightning_tiger.callbacks._veto_bridges import VetoBridgesMixin
from lightning_tiger.optim import Tiger, classify_parameters, shrink_, shrink_center
from lightning_tiger.validation import check_int, check_real

__all__ = ["NonFiniteGuard", "NonFiniteTrainingError", "refuse_clipping_with_folding"]

log = logging.getLogger(__name__)

class NonFiniteTrainingError(RuntimeError):
    """Raised by :class:`NonFiniteGuard` after ``max_consecutive`` vetoed optimizer steps in a row."""


class NonFiniteGuard(VetoBridgesMixin, Callback):
    """Veto optimizer steps with non-finite gradients (or loss) under any precision, optimizer and strategy.

    Checks every gradient of the optimizer in ``on_before_optimizer_step`` (after the closure, AMP unscaling and
    accumulation, before clipping and the update) with one fused reduction and one host sync. A veto sets every
    ``p.grad`` of that optimizer to ``None`` (every ``torch.optim`` optimizer, Lion and Tiger then skip them), puts
    back the group counters the optimizer advanced anyway, and swallows that step's ``interval="step"``
    scheduler call and weight-averaging update, so schedules count real steps; ``trainer.global_step`` keeps
    counting attempts (real steps: ``global_step - guard.skipped``). Under a ``GradScaler`` (``16-mixed``) the
    scaler skips the step itself and the guard only counts (and shrinks). With Tiger's ``fold_in_backward=True``
    no veto is possible (gradients are already folded): the guard counts the steps in which Tiger flagged
    tensors (:meth:`~lightning_tiger.optim.Tiger.nonfinite_flagged`), whose own rule shrinks them. Under DDP
    the decision is OR-reduced across ranks. Design notes: the optimizer docs (``docs/optim.md``).

    Example::

        trainer = L.Trainer(precision="bf16-mixed", accumulate_grad_batches=4,
                            callbacks=[NonFiniteGuard(action="skip", max_consecutive=20)])

    Logged (to every logger of the Trainer, at Lightning's step index): ``nonfinite/skipped`` (total vetoed
    steps), ``nonfinite/consecutive`` (vetoed steps in a row), ``nonfinite/flagged`` (fold mode only), every
    ``log_every_n_steps`` and, with ``log_every_skip=True``, at every vetoed step.

    Args:
        action: ``"skip"`` vetoes the step; ``"shrink"`` vetoes it and shrinks the parameters whose gradient
            is non-finite toward their centre, ``θ ← c + s·(θ − c)`` (Tiger's rule, Su 2023,
            kexue.fm/archives/9512; :func:`~lightning_tiger.optim.shrink_`: float32 math, one rounding), with
            ``c = 1`` for norm scales (from the group's ``"kind"``, else by module type), else 0.
            Default ``"skip"``.
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

    Raises:
        TypeError: ``max_consecutive`` or ``shrink_ratio`` has the wrong type.
        ValueError: an argument is out of range (at construction), or gradient clipping is configured with an
            optimizer that folds gradients (``on_fit_start``).
        NonFiniteTrainingError: ``max_consecutive`` vetoed steps in a row (from ``on_before_optimizer_step``).
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
        self.max_consecutive = check_int("max_consecutive", max_consecutive, low=1, allow_none=True)
        self.shrink_ratio = check_real("shrink_ratio", shrink_ratio, low=0.0, high=1.0, low_open=True)
        self.action = action
        self.check_loss = bool(check_loss)
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
        self._init_bridges()

    # ------------------------------------------------------------------ checkpointing
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(action=self.action)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "skipped": self.skipped,
            "consecutive": self.consecutive,
            "flagged": self.flagged,
            "steps_seen": self.steps_seen,
            "last_skip_step": self.last_skip_step,
            "last_step_skipped": self.last_step_skipped,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))
        self.flagged = int(state_dict.get("flagged", 0))
        self.steps_seen = int(state_dict.get("steps_seen", 0))
        last = state_dict.get("last_skip_step")
        self.last_skip_step = None if last is None else int(last)
        self.last_step_skipped = bool(state_dict.get("last_step_skipped", False))

    # ------------------------------------------------------------------ fit lifecycle
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        refuse_clipping_with_folding(trainer)
        self._centres = None
        self._names = None
        self._wrap_scheduler_hook(pl_module)
        self._wrap_averaging(trainer)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._unwrap_scheduler_hook()
        self._unwrap_averaging()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._unwrap_scheduler_hook()
        self._unwrap_averaging()
        self._remove_restore_hooks()
        self._restore_clip()

    # ------------------------------------------------------------------ per batch
    @override
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

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if not self.check_loss:
            return
        # No host sync here: the flag is OR-ed on device and read together with the gradient check.
        bad = ~torch.isfinite(loss.detach()).all()
        self._loss_bad = bad if self._loss_bad is None else (self._loss_bad | bad.to(self._loss_bad.device))

    @override
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

        folding = is_folding(optimizer)
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

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._restore_clip()
        if not self._stepped_this_batch:
            return
        if should_update_logs(trainer) or (self._event_this_batch and self.log_every_skip):
            self._log(trainer)

    # ------------------------------------------------------------------ helpers
    def _metrics(self) -> dict[str, float]:
        metrics = {"nonfinite/skipped": float(self.skipped), "nonfinite/consecutive": float(self.consecutive)}
        if self.flagged:
            metrics["nonfinite/flagged"] = float(self.flagged)
        return metrics

    def _log(self, trainer: pl.Trainer) -> None:
        step = log_step(trainer)
        metrics = self._metrics()
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    @staticmethod
    @rank_zero_only
    def _warn(message: str) -> None:
        log.warning(message)

    @staticmethod
    def _fold_flagged(optimizer: torch.optim.Optimizer) -> int:
        """Number of tensors a fold-in-backward Tiger flagged in the current window (0 for other optimizers)."""
        return len(optimizer.nonfinite_flagged()) if isinstance(optimizer, Tiger) else 0

    def _centre_map(self, pl_module: pl.LightningModule) -> dict[int, float]:
        """id(param) -> shrink centre by module type (:func:`~lightning_tiger.optim.classify_parameters`)."""
        if self._centres is None:
            by_name = dict(pl_module.named_parameters())
            self._centres = {id(by_name[name]): shrink_center(kind)
                             for name, kind in classify_parameters(pl_module).items() if name in by_name}
        return self._centres

    def _shrink(
        self, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer, offenders: list[Tensor]
    ) -> None:
        """θ ← c + s·(θ − c) for every offender, with Tiger's shared rule (float32 math, rounded once)."""
        offending = {id(p) for p in offenders}
        params: list[Tensor] = []
        centres: list[float] = []
        for group in optimizer.param_groups:
            kind = group.get("kind")
            for p in group["params"]:
                if id(p) in offending:
                    params.append(p)
                    centres.append(shrink_center(kind) if kind is not None
                                   else self._centre_map(pl_module).get(id(p), 0.0))
        shrink_(params, centres, self.shrink_ratio)

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

