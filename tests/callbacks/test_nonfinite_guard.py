"""NonFiniteGuard: a vetoed step leaves exactly the state of a run that never saw the bad batch.

The reference for ``action="skip"`` is always a second run whose data simply lacks the poisoned batch (or the
whole accumulation window holding it); parameters, optimizer state and scheduler state are compared with
``torch.equal``. The shrink reference is written from Tiger's rule (Su 2023, kexue.fm/archives/9512; bojone/tiger):
``θ ← (θ − c)·s + c``.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tiger.callbacks.nonfinite_guard import NonFiniteGuard, NonFiniteTrainingError

# Poison codes carried by every sample of a batch (int64, so no precision plugin casts them).
CLEAN, LOSS_NAN, GRAD_INF, LOSS_ADD_INF, GRAD_NAN = 0, 1, 2, 3, 4
PRECISIONS = ["32-true", "bf16-mixed", "bf16-true", "16-mixed-scaler"]
BATCH = 4


def _optimizer(name: str, params: Any, module: nn.Module) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    if name == "adamw_fused":  # owns AMP unscaling: Lightning does not unscale before the hook
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-2, momentum=0.9, weight_decay=0.1)
    if name == "tiger":
        from lightning_tiger.optim import Tiger, tiger_param_groups

        return Tiger(tiger_param_groups(module), lr=1e-2)
    if name == "lion":
        from lightning_tiger.optim import Lion

        return Lion(params, lr=1e-3, weight_decay=0.1)
    raise ValueError(name)


class GuardNet(L.LightningModule):
    """Linear -> LayerNorm -> tanh -> Linear; poisons its loss or its LayerNorm-output gradient on request."""

    def __init__(self, optimizer: str = "adamw", scheduler: bool = True) -> None:
        super().__init__()
        self.l1 = nn.Linear(8, 16)
        self.ln = nn.LayerNorm(16)
        self.l2 = nn.Linear(16, 1)
        self.optimizer_name = optimizer
        self.use_scheduler = scheduler

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, flag = batch
        h = self.ln(self.l1(x))
        code = int(flag.max())
        if code in (GRAD_INF, GRAD_NAN):
            bad = math.inf if code == GRAD_INF else math.nan

            def poison(g: torch.Tensor) -> torch.Tensor:
                g = g.clone()
                g[0, 0] = bad
                return g

            h.register_hook(poison)  # only l1 and ln receive non-finite gradients; l2 stays finite
        out = self.l2(torch.tanh(h))
        loss = nn.functional.mse_loss(out.float(), y.float())
        if code == LOSS_NAN:
            loss = loss * math.nan
        elif code == LOSS_ADD_INF:
            loss = loss + math.inf  # non-finite loss, finite gradients
        return loss

    def configure_optimizers(self) -> Any:
        opt = _optimizer(self.optimizer_name, self.parameters(), self)
        if not self.use_scheduler:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.8**t)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def make_data(n_batches: int, poison: dict[int, int], drop: tuple[int, ...] = ()) -> DataLoader:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n_batches * BATCH, 8, generator=g)
    y = torch.randn(n_batches * BATCH, 1, generator=g)
    flag = torch.zeros(n_batches * BATCH, dtype=torch.long)
    for b, code in poison.items():
        flag[b * BATCH : (b + 1) * BATCH] = code
    keep = torch.tensor([i for i in range(n_batches * BATCH) if i // BATCH not in drop], dtype=torch.long)
    return DataLoader(TensorDataset(x[keep], y[keep], flag[keep]), batch_size=BATCH, shuffle=False)


class AssertFinite(Callback):
    """Every parameter and optimizer-state tensor is finite after every batch."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        for p in pl_module.parameters():
            assert torch.isfinite(p).all()
        for opt in trainer.optimizers:
            for state in opt.state.values():
                for v in state.values():
                    if isinstance(v, torch.Tensor) and v.is_floating_point():
                        assert torch.isfinite(v).all()


