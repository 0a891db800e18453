"""ALiBi slopes (official rule of Press et al. 2022, ofirpress/attention_with_linear_biases) and bias matrices."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lightning_tiger.nn.alibi import ALiBi, alibi_slopes


def official_get_slopes(n: int) -> list[float]:
    """ofirpress/attention_with_linear_biases `get_slopes`, as published."""

    def get_slopes_power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        ratio = start
        return [start * ratio**i for i in range(n)]

    if math.log2(n).is_integer():
        return get_slopes_power_of_2(n)
    closest_power_of_2 = 2 ** math.floor(math.log2(n))
    return (
        get_slopes_power_of_2(closest_power_of_2)
        + official_get_slopes(2 * closest_power_of_2)[0::2][: n - closest_power_of_2]
    )


@pytest.mark.parametrize("n", range(1, 65))
def test_slopes_equal_official_rule(n):
    got = alibi_slopes(n)
    assert got.dtype == torch.float32 and got.shape == (n,)
    torch.testing.assert_close(got.double(), torch.tensor(official_get_slopes(n), dtype=torch.float64),
                               rtol=1e-7, atol=0)


def test_slopes_spec_examples():
    twelve = [2.0**-e for e in (1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5)]
    torch.testing.assert_close(alibi_slopes(12).double(), torch.tensor(twelve, dtype=torch.float64), rtol=1e-7, atol=0)
    assert not all(a > b for a, b in itertools.pairwise(twelve))  # not monotone
    torch.testing.assert_close(alibi_slopes(3).double(), torch.tensor([2**-4, 2**-8, 2**-2], dtype=torch.float64))
    torch.testing.assert_close(alibi_slopes(8).double(), torch.tensor([2.0 ** -(h + 1) for h in range(8)],
                                                                      dtype=torch.float64))
    assert alibi_slopes(1).item() == 2**-8


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("q_len,k_len", [(5, 5), (1, 9), (3, 7)])
def test_bias_matrix(causal, q_len, k_len):
    alibi = ALiBi(4, causal=causal)
    bias = alibi(q_len, k_len)
    assert bias.shape == (4, q_len, k_len) and bias.dtype == torch.float32
    m = official_get_slopes(4)
    for h in range(4):
        for i in range(q_len):
            qi = k_len - q_len + i  # the new queries are the last q_len keys (KV cache)
            for j in range(k_len):
                expect = -m[h] * ((qi - j) if causal else abs(qi - j))
                assert bias[h, i, j].item() == pytest.approx(expect, abs=1e-6)


def test_explicit_offset_and_positions():
    alibi = ALiBi(2)
    torch.testing.assert_close(alibi(2, 4, offset=10)[:, 0, 0], -torch.tensor(official_get_slopes(2)) * 10)
    qp, kp = torch.tensor([[1.5, 7.0]]), torch.tensor([[0.0, 1.5]])
    b = alibi.from_positions(qp, kp)
    assert b.shape == (1, 2, 2, 2)
    torch.testing.assert_close(b[0, 1, 1, 0], torch.tensor(-official_get_slopes(2)[1] * 7.0))


def test_slopes_stay_fp32_under_bf16():
    alibi = ALiBi(12).to(torch.bfloat16)
    assert alibi.slopes.dtype == torch.float32
    torch.testing.assert_close(alibi.slopes, alibi_slopes(12), atol=0, rtol=0)


@pytest.mark.parametrize("bad,error", [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)])
def test_bad_head_count(bad, error):
    with pytest.raises(error, match=r"num_heads must be an int in \[1, inf\)"):
        alibi_slopes(bad)
