"""``torch.compile(opt.step, fullgraph=True)`` captures the non-fused Tiger/Lion step whole and matches eager.

``fullgraph=True`` raises on any graph break (a host sync such as ``.item()``, a data-dependent branch), so
compiling at all is the test that the step is sync-free and branch-free; the results must then equal the eager
run's. CPU inductor compiles C++ (tens of seconds per graph on a small machine): marked slow.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from lightning_tiger.optim import Lion, Tiger, tiger_param_groups

pytestmark = pytest.mark.slow


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.lin = nn.Linear(4, 3)
        self.ln = nn.LayerNorm(3)


def _tiger(m: nn.Module) -> torch.optim.Optimizer:
    # accumulation (k = 2: a moving and a non-moving micro-step, two graphs), every parameter kind
    return Tiger(tiger_param_groups(m), lr=0.05, grad_accum_steps=2, fused=False, foreach=True, seed=4)


def _lion(m: nn.Module) -> torch.optim.Optimizer:
    return Lion(m.parameters(), lr=0.01, weight_decay=0.1, fused=False, foreach=True, seed=4)


@pytest.mark.parametrize(("make", "dtype"), [pytest.param(_tiger, torch.bfloat16, id="tiger-bf16"),
                                             pytest.param(_lion, torch.float32, id="lion-fp32")])
def test_compiled_step_equals_eager(make: Callable[[nn.Module], torch.optim.Optimizer], dtype: torch.dtype) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager_model = Tiny().to(dtype)
    compiled_model = copy.deepcopy(eager_model)
    eager, compiled = make(eager_model), make(compiled_model)
    step = torch.compile(compiled.step, fullgraph=True)
    g = torch.Generator().manual_seed(1)
    for t in range(5):
        grads = [torch.randn(p.shape, generator=g).to(dtype) for p in eager_model.parameters()]
        if t == 2:  # a non-finite gradient in the middle (Tiger shrinks that tensor; Lion propagates it)
            grads[1].view(-1)[0] = float("inf")
        for p, q, gr in zip(eager_model.parameters(), compiled_model.parameters(), grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        eager.step()
        step()
    for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, equal_nan=True)
        for key, value in eager.state[p].items():
            torch.testing.assert_close(compiled.state[q][key], value, rtol=1e-6, atol=1e-7, equal_nan=True)
    if dtype == torch.bfloat16:  # the generator state advanced in the graph too
        assert all(int(st["sr_step"]) == 5 for st in compiled.state.values())
