"""Fused multi-tensor C++ kernels for Tiger and Lion (CPU), built on first use.

Why fused: an optimizer step is memory-bound (bytes counted from the update rules below). Fused AdamW moves 28
bytes per fp32 parameter; a Tiger/Lion step needs only 20 (read θ, g, m; write θ, m) and a non-final accumulation
micro-step of Tiger only 12 (read g; read and write m). A chain of ``torch._foreach_*`` calls re-reads the tensors
once per call, so it moves several times that. The kernels in ``csrc/fused_optim.cpp`` make one pass over the data
per tensor, with the math in fp32 and one rounding to the storage dtype, parallelised over (tensor, block) work
items on ATen's intra-op thread pool (``torch.set_num_threads`` applies).

Design (measured by ``benchmarks/optimizer_step.py``):

- **One pass, optimistic non-finite rule (default).** Each block of 16384 elements checks its gradient piece by
  piece (512 elements, still in L1 when the update reads them) before writing the piece, and stops at the
  first piece holding a NaN/±inf; other blocks of a tensor already flagged are skipped. After the pass, the
  written part of a flagged tensor is rolled back by inverting the update in fp32 (``m = (m' − b2·g)/b1``,
  ``θ = (θ' + η·sign(m'))/(1 − η·λ)``) and θ shrinks (in a tensor of several blocks, every element with a finite
  gradient gets that update-and-invert round trip, written or not, so the result does not depend on thread
  timing: runs stay reproducible). So a finite step moves the minimal 20 bytes per fp32
  parameter (12 for a non-final micro-step) and is bit-identical to the exact rule; on a non-finite step the
  kept m and the shrunk θ equal the exact rule's to within float rounding (a few ulp of ``|m| + |b2·g|`` and
  of ``|θ|``), not bit for bit. Deviation from Tiger's non-finite rule ("m unchanged";
  Su, "Tiger:一个“抠”到极致的优化器", and bojone/tiger ``tiger.py``), hence documented: **``exact=True``**
  restores the bit-exact rule at the cost of reading every gradient before writing (phase A ``isfinite`` over
  g, phase B the update: a tensor within ``group_bytes`` is handled whole by one thread, B from its caches; a
  larger one is shared by all threads and read twice, +4 bytes per parameter). Steps with ``b1 < 0.5``
  (``beta < 0.5``: inverting would divide rounding errors by b1; ``beta=0`` forgets m entirely) always take the
  exact path.
- **Work-stealing schedule.** One parallel region per call; each thread starts on its own contiguous range of
  blocks (long sequential streams keep the hardware prefetchers busy) and takes blocks from the back of
  another thread's range when it runs dry, so a thread slowed down by another process does not make the
  others wait.
- **RMS of θ before the update** (``lr_mode`` 1) costs a read of θ unless a cache is passed (``rms_cache``;
  :class:`~lightning_tiger.optim.Tiger` passes one per optimizer): the sum of squares of θ is accumulated while
  θ is written and reused at the next final step if ``param._version``, ``param.data_ptr()`` and a fingerprint
  of 8 sampled runs of 16 elements are unchanged. The fingerprint catches writes that bypass the version
  counter (``param.data.copy_()`` as in Lightning's ``WeightAveraging``, NumPy/DLPack views) unless they leave
  all 128 sampled elements bit-identical: the residual risk, in which case one step uses the RMS of the θ of
  the previous step. The cached value is bit-identical to a recomputed one (same blocks, same lanes, same
  order), so the cache changes no result. Tensors whose RMS must be recomputed go through the two-phase path
  (phase A reads θ and g together). ``lr_mode`` 2 (per-row RMS) is computed row by row from L1.
- **Deterministic**: reductions use fixed 16-lane partial sums per 16384-element block, added in block order in
  float64, whatever the number of threads or the schedule; built with ``-ffp-contract=off`` so results do not
  depend on the instruction set either.
- **No transient allocation** beyond O(number of blocks) bookkeeping (and one float per embedding row for a
  rollback): everything is updated in place.
- **Stochastic rounding** (``sr_keys``; Gupta et al., 2015, "Deep Learning with Limited Numerical Precision",
  eq. 2): every write of a bf16/fp16 θ_i (update and non-finite shrink) rounds the fp32 result up or down at
  random with the probability that makes it unbiased, so an update below half an ulp of θ (Tiger's relative
  step of ~1e-3 against bf16's 2⁻⁹) still moves θ on average; with ``momentum_sr`` a bf16/fp16 momentum too
  (bf16: the low 16 bits of θ's hash under the same key; fp16: key ``sr_keys[i] ^ MOMENTUM_SALT``). The bits
  are the counter-based ones of :mod:`lightning_tiger.optim.stochastic_rounding`, indexed by the element's
  flat index within its tensor: results are bit-identical to ``stochastic_round(fp32 result, dtype, key)``
  (``momentum_round`` for m; tested), hence to the pure-PyTorch paths, and independent of the thread count,
  the schedule and the block size. Cost: one 32-bit hash per element (shared by a bf16 θ and its bf16
  momentum; a second one only for an fp16 momentum), vectorized; ``benchmarks/optimizer_step.py`` measures it
  against round to nearest.
- **Non-finite rollback with stochastic rounding.** The one-pass path keeps its rollback: the round trip of an
  unwritten element draws exactly the bits the pass would have drawn (they depend on the index only), so the
  result stays reproducible and thread-count independent; the inverse is rounded to nearest. As the
  stochastically rounded forward step is off by less than one ulp (instead of half a one), the restored θ is
  within about one ulp of its dtype of the old θ and m within about 1/b1 ulp (b1 ≥ 0.5 on this path) — the
  same "to within rounding" guarantee as without stochastic rounding, with the rounding of the storage dtype.
  ``exact=True`` keeps the rule bit-exact (m untouched, θ ← SR((θ − c)·s + c) with the call's key), also with
  stochastic rounding. Chosen over sending every stochastically rounded low-precision tensor through the exact
  path because that would read the gradient twice (+20% bytes for an all-bf16 step) on every step to make the
  rare non-finite step bit-exact, which ``exact=True`` offers to whoever needs it.

Contract (shared with the pure-PyTorch paths of ``_functional.py``, which the classes fall back to):
``tiger_step_`` per tensor i: ``nonfinite_i = not all(isfinite(g_i))``; if nonfinite: m_i unchanged (to within
rounding unless ``exact``, see above),
``θ_i ← (θ_i − c_i)·s + c_i`` (update or not); else ``m_i ← b1·m_i + b2·g_i`` and, if ``update``,
``θ_i ← θ_i·(1 − η·λ_i) − η·sign(m_i)`` (= θ − η·(sign(m) + λθ)) with η = ``lrs[i]`` · {1, max(RMS(θ_i), floor_i),
max(RMS(θ_i[r]), floor_i) per row r of θ viewed as [shape[0], −1]} for lr_mode {0, 1, 2}; a tensor with
ndim < 2 in mode 2 uses its whole-tensor RMS (as the reference does). sign(0) = 0, and the sign is that of the
momentum as stored (its dtype may be bf16/fp16). ``lion_step_`` (Chen et al. 2023, "Symbolic Discovery of
Optimization Algorithms", Algorithm 2, the paper's order):
``c = β1·m + (1−β1)·g; θ ← θ·(1 − η·λ) − η·sign(c); m ← β2·m + (1−β2)·g``.

Supported: dense contiguous CPU tensors; params float32/bfloat16/float16, grads of the param dtype, momenta
float32 or the param dtype, and float32 params with a bfloat16/float16 momentum (:func:`fused_supports`).
The fp32/bf16 loops are written on 16-lane vectors (bf16 conversions, rounding to nearest even and the
stochastic-rounding hash as integer vector operations, bit-identical to the scalar definitions) with software
prefetch; fp16 conversions stay scalar, so fp16 tensors run several times slower than bf16 ones (still one pass,
no allocation).
No CUDA kernel: on GPUs the ``foreach`` path of ``_functional.py`` is used (``fused_available("cuda")`` is
False).

Environment variables: ``LIGHTNING_TIGER_DISABLE_FUSED=1`` disables the kernels (``fused_available`` returns
False); ``LIGHTNING_TIGER_FUSED_GROUP_BYTES`` overrides the per-tensor cache budget of the two-phase path
(bytes). Building, caching and loading the kernels (one build per machine and torch/compiler environment, a
visible line while compiling, a warning naming the cause and the fix on fallback, ranks agreeing under
``torch.distributed``, ``python -m lightning_tiger.optim.build`` to prebuild) live in
:mod:`lightning_tiger.optim.build`; :func:`fused_available` is re-exported here.
"""

