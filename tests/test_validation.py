"""lightning_tiger.validation: accepted values come back converted, refused ones raise an error naming the parameter
and the accepted range."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_tiger.validation import check_bool, check_int, check_int_sequence, check_real


@pytest.mark.parametrize(("value", "kw", "expected"), [
    (3, {"low": 1}, 3), (1, {"low": 1}, 1), (0, {"low": 0, "high": 0}, 0), (-5, {}, -5),
    (np.int64(7), {"low": 1}, 7), (None, {"allow_none": True}, None),
])
def test_check_int_accepts(value, kw, expected):
    out = check_int("n", value, **kw)
    assert out == expected and (out is None or type(out) is int)


@pytest.mark.parametrize(("value", "kw", "exc", "fragment"), [
    (True, {"low": 1}, TypeError, "n must be an int in [1, inf)"),  # bool subclasses int: refused
    (False, {}, TypeError, "n must be an int"),
    ("4", {"low": 1}, TypeError, "'4'"),  # never a raw "'<' not supported between 'str' and 'int'"
    (2.5, {"low": 1}, TypeError, "2.5"),
    (4.0, {"low": 1}, TypeError, "float"),
    (None, {"low": 1}, TypeError, "NoneType"),
    (0, {"low": 1}, ValueError, "n must be an int in [1, inf), got 0"),
    (5, {"low": 1, "high": 4}, ValueError, "[1, 4]"),
    (None, {"low": 2, "allow_none": False}, TypeError, "n must be an int in [2, inf)"),
    ("x", {"low": 1, "allow_none": True}, TypeError, "n must be None or an int"),
])
def test_check_int_refuses(value, kw, exc, fragment):
    with pytest.raises(exc) as info:
        check_int("n", value, **kw)
    assert fragment in str(info.value)


@pytest.mark.parametrize(("value", "kw", "expected"), [
    (0.5, {"low": 0, "high": 1}, 0.5), (0, {"low": 0}, 0.0), (1, {"low": 0, "high": 1}, 1.0),
    (np.float32(0.25), {}, 0.25), (None, {"allow_none": True}, None), (-1e300, {}, -1e300),
])
def test_check_real_accepts(value, kw, expected):
    out = check_real("lr", value, **kw)
    assert out == expected and (out is None or type(out) is float)


@pytest.mark.parametrize(("value", "kw", "exc", "fragment"), [
    (math.nan, {}, ValueError, "lr must be a finite number in (-inf, inf), got nan"),
    (math.inf, {"low": 0, "low_open": True}, ValueError, "(0, inf)"),
    (-math.inf, {}, ValueError, "got -inf"),
    (0.0, {"low": 0, "low_open": True}, ValueError, "(0, inf)"),
    (1.0, {"low": 0, "high": 1, "high_open": True}, ValueError, "[0, 1)"),
    (-1e-12, {"low": 0}, ValueError, "[0, inf)"),
    (True, {}, TypeError, "lr must be a finite number"),
    ("0.1", {}, TypeError, "'0.1'"),
    ([0.1], {}, TypeError, "list"),
])
def test_check_real_refuses(value, kw, exc, fragment):
    with pytest.raises(exc) as info:
        check_real("lr", value, **kw)
    assert fragment in str(info.value)


@pytest.mark.parametrize(("value", "kw", "expected"), [
    ((8, 16), {"low": 1}, (8, 16)), ([64], {"low": 1}, (64,)), ((), {"non_empty": False}, ()),
    ((np.int64(3), 1), {}, (3, 1)), ((4, 4), {}, (4, 4)),
])
def test_check_int_sequence_accepts(value, kw, expected):
    out = check_int_sequence("lengths", value, **kw)
    assert out == expected and all(type(v) is int for v in out)


@pytest.mark.parametrize(("value", "kw", "exc", "fragment"), [
    ("64", {"low": 1}, TypeError, "'64'"),  # a string is not read as ('6', '4')
    (64, {"low": 1}, TypeError, "lengths must be a non-empty sequence of ints in [1, inf)"),
    ((8.5,), {"low": 1}, TypeError, "entry 0 is 8.5"),  # not truncated to 8
    ((8, True), {"low": 1}, TypeError, "entry 1 is True"),
    ((), {"low": 1}, ValueError, "got an empty tuple"),
    ((8, 0), {"low": 1}, ValueError, "(8, 0)"),
    ((8, 8), {"low": 1, "distinct": True}, ValueError, "repeated"),
])
def test_check_int_sequence_refuses(value, kw, exc, fragment):
    with pytest.raises(exc) as info:
        check_int_sequence("lengths", value, **kw)
    assert fragment in str(info.value)


def test_check_real_returns_positive_zero_for_negative_zero():
    out = check_real("noise", -0.0, low=0.0)
    assert out == 0.0 and math.copysign(1.0, out) == 1.0


@pytest.mark.parametrize(("value", "kw", "exc", "message"), [
    (-0.001, {"low": 0.0, "high_open": True}, ValueError, "lr must be in [0.0, inf), got -0.001"),  # quoted by README
    (1.5, {"low": 0.0, "high": 1.0, "high_open": True}, ValueError, "lr must be in [0.0, 1.0), got 1.5"),
    (0.0, {"low": 0.0, "high": 1.0, "low_open": True}, ValueError, "lr must be in (0.0, 1.0], got 0.0"),
    (math.nan, {"low": 0.0}, ValueError, "lr must be in [0.0, inf), got nan"),
    ("1e-3", {"low": 0.0}, TypeError, "lr must be a float, got str"),
    (None, {"low": 0.0, "allow_none": False}, TypeError, "lr must be a float, got NoneType"),
])
def test_check_real_brief_messages(value, kw, exc, message):
    """The optimizers' message format (was a second checker in optim/_functional.py)."""
    with pytest.raises(exc) as info:
        check_real("lr", value, brief=True, **kw)
    assert str(info.value) == message


def test_check_real_reads_a_one_element_tensor_only_when_allowed():
    assert check_real("lr", torch.tensor(0.5), allow_tensor=True) == 0.5
    assert check_real("lr", torch.tensor([2.0]), allow_tensor=True, low=0.0) == 2.0
    with pytest.raises(TypeError, match="lr must be a finite number"):
        check_real("lr", torch.tensor(0.5))
    with pytest.raises(TypeError):  # a tensor that requires grad is refused, not silently detached
        check_real("lr", torch.tensor(0.5, requires_grad=True), allow_tensor=True)
    with pytest.raises(TypeError):  # and so is a tensor with several elements
        check_real("lr", torch.ones(2), allow_tensor=True)
    with pytest.raises(ValueError, match=r"lr must be in \[0.0, inf\), got -1.0"):
        check_real("lr", torch.tensor(-1.0), low=0.0, allow_tensor=True, brief=True)


@pytest.mark.parametrize(("value", "kw", "ok"), [
    (True, {}, True), (False, {}, True), (None, {"allow_none": True}, True),
    (None, {}, False), (1, {}, False), (0, {"allow_none": True}, False), ("yes", {}, False),
])
def test_check_bool(value, kw, ok):
    if ok:
        assert check_bool("fused", value, **kw) is value
        return
    with pytest.raises(TypeError) as info:
        check_bool("fused", value, **kw)
    expected = "None or a bool" if kw.get("allow_none") else "a bool"
    assert str(info.value) == f"fused must be {expected}, got {value!r}"
