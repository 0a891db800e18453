"""NonFiniteGuard next to OptimizerMonitor and EMAWeightAveraging: every order, logging or not, every precision.

Issue 15, item 2: with the guard listed before the monitor (the README's order) a vetoed step that was also a
logging step crashed with ``RuntimeError: OrderedDict mutated during iteration`` (the guard's counter-restoring
step post-hook removed itself while ``torch.optim`` iterated over the step's post-hooks, and the monitor had
registered one after it). Item 10: the EMA must not move on a vetoed step.

Each case trains Tiger (whose ``micro_step`` group counter is what the guard restores after a vetoed step) on
8 batches with one NaN gradient in batch 3, and compares with a run whose data lacks that batch (or the whole
accumulation window holding it): parameters, Tiger's state, the scheduler and the EMA's averaged model must be
identical (``torch.equal``). The reference runs are shared between cases (they depend only on precision and
accumulation). About 25 short fits, ~15 s on 2 CPU cores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging
from lightning.pytorch.loggers import Logger

from lightning_tiger.callbacks import NonFiniteGuard, OptimizerMonitor
from tests.callbacks.test_nonfinite_guard import (
    GRAD_NAN,
    AssertFinite,
    RawWeights,
    assert_same,
    assert_same_training_state,
    averaged_state,
    fit,
    make_data,
)

pytest.importorskip("lightning_tiger.optim.tiger")

N_BATCHES, BAD_BATCH = 8, 3
DECAY = 0.5  # a short EMA memory: the average follows the weights closely, so any difference shows


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call in memory as ``{step: {name: value}}``."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[int, dict[str, float]] = {}

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.setdefault(int(step or 0), {}).update(metrics)


def _ema() -> EMAWeightAveraging:
    return EMAWeightAveraging(decay=DECAY)


_REFERENCES: dict[tuple[str, int], tuple[L.Trainer, Any, dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}


def reference(tmp_path: Path, precision: str, accumulate: int) -> tuple[Any, ...]:
    """A run that never saw the bad batch (accumulate=2: never saw its window), with the same EMA."""
    key = (precision, accumulate)
    if key not in _REFERENCES:
        drop = (BAD_BATCH,) if accumulate == 1 else tuple(range(BAD_BATCH - BAD_BATCH % 2, BAD_BATCH + 1))
        ema, raw = _ema(), RawWeights()
        trainer, model = fit(tmp_path / "ref", precision, make_data(N_BATCHES, {}, drop=drop), [ema, raw],
                             "tiger", accumulate_grad_batches=accumulate)
        _REFERENCES[key] = (trainer, model, raw.state, averaged_state(ema))
    return _REFERENCES[key]


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed-scaler"])
@pytest.mark.parametrize("logging_step", [True, False], ids=["vetoed-step-logs", "vetoed-step-silent"])
@pytest.mark.parametrize("order", ["guard-monitor-ema", "ema-monitor-guard"])
def test_guard_monitor_ema_matrix(
    tmp_path: Path, order: str, logging_step: bool, precision: str, accumulate: int
) -> None:
    vetoed = BAD_BATCH // accumulate  # 0-based optimizer step that holds the NaN
    # log_every_n_steps=2 logs optimizer steps 1, 3, 5, 7 (the vetoed one among them); 3 logs steps 2, 5.
    every = 2 if logging_step else 3
    assert ((vetoed + 1) % every == 0) == logging_step

    guard, monitor, ema, raw = NonFiniteGuard(action="skip"), OptimizerMonitor(), _ema(), RawWeights()
    callbacks: list[Callback] = [guard, monitor, ema]
    if order == "ema-monitor-guard":
        callbacks.reverse()
    logger = MemoryLogger()
    trainer, model = fit(tmp_path / "bad", precision, make_data(N_BATCHES, {BAD_BATCH: GRAD_NAN}),
                         [*callbacks, raw, AssertFinite()], "tiger", logger=logger,
                         accumulate_grad_batches=accumulate, log_every_n_steps=every)

    assert guard.skipped == 1 and guard.steps_seen == N_BATCHES // accumulate
    t_ref, m_ref, raw_ref, avg_ref = reference(tmp_path, precision, accumulate)
    assert_same(raw.state, raw_ref, "raw weights")
    assert_same_training_state(trainer, model, t_ref, m_ref)  # model = the EMA weights after train end
    assert_same(averaged_state(ema), avg_ref, "averaged model")
    assert int(avg_ref["n_averaged"]) == N_BATCHES // accumulate - 1

    # The monitor and the guard both logged at the vetoed step iff it is a logging step (the guard also logs
    # every skip: log_every_skip=True).
    at_veto = logger.rows.get(vetoed, {})
    assert at_veto.get("nonfinite/skipped") == 1.0
    monitor_keys = [k for k in at_veto if k.startswith("optim/")]
    assert bool(monitor_keys) == logging_step
    if logging_step:
        # As OptimizerMonitor documents: a step the GradScaler skips (its inf check sees the NaN first) logs no
        # update; one vetoed by the guard logs 0 (it moves nothing).
        if precision == "16-mixed-scaler":
            assert "optim/Tiger/update_rms" not in at_veto, at_veto
        else:
            assert at_veto["optim/Tiger/update_rms"] == 0.0, at_veto


@pytest.mark.parametrize("order", ["guard-first", "guard-last"])
def test_sgd_vetoed_logging_step(tmp_path: Path, order: str) -> None:
    """Not Tiger-specific: SGD's int ``dampening`` group key makes the guard restore group counters too."""
    guard, monitor = NonFiniteGuard(action="skip"), OptimizerMonitor()
    callbacks: list[Callback] = [guard, monitor] if order == "guard-first" else [monitor, guard]
    t_bad, m_bad = fit(tmp_path / "bad", "32-true", make_data(6, {1: GRAD_NAN}), callbacks, "sgd",
                       log_every_n_steps=1)
    t_ref, m_ref = fit(tmp_path / "ref", "32-true", make_data(6, {}, drop=(1,)), [], "sgd")
    assert guard.skipped == 1
    assert_same_training_state(t_bad, m_bad, t_ref, m_ref)
