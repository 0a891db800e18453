"""Fault injection per capability: NaN/inf in inputs, losses and gradients at chosen steps, under every precision
available on CPU. With :class:`NonFiniteGuard` the run continues and ends bit-for-bit where a run that never saw
the bad batches ends (parameters, optimizer state, scheduler, counters); with ``max_consecutive`` it stops with
an error naming the cause and the step. Each case is recorded in the ``fault_tally``.

The reference is :func:`tests.reliability._faults.manual_reference`, a plain PyTorch loop written from the
documented semantics ("a vetoed step changes nothing"), not the guard itself.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import pytest
import torch

from lightning_tiger.optim import PiecewiseLinearLR, Tiger
from tests.cli.tiny import TinyRegression
from tests.reliability._faults import (
    PRECISIONS,
    assert_same_training_state,
    faulty,
    loader,
    manual_reference,
    trainer_kwargs,
)

N_STEPS = 8
BAD = (2, 5)


def _regression_batches(n: int = N_STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 1, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(16, 4, generator=g)
        out.append((x, x @ w + 0.01 * torch.randn(16, 1, generator=g)))
    return out


class Regression(TinyRegression):
    """TinyRegression trained with a chosen optimizer and a step-wise PiecewiseLinearLR."""

    optimizer_name = "Tiger"

    def configure_optimizers(self) -> Any:
        from lightning_tiger.optim import Lion, PiecewiseLinearLR, Tiger, tiger_param_groups

        if self.optimizer_name == "Tiger":
            opt: torch.optim.Optimizer = Tiger(tiger_param_groups(self), lr=0.05)
        elif self.optimizer_name == "Lion":
            opt = Lion(self.parameters(), lr=0.01, weight_decay=0.1)
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=0.01)
        sched = PiecewiseLinearLR(opt, {3: 1.0, 20: 0.1})
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _build_regression(optimizer: str, kind: str) -> Any:
    def build() -> L.LightningModule:
        cls = faulty(Regression)
        m = cls(hidden=8)
        m.optimizer_name = optimizer
        return m.set_fault(kind, BAD)

    return build


def _fit(build: Any, batches: list[Any], precision: str, tmp_path: Path, callbacks: list, **kw: Any) -> Any:
    torch.manual_seed(0)
    module = build()
    trainer = L.Trainer(max_steps=len(batches), callbacks=callbacks, **trainer_kwargs(precision, tmp_path, **kw))
    trainer.fit(module, train_dataloaders=loader(batches))
    return module, trainer


def _guarded_equals_reference(build: Any, batches: list[Any], precision: str, tmp_path: Path,
                              bad: tuple[int, ...] = BAD) -> Any:
    from lightning_tiger.callbacks import NonFiniteGuard

    guard = NonFiniteGuard(action="skip", max_consecutive=5, verbose=False)
    module, trainer = _fit(build, batches, precision, tmp_path, [guard])
    ref, ref_opt, ref_sched, ref_skipped = manual_reference(build, batches, precision, bad)
    assert ref_skipped == len(bad), "the reference itself did not see the faults: test set-up error"
    assert guard.skipped == len(bad), f"guard counted {guard.skipped} vetoed steps, expected {len(bad)}"
    assert trainer.global_step == len(batches)
    assert_same_training_state(module, ref, trainer.optimizers[0], ref_opt)
    if ref_sched is not None:
        sched = trainer.lr_scheduler_configs[0].scheduler
        assert sched.last_epoch == ref_sched.last_epoch == len(batches) - len(bad), "schedule out of step"
        assert sched.get_last_lr() == ref_sched.get_last_lr()
    return module, trainer, guard


# Default run: every precision at least once, each optimizer at least once; the full cross product
# (3 optimizers x 4 precisions x 6 fault kinds) is marked slow.
FAST_CASES = [
    ("Tiger", "32-true", "loss-nan"), ("Tiger", "bf16-mixed", "grad-inf"), ("Tiger", "bf16-true", "input-nan"),
    ("Lion", "16-mixed", "grad-nan"), ("AdamW", "bf16-mixed", "loss-inf"),
]
ALL_CASES = [(o, p, f) for o in ("Tiger", "Lion", "AdamW") for p in PRECISIONS
             for f in ("loss-nan", "loss-inf", "grad-nan", "grad-inf", "input-nan", "input-inf")]
SLOW_CASES = [pytest.param(*c, marks=pytest.mark.slow) for c in ALL_CASES if c not in FAST_CASES]


@pytest.mark.parametrize(("optimizer", "precision", "kind"), FAST_CASES + SLOW_CASES)
def test_optimizer_fault_skipped_exactly(optimizer: str, precision: str, kind: str, tmp_path: Path,
                                         fault_tally: Any) -> None:
    _guarded_equals_reference(_build_regression(optimizer, kind), _regression_batches(), precision, tmp_path)
    fault_tally.record("optim", f"{optimizer}: {kind} @ steps {BAD}, {precision}", "survived")


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_guard_stops_with_error_naming_cause_and_step(precision: str, tmp_path: Path, fault_tally: Any) -> None:
    from lightning_tiger.callbacks import NonFiniteGuard
    from lightning_tiger.callbacks.nonfinite_guard import NonFiniteTrainingError

    def build() -> L.LightningModule:
        return faulty(Regression)(hidden=8).set_fault("grad-nan", range(3, 100))

    guard = NonFiniteGuard(max_consecutive=2, verbose=False)
    with pytest.raises(NonFiniteTrainingError) as info:
        _fit(build, _regression_batches(), precision, tmp_path, [guard])
    msg = str(info.value)
    assert "non-finite" in msg.lower() or "nan" in msg.lower(), msg
    # vetoed steps are 3 and 4 (0-based optimizer steps): the message must say where it stopped
    assert any(s in msg for s in ("4", "5")), f"the error does not name the step: {msg}"
    assert guard.skipped == 2
    fault_tally.record("callbacks", f"NaN gradients from step 3 on, max_consecutive=2, {precision}", "stopped")


def test_guard_checkpoint_on_stop_resumes_clean(tmp_path: Path, fault_tally: Any) -> None:
    """The checkpoint written when the guard stops the run holds finite weights equal to the last good step."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_tiger.callbacks import NonFiniteGuard
    from lightning_tiger.callbacks.nonfinite_guard import NonFiniteTrainingError

    def build() -> L.LightningModule:
        return faulty(Regression)(hidden=8).set_fault("loss-nan", range(4, 100))

    guard = NonFiniteGuard(max_consecutive=2, verbose=False)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=False, save_top_k=0)
    with pytest.raises(NonFiniteTrainingError):
        _fit(build, _regression_batches(), "32-true", tmp_path, [guard, ckpt_cb], enable_checkpointing=True)
    files = sorted((tmp_path / "ckpt").glob("*.ckpt")) or sorted(tmp_path.rglob("*.ckpt"))
    assert files, "NonFiniteGuard(checkpoint_on_stop=True) wrote no checkpoint"
    state = torch.load(files[-1], weights_only=False)["state_dict"]
    ref, _, _, _ = manual_reference(build, _regression_batches()[:4], "32-true", ())
    for name, p in ref.state_dict().items():
        assert torch.isfinite(state[name]).all() and torch.equal(state[name], p), name
    fault_tally.record("callbacks", "NaN loss from step 4 on: stop + checkpoint of the last good state", "stopped")


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_guard_shrink_action_follows_the_formula(precision: str, tmp_path: Path, fault_tally: Any) -> None:
    """action='shrink': the vetoed step moves nothing but the offending tensor, θ ← θ·s (centre 0)."""
    from lightning_tiger.callbacks import NonFiniteGuard

    build = _build_regression("AdamW", "grad-nan")
    batches = _regression_batches(3)

    class Snap(L.Callback):
        before: ClassVar[dict[str, torch.Tensor]] = {}

        def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *a: Any) -> None:
            if trainer.global_step == 2:
                Snap.before = {k: v.detach().clone() for k, v in pl_module.named_parameters()}

    guard = NonFiniteGuard(action="shrink", shrink_ratio=0.9, verbose=False)
    module, _trainer = _fit(build, batches, precision, tmp_path, [guard, Snap()])
    bad_name = next(n for n, p in module.named_parameters() if p is module.fault_param())
    for name, p in module.named_parameters():
        expected = Snap.before[name] * 0.9 if name == bad_name else Snap.before[name]
        assert torch.equal(p, expected), f"{name}: shrink rule not applied exactly"
    assert guard.skipped == 1
    fault_tally.record("callbacks", f"NaN grad @ step 2, action=shrink, {precision}", "survived")


