"""Tiger and Lion inside the Lightning Trainer: accumulation, schedules, fold-in-backward, checkpoints, EMA.

Which step counts the schedule uses (documented here and in the report):

- ``Trainer(accumulate_grad_batches=k)`` with ``Tiger(grad_accum_steps=1)``: Lightning calls ``optimizer.step``
  and steps an ``interval="step"`` scheduler once per window, so the schedule counts *windows* (= optimizer
  steps = ``global_step``).
- ``Trainer(accumulate_grad_batches=1)`` with ``Tiger(grad_accum_steps=k)`` (the official code's style): one
  ``step()`` per micro-batch, so the scheduler and ``global_step`` count *micro-steps*, like the official code;
  the parameters move at micro-steps t = (w+1)·k − 1.
- Conversion: an official schedule ``S(t)`` in micro-steps equals, per window w, ``S((w + 1)·k − 1)``; e.g.
  ``LambdaLR(opt, lambda w: piecewise_linear((w + 1) * k - 1, points))``. ``PiecewiseLinearLR`` with every key
  divided by k is the same schedule up to that (k − 1)-micro-step shift.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tiger.callbacks.nonfinite_guard import NonFiniteGuard
from lightning_tiger.callbacks.optimizer_monitor import OptimizerMonitor
from lightning_tiger.callbacks.use_optimizer import UseOptimizer
from lightning_tiger.optim import Lion, PiecewiseLinearLR, Tiger, tiger_param_groups
from lightning_tiger.optim.schedulers import piecewise_linear


class Net(L.LightningModule):
    def __init__(self, make_opt: Any = None, schedule: Any = None, poison_batch: int | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.l1 = nn.Linear(8, 16)
        self.ln = nn.LayerNorm(16)
        self.head = nn.Linear(16, 16)
        self.make_opt = make_opt or (lambda m: Tiger(tiger_param_groups(m), lr=5e-3))
        self.schedule = schedule
        self.poison_batch = poison_batch

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (tokens,) = batch
        h = self.ln(self.l1(self.emb(tokens)))
        if batch_idx == self.poison_batch:
            def poison(g: torch.Tensor) -> torch.Tensor:
                g = g.clone()
                g[0, 0, 0] = math.nan
                return g

            h.register_hook(poison)  # non-finite gradients for emb, l1 and ln only
        logits = self.head(torch.tanh(h))
        return nn.functional.cross_entropy(logits.flatten(0, 1), tokens.roll(1, 1).flatten())

    def configure_optimizers(self) -> Any:
        opt = self.make_opt(self)
        if self.schedule is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.schedule(opt), "interval": "step"}}


def data(n_batches: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(7)
    return DataLoader(TensorDataset(torch.randint(0, 16, (n_batches * 4, 6), generator=g)), batch_size=4)


def fit(root: Path, model: Net, callbacks: list[Callback] | None = None, **kw: Any) -> L.Trainer:
    loader = kw.pop("loader", None) or data()
    kw.setdefault("max_epochs", 1)
    kw.setdefault("enable_checkpointing", False)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=root, callbacks=callbacks or [], **kw)
    trainer.fit(model, loader)
    return trainer


def seeded(**kw: Any) -> Net:
    torch.manual_seed(0)
    return Net(**kw)


class RecordLR(Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])


def test_lightning_accumulation_equals_tiger_grad_accum_steps(tmp_path: Path) -> None:
    """accumulate_grad_batches=k + Tiger(k=1) == accumulate_grad_batches=1 + Tiger(grad_accum_steps=k), schedule
    included (windows vs micro-steps, converted as in the module docstring)."""
    k = 4
    points = [(0, 0.0), (6, 1.0), (20, 0.5)]  # official schedule, in micro-steps
    micro = {6: 1.0, 20: 0.5}

    a = seeded(
        make_opt=lambda m: Tiger(tiger_param_groups(m), lr=5e-3),
        schedule=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda w: piecewise_linear((w + 1) * k - 1, points)),
    )
    t_a = fit(tmp_path / "a", a, accumulate_grad_batches=k, loader=data(24))
    b = seeded(
        make_opt=lambda m: Tiger(tiger_param_groups(m), lr=5e-3, grad_accum_steps=k),
        schedule=lambda o: PiecewiseLinearLR(o, micro),
    )
    t_b = fit(tmp_path / "b", b, loader=data(24))
    assert t_a.global_step == 24 // k and t_b.global_step == 24  # windows vs micro-steps
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        # The two accumulate the momentum in a different order (Σg/k vs Σ(g/k)): sign(m) only differs where m
        # is ~0, so the parameters agree to float rounding.
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7, msg=name)
    for ga, gb in zip(t_a.optimizers[0].param_groups, t_b.optimizers[0].param_groups):
        assert ga["lr"] == pytest.approx(gb["lr"])


def test_piecewise_linear_lr_as_step_scheduler(tmp_path: Path) -> None:
    rec = RecordLR()
    model = seeded(schedule=lambda o: PiecewiseLinearLR(o, {2: 1.0, 4: 0.5, 6: 0.1}))
    fit(tmp_path, model, [rec])
    # By hand: 0 -> 1 over [0, 2], 1 -> 0.5 over [2, 4], 0.5 -> 0.1 over [4, 6], then 0.1.
    assert rec.lrs == pytest.approx([5e-3 * x for x in (0.0, 0.5, 1.0, 0.75, 0.5, 0.3, 0.1, 0.1)])


def test_lion_and_tiger_from_configure_optimizers_with_guard(tmp_path: Path) -> None:
    for make in (lambda m: Lion(m.parameters(), lr=1e-3, weight_decay=0.1),
                 lambda m: Tiger(tiger_param_groups(m), lr=5e-3)):
        guard = NonFiniteGuard()
        bad = seeded(make_opt=make, poison_batch=3)
        t_bad = fit(tmp_path / "bad", bad, [guard])
        ref = seeded(make_opt=make)
        idx = [i for i in range(32) if i // 4 != 3]
        t_ref = fit(tmp_path / "ref", ref, loader=DataLoader(torch.utils.data.Subset(data().dataset, idx),
                                                               batch_size=4))
        assert guard.skipped == 1
        for (name, pa), pb in zip(bad.state_dict().items(), ref.state_dict().values()):
            assert torch.equal(pa, pb), name
        sa, sb = t_bad.optimizers[0].state_dict(), t_ref.optimizers[0].state_dict()
        for i in sa["state"]:
            for key, v in sa["state"][i].items():
                if isinstance(v, torch.Tensor):
                    assert torch.equal(v, sb["state"][i][key]), key
        assert [g.get("micro_step") for g in sa["param_groups"]] == [g.get("micro_step") for g in sb["param_groups"]]


# ---------------------------------------------------------------------------------------------------- fold mode
def fold_tiger(m: nn.Module) -> Tiger:
    return Tiger(tiger_param_groups(m), lr=5e-3, fold_in_backward=True)


def std_tiger(m: nn.Module) -> Tiger:
    return Tiger(tiger_param_groups(m), lr=5e-3)


def _schedule(o: torch.optim.Optimizer) -> PiecewiseLinearLR:
    return PiecewiseLinearLR(o, {3: 1.0, 12: 0.2})


@pytest.mark.parametrize("accumulate", [1, 2])
def test_fold_in_backward_matches_standard_mode(tmp_path: Path, accumulate: int) -> None:
    """global_step, the step scheduler and the parameters behave exactly as in the standard mode."""
    rec_f, rec_s = RecordLR(), RecordLR()
    fold = seeded(make_opt=fold_tiger, schedule=_schedule)
    t_f = fit(tmp_path / "f", fold, [rec_f], accumulate_grad_batches=accumulate)
    std = seeded(make_opt=std_tiger, schedule=_schedule)
    t_s = fit(tmp_path / "s", std, [rec_s], accumulate_grad_batches=accumulate)
    assert t_f.global_step == t_s.global_step == 8 // accumulate
    assert rec_f.lrs == rec_s.lrs and len(rec_f.lrs) == 8 // accumulate
    for (name, pa), pb in zip(fold.state_dict().items(), std.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7, msg=name)


def test_fold_in_backward_checkpoint_resume_is_bit_for_bit(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_top_k=-1, filename="{epoch}")
    full = seeded(make_opt=fold_tiger, schedule=_schedule)
    t_full = fit(tmp_path / "full", full, [ckpt], max_epochs=2, enable_checkpointing=True)
    resumed = seeded(make_opt=fold_tiger, schedule=_schedule)
    t_res = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path / "res", max_epochs=2, enable_checkpointing=False)
    t_res.fit(resumed, data(), ckpt_path=tmp_path / "ckpts" / "epoch=0.ckpt")
    assert t_res.global_step == t_full.global_step == 16
    for (name, pa), pb in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(pa, pb), name
    m_full = [s["momentum"] for s in t_full.optimizers[0].state.values()]
    m_res = [s["momentum"] for s in t_res.optimizers[0].state.values()]
    assert all(torch.equal(a, b) for a, b in zip(m_full, m_res))
    assert t_res.lr_scheduler_configs[0].scheduler.last_epoch == 16


def test_fold_in_backward_with_ema_weight_averaging(tmp_path: Path) -> None:
    """EMAWeightAveraging sees the same trajectory as in the standard mode (same average, same raw weights, one
    update per optimizer step), its checkpoints hold raw + average weights, and a run resumed from one continues
    from the raw weights, not the average."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    def run(name: str, make: Any, epochs: int, ckpt_path: Path | None = None) -> Net:
        model = seeded(make_opt=make)
        cbs: list[Callback] = [EMAWeightAveraging(decay=0.8),
                               ModelCheckpoint(dirpath=tmp_path / name, save_top_k=-1, filename="{epoch}")]
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp_path, max_epochs=epochs, callbacks=cbs)
        trainer.fit(model, data(), ckpt_path=ckpt_path)
        return model

    full = run("fold", fold_tiger, 2)
    run("std", std_tiger, 1)
    ck_f, ck_s = (torch.load(tmp_path / n / "epoch=0.ckpt", weights_only=False) for n in ("fold", "std"))
    assert int(ck_f["averaging_state"]["n_averaged"]) == int(ck_s["averaging_state"]["n_averaged"]) == 8
    for key in ck_f["state_dict"]:
        torch.testing.assert_close(ck_f["state_dict"][key], ck_s["state_dict"][key], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ck_f["current_model_state"][key], ck_s["current_model_state"][key],
                                   rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(ck_f["state_dict"][k], ck_f["current_model_state"][k]) for k in ck_f["state_dict"])
    resumed = run("resumed", fold_tiger, 2, ckpt_path=tmp_path / "fold" / "epoch=0.ckpt")
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name  # both end holding the average of the same raw trajectory


