"""Worker of ``test_fsdp2_optim.py``: Tiger and Lion under FSDP2 (``fully_shard``, 2 gloo ranks on CPU) against the
same optimizer in one process and against a Tiger written from the formula.

Started by ``torch.distributed.run --standalone --nproc_per_node 2 fsdp2_worker.py OUT CASE...``. Every rank builds
the same model (same seed) twice: one copy sharded with ``fully_shard`` (each submodule, then the root), one plain
copy. Both ranks feed the same batches, so FSDP2's reduce-scatter averages identical gradients (x/2 + x/2 = x
exactly): the sharded and the single-process runs see bit-identical gradients as long as their parameters agree,
and any difference comes from the optimizer. Rank 0 writes ``OUT/CASE.json`` with the largest differences.

Cases:

- ``tiger``; ``tiger_nan``: a NaN in rank 1's local shard of one matrix gradient at step 5 (flagged on rank 1
  only, so rank 0 must learn it from the all-reduce); ``tiger_accum``: ``grad_accum_steps=2``, one ``step()`` per
  backward; ``tiger_bf16m``: bf16 momentum, stochastic rounding; ``tiger_bf16p``: bf16 parameters, fp32
  momentum; ``tiger_ndim``: ``model.parameters()`` without kinds (the ``ndim`` fallback on the global shape);
  ``tiger_hsdp``: a 2-D mesh, placements (Replicate, Shard(0)); ``tiger_shard1``: matrices sharded on dim 1;
- ``tiger_resume``, ``tiger_kinds_resume`` (kinds from ``assign_kinds``), ``lion_resume``: torch.distributed.checkpoint
  save after 10 steps, a fresh model/optimizer loads it and continues (bit-identical to the uninterrupted run);
- ``lion``, ``lion_bf16m``, ``lion_bf16p``;
- ``fsdp1``: FSDP1 ``FullyShardedDataParallel(use_orig_params=True)``: Tiger refused, Lion exact;
- ``embedding_shard1``: an embedding sharded on dim 1 via ``shard_placement_fn``: refused.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

STEPS = 20
NAN_STEP = 5


class Net(nn.Module):
    """An embedding, a LayerNorm (norm scale/shift), biases, matrices (one zero-initialised: the RMS floor)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.norm = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)
        nn.init.zeros_(self.fc2.weight)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.emb(tokens)).mean(dim=1)
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(h)))))


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(123)
    return [(torch.randint(0, 11, (6, 5), generator=g), torch.randn(6, 3, generator=g)) for _ in range(n)]


