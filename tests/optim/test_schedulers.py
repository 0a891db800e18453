"""PiecewiseLinearLR against the official piecewise_linear (tests/optim/reference.py)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from lightning_tiger.optim.schedulers import PiecewiseLinearLR
from lightning_tiger.optim.tiger import Tiger
from tests.optim.reference import reference_piecewise_linear

OFFICIAL = {40000: 1, 160000: 0.5, 640000: 0.1, 1280000: 0.01}


def _opt(lr: float = 2e-3) -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)


def test_official_schedule_at_and_between_knots() -> None:
    sched = PiecewiseLinearLR(_opt(), OFFICIAL)
    for t in (0, 1, 20000, 40000, 100000, 160000, 400000, 640000, 1000000, 1280000, 5000000):
        assert sched.multiplier(t) == pytest.approx(reference_piecewise_linear(t, OFFICIAL), rel=1e-12)
    assert sched.multiplier(0) == 0.0
    assert sched.multiplier(20000) == pytest.approx(0.5)
    assert sched.multiplier(100000) == pytest.approx(0.75)
    assert sched.multiplier(2_000_000) == pytest.approx(0.01)


def test_lr_follows_steps_and_base_lrs_per_group() -> None:
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.1}])
    schedule = {4: 1.0, 8: 0.5}
    sched = PiecewiseLinearLR(opt, schedule)
    for t in range(12):
        expect = reference_piecewise_linear(t, schedule)
        assert opt.param_groups[0]["lr"] == pytest.approx(1.0 * expect)
        assert opt.param_groups[1]["lr"] == pytest.approx(0.1 * expect)
        opt.step()
        sched.step()


def test_string_keys_from_yaml_and_from_zero_false() -> None:
    sched = PiecewiseLinearLR(_opt(), {"10": "1.0", " 20 ": 0.5, 30.0: 0.25}, from_zero=False)
    ref = {10: 1.0, 20: 0.5, 30: 0.25}
    for t in (0, 5, 10, 15, 20, 25, 30, 99):
        assert sched.multiplier(t) == pytest.approx(reference_piecewise_linear(t, ref, from_zero=False))
    assert sched.multiplier(0) == 1.0  # first value holds before the first key
    assert PiecewiseLinearLR(_opt(), {0: 0.2, 10: 1.0}).multiplier(0) == pytest.approx(0.2)  # key 0: no (0, 0)
    unsorted = PiecewiseLinearLR(_opt(), {"100": 0.1, "10": 1})
    assert unsorted.multiplier(55) == pytest.approx(reference_piecewise_linear(55, {10: 1, 100: 0.1}))


def test_list_of_pairs_as_in_cli_configs() -> None:
    sched = PiecewiseLinearLR(_opt(), [[0, 0.0], ["50", 1.0], (200, 0.1)])
    ref = {0: 0.0, 50: 1.0, 200: 0.1}
    for t in (0, 25, 50, 125, 200, 300):
        assert sched.multiplier(t) == pytest.approx(reference_piecewise_linear(t, ref))
    with pytest.raises(ValueError, match="list of"):
        PiecewiseLinearLR(_opt(), [[0, 0.0, 1.0]])


def test_state_dict_round_trip() -> None:
    opt = _opt(1.0)
    sched = PiecewiseLinearLR(opt, {10: 1.0, 20: 0.1})
    for _ in range(7):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = _opt(1.0)
    sched2 = PiecewiseLinearLR(opt2, {"10": 1, 20: "0.1"})  # the same knots, spelled as YAML would
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same knots: nothing to report
        sched2.load_state_dict(state)
    for _ in range(10):
        opt.step()
        sched.step()
        opt2.step()
        sched2.step()
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_resume_follows_the_new_knots_and_says_so() -> None:
    """A run resumed with a longer max_steps: the knots come from the new config, not from the checkpoint."""
    old, new = {3: 1.0, 10: 0.1}, {3: 1.0, 20: 0.1}
    opt = _opt(1.0)
    sched = PiecewiseLinearLR(opt, old)
    for _ in range(7):
        opt.step()
        sched.step()
    opt2 = _opt(1.0)
    opt2.load_state_dict(opt.state_dict())  # Lightning restores the optimizer first, then the scheduler
    sched2 = PiecewiseLinearLR(opt2, new)
    with pytest.warns(UserWarning, match=r"step 7 with knots \[\(0, 0\.0\), \(3, 1\.0\), \(20, 0\.1\)\].*"
                      r"checkpoint's \[\(0, 0\.0\), \(3, 1\.0\), \(10, 0\.1\)\]"):
        sched2.load_state_dict(sched.state_dict())
    assert sched2.points == [(0, 0.0), (3, 1.0), (20, 0.1)]
    for t in range(7, 25):
        assert opt2.param_groups[0]["lr"] == pytest.approx(reference_piecewise_linear(t, new), rel=1e-12), t
        opt2.step()
        sched2.step()


def test_tiger_lr_schedule_counts_micro_steps() -> None:
    # Official code: lr_t = α·schedule(t) on the last micro-step t of each window (t counts micro-steps).
    p = nn.Parameter(torch.ones(4))
    opt = Tiger([{"params": [p], "kind": "bias"}], lr=0.1, grad_accum_steps=2, weight_decay=0.0)
    sched = PiecewiseLinearLR(opt, {4: 1.0})
    expected = 1.0
    for t in range(6):
        p.grad = -torch.ones(4)
        opt.step()
        sched.step()
        if (t + 1) % 2 == 0:
            expected += 0.5 * 0.1 * reference_piecewise_linear(t, {4: 1.0})
        torch.testing.assert_close(p.detach(), torch.full((4,), expected))


@pytest.mark.parametrize(
    ("schedule", "match"),
    [
        ({}, "non-empty"),
        ([(1, 1.0, 2.0)], "list of"),
        ({-1: 1.0}, ">= 0"),
        ({1.5: 1.0}, "integers"),
        ({"ten": 1.0}, "integer steps"),
        ({"10": 1.0, 10: 0.5}, "twice"),
        ({10: -0.1}, ">= 0"),
        ({10: math.nan}, "finite"),
        ({10: "high"}, "floats"),
        ({True: 1.0}, "integers"),
    ],
)
def test_invalid_schedules(schedule: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PiecewiseLinearLR(_opt(), schedule)  # type: ignore[arg-type]


def test_from_zero_must_be_bool() -> None:
    with pytest.raises(TypeError, match="from_zero"):
        PiecewiseLinearLR(_opt(), {1: 1.0}, from_zero="yes")  # type: ignore[arg-type]
