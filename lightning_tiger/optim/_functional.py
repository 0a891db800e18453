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

Low precision: a bf16/fp16 θ (and momentum) gets the float32 result rounded *stochastically* when the caller passes
a per-tensor key (``stochastic_rounding.py``: the same bits as the fused kernels, so all paths agree bit for bit),
Kahan-compensated when it passes a compensation buffer, else rounded to nearest.

Sync-free: nothing here reads a value back to the host (no ``.item()``, ``.tolist()``, ``bool(tensor)``, no branch on
data): the non-finite flags, RMS values and rates are device tensors and the non-finite rule is a ``torch.where``.
That is what lets ``torch.compile`` capture a whole ``step()`` (``fullgraph=True``) and what an accelerator wants
(no stall per step). The price is that both branches of the rule are computed and θ is rewritten on every
micro-step. The ``foreach`` flavour processes chunks of at most :data:`FOREACH_CHUNK_BYTES` (float32 bytes) at a
time, so temporaries stay bounded whatever the model size.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from lightning_tiger.optim.stochastic_rounding import (
    MASK32,
    MOMENTUM_SALT,
    hash32,
    step_key,
    stochastic_round,
    stream_of,
)

__all__ = [
    "FOREACH_CHUNK_BYTES",
    "auto_rms_floor",
    "is_low_precision",
    "kahan_store_",
    "lion_step_",
    "store_",
    "tiger_fold_",
    "tiger_fold_update_",
    "tiger_shrink_",
    "tiger_sparse_step_",
    "tiger_step_",
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
    """``t`` itself when already in its compute dtype, else a float32 copy."""
    return t if t.dtype == _compute_dtype(t.dtype) else t.to(_compute_dtype(t.dtype))


LOW_PRECISION = (torch.bfloat16, torch.float16)
FOREACH_CHUNK_BYTES = 32 << 20
"""Default bound of one foreach chunk: float32 bytes (4·numel) of the tensors processed together. Each chunk makes
a few float32 temporaries of its tensors (momentum, new momentum, θ, new θ), so the transient memory of a step is a
small multiple of this, not of the model (a single tensor larger than the bound forms a chunk of its own)."""


def is_low_precision(t: Tensor) -> bool:
    """Whether ``t`` is stored in bf16 or fp16 (the dtypes that stochastic rounding / Kahan apply to)."""
    return t.dtype in LOW_PRECISION


def _is_bad(g: Tensor) -> Tensor:
    """0-dim bool tensor on g's device: does ``g`` hold a NaN or ±inf? No host synchronisation.

    The infinity norm (max |g|) propagates NaN and inf and cannot overflow for finite values (unlike a sum or a
    2-norm, which can overflow in fp16 and give false positives). Empty tensors are finite.
    """
    if g.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=g.device)
    return torch.linalg.vector_norm(g, float("inf")).isfinite().logical_not()


def _bad_flags(grads: Sequence[Tensor], foreach: bool) -> list[Tensor]:
    """:func:`_is_bad` of every tensor (one ``_foreach_norm`` for the non-empty ones when ``foreach``)."""
    if not foreach:
        return [_is_bad(g) for g in grads]
    nonempty = [g for g in grads if g.numel() > 0]
    norms = iter(torch._foreach_norm(nonempty, float("inf")) if nonempty else [])
    return [next(norms).isfinite().logical_not() if g.numel() > 0 else _is_bad(g) for g in grads]


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
           old: Tensor | None = None) -> None:
    """Write ``value`` (the compute-dtype result) into ``dst``'s storage dtype, rounding once.

    Exact when the dtypes agree; else Kahan-compensated when ``comp`` is given (``old``: ``dst`` before, in the
    compute dtype), else stochastically rounded with ``key`` when given and ``dst`` is bf16/fp16
    (:func:`~lightning_tiger.optim.stochastic_rounding.stochastic_round`), else rounded to nearest.
    """
    if value.dtype == dst.dtype:
        if value is not dst:
            dst.copy_(value)
    elif comp is not None:
        kahan_store_(dst, value, dst.to(value.dtype) if old is None else old, comp)
    elif key is not None and dst.dtype in LOW_PRECISION and value.dtype == torch.float32:
        dst.copy_(stochastic_round(value, dst.dtype, key))
    else:
        dst.copy_(value)


