"""Which path runs an optimizer update: the compiled CPU kernels (``_fused``), ``torch._foreach_*`` or one tensor
at a time. All three share one semantics (``_functional.py`` documents it)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from lightning_tiger.optim import _fused

__all__ = ["evaluate_closure", "fused_available_for", "fused_for_step", "fused_usable", "load_fused", "step_path",
           "use_foreach"]


def evaluate_closure(closure: Callable[[], Any] | None) -> Any:
    """Run ``step()``'s closure with grad enabled (``step`` itself runs under ``no_grad``); its loss, or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def fused_for_step(fused: bool | None, foreach: bool | None) -> ModuleType | None:
    """The kernel module a step may use, or None: ``fused=False``, ``foreach=True`` or under ``torch.compile``,
    which traces the PyTorch paths (the fused op is opaque to it and its flags come back to the host)."""
    if fused is False or foreach or torch.compiler.is_compiling():
        return None
    return load_fused()


def load_fused() -> ModuleType:
    """The compiled-kernel module ``lightning_tiger.optim._fused`` (whose ``fused_available`` builds or loads the
    kernels on first use and says whether they run here)."""
    return _fused


def fused_usable(fused_mod: ModuleType | None, params: Sequence[Tensor], grads: Sequence[Tensor],
                 moms: Sequence[Tensor]) -> bool:
    """Whether every (param, grad, momentum) triple qualifies for the fused kernels: dense, contiguous CPU tensors
    (the kernels are CPU-only), the grad in the param dtype, a dtype pair the kernels support
    (``_fused.fused_supports``), and kernels that load here."""
    if fused_mod is None:
        return False
    strided = torch.strided
    # Runs on every step for every tensor: attribute tests only (``is_cpu`` instead of building torch.device
    # objects).
    for p, g, m in zip(params, grads, moms):
        if not (p.is_contiguous() and g.is_contiguous() and m.is_contiguous()):
            return False
        if p.layout is not strided or g.layout is not strided or m.layout is not strided or g.dtype != p.dtype:
            return False
        if not (p.is_cpu and g.is_cpu and m.is_cpu):
            return False
        if not fused_mod.fused_supports(p.dtype, m.dtype):
            return False
    if not params:
        return True
    try:
        return bool(fused_mod.fused_available(torch.device("cpu")))
    except Exception:  # a broken toolchain must not break training: fall back to the pure-PyTorch path
        return False


def step_path(fused: bool | None, foreach: bool | None, fused_mod: ModuleType | None, params: Sequence[Tensor],
              grads: Sequence[Tensor], moms: Sequence[Tensor], kernel_ok: bool = True) -> str:
    """``"fused"``, ``"foreach"`` or ``"single"``: the path of one optimizer update over these tensors.

    Fused kernels when allowed (``fused`` not False, ``foreach`` not True) and usable (:func:`fused_usable`);
    ``kernel_ok=False`` (a rounding mode the loaded kernels do not implement) excludes them. Otherwise
    ``foreach`` as given, or by default — like torch.optim — foreach on accelerators and one tensor at a time on
    CPU (smallest transient memory).

    Raises:
        RuntimeError: ``fused=True`` cannot be honoured (raised before anything is written).
    """
    if fused is not False and not foreach and kernel_ok and fused_usable(fused_mod, params, grads, moms):
        return "fused"
    if fused:
        raise RuntimeError(
            "fused=True but some tensors do not qualify for the fused kernels (they need dense, contiguous "
            "CPU tensors with one fp32/bf16/fp16 dtype for parameter, gradient and momentum, and kernels "
            "that take this rounding mode: compensation='kahan' and, with an older build, stochastic rounding "
            "run in PyTorch); use fused=None to fall back"
        )
    return "foreach" if use_foreach(foreach, params) else "single"


def use_foreach(foreach: bool | None, params: Sequence[Tensor]) -> bool:
    """``foreach`` as given, else True on accelerators and False on CPU (torch.optim's default)."""
    if foreach is not None:
        return foreach
    return all(p.device.type != "cpu" for p in params)


def fused_available_for(params: Sequence[Tensor]) -> bool:
    """Whether the fused kernels load for the devices of ``params`` (construction-time check of ``fused=True``)."""
    try:
        return all(_fused.fused_available(d) for d in {p.device for p in params} or {torch.device("cpu")})
    except Exception:
        return False
