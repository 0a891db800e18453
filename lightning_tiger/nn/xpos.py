"""XPOS: RoPE with a per-dimension exponential decay (Sun et al. 2022, "A Length-Extrapolatable Transformer").

§3.2 of the paper ("Extrapolatable Position Embedding"): on top of the RoPE rotation, the pair ``t`` of a
query at position ``i`` is multiplied by ``ζ_t^{i/B}`` and that of a key at position ``j`` by ``ζ_t^{−j/B}``,
with ``ζ_t = (2t/d + γ)/(1 + γ) ∈ (0, 1)``, ``γ = 0.4``, ``B = 512`` (the scale base of the reference code,
microsoft/torchscale). Pair ``t`` of the score therefore carries the factor ``ζ_t^{(i − j)/B}``: an
exponential decay with the distance that is strong for the fast-rotating pairs (small ``t``) and weak for the
slow ones. The decay only makes sense for ``j <= i`` (it would grow for ``j > i``): XPOS is for causal
attention.

Offsets and precision: the factors are taken relative to the largest query position of each call, so key factors
stay ``<= 1`` and :class:`~lightning_tiger.nn.Attention` runs XPOS in blocks of :data:`QUERY_BLOCK` queries; its
KV cache keeps keys rotated but unscaled (why: ``docs`` page "XPOS offsets and precision").
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["QUERY_BLOCK", "XPOS"]

#: query rows per block of :class:`~lightning_tiger.nn.Attention`'s XPOS path: query factors stay <= 3.5 for
#: unit-spaced positions (``ζ_0^{−512/512} = 1.4/0.4``).
QUERY_BLOCK = 512


class XPOS(nn.Module):
    """XPOS scaling of already RoPE-rotated queries and keys (the rotation is :class:`RotaryEmbedding`'s).

    Args:
        head_dim: ``d`` (even).
        gamma: ``γ`` (0.4).
        scale_base: ``B`` (512).
        interleaved: pair layout of the rotation: ``(2t, 2t+1)`` (True) or ``(t, t + d/2)``.

    Shapes:
        ``forward(q [B, H, L, d], k [B, H_kv, S, d], q_pos [L] | [B|1, L], k_pos [S] | [B|1, S])`` -> the scaled
        ``(q, k)`` in their dtypes (factors computed in fp64/fp32).
    """

    def __init__(self, head_dim: int, gamma: float = 0.4, scale_base: float = 512.0, interleaved: bool = True) -> None:
        super().__init__()
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
            raise ValueError(f"head_dim must be an even integer >= 2, got {head_dim!r}")
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma!r}")
        if not scale_base > 0:
            raise ValueError(f"scale_base must be > 0, got {scale_base!r}")
        self.head_dim, self.gamma, self.scale_base = head_dim, float(gamma), float(scale_base)
        self.interleaved = bool(interleaved)

    def zeta(self) -> Tensor:
        """``ζ_t = (2t/d + γ)/(1 + γ)`` for ``t = 0 … d/2 − 1`` (fp64 ``[d/2]``)."""
        t = torch.arange(self.head_dim // 2, dtype=torch.float64)
        return (2 * t / self.head_dim + self.gamma) / (1 + self.gamma)

    def log_zeta_per_dim(self, device: torch.device) -> Tensor:
        """``log ζ`` expanded to the ``d`` dimensions in the rotation's pair layout (fp64 ``[d]``)."""
        lz = self.zeta().log()
        lz = lz.repeat_interleave(2) if self.interleaved else torch.cat((lz, lz))
        return lz.to(device)

    def factors(self, positions: Tensor, reference: Tensor, sign: float) -> Tensor:
        """``ζ^{sign·(p − c)/B}`` per dimension: ``positions [.., T]``, ``reference`` broadcastable ->
        ``[.., T, d]`` (fp32)."""
        dev = positions.device
        wide = torch.float64 if dev.type != "mps" else torch.float32
        rel = (positions.to(wide) - reference.to(wide)).unsqueeze(-1) / self.scale_base
        return torch.exp(sign * rel * self.log_zeta_per_dim(dev).to(wide)).float()

    def forward(self, q: Tensor, k: Tensor, q_pos: Tensor, k_pos: Tensor) -> tuple[Tensor, Tensor]:
        """Scale pair ``t`` of each query by ``ζ_t^{(i − c)/B}`` and of each key by ``ζ_t^{−(min(j, c) − c)/B}``.

        ``c`` is the largest query position per batch row, so key factors are ``<= 1`` and query factors are
        ``>= 1``, bounded by ``ζ_0^{−span/B}`` with ``span`` the range of ``q_pos`` (keep it short: see the
        module docstring). Scores ``⟨q_i, k_j⟩`` carry ``ζ^{(i − j)/B}`` exactly for ``j <= c``.

        Args:
            q: RoPE-rotated queries ``[B, H, L, d]``.
            k: RoPE-rotated keys ``[B, H_kv, S, d]``.
            q_pos: query positions ``[L]`` or ``[B|1, L]``.
            k_pos: key positions ``[S]`` or ``[B|1, S]``.

        Returns:
            The scaled ``(q, k)`` in their dtypes (factors computed in fp64, applied in fp32).
        """
        if q_pos.shape[-1] == 0:
            return q, k
        q_pos = q_pos.reshape(-1, q_pos.shape[-1]).double()  # [B|1, L]
        k_pos = k_pos.reshape(-1, k_pos.shape[-1]).double()  # [B|1, S]
        ref = q_pos.amax(-1, keepdim=True)  # [B|1, 1]
        fq = self.factors(q_pos, ref, 1.0).unsqueeze(1)  # [B|1, 1, L, d]
        fk = self.factors(torch.minimum(k_pos, ref), ref, -1.0).unsqueeze(1)
        return (q.float() * fq).to(q.dtype), (k.float() * fk).to(k.dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, gamma={self.gamma}, scale_base={self.scale_base}"