def _eta(theta: Tensor, mode: int, lr: float, floor: float) -> Tensor | float:
    """Effective learning rate η of one tensor (a float, a 0-dim tensor or a ``[rows, 1, ...]`` tensor).

    Stays on the device (no host sync): ``lr·max(RMS, floor)`` as a tensor.
    """
    if mode == LR_CONSTANT:
        return lr
    if mode == LR_ROW_RMS and theta.ndim >= 2:
        rows = theta.reshape(theta.shape[0], -1)
        rms = torch.linalg.vector_norm(rows, dim=1, keepdim=True) / math.sqrt(rows.shape[1])
        return (rms.clamp_min(floor) * lr).reshape((theta.shape[0],) + (1,) * (theta.ndim - 1))
    if theta.numel() == 0:
        return lr * floor
    return _eta_of_norm(torch.linalg.vector_norm(theta), theta.numel(), lr, floor)


def _eta_of_norm(norm: Tensor, numel: int, lr: float, floor: float) -> Tensor:
    return (norm / math.sqrt(numel)).clamp_min(floor) * lr


def _moved(theta: Tensor, mom: Tensor, eta: Tensor | float, wd: float) -> Tensor:
    """θ·(1 − ηλ) − η·sign(m), out of place; ``mom`` as stored (its sign after rounding, like the official code,
    which takes sign(m_t) of the assigned slot, and like the fused kernels)."""
    out = theta.mul(1.0 - eta * wd) if wd != 0.0 else theta.clone()
    step = torch.sign(mom)
    if step.dtype != theta.dtype:
        step = step.to(theta.dtype)
    return out.sub_(step.mul_(eta))


def _shrunk(theta: Tensor, center: float, s: float) -> Tensor:
    """(θ − c)·s + c, out of place (c = 0 skips the two additions, which are exact no-ops then)."""
    if center == 0.0:
        return theta.mul(s)
    return theta.sub(center).mul_(s).add_(center)


def _select_theta(theta: Tensor, bad: Tensor, shrunk: Tensor, moved: Tensor | None, move: Tensor | None) -> Tensor:
    """θ's next value: shrunk where the gradient was non-finite, else moved (where ``move``), else θ."""
    if moved is None:
        nxt = theta
    elif move is None:
        nxt = moved
    else:
        nxt = torch.where(move, moved, theta)
    return torch.where(bad, shrunk, nxt)


def _mom_key(key: Tensor | None, momentum_sr: bool) -> Tensor | None:
    return key ^ MOMENTUM_SALT if key is not None and momentum_sr else None


def _chunks(idx: Sequence[int], tensors: Sequence[Tensor], limit: int) -> list[list[int]]:
    """Consecutive runs of ``idx`` whose float32 bytes (4·numel) stay within ``limit`` (at least one tensor)."""
    out: list[list[int]] = []
    cur: list[int] = []
    size = 0
    for i in idx:
        n = 4 * tensors[i].numel()
        if cur and size + n > limit:
            out.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += n
    if cur:
        out.append(cur)
    return out


def _group_by_dtype(indices: Iterable[int], *lists: Sequence[Tensor]) -> dict[tuple, list[int]]:
    out: dict[tuple, list[int]] = defaultdict(list)
    for i in indices:
        out[tuple((lst[i].device, lst[i].dtype) for lst in lists)].append(i)
    return out


def _per(values: Sequence[Any] | None, n: int) -> Sequence[Any]:
    return [None] * n if values is None else values


