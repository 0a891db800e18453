"""Lion (Chen et al. 2023, Algorithm 2), in the paper's order of operations and decay convention."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_tiger.optim._dispatch import evaluate_closure, fused_for_step, step_path
from lightning_tiger.optim._functional import lion_step_
from lightning_tiger.optim._options import check_paths, check_rounding, lion_hparams, parse_dtype, prepare_fused
from lightning_tiger.optim._rounding import fused_rounding_kwargs, kahan_buffer, sr_advance, sr_keys_of, sr_state
from lightning_tiger.optim._state import cast_momenta, momentum_of, restore_int_state, split_int_state
from lightning_tiger.optim.sharding import any_dtensor, check_shards, lion_sharded_step_

__all__ = ["Lion"]


class Lion(torch.optim.Optimizer):
    r"""Lion, "EvoLved Sign Momentum" (Chen et al. 2023; official code google/automl ``lion/lion_pytorch.py``).

    Per parameter, in this order (Chen et al. 2023, Algorithm 2)::

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
    **Low precision** as for :class:`~lightning_tiger.optim.Tiger`: bf16/fp16 parameters and momenta are
    rounded stochastically by default (unbiased; counter-based bits, generator state ``sr_stream`` /
    ``sr_step`` in the optimizer state, so resumes are bit-exact), ``compensation="kahan"`` is the
    deterministic alternative, ``stochastic_rounding=False`` rounds to nearest (a bf16 Lion at lr 1e-4 then
    mostly stalls: the step is below half an ulp of any element larger than ~0.05). The PyTorch paths are
    sync-free: ``torch.compile(opt.step, fullgraph=True)`` captures the step (Triton kernels on a GPU).

    Sharded training: Lion is elementwise, so it updates the local shards of FSDP2 / DTensor parameters
    (:mod:`lightning_tiger.optim.sharding`) and FSDP1 flat parameters exactly as one process would.

    Args:
        params: parameters or param groups (extra group keys such as ``"kind"`` are stored and ignored).
        lr: learning rate η >= 0. Default 1e-4.
        betas: (β1, β2), each in [0, 1). Default (0.9, 0.99).
        weight_decay: λ >= 0. Default 0.
        momentum_dtype: floating dtype (or its name) of the momentum; None = parameter dtype.
        foreach: use ``torch._foreach_*`` kernels; None picks by device (foreach on accelerators).
        fused: use the compiled kernels; None = when available; True raises where unavailable.
        stochastic_rounding: round bf16/fp16 parameters (and momenta) stochastically. Default True.
        compensation: None (default) or ``"kahan"`` (deterministic compensated rounding; PyTorch paths).
        seed: int >= 0 seeding the rounding streams, or None (``torch.initial_seed()``).
        momentum_sr: with stochastic rounding, also round a bf16/fp16 momentum stochastically. Default True.

    Raises:
        TypeError: a hyperparameter or flag has the wrong type.
        ValueError: a hyperparameter is out of range, or ``fused=True`` is combined with ``foreach=True`` or
            ``compensation="kahan"``.
        RuntimeError: ``fused=True`` where the kernels are unavailable.
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
        stochastic_rounding: bool = True,
        compensation: str | None = None,
        seed: int | None = None,
        momentum_sr: bool = True,
    ) -> None:
        defaults = lion_hparams({"lr": lr, "betas": betas, "weight_decay": weight_decay}, where="")
        self.momentum_dtype = parse_dtype("momentum_dtype", momentum_dtype)
        self.foreach, self.fused = check_paths(foreach, fused, compensation)
        self.seed = check_rounding(stochastic_rounding, compensation, seed, momentum_sr)
        self.stochastic_rounding, self.compensation, self.momentum_sr = stochastic_rounding, compensation, momentum_sr
        super().__init__(params, defaults)
        prepare_fused(self.fused, [p for g in self.param_groups for p in g["params"]], "Lion")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, validated like the constructor's arguments."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.update(lion_hparams(group, where=f" (param group {len(self.param_groups) - 1})"))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One Lion step over every parameter with a gradient.

        Args:
            closure: re-evaluates the model and returns the loss (called with grad enabled first).

        Returns:
            The closure's loss, or None.
        """
        loss = evaluate_closure(closure)
        fused_mod = fused_for_step(self.fused, self.foreach)
        # Collect and choose every group's path first: a refused step (sparse gradient, fused=True on a tensor the
        # kernels cannot take) raises before any parameter or momentum moves.
        plans = []
        first = 0
        for group in self.param_groups:
            indexed = [(i, p) for i, p in enumerate(group["params"], start=first) if p.grad is not None]
            first += len(group["params"])
            if any(p.grad.is_sparse for _, p in indexed):
                raise RuntimeError("Lion does not support sparse gradients (use Tiger, which updates rows lazily)")
            if not indexed:
                continue
            params = [p for _, p in indexed]
            grads = [p.grad for p in params]
            moms = [self._momentum(p) for p in params]
            srs = [self._sr_state(p, m, i) for (i, p), m in zip(indexed, moms)]
            kahan = [self._kahan(p) for p in params]
            kernel_ok = all(c is None for c in kahan)  # the kernels round stochastically or to nearest, not Kahan
            path = step_path(self.fused, self.foreach, fused_mod, params, grads, moms, kernel_ok=kernel_ok)
            check_shards(params, grads)  # DTensor placements Lion cannot handle, before anything moves
            plans.append((group, params, grads, moms, srs, kahan, path))
        for group, params, grads, moms, srs, kahan, path in plans:
            beta1, beta2 = group["betas"]
            kwargs = dict(lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"])
            if any_dtensor(params):  # FSDP2 / DTensor: elementwise, so the local shards are updated (sharding.py)
                run = functools.partial(self._update, None, fused_mod, kwargs)
                lion_sharded_step_(params, grads, moms, sr_keys_of(srs), kahan, momentum_sr=self.momentum_sr, run=run)
            else:
                self._update(path, fused_mod, kwargs, params, grads, moms, sr_keys_of(srs), kahan)
            sr_advance(srs)
        return loss

    def _update(self, path: str | None, fused_mod: Any, kwargs: dict[str, Any], params: list[Tensor],
                grads: list[Tensor], moms: list[Tensor], keys: list[Tensor | None], kahan: list[Tensor | None]) -> None:
        """The update of plain tensors by ``path`` (None: chosen here, for the local shards of DTensors)."""
        if path is None:
            path = step_path(self.fused, self.foreach, fused_mod, params, grads, moms,
                             kernel_ok=all(c is None for c in kahan))
        if path == "fused":
            fused_mod.lion_step_(params, grads, moms, **kwargs, **fused_rounding_kwargs(keys, self.momentum_sr))
        else:
            lion_step_(params, grads, moms, keys=keys, momentum_sr=self.momentum_sr, kahan=kahan,
                         foreach=path == "foreach", **kwargs)

    def _sr_state(self, p: Tensor, m: Tensor, index: int) -> dict[str, Any] | None:
        """The state dict holding p's rounding generator when its update rounds stochastically, else None."""
        return sr_state(self.state[p], p, m, self.seed, index, stochastic_rounding=self.stochastic_rounding,
                        compensation=self.compensation, momentum_sr=self.momentum_sr)

    def _kahan(self, p: Tensor) -> Tensor | None:
        return kahan_buffer(self.state[p], p, self.compensation)

    def _momentum(self, p: Tensor) -> Tensor:
        return momentum_of(self.state[p], "exp_avg", p, self.momentum_dtype)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; the momentum keeps ``momentum_dtype`` (torch would cast it to the param dtype)."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        state_dict, generators = split_int_state(state_dict)
        super().load_state_dict(state_dict)
        restore_int_state(self, saved_ids, generators)
        cast_momenta(self.state.values(), "exp_avg", self.momentum_dtype)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(momentum_dtype=self.momentum_dtype, foreach=self.foreach, fused=self.fused,
                     stochastic_rounding=self.stochastic_rounding, compensation=self.compensation, seed=self.seed,
                     momentum_sr=self.momentum_sr)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Called by load_state_dict (keep our settings) and by unpickling/deepcopy.
        for key, default in (("momentum_dtype", None), ("foreach", None), ("fused", None),
                             ("stochastic_rounding", False), ("compensation", None), ("seed", 0),
                             ("momentum_sr", True)):
            state.setdefault(key, self.__dict__.get(key, default))
        super().__setstate__(state)

