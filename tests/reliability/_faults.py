"""Fault injection machinery shared by the reliability tests.

:func:`faulty` subclasses any LightningModule so that its ``training_step`` injects a fault on chosen calls:

- ``"loss-nan"`` / ``"loss-inf"``: the returned loss is multiplied by NaN / inf (gradients become non-finite);
- ``"grad-nan"`` / ``"grad-inf"``: the gradient of one parameter is replaced by NaN / +inf (tensor hook);
- ``"input-nan"`` / ``"input-inf"``: one element of the (float) input batch is NaN / inf.

:func:`manual_reference` is the straightforward reference: a plain PyTorch loop over the same batches that runs
``training_step`` at every step (so random draws stay aligned) but, on the steps a guard must veto, does not
step the optimizer nor the scheduler: "the run that never saw the bad batch".
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader

PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed")
FAULTS = ("loss-nan", "loss-inf", "grad-nan", "grad-inf", "input-nan", "input-inf")
INIT_SCALE = 2.0**10  # small enough that fp16 never overflows on these tiny problems: scaler skips = our faults


class FaultMixin:
    """Injects ``fault_kind`` into ``training_step`` calls whose index is in ``fault_steps``."""

    fault_kind: str = "loss-nan"
    fault_steps: frozenset[int] = frozenset()

    def set_fault(self, kind: str, steps: Sequence[int]) -> FaultMixin:
        if kind not in FAULTS:
            raise ValueError(f"kind must be one of {FAULTS}, got {kind!r}")
        self.fault_kind, self.fault_steps = kind, frozenset(steps)
        self._calls, self._handles = 0, []
        return self

    def fault_param(self) -> torch.nn.Parameter:
        return next(p for p in self.parameters() if p.requires_grad and p.ndim >= 2)  # type: ignore[attr-defined]

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        i = getattr(self, "_calls", 0)
        self._calls = i + 1
        for h in getattr(self, "_handles", []):
            h.remove()
        self._handles = []
        bad = i in self.fault_steps
        value = float("nan") if self.fault_kind.endswith("nan") else float("inf")
        if bad and self.fault_kind.startswith("input"):
            batch = _poison(batch, value)
        if bad and self.fault_kind.startswith("grad"):
            self._handles.append(self.fault_param().register_hook(lambda g: torch.full_like(g, value)))
        out = super().training_step(batch, batch_idx)  # type: ignore[misc]
        if bad and self.fault_kind.startswith("loss"):
            if isinstance(out, dict):
                out = {**out, "loss": out["loss"] * value}
            else:
                out = out * value
        return out


def _poison(batch: Any, value: float) -> Any:
    if isinstance(batch, torch.Tensor):
        if not batch.is_floating_point():
            raise ValueError("input faults need a float batch")
        batch = batch.clone()
        batch.view(-1)[0] = value
        return batch
    if isinstance(batch, (list, tuple)):
        return type(batch)([_poison(batch[0], value), *batch[1:]])
    raise TypeError(f"cannot poison a batch of type {type(batch).__name__}")


_CLASSES: dict[type, type] = {}


def faulty(cls: type[L.LightningModule]) -> type[L.LightningModule]:
    """``cls`` with :class:`FaultMixin` in front (cached, so pickling by reference works)."""
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Faulty{cls.__name__}", (FaultMixin, cls), {"__module__": __name__})
        globals()[_CLASSES[cls].__name__] = _CLASSES[cls]
    return _CLASSES[cls]


def loader(batches: Sequence[Any]) -> DataLoader:
    return DataLoader(list(batches), batch_size=None, shuffle=False)


def trainer_kwargs(precision: str, tmp_path: Any, **kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = dict(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=tmp_path, num_sanity_val_steps=0, limit_val_batches=0,
    )
    if precision == "16-mixed":
        out["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=INIT_SCALE))]
    else:
        out["precision"] = precision
    out.update(kw)
    return out


def _optim_and_sched(cfg: Any) -> tuple[torch.optim.Optimizer, Any]:
    if isinstance(cfg, torch.optim.Optimizer):
        return cfg, None
    if isinstance(cfg, dict):
        sched = cfg.get("lr_scheduler")
        if isinstance(sched, dict):
            assert sched.get("interval", "epoch") == "step", "reference loop only models interval='step'"
            sched = sched["scheduler"]
        return cfg["optimizer"], sched
    if isinstance(cfg, (list, tuple)) and len(cfg) == 2:
        (opt,), (sched,) = cfg
        return opt, sched["scheduler"] if isinstance(sched, dict) else sched
    raise TypeError(f"unsupported configure_optimizers output {cfg!r}")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _to(batch: Any, dtype: torch.dtype) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(b, dtype) for b in batch)
    return batch


def manual_reference(
    build: Callable[[], L.LightningModule], batches: Sequence[Any], precision: str, skip: Sequence[int], seed: int = 0
) -> tuple[L.LightningModule, torch.optim.Optimizer, Any, int]:
    """Plain-PyTorch twin of ``Trainer(precision=...).fit`` where the steps in ``skip`` never happen.

    Returns (module, optimizer, scheduler, number of skipped steps). Under ``16-mixed`` the bad steps still go
    through ``GradScaler`` (which skips them itself and halves its scale, as it would in any run).
    """
    torch.manual_seed(seed)
    module = build()
    if precision == "bf16-true":
        module = module.to(torch.bfloat16)
    opt, sched = _optim_and_sched(module.configure_optimizers())
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE) if precision == "16-mixed" else None
    skipped = 0
    module.train()
    for i, batch in enumerate(loader(batches)):
        opt.zero_grad(set_to_none=True)
        if precision in ("bf16-mixed", "16-mixed"):
            ctx: Any = torch.autocast("cpu", dtype=torch.bfloat16 if precision == "bf16-mixed" else torch.float16)
        elif precision == "bf16-true":
            batch = _to(batch, torch.bfloat16)
            ctx = _default_dtype(torch.bfloat16)
        else:
            ctx = contextlib.nullcontext()
        with ctx:
            out = module.training_step(batch, i)
        loss = out["loss"] if isinstance(out, dict) else out
        if scaler is not None:
            before = scaler.get_scale()
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
            if scaler.get_scale() < before:
                skipped += 1
                continue
        elif i in skip:
            skipped += 1
            continue
        else:
            loss.backward()
            opt.step()
        if sched is not None:
            sched.step()
    return module, opt, sched, skipped


def assert_same_training_state(
    a: L.LightningModule, b: L.LightningModule, opt_a: torch.optim.Optimizer, opt_b: torch.optim.Optimizer
) -> None:
    """Parameters and optimizer state bit-for-bit equal, and finite."""
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.isfinite(p).all(), f"{name} is not finite"
        assert torch.equal(p, q), f"{name} differs from the reference (max |Δ| {(p.float() - q.float()).abs().max()})"
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        for key, va in sa["state"][k].items():
            vb = sb["state"][k][key]
            if isinstance(va, torch.Tensor):
                assert torch.equal(va, vb), f"optimizer state {k}/{key} differs"
                if va.is_floating_point():
                    assert torch.isfinite(va).all(), f"optimizer state {k}/{key} not finite"
            else:
                assert va == vb, f"optimizer state {k}/{key}: {va} != {vb}"
    for ga, gb in zip(sa["param_groups"], sb["param_groups"]):
        assert {k: v for k, v in ga.items() if k != "params"} == {k: v for k, v in gb.items() if k != "params"}