@torch.no_grad()
def tiger_step_(
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
    keys: Sequence[Tensor | None] | None = None,
    momentum_sr: bool = True,
    kahan: Sequence[Tensor | None] | None = None,
    foreach: bool = False,
    chunk_bytes: int | None = None,
) -> list[Tensor]:
    """One Tiger micro-step (contract in the module docstring), without any host synchronisation.

    The non-finite flags, RMS values and rates stay on the device as tensors and the shrink rule is a
    ``torch.where``, so the step can be captured whole by ``torch.compile`` (no data-dependent Python branch).
    θ is rewritten on every micro-step (unchanged values where it does not move).

    Args:
        params: parameters θ_i (any float dtype, dense), updated in place.
        grads: gradients g_i (dense, same shape as θ_i).
        moms: momenta m_i (same shape, any float dtype), updated in place.
        lr_modes, lrs, weight_decays, centers, rms_floor: per-tensor settings.
        b1, b2: momentum coefficients of this micro-step.
        update: whether this is the last micro-step of the accumulation window (θ moves).
        shrink_ratio: s of the non-finite rule.
        keys: per tensor, the stochastic-rounding key of this call (int64 0-dim tensor,
            :func:`~lightning_tiger.optim.stochastic_rounding.step_key`) or None (round to nearest). Used for a
            bf16/fp16 θ, and ``key ^ MOMENTUM_SALT`` for a bf16/fp16 momentum when ``momentum_sr``.
        momentum_sr: stochastically round low-precision momenta too (when a key is given).
        kahan: per tensor, a compensation buffer of θ's dtype (replaces stochastic rounding for θ) or None.
        foreach: ``torch._foreach_*`` kernels over chunks of tensors of one device/dtype (``chunk_bytes``).
        chunk_bytes: bound of one foreach chunk (float32 bytes of its tensors); None: :data:`FOREACH_CHUNK_BYTES`.

    Returns:
        Per tensor, a 0-dim bool tensor on its device: did its gradient hold a NaN or ±inf (then m_i was kept
        and θ_i shrunk).
    """
    n = len(params)
    keys, kahan = _per(keys, n), _per(kahan, n)
    flags: list[Tensor | None] = [None] * n
    if not foreach:
        for i in range(n):
            flags[i] = _tiger_one(params[i], grads[i], moms[i], lr_modes[i], lrs[i], weight_decays[i], centers[i],
                                  rms_floor[i], b1, b2, update, shrink_ratio, keys[i], momentum_sr, kahan[i])
        return flags  # type: ignore[return-value]
    for idx in _group_by_dtype(range(n), params, grads, moms).values():
        for chunk in _chunks(idx, params, chunk_bytes or FOREACH_CHUNK_BYTES):
            out = _tiger_chunk([params[i] for i in chunk], [grads[i] for i in chunk], [moms[i] for i in chunk],
                               [lr_modes[i] for i in chunk], [lrs[i] for i in chunk],
                               [weight_decays[i] for i in chunk], [centers[i] for i in chunk],
                               [rms_floor[i] for i in chunk], b1, b2, update, shrink_ratio,
                               [keys[i] for i in chunk], momentum_sr, [kahan[i] for i in chunk])
            for i, f in zip(chunk, out):
                flags[i] = f
    return flags  # type: ignore[return-value]


def _tiger_one(p: Tensor, g: Tensor, m: Tensor, mode: int, lr: float, wd: float, center: float, floor: float,
               b1: float, b2: float, update: bool, s: float, key: Tensor | None, momentum_sr: bool,
               comp: Tensor | None) -> Tensor:
    bad = _is_bad(g)
    m32 = _upcast(m)
    new_m = m32.mul(b1)
    new_m.add_(g.to(new_m.dtype), alpha=b2)
    store_(m, torch.where(bad, m32, new_m), _mom_key(key, momentum_sr))
    theta = _upcast(p)
    moved = _moved(theta, m, _eta(theta, mode, lr, floor), wd) if update else None
    store_(p, _select_theta(theta, bad, _shrunk(theta, center, s), moved, None), key, comp, theta)
    return bad


def _tiger_chunk(ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], modes: list[int], lrs: list[float],
                 wds: list[float], centers: list[float], floors: list[float], b1: float, b2: float, update: bool,
                 s: float, keys: list[Tensor | None], momentum_sr: bool, comps: list[Tensor | None]) -> list[Tensor]:
    """:func:`_tiger_one` over tensors of one device/dtype triple, elementwise work in ``_foreach`` kernels."""
    bads = _bad_flags(gs, foreach=True)
    m32 = [_upcast(m) for m in ms]
    cdt = m32[0].dtype
    new_m = torch._foreach_mul(m32, b1)
    torch._foreach_add_(new_m, [g.to(cdt) for g in gs], alpha=b2)
    for m, old, new, bad, key in zip(ms, m32, new_m, bads, keys):
        store_(m, torch.where(bad, old, new), _mom_key(key, momentum_sr))
    thetas = [_upcast(p) for p in ps]
    moved: list[Tensor | None] = [None] * len(ps)
    if update:
        moved = _foreach_moved(thetas, ms, modes, lrs, wds, floors)
    for j, p in enumerate(ps):
        nxt = _select_theta(thetas[j], bads[j], _shrunk(thetas[j], centers[j], s), moved[j], None)
        moved[j] = None  # free each temporary as soon as it is written
        store_(p, nxt, keys[j], comps[j], thetas[j])
    return bads


