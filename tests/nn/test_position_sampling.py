"""random_positions (Su, "Transformer升级之路：8"; Ruoss et al. 2023)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_tiger.nn.position_sampling import random_positions


def test_sorted_int_properties():
    g = torch.Generator().manual_seed(0)
    pos = random_positions(64, 40, 2048, generator=g)
    assert pos.shape == (64, 40) and pos.dtype == torch.int64
    assert (pos[:, 1:] > pos[:, :-1]).all()  # sorted and distinct
    assert pos.min() >= 0 and pos.max() <= 2047


def test_sorted_int_is_uniform_over_subsets():
    # each of L values is included with probability N/L
    g = torch.Generator().manual_seed(1)
    L, N, B = 20, 5, 20000
    pos = random_positions(B, N, L, generator=g)
    freq = torch.bincount(pos.flatten(), minlength=L).double() / B
    torch.testing.assert_close(freq, torch.full((L,), N / L, dtype=torch.float64), atol=0.015, rtol=0)
    # the full range is a permutation: positions 0..L-1
    full = random_positions(3, L, L, generator=g)
    assert (full == torch.arange(L)).all()


def test_equal_mean_float_variant():
    g = torch.Generator().manual_seed(2)
    N, L, B = 40, 100_000, 20000
    pos = random_positions(B, N, L, mode="equal_mean_float", generator=g)
    assert pos.dtype == torch.float32 and pos.shape == (B, N)
    assert (pos[:, 0] == 0).all() and (pos[:, 1:] >= pos[:, :-1]).all()
    n = pos[:, -1].double()
    # linspace(0, 1, N)·n: evenly spaced
    torch.testing.assert_close(pos.double(), torch.linspace(0, 1, N, dtype=torch.float64)[None] * n[:, None],
                               rtol=1e-5, atol=1e-4)
    assert n.mean().item() == pytest.approx(N, rel=0.03)  # exponential with mean N
    assert n.std().item() == pytest.approx(N, rel=0.05)
    # capped at L - 1: E[min(n, L-1)] = N(1 - exp(-(L-1)/N))
    capped = random_positions(B, N, 41, mode="equal_mean_float", generator=g)[:, -1].double()
    assert capped.max() <= 40
    assert capped.mean().item() == pytest.approx(N * (1 - math.exp(-40 / N)), rel=0.03)


@pytest.mark.parametrize(
    "args,kwargs,match",
    [((0, 4, 10), {}, "batch"), ((2, 0, 10), {}, "seq_len"), ((2, 4, 0), {}, "max_position"),
     ((2, 11, 10), {}, "max_position"), ((2, 4, 10), {"mode": "float"}, "mode")],
)
def test_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        random_positions(*args, **kwargs)


def test_package_attribute_is_the_function_even_after_submodule_import() -> None:
    import importlib

    importlib.import_module("lightning_tiger.nn.position_sampling")
    from lightning_tiger.nn import random_positions as fn

    assert callable(fn) and fn.__name__ == "random_positions"
