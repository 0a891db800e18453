"""Straightforward per-tensor references for Tiger and Lion, written from the published rules (not from the package):
Lion: Chen et al. 2023, Algorithm 2; Tiger: Su 2023, kexue.fm/archives/9512 and bojone/tiger ``tiger.py``.

Shared by the optimizer tests of CORE and FUSED. The API is stable:

``reference_tiger_step(params, grads, moms, *, kinds, lr, beta, weight_decay, grad_accum_steps, micro_step,
shrink_ratio, rms_floor) -> list[bool]``
    One Tiger micro-step (the official TF code, bojone/tiger ``tiger.py``), in place, per tensor, in float64:

    - ``params``, ``grads``, ``moms``: equal-length sequences of tensors (any float dtype, dense). A ``None`` grad
      means the tensor is skipped entirely (momentum and parameter untouched), like a variable without gradient.
    - ``kinds``: per tensor, one of ``"matrix"``, ``"embedding"``, ``"bias"``, ``"norm_scale"``, ``"norm_shift"``
      (``ParamKind`` members compare equal to these strings).
    - ``lr``, ``weight_decay``, ``rms_floor``: a float for all tensors or a per-tensor sequence. ``lr`` is the
      relative learning rate α *after* the schedule. ``rms_floor=None`` means the automatic floor
      ``0.1 / sqrt(numel / shape[0])`` (0.1/sqrt(fan_in) for a matrix, 0.1/sqrt(dim) for an embedding row).
    - ``beta``, ``grad_accum_steps`` (k), ``micro_step`` (t, counted from 0), ``shrink_ratio`` (s): floats/ints.

    Per tensor: ``nonfinite = not all(isfinite(g))``. If nonfinite: ``m`` unchanged and ``θ ← (θ − c)·s + c``
    (c = 1 for ``norm_scale``, else 0), on any micro-step. Otherwise ``m ← b1·m + b2·g`` with
    ``b1 = β if t % k == 0 else 1``, ``b2 = (1 − β)/k``, and only when ``(t + 1) % k == 0``:
    ``θ ← θ − η·(sign(m) + λ·θ)`` (m as stored, i.e. rounded to its dtype) where, for matrices (and
    embeddings with ndim < 2)
    ``η = α·max(RMS(θ), floor)``, for embeddings ``η = α·max(RMS(row of θ), floor)`` per row of θ viewed as
    ``[shape[0], -1]``, for bias/norm kinds ``η = 0.5·α`` and ``λ = 0``. RMS is taken on θ before the update.
    Math runs in float64; results are cast back to each tensor's dtype (pass float64 clones for an exact
    high-precision trajectory). Returns the per-tensor nonfinite flags (False for skipped tensors).

``reference_lion_step(params, grads, moms, *, lr, beta1, beta2, weight_decay) -> None``
    One Lion step in the paper's order (Chen et al. 2023, Algorithm 2), in place, float64 math: ``c = β1·m + (1−β1)·g``;
    ``θ ← θ·(1 − η·λ)``; ``θ ← θ − η·sign(c)``; ``m ← β2·m + (1−β2)·g``. ``None`` grads are skipped entirely.

``reference_piecewise_linear(t, schedule, from_zero=True) -> float``
    The official ``piecewise_linear`` schedule multiplier at step ``t``.

Test fixtures (also shared): ``Mixed`` (a model with every parameter kind) and ``MIXED_KINDS`` (its
hand-written kinds), ``PATHS`` (pytest params: single-tensor, foreach, fused), ``fused_ok()``,
``random_grads(model, steps, seed)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import pairwise

import pytest
import torch
from torch import nn

_SHRINK_ONE = ("norm_scale",)
_HALF_LR_NO_DECAY = ("bias", "norm_scale", "norm_shift")


def _per_tensor(value: float | Sequence[float] | None, i: int) -> float | None:
    if value is None or isinstance(value, (int, float)):
        return value
    return value[i]


def auto_rms_floor(shape: Sequence[int]) -> float:
    """The automatic RMS floor: ``0.1 / sqrt(numel / shape[0])`` (0 for tensors with ndim < 1 or no elements)."""
    if len(shape) == 0:
        return 0.0
    numel = math.prod(shape)
    if numel == 0:
        return 0.0
    return 0.1 / math.sqrt(numel / shape[0])


@torch.no_grad()
def reference_tiger_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    moms: Sequence[torch.Tensor],
    *,
    kinds: Sequence[str],
    lr: float | Sequence[float],
    beta: float,
    weight_decay: float | Sequence[float],
    grad_accum_steps: int,
    micro_step: int,
    shrink_ratio: float,
    rms_floor: float | Sequence[float] | None,
) -> list[bool]:
    """One Tiger micro-step, in place (see the module docstring for the full contract)."""
    k, t = grad_accum_steps, micro_step
    b1 = beta if t % k == 0 else 1.0
    b2 = (1.0 - beta) / k
    final = (t + 1) % k == 0
    flags: list[bool] = []
    for i, (p, g, m) in enumerate(zip(params, grads, moms, strict=True)):
        if g is None:
            flags.append(False)
            continue
        kind = str(getattr(kinds[i], "value", kinds[i]))
        theta = p.detach().to(torch.float64)
        mom = m.detach().to(torch.float64)
        grad = g.detach().to(torch.float64)
        nonfinite = not bool(torch.isfinite(grad).all())
        flags.append(nonfinite)
        if nonfinite:
            c = 1.0 if kind in _SHRINK_ONE else 0.0
            p.copy_((theta - c) * shrink_ratio + c)
            continue
        new_m = b1 * mom + b2 * grad
        m.copy_(new_m)
        if not final:
            continue
        alpha = float(_per_tensor(lr, i))
        wd = float(_per_tensor(weight_decay, i))
        floor = _per_tensor(rms_floor, i)
        if floor is None:
            floor = auto_rms_floor(tuple(p.shape))
        if kind in _HALF_LR_NO_DECAY:
            eta: torch.Tensor | float = 0.5 * alpha
            wd = 0.0
        elif kind == "embedding" and theta.ndim >= 2:
            rows = theta.reshape(theta.shape[0], -1)
            rms = rows.pow(2).mean(dim=1, keepdim=True).sqrt().clamp_min(floor)
            eta = (alpha * rms).reshape((theta.shape[0],) + (1,) * (theta.ndim - 1))
        elif kind in ("matrix", "embedding"):
            rms = math.sqrt(theta.pow(2).mean().item()) if theta.numel() else 0.0
            eta = alpha * max(rms, floor)
        else:
            raise ValueError(f"unknown kind {kind!r}")
        # sign of the momentum as stored (after rounding to m's dtype), like the official sign(m_t) of the slot
        p.copy_(theta - eta * (torch.sign(m.to(torch.float64)) + wd * theta))
    return flags


@torch.no_grad()
def reference_lion_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    moms: Sequence[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> None:
    """One Lion step, in place, in the paper's order of operations (Chen et al. 2023, Algorithm 2)."""
    for p, g, m in zip(params, grads, moms, strict=True):
        if g is None:
            continue
        theta = p.detach().to(torch.float64)
        mom = m.detach().to(torch.float64)
        grad = g.detach().to(torch.float64)
        c = beta1 * mom + (1.0 - beta1) * grad
        theta = theta * (1.0 - lr * weight_decay)
        theta = theta - lr * torch.sign(c)
        p.copy_(theta)
        m.copy_(beta2 * mom + (1.0 - beta2) * grad)