def test_guard_check_loss_catches_inf_loss_with_finite_grads(tmp_path: Path, fault_tally: Any) -> None:
    """loss + inf has finite gradients: only check_loss=True can see it, and then the step is vetoed."""
    from lightning_tiger.callbacks import NonFiniteGuard

    class InfLoss(Regression):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            return loss + float("inf") if self.trainer.global_step in BAD else loss

    def build() -> L.LightningModule:
        return faulty(InfLoss)(hidden=8).set_fault("loss-nan", ())

    guard = NonFiniteGuard(check_loss=True, verbose=False)
    module, _trainer = _fit(build, _regression_batches(), "32-true", tmp_path, [guard])
    assert guard.skipped == len(BAD)
    assert all(torch.isfinite(p).all() for p in module.parameters())
    fault_tally.record("callbacks", f"inf loss with finite grads @ {BAD}, check_loss=True", "survived")


def test_guard_with_accumulation_skips_the_whole_window(tmp_path: Path, fault_tally: Any) -> None:
    """accumulate_grad_batches=2, NaN in one micro-batch: the whole window is vetoed (no partial update)."""
    from lightning_tiger.callbacks import NonFiniteGuard

    batches = _regression_batches(8)
    build = _build_regression("Tiger", "grad-nan")  # micro-batches 2 and 5: windows 1 and 2 (0-based)
    guard = NonFiniteGuard(verbose=False)
    torch.manual_seed(0)
    module = build()
    trainer = L.Trainer(max_steps=4, callbacks=[guard], accumulate_grad_batches=2,
                        **trainer_kwargs("32-true", tmp_path))
    trainer.fit(module, train_dataloaders=loader(batches))
    # reference: windows 0 and 3 only, summed loss/2 over each window's two micro-batches
    torch.manual_seed(0)
    ref = build()
    opt, sched = (lambda c: (c["optimizer"], c["lr_scheduler"]["scheduler"]))(ref.configure_optimizers())
    for w in range(4):
        opt.zero_grad(set_to_none=True)
        for j in (2 * w, 2 * w + 1):
            loss = ref.training_step(batches[j], j)
            if w in (0, 3):
                (loss / 2).backward()
        if w in (0, 3):
            opt.step()
            sched.step()
    assert guard.skipped == 2
    assert_same_training_state(module, ref, trainer.optimizers[0], opt)
    fault_tally.record("callbacks", "NaN grad in 1 of 2 micro-batches, accumulate_grad_batches=2", "survived")


