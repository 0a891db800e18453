"""Pure-PyTorch Tiger and Lion updates: single-tensor and ``foreach`` flavours (the documented fallback).

These functions implement the same contract as the compiled kernels of ``lightning_tiger.optim._fused``
(``tiger_step_`` / ``lion_step_``), so the optimizer classes can dispatch to any of the three paths and get
the same semantics (up to floating-point rounding). Formulas: SPEC §1.1 (Lion) and §1.2 (Tiger), checked
against the official TF code (bojone/tiger ``tiger.py``).

Tiger contract, per tensor ``i`` (``lr_modes``: 0 = constant, 1 = whole-tensor RMS, 2 = per-row RMS)::

    nonfinite_i = not all(isfinite(g_i))
    if nonfinite_i:  m_i unchanged;  θ_i ← (θ_i − c_i)·s + c_i              (on every micro-step)
    else:            m_i ← b1·m_i + b2·g_i
                     if update:  η = lrs[i] · {1, max(RMS(θ_i), floor_i), max(RMS(row of θ_i), floor_i)}[mode]
                                 θ_i ← θ_i − η·(sign(m_i) + wd_i·θ_i)

``lrs[i]`` already carries the 0.5 factor of bias/norm kinds and ``wd_i`` is 0 for them. RMS is taken on θ
before the update; rows are those of θ viewed as ``[shape[0], -1]``. Math runs in float32 (float64 for float64
tensors) whatever the storage dtype of θ and m; results are rounded once to the storage dtype.
The decay is applied as ``θ·(1 − η·λ) − η·sign(m)``, algebraically the same as the formula above.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "auto_rms_floor",
    "lion_step_foreach_",
    "lion_step_single_",
    "nonfinite_flags",
    "tiger_fold_",
    "tiger_shrink_",
    "tiger_sparse_step_",
    "tiger_step_foreach_",
    "tiger_step_single_",
    "tiger_update_",
]

LR_CONSTANT, LR_RMS, LR_ROW_RMS = 0, 1, 2


def auto_rms_floor(shape: Sequence[int] | torch.Size) -> float:
    """The automatic RMS floor of a tensor: ``0.1 / sqrt(fan_in)`` with ``fan_in = numel / shape[0]``.

    ``fan_in`` is the input size of a ``Linear``/``Conv`` weight (``[out, in, *kernel]``) and the row width of an
    embedding table (``[vocab, dim]``). One tenth of ``1/sqrt(fan_in)`` stays below PyTorch's default init RMS
    (``1/sqrt(3·fan_in)`` ≈ 0.58/sqrt(fan_in)) and below usual LM inits (std 0.02 at d ≥ 256), so it only acts on
    (near) zero-initialised tensors, which would otherwise never move (SPEC §1.2). 0 for scalars and empty tensors.
    """
    if len(shape) == 0:
        return 0.0
    numel = math.prod(shape)
    if numel == 0:
        return 0.0
    return 0.1 / math.sqrt(numel / shape[0])


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Math in float32 at least (bf16/fp16 storage), float64 stays float64.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _upcast(t: Tensor) -> Tensor:
    """``t`` itself when already in its compute dtype (updated in place), else a float32 copy."""
    return t if t.dtype == _compute_dtype(t.dtype) else t.to(_compute_dtype(t.dtype))


def nonfinite_flags(grads: Sequence[Tensor]) -> list[bool]:
    """Per tensor: does it hold a NaN or ±inf? One host synchronisation for the whole list.

    Uses the infinity norm (max |g|), which propagates NaN and inf and cannot overflow for finite values (unlike
    a sum or a 2-norm, which can overflow in fp16 and give false positives).
    """
    if not grads:
        return []
    nonempty = [g for g in grads if g.numel() > 0]
    if not nonempty:
        return [False] * len(grads)
    norms = torch._foreach_norm(nonempty, float("inf"))
    if len({n.device for n in norms}) == 1:
        finite = torch.stack([torch.isfinite(n) for n in norms]).tolist()
    else:  # tensors on several devices (model parallel): one sync per tensor
        finite = [bool(torch.isfinite(n)) for n in norms]
    it = iter(finite)
    return [(not next(it)) if g.numel() > 0 else False for g in grads]


def _eta(theta: Tensor, mode: int, lr: float, floor: float) -> Tensor | float:
    """Effective learning rate η of one tensor (a float, a 0-dim tensor or a ``[rows, 1, ...]`` tensor)."""
    if mode == LR_CONSTANT:
        return lr
    if mode == LR_ROW_RMS and theta.ndim >= 2:
        rows = theta.reshape(theta.shape[0], -1)
        rms = torch.linalg.vector_norm(rows, dim=1, keepdim=True) / math.sqrt(rows.shape[1])
        return (rms.clamp_min(floor) * lr).reshape((theta.shape[0],) + (1,) * (theta.ndim - 1))
    if theta.numel() == 0:
        return lr * floor
    rms = torch.linalg.vector_norm(theta) / math.sqrt(theta.numel())
    return rms.clamp_min(floor) * lr


def _apply_update(theta: Tensor, mom: Tensor, mode: int, lr: float, wd: float, floor: float) -> None:
    """θ ← θ − η·(sign(m) + λ·θ), written as θ·(1 − ηλ) − η·sign(m); ``theta``/``mom`` in compute dtype."""
    eta = _eta(theta, mode, lr, floor)
    if wd != 0.0:
        theta.mul_(1.0 - eta * wd)
    # The sign of the momentum *as stored* (bf16/fp16 momentum: after rounding), like the official code, which
    # takes sign(m_t) of the assigned slot, and like the fused kernels.
    step = torch.sign(mom)
    if step.dtype != theta.dtype:
        step = step.to(theta.dtype)
    theta.sub_(step.mul_(eta))


def _shrink(theta: Tensor, center: float, s: float) -> None:
    """θ ← (θ − c)·s + c, in place (c = 0 skips the two additions, which are exact no-ops then)."""
    if center == 0.0:
        theta.mul_(s)
    else:
        theta.sub_(center).mul_(s).add_(center)


@torch.no_grad()
def tiger_step_single_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    moms: Sequence[Tensor],
    *,
    lr_modes: Sequence[int],
    lrs: Sequence[float],
    weight_decays: Sequence[float],
    centers: Sequence[float],
    rms_floor: Sequence[float],
    b1: float,
    b2: float,
    update: bool,
    shrink_ratio: float,
) -> list[bool]:
    """One Tiger micro-step, one tensor at a time (contract in the module docstring). Returns nonfinite flags.

    Args:
        params: parameters θ_i (any float dtype, dense), updated in place.
        grads: gradients g_i (dense, same shape as θ_i).
        moms: momenta m_i (same shape, any float dtype), updated in place.
        lr_modes, lrs, weight_decays, centers, rms_floor: per-tensor settings.
        b1, b2: momentum coefficients of this micro-step.
        update: whether this is the last micro-step of the accumulation window (θ moves).
        shrink_ratio: s of the non-finite rule.
    """
    flags = nonfinite_flags(grads)
    for i, (p, g, m) in enumerate(zip(params, grads, moms)):
        if flags[i]:
            tiger_shrink_([p], [centers[i]], shrink_ratio)
            continue
        mom = _upcast(m)
        if b1 != 1.0:
            mom.mul_(b1)
        mom.add_(g.to(mom.dtype), alpha=b2)
        if mom is not m:
            m.copy_(mom)
        if update:  # θ is read (and, for bf16/fp16, copied to float32) only when it moves
            theta = _upcast(p)
            _apply_update(theta, m, lr_modes[i], lrs[i], weight_decays[i], rms_floor[i])
            if theta is not p:
                p.copy_(theta)
    return flags


def _group_by_dtype(indices: Sequence[int], *lists: Sequence[Tensor]) -> dict[tuple, list[int]]:
    out: dict[tuple, list[int]] = defaultdict(list)
    for i in indices:
        out[tuple((lst[i].device, lst[i].dtype) for lst in lists)].append(i)
    return out


@torch.no_grad()
def tiger_step_foreach_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    moms: Sequence[Tensor],
    *,
    lr_modes: Sequence[int],
    lrs: Sequence[float],
    weight_decays: Sequence[float],
    centers: Sequence[float],
    rms_floor: Sequence[float],
    b1: float,
    b2: float,
    update: bool,
    shrink_ratio: float,
) -> list[bool]:
    """Same as :func:`tiger_step_single_` with ``torch._foreach_*`` kernels over tensors of equal device/dtype."""
    flags = nonfinite_flags(grads)
    finite = [i for i in range(len(params)) if not flags[i]]
    for idx in _group_by_dtype(finite, params, grads, moms).values():
        ms = [_upcast(moms[i]) for i in idx]
        gs = [grads[i] if grads[i].dtype == ms[0].dtype else grads[i].to(ms[0].dtype) for i in idx]
        if b1 != 1.0:
            torch._foreach_mul_(ms, b1)
        torch._foreach_add_(ms, gs, alpha=b2)
        for j, i in enumerate(idx):
            if ms[j] is not moms[i]:
                moms[i].copy_(ms[j])
        if update:  # θ is read (and, for bf16/fp16, copied to float32) only when it moves
            ps = [_upcast(params[i]) for i in idx]
            _foreach_update(ps, [moms[i] for i in idx], [lr_modes[i] for i in idx], [lrs[i] for i in idx],
                            [weight_decays[i] for i in idx], [rms_floor[i] for i in idx])
            for j, i in enumerate(idx):
                if ps[j] is not params[i]:
                    params[i].copy_(ps[j])
    bad = [i for i in range(len(params)) if flags[i]]
    tiger_shrink_([params[i] for i in bad], [centers[i] for i in bad], shrink_ratio)
    return flags


def _foreach_update(
    ps: list[Tensor], ms: list[Tensor], modes: list[int], lrs: list[float], wds: list[float], floors: list[float]
) -> None:
    """θ ← θ·(1 − ηλ) − η·sign(m) for same-dtype lists; per-row modes fall back to one tensor at a time."""
    scalar = [j for j in range(len(ps)) if not (modes[j] == LR_ROW_RMS and ps[j].ndim >= 2)]
    for j in sorted(set(range(len(ps))) - set(scalar)):
        _apply_update(ps[j], ms[j], modes[j], lrs[j], wds[j], floors[j])
    if not scalar:
        return
    sp = [ps[j] for j in scalar]
    etas = [lrs[j] for j in scalar]
    rms_j = [j for j in scalar if modes[j] == LR_RMS and ps[j].numel() > 0]
    if rms_j:
        norms = torch._foreach_norm([ps[j] for j in rms_j])
        rms = (torch.stack(norms).double() / torch.tensor(
            [math.sqrt(ps[j].numel()) for j in rms_j], dtype=torch.float64, device=norms[0].device)).tolist()
        pos = {j: n for n, j in enumerate(rms_j)}
        etas = [lrs[j] * max(rms[pos[j]], floors[j]) if j in pos else
                (lrs[j] * floors[j] if modes[j] == LR_RMS else lrs[j]) for j in scalar]
    decay = [1.0 - e * wds[j] for e, j in zip(etas, scalar)]
    if any(d != 1.0 for d in decay):
        torch._foreach_mul_(sp, decay)
    signs = torch._foreach_sign([ms[j] for j in scalar])  # sign of the momentum as stored
    signs = [x if x.dtype == p.dtype else x.to(p.dtype) for x, p in zip(signs, sp)]
    torch._foreach_mul_(signs, etas)
    torch._foreach_sub_(sp, signs)


@torch.no_grad()
def tiger_shrink_(params: Sequence[Tensor], centers: Sequence[float], shrink_ratio: float) -> None:
    """θ_i ← (θ_i − c_i)·s + c_i for every tensor (the non-finite rule), math in float32 at least."""
    for p, c in zip(params, centers):
        theta = _upcast(p)
        _shrink(theta, c, shrink_ratio)
        if theta is not p:
            p.copy_(theta)


@torch.no_grad()
def tiger_update_(
    params: Sequence[Tensor],
    moms: Sequence[Tensor],
    *,
    lr_modes: Sequence[int],
    lrs: Sequence[float],
    weight_decays: Sequence[float],
    rms_floor: Sequence[float],
    foreach: bool = False,
) -> None:
    """The parameter move of the last micro-step alone (momentum already folded): θ ← θ − η·(sign(m) + λθ).

    Used by the fold-in-backward mode, whose hooks have already folded every gradient into ``moms``.
    """
    if foreach:
        for idx in _group_by_dtype(range(len(params)), params, moms).values():
            ps = [_upcast(params[i]) for i in idx]
            ms = [moms[i] for i in idx]
            _foreach_update(ps, ms, [lr_modes[i] for i in idx], [lrs[i] for i in idx],
                            [weight_decays[i] for i in idx], [rms_floor[i] for i in idx])
            for j, i in enumerate(idx):
                if ps[j] is not params[i]:
                    params[i].copy_(ps[j])
        return
    for i, (p, m) in enumerate(zip(params, moms)):
        theta = _upcast(p)
        _apply_update(theta, m, lr_modes[i], lrs[i], weight_decays[i], rms_floor[i])
        if theta is not p:
            p.copy_(theta)


@torch.no_grad()
def tiger_fold_(grad: Tensor, mom: Tensor, b1: float, b2: float) -> None:
    """m ← b1·m + b2·g for one tensor (math in float32 at least), the fold of one backward pass."""
    m = _upcast(mom)
    if b1 != 1.0:
        m.mul_(b1)
    m.add_(grad.to(m.dtype), alpha=b2)
    if m is not mom:
        mom.copy_(m)


@torch.no_grad()
def tiger_sparse_step_(
    param: Tensor,
    grad: Tensor,
    mom: Tensor,
    *,
    lr_mode: int,
    lr: float,
    weight_decay: float,
    center: float,
    rms_floor: float,
    b1: float,
    b2: float,
    update: bool,
    shrink_ratio: float,
) -> bool:
    """Lazy Tiger step for a sparse row gradient (``nn.Embedding(sparse=True)``): only rows with a gradient move.

    For the rows ``r`` present in ``grad`` (coalesced, duplicates summed): ``m[r] ← b1·m[r] + b2·g[r]`` and, if
    ``update``, ``θ[r] ← θ[r] − η·(sign(m[r]) + λ·θ[r])``; every other row keeps its parameter *and* its momentum
    (no decay). This is the remedy of SPEC §1.2's embedding caveat (rare tokens no longer drift to ±1/λ) and
    differs from the official code, whose sparse path decays the momentum of every row and moves every row.
    ``lr_mode`` 2 uses the RMS of each row, mode 1 the RMS of the whole table (read in full), mode 0 ``lr``.
    A non-finite value shrinks the whole tensor (per-tensor rule). Returns the nonfinite flag.
    """
    g = grad.coalesce()
    if g.sparse_dim() != 1:
        raise ValueError(f"sparse gradients must be sparse along dim 0 only, got sparse_dim={g.sparse_dim()}")
    rows, values = g.indices()[0], g.values()
    if values.numel() > 0 and not bool(torch.isfinite(values).all()):
        tiger_shrink_([param], [center], shrink_ratio)
        return True
    if rows.numel() == 0:
        return False
    m_rows = mom.index_select(0, rows).to(_compute_dtype(mom.dtype))
    if b1 != 1.0:
        m_rows.mul_(b1)
    m_rows.add_(values.to(m_rows.dtype), alpha=b2)
    m_rows = m_rows.to(mom.dtype)  # sign of the momentum as stored
    mom.index_copy_(0, rows, m_rows)
    if update:
        theta_rows = param.index_select(0, rows).to(_compute_dtype(param.dtype))
        if lr_mode == LR_RMS:
            eta: Tensor | float = _eta(_upcast(param), LR_RMS, lr, rms_floor)
        else:
            eta = _eta(theta_rows, lr_mode, lr, rms_floor)
        if weight_decay != 0.0:
            theta_rows.mul_(1.0 - eta * weight_decay)
        theta_rows.sub_(torch.sign(m_rows).to(theta_rows.dtype).mul_(eta))
        param.index_copy_(0, rows, theta_rows.to(param.dtype))
    return False


@torch.no_grad()
def lion_step_single_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    moms: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> None:
    """One Lion step per tensor, the paper's order (SPEC §1.1), math in float32 at least.

    ``c = β1·m + (1−β1)·g``; ``θ ← θ·(1 − η·λ)``; ``θ ← θ − η·sign(c)``; ``m ← β2·m + (1−β2)·g``.
    """
    for p, g, m in zip(params, grads, moms):
        theta, mom = _upcast(p), _upcast(m)
        g32 = g.to(mom.dtype)
        c = mom.mul(beta1).add_(g32, alpha=1.0 - beta1)
        if weight_decay != 0.0:
            theta.mul_(1.0 - lr * weight_decay)
        theta.sub_(c.sign_().mul_(lr))
        mom.mul_(beta2).add_(g32, alpha=1.0 - beta2)
        if theta is not p:
            p.copy_(theta)
        if mom is not m:
            m.copy_(mom)


@torch.no_grad()
def lion_step_foreach_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    moms: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> None:
    """Same as :func:`lion_step_single_` with ``torch._foreach_*`` kernels (grouped by device and dtype)."""
    for idx in _group_by_dtype(range(len(params)), params, grads, moms).values():
        ps = [_upcast(params[i]) for i in idx]
        ms = [_upcast(moms[i]) for i in idx]
        gs = [grads[i] if grads[i].dtype == ms[0].dtype else grads[i].to(ms[0].dtype) for i in idx]
        cs = torch._foreach_mul(ms, beta1)
        torch._foreach_add_(cs, gs, alpha=1.0 - beta1)
        if weight_decay != 0.0:
            torch._foreach_mul_(ps, 1.0 - lr * weight_decay)
        torch._foreach_sign_(cs)
        torch._foreach_mul_(cs, lr)
        torch._foreach_sub_(ps, cs)
        torch._foreach_mul_(ms, beta2)
        torch._foreach_add_(ms, gs, alpha=1.0 - beta2)
        for j, i in enumerate(idx):
            if ps[j] is not params[i]:
                params[i].copy_(ps[j])
            if ms[j] is not moms[i]:
                moms[i].copy_(ms[j])


# ----------------------------------------------------------------------------------------------------------
# Validation and dispatch helpers shared by Tiger and Lion.

_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_float(name: str, value: Any, *, low: float, high: float | None = None, low_open: bool = False,
                high_open: bool = True) -> float:
    """``float(value)`` if it is a real number in the given range, else ``TypeError``/``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, Tensor) and value.numel() == 1 and not value.requires_grad:
            value = value.item()
        else:
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    rng = f"{lo}{low}, {'inf' if high is None else high}{hi if high is not None else ')'}"
    ok = math.isfinite(value) and (value > low if low_open else value >= low)
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ValueError(f"{name} must be in {rng}, got {value}")
    return value


