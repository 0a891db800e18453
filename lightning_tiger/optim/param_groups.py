"""Parameter kinds for Tiger (Su 2023, kexue.fm/archives/9512) and the parameter groups built from them.

Tiger treats each parameter by its role: weight matrices and conv kernels move by ``lr·RMS(θ)``, embedding
tables by ``lr·RMS(row)``, biases and normalisation parameters by ``0.5·lr`` without weight decay, and the
non-finite rule shrinks norm scales toward 1 (everything else toward 0). The official TF code decides by Keras
variable name; here the decision is made by module type (never by name), with ``ndim`` as the fallback.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import Enum
from typing import Any

import torch
from torch import nn

__all__ = ["ParamKind", "classify_parameters", "guessed_parameters", "tiger_param_groups"]


class ParamKind(str, Enum):
    """The role of a parameter, which sets Tiger's learning rate, decay and shrink centre.

    From the official code (bojone/tiger ``tiger.py``: half rate and no decay for biases and norms, shrink
    centre 1 for norm scales) and the post (kexue.fm/archives/9512):

    ============  ==========================  =========  ============
    kind          η                           decay λ    shrink centre
    ============  ==========================  =========  ============
    matrix        lr·max(RMS(θ), floor)       λ          0
    embedding     lr·max(RMS(row), floor)     λ          0
    bias          0.5·lr                      0          0
    norm_scale    0.5·lr                      0          1
    norm_shift    0.5·lr                      0          0
    ============  ==========================  =========  ============
    """

    MATRIX = "matrix"
    EMBEDDING = "embedding"
    BIAS = "bias"
    NORM_SCALE = "norm_scale"
    NORM_SHIFT = "norm_shift"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: ParamKind | str, name: str = "kind") -> ParamKind:
        """``ParamKind`` from a member or its string value; ``ValueError`` naming ``name`` otherwise."""
        if isinstance(value, ParamKind):
            return value
        if isinstance(value, str):
            try:
                return cls(value.lower())
            except ValueError:
                pass
        raise ValueError(f"{name} must be one of {[k.value for k in cls]}, got {value!r}")

    @classmethod
    def from_ndim(cls, ndim: int) -> ParamKind:
        """The fallback for parameters of unknown modules: ``ndim >= 2`` -> matrix, else bias."""
        return cls.MATRIX if ndim >= 2 else cls.BIAS


_MATRIX_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.modules.conv._ConvNd,  # Conv1d/2d/3d, ConvTranspose1d/2d/3d and their Lazy variants
)
_EMBEDDING_MODULES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)
_NORM_MODULES: tuple[type[nn.Module], ...] = tuple(
    m
    for m in (
        nn.LayerNorm,
        getattr(nn, "RMSNorm", None),  # torch >= 2.4
        nn.GroupNorm,
        nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm1d/2d/3d
        nn.LocalResponseNorm,
    )
    if m is not None
)


def _classify(module: nn.Module, param_name: str, param: torch.Tensor) -> tuple[ParamKind, bool]:
    """(kind, guessed): ``guessed`` when the kind came from the ``ndim`` fallback."""
    if isinstance(module, _NORM_MODULES):
        if param_name == "weight":
            return ParamKind.NORM_SCALE, False
        if param_name == "bias":
            return ParamKind.NORM_SHIFT, False
    elif isinstance(module, _EMBEDDING_MODULES):
        if param_name == "weight":
            return ParamKind.EMBEDDING, False
    elif isinstance(module, _MATRIX_MODULES):
        if param_name == "weight":
            return ParamKind.MATRIX, False
        if param_name == "bias":
            return ParamKind.BIAS, False
    # Unknown module, or an extra parameter of a known one: decide by shape.
    return ParamKind.from_ndim(param.ndim), True


def classify_parameters(module: nn.Module) -> dict[str, ParamKind]:
    """Classify every parameter of ``module`` by the type of the module that owns it.

    Rules: ``Linear``/``Bilinear``/``Conv*``/``ConvTranspose*`` weights -> ``matrix``; ``Embedding``/
    ``EmbeddingBag`` weights -> ``embedding`` (per-row RMS); biases of those -> ``bias``; ``LayerNorm``,
    ``RMSNorm``, ``GroupNorm``, ``BatchNorm*``, ``SyncBatchNorm``, ``InstanceNorm*`` weights -> ``norm_scale``
    (shrink centre 1) and their biases -> ``norm_shift``; parameters of any other module by ``ndim``: >= 2 ->
    ``matrix``, else ``bias``. Custom normalisation layers therefore land in ``bias`` (centre 0): give them
    ``norm_scale`` through ``tiger_param_groups(..., overrides=...)`` or your own groups if their scale is
    centred at 1. A tied/shared parameter is classified once, by its first owner in ``named_modules()`` order
    (e.g. an input embedding tied to the output ``Linear`` is an ``embedding`` when the embedding comes first).

    Args:
        module: any ``nn.Module``.

    Returns:
        ``{qualified parameter name: ParamKind}`` in ``named_parameters()`` order, one entry per distinct
        parameter (including those with ``requires_grad=False``).

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.
    """
    return {name: kind for name, (kind, _) in _classified(module).items()}


def guessed_parameters(module: nn.Module) -> list[str]:
    """The parameters that :func:`classify_parameters` classifies by the ``ndim`` fallback (owned by a module type
    it does not know, e.g. a hand-written RMSNorm, or extra parameters of a known one).

    Args:
        module: any ``nn.Module``.

    Returns:
        Their qualified names, in ``named_parameters()`` order.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.
    """
    return [name for name, (_, guessed) in _classified(module).items() if guessed]


def _classified(module: nn.Module) -> dict[str, tuple[ParamKind, bool]]:
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    seen: set[int] = set()
    kinds: dict[str, tuple[ParamKind, bool]] = {}
    for mod_name, mod in module.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            kinds[f"{mod_name}.{p_name}" if mod_name else p_name] = _classify(mod, p_name, p)
    # Re-order like named_parameters() so that groups list parameters in the model's usual order.
    order = {name: i for i, (name, _) in enumerate(module.named_parameters())}
    return dict(sorted(kinds.items(), key=lambda kv: order.get(kv[0], len(order))))


_DEFAULT_NO_DECAY = (ParamKind.BIAS, ParamKind.NORM_SCALE, ParamKind.NORM_SHIFT)


def tiger_param_groups(
    model: nn.Module,
    weight_decay: float = 0.01,
    overrides: Mapping[ParamKind | str, Mapping[str, Any]] | None = None,
    no_decay: Iterable[ParamKind | str] = _DEFAULT_NO_DECAY,
) -> list[dict[str, Any]]:
    """Parameter groups for Tiger, one per :class:`ParamKind` (empty kinds dropped), each with a ``"kind"`` key.

    Tiger reads ``"kind"`` to pick the learning-rate mode, decay and shrink centre (see :class:`ParamKind`).
    The groups also suit Lion, AdamW or any ``torch.optim`` optimizer, which store the extra ``"kind"`` key and
    ignore it: the usual "no decay on biases and norms" convention then comes from each group's ``weight_decay``.

    Example::

        groups = tiger_param_groups(model, weight_decay=0.01, overrides={"embedding": {"lr": 5e-4}})
        opt = Tiger(groups, lr=1e-3)

    Args:
        model: the module whose trainable parameters (``requires_grad=True``) are grouped.
        weight_decay: decay of the kinds not in ``no_decay``. Default 0.01. Tiger applies no decay
            to bias/norm kinds whatever the group says (official code); the 0 here is for other optimizers.
        overrides: per-kind extra options merged into the group last, e.g. ``{"matrix": {"lr": 2e-3}}``
            (keys: ``ParamKind`` or its string value; YAML strings work).
        no_decay: kinds whose group gets ``weight_decay=0``. Default: bias, norm_scale, norm_shift.

    Returns:
        ``[{"params": [...], "kind": "matrix", "weight_decay": 0.01, ...}, ...]`` in ``ParamKind`` order.
    """
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
        raise ValueError(f"weight_decay must be a float >= 0, got {weight_decay!r}")
    no_decay_set = {ParamKind.parse(k, "no_decay entries") for k in no_decay}
    if overrides is not None and not isinstance(overrides, Mapping):
        raise TypeError(f"overrides must be a mapping {{kind: {{option: value}}}} or None, got {overrides!r}")
    parsed_overrides: dict[ParamKind, dict[str, Any]] = {}
    for key, opts in (overrides or {}).items():
        kind = ParamKind.parse(key, "overrides keys")
        if not isinstance(opts, Mapping):
            raise TypeError(f"overrides[{key!r}] must be a mapping of group options, got {type(opts).__name__}")
        if "params" in opts or "kind" in opts:
            raise ValueError(f"overrides[{key!r}] may not set 'params' or 'kind'")
        parsed_overrides[kind] = dict(opts)
    named = dict(model.named_parameters())
    buckets: dict[ParamKind, list[torch.Tensor]] = {k: [] for k in ParamKind}
    for name, kind in classify_parameters(model).items():
        p = named[name]
        if p.requires_grad:
            buckets[kind].append(p)
    groups: list[dict[str, Any]] = []
    for kind, params in buckets.items():
        if not params:
            continue
        group: dict[str, Any] = {
            "params": params,
            "kind": kind.value,
            "weight_decay": 0.0 if kind in no_decay_set else float(weight_decay),
        }
        group.update(parsed_overrides.get(kind, {}))
        groups.append(group)
    return groups
