"""General RoPE ``R_n = exp(nB)`` for a skew-symmetric ``B`` (Su, "Transformer升级之路：6", RoPE completeness)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["GeneralRotaryEmbedding"]


class GeneralRotaryEmbedding(nn.Module):
    r"""The general solution of ``R_mᵀ R_n = R_{n−m}``: ``R_n = exp(nB)`` with ``B`` skew-symmetric.

    Any such ``B`` has a real Schur form ``B = Z T Zᵀ`` (``Z`` orthogonal, ``T`` block-diagonal with blocks
    ``[[0, −θ_k], [θ_k, 0]]``), so ``exp(nB) = Z·RoPE_n(θ)·Zᵀ``: in attention ``Zᵀ`` folds into ``W_q``/``W_k``
    and the standard block-diagonal RoPE loses nothing (Su, "Transformer升级之路：6"; tests check this with
    ``scipy.linalg.schur(B, output="real")``). This module is for experiments and for that demonstration; it
    costs a ``d×d`` matrix exponential per position and a dense ``d×d`` product per vector.

    Args:
        head_dim: ``d`` (even, >= 2).
        generator: the skew-symmetric ``B`` ``[d, d]``; default a random one, ``B = Q T Qᵀ`` with a random
            orthogonal ``Q`` (QR of a Gaussian, from the global RNG) and the standard RoPE frequencies
            ``θ_k = 10000^{−2k/d}`` in ``T`` (so its spectrum matches standard RoPE).

    Shapes:
        ``forward(q [B, L, H, d], k [B, L, H_kv, d] | None, positions [L] | None, offset)`` -> rotated
        ``(q, k)``; ``rotation(positions [L])`` -> ``[L, d, d]``.
    """

    generator: Tensor

    def __init__(self, head_dim: int, generator: Tensor | None = None) -> None:
        super().__init__()
        if not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
            raise ValueError(f"head_dim must be an even integer >= 2, got {head_dim!r}")
        if generator is None:
            theta = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
            t = torch.zeros(head_dim, head_dim, dtype=torch.float64)
            idx = torch.arange(0, head_dim, 2)
            t[idx + 1, idx], t[idx, idx + 1] = theta, -theta
            q, _ = torch.linalg.qr(torch.randn(head_dim, head_dim, dtype=torch.float64))
            generator = q @ t @ q.T
        if not isinstance(generator, Tensor) or generator.shape != (head_dim, head_dim):
            raise ValueError(f"generator must be a [{head_dim}, {head_dim}] tensor")
        gen = generator.detach().to(torch.float64)
        if not torch.allclose(gen, -gen.T, atol=1e-6 * max(1.0, float(gen.abs().max()))):
            raise ValueError("generator must be skew-symmetric (B = -Bᵀ)")
        self.head_dim = head_dim
        self.register_buffer("generator", ((gen - gen.T) / 2).float())

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> GeneralRotaryEmbedding:
        # Keep B in fp32 under `.to(torch.bfloat16)` / "bf16-true" (only the device may change).
        gen = self.generator
        super()._apply(fn, recurse)
        self.generator = gen.to(device=self.generator.device)
        return self

    def rotation(self, positions: Tensor) -> Tensor:
        """``exp(n·B)`` for each position ``n`` (``[L]``, int or float), in fp64; returns fp32 ``[L, d, d]``."""
        with torch.autocast(device_type=positions.device.type, enabled=False):
            b = self.generator.to(torch.float64)
            return torch.linalg.matrix_exp(positions.to(torch.float64).view(-1, 1, 1) * b).float()

    def _rotate(self, x: Tensor, r: Tensor) -> Tensor:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return torch.einsum("lij,blhj->blhi", r.to(dtype), x.to(dtype)).to(x.dtype)

    def forward(
        self, q: Tensor, k: Tensor | None = None, positions: Tensor | None = None, offset: int = 0
    ) -> tuple[Tensor, Tensor | None]:
        """Apply ``exp(n_l B)`` to ``q, k [B, L, heads, d]`` at ``positions [L]`` (default ``offset + arange(L)``)."""
        if q.dim() != 4 or q.shape[-1] != self.head_dim:
            raise ValueError(f"q must be [batch, seq, heads, {self.head_dim}], got {tuple(q.shape)}")
        seq = q.shape[1]
        if positions is None:
            positions = torch.arange(offset, offset + seq, device=q.device)
        if positions.dim() != 1 or positions.shape[0] != seq:
            raise ValueError(f"positions must be [seq={seq}], got shape {tuple(positions.shape)}")
        r = self.rotation(positions)
        return self._rotate(q, r), (None if k is None else self._rotate(k, r))

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}"