def _foreach_moved(thetas: list[Tensor], ms: list[Tensor], modes: list[int], lrs: list[float], wds: list[float],
                   floors: list[float]) -> list[Tensor | None]:
    """:func:`_moved` of every tensor (η per tensor from one ``_foreach_norm``; per-row modes one at a time)."""
    out: list[Tensor | None] = [None] * len(thetas)
    rows = [j for j in range(len(thetas)) if modes[j] == LR_ROW_RMS and thetas[j].ndim >= 2]
    for j in rows:
        out[j] = _moved(thetas[j], ms[j], _eta(thetas[j], modes[j], lrs[j], floors[j]), wds[j])
    scalar = [j for j in range(len(thetas)) if j not in set(rows)]
    if not scalar:
        return out
    etas: list[Tensor | float] = [lrs[j] for j in scalar]
    rms_j = [j for j in scalar if modes[j] == LR_RMS and thetas[j].numel() > 0]
    if rms_j:
        norms = torch._foreach_norm([thetas[j] for j in rms_j])
        by_j = {j: _eta_of_norm(nrm, thetas[j].numel(), lrs[j], floors[j]) for j, nrm in zip(rms_j, norms)}
        etas = [by_j[j] if j in by_j else (lrs[j] * floors[j] if modes[j] == LR_RMS else lrs[j]) for j in scalar]
    sp = [thetas[j] for j in scalar]
    decay = [1.0 - e * wds[j] for e, j in zip(etas, scalar)]
    if all(wds[j] == 0.0 for j in scalar):
        res = [t.clone() for t in sp]
    else:
        res = [t.mul(d) if wds[j] != 0.0 else t.clone() for t, d, j in zip(sp, decay, scalar)]
    signs = torch._foreach_sign([ms[j] for j in scalar])
    signs = [x if x.dtype == t.dtype else x.to(t.dtype) for x, t in zip(signs, sp)]
    for x, e in zip(signs, etas):
        x.mul_(e)
    torch._foreach_sub_(res, signs)
    for j, r in zip(scalar, res):
        out[j] = r
    return out


@torch.no_grad()
def tiger_fold_(grad: Tensor, mom: Tensor, b1: float | Tensor, b2: float, key: Tensor | None = None) -> Tensor:
    """m ← b1·m + b2·g for one tensor unless ``grad`` is non-finite (then m is kept), without host sync.

    The fold of one backward pass (fold-in-backward mode). ``b1`` may be a 0-dim tensor (chosen on the device),
    ``key`` the stochastic-rounding key of a low-precision momentum (None: round to nearest). Returns the
    non-finite flag (0-dim bool tensor).
    """
    bad = _is_bad(grad)
    m32 = _upcast(mom)
    new_m = m32.mul(b1.to(m32.dtype) if isinstance(b1, Tensor) else b1)
    new_m.add_(grad.to(new_m.dtype), alpha=b2)
    store_(mom, torch.where(bad, m32, new_m), key)
    return bad


@torch.no_grad()
def tiger_fold_update_(
    params: Sequence[Tensor],
    moms: Sequence[Tensor],
    bads: Sequence[Tensor],
    folded: Sequence[Tensor],
    *,
    lr_modes: Sequence[int],
    lrs: Sequence[float],
    weight_decays: Sequence[float],
    centers: Sequence[float],
    rms_floor: Sequence[float],
    update: bool,
    shrink_ratio: float,
    keys: Sequence[Tensor | None] | None = None,
    kahan: Sequence[Tensor | None] | None = None,
) -> None:
    """The parameter write of the fold-in-backward mode (gradients already folded into ``moms``), sync-free.

    Per tensor: θ shrinks where ``bads[i]`` (a non-finite gradient in the window), else moves by
    θ·(1 − ηλ) − η·sign(m) where ``update and folded[i]``, else stays.
    """
    n = len(params)
    keys, kahan = _per(keys, n), _per(kahan, n)
    for i, (p, m) in enumerate(zip(params, moms)):
        theta = _upcast(p)
        moved = _moved(theta, m, _eta(theta, lr_modes[i], lrs[i], rms_floor[i]), weight_decays[i]) if update else None
        nxt = _select_theta(theta, bads[i], _shrunk(theta, centers[i], shrink_ratio), moved, folded[i])
        store_(p, nxt, keys[i], kahan[i], theta)


