"""KERPLE: kernelized relative positional embedding (Chi, Fan, Ramadge, Rudnicky, NeurIPS 2022).

"KERPLE: Kernelized Relative Positional Embedding for Length Extrapolation", §4 (the two kernels used in
their experiments): the score of query ``i`` and key ``j`` gets the bias

* logarithmic: ``b_ij = −r₁·log(1 + r₂·|i − j|)``,
* power: ``b_ij = −r₁·|i − j|^{r₂}`` with ``0 < r₂ ≤ 2``,

with ``r₁, r₂ > 0`` learnable per head (conditionally positive definite kernels need them positive). The bias
is added to the scaled scores like ALiBi's (the model has no other position encoding); the power kernel with
``r₂ = 1`` is ALiBi with learnable slopes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..validation import check_int
from .alibi import alibi_slopes

__all__ = ["KERPLE"]

_VARIANTS = ("log", "power")


def _softplus_inverse(y: Tensor) -> Tensor:
    # softplus(x) = log(1 + e^x)  =>  x = log(e^y − 1) = y + log(1 − e^{−y})
    return y + torch.log(-torch.expm1(-y))


class KERPLE(nn.Module):
    """KERPLE score bias with per-head learnable ``r₁, r₂`` (kept positive by the parametrisation).

    Parametrisation (ours; the paper clamps raw values at a small ε): ``r₁ = softplus(ρ₁)``,
    ``r₂ = softplus(ρ₂)`` for the log kernel and ``r₂ = 2·sigmoid(ρ₂) ∈ (0, 2)`` for the power kernel, so any
    optimizer step keeps the kernel valid. Initialisation (ours, deterministic; the paper draws uniform random
    values): log ``r₁ = 1``, ``r₂ = m_h``; power ``r₁ = m_h``, ``r₂ = 1`` — ``m_h`` the ALiBi slopes
    (:func:`~lightning_tiger.nn.alibi_slopes`), so the power kernel starts as ALiBi and every head starts with
    a different decay. Computed in fp32 whatever the parameters' dtype.

    Args:
        num_heads: heads ``H``.
        variant: ``"log"`` (default) or ``"power"``.

    The formula uses ``|i − j|``, so one module serves causal (the mask removes ``j > i``) and bidirectional
    attention.

    Shapes:
        ``from_positions(q_pos [L] | [B, L], k_pos [S] | [B, S])`` -> ``[H, L, S]`` or ``[B, H, L, S]``
        (fp32), the same contract as :meth:`ALiBi.from_positions <lightning_tiger.nn.ALiBi.from_positions>`.
    """

    def __init__(self, num_heads: int, variant: str = "log") -> None:
        super().__init__()
        num_heads = check_int("num_heads", num_heads, low=1)
        if variant not in _VARIANTS:
            raise ValueError(f"variant must be one of {_VARIANTS}, got {variant!r}")
        self.num_heads, self.variant = num_heads, variant
        slopes = alibi_slopes(num_heads).double()
        ones = torch.ones(num_heads, dtype=torch.float64)
        if variant == "log":
            r1, raw2 = ones, _softplus_inverse(slopes)
        else:
            r1, raw2 = slopes, torch.logit(ones / 2)
        self.raw_r1 = nn.Parameter(_softplus_inverse(r1).float())
        self.raw_r2 = nn.Parameter(raw2.float())

    @property
    def r1(self) -> Tensor:
        """``r₁ [H]`` (fp32, > 0)."""
        return F.softplus(self.raw_r1.float())

    @property
    def r2(self) -> Tensor:
        """``r₂ [H]`` (fp32; > 0, and < 2 for the power kernel)."""
        raw = self.raw_r2.float()
        return F.softplus(raw) if self.variant == "log" else 2.0 * torch.sigmoid(raw)

    def from_positions(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """KERPLE bias for (int or float) positions ``q_pos [L] | [B, L]``, ``k_pos [S] | [B, S]`` -> fp32
        ``[H, L, S]`` or ``[B, H, L, S]``, as :meth:`ALiBi.from_positions <lightning_tiger.nn.ALiBi.from_positions>`."""
        with torch.autocast(device_type=q_pos.device.type, enabled=False):
            dist = (q_pos.float().unsqueeze(-1) - k_pos.float().unsqueeze(-2)).abs().unsqueeze(-3)  # [.., 1, L, S]
            r1, r2 = self.r1.view(-1, 1, 1), self.r2.view(-1, 1, 1)
            if self.variant == "log":
                return -r1 * torch.log1p(r2 * dist)
            # |Δ|^{r₂} with 0^{r₂} = 0; clamp keeps the gradient w.r.t. r₂ finite at Δ = 0 (log 0)
            powered = torch.exp(r2 * torch.log(dist.clamp_min(1e-30)))
            return -r1 * torch.where(dist > 0, powered, torch.zeros((), device=dist.device))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, variant={self.variant!r}"