def reference_piecewise_linear(t: float, schedule: Mapping[int, float], from_zero: bool = True) -> float:
    """The official ``piecewise_linear(t, schedule, from_zero)`` (bojone/tiger), in plain Python."""
    points = sorted((int(k), float(v)) for k, v in schedule.items())
    if from_zero and points[0][0] != 0:
        points = [(0, 0.0), *points]
    if t < points[0][0]:
        return points[0][1]
    for (t0, x0), (t1, x1) in pairwise(points):
        if t0 <= t < t1:
            return x0 + (x1 - x0) * (t - t0) / (t1 - t0)
    return points[-1][1]


# ------------------------------------------------------------------------------------------------------
# Shared test fixtures: a model with every parameter kind, the dispatch paths, reproducible gradients.

# Hand-written expected kinds (the ParamKind table), independent of classify_parameters.
MIXED_KINDS = {
    "emb.weight": "embedding",
    "lin.weight": "matrix",
    "lin.bias": "bias",
    "ln.weight": "norm_scale",
    "ln.bias": "norm_shift",
    "rms.weight": "norm_scale",
    "zero.weight": "matrix",
    "zero.bias": "bias",
    "head.weight": "matrix",
}


class Mixed(nn.Module):
    """Embedding, Linear, LayerNorm, RMSNorm, a zero-initialised Linear and a bias-free head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.lin = nn.Linear(6, 8)
        self.ln = nn.LayerNorm(8)
        self.rms = nn.RMSNorm(8)
        self.zero = nn.Linear(8, 4)
        self.head = nn.Linear(4, 3, bias=False)
        with torch.no_grad():
            self.zero.weight.zero_()
            # Move norm parameters off their init so that the shrink centre and the updates are visible.
            self.ln.weight.add_(0.3 * torch.randn(8))
            self.ln.bias.add_(0.3 * torch.randn(8))
            self.rms.weight.add_(0.3 * torch.randn(8))
            self.emb.weight[3].mul_(5.0)  # rows of different scales: per-row RMS matters

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.rms(self.ln(torch.tanh(self.lin(self.emb(idx)))))
        return self.head(torch.tanh(self.zero(h)))


def fused_ok() -> bool:
    try:
        from lightning_tiger.optim import _fused
    except ImportError:
        return False
    try:
        return bool(_fused.fused_available(torch.device("cpu")))
    except Exception:
        return False


PATHS = [
    pytest.param({"foreach": False, "fused": False}, id="single"),
    pytest.param({"foreach": True, "fused": False}, id="foreach"),
    pytest.param({"fused": True}, id="fused",
                 marks=pytest.mark.skipif(not fused_ok(), reason="fused kernels unavailable")),
]


def random_grads(model: nn.Module, steps: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in model.named_parameters()}
        for _ in range(steps)
    ]
