"""Small tensor helpers shared by the SDEs, the samplers and the LightningModules that use them."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["as_time", "batch_broadcast", "randn"]


def as_time(t: Tensor | float, like: Tensor | None = None) -> Tensor:
    """``t`` as a floating tensor: fp64 is kept, every other dtype becomes fp32 (on ``like``'s device).

    Diffusion times and noise scales stay in fp32 even under autocast: σ_t spans four decades near t = 0 and
    bf16 would round it visibly.
    """
    t = torch.as_tensor(t, device=None if like is None else like.device)
    return t if t.dtype == torch.float64 else t.float()


def batch_broadcast(coef: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample coefficient ``[batch]`` to broadcast against ``x [batch, *shape]``."""
    return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


def randn(shape: tuple[int, ...], *, generator: torch.Generator | None = None,
          device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal noise of ``shape``; drawn on the generator's device, then moved to ``device``.

    So a CPU generator gives the same draws whatever device the sampler runs on.
    """
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)
