"""Single-process checks of the sharded-parameter support (``lightning_tiger.optim.sharding``); the multi-process
runs (FSDP2 on 2 gloo ranks, Lightning's ModelParallelStrategy) are in ``tests/distributed/``."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_tiger.optim import Lion, Tiger, sharding, tiger_param_groups
from lightning_tiger.optim.stochastic_rounding import MOMENTUM_SALT, stochastic_round


# --------------------------------------------------------------------------------------- FSDP1 is refused
@pytest.fixture
def two_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend to run under torch.distributed with 2 processes (only what refuse_fsdp1 asks)."""
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)


def _flat_piece() -> nn.Parameter:
    """What FSDP1 (use_orig_params=True) hands the optimizer: a flattened 1-D piece, marked by FSDP."""
    p = nn.Parameter(torch.randn(12))
    p._fsdp_flattened = True  # FSDP1's marker (torch.distributed.fsdp._common_utils.FSDP_FLATTENED)
    p.grad = torch.randn(12)
    return p


def test_tiger_refuses_fsdp1_flat_parameters_naming_the_strategy_and_the_alternative(two_ranks: None) -> None:
    p = _flat_piece()
    before = p.detach().clone()
    opt = Tiger([p], lr=1e-3)
    with pytest.raises(RuntimeError, match="FSDP1") as info:
        opt.step()
    msg = str(info.value)
    assert "FSDPStrategy" in msg and "ModelParallelStrategy" in msg and "fully_shard" in msg, msg
    assert torch.equal(p, before) and not opt.state  # nothing moved


def test_lion_runs_on_fsdp1_flat_parameters(two_ranks: None) -> None:
    p = _flat_piece()
    Lion([p], lr=1e-3).step()  # elementwise: a flat shard is updated like the same elements of the whole tensor


def test_unmarked_parameters_and_one_process_are_not_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    p = _flat_piece()
    sharding.refuse_fsdp1([{"params": [p]}])  # not distributed: FSDP1 with one process keeps shapes (NO_SHARD)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    sharding.refuse_fsdp1([{"params": [nn.Parameter(torch.randn(3, 4))]}])


def test_lightning_fsdp_strategy_refuses_cpu() -> None:
    """Where Lightning itself stops FSDP1 on CPU (hence the torch-level FSDP1 test in tests/distributed/)."""
    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        L.Trainer(accelerator="cpu", devices=2, strategy="fsdp", logger=False)


# -------------------------------------------------------------------------------------------- helpers
@pytest.mark.parametrize("size", range(0, 11))
@pytest.mark.parametrize("parts", [1, 2, 3, 4])
def test_shard_range_is_torch_chunk(size: int, parts: int) -> None:
    """DTensor's and FSDP2's Shard(dim) split like torch.chunk (pieces of ceil(size/parts), trailing ones empty)."""
    pieces = list(torch.arange(size).chunk(parts)) if size else []
    pieces += [torch.arange(0)] * (parts - len(pieces))
    for index, piece in enumerate(pieces):
        start, length = sharding.shard_range(size, parts, index)
        assert length == piece.numel() and (length == 0 or start == int(piece[0])), (size, parts, index)


@pytest.mark.parametrize(("p_dtype", "m_dtype"), [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                                  (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16),
                                                  (torch.float16, torch.float16)])
