"""Tiger's per-parameter settings: the learning-rate modes, the named settings record and the effective rate η.

η of one tensor (Su 2023, kexue.fm/archives/9512, "Tiger" update rule; bojone/tiger ``tiger.py``)::

    constant:        η = lr                           (bias and norm kinds: lr already halved)
    whole-tensor:    η = lr · max(RMS(θ), floor)      (matrices, conv kernels)
    per row:         η = lr · max(RMS(θ[r]), floor)   (embedding tables, rows of θ viewed as [shape[0], -1])

The floor keeps (near) zero-initialised tensors moving (:func:`auto_rms_floor`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "LR_CONSTANT",
    "LR_RMS",
    "LR_ROW_RMS",
    "TigerParamSettings",
    "auto_rms_floor",
    "effective_lr",
    "eta_of_norm",
]

LR_CONSTANT, LR_RMS, LR_ROW_RMS = 0, 1, 2
"""The ``lr_mode`` values: constant rate, rate relative to the tensor's RMS, relative to each row's RMS."""


class TigerParamSettings(NamedTuple):
    """What Tiger applies to one parameter, from its kind and its group (see :meth:`Tiger.param_settings`).

    Attributes:
        lr_mode: :data:`LR_CONSTANT`, :data:`LR_RMS` or :data:`LR_ROW_RMS`.
        lr: the group's ``lr`` (halved for bias and norm kinds).
        weight_decay: λ (0 for bias and norm kinds).
        center: the centre c of the non-finite shrink ``θ ← c + s·(θ − c)`` (1 for norm scales, else 0).
        rms_floor: the floor of the RMS in η.
    """

    lr_mode: int
    lr: float
    weight_decay: float
    center: float
    rms_floor: float


def auto_rms_floor(shape: Sequence[int] | torch.Size) -> float:
    """The automatic RMS floor of a tensor: ``0.1 / sqrt(fan_in)`` with ``fan_in = numel / shape[0]``.

    ``fan_in`` is the input size of a ``Linear``/``Conv`` weight (``[out, in, *kernel]``) and the row width of an
    embedding table (``[vocab, dim]``). One tenth of ``1/sqrt(fan_in)`` stays below PyTorch's default init RMS
    (``1/sqrt(3·fan_in)`` ≈ 0.58/sqrt(fan_in)) and below usual LM inits (std 0.02 at d ≥ 256), so it only acts on
    (near) zero-initialised tensors, which would otherwise never move. 0 for scalars and empty tensors.
    """
    if len(shape) == 0:
        return 0.0
    numel = math.prod(shape)
    if numel == 0:
        return 0.0
    return 0.1 / math.sqrt(numel / shape[0])


def effective_lr(theta: Tensor, mode: int, lr: float, floor: float) -> Tensor | float:
    """Effective learning rate η of one tensor, computed in ``theta``'s dtype (pass it upcast to float32).

    Stays on the device (no host sync).

    Returns:
        ``lr`` (a float) for :data:`LR_CONSTANT`; a 0-dim tensor for :data:`LR_RMS` (and for a 0/1-dim tensor in
        :data:`LR_ROW_RMS`); a ``[shape[0], 1, ...]`` tensor (broadcastable against θ) for :data:`LR_ROW_RMS`.
    """
    if mode == LR_CONSTANT:
        return lr
    if mode == LR_ROW_RMS and theta.ndim >= 2:
        rows = theta.reshape(theta.shape[0], -1)
        rms = torch.linalg.vector_norm(rows, dim=1, keepdim=True) / math.sqrt(rows.shape[1])
        return (rms.clamp_min(floor) * lr).reshape((theta.shape[0],) + (1,) * (theta.ndim - 1))
    if theta.numel() == 0:
        return lr * floor
    return eta_of_norm(torch.linalg.vector_norm(theta), theta.numel(), lr, floor)


def eta_of_norm(norm: Tensor, numel: int, lr: float, floor: float) -> Tensor:
    """``lr · max(norm / sqrt(numel), floor)``: η of a whole tensor from its 2-norm."""
    return (norm / math.sqrt(numel)).clamp_min(floor) * lr
