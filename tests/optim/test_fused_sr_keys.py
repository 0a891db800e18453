"""``sr_keys`` validation of the fused kernels: any integer-like key is accepted (``operator.index``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_tiger.optim import _fused

pytestmark = pytest.mark.skipif(not _fused.fused_available(), reason="fused C++ kernel not available")


def _step(key: object) -> torch.Tensor:
    p = torch.full((64,), 1.0 + 2**-9, dtype=torch.bfloat16)  # halfway-ish: stochastic rounding depends on the key
    g, m = torch.ones(64, dtype=torch.bfloat16), torch.zeros(64, dtype=torch.bfloat16)
    _fused.lion_step_([p], [g], [m], lr=2**-10, beta1=0.9, beta2=0.99, weight_decay=0.0, sr_keys=[key])
    return p


@pytest.mark.parametrize("key", [np.uint32(12345), np.int64(12345), np.uint64(12345)])
def test_numpy_integer_keys_are_accepted_and_equal_int_keys(key: object) -> None:
    torch.testing.assert_close(_step(key), _step(12345), rtol=0, atol=0)


@pytest.mark.parametrize("key", [1.0, np.float32(3.0), True, np.int64(-1), np.uint64(2**32), "7"])
def test_non_integer_or_out_of_range_keys_raise(key: object) -> None:
    with pytest.raises(ValueError, match=r"sr_keys\[0\] must be an int in \[0, 2\*\*32\)"):
        _step(key)
