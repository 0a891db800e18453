"""Tiger and Lion on sharded parameters: PyTorch FSDP2 / DTensor (exact) and FSDP1 flat parameters (refused).

Under FSDP2 (``torch.distributed.fsdp.fully_shard``, Lightning's ``ModelParallelStrategy``) every parameter, its
gradient and the optimizer state are ``DTensor``\\ s: each rank holds a shard (``Shard(0)``: a block of rows) of
the *global* tensor, whose ``.shape`` is the global shape. The update rules of Tiger and Lion are elementwise
except for three per-tensor quantities of Tiger (Su 2023, "Tiger:一个“抠”到极致的优化器"; official code
bojone/tiger ``tiger.py``):

- the effective rate ``η = lr·max(RMS(θ), floor)`` of a matrix needs Σθ² of the *whole* tensor;
- the non-finite rule ("momentum kept, θ shrunk", per tensor) needs one decision for the whole tensor;
- the parameter kind and the automatic RMS floor ``0.1/sqrt(fan_in)`` need the global shape.

:func:`tiger_sharded_step_` computes the local Σθ² and the local non-finite flag of every sharded tensor of a
step, reduces all of them in ONE ``all_reduce`` (sum, float64) per device mesh, computes η on the host exactly as
the fused kernel does from a sum of squares, and then runs the ordinary update (fused kernel or PyTorch path,
given by the caller) on the local shards with ``lr_mode`` 0 and ``lr = η``. Per-row rates of an embedding table
stay local when its rows are whole on every rank (``Shard(0)``); a table sharded along another dimension is
refused. A tensor flagged on any rank is flagged on every rank: its momentum is kept and θ shrinks on all
shards, although the kernel would only have seen a finite local gradient. ``Replicate`` mesh dimensions (HSDP:
``(Replicate(), Shard(0))``) are handled: only the replica at coordinate 0 adds its Σθ²; ``Partial`` placements
and gradients whose placements differ from their parameter's are refused.

Exactness: the only difference from the single-process run is the order in which Σθ² is summed (the kernel adds
fixed 16-lane float32 partial sums per block in float64; here each rank sums its shard in float64 and the ranks'
sums are added in float64). η is then rounded to float32 like the kernel's, so it is mostly bit-identical and
at worst one float32 ulp apart; everything else (momentum, sign, decay, shrink) is elementwise and bit-identical.
Stochastic rounding draws the bits of the element's *global* flat index (the key is shifted by the shard's
offset), so bf16 parameters or bf16 momenta round exactly as in one process, except for a bf16 parameter that
also has a bf16 momentum (one key cannot shift both streams: the momentum then draws other, equally unbiased
bits on ranks whose shard does not start at element 0) and shards that are not one contiguous range of the
global tensor (e.g. ``Shard(1)``).

FSDP1 (``torch.distributed.fsdp.FullyShardedDataParallel``, Lightning's ``FSDPStrategy``) hands the optimizer
flattened 1-D pieces of parameters (``use_orig_params=True``) or one ``FlatParameter`` per wrapped module: the
shape, hence the kind and the floor, is lost, and pieces of several parameters share one shard. Neither Tiger's
RMS nor its per-tensor non-finite rule can be recovered from the optimizer's side: :func:`refuse_fsdp1` raises for
Tiger. Lion is elementwise, hence exact on flat shards too.

Length: a little over 400 lines on purpose: the sharded Tiger and Lion steps, the one coalesced reduction they
share and the placement checks that refuse what cannot be exact belong together; split, each piece would need
the others' private layout.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_tiger.optim._rounding import is_low_precision, store_, upcast
from lightning_tiger.optim.settings import LR_CONSTANT, LR_RMS, LR_ROW_RMS, TigerParamSettings
from lightning_tiger.optim.shrink import shrunk
from lightning_tiger.optim.stochastic_rounding import MASK32, MOMENTUM_SALT

__all__ = [
    "any_dtensor",
    "check_shards",
    "eta_of_sumsq",
    "is_dtensor",
    "lion_sharded_step_",
    "local_tensor",
    "refuse_fsdp1",
    "shard_key",
    "shard_range",
    "tiger_sharded_step_",
]

try:  # torch.distributed is optional in some builds (then nothing can be a DTensor)
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - builds without torch.distributed
    DTensor = None  # type: ignore[assignment,misc]

_GOLDEN = 0x9E3779B1  # the per-element multiplier of the counter-based rounding bits (stochastic_rounding.py)


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (FSDP2 / tensor-parallel parameter or state)."""
    return DTensor is not None and isinstance(t, DTensor)


