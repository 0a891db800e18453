"""Optimizer-state plumbing shared by Tiger and Lion: momentum buffers and ``load_state_dict`` round trips.

``torch.optim.Optimizer.load_state_dict`` casts every floating tensor of the state to its parameter's dtype and
turns strings into generators; these helpers keep a momentum's own dtype and the int64 rounding generators.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_tiger.optim._rounding import SR_KEYS

__all__ = ["cast_momenta", "momentum_of", "restore_int_state", "split_int_state"]


def momentum_of(state: dict[str, Any], key: str, p: Tensor, dtype: torch.dtype | None) -> Tensor:
    """``state[key]``, created as zeros like ``p`` in ``dtype`` (None: p's dtype) on first use."""
    m = state.get(key)
    if m is None:
        m = state[key] = torch.zeros_like(p, dtype=dtype or p.dtype, memory_format=torch.preserve_format)
    return m


def cast_momenta(states: Iterable[dict[str, Any]], key: str, dtype: torch.dtype | None) -> None:
    """After ``load_state_dict``: give every ``state[key]`` the optimizer's momentum dtype again (torch casts
    loaded state to the parameter's dtype). No-op for ``dtype=None``."""
    if dtype is None:
        return
    for state in states:
        m = state.get(key)
        if m is not None and m.dtype != dtype:
            state[key] = m.to(dtype)


def split_int_state(state_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[Any, dict[str, Tensor]]]:
    """Take the integer generator tensors (``sr_stream``, ``sr_step``) out of a state dict before
    ``torch.optim.Optimizer.load_state_dict``, which would cast them to the parameter's floating dtype."""
    saved: dict[Any, dict[str, Tensor]] = {}
    state = {}
    for i, s in state_dict["state"].items():
        if isinstance(s, dict) and any(k in s for k in SR_KEYS):
            saved[i] = {k: s[k] for k in SR_KEYS if k in s}
            s = {k: v for k, v in s.items() if k not in SR_KEYS}
        state[i] = s
    if not saved:
        return state_dict, saved
    out = dict(state_dict)
    out["state"] = state
    return out, saved


def restore_int_state(opt: torch.optim.Optimizer, saved_ids: Sequence[Any],
                      saved: dict[Any, dict[str, Tensor]]) -> None:
    """Put the tensors taken out by :func:`split_int_state` back (int64, on the parameter's device)."""
    if not saved:
        return
    id_to_param = dict(zip(saved_ids, (p for g in opt.param_groups for p in g["params"])))
    for i, tensors in saved.items():
        p = id_to_param[i]
        for k, v in tensors.items():
            opt.state[p][k] = torch.as_tensor(v).to(dtype=torch.int64, device=p.device).clone()
