"""Low-precision parameters in Tiger and Lion: stochastic rounding, Kahan compensation, generator state, no host sync.

References are written from the definitions: stochastic rounding's expectation (Gupta et al. 2015, eq. 2), the
counter-based bits of ``stochastic_rounding.py`` (the shared definition every path must reproduce), compensated
summation (Kahan 1965). Paths are forced explicitly; the fused kernels are compared with the PyTorch path through
the optimizer here, and with the definition directly in ``test_fused_low_precision.py``.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_tiger.optim import Lion, Tiger, tiger_param_groups
from lightning_tiger.optim.stochastic_rounding import (
    MOMENTUM_SALT,
    random_bits,
    step_key,
    stochastic_round,
    stream_of,
)
from tests.optim.reference import Mixed

PY_PATHS = [pytest.param(dict(fused=False, foreach=False), id="single"),
            pytest.param(dict(fused=False, foreach=True), id="foreach")]
LOW = [torch.bfloat16, torch.float16]


def _grads(model: nn.Module, steps: int, seed: int = 0, nan_at: int | None = None) -> list[list[Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        gs = [torch.randn(p.shape, generator=g).to(p.dtype) for p in model.parameters()]
        if t == nan_at:
            gs[0].view(-1)[0] = float("nan")
        out.append(gs)
    return out


def _run(model: nn.Module, opt: torch.optim.Optimizer, grads: list[list[Tensor]]) -> None:
    for gs in grads:
        for p, g in zip(model.parameters(), gs):
            p.grad = g.clone()
        opt.step()


def _bitwise(x: Tensor, y: Tensor, msg: str = "") -> None:
    # Lion has no non-finite rule: a NaN gradient leaves NaN in θ and m, identically on every path
    torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True, msg=msg or None)


def _same(a: nn.Module, b: nn.Module, oa: torch.optim.Optimizer, ob: torch.optim.Optimizer) -> None:
    for p, q in zip(a.parameters(), b.parameters()):
        _bitwise(p, q)
        sa, sb = oa.state[p], ob.state[q]
        assert sa.keys() == sb.keys()
        for k in sa:
            if isinstance(sa[k], Tensor):
                assert sa[k].dtype == sb[k].dtype, k
                _bitwise(sa[k], sb[k], k)


# ------------------------------------------------------------------------------------------ unbiasedness
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("path", PY_PATHS)
def test_lion_rounding_is_unbiased_and_uses_the_shared_bits(dtype: torch.dtype, path: dict) -> None:
    # θ = 1 everywhere, g = +1: the fp32 result 1 − lr lies between two neighbours of the low-precision format,
    # far below half an ulp from 1 (bf16: ulp below 1 is 2**-8, lr = 1e-4 is 2.6% of it)
    n, lr = 20000, 1e-4
    p = nn.Parameter(torch.ones(n, dtype=dtype))
    opt = Lion([p], lr=lr, seed=123, **path)
    p.grad = torch.ones(n, dtype=dtype)
    opt.step()
    exact = torch.full((n,), 1.0 - lr, dtype=torch.float32)  # one fp32 subtraction, as the update computes it
    # bit for bit the shared definition, keyed by (seed, parameter index 0, step 0)
    assert torch.equal(p.detach(), stochastic_round(exact, dtype, step_key(stream_of(123, 0), 0)))
    lo = float(torch.nextafter(torch.tensor(1.0, dtype=dtype), torch.tensor(0.0, dtype=dtype)))
    prob = (1.0 - (1.0 - lr)) / (1.0 - lo)  # chance of rounding down to lo
    mean, se = p.detach().double().mean().item(), (1.0 - lo) * (prob * (1 - prob) / n) ** 0.5
    assert abs(mean - (1.0 - lr)) < 4 * se
    # round to nearest throws the whole update away
    q = nn.Parameter(torch.ones(n, dtype=dtype))
    opt2 = Lion([q], lr=lr, stochastic_rounding=False, **path)
    q.grad = torch.ones(n, dtype=dtype)
    opt2.step()
    assert torch.equal(q.detach(), torch.ones(n, dtype=dtype))


@pytest.mark.parametrize("path", PY_PATHS)
def test_tiger_mean_over_steps_follows_the_fp32_trajectory(path: dict) -> None:
    # Many draws of one trajectory: 4096 parameters, each pushed down by lr·RMS per step for 50 steps (sign(m) = +1,
    # no decay). In bf16 with round-to-nearest nothing moves; with SR the mean tracks fp32 within a few SE.
    n, lr, steps = 4096, 2e-4, 50
    ref = nn.Parameter(torch.full((n,), 0.75))
    low = nn.Parameter(torch.full((n,), 0.75, dtype=torch.bfloat16))
    near = nn.Parameter(torch.full((n,), 0.75, dtype=torch.bfloat16))
    kw = dict(lr=lr, weight_decay=0.0, rms_floor=0.0, **path)
    opts = [Tiger([{"params": [ref], "kind": "matrix"}], **kw),
            Tiger([{"params": [low], "kind": "matrix"}], seed=7, **kw),
            Tiger([{"params": [near], "kind": "matrix"}], stochastic_rounding=False, **kw)]
    for _ in range(steps):
        for p, o in zip((ref, low, near), opts):
            p.grad = torch.ones_like(p)
            o.step()
    assert torch.equal(near.detach(), torch.full((n,), 0.75, dtype=torch.bfloat16))
    moved = 0.75 - ref.detach().double().mean().item()
    assert moved > 5e-3  # the fp32 run really moved (~lr·0.75·50)
    ulp = 2.0**-8 * 0.5  # bf16 ulp in [0.5, 1)
    se = ulp * 0.5 / n**0.5 * steps**0.5  # generous bound: at most one ulp of variance per step and element
    assert abs(low.detach().double().mean().item() - ref.detach().double().mean().item()) < 4 * se


@pytest.mark.parametrize("path", PY_PATHS)
def test_bf16_momentum_uses_the_low_half_of_the_parameter_bits(path: dict) -> None:
    # fp32 θ with bf16 momentum: the momentum is rounded stochastically with the parameter's key (unsalted) and the
    # low 16 bits of bits32(key + i·G): bits(m) + (bits_i & 0xFFFF), low 16 bits cleared (module docstring)
    p = nn.Parameter(torch.randn(300))
    opt = Tiger([{"params": [p], "kind": "bias"}], momentum_dtype=torch.bfloat16, seed=5, beta=0.9, **path)
    g = torch.randn(300)
    p.grad = g.clone()
    opt.step()
    new_m = torch.zeros(300).mul(0.9).add_(g, alpha=0.1)  # b1·m + b2·g in fp32, m = 0
    key = step_key(stream_of(5, 0), 0)
    low = random_bits(key, 300) & 0xFFFF
    want = ((new_m.view(torch.int32) + low.to(torch.int32)) & -65536).view(torch.float32).to(torch.bfloat16)
    assert torch.equal(opt.state[p]["momentum"], want)
    assert not torch.equal(want, stochastic_round(new_m, torch.bfloat16, key ^ MOMENTUM_SALT))  # the old rule
    assert opt.state[p]["sr_step"].item() == 1
    # momentum_sr=False rounds the momentum to nearest
    q = nn.Parameter(p.detach().clone())
    opt2 = Tiger([{"params": [q], "kind": "bias"}], momentum_dtype=torch.bfloat16, momentum_sr=False, beta=0.9,
                 **path)
    q.grad = g.clone()
    opt2.step()
    assert torch.equal(opt2.state[q]["momentum"], new_m.to(torch.bfloat16))


# --------------------------------------------------------------------- generator state and reproducibility
def _tiger(model: nn.Module, **kw: Any) -> Tiger:
    return Tiger(tiger_param_groups(model), lr=0.01, grad_accum_steps=2, **kw)


def _lion(model: nn.Module, **kw: Any) -> Lion:
    return Lion(model.parameters(), lr=1e-3, weight_decay=0.1, **kw)


OPTS = [pytest.param(_tiger, id="tiger"), pytest.param(_lion, id="lion")]


@pytest.mark.parametrize("make", OPTS)
@pytest.mark.parametrize("path", PY_PATHS)
def test_exact_resume_with_stochastic_rounding(make: Callable[..., torch.optim.Optimizer], path: dict) -> None:
    torch.manual_seed(0)
    model = Mixed().to(torch.bfloat16)
    resumed_model = copy.deepcopy(model)
    grads = _grads(model, 8, nan_at=5)
    opt = make(model, seed=1, **path)
    _run(model, opt, grads)

    _run(resumed_model, first := make(resumed_model, seed=1, **path), grads[:3])
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    second = make(resumed_model, seed=99, **path)  # another seed: the saved streams must win
    second.load_state_dict(torch.load(buf, weights_only=True))
    for st in second.state.values():
        assert st["sr_stream"].dtype == torch.int64 and st["sr_step"].dtype == torch.int64
    _run(resumed_model, second, grads[3:])
    _same(model, resumed_model, opt, second)


@pytest.mark.parametrize("make", OPTS)
def test_seed_reproducibility(make: Callable[..., torch.optim.Optimizer]) -> None:
    def train(seed: int | None, global_seed: int) -> nn.Module:
        torch.manual_seed(0)
        model = Mixed().to(torch.bfloat16)
        torch.manual_seed(global_seed)  # seed=None draws the streams' seed from torch's default generator
        _run(model, make(model, seed=seed, fused=False), _grads(model, 4))
        return model

    a, b, c = train(None, 3), train(None, 3), train(None, 4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    d, e = train(11, 3), train(11, 4)  # an explicit seed ignores the global one
    assert all(torch.equal(p, q) for p, q in zip(d.parameters(), e.parameters()))


@pytest.mark.parametrize("make", OPTS)
def test_thread_count_and_chunking_do_not_change_the_result(make: Callable[..., torch.optim.Optimizer],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_tiger.optim import _functional

    threads = torch.get_num_threads()
    results = []
    for n_threads, chunk in ((1, _functional.FOREACH_CHUNK_BYTES), (max(2, threads), 64)):
        torch.set_num_threads(n_threads)
        monkeypatch.setattr(_functional, "FOREACH_CHUNK_BYTES", chunk)  # 64 bytes: one tensor per chunk
        try:
            torch.manual_seed(0)
            model = Mixed().to(torch.bfloat16)
            _run(model, make(model, seed=2, fused=False, foreach=True), _grads(model, 4, nan_at=1))
            results.append(model)
        finally:
            torch.set_num_threads(threads)
    for p, q in zip(results[0].parameters(), results[1].parameters()):
        _bitwise(p, q)


@pytest.mark.parametrize("make", OPTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kw", [{}, dict(compensation="kahan"), dict(stochastic_rounding=False),
                                dict(momentum_dtype=torch.bfloat16)], ids=["sr", "kahan", "nearest", "bf16m"])
def test_foreach_equals_single_tensor_bitwise(make: Callable[..., torch.optim.Optimizer], dtype: torch.dtype,
                                              kw: dict) -> None:
    torch.manual_seed(0)
    a = Mixed().to(dtype)
    b = copy.deepcopy(a)
    grads = _grads(a, 5, nan_at=2)
    oa, ob = make(a, seed=3, fused=False, foreach=False, **kw), make(b, seed=3, fused=False, foreach=True, **kw)
    _run(a, oa, grads)
    _run(b, ob, grads)
    _same(a, b, oa, ob)


@pytest.mark.parametrize("make", OPTS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("momentum_sr", [True, False])
def test_fused_kernel_rounds_as_the_pytorch_path(make: Callable[..., torch.optim.Optimizer], dtype: torch.dtype,
                                                 momentum_sr: bool) -> None:
    """Through the optimizer (not the kernel alone): the fused call gets this call's keys, so a bf16/fp16 model
    steps bit for bit as on the foreach path (finite gradients: the non-finite rollback is exact only to rounding)."""
    torch.manual_seed(0)
    a = Mixed().to(dtype)
    b = copy.deepcopy(a)
    grads = _grads(a, 5)
    oa = make(a, seed=3, fused=True, momentum_sr=momentum_sr)
    ob = make(b, seed=3, fused=False, foreach=True, momentum_sr=momentum_sr)
    _run(a, oa, grads)
    _run(b, ob, grads)
    _same(a, b, oa, ob)


# ------------------------------------------------------------------------------------------------ Kahan
@pytest.mark.parametrize("path", PY_PATHS)
def test_kahan_matches_reference_and_tracks_fp32(path: dict) -> None:
    torch.manual_seed(0)
    n, lr, steps = 512, 3e-4, 100
    # bf16-representable start and gradients: the fp32 run sees exactly the same inputs
    init = torch.randn(n).bfloat16().float()
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(n, generator=g).bfloat16().float() for _ in range(steps)]
    runs = {}
    for name, kw, dtype in (("fp32", {}, torch.float32), ("kahan", dict(compensation="kahan"), torch.bfloat16),
                            ("nearest", dict(stochastic_rounding=False), torch.bfloat16)):
        p = nn.Parameter(init.to(dtype, copy=True))
        opt = Lion([p], lr=lr, betas=(0.9, 0.99), momentum_dtype=torch.float32, **kw, **path)
        for gr in grads:
            p.grad = gr.to(dtype)
            opt.step()
        runs[name] = (p.detach(), opt.state[p].get("kahan_comp"))

    # straightforward reference: Lion in fp32 from the stored bf16 θ, written back with compensated summation
    theta, comp, m = init.to(torch.bfloat16), torch.zeros(n, dtype=torch.bfloat16), torch.zeros(n)
    for gr in grads:
        gb = gr.to(torch.bfloat16).float()
        c = m * 0.9 + gb * (1 - 0.9)
        old = theta.float()
        wanted = old - lr * torch.sign(c)
        y = (wanted - old) + comp.float()
        new = (old + y).to(torch.bfloat16)
        comp = (y - (new.float() - old)).to(torch.bfloat16)
        theta = new
        m = m * 0.99 + gb * (1 - 0.99)
    kahan_theta, kahan_comp = runs["kahan"]
    assert torch.equal(kahan_theta, theta) and torch.equal(kahan_comp, comp)
    # θ + compensation follows the fp32 run far more closely than round-to-nearest does
    err_kahan = (kahan_theta.double() + kahan_comp.double() - runs["fp32"][0].double()).abs().max().item()
    err_near = (runs["nearest"][0].double() - runs["fp32"][0].double()).abs().max().item()
    assert err_kahan < 0.02 * err_near and err_near > 1e-2


# -------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("cls", [Tiger, Lion])
def test_bad_rounding_arguments(cls: type) -> None:
    params = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(TypeError, match="stochastic_rounding"):
        cls(params, stochastic_rounding="yes")
    with pytest.raises(ValueError, match=r"compensation must be None or 'kahan'"):
        cls(params, compensation="neumaier")
    with pytest.raises(TypeError, match="seed must be None or an int >= 0"):
        cls(params, seed=1.5)
    with pytest.raises(TypeError, match="seed"):
        cls(params, seed=-1)
    with pytest.raises(TypeError, match="momentum_sr"):
        cls(params, momentum_sr=None)
    with pytest.raises(ValueError, match="compensation='kahan'"):
        cls(params, compensation="kahan", fused=True)


def test_state_only_for_low_precision() -> None:
    model = Mixed()
    opt = Tiger(tiger_param_groups(model), fused=False)
    _run(model, opt, _grads(model, 1))
    assert all("sr_stream" not in st and "kahan_comp" not in st for st in opt.state.values())  # fp32: unchanged
    model16 = Mixed().to(torch.bfloat16)
    opt = Tiger(tiger_param_groups(model16), compensation="kahan", fused=False)
    _run(model16, opt, _grads(model16, 1))
    assert all("sr_stream" not in st and st["kahan_comp"].dtype == torch.bfloat16 for st in opt.state.values())


# ------------------------------------------------------------------------------------------ no host sync
@contextmanager
def _no_host_sync() -> Iterator[list[str]]:
    """Count (and fail on) every Python-level read of a tensor value: item, tolist, bool/int/float, numpy."""
    calls: list[str] = []
    names = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")
    saved = {n: getattr(Tensor, n) for n in names}

    def spy(name: str) -> Callable[..., Any]:
        def f(self: Tensor, *a: Any, **k: Any) -> Any:
            calls.append(name)
            return saved[name](self, *a, **k)
        return f

    for n in names:
        setattr(Tensor, n, spy(n))
    try:
        yield calls
    finally:
        for n, f in saved.items():
            setattr(Tensor, n, f)


@pytest.mark.parametrize("make", OPTS)
@pytest.mark.parametrize("path", PY_PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_fused_step_has_no_host_sync(make: Callable[..., torch.optim.Optimizer], path: dict,
                                         dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = Mixed().to(dtype)
    opt = make(model, **path)
    grads = _grads(model, 4, nan_at=2)
    for gs in grads:
        for p, g in zip(model.parameters(), gs):
            p.grad = g
        with _no_host_sync() as calls:
            opt.step()
        assert calls == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fold_in_backward_has_no_host_sync(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = Mixed().to(dtype)
    opt = Tiger(tiger_param_groups(model), grad_accum_steps=2, fold_in_backward=True, foreach=True)
    x = torch.randint(0, 10, (4, 3))
    for t in range(4):
        with _no_host_sync() as calls:
            out = model(x)
            loss = out.float().pow(2).mean() * (float("nan") if t == 1 else 1.0)
            loss.backward()
            opt.step()
        assert calls == []
    assert all(p.isfinite().all() for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("make", OPTS)
def test_cuda_step_has_no_device_sync(make: Callable[..., torch.optim.Optimizer]) -> None:
    torch.manual_seed(0)
    model = Mixed().to("cuda", torch.bfloat16)
    opt = make(model)
    grads = [[g.cuda() for g in gs] for gs in _grads(model, 3, nan_at=1)]
    _run(model, opt, grads[:1])  # state created
    torch.cuda.set_sync_debug_mode("error")
    try:
        _run(model, opt, grads[1:])
    finally:
        torch.cuda.set_sync_debug_mode("default")