class RawWeights(Callback):
    """The model's own weights at the end of the last epoch (EMAWeightAveraging overwrites them at train end)."""

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] = {}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def averaged_state(ema: EMAWeightAveraging) -> dict[str, torch.Tensor]:
    """The AveragedModel's parameters, buffers and ``n_averaged`` (Lightning keeps no public accessor)."""
    assert ema._average_model is not None
    return {k: v.detach().clone() for k, v in ema._average_model.state_dict().items()}


def make_trainer(
    root: Path, precision: str, callbacks: list[Callback], logger: Any = False, **kwargs: Any
) -> L.Trainer:
    plugins = None
    prec: str | None = precision
    if precision == "16-mixed-scaler":
        # On CPU precision="16-mixed" silently becomes bf16: pass a real GradScaler.
        plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))]
        prec = None
    kwargs.setdefault("max_epochs", 1)
    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=prec,
        plugins=plugins,
        callbacks=callbacks,
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        **kwargs,
    )


def fit(
    root: Path,
    precision: str,
    loader: DataLoader,
    callbacks: list[Callback],
    optimizer: str = "adamw",
    logger: Any = False,
    **kwargs: Any,
) -> tuple[L.Trainer, GuardNet]:
    torch.manual_seed(0)
    model = GuardNet(optimizer)
    trainer = make_trainer(root, precision, callbacks, logger=logger, **kwargs)
    trainer.fit(model, loader)
    return trainer, model


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Recursive exact equality (torch.equal on tensors)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {set(a) ^ set(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif callable(a):
        return
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), f"{path}: {a} != {b}"


def assert_same_training_state(t1: L.Trainer, m1: nn.Module, t2: L.Trainer, m2: nn.Module) -> None:
    assert_same(m1.state_dict(), m2.state_dict(), "params")
    assert_same(t1.optimizers[0].state_dict(), t2.optimizers[0].state_dict(), "optimizer")
    if t1.lr_scheduler_configs:
        s1, s2 = (t.lr_scheduler_configs[0].scheduler.state_dict() for t in (t1, t2))
        s1.pop("lr_lambdas", None)
        s2.pop("lr_lambdas", None)
        assert_same(s1, s2, "scheduler")


def read_csv_metrics(trainer: L.Trainer) -> list[dict[str, str]]:
    path = os.path.join(trainer.logger.log_dir, "metrics.csv")
    with open(path) as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------------------------
def test_none_grad_is_a_skip_for_torch_optimizers() -> None:
    """The veto mechanism: grads set to None leave AdamW/SGD state (incl. AdamW's step counter) untouched."""
    for make in (
        lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.1),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
    ):
        p = nn.Parameter(torch.randn(5))
        opt = make([p])
        p.grad = torch.randn(5)
        opt.step()
        before_p = p.detach().clone()
        before_state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()}
        p.grad = None
        opt.step()
        assert torch.equal(p, before_p)
        assert_same(dict(opt.state[p]), before_state)
        # ... whereas zeroing is not a skip: the parameter still moves (decay / momentum).
        p.grad = torch.zeros(5)
        opt.step()
        assert not torch.equal(p, before_p)


