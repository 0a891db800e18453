"""Tiger's non-finite rule, shared by the optimizer and :class:`~lightning_tiger.callbacks.NonFiniteGuard`.

On a non-finite gradient the parameter shrinks toward its centre instead of moving (Su 2023,
kexue.fm/archives/9512; bojone/tiger ``tiger.py``: ``(var - c) * shrink_ratio + c``)::

    θ ← c + s·(θ − c)        c = 1 for norm scales, else 0;  s = shrink_ratio in (0, 1]

The math runs in float32 (float64 for float64 tensors) and the result is rounded once to θ's storage dtype: a
bf16 norm scale computed in bf16 would round after the subtraction, the product and the addition.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_tiger.optim._rounding import store_, upcast
from lightning_tiger.optim.param_groups import ParamKind

__all__ = ["shrink_", "shrink_center", "shrunk"]


def shrink_center(kind: ParamKind | str) -> float:
    """The centre c of the shrink for a parameter kind: 1 for ``norm_scale``, else 0."""
    return 1.0 if ParamKind.parse(kind) is ParamKind.NORM_SCALE else 0.0


def shrunk(theta: Tensor, center: float, s: float) -> Tensor:
    """``(θ − c)·s + c``, out of place, in ``theta``'s dtype (c = 0 skips the two additions, exact no-ops then)."""
    if center == 0.0:
        return theta.mul(s)
    return theta.sub(center).mul_(s).add_(center)


@torch.no_grad()
def shrink_(params: Sequence[Tensor], centers: Sequence[float], shrink_ratio: float) -> None:
    """θ_i ← (θ_i − c_i)·s + c_i in place for every tensor: math in float32 at least, rounded once to nearest.

    Args:
        params: the tensors to shrink (any float dtype).
        centers: c_i per tensor (:func:`shrink_center` of its kind).
        shrink_ratio: s in (0, 1].

    Raises:
        ValueError: ``params`` and ``centers`` differ in length.
    """
    if len(params) != len(centers):
        raise ValueError(f"params and centers must have the same length, got {len(params)} and {len(centers)}")
    for p, c in zip(params, centers):
        store_(p, shrunk(upcast(p), c, shrink_ratio))
