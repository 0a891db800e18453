"""Writing float32 results into low-precision storage, and the per-parameter rounding state of Tiger and Lion.

A bf16/fp16 θ (and momentum) gets the float32 result rounded *stochastically* when the caller passes a
per-tensor key (``stochastic_rounding.py``: the same bits as the fused kernels, so all paths agree bit for bit),
Kahan-compensated when it passes a compensation buffer, else rounded to nearest. The generator state of a
parameter is two int64 0-dim tensors in the optimizer state (``sr_stream``, ``sr_step``), so resumes are bit-exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_tiger.optim.stochastic_rounding import (
    MASK32,
    MOMENTUM_SALT,
    hash32,
    momentum_round,
    step_key,
    stochastic_round,
    stream_of,
)

__all__ = [
    "COMPENSATIONS",
    "KAHAN_KEY",
    "LOW_PRECISION",
    "SR_KEYS",
    "compute_dtype",
    "fused_rounding_kwargs",
    "is_low_precision",
    "kahan_buffer",
    "kahan_store_",
    "momentum_key",
    "sr_advance",
    "sr_fold_key",
    "sr_key_needed",
    "sr_keys_of",
    "sr_state",
    "store_",
    "upcast",
]

LOW_PRECISION = (torch.bfloat16, torch.float16)
COMPENSATIONS = (None, "kahan")
SR_KEYS = ("sr_stream", "sr_step")
KAHAN_KEY = "kahan_comp"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float32 at least (bf16/fp16 storage), float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def upcast(t: Tensor) -> Tensor:
    """``t`` itself when already in its compute dtype, else a float32 copy."""
    return t if t.dtype == compute_dtype(t.dtype) else t.to(compute_dtype(t.dtype))


def is_low_precision(t: Tensor) -> bool:
    """Whether ``t`` is stored in bf16 or fp16 (the dtypes that stochastic rounding / Kahan apply to)."""
    return t.dtype in LOW_PRECISION


def kahan_store_(dst: Tensor, value: Tensor, old: Tensor, comp: Tensor) -> None:
    """Write ``value`` (compute dtype) to the low-precision ``dst`` with Kahan compensation.

    ``old`` is ``dst``'s current value in the compute dtype, ``comp`` the compensation buffer (``dst``'s dtype)
    holding what earlier roundings lost. Compensated summation (Kahan 1965; for optimizers: Zamirai et al. 2020,
    "Revisiting BFloat16 Training", §3; the ``optimi`` library's ``kahan_sum``)::

        y    = (value − old) + comp          # the wanted move plus the carried error
        new  = round_nearest(old + y)
        comp ← y − (new − old)               # what this rounding lost, carried to the next write
    """
    y = value.sub(old).add_(comp.to(value.dtype))
    new = old.add(y).to(dst.dtype)
    comp.copy_(y.sub_(new.to(value.dtype).sub_(old)))
    dst.copy_(new)


def store_(dst: Tensor, value: Tensor, key: Tensor | None = None, comp: Tensor | None = None,
           old: Tensor | None = None, *, momentum: bool = False) -> None:
    """Write ``value`` (the compute-dtype result) into ``dst``'s storage dtype, rounding once.

    Exact when the dtypes agree; else Kahan-compensated when ``comp`` is given (``old``: ``dst`` before, in the
    compute dtype), else stochastically rounded with ``key`` when given and ``dst`` is bf16/fp16
    (:func:`~lightning_tiger.optim.stochastic_rounding.stochastic_round`; with ``momentum``, ``key`` is the
    parameter's step key and the momentum's rule applies:
    :func:`~lightning_tiger.optim.stochastic_rounding.momentum_round`), else rounded to nearest.
    """
    if value.dtype == dst.dtype:
        if value is not dst:
            dst.copy_(value)
    elif comp is not None:
        kahan_store_(dst, value, dst.to(value.dtype) if old is None else old, comp)
    elif key is not None and dst.dtype in LOW_PRECISION and value.dtype == torch.float32:
        dst.copy_((momentum_round if momentum else stochastic_round)(value, dst.dtype, key))
    else:
        dst.copy_(value)


def momentum_key(key: Tensor | None, momentum_sr: bool) -> Tensor | None:
    """The key of a low-precision momentum write (the parameter's ``key``, for ``store_(..., momentum=True)``),
    None when it rounds to nearest."""
    return key if momentum_sr else None


def sr_key_needed(stochastic_rounding: bool, compensation: str | None, momentum_sr: bool, p: Tensor,
                  m: Tensor) -> bool:
    """Whether the update of ``p`` (momentum ``m``) rounds stochastically: a bf16/fp16 θ under stochastic rounding
    (without Kahan compensation), or a bf16/fp16 momentum with ``momentum_sr`` too."""
    if not stochastic_rounding or compensation is not None:
        return False
    return p.dtype in LOW_PRECISION or (momentum_sr and m.dtype in LOW_PRECISION)


def sr_state(state: dict[str, Any], p: Tensor, m: Tensor, seed: int, index: int | Callable[[], int], *,
             stochastic_rounding: bool, compensation: str | None, momentum_sr: bool) -> dict[str, Any] | None:
    """The state dict holding p's rounding generator when its update rounds stochastically (:func:`sr_key_needed`),
    else None.

    The generator is created on first use: ``sr_stream`` (int64 0-dim tensor, ``stream_of(seed, index)``,
    ``index`` = the parameter's position in the optimizer's flat order, or a function returning it, called only
    then) and ``sr_step`` (int64 0-dim tensor, the number of rounding calls so far). Both live in the optimizer
    state, so a resumed run continues bit for bit.
    """
    if not sr_key_needed(stochastic_rounding, compensation, momentum_sr, p, m):
        return None
    if "sr_stream" not in state:
        i = index() if callable(index) else index
        state["sr_stream"] = torch.tensor(stream_of(seed, i), dtype=torch.int64, device=p.device)
        state["sr_step"] = torch.zeros((), dtype=torch.int64, device=p.device)
    return state


def sr_keys_of(states: Sequence[dict[str, Any] | None]) -> list[Tensor | None]:
    """This call's key of every state holding a generator (None elsewhere), computed on the device:
    ``step_key(sr_stream, sr_step)``, stacked when all live on one device (a handful of kernels per step)."""
    live = [st for st in states if st is not None]
    if not live:
        return [None] * len(states)
    if len({st["sr_step"].device for st in live}) == 1:
        keys = iter(step_key(torch.stack([st["sr_stream"] for st in live]),
                             torch.stack([st["sr_step"] for st in live])).unbind())
    else:
        keys = iter([step_key(st["sr_stream"], st["sr_step"]) for st in live])
    return [next(keys) if st is not None else None for st in states]


def fused_rounding_kwargs(keys: Sequence[Tensor | None], momentum_sr: bool) -> dict[str, Any]:
    """The fused kernels' rounding arguments for this call's ``keys`` (from :func:`sr_keys_of`): ``sr_keys`` as
    Python ints (0 for a tensor without a generator, which the kernels ignore) and ``momentum_sr``; empty when no
    tensor rounds stochastically. The keys are CPU tensors on this path, so reading them back costs no device
    sync."""
    if all(k is None for k in keys):
        return {}
    ints = torch.stack([k if k is not None else torch.zeros((), dtype=torch.int64) for k in keys])
    return {"sr_keys": ints.tolist(), "momentum_sr": momentum_sr}


def sr_advance(states: Sequence[dict[str, Any] | None]) -> None:
    """Count one rounding call for every state holding a generator."""
    steps = [st["sr_step"] for st in states if st is not None]
    if steps:
        torch._foreach_add_(steps, 1)


def sr_fold_key(state: dict[str, Any], n: int) -> Tensor:
    """Key of the ``n``-th fold (0, 1, ...) of a low-precision momentum within one ``step()`` call (Tiger's
    fold-in-backward mode), for ``store_(..., momentum=True)``: the step key itself for the first (so a single
    fold rounds as the standard path's momentum write), ``hash32((step_key(...) ^ MOMENTUM_SALT) + n)`` after it,
    so several backward passes per step (Lightning's ``accumulate_grad_batches``) draw independent bits."""
    key = step_key(state["sr_stream"], state["sr_step"])
    return key if n == 0 else hash32(((key ^ MOMENTUM_SALT) + n) & MASK32)


def kahan_buffer(state: dict[str, Any], p: Tensor, compensation: str | None) -> Tensor | None:
    """The Kahan compensation buffer of a bf16/fp16 parameter under ``compensation="kahan"`` (zeros of its dtype,
    created on first use); None otherwise."""
    if compensation != "kahan" or not is_low_precision(p):
        return None
    comp = state.get(KAHAN_KEY)
    if comp is None:
        comp = state[KAHAN_KEY] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return comp