@pytest.mark.parametrize(
    ("precision", "optimizer"),
    [(p, "adamw") for p in PRECISIONS]
    + [("32-true", "sgd"), ("32-true", "tiger"), ("bf16-mixed", "tiger"), ("16-mixed-scaler", "adamw_fused")],
)
def test_skip_equals_run_without_bad_batches(tmp_path: Path, precision: str, optimizer: str) -> None:
    if optimizer == "tiger":
        pytest.importorskip("lightning_tiger.optim.tiger")
    poison = {2: LOSS_NAN, 4: GRAD_INF, 5: GRAD_NAN, 6: LOSS_ADD_INF}
    guard = NonFiniteGuard(action="skip", check_loss=True)
    logger = CSVLogger(tmp_path / "bad", name="")
    t_bad, m_bad = fit(tmp_path / "bad", precision, make_data(9, poison), [guard, AssertFinite()], optimizer,
                       logger=logger, log_every_n_steps=3)
    t_ref, m_ref = fit(tmp_path / "ref", precision, make_data(9, {}, drop=tuple(poison)), [AssertFinite()],
                       optimizer)

    assert_same_training_state(t_bad, m_bad, t_ref, m_ref)
    assert guard.skipped == 4 and guard.consecutive == 0 and guard.steps_seen == 9
    assert t_bad.global_step == 9  # Lightning counts attempted steps ...
    sched = t_bad.lr_scheduler_configs[0].scheduler
    assert sched.last_epoch == 9 - 4  # ... the schedule counts real ones

    rows = read_csv_metrics(t_bad)
    logged = {(int(r["step"]), float(r["nonfinite/skipped"])) for r in rows if r.get("nonfinite/skipped")}
    # Every skip is logged at its own step (Lightning's step index = optimizer steps before this one) ...
    assert {(2, 1.0), (4, 2.0), (5, 3.0), (6, 4.0)} <= logged
    # ... and the regular cadence (log_every_n_steps=3 -> steps 2, 5) is there as well.
    consecutive = {int(r["step"]): float(r["nonfinite/consecutive"]) for r in rows if r.get("nonfinite/consecutive")}
    assert consecutive[4] == 1.0 and consecutive[5] == 2.0 and consecutive[6] == 3.0


def _clean_updates(real_steps: int, every: int, start: int | None) -> int:
    """EMA updates of a clean run, from EMAWeightAveraging's documented rule (step index i, 0-based)."""
    return sum(1 for i in range(real_steps) if (start is None or i >= start) and i % every == 0)


@pytest.mark.parametrize(
    ("precision", "every", "start", "ema_first"),
    [
        ("32-true", 1, None, False),
        ("32-true", 1, None, True),
        ("bf16-mixed", 2, None, False),
        ("16-mixed-scaler", 1, 3, True),
        ("32-true", 2, 1, True),
    ],
)
def test_skip_equals_run_without_bad_batches_ema(
    tmp_path: Path, precision: str, every: int, start: int | None, ema_first: bool
) -> None:
    """EMAWeightAveraging after a run with vetoed steps == after a run that never saw those batches.

    "Never saw the batch", for counters: everything that counts optimizer steps equals the clean run, i.e. the
    AveragedModel's ``n_averaged`` and the step index that ``should_update`` is asked about (so
    ``update_every_n_steps`` / ``update_starting_at_step`` count real steps, like the lr schedule).
    ``trainer.global_step`` counts attempted steps (as under a GradScaler), and so does what is stamped with
    it: the averaging's ``latest_update_step`` is the clean run's plus the steps vetoed before it.
    The order of the guard and the averaging callback in ``callbacks`` does not matter.
    """
    poison = {2: LOSS_NAN, 4: GRAD_INF, 5: GRAD_NAN, 6: LOSS_ADD_INF}

    def run(root: Path, loader: DataLoader, guard: NonFiniteGuard | None) -> tuple[Any, ...]:
        ema = EMAWeightAveraging(decay=0.5, update_every_n_steps=every, update_starting_at_step=start)
        raw = RawWeights()
        callbacks: list[Callback] = [ema] if guard is None else ([ema, guard] if ema_first else [guard, ema])
        trainer, model = fit(root, precision, loader, [*callbacks, raw, AssertFinite()])
        return trainer, model, ema, raw

    guard = NonFiniteGuard(action="skip", check_loss=True)
    t_bad, m_bad, ema_bad, raw_bad = run(tmp_path / "bad", make_data(9, poison), guard)
    t_ref, m_ref, ema_ref, raw_ref = run(tmp_path / "ref", make_data(9, {}, drop=tuple(poison)), None)

    assert guard.skipped == 4
    assert_same(raw_bad.state, raw_ref.state, "raw weights")
    assert_same_training_state(t_bad, m_bad, t_ref, m_ref)  # the module holds the average after train end
    avg_bad, avg_ref = averaged_state(ema_bad), averaged_state(ema_ref)
    assert_same(avg_bad, avg_ref, "averaged model")
    assert int(avg_ref["n_averaged"]) == _clean_updates(9 - 4, every, start)
    assert ema_bad.state_dict()["latest_update_step"] - guard.skipped == ema_ref.state_dict()["latest_update_step"]
    assert "should_update" not in vars(ema_bad)  # the guard's wrapper is removed after fit


