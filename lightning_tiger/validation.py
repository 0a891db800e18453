"""Argument checks shared by every layer: a clear ``TypeError``/``ValueError`` that names the parameter and its
accepted range, instead of a raw ``'<' not supported between 'str' and 'int'`` or a crash deep inside torch; and
:func:`user_stacklevel`, so that a warning points at the user's line.

This module imports nothing from the package, so any layer (``nn``, ``data``, ``metrics``, ``modules``) may use it.

Why ``bool`` is refused where an int is expected: ``bool`` subclasses ``int`` in Python, so ``num_heads=True`` would
silently mean 1 (and ``torch.manual_seed(True)`` fails deep inside torch); a bool there is always a typo or a
misplaced flag.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
from collections.abc import Iterable
from typing import Any

__all__ = ["check_bool", "check_int", "check_int_sequence", "check_real", "user_stacklevel"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def user_stacklevel(*skip_modules: str) -> int:
    """The ``stacklevel`` for ``warnings.warn`` that points at the first frame outside this package (and outside
    the top-level packages named in ``skip_modules``, e.g. ``"torch"`` for a warning raised under
    ``optimizer.step()``'s wrappers), counted from the caller of this function.

    Args:
        skip_modules: names of other top-level packages whose frames are skipped too.

    Returns:
        An int >= 1 for ``warnings.warn(..., stacklevel=...)`` called right after this function, in its caller.
    """
    skipped = tuple(
        os.path.dirname(os.path.abspath(m.__file__)) + os.sep
        for m in (sys.modules.get(name) for name in skip_modules) if m is not None and getattr(m, "__file__", None)
    )
    frame = sys._getframe(1)  # the caller: stacklevel 1
    level = 1
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if not path.startswith(_PACKAGE_DIR) and not path.startswith(skipped):
            return level
        frame = frame.f_back
        level += 1
    return 1


def _range(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    lo = "-inf" if low is None else low
    hi = "inf" if high is None else high
    return f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None,
              allow_none: bool = False) -> int | None:
    """``value`` as a Python ``int`` if it is an integer (not a bool) in ``[low, high]``.

    Args:
        name: the parameter's name, used in the error message.
        value: the value to check; any ``numbers.Integral`` (e.g. a NumPy integer) is accepted, a ``bool`` is not.
        low: smallest accepted value (None: unbounded).
        high: largest accepted value (None: unbounded).
        allow_none: accept ``None`` (and return it).

    Returns:
        ``int(value)``, or None for an allowed None.

    Raises:
        TypeError: ``value`` is not an integer (a bool, a float such as 2.5, a string such as ``"4"``).
        ValueError: ``value`` is outside ``[low, high]``.
    """
    if value is None and allow_none:
        return None
    expected = f"{'None or ' if allow_none else ''}an int in {_range(low, high, False, False)}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be {expected}, got {value}")
    return value


def check_real(name: str, value: Any, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False, allow_none: bool = False,
               allow_tensor: bool = False, brief: bool = False) -> float | None:
    """``value`` as a ``float`` if it is a finite real number (not a bool) in the given range.

    Args:
        name: the parameter's name, used in the error message.
        value: the value to check; any ``numbers.Real`` (int, float, NumPy scalar) is accepted, a ``bool`` is not.
        low: lower bound (None: unbounded).
        high: upper bound (None: unbounded).
        low_open: exclude ``low`` itself.
        high_open: exclude ``high`` itself.
        allow_none: accept ``None`` (and return it).
        allow_tensor: also accept a one-element tensor that does not require grad (read with ``.item()``, one
            host sync), as ``torch.optim`` accepts a tensor learning rate.
        brief: the optimizers' shorter messages (``"lr must be in [0.0, inf), got -0.001"``, ``"lr must be a
            float, got str"``), which the CLI's error output and the README quote.

    Returns:
        ``float(value)`` (``-0.0`` as ``0.0``: some consumers, e.g. NumPy's ``scale >= 0`` checks, refuse it), or
        None for an allowed None.

    Raises:
        TypeError: ``value`` is not a real number.
        ValueError: ``value`` is NaN, infinite or outside the range.
    """
    if value is None and allow_none:
        return None
    if allow_tensor and _is_scalar_tensor(value):
        value = value.item()
    rng = _range(low, high, low_open, high_open)
    expected = f"{'None or ' if allow_none else ''}{'' if brief else 'a finite number '}in {rng}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        if brief:
            raise TypeError(f"{name} must be {'None or ' if allow_none else ''}a float, got {type(value).__name__}")
        raise TypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")
    value = float(value)
    ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value}")
    return value + 0.0  # -0.0 + 0.0 == +0.0


def _is_scalar_tensor(value: Any) -> bool:
    # Duck-typed so that this module needs no torch import: a torch.Tensor with one element and no grad.
    numel = getattr(value, "numel", None)
    return callable(numel) and hasattr(value, "item") and numel() == 1 and not getattr(value, "requires_grad", True)


def check_bool(name: str, value: Any, *, allow_none: bool = False) -> bool | None:
    """``value`` if it is a ``bool`` (or None with ``allow_none``).

    Args:
        name: the parameter's name, used in the error message.
        value: the value to check; ints such as 0/1 are refused (a flag given a number is a typo).
        allow_none: accept ``None`` (and return it).

    Returns:
        ``value``, or None for an allowed None.

    Raises:
        TypeError: ``value`` is not a bool.
    """
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be {'None or ' if allow_none else ''}a bool, got {value!r}")
    return value


def check_int_sequence(name: str, value: Any, *, low: int | None = None, high: int | None = None,
                       non_empty: bool = True, distinct: bool = False) -> tuple[int, ...]:
    """``value`` as a tuple of ints if it is a list/tuple (or other non-string iterable) of integers in
    ``[low, high]``.

    A string is refused although it is iterable: ``"64"`` would otherwise be read as ``(6, 4)``.

    Args:
        name: the parameter's name, used in the error message.
        value: the sequence to check.
        low: smallest accepted entry (None: unbounded).
        high: largest accepted entry (None: unbounded).
        non_empty: refuse an empty sequence.
        distinct: refuse repeated entries.

    Returns:
        The entries as a tuple of Python ints, in order.

    Raises:
        TypeError: ``value`` is not a sequence, or an entry is not an integer.
        ValueError: the sequence is empty (with ``non_empty``), has repeats (with ``distinct``) or an entry is out
            of range.
    """
    what = f"a {'non-empty ' if non_empty else ''}sequence of{' distinct' if distinct else ''} ints in " \
           f"{_range(low, high, False, False)}"
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be {what}, got {value!r} ({type(value).__name__})")
    items = list(value)
    out = []
    for i, item in enumerate(items):
        if isinstance(item, bool) or not isinstance(item, numbers.Integral):
            raise TypeError(f"{name} must be {what}, got {value!r} (entry {i} is {item!r})")
        out.append(int(item))
    if non_empty and not out:
        raise ValueError(f"{name} must be {what}, got an empty {type(value).__name__}")
    bad = [v for v in out if (low is not None and v < low) or (high is not None and v > high)]
    if bad:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    if distinct and len(set(out)) != len(out):
        raise ValueError(f"{name} must be {what}, got repeated entries in {value!r}")
    return tuple(out)
