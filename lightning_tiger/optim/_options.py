"""Checked constructor options and param-group hyperparameters of Tiger and Lion.

Every error names the parameter (and the param group for ``add_param_group``) and the accepted range; the
number checks are those of :mod:`lightning_tiger.validation` in the optimizers' brief message format
(``"lr must be in [0.0, inf), got -0.001"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_tiger.optim._dispatch import fused_available_for
from lightning_tiger.optim._rounding import COMPENSATIONS
from lightning_tiger.validation import check_bool, check_real

__all__ = [
    "check_int_at_least",
    "check_paths",
    "check_rounding",
    "lion_hparams",
    "parse_dtype",
    "prepare_fused",
    "real",
    "tiger_hparams",
]


def real(name: str, value: Any, *, low: float, high: float | None = None, low_open: bool = False,
         high_open: bool = True) -> float:
    """A hyperparameter as a float in the given range (a one-element tensor is read once, as torch.optim does).

    Raises:
        TypeError: ``value`` is not a real number.
        ValueError: ``value`` is NaN, infinite or outside the range.
    """
    out = check_real(name, value, low=low, high=high, low_open=low_open, high_open=high_open, allow_tensor=True,
                     brief=True)
    assert out is not None
    return out


def check_int_at_least(name: str, value: Any, low: int) -> int:
    """``value`` if it is an int (not a bool) >= ``low``.

    Raises:
        ValueError: otherwise (a ValueError also for a wrong type, as these checks always raised).
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def parse_dtype(name: str, value: Any) -> torch.dtype | None:
    """A floating ``torch.dtype`` from a dtype or its name (``"bfloat16"``, ``"torch.float16"``); None stays.

    Raises:
        ValueError: ``value`` names no floating torch dtype.
    """
    if value is None:
        return None
    if isinstance(value, str):
        attr = getattr(torch, value.removeprefix("torch."), None)
        if not isinstance(attr, torch.dtype):
            raise ValueError(f"{name} must name a floating torch dtype (e.g. 'bfloat16'), got {value!r}")
        value = attr
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"{name} must be None or a floating torch dtype, got {value!r}")
    return value


def check_paths(foreach: Any, fused: Any, compensation: Any) -> tuple[bool | None, bool | None]:
    """The checked ``(foreach, fused)`` flags of Tiger/Lion.

    Raises:
        TypeError: a flag is not None or a bool.
        ValueError: ``fused=True`` with ``foreach=True``, or with ``compensation="kahan"`` (which runs in PyTorch).
    """
    foreach = check_bool("foreach", foreach, allow_none=True)
    fused = check_bool("fused", fused, allow_none=True)
    if fused and foreach:
        raise ValueError("fused=True and foreach=True are mutually exclusive")
    if fused and compensation == "kahan":  # an invalid value is check_rounding's to report
        raise ValueError("compensation='kahan' runs in PyTorch (foreach/single-tensor paths): use fused=None "
                         "or fused=False with it")
    return foreach, fused


def check_rounding(stochastic_rounding: Any, compensation: Any, seed: Any, momentum_sr: Any) -> int:
    """Validate the low-precision options of Tiger/Lion; returns the seed (``torch.initial_seed()`` when ``seed``
    is None: ``torch.manual_seed`` / ``L.seed_everything`` make runs reproducible, and nothing is drawn from the
    default generator, so adding the optimizer does not shift the random numbers of the rest of the run).

    Raises:
        TypeError: a flag is not a bool, or ``seed`` is not None or an int >= 0.
        ValueError: ``compensation`` is not None or ``"kahan"``.
    """
    check_bool("stochastic_rounding", stochastic_rounding)
    check_bool("momentum_sr", momentum_sr)
    if compensation not in COMPENSATIONS:
        raise ValueError(f"compensation must be None or 'kahan', got {compensation!r}")
    if seed is None:
        return int(torch.initial_seed())
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise TypeError(f"seed must be None or an int >= 0, got {seed!r}")
    return seed


def prepare_fused(fused: bool | None, params: Sequence[Tensor], name: str) -> None:
    """Construction-time kernel check: ``fused=True`` needs the kernels; ``fused=None`` builds (or loads) them now
    for CPU parameters, so that a first build's one visible line comes while the run is set up rather than as a
    silent stall of the first step (every rank constructs its optimizer, so the ranks' agreement on the kernel
    stays symmetric).

    Raises:
        RuntimeError: ``fused=True`` and the kernels are unavailable.
    """
    if fused:
        if not fused_available_for(params):
            raise RuntimeError(
                f"fused=True but the compiled {name} kernels are unavailable here (no C++ compiler, or the build "
                "failed: see the FusedKernelWarning, or run `python -m lightning_tiger.optim.build`); use "
                "fused=None to fall back to PyTorch"
            )
    elif fused is None and any(p.device.type == "cpu" for p in params):
        fused_available_for([p for p in params if p.device.type == "cpu"])


def tiger_hparams(group: dict[str, Any], where: str) -> dict[str, Any]:
    """Checked hyperparameters of one Tiger group (``where`` names the group in error messages).

    Raises:
        TypeError: a number is not a real number.
        ValueError: a value is out of range: ``lr`` and ``weight_decay`` in [0, inf), ``beta`` in [0, 1),
            ``shrink_ratio`` in (0, 1], ``rms_floor`` None or in [0, inf), ``grad_accum_steps`` an int >= 1.
    """
    floor = group["rms_floor"]
    return {
        "lr": real(f"lr{where}", group["lr"], low=0.0),
        "beta": real(f"beta{where}", group["beta"], low=0.0, high=1.0),
        "weight_decay": real(f"weight_decay{where}", group["weight_decay"], low=0.0),
        "shrink_ratio": real(f"shrink_ratio{where}", group["shrink_ratio"], low=0.0, high=1.0, low_open=True,
                             high_open=False),
        "grad_accum_steps": check_int_at_least(f"grad_accum_steps{where}", group["grad_accum_steps"], 1),
        "rms_floor": None if floor is None else real(f"rms_floor{where}", floor, low=0.0),
    }


def lion_hparams(group: dict[str, Any], where: str) -> dict[str, Any]:
    """Checked hyperparameters of one Lion group (``where`` names the group in error messages).

    Raises:
        TypeError: a number is not a real number.
        ValueError: ``betas`` is not a pair, or a value is out of range: ``lr`` and ``weight_decay`` in [0, inf),
            each beta in [0, 1).
    """
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas{where} must be a pair (beta1, beta2) in [0, 1), got {betas!r}")
    return {
        "lr": real(f"lr{where}", group["lr"], low=0.0),
        "betas": (real(f"betas[0]{where}", betas[0], low=0.0, high=1.0),
                  real(f"betas[1]{where}", betas[1], low=0.0, high=1.0)),
        "weight_decay": real(f"weight_decay{where}", group["weight_decay"], low=0.0),
    }