@pytest.mark.parametrize("check_loss", [True, False])
def test_check_loss(tmp_path: Path, check_loss: bool) -> None:
    guard = NonFiniteGuard(check_loss=check_loss)
    t_bad, m_bad = fit(tmp_path / "bad", "32-true", make_data(4, {1: LOSS_ADD_INF}), [guard])
    assert guard.skipped == (1 if check_loss else 0)
    if check_loss:
        t_ref, m_ref = fit(tmp_path / "ref", "32-true", make_data(4, {}, drop=(1,)), [])
        assert_same_training_state(t_bad, m_bad, t_ref, m_ref)


@pytest.mark.parametrize("precision", ["32-true", "16-mixed-scaler"])
def test_accumulation_skips_the_whole_window(tmp_path: Path, precision: str) -> None:
    guard = NonFiniteGuard()
    t_bad, m_bad = fit(tmp_path / "bad", precision, make_data(8, {3: GRAD_INF}), [guard, AssertFinite()],
                       accumulate_grad_batches=2)
    t_ref, m_ref = fit(tmp_path / "ref", precision, make_data(8, {}, drop=(2, 3)), [],
                       accumulate_grad_batches=2)
    assert guard.skipped == 1 and guard.steps_seen == 4
    assert_same_training_state(t_bad, m_bad, t_ref, m_ref)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_with_gradient_clipping(tmp_path: Path, algorithm: str) -> None:
    guard = NonFiniteGuard()
    kw = {"gradient_clip_val": 0.05, "gradient_clip_algorithm": algorithm}
    t_bad, m_bad = fit(tmp_path / "bad", "bf16-mixed", make_data(5, {1: LOSS_NAN}), [guard, AssertFinite()], **kw)
    t_ref, m_ref = fit(tmp_path / "ref", "bf16-mixed", make_data(5, {}, drop=(1,)), [], **kw)
    assert guard.skipped == 1
    assert_same_training_state(t_bad, m_bad, t_ref, m_ref)


@pytest.mark.parametrize(("precision", "optimizer"), [("32-true", "adamw"), ("16-mixed-scaler", "adamw"),
                                                      ("16-mixed-scaler", "tiger")])
def test_shrink(tmp_path: Path, precision: str, optimizer: str) -> None:
    """Skip + θ ← (θ − c)·s + c on exactly the tensors with non-finite gradients (c = 1 for the LN scale)."""
    if optimizer == "tiger":
        pytest.importorskip("lightning_tiger.optim.tiger")
    s = 0.9
    guard = NonFiniteGuard(action="shrink", shrink_ratio=s)
    t_bad, m_bad = fit(tmp_path / "bad", precision, make_data(4, {3: GRAD_INF}), [guard], optimizer)
    t_ref, m_ref = fit(tmp_path / "ref", precision, make_data(4, {}, drop=(3,)), [], optimizer)
    assert guard.skipped == 1
    ref = m_ref.state_dict()
    expected = {
        "l1.weight": (ref["l1.weight"] - 0.0) * s + 0.0,
        "l1.bias": (ref["l1.bias"] - 0.0) * s + 0.0,
        "ln.weight": (ref["ln.weight"] - 1.0) * s + 1.0,  # norm scale: centre 1
        "ln.bias": (ref["ln.bias"] - 0.0) * s + 0.0,
        "l2.weight": ref["l2.weight"],  # finite gradient: untouched (and not stepped)
        "l2.bias": ref["l2.bias"],
    }
    assert_same(m_bad.state_dict(), expected, "params")
    assert_same(t_bad.optimizers[0].state_dict()["state"], t_ref.optimizers[0].state_dict()["state"], "state")
    # The guarded run would have diverged without the veto: the finite check holds at the end.
    assert all(torch.isfinite(p).all() for p in m_bad.parameters())