def test_shard_key_draws_the_bits_of_the_global_indices(p_dtype: torch.dtype, m_dtype: torch.dtype) -> None:
    """A shard starting at global flat index o, rounded with shard_key, equals the same elements of the whole tensor
    rounded with the step's key: θ when θ is low precision, and the momentum (bf16: the low half of θ's bits under
    the same key; fp16: key ^ MOMENTUM_SALT) except an fp16 one beside an fp16 θ (θ's bits win)."""
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    key, offset = torch.tensor(123456789), 377
    p_low, m_salted = p_dtype != torch.float32, m_dtype == torch.float16
    local = sharding.shard_key(key, offset, p_low, m_salted, momentum_sr=True)
    if p_low:
        whole, piece = stochastic_round(x, p_dtype, key), stochastic_round(x[offset:], p_dtype, local)
        assert torch.equal(piece, whole[offset:])
        assert not torch.equal(stochastic_round(x[offset:], p_dtype, key), whole[offset:])  # unshifted key: no
    if m_dtype == torch.bfloat16:
        whole = stochastic_round(x, m_dtype, key, bits="low")
        assert torch.equal(stochastic_round(x[offset:], m_dtype, local, bits="low"), whole[offset:])
        assert not torch.equal(stochastic_round(x[offset:], m_dtype, key, bits="low"), whole[offset:])
    if m_salted and not p_low:
        whole = stochastic_round(x, m_dtype, key ^ MOMENTUM_SALT)
        piece = stochastic_round(x[offset:], m_dtype, local ^ MOMENTUM_SALT)
        assert torch.equal(piece, whole[offset:])
        assert not torch.equal(stochastic_round(x[offset:], m_dtype, key ^ MOMENTUM_SALT), whole[offset:])


def test_eta_of_sumsq_is_the_kernels_rate() -> None:
    """lr_mode 0 with η from the float64 sum of squares moves θ as the fused kernel's own lr_mode 1 does (to one
    float32 ulp of η: the kernel sums in another order)."""
    fused = pytest.importorskip("lightning_tiger.optim._fused")
    if not fused.fused_available("cpu"):
        pytest.skip("fused kernels unavailable")
    g = torch.Generator().manual_seed(1)
    theta = torch.randn(300, 70, generator=g) * 0.05
    grad, lr, wd, floor = torch.randn(300, 70, generator=g), 0.01, 0.1, 0.1 / math.sqrt(70)
    outs = []
    for mode in (1, 0):
        p, m = theta.clone(), torch.zeros_like(theta)
        eta = lr if mode == 1 else sharding.eta_of_sumsq(lr, theta.double().square().sum().item(), p.numel(), floor)
        fused.tiger_step_([p], [grad.clone()], [m], lr_modes=[mode], lrs=[eta], weight_decays=[wd], centers=[0.0],
                          rms_floor=[floor], b1=0.9, b2=0.1, update=True, shrink_ratio=0.99)
        outs.append(p)
    step = lr * theta.square().mean().sqrt().item()
    assert (outs[0] - outs[1]).abs().max().item() <= 1e-6 * step


# ------------------------------------------------------------------------------ state without strings
def test_assign_kinds_keeps_no_strings_in_the_parameter_state() -> None:
    """Kinds assigned by module type live in the param group, not in ``state[p]``: state-dict utilities cast and
    shard per-parameter state, and torch.distributed.checkpoint's ``get_state_dict`` only initialises the state of
    an optimizer whose state is empty (a kind in it made a resumed FSDP2 run skip loading its momenta)."""
    model = nn.Sequential(nn.Embedding(5, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    opt = Tiger(model.parameters(), lr=1e-3)
    kinds = opt.assign_kinds(model)
    assert kinds["0.weight"].value == "embedding" and kinds["1.weight"].value == "norm_scale"
    assert not opt.state
    model(torch.tensor([[1, 2]])).sum().backward()
    opt.step()
    sd = opt.state_dict()
    assert all(not isinstance(v, str) for s in sd["state"].values() for v in s.values())
    other = Tiger(nn.Sequential(nn.Embedding(5, 4), nn.LayerNorm(4), nn.Linear(4, 3)).parameters(), lr=1e-3)
    other.load_state_dict(sd)
    assert [other._kind(p, g).value for g in other.param_groups for p in g["params"]] == [
        "embedding", "norm_scale", "norm_shift", "matrix", "bias"]


def test_old_checkpoints_with_kinds_in_the_state_still_load() -> None:
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 3))
    opt = Tiger(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2]])).sum().backward()
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["kind"] = "embedding"  # how checkpoints saved kinds before
    other = Tiger(nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 3)).parameters(), lr=1e-3)
    other.load_state_dict(sd)
    p0 = other.param_groups[0]["params"][0]
    assert other._kind(p0, other.param_groups[0]).value == "embedding"
    assert all(not isinstance(v, str) for s in other.state.values() for v in s.values())