@pytest.mark.parametrize("exact", [False, True], ids=["default", "exact_nonfinite"])
def test_tiger_alone_shrinks_the_offending_tensor(exact: bool, fault_tally: Any) -> None:
    """Without the guard, Tiger's own per-tensor rule (Su 2023, kexue.fm/archives/9512): momentum kept, θ ← θ·s;
    others update.

    Bit for bit with ``exact_nonfinite=True``; by default the optimistic rule undoes a partly written tensor by
    inverting the update, so the momentum is kept to within float rounding (Tiger's docstring)."""
    from lightning_tiger.optim import Tiger

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    opt = Tiger(model.parameters(), lr=0.01, shrink_ratio=0.9, exact_nonfinite=exact)
    x = torch.randn(16, 4)
    w = model[0].weight
    for step in range(4):
        before = [p.detach().clone() for p in model.parameters()]
        mom_before = opt.state[w]["momentum"].clone() if step > 0 else None
        model(x).pow(2).mean().backward()
        if step == 2:
            w.grad[0, 0] = float("nan")
        opt.step()
        opt.zero_grad()
        if step == 2:
            assert mom_before is not None and mom_before.abs().sum() > 0, "no momentum to keep: test set-up error"
            mom = opt.state[w]["momentum"]
            if exact:
                assert torch.equal(w, before[0] * 0.9), "θ ← θ·s (centre 0) for the offending matrix"
                assert torch.equal(mom, mom_before), "momentum must be kept bit for bit"
            else:
                torch.testing.assert_close(w, before[0] * 0.9, rtol=1e-6, atol=0, msg="θ ← θ·s (centre 0)")
                torch.testing.assert_close(mom, mom_before, rtol=1e-6, atol=1e-9, msg="momentum must be kept")
            assert not torch.equal(model[1].weight, before[2]), "the other tensors still update"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    fault_tally.record("optim", f"Tiger without guard: NaN in one tensor's grad @ step 2 (exact={exact})", "survived")


# ------------------------------------------------------------------------------------------------- LM
# The modules' default schedule follows the Trainer's run length, which the Trainer-free reference does not have:
# both runs get the same fixed warm-up + decay instead (the default's shape, N_STEPS long).
FIXED_SCHEDULE = partial(PiecewiseLinearLR, schedule=[(0, 0.0), (2, 1.0), (N_STEPS, 0.1)])