def check_flag(name: str, value: Any, allow_none: bool = True) -> bool | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be {'None or ' if allow_none else ''}a bool, got {value!r}")
    return value


def momentum_of(state: dict[str, Any], key: str, p: Tensor, dtype: torch.dtype | None) -> Tensor:
    """``state[key]``, created as zeros like ``p`` in ``dtype`` (None: p's dtype) on first use."""
    m = state.get(key)
    if m is None:
        m = state[key] = torch.zeros_like(p, dtype=dtype or p.dtype, memory_format=torch.preserve_format)
    return m


def cast_momenta(states: Iterable[dict[str, Any]], key: str, dtype: torch.dtype | None) -> None:
    """After ``load_state_dict``: give every ``state[key]`` the optimizer's momentum dtype again (torch casts
    loaded state to the parameter's dtype). No-op for ``dtype=None``."""
    if dtype is None:
        return
    for state in states:
        m = state.get(key)
        if m is not None and m.dtype != dtype:
            state[key] = m.to(dtype)


def parse_dtype(name: str, value: Any) -> torch.dtype | None:
    """A floating ``torch.dtype`` from a dtype or its name (``"bfloat16"``, ``"torch.float16"``); None stays."""
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


def load_fused() -> ModuleType | None:
    """The compiled-kernel module ``lightning_tiger.optim._fused``, or None where it cannot be imported."""
    try:
        from lightning_tiger.optim import _fused
    except ImportError:
        return None
    return _fused