@torch.no_grad()
def tiger_shrink_(params: Sequence[Tensor], centers: Sequence[float], shrink_ratio: float) -> None:
    """θ_i ← (θ_i − c_i)·s + c_i for every tensor (the non-finite rule), math in float32 at least, rounded to
    nearest (the sparse path's rule)."""
    for p, c in zip(params, centers):
        store_(p, _shrunk(_upcast(p), c, shrink_ratio))


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
    A non-finite value shrinks the whole tensor (per-tensor rule). Returns the nonfinite flag. Rounds to
    nearest (sparse gradients are an fp32-embedding feature; this path syncs once for the finiteness test).
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
def lion_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    moms: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    keys: Sequence[Tensor | None] | None = None,
    momentum_sr: bool = True,
    kahan: Sequence[Tensor | None] | None = None,
    foreach: bool = False,
    chunk_bytes: int | None = None,
) -> None:
    """One Lion step, the paper's order (SPEC §1.1), math in float32 at least, no host synchronisation.

    ``c = β1·m + (1−β1)·g``; ``θ ← θ·(1 − η·λ)``; ``θ ← θ − η·sign(c)``; ``m ← β2·m + (1−β2)·g``. ``keys``,
    ``momentum_sr``, ``kahan``, ``foreach``, ``chunk_bytes`` as for :func:`tiger_step_`.
    """
    n = len(params)
    keys, kahan = _per(keys, n), _per(kahan, n)
    if not foreach:
        for p, g, m, key, comp in zip(params, grads, moms, keys, kahan):
            theta, mom = _upcast(p), _upcast(m)
            g32 = g.to(mom.dtype)
            c = mom.mul(beta1).add_(g32, alpha=1.0 - beta1)
            new = theta.mul(1.0 - lr * weight_decay) if weight_decay != 0.0 else theta.clone()
            new.sub_(c.sign_().mul_(lr))
            store_(p, new, key, comp, theta)
            new_m = mom.mul(beta2).add_(g32, alpha=1.0 - beta2)
            store_(m, new_m, _mom_key(key, momentum_sr))
        return
    for idx in _group_by_dtype(range(n), params, grads, moms).values():
        for chunk in _chunks(idx, params, chunk_bytes or FOREACH_CHUNK_BYTES):
            ps = [params[i] for i in chunk]
            ms = [moms[i] for i in chunk]
            thetas = [_upcast(p) for p in ps]
            m32 = [_upcast(m) for m in ms]
            cdt = m32[0].dtype
            gs = [grads[i].to(cdt) for i in chunk]
            cs = torch._foreach_mul(m32, beta1)
            torch._foreach_add_(cs, gs, alpha=1.0 - beta1)
            new = torch._foreach_mul(thetas, 1.0 - lr * weight_decay) if weight_decay != 0.0 else \
                [t.clone() for t in thetas]
            torch._foreach_sign_(cs)
            torch._foreach_mul_(cs, lr)
            torch._foreach_sub_(new, cs)
            for j, i in enumerate(chunk):
                store_(ps[j], new[j], keys[i], kahan[i], thetas[j])
            new_m = torch._foreach_mul(m32, beta2)
            torch._foreach_add_(new_m, gs, alpha=1.0 - beta2)
            for j, i in enumerate(chunk):
                store_(ms[j], new_m[j], _mom_key(keys[i], momentum_sr))


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
              grads: Sequence[Tensor], moms: Sequence[Tensor], kernel_ok: bool = True) -> str:
    """``"fused"``, ``"foreach"`` or ``"single"``: the path of one optimizer update over these tensors.

    Fused kernels when allowed (``fused`` not False, ``foreach`` not True) and usable (:func:`fused_usable`);
    ``kernel_ok=False`` (a rounding mode the loaded kernels do not implement) excludes them.
    ``fused=True`` that cannot be honoured raises ``RuntimeError`` (before anything is written). Otherwise
    ``foreach`` as given, or by default — like torch.optim — foreach on accelerators and one tensor at a time on
    CPU (smallest transient memory).
    """
    if fused is not False and not foreach and kernel_ok and fused_usable(fused_mod, params, grads, moms):
        return "fused"
    if fused:
        raise RuntimeError(
            "fused=True but some tensors do not qualify for the fused kernels (they need dense, contiguous "
            "CPU/CUDA tensors with one fp32/bf16/fp16 dtype for parameter, gradient and momentum, and kernels "
            "that take this rounding mode: compensation='kahan' and, with an older build, stochastic rounding "
            "run in PyTorch); use fused=None to fall back"
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


# ----------------------------------------------------------------------------------------------------------
# Low-precision rounding: options and per-parameter generator state shared by Tiger and Lion.

COMPENSATIONS = (None, "kahan")
SR_KEYS = ("sr_stream", "sr_step")
KAHAN_KEY = "kahan_comp"


def check_rounding(stochastic_rounding: Any, compensation: Any, seed: Any, momentum_sr: Any) -> int:
    """Validate the low-precision options of Tiger/Lion; returns the seed (``torch.initial_seed()`` when ``seed``
    is None: ``torch.manual_seed`` / ``L.seed_everything`` make runs reproducible, and nothing is drawn from the
    default generator, so adding the optimizer does not shift the random numbers of the rest of the run)."""
    check_flag("stochastic_rounding", stochastic_rounding, allow_none=False)
    check_flag("momentum_sr", momentum_sr, allow_none=False)
    if compensation not in COMPENSATIONS:
        raise ValueError(f"compensation must be None or 'kahan', got {compensation!r}")
    if seed is None:
        return int(torch.initial_seed())
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise TypeError(f"seed must be None or an int >= 0, got {seed!r}")
    return seed


def sr_key_needed(stochastic_rounding: bool, compensation: str | None, momentum_sr: bool, p: Tensor,
                  m: Tensor) -> bool:
    """Whether the update of ``p`` (momentum ``m``) rounds stochastically: a bf16/fp16 θ under stochastic rounding
    (without Kahan compensation), or a bf16/fp16 momentum with ``momentum_sr`` too."""
    if not stochastic_rounding or compensation is not None:
        return False
    return p.dtype in LOW_PRECISION or (momentum_sr and m.dtype in LOW_PRECISION)


def sr_state(state: dict[str, Any], p: Tensor, seed: int, index: int) -> dict[str, Any]:
    """Create the generator state of a parameter on first use: ``sr_stream`` (int64 0-dim tensor,
    ``stream_of(seed, index)``, ``index`` = the parameter's position in the optimizer's flat order) and
    ``sr_step`` (int64 0-dim tensor, the number of rounding calls so far). Both live in the optimizer state, so a
    resumed run continues bit for bit."""
    if "sr_stream" not in state:
        state["sr_stream"] = torch.tensor(stream_of(seed, index), dtype=torch.int64, device=p.device)
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


def kahan_buffer(state: dict[str, Any], p: Tensor) -> Tensor:
    """The Kahan compensation buffer of a low-precision parameter (zeros of its dtype, created on first use)."""
    comp = state.get(KAHAN_KEY)
    if comp is None:
        comp = state[KAHAN_KEY] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return comp


def split_int_state(state_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[Any, dict[str, Tensor]]]:
    """Take the integer generator tensors (``sr_stream``, ``sr_step``) out of a state dict before
    ``torch.optim.Optimizer.load_state_dict``, which would cast them to the parameter's floating dtype."""
    saved: dict[Any, dict[str, Tensor]] = {}
    state = {}
    for i, s in state_dict["state"].items():
        if isinstance(s, dict) and any(k in s for k in SR_KEYS):
            saved[i] = {k: s[k] for k in SR_KEYS if k in s}
            s = {k: v for k, v in s.items() if k not in SR_KEYS}
        state[i] = s
    if not saved:
        return state_dict, saved
    out = dict(state_dict)
    out["state"] = state
    return out, saved


def restore_int_state(opt: torch.optim.Optimizer, saved_ids: Sequence[Any],
                      saved: dict[Any, dict[str, Tensor]]) -> None:
    """Put the tensors taken out by :func:`split_int_state` back (int64, on the parameter's device)."""
    if not saved:
        return
    id_to_param = dict(zip(saved_ids, (p for g in opt.param_groups for p in g["params"])))
    for i, tensors in saved.items():
        p = id_to_param[i]
        for k, v in tensors.items():
            opt.state[p][k] = torch.as_tensor(v).to(dtype=torch.int64, device=p.device).clone()


def sr_fold_key(state: dict[str, Any], n: int) -> Tensor:
    """Key of the ``n``-th fold (0, 1, ...) of a low-precision momentum within one ``step()`` call (Tiger's
    fold-in-backward mode): ``step_key(...) ^ MOMENTUM_SALT`` for the first, re-hashed with ``n`` after it, so
    several backward passes per step (Lightning's ``accumulate_grad_batches``) draw independent bits."""
    base = step_key(state["sr_stream"], state["sr_step"]) ^ MOMENTUM_SALT
    return base if n == 0 else hash32((base + n) & MASK32)
