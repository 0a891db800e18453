"""Try another optimizer on an existing LightningModule with one callback: ``UseOptimizer(Tiger, lr=1e-3)``.

The callback wraps the module's ``configure_optimizers`` from ``setup`` to ``teardown`` and replaces the optimizers
it returns, so Lightning's scheduler handling, strategy wrapping and checkpoint restore apply to the new one (why
there: ``docs`` page "How UseOptimizer swaps").

Parameter groups: for Tiger (``param_groups="auto"``) the groups come from
:func:`lightning_tiger.optim.tiger_param_groups` on the LightningModule (kinds by module type, as in Su's official
Tiger code, bojone/tiger), restricted to the parameters the user's optimizer trained and split along the user's
groups, so that every new group descends from exactly one old group. For other optimizers (``"plain"``) the user's
groups are kept (their params, and a per-group ``weight_decay`` that differs from the old optimizer's default, e.g.
"no decay on norms"); all other hyper-parameters (``lr`` first of all: an AdamW lr is not a Tiger or Lion lr) come
from the callback's arguments or the new class's defaults.

Schedulers: each user scheduler keeps its object and state; it is pointed at the new optimizer
(``scheduler.optimizer``), its ``base_lrs`` become the new groups' ``lr`` and the current lr of each new group is
``new_lr × (old current lr / old initial lr)`` of its old group, so a warm-up/cosine shape continues on the new
peak. Per-group lists (``lr_lambdas``, ``min_lrs``, ``max_lrs``, ...) are remapped to the new groups (values
ending in ``lr`` rescaled by new/old initial lr), scheduler-owned group keys (OneCycleLR's ``max_lr``/
``min_lr``) likewise; ``SequentialLR``/``ChainedScheduler`` are rebound recursively. Absolute scalars (e.g.
``CosineAnnealingLR(eta_min=...)``) are kept as they are. In short, the ``lr`` passed here replaces the
schedule's *base* lr (``initial_lr``): the peak of a warm-up/cosine ``LambdaLR``, but ``max_lr / div_factor``
of a ``OneCycleLR`` (whose peak therefore becomes ``div_factor × lr``). ``OneCycleLR(cycle_momentum=True)`` and
``CyclicLR(cycle_momentum=True)`` cycle AdamW/SGD momentum keys that Tiger does not have: turn that off.

Recorded: the optimizer class and arguments are the callback's ``state_dict`` (so they are in every
checkpoint, and a resume with a different optimizer warns) and are sent to ``logger.log_hyperparams`` under
``use_optimizer/...``; from LightningCLI the callback's init args also land in the saved ``config.yaml``::

    trainer:
      callbacks:
        - class_path: lightning_tiger.callbacks.UseOptimizer
          init_args:
            optimizer_class: lightning_tiger.optim.Tiger
            optimizer_kwargs: {lr: 1.0e-3, beta: 0.965}
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from functools import wraps
from typing import Any, Literal
from weakref import ref

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_tiger.callbacks.nonfinite_guard import refuse_clipping_with_folding
from lightning_tiger.optim.param_groups import tiger_param_groups
from lightning_tiger.optim.tiger import Tiger

_PER_GROUP_KEYS_KEEP = ("weight_decay",)


def _resolve_class(spec: str | type) -> type[torch.optim.Optimizer]:
    if isinstance(spec, str):
        if "." in spec:
            module_name, _, attr = spec.rpartition(".")
            try:
                obj = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError) as err:
                raise ValueError(f"optimizer_class {spec!r} cannot be imported: {err}") from err
        else:
            obj = None
            for module_name in ("lightning_tiger.optim", "torch.optim"):
                obj = getattr(importlib.import_module(module_name), spec, None)
                if obj is not None:
                    break
            if obj is None:
                raise ValueError(
                    f"optimizer_class {spec!r} is neither an import path nor a name in lightning_tiger.optim or "
                    "torch.optim"
                )
    else:
        obj = spec
    if not (inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer)):
        raise TypeError(f"optimizer_class must be a torch.optim.Optimizer subclass or its import path, got {spec!r}")
    return obj


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _patch_track_step_called(opt: torch.optim.Optimizer) -> None:
    """Mirror of the wrapper ``LRScheduler.__init__`` puts on ``optimizer.step`` (its "step() before
    optimizer.step()" warning needs it on the new optimizer as well)."""
    if hasattr(opt.step, "_wrapped_by_lr_sched"):
        return
    opt_ref = ref(opt)
    func = opt.step.__func__  # type: ignore[attr-defined]

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        o = opt_ref()
        o._opt_called = True  # type: ignore[union-attr]
        return func.__get__(o, o.__class__)(*args, **kwargs)

    wrapper._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    opt.step = wrapper  # type: ignore[method-assign]


class UseOptimizer(Callback):
    """Replace whatever optimizer the LightningModule configures with ``optimizer_class(**kwargs)``.

    Example::

        trainer = L.Trainer(callbacks=[UseOptimizer(Tiger, lr=1e-3, weight_decay=0.01)])
        trainer.fit(existing_module)   # its configure_optimizers returned AdamW + a cosine schedule

    Args:
        optimizer_class: the optimizer class or its import path (``"lightning_tiger.optim.Tiger"``; a bare
            name is looked up in ``lightning_tiger.optim`` then ``torch.optim``).
        optimizer_kwargs: constructor arguments (the YAML-friendly form; merged with ``**kwargs``, which win).
        param_groups: ``"auto"`` (Tiger: ``tiger_param_groups``; others: ``"plain"``), ``"tiger"`` (Tiger's
            kinds for any optimizer: bias/norm groups without weight decay) or ``"plain"`` (the user's groups).
        **kwargs: more constructor arguments, e.g. ``lr=1e-3``.
    """

    def __init__(
        self,
        optimizer_class: str | type[torch.optim.Optimizer],
        optimizer_kwargs: dict[str, Any] | None = None,
        param_groups: Literal["auto", "tiger", "plain"] = "auto",
        **kwargs: Any,
    ) -> None:
        self.optimizer_class = _resolve_class(optimizer_class)
        if optimizer_kwargs is not None and not isinstance(optimizer_kwargs, dict):
            raise TypeError(f"optimizer_kwargs must be a dict or None, got {type(optimizer_kwargs).__name__}")
        self.optimizer_kwargs: dict[str, Any] = {**(optimizer_kwargs or {}), **kwargs}
        if param_groups not in ("auto", "tiger", "plain"):
            raise ValueError(f"param_groups must be 'auto', 'tiger' or 'plain', got {param_groups!r}")
        self.param_groups = param_groups
        sig = inspect.signature(self.optimizer_class)
        accepts_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
        unknown = [k for k in self.optimizer_kwargs if k not in sig.parameters and k != "params"]
        if unknown and not accepts_var_kw:
            raise TypeError(
                f"{self.optimizer_class.__name__} does not accept {unknown}; its arguments are "
                f"{[k for k in sig.parameters if k != 'params']}"
            )
        if "params" in self.optimizer_kwargs:
            raise ValueError("optimizer_kwargs may not contain 'params': the groups are built from the module")
        self._signature = sig
        self._module: pl.LightningModule | None = None
        self._had_instance_attr = False
        self._orig: Any = None
        self.replaced: list[tuple[torch.optim.Optimizer, torch.optim.Optimizer]] = []
        """(old, new) pairs of the last ``configure_optimizers`` call."""

    # ------------------------------------------------------------------ records
    @property
    def uses_tiger_groups(self) -> bool:
        if self.param_groups == "auto":
            return issubclass(self.optimizer_class, Tiger)
        return self.param_groups == "tiger"

    def _record(self) -> dict[str, Any]:
        return {
            "optimizer_class": _class_path(self.optimizer_class),
            "optimizer_kwargs": dict(self.optimizer_kwargs),
            "param_groups": self.param_groups,
        }

    def state_dict(self) -> dict[str, Any]:
        return self._record()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("optimizer_class")
        if saved is not None and saved != _class_path(self.optimizer_class):
            warnings.warn(
                f"UseOptimizer: the checkpoint was trained with {saved}, this run uses "
                f"{_class_path(self.optimizer_class)}; loading the optimizer state will likely fail",
                UserWarning,
                stacklevel=2,
            )

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self._module is not None:
            return
        self._had_instance_attr = "configure_optimizers" in vars(pl_module)
        orig = pl_module.configure_optimizers
        self._orig = orig

        def configure_optimizers() -> Any:
            return self.replace(orig(), pl_module)

        pl_module.configure_optimizers = configure_optimizers  # type: ignore[method-assign]
        self._module = pl_module

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        refuse_clipping_with_folding(trainer)
        record = self._record()
        flat: dict[str, Any] = {"use_optimizer/class": record["optimizer_class"],
                                "use_optimizer/param_groups": record["param_groups"]}
        for k, v in record["optimizer_kwargs"].items():
            flat[f"use_optimizer/{k}"] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
        for logger in trainer.loggers:
            logger.log_hyperparams(flat)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        module = self._module
        if module is None:
            return
        if self._had_instance_attr:
            module.configure_optimizers = self._orig  # type: ignore[method-assign]
        else:
            vars(module).pop("configure_optimizers", None)
        self._module = None
        self._orig = None

    # ------------------------------------------------------------------ the swap
    def replace(self, conf: Any, module: torch.nn.Module) -> Any:
        """Return ``conf`` (any ``configure_optimizers`` result) with our optimizers and rebound schedulers."""
        olds: list[torch.optim.Optimizer] = []
        self._collect(conf, olds)
        if not olds:
            raise ValueError(
                "UseOptimizer: configure_optimizers returned no optimizer to replace; got "
                f"{type(conf).__name__}"
            )
        mapping: dict[int, torch.optim.Optimizer] = {}
        group_maps: dict[int, list[int]] = {}
        self.replaced = []
        for old in olds:
            if id(old) in mapping:
                continue
            new, group_map = self.build(old, module)
            mapping[id(old)] = new
            group_maps[id(old)] = group_map
            self.replaced.append((old, new))
        return self._rebuild(conf, mapping, group_maps)

    def _collect(self, obj: Any, out: list[torch.optim.Optimizer]) -> None:
        if isinstance(obj, torch.optim.Optimizer):
            out.append(obj)
        elif isinstance(obj, dict):
            for v in obj.values():
                self._collect(v, out)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                self._collect(v, out)

    def _rebuild(self, obj: Any, mapping: dict[int, torch.optim.Optimizer], group_maps: dict[int, list[int]]) -> Any:
        if isinstance(obj, torch.optim.Optimizer):
            return mapping[id(obj)]
        is_scheduler = isinstance(obj, torch.optim.lr_scheduler.LRScheduler) or (
            hasattr(obj, "optimizer") and callable(getattr(obj, "step", None))
        )
        if is_scheduler:
            self._rebind(obj, mapping, group_maps)
            return obj
        if isinstance(obj, dict):
            return {k: self._rebuild(v, mapping, group_maps) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._rebuild(v, mapping, group_maps) for v in obj)
        return obj

    def build(self, old: torch.optim.Optimizer, module: torch.nn.Module) -> tuple[torch.optim.Optimizer, list[int]]:
        """Our optimizer for the parameters of ``old``; also returns, per new group, its old group's index."""
        old_index = {id(p): i for i, g in enumerate(old.param_groups) for p in g["params"]}
        kwargs = dict(self.optimizer_kwargs)
        groups: list[dict[str, Any]] = []
        group_map: list[int] = []
        if self.uses_tiger_groups:
            wd_param = self._signature.parameters.get("weight_decay")
            wd = kwargs.get("weight_decay", wd_param.default if wd_param is not None else 0.01)
            covered: set[int] = set()
            for tg in tiger_param_groups(module, weight_decay=float(wd)):
                by_old: dict[int, list[torch.Tensor]] = {}
                for p in tg["params"]:
                    if id(p) in old_index:
                        by_old.setdefault(old_index[id(p)], []).append(p)
                        covered.add(id(p))
                for i, params in sorted(by_old.items()):
                    groups.append({**{k: v for k, v in tg.items() if k != "params"}, "params": params})
                    group_map.append(i)
            # Parameters the old optimizer trained that are not the module's own: one group per old group.
            for i, g in enumerate(old.param_groups):
                rest = [p for p in g["params"] if id(p) not in covered]
                if rest:
                    groups.append({"params": rest})
                    group_map.append(i)
        else:
            old_wd = old.defaults.get("weight_decay")
            for i, g in enumerate(old.param_groups):
                group: dict[str, Any] = {"params": list(g["params"])}
                for key in _PER_GROUP_KEYS_KEEP:
                    if key in g and key in old.defaults and g[key] != old_wd:
                        group[key] = g[key]
                groups.append(group)
                group_map.append(i)
        new = self.optimizer_class(groups, **kwargs)
        return new, group_map

    def _rebind(
        self, sched: Any, mapping: dict[int, torch.optim.Optimizer], group_maps: dict[int, list[int]]
    ) -> None:
        for sub in getattr(sched, "_schedulers", None) or []:
            self._rebind(sub, mapping, group_maps)
        old = sched.optimizer
        if id(old) not in mapping:
            if any(old is new for new in mapping.values()):
                return  # already rebound (a scheduler listed twice, or inside a SequentialLR)
            raise ValueError(
                f"UseOptimizer: scheduler {type(sched).__name__} is attached to an optimizer that "
                "configure_optimizers did not return"
            )
        new = mapping[id(old)]
        gmap = group_maps[id(old)]
        n_old = len(old.param_groups)
        old_initial = [g.get("initial_lr", g["lr"]) for g in old.param_groups]
        scale = [
            (ng.get("initial_lr", ng["lr"]) / old_initial[i]) if old_initial[i] else 1.0
            for ng, i in zip(new.param_groups, gmap)
        ]
        for ng, i, sc in zip(new.param_groups, gmap, scale):
            og = old.param_groups[i]
            if "initial_lr" not in ng:
                ng["initial_lr"] = ng["lr"]
                # Scheduler-owned keys of the old group (OneCycleLR's max_lr/min_lr, ...).
                for key, value in og.items():
                    if key in ("params", "initial_lr", "lr") or key in old.defaults or key in ng:
                        continue
                    ng[key] = value * sc if key.endswith("lr") and isinstance(value, (int, float)) else value
                ratio = (og["lr"] / old_initial[i]) if old_initial[i] else 1.0
                ng["lr"] = ng["initial_lr"] * ratio
        for name, value in list(vars(sched).items()):
            if name in ("base_lrs", "_last_lr", "_schedulers", "_milestones") or not isinstance(value, list):
                continue
            if len(value) != n_old or any(hasattr(v, "optimizer") for v in value):
                continue  # per-group lists only (lr_lambdas, min_lrs, max_lrs, base_momentums, ...)
            if name.endswith("lrs") and all(isinstance(v, (int, float)) for v in value):
                setattr(sched, name, [value[i] * sc for i, sc in zip(gmap, scale)])
            else:
                setattr(sched, name, [value[i] for i in gmap])
        sched.optimizer = new
        if hasattr(sched, "base_lrs"):
            sched.base_lrs = [g["initial_lr"] for g in new.param_groups]
        if hasattr(sched, "_last_lr"):
            sched._last_lr = [g["lr"] for g in new.param_groups]
        _patch_track_step_called(new)