from __future__ import annotations

import math
import operator
import os
import weakref
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_tiger.optim.build import DISABLE_ENV, fused_available

__all__ = [
    "DISABLE_ENV",
    "RMSCache",
    "fused_available",
    "fused_supports",
    "lion_step_",
    "new_rms_cache",
    "tiger_step_",
]

GROUP_BYTES_ENV = "LIGHTNING_TIGER_FUSED_GROUP_BYTES"
_DEFAULT_GROUP_BYTES = 8 << 20

_SUPPORTED = {
    (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16),
    (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32),
    (torch.float16, torch.float16),
}


def fused_supports(param_dtype: torch.dtype, mom_dtype: torch.dtype) -> bool:
    """Whether the kernels handle this (parameter, momentum) dtype pair (grads must have the param dtype).

    Pairs: (fp32, fp32), (fp32, bf16), (fp32, fp16), (bf16, bf16), (bf16, fp32), (fp16, fp16), (fp16, fp32).
    """
    return (param_dtype, mom_dtype) in _SUPPORTED


class RMSCache:
    """Cache of Σθ² for :func:`tiger_step_` (``rms_cache=``), one per optimizer.

    Maps a parameter object (by identity, held weakly) to ``[version, data_ptr, numel, dtype, sum of squares,
    fingerprint]`` of the θ the kernel last wrote (a list, updated in place). A plain dict keyed by ``id(p)``
    plus a weak reference to check identity: ``torch.utils.weak.WeakIdKeyDictionary`` builds a weak reference
    per lookup, which costs more than the rest of the wrapper on a 100-tensor step. Pass the same parameter
    objects on every step (not fresh ``.detach()`` views) for it to hit.
    """

    def __init__(self) -> None:
        self._d: dict[int, tuple[weakref.ref, list]] = {}

    def get(self, p: Tensor) -> list | None:
        item = self._d.get(id(p))
        if item is None:
            return None
        if item[0]() is not p:  # p's id was reused after the original parameter died
            del self._d[id(p)]
            return None
        return item[1]

    def __getitem__(self, p: Tensor) -> list:
        entry = self.get(p)
        if entry is None:
            raise KeyError(p)
        return entry

    def __setitem__(self, p: Tensor, entry: list) -> None:
        key = id(p)
        self._d[key] = (weakref.ref(p, lambda _, key=key, d=self._d: d.pop(key, None)), list(entry))

    def pop(self, p: Tensor) -> None:
        if self.get(p) is not None:
            del self._d[id(p)]

    def __contains__(self, p: Tensor) -> bool:
        return self.get(p) is not None

    def __len__(self) -> int:
        return len(self._d)

    def clear(self) -> None:
        self._d.clear()


