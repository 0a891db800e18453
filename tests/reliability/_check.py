"""Shared helpers of the reliability suite: "works with finite output, or refuses clearly"."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pytest
import torch
from hypothesis import strategies as st

NAN, INF = float("nan"), float("inf")

#: floats a user can type into a config: ordinary magnitudes, signed zeros, and the non-finite ones.
any_float = st.one_of(
    st.floats(-1e3, 1e3, allow_nan=False),
    st.sampled_from([NAN, INF, -INF, 0.0, -0.0, 1e-30, -1e-30, 1.0, 0.999999]),
)
#: ints (and things that are not ints) a user can type for a count.
any_int = st.one_of(st.integers(-3, 40), st.sampled_from([0, -1, True, 2.5, "4", None]))
#: values of the wrong type entirely.
junk = st.sampled_from([None, "abc", [1], {"a": 1}, True, object()])


def _flatten(out: Any) -> Iterable[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, dict):
        for v in out.values():
            yield from _flatten(v)
    elif isinstance(out, (list, tuple)):
        for v in out:
            yield from _flatten(v)
    elif isinstance(out, torch.nn.Module):
        yield from (p.detach() for p in out.parameters())
    elif isinstance(out, float):
        yield torch.tensor(out)


def is_int(v: Any, low: int | None = None, high: int | None = None) -> bool:
    """``v`` is an int (not a bool) in ``[low, high]``."""
    return type(v) is int and (low is None or v >= low) and (high is None or v <= high)


def is_real(v: Any, low: float | None = None, high: float | None = None, *, low_open: bool = False,
            high_open: bool = False) -> bool:
    """``v`` is a finite real number (int or float, not a bool) in the given range."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return False
    if low is not None and (v <= low if low_open else v < low):
        return False
    return high is None or (v < high if high_open else v <= high)


def works_or_refuses(
    fn: Callable[[], Any], names: str | Sequence[str], *, valid: bool, check_finite: bool = True
) -> Any:
    """Run ``fn`` and check the outcome the documented accepted ranges predict.

    ``valid=True`` (every argument within its documented range): ``fn`` must return, with finite tensors; any
    exception is a valid value wrongly refused. ``valid=False``: ``fn`` must raise ``ValueError``/``TypeError``
    whose message names one of ``names`` as a word (the parameters at fault, not a broad word); returning is a bad value
    wrongly accepted, and any other exception a crash. Returns ``fn()``'s value, or None when it refused.
    """
    names = [names] if isinstance(names, str) else list(names)
    try:
        out = fn()
    except (ValueError, TypeError) as exc:
        if valid:
            pytest.fail(f"a valid call was refused with {type(exc).__name__}: {exc}")
        msg = str(exc).lower()
        # the name as a whole word ("x" must not match "max", "dim" not "head_dim")
        if not any(re.search(rf"(?<![a-z0-9_]){re.escape(n.lower())}(?![a-z0-9_])", msg) for n in names):
            pytest.fail(f"{type(exc).__name__} does not name the parameter (one of {names}): {exc}")
        return None
    except Exception as exc:
        pytest.fail(f"crashed with {type(exc).__name__} instead of {'working' if valid else 'a clear refusal'}: {exc}")
    if not valid:
        pytest.fail(f"an invalid value was accepted (expected a ValueError/TypeError naming one of {names})")
    if check_finite:
        for t in _flatten(out):
            if t.is_floating_point() or t.is_complex():
                assert torch.isfinite(t).all(), f"non-finite output {t.flatten()[:8]} (shape {tuple(t.shape)})"
    return out


def is_finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