def loss_of(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    out = model(x)
    return torch.nn.functional.mse_loss(out, y.to(out.dtype))


# ------------------------------------------------------------------------------ Tiger from the formula
def ref_kind(name: str) -> str:
    """Kinds by module, written out for ``Net``: Su's table (bojone/tiger ``tiger.py``)."""
    if name == "emb.weight":
        return "embedding"
    if name == "norm.weight":
        return "norm_scale"
    if name == "norm.bias":
        return "norm_shift"
    return "matrix" if name.endswith("weight") else "bias"


@torch.no_grad()
def ref_tiger_step(named: dict[str, nn.Parameter], moms: dict[str, torch.Tensor], t: int, *, lr: float, beta: float,
                   wd: float, k: int, s: float = 0.99) -> None:
    """Tiger, Su 2023: m ← b1·m + b2·g; every k-th micro-step θ ← θ − η·(sign(m) + λθ); a non-finite gradient keeps
    m and shrinks θ toward its centre. η = lr·max(RMS(θ), 0.1/sqrt(fan_in)) for matrices, per row for embeddings,
    0.5·lr without decay for biases and norms. RMS in float64."""
    b1 = beta if t % k == 0 else 1.0
    b2 = (1.0 - beta) / k
    update = (t + 1) % k == 0
    for name, p in named.items():
        kind, g, m = ref_kind(name), p.grad, moms[name]
        centre = 1.0 if kind == "norm_scale" else 0.0
        if not torch.isfinite(g).all():
            p.copy_((p - centre) * s + centre)
            continue
        m.mul_(b1).add_(g, alpha=b2)
        if not update:
            continue
        floor = 0.1 / math.sqrt(p.numel() / p.shape[0])
        if kind == "matrix":
            rms = p.double().square().mean().sqrt().item()
            eta, lam = lr * max(rms, floor), wd
        elif kind == "embedding":
            rms = p.double().square().mean(dim=1, keepdim=True).sqrt()
            eta, lam = (lr * rms.clamp_min(floor)).float(), wd
        else:
            eta, lam = 0.5 * lr, 0.0
        p.sub_(eta * (torch.sign(m) + lam * p))


# ------------------------------------------------------------------------------------------- runs
def shard(model: nn.Module, case: str = "", **kw: Any) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    if case == "tiger_hsdp":  # HSDP: 2 replicas of 1 shard each, placements (Replicate(), Shard(0))
        mesh = init_device_mesh("cpu", (dist.get_world_size(), 1), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    if case == "tiger_shard1":  # matrices sharded on dim 1 (columns); the embedding keeps rows whole
        kw["shard_placement_fn"] = lambda p: Shard(1) if p.ndim == 2 and p.shape[0] != 11 else Shard(0)
    for m in (model.emb, model.norm, model.fc1, model.fc2, model.head):
        fully_shard(m, mesh=mesh, **kw)
    fully_shard(model, mesh=mesh, **kw)
    return model


def make_opt(name: str, model: nn.Module, case: str) -> torch.optim.Optimizer:
    from lightning_tiger.optim import Lion, Tiger, tiger_param_groups

    mdt = torch.bfloat16 if case.endswith("bf16m") else torch.float32 if case.endswith("bf16p") else None
    if name == "lion":
        return Lion(model.parameters(), lr=3e-3, weight_decay=0.1, momentum_dtype=mdt, seed=7)
    plain = case in ("tiger_ndim", "tiger_kinds_resume")
    params = model.parameters() if plain else tiger_param_groups(model, weight_decay=0.01)
    k = 2 if case == "tiger_accum" else 1
    opt = Tiger(params, lr=0.02, beta=0.9, weight_decay=0.01, grad_accum_steps=k, momentum_dtype=mdt, seed=7)
    if case == "tiger_kinds_resume":  # kinds by module type without groups (what the CLI does)
        opt.assign_kinds(model)
    return opt


def train(model: nn.Module, opt: torch.optim.Optimizer, data: list, *, nan: bool, start: int = 0,
          stop: int | None = None) -> None:
    for step, batch in enumerate(data[start:stop], start=start):
        loss_of(model, batch).backward()
        if nan and step == NAN_STEP:
            g = model.fc1.weight.grad
            local = g.to_local() if hasattr(g, "to_local") else g
            if dist.get_rank() == 1 or not hasattr(g, "to_local"):
                # sharded: rank 1 holds rows 8.. of fc1.weight; in one process the same element is row 8
                (local[0, 0] if hasattr(g, "to_local") else local[8, 0]).fill_(float("nan"))
        opt.step()
        opt.zero_grad()


def count_collectives(opt: torch.optim.Optimizer) -> dict[str, int]:
    """Count the collectives and fused-kernel calls of ``opt.step()`` (FSDP2's own collectives run outside it)."""
    counts: dict[str, int] = {}
    inside = [False]
    from lightning_tiger.optim import _fused

    targets = [(dist, name) for name in ("all_reduce", "all_gather", "all_gather_into_tensor",
                                         "reduce_scatter_tensor", "broadcast")]
    targets += [(_fused, "tiger_step_"), (_fused, "lion_step_")]  # the fused CPU kernels, on the local shards
    for owner, name in targets:
        orig = getattr(owner, name)

        def counted(*args: Any, _orig: Any = orig, _name: str = name, **kwargs: Any) -> Any:
            if inside[0]:
                counts[_name] = counts.get(_name, 0) + 1
            return _orig(*args, **kwargs)

        setattr(owner, name, counted)
    step = opt.step

    def counting_step(*args: Any, **kwargs: Any) -> Any:
        inside[0] = True
        try:
            return step(*args, **kwargs)
        finally:
            inside[0] = False

    opt.step = counting_step  # type: ignore[method-assign]
    return counts


def _fused_available() -> bool:
    from lightning_tiger.optim._fused import fused_available

    return bool(fused_available("cpu"))


def full(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, Any]:
    diffs = {n: (a[n] - b[n]).abs().max().item() for n in a}
    unequal = sum(int((a[n] != b[n]).sum()) for n in a)
    return {"max_abs": max(diffs.values()), "per_param": diffs, "unequal": unequal,
            "numel": sum(v.numel() for v in a.values())}


def run_case(case: str) -> dict[str, Any]:
    name = "lion" if case.startswith("lion") else "tiger"
    torch.manual_seed(0)
    base = Net()
    if case.endswith("bf16p"):  # bf16 parameters (stochastic rounding of θ), fp32 momentum
        base = base.to(torch.bfloat16)
    init = full(base)
    nan = case == "tiger_nan"
    n = STEPS * (2 if case == "tiger_accum" else 1)
    data = batches(n)
    out: dict[str, Any] = {"case": case}
    if case.endswith("resume"):
        return resume_case(case, name, base, data)

    single = copy.deepcopy(base)
    opt1 = make_opt(name, single, case)
    train(single, opt1, data, nan=nan)

    sharded = shard(copy.deepcopy(base), case)
    opt2 = make_opt(name, sharded, case)
    out["placements"] = sorted({str(tuple(p.placements)) for p in sharded.parameters()})
    collectives = count_collectives(opt2)
    train(sharded, opt2, data, nan=nan)
    out["collectives_per_step"] = {k: v / n for k, v in collectives.items() if not k.endswith("step_")}
    out["fused_calls_per_step"] = {k: v / n for k, v in collectives.items() if k.endswith("step_")}
    out["fused_available"] = _fused_available()
    got = full(sharded)

    out["vs_single"] = compare(got, full(single))
    out["moved"] = max((got[k] - init[k]).abs().max().item() for k in got)
    out["finite"] = all(bool(torch.isfinite(v).all()) for v in got.values())
    if name == "tiger" and case in ("tiger", "tiger_nan", "tiger_accum", "tiger_hsdp", "tiger_shard1"):
        ref = copy.deepcopy(base)
        named = dict(ref.named_parameters())
        moms = {k: torch.zeros_like(v) for k, v in named.items()}
        k = 2 if case == "tiger_accum" else 1
        for t, batch in enumerate(data):
            loss_of(ref, batch).backward()
            if nan and t == NAN_STEP:
                ref.fc1.weight.grad[8, 0] = float("nan")
            ref_tiger_step(named, moms, t, lr=0.02, beta=0.9, wd=0.01, k=k)
            ref.zero_grad()
        out["vs_formula"] = compare(got, full(ref))
        if nan:
            # the NaN step shrank fc1.weight on both ranks: rank 0's rows (0..7) were finite locally
            out["nan_rank"] = 1
    if name == "tiger":
        st = opt2.state_dict()["state"]
        out["state_types"] = sorted({type(v).__name__ for s in st.values() for v in s.values()})
    return out


def resume_case(case: str, name: str, base: nn.Module, data: list) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    whole = shard(copy.deepcopy(base))
    opt = make_opt(name, whole, case)
    train(whole, opt, data, nan=False)
    expected = full(whole)

    first = shard(copy.deepcopy(base))
    opt = make_opt(name, first, case)
    train(first, opt, data, nan=False, stop=STEPS // 2)
    msd, osd = get_state_dict(first, opt)
    folder = os.environ["FSDP_WORKER_CKPT"]
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=folder)
    momentum_types = sorted({type(v).__name__ for s in osd["state"].values() for v in s.values()})

    torch.manual_seed(1)  # a different init: everything must come from the checkpoint
    second = shard(Net())
    opt = make_opt(name, second, case)
    msd, osd = get_state_dict(second, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(second, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(second, opt, data, nan=False, start=STEPS // 2)
    got = full(second)
    return {"case": case, "vs_uninterrupted": compare(got, expected), "saved_state_types": momentum_types,
            "files": sorted(p.name for p in Path(folder).iterdir())}


def refusal_case(case: str) -> dict[str, Any]:
    from lightning_tiger.optim import Lion, Tiger, tiger_param_groups

    torch.manual_seed(0)
    model = Net()
    out: dict[str, Any] = {"case": case}
    if case == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        data = batches(STEPS)
        single = copy.deepcopy(model)
        opt = Lion(single.parameters(), lr=3e-3, weight_decay=0.1, seed=7)
        train(single, opt, data, nan=False)
        # device_id: FSDP1 refuses to pick the CPU by itself; given explicitly it runs there (gloo)
        wrapped = FullyShardedDataParallel(copy.deepcopy(model), use_orig_params=True, device_id=torch.device("cpu"))
        out["shapes"] = [list(p.shape) for p in wrapped.parameters()]
        try:
            opt = Tiger(wrapped.parameters(), lr=1e-3)
            loss_of(wrapped, data[0]).backward()
            opt.step()
            out["Tiger"] = None
        except RuntimeError as err:
            out["Tiger"] = str(err)
        wrapped.zero_grad()
        opt = Lion(wrapped.parameters(), lr=3e-3, weight_decay=0.1, seed=7)  # elementwise: exact on flat shards
        train(wrapped, opt, data, nan=False)
        with FullyShardedDataParallel.summon_full_params(wrapped):
            got = {n.replace("_fsdp_wrapped_module.", ""): p.detach().clone() for n, p in wrapped.named_parameters()}
        out["lion_vs_single"] = compare(got, full(single))
        return out
    from torch.distributed.tensor import Shard

    model = shard(model, shard_placement_fn=lambda p: Shard(1) if p.ndim == 2 and p.shape[0] == 11 else Shard(0))
    opt = Tiger(tiger_param_groups(model), lr=1e-3)
    loss_of(model, batches(1)[0]).backward()
    try:
        opt.step()
        out["Tiger"] = None
    except RuntimeError as err:
        out["Tiger"] = str(err)
    return out


def main() -> None:
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    try:
        for case in sys.argv[2:]:
            with tempfile.TemporaryDirectory() as tmp:
                shared = [tmp]
                dist.broadcast_object_list(shared, src=0)  # one checkpoint folder for both ranks
                os.environ["FSDP_WORKER_CKPT"] = shared[0]
                try:
                    res = refusal_case(case) if case in ("fsdp1", "embedding_shard1") else run_case(case)
                except Exception as err:  # report, so that the test shows the old code's failure
                    res = {"case": case, "error": f"{type(err).__name__}: {err}"}
                dist.barrier()
            if dist.get_rank() == 0:
                (out_dir / f"{case}.json").write_text(json.dumps(res, indent=1))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