def new_rms_cache() -> RMSCache:
    """An empty :class:`RMSCache` for :func:`tiger_step_` (``rms_cache=``): one per optimizer."""
    return RMSCache()


def _group_bytes() -> int:
    raw = os.environ.get(GROUP_BYTES_ENV)
    if not raw:
        return _DEFAULT_GROUP_BYTES
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{GROUP_BYTES_ENV} must be a positive integer (bytes), got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{GROUP_BYTES_ENV} must be a positive integer (bytes), got {raw!r}")
    return value


def _require_loaded() -> None:
    if not fused_available("cpu"):
        raise RuntimeError("lightning_tiger fused kernels are unavailable; check fused_available() first")


def _check_lengths(n: int, **lists: Sequence) -> None:
    for name, lst in lists.items():
        if len(lst) != n:
            raise ValueError(f"{name} must have one entry per parameter ({n}), got {len(lst)}")


def _sr_key_list(sr_keys: Sequence[int] | None, n: int) -> list[int]:
    """``sr_keys`` as the op's ``int[]`` (empty: round to nearest), validated: one int in [0, 2**32) per tensor."""
    if sr_keys is None:
        return []
    _check_lengths(n, sr_keys=sr_keys)
    keys = []
    for i, key in enumerate(sr_keys):
        if isinstance(key, Tensor):
            key = key.item()  # a 0-d int64 tensor (e.g. built by step_key from optimizer state)
        try:  # any integer-like key (numpy integers included); floats and bools are refused
            if isinstance(key, bool):
                raise TypeError
            key = operator.index(key)
        except TypeError:
            key = None
        if key is None or not 0 <= key < 2**32:
            raise ValueError(f"sr_keys[{i}] must be an int in [0, 2**32), got {sr_keys[i]!r}")
        keys.append(key)
    return keys


