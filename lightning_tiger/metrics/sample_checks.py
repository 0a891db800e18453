"""Validation of the two samples every sample-quality metric compares (errors name the argument)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["as_2d", "check_pair"]


def as_2d(name: str, value: object) -> Tensor:
    """Validate one sample and flatten it to ``[n, features]``."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {value.dtype}")
    if value.ndim < 1:
        raise ValueError(f"{name} must have shape [n, *features], got a 0-d tensor")
    if value.ndim == 1:
        # A 1-D tensor is read as n scalar samples, the common case for 1-D toy targets.
        value = value[:, None]
    # Checked before flattening: reshape(0, -1) cannot infer the feature count of an empty tensor.
    if value.numel() == 0:
        raise ValueError(f"{name} must be non-empty (n >= 1 samples, >= 1 feature), got shape {tuple(value.shape)}")
    value = value.reshape(value.shape[0], -1)
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return value


def check_pair(
    x: object, y: object, *, equal_size: bool = False, min_size: int = 1, names: tuple[str, str] = ("x", "y")
) -> tuple[Tensor, Tensor]:
    """Validate two samples against each other; return both as ``[n, f]`` / ``[m, f]``.

    Args:
        x, y: the samples ``[n, *features]``, ``[m, *features]`` (1-D: n scalar samples).
        equal_size: require n == m (the exact assignment W2).
        min_size: fewest samples each must hold.
        names: the names the error messages use for x and y.

    Raises:
        TypeError: not floating tensors, or different dtypes.
        ValueError: empty, non-finite, different feature counts, sizes that break ``equal_size``/``min_size``.
    """
    nx, ny = names
    x2, y2 = as_2d(nx, x), as_2d(ny, y)
    if x2.dtype != y2.dtype:
        raise TypeError(f"{nx} and {ny} must share a dtype, got {x2.dtype} and {y2.dtype}")
    if x2.shape[1] != y2.shape[1]:
        raise ValueError(
            f"{nx} and {ny} must have the same number of features, got {x2.shape[1]} and {y2.shape[1]} "
            f"(shapes {tuple(x.shape)} and {tuple(y.shape)})"  # type: ignore[union-attr]
        )
    if equal_size and x2.shape[0] != y2.shape[0]:
        raise ValueError(
            f"{nx} and {ny} must have the same number of samples for the exact assignment W2, got "
            f"{x2.shape[0]} and {y2.shape[0]} (subsample the larger one, or use sliced_wasserstein2)"
        )
    for name, v in ((nx, x2), (ny, y2)):
        if v.shape[0] < min_size:
            raise ValueError(f"{name} must hold at least {min_size} samples, got {v.shape[0]}")
    return x2, y2
