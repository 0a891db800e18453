"""Tiger: "tight-fisted" sign-momentum optimizer (Su 2023, kexue.fm/archives/9512), faithful to bojone/tiger."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_tiger.optim._dispatch import evaluate_closure, fused_for_step, step_path
from lightning_tiger.optim._functional import tiger_step_
from lightning_tiger.optim._fused import RMSCache
from lightning_tiger.optim._options import (
    check_int_at_least,
    check_paths,
    check_rounding,
    parse_dtype,
    prepare_fused,
    tiger_hparams,
)
from lightning_tiger.optim._rounding import fused_rounding_kwargs, kahan_buffer, sr_advance, sr_keys_of, sr_state
from lightning_tiger.optim._sparse import tiger_sparse_step_
from lightning_tiger.optim._state import cast_momenta, momentum_of, restore_int_state, split_int_state
from lightning_tiger.optim._tiger_fold import FoldHooks, TigerFoldMixin
from lightning_tiger.optim._tiger_kinds import KindGuessWarning, TigerKindsMixin
from lightning_tiger.optim.param_groups import ParamKind
from lightning_tiger.optim.settings import TigerParamSettings
from lightning_tiger.optim.sharding import any_dtensor, check_shards, refuse_fsdp1, tiger_sharded_step_
from lightning_tiger.validation import check_bool

__all__ = ["KindGuessWarning", "Tiger"]

@dataclasses.dataclass
class _Batch:
    """The tensors of one step that share the micro-step coefficients (one fused call)."""

    params: list[Tensor] = dataclasses.field(default_factory=list)
    grads: list[Tensor] = dataclasses.field(default_factory=list)
    moms: list[Tensor] = dataclasses.field(default_factory=list)
    settings: list[TigerParamSettings] = dataclasses.field(default_factory=list)
    sr: list[dict[str, Any] | None] = dataclasses.field(default_factory=list)  # state holding a generator
    kahan: list[Tensor | None] = dataclasses.field(default_factory=list)


class Tiger(TigerKindsMixin, TigerFoldMixin, torch.optim.Optimizer):
    r"""Tiger (Su 2023, kexue.fm/archives/9512; official TF code bojone/tiger ``tiger.py``).

    Lion with β1 = β2 = β, a learning rate relative to each tensor's RMS, decoupled weight decay scaled by the
    same rate, and gradient accumulation folded into the momentum. With micro-step ``t`` and
    ``k = grad_accum_steps``: ``m ← b1·m + b2·g`` with ``b1 = β`` on the first micro-step of a window (else 1)
    and ``b2 = (1 − β)/k``; on the last micro-step ``θ ← θ − η·(sign(m) + λ·θ)``. η, λ and the shrink centre
    depend on the parameter's kind (:class:`~lightning_tiger.optim.ParamKind`: from a group's ``"kind"`` key,
    :meth:`assign_kinds` or :meth:`from_module`; else guessed from ``ndim``, with a :class:`KindGuessWarning`).
    A non-finite gradient keeps m and shrinks θ toward its centre (:mod:`lightning_tiger.optim.shrink`).
    Design notes (accumulation patterns, tight-fisted mode, low precision, paths, RMS cache) are in the
    optimizer docs (``docs/optim.md``).

    One documented deviation: on a non-finite step the fused CPU kernels restore m and θ to within float
    rounding, not bit for bit (they roll back in one pass); ``exact_nonfinite=True`` removes it. Sparse
    gradients update rows lazily (an extension; the official code moves every row).

    Sharded training: under FSDP2 / DTensor (``fully_shard``, Lightning's ``ModelParallelStrategy``) the RMS of
    each tensor, its kind, floor and non-finite decision are those of the whole tensor (one all-reduce per step,
    :mod:`lightning_tiger.optim.sharding`), so results match one process to float rounding; FSDP1 flat
    parameters (Lightning's ``FSDPStrategy``) are refused.

    Args:
        params: parameters or param groups (e.g. from ``tiger_param_groups``). Group keys: ``lr``, ``beta``,
            ``weight_decay``, ``grad_accum_steps``, ``shrink_ratio``, ``rms_floor``, ``kind``.
        lr: relative learning rate α, >= 0. Default 1e-3 (typical peak 1e-3 … 2e-3).
        beta: momentum β in [0, 1). Default 0.965 (language); 0.945 for vision.
        weight_decay: λ >= 0, decoupled and multiplied by η. Default 0.01.
        grad_accum_steps: k >= 1 (int), micro-steps per parameter update. Default 1.
        shrink_ratio: s in (0, 1] of the non-finite rule. Default 0.99.
        rms_floor: floor of the RMS in η (>= 0), or None (default) for the automatic ``0.1/sqrt(fan_in)``;
            0 is the official code.
        momentum_dtype: floating dtype (or its name, e.g. ``"bfloat16"``) of the momentum; None = param dtype.
        fold_in_backward: fold gradients into the momentum during backward (tight-fisted mode). Default False.
        foreach: use ``torch._foreach_*`` kernels; None (default) picks by device.
        fused: use the compiled CPU kernels; None (default) = when available; True raises where unavailable.
        exact_nonfinite: fused kernels: bit-exact non-finite rule (reads each gradient before writing; slower).
            Default False.
        rms_cache: fused kernels: reuse Σθ² of the θ written at the previous step. Default True.
        stochastic_rounding: round bf16/fp16 parameters (and momenta) stochastically. Default True.
        compensation: None (default) or ``"kahan"`` (deterministic compensated rounding of bf16/fp16
            parameters, one extra buffer each; runs in PyTorch, so ``fused=True`` is refused with it).
        seed: int >= 0 seeding the rounding streams, or None (default: ``torch.initial_seed()``).
        momentum_sr: with stochastic rounding, also round a bf16/fp16 momentum stochastically. Default True.

    Raises:
        TypeError: a hyperparameter or flag has the wrong type.
        ValueError: a hyperparameter is out of range, or ``fused=True`` is combined with ``foreach=True`` or
            ``compensation="kahan"``.
        RuntimeError: ``fused=True`` where the kernels are unavailable; at ``step()``: FSDP1 flat parameters, an
            embedding whose rows are split across ranks, a ``Partial`` placement (messages name the alternative);
            ``fold_in_backward=True`` with DTensor (FSDP2) parameters, at construction; ``fold_in_backward=True``
            under ``torch.distributed`` with more than one process raises at the first fold or ``step()`` unless
            :meth:`sync_momenta` was called.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        beta: float = 0.965,
        weight_decay: float = 0.01,
        grad_accum_steps: int = 1,
        shrink_ratio: float = 0.99,
        rms_floor: float | None = None,
        momentum_dtype: torch.dtype | str | None = None,
        fold_in_backward: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        exact_nonfinite: bool = False,
        rms_cache: bool = True,
        stochastic_rounding: bool = True,
        compensation: str | None = None,
        seed: int | None = None,
        momentum_sr: bool = True,
    ) -> None:
        defaults = tiger_hparams({
            "lr": lr, "beta": beta, "weight_decay": weight_decay, "grad_accum_steps": grad_accum_steps,
            "shrink_ratio": shrink_ratio, "rms_floor": rms_floor,
        }, where="")
        self.momentum_dtype = parse_dtype("momentum_dtype", momentum_dtype)
        self.fold_in_backward = bool(check_bool("fold_in_backward", fold_in_backward))
        self.foreach, self.fused = check_paths(foreach, fused, compensation)
        self.exact_nonfinite = bool(check_bool("exact_nonfinite", exact_nonfinite))
        self.rms_cache = bool(check_bool("rms_cache", rms_cache))
        self.seed = check_rounding(stochastic_rounding, compensation, seed, momentum_sr)
        self.stochastic_rounding, self.compensation, self.momentum_sr = stochastic_rounding, compensation, momentum_sr
        # param -> Σθ² of the θ the fused kernel last wrote (not state: never saved, rebuilt after a resume)
        self._rms_cache: RMSCache | None = RMSCache() if self.rms_cache else None
        self._hooks = FoldHooks()
        self._window: dict[Tensor, list[Any]] = {}  # param -> [folded a finite grad, saw a non-finite grad, folds]
        self._param_group: dict[Tensor, dict[str, Any]] = {}
        self._static: dict[int, tuple[tuple, tuple[int, bool, float, float]]] = {}  # id(param) -> see _settings
        self._warned_guess = False
        super().__init__(params, defaults)
        prepare_fused(self.fused, [p for g in self.param_groups for p in g["params"]], "Tiger")
        if self.fold_in_backward:
            self._hooks.active = True
            for group in self.param_groups:
                self._register_hooks(group)

    # ------------------------------------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (validated like the constructor's arguments); it joins the current micro-step count."""
        if "kind" in param_group:
            param_group["kind"] = ParamKind.parse(param_group["kind"], "param group 'kind'").value
        if "micro_step" not in param_group:
            param_group["micro_step"] = self.param_groups[0]["micro_step"] if self.param_groups else 0
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.update(tiger_hparams(group, where=f" (param group {len(self.param_groups) - 1})"))
        check_int_at_least("micro_step", group["micro_step"], 0)
        for p in group["params"]:
            self._param_group[p] = group
        if self._hooks.active:
            self._register_hooks(group)

    def _momentum(self, p: Tensor) -> Tensor:
        return momentum_of(self.state[p], "momentum", p, self.momentum_dtype)

    # ------------------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One micro-step (the parameters move on every ``grad_accum_steps``-th call).

        Args:
            closure: re-evaluates the model and returns the loss (called with grad enabled, before the update;
                Lightning runs ``training_step`` + ``backward`` in it).

        Returns:
            The closure's loss, or None.
        """
        loss = evaluate_closure(closure)
        if self._hooks.active:
            self._fold_step()
            return loss
        refuse_fsdp1(self.param_groups)  # flat 1-D shards: RMS, kind and non-finite rule would be the piece's
        fused_mod = fused_for_step(self.fused, self.foreach)
        # Groups that share this micro-step's coefficients are updated by ONE kernel call: one pass of the
        # thread pool over all tensors balances the threads better than one call per group.
        batches: dict[tuple[float, float, bool, float], _Batch] = {}
        sparse: list[tuple[Tensor, dict[str, Any]]] = []
        first = 0
        for group in self.param_groups:
            self._collect_group(group, batches, sparse, first)
            first += len(group["params"])
        # choose every batch's path first: a refused step (fused=True, a tensor the kernels cannot take) raises
        # before any tensor or counter moves
        paths = [step_path(self.fused, self.foreach, fused_mod, b.params, b.grads, b.moms,
                             kernel_ok=self._kernel_ok(fused_mod, b)) for b in batches.values()]
        for b in batches.values():  # DTensor placements Tiger cannot handle, also before anything moves
            check_shards(b.params, b.grads, b.settings)
        for p, group in sparse:
            self._sparse_step(p, group)
        for ((b1, b2, update, shrink), batch), path in zip(batches.items(), paths):
            self._apply(batch, path, fused_mod, b1=b1, b2=b2, update=update, shrink_ratio=shrink)
        for group in self.param_groups:
            group["micro_step"] += 1
        return loss

    @staticmethod
    def _coefficients(group: dict[str, Any]) -> tuple[float, float, bool]:
        """(b1, b2, update) of the group's current micro-step (accumulation folded into the momentum, as in
        bojone/tiger ``tiger.py``: b1 = β on the first micro-step of a window, else 1; b2 = (1 − β)/k)."""
        t, k, beta = group["micro_step"], group["grad_accum_steps"], group["beta"]
        return (beta if t % k == 0 else 1.0), (1.0 - beta) / k, (t + 1) % k == 0

    def _collect_group(self, group: dict[str, Any], batches: dict[tuple[float, float, bool, float], _Batch],
                       sparse: list[tuple[Tensor, dict[str, Any]]], first: int) -> None:
        b1, b2, update = self._coefficients(group)
        batch = None
        for index, p in enumerate(group["params"], start=first):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                sparse.append((p, group))
                continue
            if batch is None:
                batch = batches.setdefault((b1, b2, update, group["shrink_ratio"]), _Batch())
            state = self.state[p]
            m = momentum_of(state, "momentum", p, self.momentum_dtype)
            batch.params.append(p)
            batch.grads.append(p.grad)
            batch.moms.append(m)
            batch.settings.append(self._settings(p, group, group["lr"], state))
            batch.sr.append(self._sr_state(state, p, m, index))
            batch.kahan.append(self._kahan(state, p))

    def _sr_state(self, state: dict[str, Any], p: Tensor, m: Tensor, index: int | None) -> dict[str, Any] | None:
        """The state dict holding p's rounding generator when its update rounds stochastically, else None.

        ``index``: p's position in the flat parameter order (None: looked up, only when the stream is created).
        """
        return sr_state(state, p, m, self.seed, (lambda: self._flat_index(p)) if index is None else index,
                        stochastic_rounding=self.stochastic_rounding, compensation=self.compensation,
                        momentum_sr=self.momentum_sr)

    def _flat_index(self, p: Tensor) -> int:
        """Position of ``p`` in the optimizer's flat parameter order (its stochastic-rounding stream)."""
        return next(i for i, q in enumerate(q for g in self.param_groups for q in g["params"]) if q is p)

    def _kahan(self, state: dict[str, Any], p: Tensor) -> Tensor | None:
        return kahan_buffer(state, p, self.compensation)

    def _kernel_ok(self, fused_mod: Any, batch: _Batch) -> bool:
        """Whether the fused kernels implement this batch's rounding (stochastic or nearest: yes; Kahan: no)."""
        return all(c is None for c in batch.kahan)

    def _apply(self, batch: _Batch, path: str, fused_mod: Any, **coefs: Any) -> None:
        tensors = (batch.params, batch.grads, batch.moms, batch.settings, sr_keys_of(batch.sr), batch.kahan)
        if any_dtensor(batch.params):  # FSDP2 / DTensor shards: global RMS and non-finite decision, then local update
            run = functools.partial(self._update, None, fused_mod, coefs)
            tiger_sharded_step_(*tensors, update=coefs["update"], shrink_ratio=coefs["shrink_ratio"],
                                momentum_sr=self.momentum_sr, run=run)
        else:
            self._update(path, fused_mod, coefs, *tensors)
        sr_advance(batch.sr)

    def _update(self, path: str | None, fused_mod: Any, coefs: dict[str, Any], params: list[Tensor],
                grads: list[Tensor], moms: list[Tensor], settings: list[TigerParamSettings],
                keys: list[Tensor | None], kahan: list[Tensor | None]) -> None:
        """The update of plain tensors by ``path`` (None: chosen here, for the local shards of DTensors)."""
        if path is None:
            path = step_path(self.fused, self.foreach, fused_mod, params, grads, moms,
                             kernel_ok=all(c is None for c in kahan))
        modes, lrs, wds, centers, floors = (list(x) for x in zip(*settings))
        kwargs = dict(lr_modes=modes, lrs=lrs, weight_decays=wds, centers=centers, rms_floor=floors, **coefs)
        if path == "fused":
            kwargs.update(fused_rounding_kwargs(keys, self.momentum_sr))
            fused_mod.tiger_step_(params, grads, moms, exact=self.exact_nonfinite, rms_cache=self._rms_cache,
                                  **kwargs)
        else:
            tiger_step_(params, grads, moms, keys=keys, momentum_sr=self.momentum_sr, kahan=kahan,
                          foreach=path == "foreach", **kwargs)

    def _sparse_step(self, p: Tensor, group: dict[str, Any]) -> None:
        b1, b2, update = self._coefficients(group)
        k = group["grad_accum_steps"]
        if k != 1:
            raise RuntimeError(
                "Tiger: sparse gradients need grad_accum_steps=1 (lazy row updates cannot fold a window whose "
                f"micro-steps touch different rows); got grad_accum_steps={k}"
            )
        mode, lr, wd, center, floor = self._settings(p, group, group["lr"])
        tiger_sparse_step_(p, p.grad, self._momentum(p), lr_mode=mode, lr=lr, weight_decay=wd, center=center,
                             rms_floor=floor, b1=b1, b2=b2, update=update, shrink_ratio=group["shrink_ratio"])

    # ------------------------------------------------------------------------------------------- state I/O
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; the momentum keeps ``momentum_dtype`` (torch would cast it to the param dtype)."""
        # Checkpoints from before kinds moved to the param groups keep them in state[i]["kind"] (torch's _cast
        # would turn those strings into generators): move them to their group's "param_kinds".
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        kinds = {i: s["kind"] for i, s in state_dict["state"].items() if isinstance(s, dict) and "kind" in s}
        if kinds:
            state_dict = dict(state_dict)
            state_dict["state"] = {i: {k: v for k, v in s.items() if k != "kind"} if i in kinds else s
                                   for i, s in state_dict["state"].items()}
            state_dict["param_groups"] = [
                g if "kind" in g or not any(i in kinds for i in g["params"]) else
                {**g, "param_kinds": tuple(ParamKind.parse(kinds[i], "state 'kind'").value if i in kinds else None
                                           for i in g["params"])}
                for g in state_dict["param_groups"]]
        state_dict, generators = split_int_state(state_dict)
        super().load_state_dict(state_dict)
        restore_int_state(self, saved_ids, generators)
        self._param_group = {p: g for g in self.param_groups for p in g["params"]}
        cast_momenta(self.state.values(), "momentum", self.momentum_dtype)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(momentum_dtype=self.momentum_dtype, fold_in_backward=self.fold_in_backward,
                     foreach=self.foreach, fused=self.fused, exact_nonfinite=self.exact_nonfinite,
                     rms_cache=self.rms_cache, stochastic_rounding=self.stochastic_rounding,
                     compensation=self.compensation, seed=self.seed, momentum_sr=self.momentum_sr)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Called by load_state_dict (keep our settings) and by unpickling/deepcopy (a fresh object: a copy holds
        # other tensors than the hooked ones, so it starts in the standard mode).
        for key, default in (("momentum_dtype", None), ("fold_in_backward", False), ("foreach", None),
                             ("fused", None), ("exact_nonfinite", False), ("rms_cache", True),
                             ("stochastic_rounding", False), ("compensation", None), ("seed", 0),
                             ("momentum_sr", True)):
            state.setdefault(key, self.__dict__.get(key, default))
        super().__setstate__(state)
        self.__dict__.setdefault("_static", {})
        self.__dict__.setdefault("_warned_guess", False)
        if "_rms_cache" not in self.__dict__:
            self._rms_cache = RMSCache() if self.rms_cache else None
        if "_hooks" not in self.__dict__:
            self._hooks = FoldHooks()
            self._window = {}
        self._param_group = {p: g for g in self.param_groups for p in g["params"]}
