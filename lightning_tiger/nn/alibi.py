"""ALiBi: attention with linear biases (Press, Smith, Lewis, ICLR 2022; official code
ofirpress/attention_with_linear_biases)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..validation import check_int

__all__ = ["ALiBi", "alibi_slopes"]


def _slopes_power_of_two(n: int) -> list[float]:
    # m_h = 2^(-8(h+1)/n): start = 2^(-2^-(log2(n)-3)) = 2^(-8/n), ratio = start.
    return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]


def alibi_slopes(num_heads: int) -> Tensor:
    """Per-head ALiBi slopes by the official rule (ofirpress/attention_with_linear_biases, BLOOM, MPT).

    For ``n`` a power of two, ``m_h = 2^(−8(h+1)/n)``, ``h = 0…n−1``. Otherwise take the slopes of the
    nearest lower power of two ``p`` and append every other slope of the ``2p`` set:
    ``slopes(p) + slopes(2p)[0::2][:n−p]`` (the official code's ``get_slopes``). Checked against the official
    code: ``n = 12`` gives ``2^−1 … 2^−8, 2^−0.5, 2^−1.5, 2^−2.5, 2^−3.5`` (not monotone), ``n = 3`` gives
    ``2^−4, 2^−8, 2^−2`` and ``n = 1`` gives ``2^−8``. (The official code recurses into ``get_slopes(2p)``, which
    for a power of two is the closed form, so the one-level rule here is identical.)

    Args:
        num_heads: number of heads ``n >= 1``.

    Returns:
        fp32 tensor ``[num_heads]``.
    """
    num_heads = check_int("num_heads", num_heads, low=1)
    p = 2 ** math.floor(math.log2(num_heads))
    slopes = _slopes_power_of_two(p)
    if p != num_heads:
        slopes += _slopes_power_of_two(2 * p)[0::2][: num_heads - p]
    return torch.tensor(slopes, dtype=torch.float32)


class ALiBi(nn.Module):
    """ALiBi score bias ``−m_h·(i − j)`` (causal) or ``−m_h·|i − j|`` (bidirectional), in fp32.

    The bias is added to the scaled scores (it is not scaled by ``1/√d``) and the model uses no other
    position encoding (Press et al. 2022, §3). Queries sit at absolute positions ``offset + i`` and keys at ``j``:
    with a KV cache of ``S − L`` earlier tokens the default ``offset = k_len − q_len`` aligns the ``L`` new
    queries with the last ``L`` keys. For the causal form the entries above the diagonal (``j > i``) hold
    the formula's positive value; the causal mask removes them. The slopes are a non-persistent fp32
    buffer recomputed after ``module.to(...)`` so ``precision="bf16-true"`` does not round them.

    Args:
        num_heads: number of heads (slopes from :func:`alibi_slopes`).
        causal: ``True`` for ``−m(i−j)``, ``False`` for the symmetric ``−m|i−j|``.

    Shapes:
        ``forward(q_len, k_len, offset=None)`` -> ``[heads, q_len, k_len]``;
        ``from_positions(q_pos [L] | [B, L], k_pos [S] | [B, S])`` -> ``[heads, L, S]`` or ``[B, heads, L, S]``.
    """

    slopes: Tensor

    def __init__(self, num_heads: int, causal: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.causal = bool(causal)
        self.register_buffer("slopes", alibi_slopes(num_heads), persistent=False)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        super()._apply(fn, recurse)
        self.slopes = alibi_slopes(self.num_heads).to(self.slopes.device)
        return self

    def from_positions(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """Bias for arbitrary (int or float) query/key positions.

        Args:
            q_pos: ``[L]`` or ``[B, L]``.
            k_pos: ``[S]`` or ``[B, S]``.

        Returns:
            fp32 ``[H, L, S]`` (both 1-D) or ``[B, H, L, S]``.
        """
        with torch.autocast(device_type=q_pos.device.type, enabled=False):
            dist = q_pos.float().unsqueeze(-1) - k_pos.float().unsqueeze(-2)  # [.., L, S]
            if not self.causal:
                dist = dist.abs()
            slopes = self.slopes.to(dist.device)
            return -slopes.view(-1, 1, 1) * dist.unsqueeze(-3)

    def forward(self, q_len: int, k_len: int, offset: int | None = None, device: torch.device | None = None) -> Tensor:
        """Bias for queries ``offset … offset + q_len − 1`` against keys ``0 … k_len − 1``.

        Args:
            q_len: number of queries ``L``.
            k_len: number of keys ``S``.
            offset: absolute position of the first query; default ``k_len − q_len`` (KV-cache decoding).
            device: device of the result (default: the slopes').

        Returns:
            fp32 ``[num_heads, q_len, k_len]``.
        """
        if q_len < 0 or k_len < 0:
            raise ValueError(f"q_len and k_len must be >= 0, got {q_len}, {k_len}")
        offset = k_len - q_len if offset is None else offset
        device = device or self.slopes.device
        q_pos = torch.arange(offset, offset + q_len, device=device)
        k_pos = torch.arange(k_len, device=device)
        return self.from_positions(q_pos, k_pos)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, causal={self.causal}"
