"""The piecewise-linear learning-rate schedule of the official Tiger code, as a standard ``LRScheduler``."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from itertools import pairwise
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["PiecewiseLinearLR"]


def _parse_schedule(schedule: Any, from_zero: bool) -> list[tuple[int, float]]:
    if isinstance(schedule, Mapping):
        items = list(schedule.items())
    elif isinstance(schedule, (list, tuple)) and all(
        isinstance(kv, (list, tuple)) and len(kv) == 2 for kv in schedule
    ):
        items = [tuple(kv) for kv in schedule]
    else:
        items = []
    if not items:
        raise ValueError(
            f"schedule must be a non-empty mapping {{step: multiplier}} or list of [step, multiplier] pairs, "
            f"got {schedule!r}"
        )
    points: dict[int, float] = {}
    for key, value in items:
        try:
            step_f = float(key.strip()) if isinstance(key, str) else float(key)
        except (TypeError, ValueError):
            raise ValueError(f"schedule keys must be integer steps (strings from YAML allowed), got {key!r}") \
                from None
        if isinstance(key, bool) or not math.isfinite(step_f) or step_f != int(step_f) or step_f < 0:
            raise ValueError(f"schedule keys must be integers >= 0, got {key!r}")
        step = int(step_f)
        if step in points:
            raise ValueError(f"schedule has the step {step} twice (keys {key!r} and an equal one)")
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"schedule values must be floats >= 0, got {value!r} at step {key!r}")
        try:
            mult = float(value)
        except ValueError:
            raise ValueError(f"schedule values must be floats >= 0, got {value!r} at step {key!r}") from None
        if not math.isfinite(mult) or mult < 0:
            raise ValueError(f"schedule values must be finite floats >= 0, got {value!r} at step {key!r}")
        points[step] = mult
    out = sorted(points.items())
    if from_zero and out[0][0] != 0:
        out = [(0, 0.0), *out]
    return out


def piecewise_linear(t: float, points: list[tuple[int, float]]) -> float:
    """Multiplier at step ``t`` of sorted knots ``points`` (constant before the first and after the last)."""
    if t < points[0][0]:
        return points[0][1]
    for (t0, x0), (t1, x1) in pairwise(points):
        if t0 <= t < t1:
            return x0 + (x1 - x0) * (t - t0) / (t1 - t0)
    return points[-1][1]


class PiecewiseLinearLR(LRScheduler):
    """Piecewise-linear multiplier of each group's base lr: the official Tiger ``piecewise_linear`` (bojone/tiger).

    ``{40000: 1, 160000: 0.5, 640000: 0.1, 1280000: 0.01}`` rises linearly from 0 to 1 over [0, 40000], falls
    to 0.5 at 160000, to 0.1 at 640000, to 0.01 at 1280000 and stays there. With ``from_zero=True`` the point
    (0, 0) is prepended when the first key is not 0 (warm-up from zero); with ``from_zero=False`` the first
    value holds before the first key. The official code counts *micro-steps*: with Tiger's
    ``grad_accum_steps=k`` in the official style (``step()`` after every backward), step this scheduler after
    every optimizer ``step()`` (Lightning: ``interval="step"``).

    YAML/jsonargparse friendly: the knots may also be a list of ``[step, multiplier]`` pairs (so that steps can
    be interpolated, e.g. ``["${trainer.max_steps}", 0.1]``); steps may be strings (``"40000": 1``) or
    integral floats; they are converted, must be >= 0 and distinct, and are sorted; values must be finite and
    >= 0.

    Resuming: ``load_state_dict`` restores the step count and base lrs but keeps the knots given to the
    constructor, so a schedule derived from the run's length (``["${trainer.max_steps}", 0.1]``) follows the
    resumed run's ``max_steps`` instead of the checkpoint's; when the knots differ it warns, naming both, and
    sets each group's lr to the new schedule's value at the restored step.

    Args:
        optimizer: the wrapped optimizer.
        schedule: ``{step: multiplier}`` knots, or ``[[step, multiplier], ...]``.
        from_zero: prepend (0, 0) when the first key is not 0. Default True.
        last_epoch: index of the last step (-1 to start fresh), as in every ``LRScheduler``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        schedule: dict[int | str, float] | list[tuple[int | str, float]],
        from_zero: bool = True,
        last_epoch: int = -1,
    ) -> None:
        if not isinstance(from_zero, bool):
            raise TypeError(f"from_zero must be a bool, got {from_zero!r}")
        self.points = _parse_schedule(schedule, from_zero)
        self.from_zero = from_zero
        super().__init__(optimizer, last_epoch)

    def multiplier(self, step: float | None = None) -> float:
        """The schedule's multiplier at ``step`` (default: the current ``last_epoch``)."""
        return piecewise_linear(self.last_epoch if step is None else step, self.points)

    def get_lr(self) -> list[float]:  # closed form: no drift however the scheduler is resumed
        mult = self.multiplier()
        return [base_lr * mult for base_lr in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the step count and base lrs; the knots stay those given to the constructor (see above).

        Args:
            state_dict: from :meth:`state_dict` (knots saved as lists, e.g. through JSON/YAML, are accepted).
        """
        knots = self.points
        saved = [(int(t), float(x)) for t, x in state_dict.get("points", knots)]
        super().load_state_dict(state_dict)
        # The knots are configuration, not progress: a checkpoint's knots would silently undo a resumed run's
        # new --trainer.max_steps while the saved config showed the new ones.
        self.points = knots
        if saved != knots:
            warnings.warn(
                f"PiecewiseLinearLR: resuming at step {self.last_epoch} with knots {knots} instead of the "
                f"checkpoint's {saved}; the learning rate follows the new knots from this step on",
                UserWarning,
                stacklevel=2,
            )
            self._last_lr = self.get_lr()
            for group, lr in zip(self.optimizer.param_groups, self._last_lr, strict=True):
                group["lr"] = lr
