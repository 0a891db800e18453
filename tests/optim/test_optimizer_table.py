"""What every optimizer of the package must do, driven by one table (like torch's ``OptimizerInfo``).

Each :class:`OptimInfo` row names an optimizer, how to build it on ``Mixed`` (tests/optim/reference.py), its
momentum state key, its group-level counter (if any), whether it has a non-finite rule, and its bad-hyperparameter
cases. The
tests cross the table with the paths (single tensor, foreach, fused) and momentum dtypes:

- resume: a ``state_dict`` round trip through ``torch.save`` mid-run continues bit for bit;
- deepcopy / pickle keep the settings and the state;
- bad hyperparameters: each error names the parameter (and the range where the message states one);
- path flags: ``fused=True`` refuses (at construction where the kernels are missing, at ``step()`` before anything
  moves where a tensor does not qualify), ``fused=True`` with ``foreach=True`` or ``compensation="kahan"``.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

from lightning_tiger.optim import Lion, Tiger, tiger_param_groups
from tests.optim.reference import PATHS, Mixed, fused_ok, random_grads

Case = tuple[dict[str, Any], type[Exception], str]


@dataclass(frozen=True)
class OptimInfo:
    """One optimizer of the table."""

    name: str
    cls: type[torch.optim.Optimizer]
    build: Callable[[nn.Module, dict[str, Any]], torch.optim.Optimizer]
    momentum_key: str
    counter: str | None  # a group-level int that step() advances ("micro_step"), None if none
    nonfinite_rule: bool  # keeps the state finite on a NaN gradient (then the resume run injects one)
    other_group: dict[str, Any] = field(default_factory=dict)  # options of a second group with other coefficients
    invalid: list[Case] = field(default_factory=list)
    invalid_groups: list[tuple[dict[str, Any], str]] = field(default_factory=list)


COMMON_INVALID: list[Case] = [
    ({"lr": -1e-3}, ValueError, r"lr must be in \[0"),
    ({"lr": math.nan}, ValueError, "lr"),
    ({"lr": math.inf}, ValueError, "lr"),
    ({"lr": "1e-3"}, TypeError, "lr must be a float"),
    ({"weight_decay": -0.01}, ValueError, "weight_decay"),
    ({"momentum_dtype": torch.int32}, ValueError, "momentum_dtype"),
    ({"momentum_dtype": "float99"}, ValueError, "momentum_dtype"),
    ({"momentum_dtype": "int8"}, ValueError, "momentum_dtype"),
    ({"foreach": "yes"}, TypeError, "foreach"),
    ({"fused": 1}, TypeError, "fused"),
    ({"fused": True, "foreach": True}, ValueError, "mutually exclusive"),
    ({"fused": True, "compensation": "kahan"}, ValueError, "compensation='kahan' runs in PyTorch"),
    ({"compensation": "fp32"}, ValueError, r"compensation must be None or 'kahan'"),
    ({"seed": -1}, TypeError, "seed must be None or an int >= 0"),
    ({"stochastic_rounding": 1}, TypeError, "stochastic_rounding"),
]

OPTIM_INFOS = [
    OptimInfo(
        name="tiger",
        cls=Tiger,
        build=lambda model, kw: Tiger(tiger_param_groups(model), **{"lr": 2e-2, "beta": 0.9,
                                                                    "grad_accum_steps": 3, **kw}),
        momentum_key="momentum",
        counter="micro_step",
        nonfinite_rule=True,
        other_group={"beta": 0.5},
        invalid=[
            *COMMON_INVALID,
            ({"beta": 1.0}, ValueError, r"beta must be in \[0.0, 1.0\)"),
            ({"beta": -0.1}, ValueError, "beta"),
            ({"grad_accum_steps": 0}, ValueError, "grad_accum_steps must be an int >= 1"),
            ({"grad_accum_steps": 2.0}, ValueError, "grad_accum_steps"),
            ({"grad_accum_steps": True}, ValueError, "grad_accum_steps"),
            ({"shrink_ratio": 0.0}, ValueError, r"shrink_ratio must be in \(0.0, 1.0\]"),
            ({"shrink_ratio": 1.01}, ValueError, "shrink_ratio"),
            ({"rms_floor": -1.0}, ValueError, "rms_floor"),
            ({"rms_floor": math.inf}, ValueError, "rms_floor"),
            ({"fold_in_backward": 1}, TypeError, "fold_in_backward"),
            ({"exact_nonfinite": "no"}, TypeError, "exact_nonfinite"),
            ({"rms_cache": None}, TypeError, "rms_cache"),
        ],
        invalid_groups=[
            ({"lr": -1.0}, r"lr \(param group 1\)"), ({"beta": 2.0}, "beta"),
            ({"grad_accum_steps": -3}, "grad_accum"),
            ({"shrink_ratio": -0.5}, "shrink_ratio"), ({"kind": "weights"}, "'kind' must be one of"),
            ({"weight_decay": -1.0}, "weight_decay"), ({"rms_floor": -0.1}, "rms_floor"),
            ({"micro_step": -1}, "micro_step must be an int >= 0"), ({"micro_step": 1.5}, "micro_step"),
        ],
    ),
    OptimInfo(
        name="lion",
        cls=Lion,
        build=lambda model, kw: Lion(model.parameters(), **{"lr": 1e-2, "weight_decay": 0.1, **kw}),
        momentum_key="exp_avg",
        counter=None,
        nonfinite_rule=False,
        other_group={"betas": (0.5, 0.6)},
        invalid=[
            *COMMON_INVALID,
            ({"betas": (1.0, 0.99)}, ValueError, r"betas\[0\] must be in \[0.0, 1.0\)"),
            ({"betas": (0.9, -0.1)}, ValueError, r"betas\[1\]"),
            ({"betas": (0.9,)}, ValueError, "betas"),
            ({"betas": 0.9}, ValueError, "betas"),
        ],
        invalid_groups=[({"lr": -2.0}, r"lr \(param group 1\)"),
                        ({"betas": (0.5, 1.5)}, r"betas\[1\] \(param group 1\)"),
                        ({"weight_decay": -1.0}, r"weight_decay \(param group 1\)")],
    ),
]
INFO_PARAMS = [pytest.param(s, id=s.name) for s in OPTIM_INFOS]


def _train(model: nn.Module, opt: torch.optim.Optimizer, grads: list[dict[str, torch.Tensor]], info: OptimInfo,
           start: int, stop: int) -> None:
    params = dict(model.named_parameters())
    for t in range(start, stop):
        for n, p in params.items():
            p.grad = grads[t][n].to(p.dtype)
        if t == 6 and info.nonfinite_rule:
            params["ln.weight"].grad[0] = math.nan  # the non-finite rule also resumes exactly
        opt.step()


@pytest.mark.parametrize("momentum_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("info", INFO_PARAMS)
def test_exact_resume(info: OptimInfo, path: dict, momentum_dtype: torch.dtype | None) -> None:
    """Stop after 5 of 10 steps (mid-window for Tiger's windows of 3), save, load into a fresh optimizer, finish:
    parameters and momenta equal those of the uninterrupted run bit for bit; the momentum keeps its dtype."""
    if path.get("fused") and momentum_dtype is not None:
        from lightning_tiger.optim import _fused

        if not _fused.fused_supports(torch.float32, momentum_dtype):
            pytest.skip("the fused kernels do not take this momentum dtype (refusal tested elsewhere)")

    def make() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = Mixed()
        return model, info.build(model, {"momentum_dtype": momentum_dtype, **path})

    grads = random_grads(Mixed(), 10)
    model_a, opt_a = make()
    _train(model_a, opt_a, grads, info, 0, 10)

    model_b, opt_b = make()
    _train(model_b, opt_b, grads, info, 0, 5)
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    model_c, opt_c = make()
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    if info.counter is not None:
        assert all(g[info.counter] == 5 for g in opt_c.param_groups)
    _train(model_c, opt_c, grads, info, 5, 10)
    for (n, pa), pc in zip(model_a.named_parameters(), model_c.parameters()):
        assert torch.equal(pa, pc), n
        ma, mc = opt_a.state[pa][info.momentum_key], opt_c.state[pc][info.momentum_key]
        assert mc.dtype == (momentum_dtype or pa.dtype)
        assert torch.equal(ma, mc), n


@pytest.mark.parametrize("info", INFO_PARAMS)
def test_deepcopy_and_pickle_keep_settings_and_state(info: OptimInfo) -> None:
    torch.manual_seed(0)
    model = Mixed()
    opt = info.build(model, {"momentum_dtype": "bfloat16", "foreach": True, "seed": 7})
    for n, p in model.named_parameters():
        p.grad = random_grads(model, 1)[0][n].float()
    opt.step()
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert type(clone) is info.cls
        assert clone.momentum_dtype is torch.bfloat16 and clone.foreach is True and clone.seed == 7
        assert clone.fused is None and clone.stochastic_rounding is True
        assert {k: clone.defaults[k] for k in opt.defaults} == opt.defaults  # torch's setstate may add keys
        for (p, st), (q, st2) in zip(opt.state.items(), clone.state.items()):
            assert q is not p and torch.equal(q, p)
            assert torch.equal(st[info.momentum_key], st2[info.momentum_key])


def test_deepcopy_of_a_folding_tiger_drops_the_hooks() -> None:
    """A copy holds other tensors than the hooked ones, so it starts in the standard mode."""
    model = Mixed()
    opt = Tiger(model.parameters(), momentum_dtype="bfloat16", foreach=True, fold_in_backward=True)
    clone = copy.deepcopy(opt)
    assert clone.momentum_dtype is torch.bfloat16 and clone.foreach is True
    assert not clone._hooks.active and opt._hooks.active


@pytest.mark.parametrize(("info", "kwargs", "exc", "match"),
                         [pytest.param(s, *case, id=f"{s.name}-{i}") for s in OPTIM_INFOS
                          for i, case in enumerate(s.invalid)])
def test_invalid_hyperparameters(info: OptimInfo, kwargs: dict, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        info.cls([nn.Parameter(torch.ones(2))], **kwargs)


@pytest.mark.parametrize(("info", "group", "match"),
                         [pytest.param(s, g, m, id=f"{s.name}-{i}") for s in OPTIM_INFOS
                          for i, (g, m) in enumerate(s.invalid_groups)])
def test_invalid_group_values(info: OptimInfo, group: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        info.cls([{"params": [nn.Parameter(torch.ones(2))]}, {"params": [nn.Parameter(torch.ones(2))], **group}])


@pytest.mark.parametrize("info", INFO_PARAMS)
def test_fused_true_unavailable_raises(info: OptimInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    if fused_ok():
        from lightning_tiger.optim import _fused

        monkeypatch.setattr(_fused, "fused_available", lambda device=None: False)
    with pytest.raises(RuntimeError, match="fused=True"):
        info.cls([nn.Parameter(torch.ones(2))], fused=True)


@pytest.mark.skipif(not fused_ok(), reason="fused kernels unavailable")
@pytest.mark.parametrize("info", INFO_PARAMS)
def test_refused_fused_step_changes_nothing(info: OptimInfo) -> None:
    """fused=True with a tensor the kernels do not take raises at step(), before any state moves."""
    good, bad = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(4, 4).t())  # bad: non-contiguous grad
    opt = info.cls([{"params": [good]}, {"params": [bad], **info.other_group}], fused=True)
    good.grad, bad.grad = torch.ones(3), torch.ones(4, 4).t()
    before = [p.detach().clone() for p in (good, bad)]
    with pytest.raises(RuntimeError, match="fused=True"):
        opt.step()
    if info.counter is not None:
        assert [g[info.counter] for g in opt.param_groups] == [0, 0]
    assert all(torch.equal(p, q) for p, q in zip((good, bad), before))
