"""Shared helpers of the reliability suite: "works with finite output, or refuses clearly"."""

from __future__ import annotations

import math
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


def wrong_type(*values: Any) -> bool:
    """Any of ``values`` is of the wrong kind altogether (None, a bool, a list, a non-numeric junk string where a
    number is expected): then any TypeError/ValueError is a fine refusal, whatever its message."""
    return any(
        v is None or isinstance(v, (bool, list, dict)) or type(v) is object
        or (isinstance(v, str) and v in ("4", "abc"))
        for v in values
    )


def works_or_refuses(
    fn: Callable[[], Any], names: str | Sequence[str], *, check_finite: bool = True, lenient: bool = False
) -> Any:
    """Run ``fn``: it must return finite tensors, or raise ValueError/TypeError naming one of ``names``.

    With ``lenient=True`` (the value under test is not even a number, e.g. ``"abc"`` for a count) any
    ValueError/TypeError is accepted, whatever its message: Python itself answers type misuse that way.

    Anything else (IndexError, RuntimeError from a torch op, ZeroDivisionError, a NaN in the output) fails
    the test with the exception or the offending output. Returns ``fn()``'s value, or None when it refused.
    """
    names = [names] if isinstance(names, str) else list(names)
    try:
        out = fn()
    except (ValueError, TypeError) as exc:
        msg = str(exc).lower()
        if not lenient and not any(n.lower() in msg for n in names):
            pytest.fail(f"{type(exc).__name__} does not name the parameter (one of {names}): {exc}")
        return None
    except Exception as exc:
        # A deliberate error raised by our own code that names the parameter is a clear refusal too (e.g. an
        # option that only fails at backward, or a solver's step cap); one raised inside torch/numpy is not.
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        ours = tb is not None and "lightning_tiger" in tb.tb_frame.f_code.co_filename
        if ours and isinstance(exc, (RuntimeError, NotImplementedError)) and any(n.lower() in str(exc).lower()
                                                                                for n in names):
            return None
        pytest.fail(f"crashed with {type(exc).__name__} instead of a clear ValueError/TypeError: {exc}")
    if check_finite:
        for t in _flatten(out):
            if t.is_floating_point() or t.is_complex():
                assert torch.isfinite(t).all(), f"non-finite output {t.flatten()[:8]} (shape {tuple(t.shape)})"
    return out


def is_finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