def tiger_step_(
    params: list[Tensor],
    grads: list[Tensor],
    moms: list[Tensor],
    *,
    lr_modes: list[int],
    lrs: list[float],
    weight_decays: list[float],
    centers: list[float],
    rms_floor: list[float],
    b1: float,
    b2: float,
    update: bool,
    shrink_ratio: float,
    exact: bool = False,
    rms_cache: RMSCache | None = None,
    sr_keys: Sequence[int] | None = None,
    momentum_sr: bool = True,
) -> list[bool]:
    """One fused Tiger micro-step over all tensors, in place (contract in the module docstring).

    Args:
        params: θ_i, float32/bfloat16/float16, dense and contiguous, any shape (0-size included).
        grads: g_i, same numel and dtype as θ_i.
        moms: m_i, same numel, float32 or θ_i's dtype.
        lr_modes: per tensor, 0 (η = lr), 1 (η = lr·max(RMS(θ), floor)) or 2 (per-row RMS).
        lrs, weight_decays, centers, rms_floor: per-tensor lr (bias/norm 0.5 factor included), λ, shrink centre
            c and RMS floor.
        b1, b2: this micro-step's momentum coefficients (gradient accumulation folded into Tiger's
            momentum, bojone/tiger ``tiger.py``: b1 = β or 1, b2 = (1 − β)/k).
        update: last micro-step of the window (θ moves); otherwise only m changes (12 bytes/param).
        shrink_ratio: s of the non-finite rule.
        exact: bit-exact non-finite rule (read g before writing); default: one pass with a rollback (module
            docstring).
        rms_cache: a cache from :func:`new_rms_cache` (read and updated), or None to recompute every RMS.
        sr_keys: per tensor, the stochastic-rounding key of this call (an int in ``[0, 2**32)``, e.g.
            ``stochastic_rounding.step_key(stream, step)``); None rounds to nearest everywhere. Applies to every
            write of a bf16/fp16 θ_i (update and non-finite shrink), bit-identical to
            ``stochastic_round(fp32 result, dtype, key)`` (module docstring, "Stochastic rounding").
        momentum_sr: with ``sr_keys``, also round a bf16/fp16 m_i stochastically, bit-identical to
            ``momentum_round(fp32 result, dtype, sr_keys[i])`` (bf16: the low half of θ's bits; fp16: key
            ``sr_keys[i] ^ MOMENTUM_SALT``); False rounds it to nearest.

    Returns:
        Per tensor, whether its gradient held a NaN or ±inf (then m_i was kept, bit for bit with ``exact``, to
        within rounding otherwise, and θ_i shrunk).
    """
    n = len(params)
    _check_lengths(n, grads=grads, moms=moms, lr_modes=lr_modes, lrs=lrs, weight_decays=weight_decays,
                   centers=centers, rms_floor=rms_floor)
    keys = _sr_key_list(sr_keys, n)
    if n == 0:
        return []
    _require_loaded()
    sumsq = torch.full((n,), math.nan, dtype=torch.float64)
    fprints = torch.zeros(n, dtype=torch.int64)
    entries: list[list | None] = [None] * n
    if rms_cache is not None:  # also on non-final micro-steps: the kernel passes a valid entry through
        vals, fps = sumsq.numpy(), fprints.numpy()
        for i, p in enumerate(params):
            if lr_modes[i] == 1:
                entry = entries[i] = rms_cache.get(p)
                if entry is not None and entry[0] == p._version and entry[1] == p.data_ptr() \
                        and entry[2] == p.numel() and entry[3] == p.dtype:
                    vals[i], fps[i] = entry[4], entry[5]
    flags = torch.zeros(n, dtype=torch.uint8)
    with torch.no_grad():
        torch.ops.lightning_tiger.tiger_step_(
            params, grads, moms, [int(x) for x in lr_modes], [float(x) for x in lrs],
            [float(x) for x in weight_decays], [float(x) for x in centers], [float(x) for x in rms_floor],
            float(b1), float(b2), bool(update), float(shrink_ratio), bool(exact), flags, sumsq, fprints,
            rms_cache is not None, _group_bytes(), keys, bool(momentum_sr),
        )
    if rms_cache is not None:
        for i, (v, fp) in enumerate(zip(sumsq.tolist(), fprints.tolist())):
            if lr_modes[i] != 1:
                continue
            p, entry = params[i], entries[i]
            if math.isnan(v):
                if entry is not None:
                    rms_cache.pop(p)
            elif entry is not None:  # in place: no new weak reference per step
                entry[:] = (p._version, p.data_ptr(), p.numel(), p.dtype, v, fp)
            else:
                rms_cache[p] = [p._version, p.data_ptr(), p.numel(), p.dtype, v, fp]
    return [bool(x) for x in flags.tolist()]