def any_dtensor(tensors: Sequence[Any]) -> bool:
    """Whether any of ``tensors`` is a DTensor (a step that needs the sharded path)."""
    return DTensor is not None and any(isinstance(t, DTensor) for t in tensors)


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view of its storage: writes go to the DTensor), else ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def refuse_fsdp1(param_groups: Sequence[dict[str, Any]]) -> None:
    """Raise ``RuntimeError`` if a parameter of Tiger is managed by FSDP1 with more than one process.

    FSDP1 marks every parameter it flattens (``_fsdp_flattened``; the ``FlatParameter`` itself and, with
    ``use_orig_params=True``, the original parameters, which become 1-D views of the local flat shard). With one
    process FSDP1 falls back to ``NO_SHARD`` and the views keep their shapes, so only ``world_size > 1`` is
    refused (``NO_SHARD`` with several processes is refused too: the optimizer cannot tell it from a sharded
    strategy; use DDP for it). Lion needs no such check: its update is elementwise, so a flat shard is updated
    exactly as the same elements of the whole tensor.

    Args:
        param_groups: the optimizer's ``param_groups`` (only looked at under torch.distributed: a step without
            processes costs one call).
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    for i, p in enumerate(p for g in param_groups for p in g["params"]):
        if getattr(p, "_fsdp_flattened", False):
            raise RuntimeError(
                f"Tiger: parameter {i} (local shape {tuple(p.shape)}) is managed by FSDP1 "
                "(torch.distributed.fsdp.FullyShardedDataParallel, e.g. Lightning's FSDPStrategy): each rank holds "
                "a flattened 1-D piece of it, so the per-tensor RMS, the kind and floor taken from its shape and the "
                "per-tensor non-finite decision would be those of the local piece, not of the parameter. Use FSDP2 "
                "instead (Lightning's ModelParallelStrategy with torch.distributed.fsdp.fully_shard applied in "
                "configure_model; Tiger is exact there) or DDP (strategy='ddp'). Lion is exact under FSDP1."
            )


# ----------------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class _Layout:
    """Where a rank's local tensor sits in the global tensor (one per parameter, cached)."""

    mesh: Any  # the DeviceMesh (the all-reduce runs over all its ranks)
    owner: bool  # False on a replica (coordinate != 0 on a Replicate mesh dim): its Σθ² must not be counted twice
    flat_offset: int | None  # global flat index of the local tensor's first element; None: not one contiguous range
    rows_whole: bool  # every row (dim 0 slice) of the global tensor lies whole on one rank