def test_fold_in_backward_guard_counts_tiger_flags_and_clipping_is_refused(tmp_path: Path) -> None:
    guard = NonFiniteGuard()
    model = seeded(make_opt=fold_tiger, poison_batch=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(tmp_path / "a", model, [guard])
    assert guard.flagged == 1 and guard.skipped == 0 and guard.consecutive == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(before["head.weight"], model.head.weight)
    for cb in (NonFiniteGuard(), OptimizerMonitor(), UseOptimizer(Tiger, lr=1e-3, fold_in_backward=True)):
        with pytest.raises(ValueError, match="gradient_clip_val"):
            fit(tmp_path / "b", seeded(make_opt=fold_tiger), [cb], gradient_clip_val=1.0)


class Probe(Callback):
    """Copies, per batch and parameter name, what OptimizerMonitor's documented formulas read: θ, g and the
    momentum before the step, and θ after it."""

    def __init__(self) -> None:
        self.before: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}
        self._batch = -1

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self._batch = idx

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        rows = {}
        for name, p in pl_module.named_parameters():
            m = optimizer.state.get(p, {}).get("momentum")
            rows[name] = (p.detach().double().clone(), None if p.grad is None else p.grad.double().clone(),
                          None if m is None else m.double().clone())
        self.before[self._batch] = rows

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.after[self._batch] = {name: p.detach().double().clone() for name, p in pl_module.named_parameters()}