def _lm_build(kind: str) -> Any:
    from lightning_tiger.modules import CausalLMModule

    def build() -> L.LightningModule:
        m = faulty(CausalLMModule)(model={"vocab_size": 17, "dim": 16, "depth": 1, "num_heads": 2},
                                   optimizer=partial(Tiger, lr=0.01), lr_scheduler=FIXED_SCHEDULE)
        return m.set_fault(kind, BAD)

    return build


def _lm_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 17, (4, 13), generator=g) for _ in range(N_STEPS)]


@pytest.mark.parametrize(("precision", "kind"), [
    ("bf16-mixed", "grad-nan"),
    pytest.param("32-true", "loss-nan", marks=pytest.mark.slow),
    pytest.param("bf16-true", "loss-inf", marks=pytest.mark.slow),
    pytest.param("16-mixed", "grad-inf", marks=pytest.mark.slow),
])
def test_lm_fault_skipped_exactly(precision: str, kind: str, tmp_path: Path, fault_tally: Any) -> None:
    with _quiet_logging():
        _guarded_equals_reference(_lm_build(kind), _lm_batches(), precision, tmp_path)
    fault_tally.record("lm", f"CausalLMModule: {kind} @ steps {BAD}, {precision}", "survived")


# ------------------------------------------------------------------------------------------ diffusion
def _diffusion_build(name: str, kind: str) -> Any:
    def build() -> L.LightningModule:
        import lightning_tiger.modules as mods
        from lightning_tiger.nn import TimeMLP

        cls = faulty(getattr(mods, name))
        net = TimeMLP(data_dim=2, hidden_dim=32, depth=2, time_dim=16)
        return cls(net=net, optimizer=partial(Tiger, lr=0.01), lr_scheduler=FIXED_SCHEDULE,
                   ema_decay=None).set_fault(kind, BAD)

    return build


def _moons_batches() -> list[torch.Tensor]:
    from lightning_tiger.data import sample_toy

    g = torch.Generator().manual_seed(7)
    return [sample_toy("moons", 32, generator=g) for _ in range(N_STEPS)]


@pytest.mark.parametrize(("name", "precision", "kind"), [
    ("ScoreMatchingModule", "32-true", "input-nan"),
    pytest.param("RectifiedFlowModule", "bf16-mixed", "input-inf", marks=pytest.mark.slow),
    pytest.param("ScoreMatchingModule", "bf16-mixed", "loss-nan", marks=pytest.mark.slow),
    pytest.param("RectifiedFlowModule", "32-true", "grad-nan", marks=pytest.mark.slow),
    pytest.param("ScoreMatchingModule", "16-mixed", "input-nan", marks=pytest.mark.slow),
    pytest.param("RectifiedFlowModule", "bf16-true", "input-nan", marks=pytest.mark.slow),
])
def test_diffusion_fault_skipped_exactly(name: str, precision: str, kind: str, tmp_path: Path,
                                         fault_tally: Any) -> None:
    with _quiet_logging():
        _guarded_equals_reference(_diffusion_build(name, kind), _moons_batches(), precision, tmp_path)
    fault_tally.record("diffusion", f"{name}: {kind} @ steps {BAD}, {precision}", "survived")


def _quiet_logging() -> Any:
    import warnings

    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.filterwarnings("ignore", message=".*self.log.*")
    warnings.filterwarnings("ignore", message=".*You are trying to `self.log\\(\\)`.*")

    class _C:
        def __enter__(self) -> None:
            return None

        def __exit__(self, *a: Any) -> None:
            ctx.__exit__(*a)

    return _C()


def test_faults_are_really_injected(tmp_path: Path) -> None:
    """Guards the tests above: the reference moves the parameters, and without the guard the same faults
    poison the run (so "equal to the reference" above is a real statement)."""
    build = _build_regression("AdamW", "loss-nan")
    ref, _, _, _ = manual_reference(build, _regression_batches(), "32-true", BAD)
    torch.manual_seed(0)
    init = build()
    assert any(not torch.equal(p, q) for p, q in zip(ref.parameters(), init.parameters()))
    assert math.isfinite(float(sum(p.sum() for p in ref.parameters())))
    poisoned, _, _, _ = manual_reference(build, _regression_batches(), "32-true", ())
    assert not math.isfinite(float(sum(p.sum() for p in poisoned.parameters())))
    unguarded, _ = _fit(build, _regression_batches(), "32-true", tmp_path, [])
    assert not all(torch.isfinite(p).all() for p in unguarded.parameters())
