"""Position sampling for random-position training (Su, "Transformer升级之路：8", after Ruoss et al. 2023)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ..validation import check_int

__all__ = ["random_positions"]

_MODES = ("sorted_int", "equal_mean_float")


def random_positions(
    batch: int,
    seq_len: int,
    max_position: int,
    *,
    mode: Literal["sorted_int", "equal_mean_float"] = "sorted_int",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Random positions for training sequences of length ``N = seq_len``, one row per sequence.

    * ``"sorted_int"`` (Ruoss et al. 2023, "Randomized Positional Encodings Boost Length Generalization of
      Transformers"): ``N`` distinct integers drawn uniformly without
      replacement from ``{0, …, L−1}`` (``L = max_position``, ``L ≫ N``, e.g. ``N = 40``, ``L = 2048``),
      sorted ascending. Returned as int64. At test time use evenly spaced positions (e.g.
      ``torch.linspace(0, L − 1, M)``), which the post finds slightly better than ``arange``.
    * ``"equal_mean_float"`` (Su's variant, RoPE only: ALiBi/windows only need distances, which stay
      meaningful, but the post targets RoPE): per row draw a length ``n ~ Exponential(mean N)`` and use the
      float positions ``linspace(0, 1, N) · n``. ``n`` is capped at ``L − 1`` (``max_position`` bounds the
      span the model sees); with ``L ≫ N`` the cap hardly moves the mean (``E[n] = N(1 − e^{−(L−1)/N})``).
      Returned as float32.

    Args:
        batch: number of rows ``B >= 1``.
        seq_len: sequence length ``N >= 1``.
        max_position: ``L``; ``"sorted_int"`` needs ``L >= N``.
        mode: ``"sorted_int"`` (default) or ``"equal_mean_float"``.
        generator: optional ``torch.Generator`` (on ``device``) for reproducibility.
        device: device of the result.

    Returns:
        ``[batch, seq_len]`` positions, to pass as ``positions=`` to :class:`~lightning_tiger.nn.TransformerLM`,
        :class:`~lightning_tiger.nn.Attention` or :class:`~lightning_tiger.nn.RotaryEmbedding`.
    """
    batch = check_int("batch", batch, low=1)
    seq_len = check_int("seq_len", seq_len, low=1)
    max_position = check_int("max_position", max_position, low=1)
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if mode == "sorted_int":
        if max_position < seq_len:
            raise ValueError(f"max_position must be >= seq_len={seq_len} for mode='sorted_int', got {max_position}")
        # The indices of the N largest of L iid uniforms are a uniform random N-subset of {0..L-1}.
        keys = torch.rand(batch, max_position, generator=generator, device=device)
        return keys.topk(seq_len, dim=-1, sorted=False).indices.sort(dim=-1).values
    n = torch.empty(batch, 1, device=device).exponential_(1.0 / seq_len, generator=generator)
    n = n.clamp_max(float(max_position - 1))
    return torch.linspace(0.0, 1.0, seq_len, device=device).unsqueeze(0) * n