# ---------------------------------------------------- DTensors on a one-process mesh: the whole sharded path
@pytest.fixture
def one_rank_group(tmp_path: Path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.norm, self.fc = nn.Embedding(7, 6), nn.LayerNorm(6), nn.Linear(6, 3)
        nn.init.zeros_(self.fc.weight)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.emb(tokens)).mean(dim=1))


@pytest.mark.parametrize("momentum_dtype", [None, torch.bfloat16])
def test_dtensor_parameters_on_one_rank_follow_the_plain_run(one_rank_group: None, momentum_dtype) -> None:
    """DTensor parameters (a 1-rank mesh) take the sharded path: one all-reduce of Σθ² and flags, η from the sum,
    the kernel with lr_mode 0 on the local tensors, the non-finite rule outside it. Same result as plain tensors to
    float rounding (η from a float64 sum instead of the kernel's own)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    torch.manual_seed(0)
    plain = _Net()
    sharded = _Net()
    sharded.load_state_dict(plain.state_dict())
    for mod in sharded.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            setattr(mod, name, nn.Parameter(distribute_tensor(p.detach(), mesh)))
    opts = [Tiger(tiger_param_groups(m), lr=0.05, momentum_dtype=momentum_dtype, seed=1) for m in (plain, sharded)]
    g = torch.Generator().manual_seed(2)
    for step in range(6):
        x = torch.randint(0, 7, (4, 3), generator=g)
        for model, opt in zip((plain, sharded), opts):
            out = model(x if model is plain else distribute_tensor(x, mesh))
            (out.full_tensor() if hasattr(out, "full_tensor") else out).square().mean().backward()
            if step == 3:  # a non-finite gradient: momentum kept, θ shrunk
                grad = model.fc.weight.grad
                (grad.to_local() if hasattr(grad, "to_local") else grad)[0, 0] = float("nan")
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(plain.named_parameters(), sharded.parameters()):
        assert type(b).__name__ == "DTensor"
        torch.testing.assert_close(b.full_tensor(), a.detach(), rtol=0, atol=1e-7, msg=name)
    assert not torch.equal(plain.fc.weight, torch.zeros(3, 6))


def _one_rank_dtensor(placement: object, grad_placement: object) -> nn.Parameter:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (1,))
    p = nn.Parameter(DTensor.from_local(torch.randn(4, 3), mesh, [placement]))
    p.grad = DTensor.from_local(torch.randn(4, 3), mesh, [grad_placement])
    return p


@pytest.mark.parametrize("cls", [Tiger, Lion])
def test_partial_placements_are_refused_by_name(one_rank_group: None, cls: type) -> None:
    from torch.distributed.tensor import Partial

    p = _one_rank_dtensor(Partial(), Partial())
    with pytest.raises(RuntimeError, match=r"Partial.*not a piece of it"):
        cls([{"params": [p], "kind": "matrix"}], lr=1e-3).step()


def test_gradient_placements_must_match_the_parameter(one_rank_group: None) -> None:
    from torch.distributed.tensor import Replicate, Shard

    p = _one_rank_dtensor(Replicate(), Shard(0))
    before = p.detach().full_tensor().clone()
    with pytest.raises(RuntimeError, match=r"gradient placements \(Shard\(dim=0\),\) differ"):
        Tiger([{"params": [p], "kind": "matrix"}], lr=1e-3).step()
    assert torch.equal(p.detach().full_tensor(), before)


def test_a_refused_step_moves_nothing_in_other_batches(one_rank_group: None) -> None:
    """Groups with different betas are separate batches; the refusal comes before the first batch is written."""
    from torch.distributed.tensor import Partial, Replicate

    ok, bad = _one_rank_dtensor(Replicate(), Replicate()), _one_rank_dtensor(Partial(), Partial())
    before = ok.detach().full_tensor().clone()
    opt = Tiger([{"params": [ok], "kind": "matrix", "beta": 0.9}, {"params": [bad], "kind": "matrix", "beta": 0.5}])
    with pytest.raises(RuntimeError, match="Partial"):
        opt.step()
    assert torch.equal(ok.detach().full_tensor(), before)
    assert not opt.state[ok]["momentum"].full_tensor().any()  # created as zeros, never updated
    assert opt.param_groups[0]["micro_step"] == 0
