"""Tight-fisted Tiger (``fold_in_backward=True``) under data parallelism: 2 gloo ranks (``torch.multiprocessing``).

Each rank folds its local gradients into its momentum during backward (no gradient communication); at the window's
end ``Tiger.sync_momenta``'s reduction averages the momenta (Su 2023, kexue.fm/archives/9512: m ← β·m at the
window's first micro-step, m += (1 − β)/k·g per micro-batch; the ranks share β·m, so the average of their m is
the single-process m of the concatenated batch). Checked against

- a reference written from the formula (plain autograd on each micro-batch, ``m = β·m + (1 − β)·Σ_j g_j`` with
  the loss divided by k, θ ← θ − η·(sign(m) + λ·θ), η = lr·RMS(θ) for matrices, lr/2 and no decay for biases);
- single-process ``Tiger(fold_in_backward=True)`` on the same global batches;

and the collectives are counted by wrapping ``torch.distributed``'s functions in the workers. Also: a NaN on
one rank (the tensor shrinks on both), a bf16 momentum (ranks bit-identical), the official accumulation pattern
(``grad_accum_steps=K``, step() after every backward: reduced at every call), a bucket cap below the tensors (one
bucket each, in parameter order), and the refusals (no ``sync_momenta``, FSDP2, another layout or seed per rank).

Tolerances: float32 sums in another order (the ranks' means averaged instead of one mean). Tiger moves each
element by ±η, so a momentum within rounding of 0 can take the other sign and move one element by 2η: we require
>= 99% of the elements within 1e-6 and every element within 2·η_max·windows; momenta within 1e-5 relative.
The ranks' parameters and momenta must be bit-identical (one all-reduce result, one rounding key).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.func import functional_call

from lightning_tiger.optim import Tiger

pytestmark = pytest.mark.distributed

WORLD, K, WINDOWS, MICRO = 2, 4, 3, 8  # ranks, micro-batches per window, windows, global micro-batch rows
LR, BETA, WD, SHRINK = 0.01, 0.9, 0.01, 0.5
NAN_AT = (1, 2, 1)  # (window, micro-step, rank): rank 1's gradient of "0.weight" is NaN there (non-finite case)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, port: int, fn: Callable[..., Any], out: Path, args: tuple) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        result = fn(rank, *args)
        torch.save(result, out / f"rank{rank}.pt")
    except Exception as e:  # every rank's error travels to the test
        torch.save({"error": f"{type(e).__name__}: {e}"}, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], out: Path, *args: Any) -> list[Any]:
    """Run ``fn(rank, *args)`` on 2 gloo ranks; returns each rank's return value (or ``{"error": ...}``)."""
    mp.spawn(_entry, args=(_free_port(), fn, out, args), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """[WINDOWS, K, MICRO, 6] inputs and [WINDOWS, K, MICRO, 1] targets (global micro-batches)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(WINDOWS, K, MICRO, 6, generator=g)
    return x, x.sum(-1, keepdim=True).sin()


def _local(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[..., rank::WORLD, :]  # rank r's half of every global micro-batch (equal sizes)


def _tiger(model: nn.Module, **kw: Any) -> Tiger:
    return Tiger(model.parameters(), lr=LR, beta=BETA, weight_decay=WD, shrink_ratio=SHRINK, rms_floor=0.0,
                 fold_in_backward=True, seed=7, **kw)


class Calls:
    """Wraps the ``torch.distributed`` collectives of this process and records (name, dtype, numel) per call."""

    NAMES = ("all_reduce", "all_reduce_coalesced", "broadcast", "all_gather", "all_gather_single",
             "reduce_scatter_single", "all_gather_into_tensor", "reduce_scatter_tensor")

    def __init__(self) -> None:
        self.log: list[tuple[str, torch.dtype, int]] = []
        for name in self.NAMES:
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(tensor: Any, *args: Any, **kw: Any) -> Any:
            t = tensor[0] if isinstance(tensor, list) else tensor
            self.log.append((name, t.dtype, t.numel()))
            return fn(tensor, *args, **kw)
        return wrapped

    def take(self) -> list[tuple[str, torch.dtype, int]]:
        out, self.log = self.log, []
        return out


def _train_tight(rank: int, momentum_dtype: torch.dtype | None, nan: bool, bucket_cap_mb: float = 25.0,
                 official: bool = False) -> dict[str, Any]:
    """One rank: WINDOWS windows of K local micro-batches, loss = local mean / K, one step() per window.

    ``official``: the official code's pattern instead, ``grad_accum_steps=K`` and step() after every backward of
    the local mean loss (the same update: b2 = (1 − β)/K takes the place of the loss's 1/K).
    """
    calls = Calls()
    model = _model()
    opt = _tiger(model, momentum_dtype=momentum_dtype, grad_accum_steps=K if official else 1)
    opt.sync_momenta(bucket_cap_mb=bucket_cap_mb)
    x, y = _local(_data()[0], rank), _local(_data()[1], rank)
    per_window = []
    for w in range(WINDOWS):
        calls.take()
        window_calls = []
        for j in range(K):
            handle = None
            if nan and (w, j, rank) == NAN_AT:
                handle = model[0].weight.register_hook(lambda g: torch.full_like(g, float("nan")))
            (nn.functional.mse_loss(model(x[w, j]), y[w, j]) / (1 if official else K)).backward()
            if handle is not None:
                handle.remove()
            assert all(p.grad is None for p in model.parameters())  # folded and freed during backward
            assert not calls.log, calls.log  # nothing communicated during backward
            if official:
                opt.step()
                window_calls += calls.take()
        if not official:
            opt.step()
        per_window.append(window_calls + calls.take())
    return {"params": {k: v.detach().clone() for k, v in model.named_parameters()},
            "moms": {k: opt.state[p]["momentum"].clone() for k, p in model.named_parameters()},
            "calls": per_window, "numel": sum(p.numel() for p in model.parameters())}


def _reference(nan: bool) -> dict[str, dict[str, torch.Tensor]]:
    """Tiger's tight-fisted window from the formula, over the ranks' local micro-batches (float64 math).

    m = β·m + (1 − β)·(1/R)·Σ_{r,j finite} ∇(mean_r loss_j / K); θ ← θ − η·(sign(m) + λθ), or θ ← s·θ for a
    tensor with a non-finite gradient in the window. Without NaN, (1/R)·Σ_r of the ranks' means is the global
    batch mean's gradient.
    """
    model = _model()
    theta = {k: v.detach().double() for k, v in model.named_parameters()}
    mom = {k: torch.zeros_like(v) for k, v in theta.items()}
    x, y = _data()
    for w in range(WINDOWS):
        acc = {k: torch.zeros_like(v) for k, v in theta.items()}
        bad = set()
        for j in range(K):
            for r in range(WORLD):
                params = {k: v.clone().requires_grad_() for k, v in theta.items()}
                out = functional_call(model.double(), params, (_local(x, r)[w, j].double(),))
                loss = nn.functional.mse_loss(out, _local(y, r)[w, j].double()) / K
                grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
                if nan and (w, j, r) == NAN_AT:
                    bad.add("0.weight")
                    grads["0.weight"] = None
                for k, g in grads.items():
                    if g is not None:
                        acc[k] += g / WORLD
        for k, v in theta.items():
            mom[k] = BETA * mom[k] + (1 - BETA) * acc[k]
            if k in bad:
                theta[k] = SHRINK * v
            elif v.ndim >= 2:  # matrix: η = lr·RMS(θ), decoupled decay
                eta = LR * v.pow(2).mean().sqrt()
                theta[k] = v - eta * (torch.sign(mom[k]) + WD * v)
            else:  # bias: η = lr/2, no decay
                theta[k] = v - 0.5 * LR * torch.sign(mom[k])
    return {"params": {k: v.float() for k, v in theta.items()}, "moms": {k: v.float() for k, v in mom.items()}}


def _single_process(momentum_dtype: torch.dtype | None) -> dict[str, dict[str, torch.Tensor]]:
    """Single-process tight-fisted Tiger on the concatenated global micro-batches."""
    model = _model()
    opt = _tiger(model, momentum_dtype=momentum_dtype)
    x, y = _data()
    for w in range(WINDOWS):
        for j in range(K):
            (nn.functional.mse_loss(model(x[w, j]), y[w, j]) / K).backward()
        opt.step()
    return {"params": {k: v.detach().clone() for k, v in model.named_parameters()},
            "moms": {k: opt.state[p]["momentum"].clone() for k, p in model.named_parameters()}}


def _check_ok(results: list[Any]) -> None:
    for r in results:
        assert "error" not in r, r["error"]


def _assert_ranks_identical(results: list[dict[str, Any]]) -> None:
    for what in ("params", "moms"):
        for k, v in results[0][what].items():
            assert torch.isfinite(v).all(), f"{what} {k} not finite"
            assert torch.equal(v, results[1][what][k]), f"ranks diverged on {what} {k}"


def _assert_close_sign(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    diffs = torch.cat([(got[k].float() - want[k].float()).abs().flatten() for k in want])
    assert (diffs <= 1e-6).float().mean().item() >= 0.99, diffs.max()
    # the largest per-window move: lr·RMS(θ) < lr·max|θ| for matrices, lr/2 for biases
    eta_max = LR * max(max(v.abs().max().item() for v in want.values()), 0.5)
    assert diffs.max().item() <= 2 * eta_max * WINDOWS


@pytest.fixture(scope="module")
def fp32_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """One spawn: the finite run and the run with a NaN on one rank (float32 momentum)."""
    results = spawn(_both_runs, tmp_path_factory.mktemp("tight"))
    _check_ok(results)
    return {case: [r[case] for r in results] for case in ("finite", "nan")}


def _both_runs(rank: int) -> dict[str, Any]:
    return {"finite": _train_tight(rank, None, nan=False), "nan": _train_tight(rank, None, nan=True)}


def test_two_ranks_equal_formula_and_single_process(fp32_runs: dict[str, list[dict[str, Any]]]) -> None:
    ranks = fp32_runs["finite"]
    _assert_ranks_identical(ranks)
    ref, single = _reference(nan=False), _single_process(None)
    for want in (ref, single):
        _assert_close_sign(ranks[0]["params"], want["params"])
        for k, m in want["moms"].items():
            torch.testing.assert_close(ranks[0]["moms"][k], m, rtol=1e-5, atol=1e-7)
    # the ranks moved: not a trivially equal result
    assert not torch.equal(ranks[0]["params"]["0.weight"], _model()[0].weight.detach())


def test_one_reduction_per_window_not_k(fp32_runs: dict[str, list[dict[str, Any]]]) -> None:
    for rank in fp32_runs["finite"]:
        n_params = 4
        for calls in rank["calls"]:
            # the flags table (one int64 all_reduce, MAX), then ONE float32 bucket holding every momentum
            assert calls == [("all_reduce", torch.int64, (n_params + 1) * 5),
                             ("all_reduce", torch.float32, rank["numel"])], calls


def test_nonfinite_on_one_rank_shrinks_on_every_rank(fp32_runs: dict[str, list[dict[str, Any]]]) -> None:
    ranks = fp32_runs["nan"]
    _assert_ranks_identical(ranks)
    ref = _reference(nan=True)
    _assert_close_sign(ranks[0]["params"], ref["params"])
    for k, m in ref["moms"].items():
        torch.testing.assert_close(ranks[0]["moms"][k], m, rtol=1e-5, atol=1e-7)
    # the flagged tensor differs from the finite run (it shrank), the others only through the changed function
    assert not torch.allclose(ranks[0]["params"]["0.weight"], fp32_runs["finite"][0]["params"]["0.weight"])


def _bf16_and_buckets(rank: int) -> dict[str, Any]:
    return {"bf16": _train_tight(rank, torch.bfloat16, nan=False),
            "official": _train_tight(rank, None, nan=False, official=True),
            # a cap below the first weight (96 floats): one bucket per tensor, in the parameter order
            "small": _train_tight(rank, None, nan=False, bucket_cap_mb=64 / 2**20)}


def test_bf16_momentum_official_pattern_and_buckets(tmp_path: Path) -> None:
    results = spawn(_bf16_and_buckets, tmp_path)
    _check_ok(results)
    bf16 = [r["bf16"] for r in results]
    _assert_ranks_identical(bf16)  # one float32 average, one shared stochastic-rounding key
    assert all(m.dtype == torch.bfloat16 for m in bf16[0]["moms"].values())
    single = _single_process(torch.bfloat16)
    # Each side rounds stochastically at every fold, under keys of its own (the ranks' folds plus the shared
    # rounding of the average, against the single process's folds): the two momenta differ by sums of independent
    # roundings of up to 1 bf16 ulp (2^-8 of the running magnitude) each, K·WINDOWS of them per side, damped by β
    # at every window. In units of each tensor's scale: every element within 8 ulps, and 1 ulp on average over all
    # elements (a systematic error, e.g. a missed fold or a double average, is far larger).
    ulps = torch.cat([((bf16[0]["moms"][k].float() - m.float()).abs() / (2**-8 * m.abs().max())).flatten()
                      for k, m in single["moms"].items()])
    assert ulps.max().item() <= 8 and ulps.mean().item() <= 1, (ulps.max().item(), ulps.mean().item())
    diffs = torch.cat([(bf16[0]["params"][k] - v).abs().flatten() for k, v in single["params"].items()])
    assert (diffs <= 1e-6).float().mean().item() >= 0.95
    small = [r["small"] for r in results]
    _assert_ranks_identical(small)
    _assert_close_sign(small[0]["params"], _single_process(None)["params"])
    sizes = [n for _, dtype, n in small[0]["calls"][0] if dtype == torch.float32]
    assert sizes == [96, 16, 16, 1], sizes  # fixed order: the optimizer's parameter order
    # official pattern (step() after every backward, grad_accum_steps=K): reduced at every step() call, same result
    official = [r["official"] for r in results]
    _assert_ranks_identical(official)
    ref = _reference(nan=False)
    _assert_close_sign(official[0]["params"], ref["params"])
    for k, m in ref["moms"].items():
        torch.testing.assert_close(official[0]["moms"][k], m, rtol=1e-5, atol=1e-7)
    assert [len(c) for c in official[0]["calls"]] == [2 * K] * WINDOWS  # flags + momenta at each of the K calls



def _expect_error(fn: Callable[[], Any]) -> str:
    try:
        fn()
    except Exception as e:  # the message is what the test checks
        return f"{type(e).__name__}: {e}"
    return "no error"


def _refusals(rank: int) -> dict[str, str]:
    x, y = _local(_data()[0], rank)[0, 0], _local(_data()[1], rank)[0, 0]
    out = {}

    def unsynced() -> None:  # fold mode under 2 ranks without sync_momenta: local gradients would diverge
        model = _model()
        opt = _tiger(model)
        nn.functional.mse_loss(model(x), y).backward()  # raises in the first fold hook
        opt.step()

    out["unsynced"] = _expect_error(unsynced)

    def layout() -> None:  # rank 1 builds another model: the reduction must not mix unrelated tensors
        model = _model() if rank == 0 else nn.Sequential(nn.Linear(6, 15), nn.Tanh(), nn.Linear(15, 1))
        opt = _tiger(model)
        opt.sync_momenta()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    out["layout"] = _expect_error(layout)

    def seed() -> None:  # another rounding seed per rank: bf16 roundings would differ
        model = _model()
        opt = Tiger(model.parameters(), fold_in_backward=True, seed=rank)
        opt.sync_momenta()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    out["seed"] = _expect_error(seed)

    def fsdp2() -> None:  # sharded parameters: no whole local gradient to fold; refused before any backward
        from torch.distributed.fsdp import fully_shard

        model = _model()
        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
        _tiger(model)

    out["fsdp2"] = _expect_error(fsdp2)
    return out


def test_refusals_on_every_rank(tmp_path: Path) -> None:
    results = spawn(_refusals, tmp_path)
    _check_ok(results)
    for rank in results:
        assert "sync_momenta" in rank["unsynced"] and "TightFistedDDPStrategy" in rank["unsynced"], rank
        assert "tensor 0 of the optimizer has a different size" in rank["layout"], rank
        assert "rounding seed differs between ranks" in rank["seed"], rank
        assert "FSDP" in rank["fsdp2"] and "fold_in_backward=False" in rank["fsdp2"], rank
