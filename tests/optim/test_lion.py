"""Lion against the per-tensor reference of Chen et al. 2023, Algorithm 2 (tests/optim/reference.py) and
hand-computed values."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_tiger.optim.lion import Lion
from tests.optim.reference import PATHS, Mixed, random_grads, reference_lion_step


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("betas", [(0.9, 0.99), (0.95, 0.98), (0.0, 0.5)])
def test_trajectory_matches_reference(path: dict, betas: tuple[float, float]) -> None:
    model = Mixed()
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    ref_p = [params[n].detach().double().clone() for n in names]
    ref_m = [torch.zeros_like(r) for r in ref_p]
    opt = Lion(model.parameters(), lr=3e-2, betas=betas, weight_decay=0.5, **path)
    grads = random_grads(model, 6)
    for t in range(6):
        g_t = [None if (t == 2 and n == "lin.bias") else grads[t][n] for n in names]
        for n, g in zip(names, g_t):
            params[n].grad = None if g is None else g.float()
        opt.step()
        reference_lion_step(ref_p, g_t, ref_m, lr=3e-2, beta1=betas[0], beta2=betas[1], weight_decay=0.5)
        for n, r, rm in zip(names, ref_p, ref_m):
            torch.testing.assert_close(params[n].detach().double(), r, rtol=1e-5, atol=1e-6, msg=f"{n}, t={t}")
            torch.testing.assert_close(opt.state[params[n]]["exp_avg"].double(), rm, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params(path: dict, dtype: torch.dtype) -> None:
    model = Mixed().to(dtype)
    params = list(model.parameters())
    # round to nearest: the reference rounds so (stochastic rounding: test_low_precision.py)
    opt = Lion(params, lr=1e-2, weight_decay=0.1, stochastic_rounding=False, **path)
    grads = random_grads(model, 4)
    eps = torch.finfo(dtype).eps
    for t in range(4):
        ref_p = [p.detach().double().clone() for p in params]
        ref_m = [opt.state[p]["exp_avg"].double().clone() if t else torch.zeros_like(r)
                 for p, r in zip(params, ref_p)]
        g = [grads[t][n].to(dtype) for n, _ in model.named_parameters()]
        for p, gi in zip(params, g):
            p.grad = gi
        opt.step()
        reference_lion_step(ref_p, [x.double() for x in g], ref_m, lr=1e-2, beta1=0.9, beta2=0.99,
                            weight_decay=0.1)
        for p, r, rm in zip(params, ref_p, ref_m):
            assert p.dtype == dtype and opt.state[p]["exp_avg"].dtype == dtype
            torch.testing.assert_close(p.double(), r.to(dtype).double(), rtol=eps, atol=1e-6)
            torch.testing.assert_close(opt.state[p]["exp_avg"].double(), rm.to(dtype).double(), rtol=eps,
                                       atol=1e-6)


@pytest.mark.parametrize("path", PATHS)
def test_sign_zero_is_zero_and_decay_convention(path: dict) -> None:
    p = nn.Parameter(torch.tensor([2.0, -4.0, 8.0]))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5, **path)
    p.grad = torch.zeros(3)  # c = 0 -> sign 0: only the decoupled decay θ·(1 − η·λ) acts
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([2.0, -4.0, 8.0]) * (1 - 0.1 * 0.5))
    p2 = nn.Parameter(torch.tensor([1.0, 1.0]))
    opt2 = Lion([p2], lr=0.1, weight_decay=0.0, **path)
    p2.grad = torch.tensor([3.0, -1e-30])
    opt2.step()  # |update| = lr whatever the gradient's magnitude
    torch.testing.assert_close(p2.detach(), torch.tensor([0.9, 1.1]))


def test_grad_none_untouched_no_decay() -> None:
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    opt = Lion([a, b], lr=0.1, weight_decay=1.0)
    a.grad = torch.ones(3)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(3)) and b not in opt.state
    torch.testing.assert_close(a.detach(), torch.full((3,), 1 * (1 - 0.1) - 0.1))


def test_paper_order_uses_old_momentum_for_the_sign() -> None:
    # m = 1 (set directly), g = −1: c = 0.5·1 + 0.5·(−1) = 0 -> sign 0, no move; the momentum update
    # m ← β2·m + (1−β2)·g = 0.9 − 0.1 happens after the parameter update (the paper's order).
    p = nn.Parameter(torch.zeros(1))
    opt = Lion([p], lr=0.1, betas=(0.5, 0.9))
    opt.state[p]["exp_avg"] = torch.ones(1)
    p.grad = -torch.ones(1)
    opt.step()
    assert p.item() == 0.0
    torch.testing.assert_close(opt.state[p]["exp_avg"], torch.tensor([0.9 - 0.1]))


def test_matches_lion_pytorch_peer() -> None:
    lion_pytorch = pytest.importorskip("lion_pytorch")
    torch.manual_seed(0)
    a = nn.Linear(8, 4)
    b = nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    ours = Lion(a.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.3)
    peer = lion_pytorch.Lion(b.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.3)
    for _ in range(5):
        x = torch.randn(16, 8)
        for m, o in ((a, ours), (b, peer)):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def test_sparse_gradients_refused_before_anything_moves() -> None:
    dense = nn.Parameter(torch.ones(3))
    emb = nn.Embedding(3, 2, sparse=True)
    opt = Lion([{"params": [dense]}, {"params": emb.parameters()}], lr=0.1)
    dense.grad = torch.ones(3)
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(dense, torch.ones(3))  # refused before the first group moved