def lion_step_(
    params: list[Tensor],
    grads: list[Tensor],
    moms: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    sr_keys: Sequence[int] | None = None,
    momentum_sr: bool = True,
) -> None:
    """One fused Lion step over all tensors, in place (Chen et al. 2023, "Symbolic Discovery of
    Optimization Algorithms", Algorithm 2: the paper's order of operations).

    ``c = β1·m + (1−β1)·g``; ``θ ← θ·(1 − lr·λ)``; ``θ ← θ − lr·sign(c)``; ``m ← β2·m + (1−β2)·g``, math in fp32.

    Args:
        params, grads, moms: as for :func:`tiger_step_`.
        lr: η; beta1, beta2: β1, β2; weight_decay: λ (decoupled, multiplied by lr).
        sr_keys, momentum_sr: stochastic rounding of bf16/fp16 θ_i and m_i, as for :func:`tiger_step_`.
    """
    n = len(params)
    _check_lengths(n, grads=grads, moms=moms)
    keys = _sr_key_list(sr_keys, n)
    if n == 0:
        return
    _require_loaded()
    with torch.no_grad():
        torch.ops.lightning_tiger.lion_step_(
            params, grads, moms, float(lr), float(beta1), float(beta2), float(weight_decay), keys,
            bool(momentum_sr),
        )