def test_stops_after_max_consecutive_with_checkpoint(tmp_path: Path) -> None:
    guard = NonFiniteGuard(max_consecutive=3)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts")
    loader = make_data(8, {2: LOSS_NAN, 3: LOSS_NAN, 4: GRAD_NAN, 5: LOSS_NAN})
    with pytest.raises(NonFiniteTrainingError, match=r"3 consecutive .* global_step 4") as info:
        fit(tmp_path, "32-true", loader, [guard, ckpt], enable_checkpointing=True)
    assert guard._wrapped_module is None  # the lr_scheduler_step wrapper is removed on the error path too
    path = tmp_path / "ckpts" / "nonfinite-stop-step=4.ckpt"
    assert str(path) in str(info.value)
    state = torch.load(path, weights_only=False)
    saved = next(v for k, v in state["callbacks"].items() if k.startswith("NonFiniteGuard"))
    assert saved["skipped"] == 3 and saved["consecutive"] == 3
    assert state["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())


def test_stop_checkpoint_goes_to_log_dir_without_model_checkpoint(tmp_path: Path) -> None:
    guard = NonFiniteGuard(max_consecutive=1)
    logger = CSVLogger(tmp_path, name="logs")
    with pytest.raises(NonFiniteTrainingError, match="global_step 1"):
        fit(tmp_path, "32-true", make_data(4, {1: GRAD_INF}), [guard], logger=logger)
    assert (Path(logger.log_dir) / "nonfinite-stop-step=1.ckpt").exists()


def test_resume_between_skip_and_next_step_is_bit_for_bit(tmp_path: Path) -> None:
    """Checkpoint at the end of epoch 0, whose last step was vetoed; resuming reproduces the uninterrupted run."""
    loader = make_data(4, {3: GRAD_INF})
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_top_k=-1, filename="{epoch}")
    guard_full = NonFiniteGuard()
    t_full, m_full = fit(tmp_path / "full", "32-true", loader, [guard_full, ckpt], max_epochs=2,
                         enable_checkpointing=True)
    assert guard_full.skipped == 2

    torch.manual_seed(0)
    guard_resumed = NonFiniteGuard()
    model = GuardNet()
    trainer = make_trainer(tmp_path / "resumed", "32-true", [guard_resumed], max_epochs=2)
    trainer.fit(model, loader, ckpt_path=tmp_path / "ckpts" / "epoch=0.ckpt")
    assert guard_resumed.skipped == 2 and guard_resumed.steps_seen == 8
    assert trainer.global_step == t_full.global_step == 8
    assert_same_training_state(trainer, model, t_full, m_full)


def test_state_dict_roundtrip_and_validation() -> None:
    g = NonFiniteGuard()
    g.skipped, g.consecutive, g.steps_seen, g.last_skip_step = 5, 2, 40, 39
    h = NonFiniteGuard()
    h.load_state_dict(g.state_dict())
    assert (h.skipped, h.consecutive, h.steps_seen, h.last_skip_step) == (5, 2, 40, 39)
    with pytest.raises(ValueError, match="action"):
        NonFiniteGuard(action="zero")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_consecutive"):
        NonFiniteGuard(max_consecutive=0)
    with pytest.raises(ValueError, match="shrink_ratio"):
        NonFiniteGuard(shrink_ratio=1.5)


def test_user_lr_scheduler_step_override_still_called(tmp_path: Path) -> None:
    calls: list[int] = []

    class Custom(GuardNet):
        def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
            calls.append(self.trainer.global_step)
            scheduler.step()

    torch.manual_seed(0)
    model = Custom()
    trainer = make_trainer(tmp_path, "32-true", [NonFiniteGuard()])
    trainer.fit(model, make_data(4, {1: LOSS_NAN}))
    assert calls == [1, 3, 4]  # the call after the vetoed step (global_step 2) was swallowed
    assert "lr_scheduler_step" not in vars(model)  # the wrapper is removed after fit


