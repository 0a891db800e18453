"""Pure-PyTorch Tiger and Lion updates: single-tensor and ``foreach`` flavours (the documented fallback).

These functions implement the same contract as the compiled kernels of ``lightning_tiger.optim._fused``
(``tiger_step_`` / ``lion_step_``), so the optimizer classes can dispatch to any of the three paths and get
the same semantics (up to floating-point rounding). Formulas: Chen et al. 2023, Algorithm 2 (Lion) and
Su 2023, kexue.fm/archives/9512 (Tiger), checked against the official TF code (bojone/tiger ``tiger.py``).

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

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_tiger.optim._rounding import momentum_key, store_, upcast
from lightning_tiger.optim.settings import LR_RMS, LR_ROW_RMS, effective_lr, eta_of_norm
from lightning_tiger.optim.shrink import shrunk

__all__ = [
    "FOREACH_CHUNK_BYTES",
    "is_nonfinite",
    "lion_step_",
    "tiger_fold_",
    "tiger_fold_update_",
    "tiger_step_",
]

FOREACH_CHUNK_BYTES = 32 << 20
"""Default bound of one foreach chunk: float32 bytes (4·numel) of the tensors processed together. Each chunk makes
a few float32 temporaries of its tensors (momentum, new momentum, θ, new θ), so the transient memory of a step is a
small multiple of this, not of the model (a single tensor larger than the bound forms a chunk of its own)."""


def is_nonfinite(g: Tensor) -> Tensor:
    """0-dim bool tensor on g's device: does ``g`` hold a NaN or ±inf? No host synchronisation.

    The infinity norm (max |g|) propagates NaN and inf and cannot overflow for finite values (unlike a sum or a
    2-norm, which can overflow in fp16 and give false positives). Empty tensors are finite.
    """
    if g.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=g.device)
    return torch.linalg.vector_norm(g, float("inf")).isfinite().logical_not()


def _bad_flags(grads: Sequence[Tensor], foreach: bool) -> list[Tensor]:
    """:func:`is_nonfinite` of every tensor (one ``_foreach_norm`` for the non-empty ones when ``foreach``)."""
    if not foreach:
        return [is_nonfinite(g) for g in grads]
    nonempty = [g for g in grads if g.numel() > 0]
    norms = iter(torch._foreach_norm(nonempty, float("inf")) if nonempty else [])
    return [next(norms).isfinite().logical_not() if g.numel() > 0 else is_nonfinite(g) for g in grads]


def _moved(theta: Tensor, mom: Tensor, eta: Tensor | float, wd: float) -> Tensor:
    """θ·(1 − ηλ) − η·sign(m), out of place; ``mom`` as stored (its sign after rounding, like the official code,
    which takes sign(m_t) of the assigned slot, and like the fused kernels)."""
    out = theta.mul(1.0 - eta * wd) if wd != 0.0 else theta.clone()
    step = torch.sign(mom)
    if step.dtype != theta.dtype:
        step = step.to(theta.dtype)
    return out.sub_(step.mul_(eta))


def _select_theta(theta: Tensor, bad: Tensor, shrunk_theta: Tensor, moved: Tensor | None,
                  move: Tensor | None) -> Tensor:
    """θ's next value: shrunk where the gradient was non-finite, else moved (where ``move``), else θ."""
    if moved is None:
        nxt = theta
    elif move is None:
        nxt = moved
    else:
        nxt = torch.where(move, moved, theta)
    return torch.where(bad, shrunk_theta, nxt)


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
            bf16/fp16 θ, and for a bf16/fp16 momentum when ``momentum_sr`` (the momentum's rule:
            :func:`~lightning_tiger.optim.stochastic_rounding.momentum_round`).
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
    bad = is_nonfinite(g)
    m32 = upcast(m)
    new_m = m32.mul(b1)
    new_m.add_(g.to(new_m.dtype), alpha=b2)
    store_(m, torch.where(bad, m32, new_m), momentum_key(key, momentum_sr), momentum=True)
    theta = upcast(p)
    moved = _moved(theta, m, effective_lr(theta, mode, lr, floor), wd) if update else None
    store_(p, _select_theta(theta, bad, shrunk(theta, center, s), moved, None), key, comp, theta)
    return bad