def fused_usable(fused_mod: ModuleType | None, params: Sequence[Tensor], grads: Sequence[Tensor],
                 moms: Sequence[Tensor]) -> bool:
    """Whether every (param, grad, momentum) triple qualifies for the fused kernels: dense, contiguous, CPU/CUDA,
    the grad in the param dtype, a dtype pair the kernels support (``_fused.fused_supports``; without it, fp32/
    bf16/fp16 with the momentum in the param dtype) and a device on which the kernels are available."""
    if fused_mod is None:
        return False
    supports = getattr(fused_mod, "fused_supports", None)
    strided = torch.strided
    devices: set[torch.device] = set()
    any_cpu = False
    # Runs on every step for every tensor: attribute tests only (``is_cpu`` instead of building torch.device
    # objects on the common all-CPU path).
    for p, g, m in zip(params, grads, moms):
        if not (p.is_contiguous() and g.is_contiguous() and m.is_contiguous()):
            return False
        if p.layout is not strided or g.layout is not strided or m.layout is not strided or g.dtype != p.dtype:
            return False
        if p.is_cpu and g.is_cpu and m.is_cpu:
            any_cpu = True
        else:
            dev = p.device
            if dev.type != "cuda" or g.device != dev or m.device != dev:
                return False
            devices.add(dev)
        if supports is not None:
            if not supports(p.dtype, m.dtype):
                return False
        elif p.dtype not in _FUSED_DTYPES or m.dtype != p.dtype:
            return False
    if any_cpu:
        devices.add(torch.device("cpu"))
    try:
        return all(fused_mod.fused_available(d) for d in devices)
    except Exception:  # a broken toolchain must not break training: fall back to the pure-PyTorch path
        return False


