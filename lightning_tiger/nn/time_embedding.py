"""Sinusoidal embedding of a diffusion time t ∈ [0, 1] (Vaswani et al. 2017 features, DDPM/score-SDE usage)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..validation import check_int, check_real


class TimeEmbedding(nn.Module):
    """Sinusoidal features of a continuous time: ``t [batch] -> [batch, dim]``, always computed in fp32.

    emb(t) = [sin(s·t·ω_0), …, sin(s·t·ω_{h-1}), cos(s·t·ω_0), …, cos(s·t·ω_{h-1})], ω_i = P^(−i/h), h = dim//2,
    s = ``scale`` (t ∈ [0, 1] is mapped to [0, 1000] like DDPM's integer steps), P = ``max_period``. An odd
    ``dim`` gets one zero column. The arithmetic runs with autocast disabled: t·s·ω up to 1000 loses its
    fractional part in bf16/fp16, which would collapse neighbouring times onto one embedding.

    Args:
        dim: output features (>= 2).
        max_period: P, default 10000.
        scale: s, default 1000.
    """

    def __init__(self, dim: int, max_period: float = 10000.0, scale: float = 1000.0) -> None:
        super().__init__()
        self.dim = check_int("dim", dim, low=2)
        self.max_period = check_real("max_period", max_period, low=1.0, low_open=True)
        self.scale = check_real("scale", scale, low=0.0, low_open=True)
        half = dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, dtype=torch.float32) / half)
        # Non-persistent: derived from the arguments, so checkpoints stay small and dtype casts of the module
        # (``.half()``) cannot silently degrade it (we cast back to fp32 in forward anyway).
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        """Embed ``t`` ``[batch]`` (or a 0-d tensor, treated as ``[1]``) into ``[batch, dim]`` fp32."""
        if t.ndim == 0:
            t = t.reshape(1)
        if t.ndim != 1:
            raise ValueError(f"t must have shape [batch], got {tuple(t.shape)}")
        with torch.autocast(device_type=t.device.type, enabled=False):
            args = (t.float() * self.scale)[:, None] * self.freqs.float()[None, :]
            emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
            if self.dim % 2:
                emb = torch.nn.functional.pad(emb, (0, 1))
        return emb

    def conditioning(self, t: Tensor, batch: int, dtype: torch.dtype) -> Tensor:
        """The embedding of one time per sample, for a network's conditioning.

        Args:
            t: ``[batch]``, or a 0-d tensor (one time for the whole batch).
            batch: the batch size of the network's input.
            dtype: the dtype of the layer that reads it (the features are computed in fp32, then cast for
                ``*-true`` precision).

        Returns:
            ``[batch, dim]`` in ``dtype``.
        """
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must have shape [batch]=[{batch}], got {tuple(t.shape)}")
        return self(t).to(dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_period={self.max_period}, scale={self.scale}"