def _tiger_chunk(ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], modes: list[int], lrs: list[float],
                 wds: list[float], centers: list[float], floors: list[float], b1: float, b2: float, update: bool,
                 s: float, keys: list[Tensor | None], momentum_sr: bool, comps: list[Tensor | None]) -> list[Tensor]:
    """:func:`_tiger_one` over tensors of one device/dtype triple, elementwise work in ``_foreach`` kernels."""
    bads = _bad_flags(gs, foreach=True)
    m32 = [upcast(m) for m in ms]
    cdt = m32[0].dtype
    new_m = torch._foreach_mul(m32, b1)
    torch._foreach_add_(new_m, [g.to(cdt) for g in gs], alpha=b2)
    for m, old, new, bad, key in zip(ms, m32, new_m, bads, keys):
        store_(m, torch.where(bad, old, new), momentum_key(key, momentum_sr), momentum=True)
    thetas = [upcast(p) for p in ps]
    moved: list[Tensor | None] = [None] * len(ps)
    if update:
        moved = _foreach_moved(thetas, ms, modes, lrs, wds, floors)
    for j, p in enumerate(ps):
        nxt = _select_theta(thetas[j], bads[j], shrunk(thetas[j], centers[j], s), moved[j], None)
        moved[j] = None  # free each temporary as soon as it is written
        store_(p, nxt, keys[j], comps[j], thetas[j])
    return bads


def _foreach_moved(thetas: list[Tensor], ms: list[Tensor], modes: list[int], lrs: list[float], wds: list[float],
                   floors: list[float]) -> list[Tensor | None]:
    """:func:`_moved` of every tensor (η per tensor from one ``_foreach_norm``; per-row modes one at a time)."""
    out: list[Tensor | None] = [None] * len(thetas)
    rows = [j for j in range(len(thetas)) if modes[j] == LR_ROW_RMS and thetas[j].ndim >= 2]
    for j in rows:
        out[j] = _moved(thetas[j], ms[j], effective_lr(thetas[j], modes[j], lrs[j], floors[j]), wds[j])
    scalar = [j for j in range(len(thetas)) if j not in set(rows)]
    if not scalar:
        return out
    etas: list[Tensor | float] = [lrs[j] for j in scalar]
    rms_j = [j for j in scalar if modes[j] == LR_RMS and thetas[j].numel() > 0]
    if rms_j:
        norms = torch._foreach_norm([thetas[j] for j in rms_j])
        by_j = {j: eta_of_norm(nrm, thetas[j].numel(), lrs[j], floors[j]) for j, nrm in zip(rms_j, norms)}
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
    ``key`` the stochastic-rounding key of a low-precision momentum (``momentum_round``'s key; None: round to
    nearest). Returns the non-finite flag (0-dim bool tensor).
    """
    bad = is_nonfinite(grad)
    m32 = upcast(mom)
    new_m = m32.mul(b1.to(m32.dtype) if isinstance(b1, Tensor) else b1)
    new_m.add_(grad.to(new_m.dtype), alpha=b2)
    store_(mom, torch.where(bad, m32, new_m), key, momentum=True)
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
        theta = upcast(p)
        eta = effective_lr(theta, lr_modes[i], lrs[i], rms_floor[i]) if update else None
        moved = _moved(theta, m, eta, weight_decays[i]) if update else None
        nxt = _select_theta(theta, bads[i], shrunk(theta, centers[i], shrink_ratio), moved, folded[i])
        store_(p, nxt, keys[i], kahan[i], theta)


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
    """One Lion step, the paper's order (Chen et al. 2023, Algorithm 2), math in float32 at least, sync-free.

    ``c = β1·m + (1−β1)·g``; ``θ ← θ·(1 − η·λ)``; ``θ ← θ − η·sign(c)``; ``m ← β2·m + (1−β2)·g``. ``keys``,
    ``momentum_sr``, ``kahan``, ``foreach``, ``chunk_bytes`` as for :func:`tiger_step_`.
    """
    n = len(params)
    keys, kahan = _per(keys, n), _per(kahan, n)
    if not foreach:
        for p, g, m, key, comp in zip(params, grads, moms, keys, kahan):
            theta, mom = upcast(p), upcast(m)
            g32 = g.to(mom.dtype)
            c = mom.mul(beta1).add_(g32, alpha=1.0 - beta1)
            new = theta.mul(1.0 - lr * weight_decay) if weight_decay != 0.0 else theta.clone()
            new.sub_(c.sign_().mul_(lr))
            store_(p, new, key, comp, theta)
            new_m = mom.mul(beta2).add_(g32, alpha=1.0 - beta2)
            store_(m, new_m, momentum_key(key, momentum_sr), momentum=True)
        return
    for idx in _group_by_dtype(range(n), params, grads, moms).values():
        for chunk in _chunks(idx, params, chunk_bytes or FOREACH_CHUNK_BYTES):
            ps = [params[i] for i in chunk]
            ms = [moms[i] for i in chunk]
            thetas = [upcast(p) for p in ps]
            m32 = [upcast(m) for m in ms]
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
                store_(ms[j], new_m[j], momentum_key(keys[i], momentum_sr), momentum=True)