class RankLocalPoison(Callback):
    """On rank 1 only, batch 1: a NaN written into an already all-reduced gradient (only the guard's cross-rank
    decision keeps rank 0 from stepping). Saves each rank's final parameters."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank == 1 and trainer.fit_loop.epoch_loop.batch_idx == 1:
            with torch.no_grad():
                pl_module.l2.weight.grad[0, 0] = math.nan

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        guard = next(c for c in trainer.callbacks if isinstance(c, NonFiniteGuard))
        torch.save(
            {"params": {k: v.clone() for k, v in pl_module.state_dict().items()}, "skipped": guard.skipped,
             "lr": trainer.optimizers[0].param_groups[0]["lr"]},
            os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"),
        )


class NaNLossModule(GuardNet):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.trainer.global_rank == 1 and batch_idx == 3:
            loss = loss * math.nan  # rank-local NaN loss: DDP spreads NaN gradients to both ranks
        return loss


@pytest.mark.distributed
@pytest.mark.parametrize("sync_decision", [True, False])
def test_ddp_rank_local_nonfinite_skips_on_every_rank(tmp_path: Path, sync_decision: bool) -> None:
    torch.manual_seed(0)
    model = NaNLossModule()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[NonFiniteGuard(sync_decision=sync_decision), RankLocalPoison(str(tmp_path))],
    )
    trainer.fit(model, make_data(12, {}))  # 6 steps per rank
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    if not sync_decision:  # the control: without the cross-rank decision only rank 1 skips, replicas diverge
        assert (r0["skipped"], r1["skipped"]) == (1, 2)
        assert not torch.equal(r0["params"]["l1.weight"], r1["params"]["l1.weight"])
        return
    assert r0["skipped"] == r1["skipped"] == 2
    assert r0["lr"] == r1["lr"] == pytest.approx(1e-2 * 0.8 ** (6 - 2))
    assert_same(r0["params"], r1["params"], "rank0 vs rank1")
    assert all(torch.isfinite(v).all() for v in r0["params"].values())
    assert not torch.equal(r0["params"]["l1.weight"], init["l1.weight"])


class _WideNorm(L.LightningModule):
    """A wide LayerNorm whose scale is far from 1, a NaN gradient on its scale, and an optimizer that moves nothing:
    after one batch the scale holds exactly what the guard's shrink wrote."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(4096)
        with torch.no_grad():
            self.ln.weight.copy_(1.0 + 0.3 * torch.randn(4096, generator=torch.Generator().manual_seed(0)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        out = self.ln(batch[0])
        self.ln.weight.register_hook(lambda g: torch.full_like(g, math.nan))
        return out.float().square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_shrink_of_a_bf16_norm_scale_rounds_once(tmp_path: Path) -> None:
    """θ ← (θ − 1)·s + 1 computed in fp32 and rounded once to bf16 (bf16 arithmetic would round three times)."""
    s = 0.9
    model = _WideNorm()
    theta0 = model.ln.weight.detach().to(torch.bfloat16)
    expected = ((theta0.float() - 1.0) * s + 1.0).to(torch.bfloat16)
    in_bf16 = (theta0 - 1.0) * s + 1.0
    assert not torch.equal(in_bf16, expected)  # the two roundings are distinguishable on these values
    loader = DataLoader(TensorDataset(torch.randn(2, 4096)), batch_size=2)
    guard = NonFiniteGuard(action="shrink", shrink_ratio=s, verbose=False)
    trainer = L.Trainer(default_root_dir=tmp_path, precision="bf16-true", max_steps=1, logger=False,
                        callbacks=[guard], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, loader)
    assert guard.skipped == 1
    assert model.ln.weight.dtype == torch.bfloat16
    assert torch.equal(model.ln.weight.detach(), expected)
