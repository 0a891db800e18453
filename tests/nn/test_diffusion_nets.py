"""TimeEmbedding (explicit sin/cos formula), TimeMLP and SmallUNet shapes, time conditioning, precision."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_tiger.nn.small_unet import SmallUNet
from lightning_tiger.nn.time_embedding import TimeEmbedding
from lightning_tiger.nn.time_mlp import TimeMLP


def test_time_embedding_matches_formula_loop() -> None:
    emb = TimeEmbedding(7, max_period=100.0, scale=10.0)
    t = torch.tensor([0.0, 0.3, 1.0])
    out = emb(t)
    assert out.shape == (3, 7) and out.dtype == torch.float32
    half = 3
    for b in range(3):
        for i in range(half):
            w = math.exp(-math.log(100.0) * i / half)
            assert float(out[b, i]) == pytest.approx(math.sin(10.0 * float(t[b]) * w), abs=1e-5)
            assert float(out[b, half + i]) == pytest.approx(math.cos(10.0 * float(t[b]) * w), abs=1e-5)
        assert float(out[b, 6]) == 0.0  # odd dim: zero pad


def test_time_embedding_fp32_under_autocast_separates_close_times() -> None:
    emb = TimeEmbedding(64)
    t = torch.tensor([0.5, 0.5 + 1e-4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = emb(t)
    assert out.dtype == torch.float32
    # scale·Δt = 0.1 rad on the fastest frequency: bf16 arguments (≈ 2 at 500) would merge the two rows
    assert float((out[0] - out[1]).abs().max()) > 0.05
    with pytest.raises(ValueError, match="dim"):
        TimeEmbedding(1)
    with pytest.raises(ValueError, match="t must"):
        emb(torch.zeros(2, 2))


def test_time_mlp_shapes_conditioning_and_zero_start() -> None:
    net = TimeMLP(data_dim=3, hidden_dim=32, depth=2, time_dim=16)
    x = torch.randn(5, 3)
    assert torch.equal(net(x, torch.rand(5)), torch.zeros(5, 3))  # zero-initialised output layer
    torch.nn.init.normal_(net.output.weight)
    a, b = net(x, torch.full((5,), 0.1)), net(x, torch.full((5,), 0.9))
    assert a.shape == (5, 3) and not torch.allclose(a, b)
    assert torch.allclose(net(x, torch.tensor(0.1)), a)  # 0-d t broadcasts
    with pytest.raises(ValueError, match="x must"):
        net(torch.randn(5, 2), torch.rand(5))
    with pytest.raises(ValueError, match="t must"):
        net(x, torch.rand(4))
    with pytest.raises(ValueError, match="depth"):
        TimeMLP(depth=0)


def test_small_unet_shapes_and_gradients() -> None:
    net = SmallUNet(in_channels=1, base_channels=8, time_dim=16)
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)
    x = torch.randn(4, 1, 8, 8, requires_grad=True)
    out = net(x, torch.rand(4))
    assert out.shape == (4, 1, 8, 8)
    out.square().sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    # samples are independent: the output of sample 0 does not depend on sample 1 (GroupNorm, not BatchNorm)
    x2 = x.detach().clone()
    x2[1] += 1
    t = torch.full((4,), 0.5)
    assert torch.allclose(net(x.detach(), t)[0], net(x2, t)[0], atol=1e-6)
    with pytest.raises(ValueError, match="divisible"):
        net(torch.randn(1, 1, 6, 6), torch.rand(1))
    with pytest.raises(ValueError, match="x must"):
        net(torch.randn(1, 3, 8, 8), torch.rand(1))


def test_outputs_can_scale_with_input() -> None:
    """ε̂ ≈ x at t ≈ 1 must stay representable far from the data (no final norm capping the output scale)."""
    unet = SmallUNet(base_channels=8, time_dim=16)
    torch.nn.init.ones_(unet.skip_gain.bias)  # conv_out is zero-initialised: output = 1·x exactly
    x = 5 * torch.randn(2, 1, 8, 8)
    assert torch.allclose(unet(x, torch.rand(2)), x)
    mlp = TimeMLP(data_dim=2, hidden_dim=16, depth=2, time_dim=8)
    torch.nn.init.normal_(mlp.output.weight)
    small, big = mlp(torch.ones(3, 2), torch.rand(3)), mlp(100 * torch.ones(3, 2), torch.rand(3))
    assert float(big.norm()) > 10 * float(small.norm())
