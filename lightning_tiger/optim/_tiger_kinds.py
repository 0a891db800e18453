"""How Tiger knows each parameter's kind (and warns when it has to guess), and the settings that follow from it.

A parameter's kind comes from its group's ``"kind"`` key (``tiger_param_groups``, :meth:`Tiger.from_module`),
else from the group's ``"param_kinds"`` tuple (one entry per parameter, set by :meth:`Tiger.assign_kinds`), else
from ``ndim`` (a guess, warned once per optimizer with a :class:`KindGuessWarning`). The settings of each kind
are the table of :class:`~lightning_tiger.optim.ParamKind` (Su 2023, kexue.fm/archives/9512; bojone/tiger
``tiger.py``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from lightning_tiger.optim._rounding import upcast
from lightning_tiger.optim.param_groups import ParamKind, classify_parameters, guessed_parameters, tiger_param_groups
from lightning_tiger.optim.settings import (
    LR_CONSTANT,
    LR_RMS,
    LR_ROW_RMS,
    TigerParamSettings,
    auto_rms_floor,
    effective_lr,
)
from lightning_tiger.optim.shrink import shrink_center
from lightning_tiger.validation import user_stacklevel

__all__ = ["KindGuessWarning", "TigerKindsMixin"]

_T = TypeVar("_T", bound="TigerKindsMixin")
_HALF_LR_KINDS = (ParamKind.BIAS, ParamKind.NORM_SCALE, ParamKind.NORM_SHIFT)


class KindGuessWarning(UserWarning):
    """Tiger had to guess a parameter's kind from its ``ndim`` (see :meth:`Tiger.from_module`)."""




