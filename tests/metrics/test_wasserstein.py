"""WassersteinDistance / SlicedWassersteinDistance: accumulation, reset, merged (DDP-style) states."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from lightning_tiger.metrics import SlicedWassersteinDistance, WassersteinDistance


def test_accumulates_batches_like_one_big_sample() -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(90, 1, generator=gen), torch.randn(90, 1, generator=gen) * 2 + 1
    m = WassersteinDistance()
    for i in range(0, 90, 30):
        m.update(x[i : i + 30], y[i : i + 30])
    ref = np.sqrt(np.mean((np.sort(x[:, 0].numpy()) - np.sort(y[:, 0].numpy())) ** 2))
    assert float(m.compute()) == pytest.approx(ref, rel=1e-5)
    m.reset()
    m.update(torch.zeros(3, 2), torch.ones(3, 2))
    assert float(m.compute()) == pytest.approx(2**0.5, rel=1e-6)


def test_preds_and_target_may_arrive_separately_and_max_samples() -> None:
    m = WassersteinDistance(max_samples=4)
    m.update(torch.zeros(6, 2), torch.empty(0, 2))
    m.update(torch.empty(0, 2), torch.full((5, 2), 3.0))
    assert float(m.compute()) == pytest.approx(3 * 2**0.5, rel=1e-6)


def test_unequal_totals_raise_and_empty_raise() -> None:
    m = WassersteinDistance()
    with pytest.raises(ValueError, match="at least one update"):
        m.compute()
    m.update(torch.zeros(3, 2), torch.ones(4, 2))
    with pytest.raises(ValueError, match="same number of samples"):
        m.compute()
    with pytest.raises(ValueError, match="features"):
        m.update(torch.zeros(3, 2), torch.ones(3, 3))
    with pytest.raises(ValueError, match="max_samples"):
        WassersteinDistance(max_samples=0)


def test_merge_state_concatenates_like_ddp() -> None:
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 2, generator=gen), torch.randn(40, 2, generator=gen)
    a, b, full = (
        SlicedWassersteinDistance(seed=3),
        SlicedWassersteinDistance(seed=3),
        SlicedWassersteinDistance(seed=3),
    )
    a.update(x[:20], y[:20])
    b.update(x[20:], y[20:])
    full.update(x, y)
    a.merge_state(b)
    assert float(a.compute()) == pytest.approx(float(full.compute()), rel=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_process_gloo_states_equal_single_process(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from lightning_tiger.metrics import MMD, FrechetDistance

    from ._dist_helpers import metric_worker

    out = tmp_path / "out.pt"
    mp.spawn(metric_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    got = torch.load(out)
    gen = torch.Generator().manual_seed(123)
    x, y = torch.randn(80, 3, generator=gen), torch.randn(80, 3, generator=gen) + 0.5
    for name, metric in (
        ("w2", WassersteinDistance()),
        ("sw2", SlicedWassersteinDistance(num_projections=32)),
        ("mmd", MMD(bandwidths=1.0)),
        ("fd", FrechetDistance()),
    ):
        metric.update(x, y)
        assert got[name] == pytest.approx(float(metric.compute()), rel=1e-5), name