def shard_range(size: int, parts: int, index: int) -> tuple[int, int]:
    """(start, length) of piece ``index`` of ``size`` elements split in ``parts`` like ``torch.chunk`` (DTensor's
    and FSDP2's ``Shard`` semantics: pieces of ceil(size/parts), the last ones shorter or empty)."""
    chunk = -(-size // parts) if parts > 0 else size
    start = min(index * chunk, size)
    return start, max(0, min(size, start + chunk) - start)


def _layout(p: Tensor, what: str) -> _Layout:
    """The layout of the DTensor ``p``; ``RuntimeError`` naming the placement for those that cannot be handled."""
    mesh, placements = p.device_mesh, p.placements
    coord = mesh.get_coordinate()
    if coord is None:
        raise RuntimeError(f"{what}: this rank is not part of the parameter's device mesh {mesh}")
    shape = list(p.shape)
    offset = [0] * len(shape)
    owner, exact_offsets, rows_whole = True, True, True
    for mesh_dim, pl in enumerate(placements):
        if pl.is_partial():
            raise RuntimeError(
                f"{what}: placement {pl} on mesh dim {mesh_dim} (placements {tuple(placements)}, global shape "
                f"{tuple(p.shape)}): a Partial local tensor is a summand of the parameter, not a piece of it, so no "
                "elementwise optimizer can update it; redistribute it to Shard or Replicate placements first"
            )
        if pl.is_replicate():
            owner = owner and coord[mesh_dim] == 0
            continue
        dim = pl.dim
        if dim != 0:
            rows_whole = False
        if type(pl).__name__ != "Shard":  # e.g. _StridedShard (FSDP2 on top of tensor parallelism)
            exact_offsets = False
            continue
        start, length = shard_range(shape[dim], mesh.size(mesh_dim), coord[mesh_dim])
        offset[dim] += start
        shape[dim] = length
    flat: int | None = None
    if exact_offsets:
        full = list(p.shape)
        partial = [d for d in range(len(full)) if shape[d] != full[d]]
        # one contiguous row-major range iff only one dim is cut and every dim before it has size 1
        if not partial:
            flat = 0
        elif len(partial) == 1 and all(full[d] == 1 for d in range(partial[0])):
            d = partial[0]
            flat = offset[d] * math.prod(full[d + 1:])
    return _Layout(mesh, owner, flat, rows_whole)


class _Layouts:
    """Per-parameter layout cache, keyed by id with the placements and shape it was computed for."""

    def __init__(self) -> None:
        self._d: dict[int, tuple[tuple, _Layout]] = {}

    def get(self, p: Tensor, what: str) -> _Layout:
        key = (tuple(p.placements), tuple(p.shape), id(p.device_mesh))
        hit = self._d.get(id(p))
        if hit is None or hit[0] != key:
            hit = self._d[id(p)] = (key, _layout(p, what))
        return hit[1]


_LAYOUTS = _Layouts()


def _check_grad(p: Tensor, g: Tensor, what: str) -> None:
    if not is_dtensor(g):
        raise RuntimeError(f"{what}: the parameter is a DTensor but its gradient is a plain tensor; FSDP2 and "
                           "DTensor modules produce DTensor gradients (do not replace .grad by a local tensor)")
    if tuple(g.placements) != tuple(p.placements) or g.device_mesh != p.device_mesh:
        raise RuntimeError(
            f"{what}: gradient placements {tuple(g.placements)} differ from the parameter's "
            f"{tuple(p.placements)} (global shape {tuple(p.shape)}); redistribute the gradient to the parameter's "
            "placements (FSDP2's reduce-scatter does)"
        )


def shard_key(key: Tensor | None, offset: int | None, p_low: bool, m_salted: bool, momentum_sr: bool) -> Tensor | None:
    """The key that makes a shard draw the rounding bits of its *global* element indices.

    The bits of flat index ``i`` are ``bits32(key + i·G)`` (``stochastic_rounding.py``), so a shard starting at
    global index ``o`` uses ``key + o·G``. θ and a bf16 momentum read the same bits (high and low halves), so one
    shift serves both. An fp16 momentum (``m_salted``) hashes with ``key ^ MOMENTUM_SALT``: when only it rounds
    stochastically (fp32 θ) the shift is applied to the salted key instead; with an fp16 θ too, θ's bits are exact.
    """
    if key is None or not offset:
        return key
    shift = (offset * _GOLDEN) & MASK32
    if p_low or not (m_salted and momentum_sr):
        return (key + shift) & MASK32
    return (((key ^ MOMENTUM_SALT) + shift) & MASK32) ^ MOMENTUM_SALT


def _f32(x: float) -> float:
    """``x`` rounded to float32 (the kernel computes η in float32)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def eta_of_sumsq(lr: float, sumsq: float, numel: int, floor: float) -> float:
    """``lr·max(RMS, floor)`` exactly as the fused kernel computes it from a float64 sum of squares."""
    rms = _f32(math.sqrt(sumsq / numel)) if numel > 0 else 0.0
    return _f32(_f32(lr) * max(rms, _f32(floor)))


def _all_reduce_per_mesh(meshes: list[Any], values: list[list[Tensor]]) -> list[list[float]]:
    """Sum every mesh's list of 0-dim float64 tensors over the mesh's ranks, ONE all_reduce per mesh."""
    out = []
    for mesh, vals in zip(meshes, values):
        vec = torch.stack(vals)
        torch.distributed.all_reduce(vec, group=_group_of(mesh))
        out.append(vec.tolist())
    return out


def _group_of(mesh: Any) -> Any:
    if mesh.ndim == 1:
        return mesh.get_group()
    dist = torch.distributed
    if mesh.size() == dist.get_world_size():
        return dist.group.WORLD
    raise RuntimeError(
        f"Tiger: a {mesh.ndim}-D device mesh {tuple(mesh.shape)} that spans only part of the world "
        f"({mesh.size()} of {dist.get_world_size()} ranks) is not supported: the per-tensor RMS needs one all-reduce "
        "over all ranks of the mesh; use a mesh over all ranks or a 1-D mesh"
    )


# ------------------------------------------------------------------------------------------------------ Tiger
def check_shards(params: Sequence[Tensor], grads: Sequence[Tensor],
                 settings: Sequence[TigerParamSettings] | None = None) -> dict[int, _Layout]:
    """Check the DTensors among ``params`` (and their gradients) before anything is written; their layouts by index.

    Raises ``RuntimeError`` naming the placement for a ``Partial`` placement, a gradient whose placements differ
    from its parameter's, and (Tiger, given ``settings``) an embedding whose rows are split across ranks.
    """
    what = "Lion" if settings is None else "Tiger"
    layouts: dict[int, _Layout] = {}
    for i, p in enumerate(params):
        if not is_dtensor(p):
            continue
        _check_grad(p, grads[i], what)
        lay = layouts[i] = _LAYOUTS.get(p, what)
        if settings is not None and settings[i].lr_mode == LR_ROW_RMS and p.ndim >= 2 and not lay.rows_whole:
            raise RuntimeError(
                f"{what}: embedding parameter of global shape {tuple(p.shape)} has placements "
                f"{tuple(p.placements)}: its per-row RMS needs whole rows on every rank; shard embedding tables "
                "along dim 0 (Shard(0), FSDP2's default) or give them the kind 'matrix' (whole-tensor RMS)"
            )
    return layouts


def tiger_sharded_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    moms: Sequence[Tensor],
    settings: Sequence[TigerParamSettings],
    keys: Sequence[Tensor | None],
    kahan: Sequence[Tensor | None],
    *,
    update: bool,
    shrink_ratio: float,
    momentum_sr: bool,
    run: Callable[..., Any],
) -> list[bool]:
    """One Tiger micro-step over tensors of which some are DTensors (FSDP2), exact to float rounding.

    Per DTensor: its local non-finite flag and, on a final micro-step of an ``lr_mode`` 1 tensor, its local Σθ²
    (float64) join one vector per device mesh, summed by one ``all_reduce``. A tensor flagged anywhere keeps its
    momentum and shrinks, ``θ ← (θ − c)·s + c``, on every rank (here, in PyTorch: bit-exact rule). The others
    go to ``run`` with their local shards, ``lr_mode`` 1 replaced by 0 with ``lr = η`` (``η`` of the global RMS),
    per-row mode 2 kept (rows are local). Plain tensors pass through to ``run`` unchanged.

    Args:
        params, grads, moms: the step's tensors (DTensors or plain), one entry each.
        settings: per tensor :class:`~lightning_tiger.optim.settings.TigerParamSettings` (floor and kind from the
            global shape: a DTensor's ``.shape`` is global).
        keys: per tensor the stochastic-rounding key (int64 0-dim tensor) of this call, or None.
        kahan: per tensor a Kahan compensation buffer (DTensor or plain) or None.
        update: last micro-step of the accumulation window.
        shrink_ratio: s of the non-finite rule.
        momentum_sr: whether low-precision momenta round stochastically (decides which stream a key shift serves).
        run: ``run(params, grads, moms, settings, keys, kahan)`` on plain tensors: the ordinary update.

    Returns:
        Per tensor, whether its gradient was treated as non-finite.
    """
    n = len(params)
    layouts = check_shards(params, grads, settings)
    meshes: list[Any] = []
    stats: list[list[Tensor]] = []
    slots: dict[int, tuple[int, int, int | None]] = {}  # i -> (mesh index, flag slot, sum slot)
    pending: list[tuple[int, Tensor, Tensor | None]] = []
    for i, lay in layouts.items():
        p, g = params[i], grads[i]
        mode = settings[i].lr_mode
        gl = g.to_local()
        bad = _nonfinite(gl)
        ss = None
        if update and mode == LR_RMS:
            pl = p.to_local()
            ss = torch.linalg.vector_norm(pl, dtype=torch.float64).square() if pl.numel() else \
                torch.zeros((), dtype=torch.float64)
            if not lay.owner:
                ss = torch.zeros_like(ss)
        pending.append((i, bad, ss))
    for i, bad, ss in pending:
        mesh = layouts[i].mesh
        k = next((j for j, m in enumerate(meshes) if m is mesh or m == mesh), None)
        if k is None:
            k = len(meshes)
            meshes.append(mesh)
            stats.append([])
        flag_slot = len(stats[k])
        stats[k].append(bad.to(torch.float64))
        sum_slot = None
        if ss is not None:
            sum_slot = len(stats[k])
            stats[k].append(ss)
        slots[i] = (k, flag_slot, sum_slot)
    reduced = _all_reduce_per_mesh(meshes, stats) if meshes else []
    flags = [False] * n
    run_idx: list[int] = []
    run_settings: list[TigerParamSettings] = []
    for i in range(n):
        st = settings[i]
        if i not in slots:
            run_idx.append(i)
            run_settings.append(st)
            continue
        k, fs, ss_slot = slots[i]
        vals = reduced[k]
        if vals[fs] > 0.0:
            flags[i] = True
            continue
        if ss_slot is not None:
            eta = eta_of_sumsq(st.lr, vals[ss_slot], params[i].numel(), st.rms_floor)
            st = st._replace(lr_mode=LR_CONSTANT, lr=eta)
        run_idx.append(i)
        run_settings.append(st)
    local_keys = [_key_for(i, params, moms, keys, layouts, momentum_sr) for i in range(n)]
    for i in range(n):
        if flags[i]:
            theta = local_tensor(params[i])
            old = upcast(theta)
            # the exact rule (m untouched), rounded as the kernels round the shrink: Kahan, stochastic or nearest
            store_(theta, shrunk(old, settings[i].center, shrink_ratio), local_keys[i],
                   None if kahan[i] is None else local_tensor(kahan[i]), old)
    if run_idx:
        run([local_tensor(params[i]) for i in run_idx], [local_tensor(grads[i]) for i in run_idx],
            [local_tensor(moms[i]) for i in run_idx], run_settings, [local_keys[i] for i in run_idx],
            [None if kahan[i] is None else local_tensor(kahan[i]) for i in run_idx])
    return flags


def _key_for(i: int, params: Sequence[Tensor], moms: Sequence[Tensor], keys: Sequence[Tensor | None],
             layouts: dict[int, _Layout], momentum_sr: bool) -> Tensor | None:
    if i not in layouts:
        return keys[i]
    return shard_key(keys[i], layouts[i].flat_offset, is_low_precision(params[i]), moms[i].dtype == torch.float16,
                     momentum_sr)


def _nonfinite(g: Tensor) -> Tensor:
    """0-dim bool tensor: does ``g`` hold a NaN or ±inf (max |g| propagates both; empty tensors are finite)."""
    if g.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=g.device)
    return torch.linalg.vector_norm(g, float("inf")).isfinite().logical_not()


# ------------------------------------------------------------------------------------------------------- Lion
def lion_sharded_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    moms: Sequence[Tensor],
    keys: Sequence[Tensor | None],
    kahan: Sequence[Tensor | None],
    *,
    momentum_sr: bool,
    run: Callable[..., Any],
) -> None:
    """One Lion step over tensors of which some are DTensors: Lion is elementwise (Chen et al. 2023, Algorithm
    2), so ``run(params, grads, moms, keys, kahan)`` updates the local shards; placements are checked and the
    stochastic-rounding keys shifted to the shards' global element indices."""
    layouts = check_shards(params, grads)
    local_keys = [_key_for(i, params, moms, keys, layouts, momentum_sr) for i in range(len(params))]
    run([local_tensor(p) for p in params], [local_tensor(g) for g in grads], [local_tensor(m) for m in moms],
        local_keys, [None if c is None else local_tensor(c) for c in kahan])