class TigerKindsMixin:
    """The kind and settings half of :class:`~lightning_tiger.optim.Tiger`.

    Uses the host optimizer's ``state`` and ``_param_group``; owns ``_static`` (id(param) -> memoised kind-dependent
    settings) and ``_warned_guess``.
    """

    state: Any
    _param_group: dict[Tensor, dict[str, Any]]
    _static: dict[int, tuple[tuple, tuple[int, bool, float, float]]]
    _warned_guess: bool

    def assign_kinds(self, module: nn.Module) -> dict[str, ParamKind]:
        """Classify by module type the parameters whose group has no ``"kind"`` key (see ``classify_parameters``).

        Call it when the optimizer was built from ``model.parameters()`` (LightningCLI does). The kinds are
        stored in the param group (``group["param_kinds"]``: one kind name or None per parameter), hence saved in
        checkpoints; never in the per-parameter state, which state-dict utilities cast and shard, and which
        ``torch.distributed.checkpoint.state_dict.get_state_dict`` must find empty on a fresh optimizer to create
        the entries a sharded checkpoint is loaded into.

        Returns:
            ``{name: kind}`` of the parameters that were assigned.

        Raises:
            TypeError: ``module`` is not an ``nn.Module``.
        """
        named = dict(module.named_parameters())
        assigned: dict[str, ParamKind] = {}
        new: dict[int, list[str | None]] = {}  # id(group) -> its param_kinds
        for name, kind in classify_parameters(module).items():
            p = named[name]
            group = self._param_group.get(p)
            if group is None or "kind" in group:
                continue
            kinds = new.setdefault(id(group), list(group.get("param_kinds") or [None] * len(group["params"])))
            kinds[next(i for i, q in enumerate(group["params"]) if q is p)] = kind.value
            assigned[name] = kind
        for group in self.param_groups:
            if id(group) in new:
                group["param_kinds"] = tuple(new[id(group)])
        self._warn_guessed_names([n for n in guessed_parameters(module) if n in assigned])
        return assigned

    @classmethod
    def from_module(cls: type[_T], module: nn.Module,
                    overrides: Mapping[ParamKind | str, Mapping[str, Any]] | None = None, **kwargs: Any) -> _T:
        """Tiger over the trainable parameters of ``module``, each kind classified by module type.

        The torch idiom ``Tiger(model.parameters())`` can only guess kinds from ``ndim``; this builds the groups
        with :func:`~lightning_tiger.optim.tiger_param_groups` instead.

        Args:
            module: the model.
            overrides: per-kind group options, e.g. ``{"embedding": {"lr": 5e-4}}`` (see ``tiger_param_groups``).
            **kwargs: the constructor's arguments (``lr``, ``beta``, ``weight_decay``, ...).

        Returns:
            The optimizer.

        Raises:
            TypeError: ``module`` is not an ``nn.Module``, or as the constructor.
            ValueError: as the constructor and ``tiger_param_groups``.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        groups = tiger_param_groups(module, weight_decay=kwargs.get("weight_decay", 0.01), overrides=overrides)
        opt = cls(groups, **kwargs)  # type: ignore[call-arg]
        trainable = {name for name, p in module.named_parameters() if p.requires_grad}
        opt._warn_guessed_names([n for n in guessed_parameters(module) if n in trainable])
        return opt

    def param_settings(self, param: Tensor) -> TigerParamSettings:
        """The settings Tiger applies to ``param`` now (its kind's rate mode, lr, decay, shrink centre, floor).

        Raises:
            ValueError: ``param`` is not in this optimizer.
        """
        group = self._param_group.get(param)
        if group is None:
            raise ValueError("param is not one of this optimizer's parameters")
        return self._settings(param, group, group["lr"])

    @torch.no_grad()
    def effective_lr(self, param: Tensor) -> Tensor:
        """The effective step size η of ``param`` at its current value and its group's current ``lr``.

        η = lr·max(RMS(θ), floor) for matrices, per row for embeddings, the constant (halved) lr for bias and
        norm kinds; computed in float32 on the parameter's device, without host synchronisation.

        Returns:
            float32 tensor: 0-dim, or ``[shape[0]]`` (one η per row) for an embedding table.

        Raises:
            ValueError: ``param`` is not in this optimizer.
        """
        s = self.param_settings(param)
        eta = effective_lr(upcast(param.detach()), s.lr_mode, s.lr, s.rms_floor)
        if not isinstance(eta, Tensor):
            return torch.tensor(eta, dtype=torch.float32, device=param.device)
        return eta.float().reshape(-1) if eta.ndim > 0 else eta.float()

    def _kind(self, p: Tensor, group: dict[str, Any]) -> ParamKind:
        kind = self._assigned_kind(p, group)
        return ParamKind(kind) if kind is not None else ParamKind.from_ndim(p.ndim)

    @staticmethod
    def _assigned_kind(p: Tensor, group: dict[str, Any]) -> str | None:
        """The group's ``"kind"``, else p's entry of the group's ``"param_kinds"``, else None (a guess by ndim)."""
        if "kind" in group:
            return group["kind"]
        kinds = group.get("param_kinds")
        return kinds[next(i for i, q in enumerate(group["params"]) if q is p)] if kinds else None

    def _settings(self, p: Tensor, group: dict[str, Any], lr: float,
                  state: dict[str, Any] | None = None) -> TigerParamSettings:
        """The settings of one parameter from its kind (the table of :class:`~lightning_tiger.optim.ParamKind`).

        ``state`` is accepted for the callers' convenience and not used (kinds no longer live in the state).
        """
        # The kind-dependent part is memoised per parameter (this runs for every tensor on every step; keyed by
        # id: Tensor.__hash__ is a Python function); the key holds everything it depends on, so assign_kinds,
        # load_state_dict or editing a group's "kind" / "rms_floor" / the parameter's shape recompute it.
        # (param_kinds is a tuple: compared by identity first, so an unchanged one costs nothing)
        key = (group.get("kind"), group.get("param_kinds"), group["rms_floor"], p.shape)
        cached = self._static.get(id(p))
        if cached is None or cached[0] != key:
            kind = self._kind(p, group)
            if self._assigned_kind(p, group) is None:
                self._warn_guessed(p, kind)
            floor = group["rms_floor"]
            if floor is None:
                floor = auto_rms_floor(p.shape)
            if kind in _HALF_LR_KINDS:
                static = (LR_CONSTANT, True, shrink_center(kind), floor)
            else:
                static = (LR_ROW_RMS if kind is ParamKind.EMBEDDING and p.ndim >= 2 else LR_RMS, False, 0.0, floor)
            cached = self._static[id(p)] = (key, static)
        mode, half, center, floor = cached[1]
        if half:
            return TigerParamSettings(mode, 0.5 * lr, 0.0, center, floor)
        return TigerParamSettings(mode, lr, group["weight_decay"], center, floor)

    def _warn_guessed(self, p: Tensor, kind: ParamKind) -> None:
        self._warn_kinds(
            f"a parameter of shape {tuple(p.shape)} has no kind (its group has no 'kind' key and assign_kinds() "
            f"did not classify it), so it was guessed from ndim as '{kind.value}'",
            "Build the optimizer with Tiger.from_module(model, ...) or tiger_param_groups(model), or call "
            "assign_kinds(model)")

    def _warn_guessed_names(self, names: list[str]) -> None:
        if names:
            shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            self._warn_kinds(
                f"{len(names)} parameter(s) belong to module types of unknown role ({shown}), so their kinds were "
                "guessed from ndim", "Give them kinds with param groups of your own carrying a 'kind' key, e.g. "
                "{'params': [norm.scale], 'kind': 'norm_scale'} for a custom norm's scale")

    def _warn_kinds(self, what: str, fix: str) -> None:
        # Once per optimizer; not while torch.compile traces the step (the guess is the same either way).
        if self._warned_guess or torch.compiler.is_compiling():
            return
        self._warned_guess = True
        warnings.warn(
            f"Tiger: {what}: ndim >= 2 -> 'matrix' (an embedding table then gets one RMS for the whole table), "
            f"else 'bias' (a norm scale then shrinks toward 0, not 1, on a non-finite gradient). {fix}. Warned once "
            "per optimizer.", KindGuessWarning, stacklevel=user_stacklevel("torch", "lightning"))