def step_path(fused: bool | None, foreach: bool | None, fused_mod: ModuleType | None, params: Sequence[Tensor],
              grads: Sequence[Tensor], moms: Sequence[Tensor]) -> str:
    """``"fused"``, ``"foreach"`` or ``"single"``: the path of one optimizer update over these tensors.

    Fused kernels when allowed (``fused`` not False, ``foreach`` not True) and usable (:func:`fused_usable`);
    ``fused=True`` that cannot be honoured raises ``RuntimeError`` (before anything is written). Otherwise
    ``foreach`` as given, or by default — like torch.optim — foreach on accelerators and one tensor at a time on
    CPU (smallest transient memory).
    """
    if fused is not False and not foreach and fused_usable(fused_mod, params, grads, moms):
        return "fused"
    if fused:
        raise RuntimeError(
            "fused=True but some tensors do not qualify for the fused kernels (they need dense, contiguous "
            "CPU/CUDA tensors with one fp32/bf16/fp16 dtype for parameter, gradient and momentum); use "
            "fused=None to fall back"
        )
    return "foreach" if use_foreach(foreach, params) else "single"


def use_foreach(foreach: bool | None, params: Sequence[Tensor]) -> bool:
    """``foreach`` as given, else True on accelerators and False on CPU (torch.optim's default)."""
    if foreach is not None:
        return foreach
    return all(p.device.type != "cpu" for p in params)


def fused_available_for(params: Sequence[Tensor]) -> bool:
    """Whether the fused kernels load for the devices of ``params`` (construction-time check of ``fused=True``)."""
    mod = load_fused()
    if mod is None:
        return False
    try:
        return all(mod.fused_available(d) for d in {p.device for p in params} or {torch.device("cpu")})
    except Exception:
        return False
