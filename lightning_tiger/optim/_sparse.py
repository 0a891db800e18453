"""Tiger's lazy step for sparse row gradients (``nn.Embedding(sparse=True)``): only rows with a gradient move."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_tiger.optim._rounding import compute_dtype, upcast
from lightning_tiger.optim.settings import LR_RMS, effective_lr
from lightning_tiger.optim.shrink import shrink_

__all__ = ["tiger_sparse_step_"]


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
    (no decay). Rows of rare tokens therefore no longer drift toward ±1/λ (their momentum keeps its sign while
    decoupled decay pulls θ, the embedding caveat of Su 2023, kexue.fm/archives/9512), and this
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
        shrink_([param], [center], shrink_ratio)
        return True
    if rows.numel() == 0:
        return False
    m_rows = mom.index_select(0, rows).to(compute_dtype(mom.dtype))
    if b1 != 1.0:
        m_rows.mul_(b1)
    m_rows.add_(values.to(m_rows.dtype), alpha=b2)
    m_rows = m_rows.to(mom.dtype)  # sign of the momentum as stored
    mom.index_copy_(0, rows, m_rows)
    if update:
        theta_rows = param.index_select(0, rows).to(compute_dtype(param.dtype))
        if lr_mode == LR_RMS:
            eta: Tensor | float = effective_lr(upcast(param), LR_RMS, lr, rms_floor)
        else:
            eta = effective_lr(theta_rows, lr_mode, lr, rms_floor)
        if weight_decay != 0.0:
            theta_rows.mul_(1.0 - eta * weight_decay)
        theta_rows.sub_(torch.sign(m_rows).to(theta_rows.dtype).mul_(eta))
        param.index_copy_(0, rows, theta_rows.to(param.dtype))
    return False