def test_monitor_and_guard_with_tiger_in_bf16(tmp_path: Path) -> None:
    """The logged values equal OptimizerMonitor's documented formulas evaluated by hand on the logged step."""
    lr = 5e-3
    mon = OptimizerMonitor(log_every_n_steps=4)
    guard = NonFiniteGuard()
    probe = Probe()
    model = seeded(poison_batch=5)
    fit(tmp_path, model, [guard, mon, probe], precision="bf16-mixed")
    assert guard.skipped == 1
    logged = mon.last_logged
    # Optimizer steps 3 and 7 are logging steps ((step + 1) % 4 == 0, vetoed step 5 included in the count).
    before, after = probe.before[7], probe.after[7]
    n = sum(t.numel() for t, _, _ in before.values())
    param_rms = math.sqrt(sum(float((t**2).sum()) for t, _, _ in before.values()) / n)
    update_rms = math.sqrt(sum(float(((after[k] - t) ** 2).sum()) for k, (t, _, _) in before.items()) / n)
    pairs = [(m, g) for _, g, m in before.values() if m is not None and g is not None]
    assert len(pairs) == len(before), "every tensor has a momentum and a gradient at step 7"
    agree = sum(int((torch.sign(m) == torch.sign(g)).sum()) for m, g in pairs) / sum(m.numel() for m, _ in pairs)
    assert 0.05 < agree < 0.95, f"degenerate set-up: agreement {agree}"  # a value a constant could not fake
    assert logged["optim/Tiger/param_rms"] == pytest.approx(param_rms, rel=1e-5)
    assert logged["optim/Tiger/update_rms"] == pytest.approx(update_rms, rel=1e-4)
    assert logged["optim/Tiger/sign_agreement"] == pytest.approx(agree, abs=1e-6)
    # Effective lr (Su 2023, kexue.fm/archives/9512): bias / norm kinds 0.5·lr; matrices lr·RMS(θ); embedding rows
    # lr·RMS(row). Every RMS here is far above the default floor 0.1/sqrt(fan_in) <= 0.036, so the floor does not
    # enter.
    kinds = {"emb.weight": "rows", "l1.weight": "rms", "l1.bias": "half", "ln.weight": "half", "ln.bias": "half",
             "head.weight": "rms", "head.bias": "half"}
    assert sorted(before) == sorted(kinds)
    etas: list[float] = []
    for name, (t, _, _) in before.items():
        if kinds[name] == "half":
            etas.append(0.5 * lr)
        elif kinds[name] == "rms":
            etas.append(lr * float(t.pow(2).mean().sqrt()))
        else:
            etas += [lr * float(r) for r in t.pow(2).mean(dim=1).sqrt()]
    assert min(etas) / lr > 0.04
    assert logged["optim/Tiger/lr_min"] == pytest.approx(min(etas), rel=1e-5)
    assert logged["optim/Tiger/lr_max"] == pytest.approx(max(etas), rel=1e-5)
