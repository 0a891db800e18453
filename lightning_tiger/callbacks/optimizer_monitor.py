"""Per-optimizer telemetry for sign-based (Tiger, Lion) and any other optimizers, at a cost only on logging steps.

Logged per optimizer (``optim/<Name>/...``, ``<Name>`` = class name, ``-1``, ``-2`` ... appended when several
optimizers share a class, like ``LearningRateMonitor``), every ``log_every_n_steps`` optimizer steps, with
Lightning's step index:

- ``lr_mean``, ``lr_min``, ``lr_max``: the effective learning rate η over tensors. Tiger (Su 2023,
  kexue.fm/archives/9512): η of a matrix is ``lr·max(RMS(θ), floor)``, of an embedding table
  ``lr·max(RMS(row), floor)`` per row (rows enter min/max individually and the mean as the table's row mean), of
  a bias / norm parameter ``0.5·lr``; RMS taken on θ before the update, from
  :meth:`Tiger.effective_lr <lightning_tiger.optim.Tiger.effective_lr>` (the optimizer's own computation).
  Other optimizers: the group ``lr`` of every tensor.
- ``update_rms``: ``sqrt(Σ‖θ_after − θ_before‖² / N)`` over all N elements, and ``update_rel`` = update_rms /
  param_rms (≈ lr for Tiger's matrices). The pre-step parameters are copied on logging steps only (a transient
  copy of the optimizer's parameters; nothing is kept between steps) and compared in a one-shot
  ``register_step_post_hook``. A step skipped by a ``GradScaler`` logs no update; one vetoed by
  :class:`~lightning_tiger.callbacks.NonFiniteGuard` logs 0.
- ``sign_agreement``: fraction of elements with ``sign(m) == sign(g)``, m the momentum *before* this step
  (Tiger ``momentum``, Lion/Adam ``exp_avg``, SGD ``momentum_buffer``), g the gradient after unscaling /
  accumulation; absent on the first step (no momentum yet) and in Tiger's fold-in-backward mode (no gradient).
- ``param_rms`` = ``sqrt(Σθ²/N)`` (before the step), ``grad_rms`` = ``sqrt(Σg²/N)`` over tensors with a gradient.
- ``unchanged``: fraction of the N elements that the step left bit-for-bit unchanged (with ``update_rms``; from
  the same snapshot). A stall detector for low-precision parameters: an update below half an ulp of a bf16
  value (2⁻⁹ relative) rounds back to the old value when rounded to nearest, so a bf16 model whose steps are
  mostly rounded away stops learning. The callback warns once (``UserWarning``) when more than half of the
  bf16/fp16 elements of an optimizer were left unchanged by a step that moved some of them (not a skipped or
  non-moving accumulation step) and the optimizer rounds to nearest (Tiger/Lion with
  ``stochastic_rounding=False`` and no compensation, or any optimizer without those options, e.g. AdamW on
  bf16 parameters). Under stochastic rounding many elements stay put on a given step while moving correctly on
  average, so no warning then.

Cost: on a non-logging step the hook returns after one integer comparison. On a logging step: one fused norm
over parameters and gradients, Tiger's η per tensor (one more norm of each RMS-relative tensor), a sign
comparison, one parameter copy, one comparison of the copy with the new parameters (``unchanged``) and one host
sync for all values.
Computed on global rank 0 only (DDP replicas are identical; under FSDP the values would be per-shard).
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from lightning_tiger.callbacks._folding import refuse_clipping_with_folding
from lightning_tiger.callbacks._steps import log_step
from lightning_tiger.optim import Tiger
from lightning_tiger.validation import check_int

_MOMENTUM_KEYS = ("momentum", "exp_avg", "momentum_buffer")


def _norms(tensors: list[Tensor]) -> list[Tensor]:
    if not tensors:
        return []
    return list(torch._foreach_norm(tensors, 2, dtype=torch.float32))


class OptimizerMonitor(Callback):
    """Log effective lr, update RMS, momentum/gradient sign agreement and parameter RMS per optimizer.

    Example::

        trainer = L.Trainer(callbacks=[OptimizerMonitor(log_every_n_steps=50)])

    Args:
        log_every_n_steps: logging interval in optimizer steps; ``None`` (default) uses the Trainer's.
        update_rms: measure the update (needs a transient copy of the parameters on logging steps).
        sign_agreement: measure the momentum/gradient sign agreement.
        prefix: metric name prefix. Default ``"optim"``.

    Raises:
        TypeError: ``log_every_n_steps`` is not None or an int.
        ValueError: ``log_every_n_steps`` < 1 (at construction), or gradient clipping is configured with an
            optimizer that folds gradients (``on_fit_start``).
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        update_rms: bool = True,
        sign_agreement: bool = True,
        prefix: str = "optim",
    ) -> None:
        self.log_every_n_steps = check_int("log_every_n_steps", log_every_n_steps, low=1, allow_none=True)
        self.update_rms = bool(update_rms)
        self.sign_agreement = bool(sign_agreement)
        self.prefix = str(prefix)
        self._names: dict[int, str] = {}
        self._pending: list[dict[str, Any]] = []
        self._hooks: list[Any] = []
        self._warned_stall = False
        self.last_logged: dict[str, float] = {}
        """The metrics of the most recent logging step (also handy in tests and notebooks)."""

    # ------------------------------------------------------------------ lifecycle
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        refuse_clipping_with_folding(trainer)
        counts: Counter[str] = Counter()
        self._names = {}
        for opt in trainer.optimizers:
            base = type(opt).__name__
            self._names[id(opt)] = base if counts[base] == 0 else f"{base}-{counts[base]}"
            counts[base] += 1

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._drop_hooks()
        self._pending.clear()

    def _drop_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _interval(self, trainer: pl.Trainer) -> int:
        return self.log_every_n_steps or trainer.log_every_n_steps

    # ------------------------------------------------------------------ hooks
    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        n = self._interval(trainer)
        # Same rule as Lightning's own metric logging (`should_update_logs`): the step about to complete.
        if n <= 0 or (log_step(trainer) + 1) % n != 0 or not trainer.is_global_zero:
            return
        self._pending.append(self.collect_pre_step(optimizer))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._pending:
            return
        self._drop_hooks()
        metrics = self.finalize(self._pending)
        self._pending = []
        self.last_logged = metrics
        step = log_step(trainer)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    # ------------------------------------------------------------------ computation
    @staticmethod
    def _effective_lrs(optimizer: torch.optim.Optimizer, group: dict[str, Any],
                       params: list[Tensor]) -> list[tuple[Tensor, Tensor, Tensor]]:
        """(mean, min, max) of η per tensor of one group, as 0-dim fp32 tensors: Tiger's own
        :meth:`~lightning_tiger.optim.Tiger.effective_lr` (per row for embeddings), else the group lr."""
        out: list[tuple[Tensor, Tensor, Tensor]] = []
        for p in params:
            if isinstance(optimizer, Tiger):
                eta = optimizer.effective_lr(p)
                out.append((eta.mean(), eta.min(), eta.max()) if eta.ndim else (eta, eta, eta))
            else:
                lr = torch.tensor(float(group["lr"]), device=p.device)
                out.append((lr, lr, lr))
        return out

    def collect_pre_step(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Statistics that need the state before ``optimizer.step`` updates it (called on logging steps)."""
        record: dict[str, Any] = {"name": self._names.get(id(optimizer), type(optimizer).__name__)}
        params = [p for g in optimizer.param_groups for p in g["params"]]
        numel = sum(p.numel() for p in params)
        with torch.no_grad():
            p_norms = _norms([p.detach() for p in params])
            record["numel"] = numel
            record["param_sq"] = torch.stack([x * x for x in p_norms]).sum() if p_norms else torch.zeros(())
            # Effective lr per tensor.
            etas: list[tuple[Tensor, Tensor, Tensor]] = []
            for g in optimizer.param_groups:
                etas.extend(self._effective_lrs(optimizer, g, g["params"]))
            if etas:
                dev = etas[0][0].device
                means, mins, maxs = (torch.stack([e[j].float().to(dev) for e in etas]) for j in range(3))
                record["lr"] = (means.mean(), mins.min(), maxs.max())
            with_grad = [p for p in params if p.grad is not None]
            if with_grad:
                g_norms = _norms([p.grad for p in with_grad])
                record["grad_sq"] = torch.stack([x * x for x in g_norms]).sum()
                record["grad_numel"] = sum(p.numel() for p in with_grad)
            if self.sign_agreement and with_grad:
                agree = None
                count = 0
                for p in with_grad:
                    state = optimizer.state.get(p, {})
                    m = next((state[k] for k in _MOMENTUM_KEYS if isinstance(state.get(k), Tensor)), None)
                    if m is None or m.shape != p.shape:
                        continue
                    same = (torch.sign(m) == torch.sign(p.grad)).sum()
                    agree = same if agree is None else agree + same.to(agree.device)
                    count += p.numel()
                if agree is not None and count:
                    record["agree"] = agree.float() / count
            if self.update_rms:
                snapshot = [p.detach().clone() for p in params]
                record["snapshot"] = snapshot

                low = [i for i, p in enumerate(params) if p.dtype in (torch.bfloat16, torch.float16)]
                record["watch_stall"] = bool(low) and _rounds_to_nearest(optimizer)

                def post_hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
                    with torch.no_grad():
                        torch._foreach_sub_(snapshot, [p.detach() for p in params])
                        norms = _norms(snapshot)
                        record["update_sq"] = torch.stack([x * x for x in norms]).sum() if norms else torch.zeros(())
                        zeros = [(d == 0).sum() for d in snapshot]
                        if zeros:
                            record["unchanged"] = torch.stack(zeros).sum()
                        if record["watch_stall"]:
                            record["low_unchanged"] = torch.stack([zeros[i] for i in low]).sum()
                            record["low_numel"] = sum(params[i].numel() for i in low)
                    record.pop("snapshot", None)  # free the copy right away

                self._hooks.append(optimizer.register_step_post_hook(post_hook))
        return record

    def finalize(self, records: list[dict[str, Any]]) -> dict[str, float]:
        """Turn the pending records into floats (one host sync for everything)."""
        keys: list[str] = []
        values: list[Tensor] = []
        for rec in records:
            base = f"{self.prefix}/{rec['name']}"
            numel = max(int(rec["numel"]), 1)
            param_rms = (rec["param_sq"].float() / numel).sqrt()
            keys.append(f"{base}/param_rms")
            values.append(param_rms)
            if "lr" in rec:
                for suffix, v in zip(("lr_mean", "lr_min", "lr_max"), rec["lr"]):
                    keys.append(f"{base}/{suffix}")
                    values.append(v)
            if "grad_sq" in rec:
                keys.append(f"{base}/grad_rms")
                values.append((rec["grad_sq"].float() / max(int(rec["grad_numel"]), 1)).sqrt())
            if "agree" in rec:
                keys.append(f"{base}/sign_agreement")
                values.append(rec["agree"].float())
            if "update_sq" in rec:
                update_rms = (rec["update_sq"].float() / numel).sqrt()
                keys += [f"{base}/update_rms", f"{base}/update_rel"]
                values += [update_rms, update_rms / param_rms.clamp_min(torch.finfo(torch.float32).tiny)]
            if "unchanged" in rec:
                keys.append(f"{base}/unchanged")
                values.append(rec["unchanged"].float() / numel)
            if "low_unchanged" in rec:
                keys.append(f"{base}/_low_unchanged")
                values.append(rec["low_unchanged"].float() / max(int(rec["low_numel"]), 1))
            rec.pop("snapshot", None)
        if not values:
            return {}
        dev = values[0].device
        out = dict(zip(keys, torch.stack([v.reshape(()).to(dev) for v in values]).tolist()))
        for key in [k for k in out if k.endswith("/_low_unchanged")]:
            self._check_stall(key.removesuffix("/_low_unchanged"), out.pop(key))
        return out

    def _check_stall(self, base: str, low_unchanged: float) -> None:
        """Warn once when most low-precision elements were left unchanged by a step that moved some of them."""
        if self._warned_stall or not 0.5 < low_unchanged < 1.0:
            return
        self._warned_stall = True
        warnings.warn(
            f"{base}: {low_unchanged:.0%} of the bf16/fp16 parameter elements were left unchanged by an optimizer "
            "step that moved the others: most updates are being rounded away (a step below half an ulp rounds "
            "back to the old value when rounded to nearest), so training stalls. Use stochastic rounding "
            "(Tiger/Lion: stochastic_rounding=True, the default), compensation='kahan', fp32 parameters "
            "(precision='bf16-mixed'), or a larger learning rate.",
            UserWarning,
            stacklevel=2,
        )


def _rounds_to_nearest(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer writes low-precision parameters rounded to nearest (no stochastic rounding and no
    compensation option set, or an optimizer without these options)."""
    if getattr(optimizer, "compensation", None) is not None:
        return False
    return not getattr(optimizer, "stochastic_rounding", False)
