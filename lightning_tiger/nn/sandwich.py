"""Sandwich: the sinusoidal inner product ``p_i·p_j`` as a score bias (Chi, Fan, Rudnicky, Ramadge, ACL 2023).

"Dissecting Transformer Length Extrapolation via the Lens of Receptive Field Analysis", §5: with the
sinusoidal embeddings ``p_i`` of dimension ``d'`` (Vaswani et al. 2017), ``p_i·p_j = Σ_{t<d'/2}
cos((i − j)/10000^{2t/d'})`` depends on ``i − j`` only and decays (roughly logarithmically) with the distance,
so adding it to the scores gives an ALiBi-like local bias without parameters. Like ALiBi the authors use a
different strength per head; following their reference code we subtract ``d'/2`` (the value at distance 0;
a constant per query row, so the softmax is unchanged) and divide head ``h = 1 … H`` by ``8h/H``:

    ``b_ij = (Σ_{t<d'/2} cos((i − j)/10000^{2t/d'}) − d'/2) · H/(8h)``.

The bias is symmetric in ``i − j`` (the same module serves causal and bidirectional attention) and ``≤ 0``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..validation import check_int, check_real

__all__ = ["Sandwich"]


class Sandwich(nn.Module):
    """Sandwich score bias (fp32, no parameters).

    Args:
        num_heads: heads ``H``.
        dim: ``d'``, the (even) dimension of the sinusoidal embeddings (default 128).
        base: the sinusoid base (10000).

    Shapes:
        ``from_positions(q_pos [L] | [B, L], k_pos [S] | [B, S])`` -> ``[H, L, S]`` or ``[B, H, L, S]``
        (fp32), the contract of :meth:`ALiBi.from_positions <lightning_tiger.nn.ALiBi.from_positions>`.
    """

    def __init__(self, num_heads: int, dim: int = 128, base: float = 10000.0) -> None:
        super().__init__()
        num_heads = check_int("num_heads", num_heads, low=1)
        dim = check_int("dim", dim, low=2)
        if dim % 2:
            raise ValueError(f"dim must be an even int in [2, inf), got {dim}")
        self.num_heads, self.dim, self.base = num_heads, dim, check_real("base", base, low=1.0, low_open=True)

    def head_scales(self, device: torch.device | None = None) -> Tensor:
        """``H/(8h)`` for ``h = 1 … H`` (fp32 ``[H]``)."""
        h = torch.arange(1, self.num_heads + 1, device=device, dtype=torch.float64)
        return (self.num_heads / (8.0 * h)).float()

    def from_positions(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """Sandwich bias for (int or float) positions ``q_pos [L] | [B, L]``, ``k_pos [S] | [B, S]`` -> fp32
        ``[H, L, S]`` or ``[B, H, L, S]``, as :meth:`ALiBi.from_positions <lightning_tiger.nn.ALiBi.from_positions>`."""
        dev = q_pos.device
        wide = torch.float64 if dev.type != "mps" else torch.float32
        with torch.autocast(device_type=dev.type, enabled=False):
            p_q, p_k = self.embed(q_pos.to(wide)), self.embed(k_pos.to(wide))  # [.., L, d'], [.., S, d']
            # p_i·p_j = Σ_t cos(iθ_t)cos(jθ_t) + sin(iθ_t)sin(jθ_t) = Σ_t cos((i − j)θ_t): one matmul
            dot = p_q @ p_k.transpose(-1, -2) - self.dim / 2  # [.., L, S]
            return dot.float().unsqueeze(-3) * self.head_scales(dev).view(-1, 1, 1)

    def embed(self, positions: Tensor) -> Tensor:
        """Sinusoidal embeddings ``[cos(pθ_t), sin(pθ_t)]_t`` of ``positions [...]`` -> ``[..., d']``
        (``θ_t = base^{−2t/d'}``; pair order is irrelevant for the inner product)."""
        inv = self.base ** (-torch.arange(0, self.dim, 2, device=positions.device, dtype=positions.dtype) / self.dim)
        angles = positions.unsqueeze(-1) * inv
        return torch.cat((angles.cos(), angles.sin()), dim=-1)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, dim={self.dim}, base={self.base}"
