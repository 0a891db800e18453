"""Lion (Chen et al. 2023), in the paper's order of operations and decay convention (SPEC §1.1)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_tiger.optim import _functional as F

__all__ = ["Lion"]


class Lion(torch.optim.Optimizer):
    r"""Lion, "EvoLved Sign Momentum" (Chen et al. 2023; official code google/automl ``lion/lion_pytorch.py``).

    Per parameter, in this order (SPEC §1.1)::

        c = β1·m + (1 − β1)·g
        θ ← θ·(1 − η·λ)            # decoupled weight decay, scaled by the learning rate (paper convention)
        θ ← θ − η·sign(c)          # sign(0) = 0
        m ← β2·m + (1 − β2)·g

    A parameter whose ``grad`` is None is skipped entirely (no decay either). The paper advises an lr 3–10×
    smaller than AdamW's and a weight decay 3–10× larger (the effective decay is η·λ); betas (0.95, 0.98) help
    stability for language models. Lion cannot fold gradient accumulation into its momentum when β1 ≠ β2
    (it needs g and m separately): use :class:`~lightning_tiger.optim.Tiger` for that.

    **Reproducing other decay conventions** (ours: ``θ·(1 − η_t·λ)`` with the scheduled η_t, like the paper,
    lion-pytorch, timm and optax):

    - decay independent of the learning rate (``θ·(1 − λ')`` per step, e.g. pytorch_optimizer's
      ``fixed_decay=True``): ``weight_decay = λ' / lr`` (exact at constant lr; under a schedule the decay then
      follows the schedule);
    - decay scaled by the schedule multiplier only (``θ·(1 − (η_t/η_0)·λ'')``, AdamW-paper style):
      ``weight_decay = λ'' / lr_initial``;
    - coupled L2 decay (``g + λθ`` inside the sign, bitsandbytes' 32-bit Lion before 2026): not reproducible
      by a decoupled rule; it is a different algorithm.

    **Dtypes and paths** as for Tiger: momentum (``state["exp_avg"]``) in ``momentum_dtype`` (default: the
    parameter's dtype), math in float32, ``fused`` / ``foreach`` / single-tensor paths with one semantics.

    Args:
        params: parameters or param groups (extra group keys such as ``"kind"`` are stored and ignored).
        lr: learning rate η >= 0. Default 1e-4.
        betas: (β1, β2), each in [0, 1). Default (0.9, 0.99).
        weight_decay: λ >= 0. Default 0.
        momentum_dtype: floating dtype (or its name) of the momentum; None = parameter dtype.
        foreach: use ``torch._foreach_*`` kernels; None picks by device (foreach on accelerators).
        fused: use the compiled kernels; None = when available; True raises where unavailable.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        momentum_dtype: torch.dtype | str | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = _validated({"lr": lr, "betas": betas, "weight_decay": weight_decay}, where="")
        self.momentum_dtype = F.parse_dtype("momentum_dtype", momentum_dtype)
        self.foreach = F.check_flag("foreach", foreach)
        self.fused = F.check_flag("fused", fused)
        if self.fused and self.foreach:
            raise ValueError("fused=True and foreach=True are mutually exclusive")
        super().__init__(params, defaults)
        if self.fused:
            all_params = [p for g in self.param_groups for p in g["params"]]
            if not F.fused_available_for(all_params):
                raise RuntimeError(
                    "fused=True but the compiled Lion kernels are unavailable here (no C++ compiler, or "
                    "lightning_tiger.optim._fused failed to build); use fused=None to fall back to PyTorch"
                )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, validated like the constructor's arguments."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.update(_validated(group, where=f" (param group {len(self.param_groups) - 1})"))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One Lion step over every parameter with a gradient.

        Args:
            closure: re-evaluates the model and returns the loss (called with grad enabled first).

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        fused_mod = F.load_fused() if self.fused is not False and not self.foreach else None
        # Collect and choose every group's path first: a refused step (sparse gradient, fused=True on a tensor the
        # kernels cannot take) raises before any parameter or momentum moves.
        plans = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("Lion does not support sparse gradients (use Tiger, which updates rows lazily)")
            if not params:
                continue
            grads = [p.grad for p in params]
            moms = [self._momentum(p) for p in params]
            path = F.step_path(self.fused, self.foreach, fused_mod, params, grads, moms)
            plans.append((group, params, grads, moms, path))
        for group, params, grads, moms, path in plans:
            beta1, beta2 = group["betas"]
            kwargs = dict(lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"])
            if path == "fused":
                fused_mod.lion_step_(params, grads, moms, **kwargs)
            elif path == "foreach":
                F.lion_step_foreach_(params, grads, moms, **kwargs)
            else:
                F.lion_step_single_(params, grads, moms, **kwargs)
        return loss

    def _momentum(self, p: Tensor) -> Tensor:
        return F.momentum_of(self.state[p], "exp_avg", p, self.momentum_dtype)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; the momentum keeps ``momentum_dtype`` (torch would cast it to the param dtype)."""
        super().load_state_dict(state_dict)
        F.cast_momenta(self.state.values(), "exp_avg", self.momentum_dtype)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(momentum_dtype=self.momentum_dtype, foreach=self.foreach, fused=self.fused)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Called by load_state_dict (keep our settings) and by unpickling/deepcopy.
        for key in ("momentum_dtype", "foreach", "fused"):
            state.setdefault(key, self.__dict__.get(key))
        super().__setstate__(state)


def _validated(group: dict[str, Any], where: str) -> dict[str, Any]:
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas{where} must be a pair (beta1, beta2) in [0, 1), got {betas!r}")
    return {
        "lr": F.check_float(f"lr{where}", group["lr"], low=0.0, high=None),
        "betas": (
            F.check_float(f"betas[0]{where}", betas[0], low=0.0, high=1.0),
            F.check_float(f"betas[1]{where}", betas[1], low=0.0, high=1.0),
        ),
        "weight_decay": F.check_float(f"weight_decay{where}", group["weight_decay"], low=0.0, high=None),
    }
