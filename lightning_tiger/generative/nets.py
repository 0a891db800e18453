"""The default networks of the generative LightningModules and the rebuilding of a network from its config.

Shared by :class:`~lightning_tiger.modules.ScoreMatchingModule`, :class:`~lightning_tiger.modules.RectifiedFlowModule`
and the reflow teacher of :class:`~lightning_tiger.data.ReflowPairsDataModule`, so that a checkpoint written with
the default net is rebuilt with the same architecture everywhere.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from torch import nn

from lightning_tiger.nn.small_unet import SmallUNet
from lightning_tiger.nn.time_mlp import TimeMLP

__all__ = ["default_net", "instantiate"]


def default_net(data_shape: Sequence[int]) -> nn.Module:
    """``TimeMLP(data_dim=d)`` for vectors ``(d,)``, ``SmallUNet(in_channels=c)`` for images ``(c, h, w)``.

    Raises:
        ValueError: any other shape (pass your own ``net(x, t)``).
    """
    shape = tuple(int(s) for s in data_shape)
    if len(shape) == 1:
        return TimeMLP(data_dim=shape[0])
    if len(shape) == 3:
        return SmallUNet(in_channels=shape[0])
    raise ValueError(f"no default net for data_shape {shape}: pass net=... (any module net(x, t))")


def instantiate(spec: Any) -> Any:
    """Instantiate a jsonargparse-style ``{"class_path": ..., "init_args": {...}}`` (nested specs allowed).

    Anything else (``None``, a module object, a number) is returned as is. This is how LightningCLI records a
    ``net`` in a checkpoint's hyperparameters.
    """
    if isinstance(spec, dict) and "class_path" in spec:
        module_name, _, cls_name = spec["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module_name), cls_name)
        kwargs = {k: instantiate(v) for k, v in (spec.get("init_args") or {}).items()}
        return cls(**kwargs)
    return spec
