"""Fused multi-tensor C++ kernels for Tiger and Lion (CPU), built on first use.

Why fused (SPEC §1.3): an optimizer step is memory-bound. Fused AdamW moves 28 bytes per fp32 parameter; a
Tiger/Lion step needs only 20 (read θ, g, m; write θ, m) and a non-final accumulation micro-step of Tiger only
12 (read g; read and write m). A chain of ``torch._foreach_*`` calls re-reads the tensors once per call, so it
moves several times that. The kernels in ``csrc/fused_optim.cpp`` make one pass over the data per tensor, with
the math in fp32 and one rounding to the storage dtype, parallelised over (tensor, block) work items on ATen's
intra-op thread pool (``torch.set_num_threads`` applies).

Design (measured by ``benchmarks/optimizer_step.py``):

- **Exact per-tensor non-finite rule.** Whether *any* element of g_i is NaN/±inf must be known before the first
  element of m_i is written (m_i must stay exactly unchanged; an optimistic write cannot be undone exactly in
  floating point). So each tensor goes through a read-only phase A (isfinite over g) before its update phase B.
  A tensor whose phase-A bytes fit ``group_bytes`` (default 8 MiB) is handled whole by one thread, B right after
  A, so phase B re-reads g from that core's cache, not from DRAM: the check costs no memory traffic, and needs
  no synchronisation (all such tensors cost one fork of the thread pool). A larger tensor is split across all
  threads and read twice (+4 bytes per parameter, a pure streaming read); phase B walks each thread's range
  backwards so that the part phase A read last is still in cache. Forks are few (number of large tensors + 1)
  because each barrier is expensive on a busy machine.
- **RMS of θ before the update** (``lr_mode`` 1). Recomputed by default in phase A, which reads θ into cache
  just before phase B, so it is free for tensors within the budget and costs one extra read of θ (+4 bytes per
  parameter) for larger ones. An opt-in cache (:func:`set_rms_cache`) instead keeps the sum of squares of θ
  accumulated while θ was written in the previous step, keyed by the parameter object and valid only while
  ``param._version`` and ``param.data_ptr()`` are unchanged since our write. Residual risk, hence off by
  default: writes that bypass the version counter are invisible to it (``param.data.mul_()``, writes through
  NumPy/DLPack views or foreign kernels); with the cache on, such a write makes the next step use the RMS of
  the old θ. The cached value is bit-identical to a recomputed one (same blocks, same lanes, same order), so
  turning it on changes no result.
  ``lr_mode`` 2 (per-row RMS) is computed row by row inside phase B (a row is re-read from L1/L2).
- **Deterministic**: reductions use fixed 16-lane partial sums per 16384-element block, added in block order in
  float64, whatever the number of threads; built with ``-ffp-contract=off`` so results do not depend on the
  instruction set either.
- **No transient allocation** beyond O(number of blocks) bookkeeping: everything is updated in place.

Contract (shared with the pure-PyTorch paths of ``_functional.py``, which the classes fall back to):
``tiger_step_`` per tensor i: ``nonfinite_i = not all(isfinite(g_i))``; if nonfinite: m_i unchanged,
``θ_i ← (θ_i − c_i)·s + c_i`` (update or not); else ``m_i ← b1·m_i + b2·g_i`` and, if ``update``,
``θ_i ← θ_i·(1 − η·λ_i) − η·sign(m_i)`` (= θ − η·(sign(m) + λθ)) with η = ``lrs[i]`` · {1, max(RMS(θ_i), floor_i),
max(RMS(θ_i[r]), floor_i) per row r of θ viewed as [shape[0], −1]} for lr_mode {0, 1, 2}; a tensor with
ndim < 2 in mode 2 uses its whole-tensor RMS (as the reference does). sign(0) = 0, and the sign is that of the
momentum as stored (its dtype may be bf16/fp16). ``lion_step_`` (SPEC §1.1, the paper's order):
``c = β1·m + (1−β1)·g; θ ← θ·(1 − η·λ) − η·sign(c); m ← β2·m + (1−β2)·g``.

Supported: dense contiguous CPU tensors; params float32/bfloat16/float16, grads of the param dtype, momenta
float32 or the param dtype (:func:`fused_supports`). No CUDA kernel: on GPUs the ``foreach`` path of
``_functional.py`` is used (``fused_available("cuda")`` is False).

Environment variables: ``LIGHTNING_TIGER_DISABLE_FUSED=1`` disables the kernels (``fused_available`` returns
False); ``LIGHTNING_TIGER_FUSED_GROUP_BYTES`` overrides the per-tensor cache budget (bytes);
``LIGHTNING_TIGER_RMS_CACHE=1`` turns the RMS cache on at import. The build lives in PyTorch's extension cache
(``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), in a folder named after a hash of the
sources, flags, compiler, torch version and CPU, so that a change of any of them triggers a rebuild.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import platform
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

__all__ = [
    "fused_available",
    "fused_supports",
    "lion_step_",
    "rms_cache_enabled",
    "set_rms_cache",
    "tiger_step_",
]

log = logging.getLogger(__name__)

DISABLE_ENV = "LIGHTNING_TIGER_DISABLE_FUSED"
GROUP_BYTES_ENV = "LIGHTNING_TIGER_FUSED_GROUP_BYTES"
RMS_CACHE_ENV = "LIGHTNING_TIGER_RMS_CACHE"
_DEFAULT_GROUP_BYTES = 8 << 20
_CSRC = Path(__file__).parent / "csrc"
_SOURCES = ("fused_optim.cpp",)

_lock = threading.Lock()
_loaded: bool | None = None  # None: not tried yet
_logged: set[str] = set()
_rms_cache_on = os.environ.get(RMS_CACHE_ENV, "0").strip().lower() in ("1", "true", "yes", "on")
# param object -> (version after our write, data_ptr, numel, dtype, sum of squares); weak keys by identity
# (a WeakKeyDictionary would compare tensors with ==, which is elementwise).
_rms_cache: WeakIdKeyDictionary = WeakIdKeyDictionary()

_SUPPORTED = {
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32),
    (torch.float16, torch.float16),
}


def _log_once(key: str, msg: str, level: int = logging.INFO) -> None:
    if key not in _logged:
        _logged.add(key)
        log.log(level, msg)


def _env_disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def _cpu_signature() -> str:
    """CPU model and ISA flags: the build uses -march=native, so another CPU must get its own build."""
    sig = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    sig += line
                if line.strip() == "":
                    break
    except OSError:
        sig += platform.processor()
    return sig


def _flag_sets() -> list[tuple[list[str], list[str]]]:
    """(cflags, ldflags) to try in order: native ISA + OpenMP, portable + OpenMP, portable serial."""
    base = ["-O3", "-ffp-contract=off", "-fno-strict-aliasing"]
    omp = (["-fopenmp"], ["-fopenmp"])
    native = ["-march=native"] if platform.machine() in ("x86_64", "AMD64") else ["-mcpu=native"]
    return [
        (base + native + omp[0], omp[1]),
        (base + omp[0], omp[1]),
        (base, []),
    ]


def _build() -> bool:
    from torch.utils import cpp_extension

    if platform.system() == "Windows":
        _log_once("build", "lightning_tiger fused kernels: not built on Windows; using the foreach path")
        return False
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        _log_once("build", f"lightning_tiger fused kernels: no C++ compiler ({cxx!r}); using the foreach path")
        return False
    if not cpp_extension.is_ninja_available():
        _log_once("build", "lightning_tiger fused kernels: ninja is not available; using the foreach path")
        return False
    sources = [str(_CSRC / s) for s in _SOURCES]
    digest = hashlib.sha256()
    for s in sources:
        digest.update(Path(s).read_bytes())
    digest.update(torch.__version__.encode())
    digest.update(cxx.encode())
    digest.update(_cpu_signature().encode())
    errors = []
    for k, (cflags, ldflags) in enumerate(_flag_sets()):
        h = digest.copy()
        h.update(repr((cflags, ldflags)).encode())
        name = f"lightning_tiger_fused_{h.hexdigest()[:16]}"
        try:
            cpp_extension.load(
                name=name,
                sources=sources,
                extra_cflags=cflags,
                extra_ldflags=ldflags,
                is_python_module=False,
                verbose=False,
            )
        except Exception as err:  # compiler errors, missing headers, lock problems: fall back, never raise
            errors.append(f"flags {k}: {type(err).__name__}: {str(err)[-500:]}")
            continue
        if hasattr(torch.ops.lightning_tiger, "tiger_step_"):
            _log_once("build", f"lightning_tiger fused kernels loaded ({name}, flags {cflags})", logging.DEBUG)
            return True
    _log_once("build", "lightning_tiger fused kernels could not be built; using the foreach path:\n"
              + "\n".join(errors))
    return False


def fused_available(device: torch.device | str = "cpu") -> bool:
    """Whether the fused kernels can run on ``device`` (builds and loads them once per process; never raises).

    Args:
        device: the device of the tensors to update. Only CPU has fused kernels.

    Returns:
        False on a non-CPU device, when ``LIGHTNING_TIGER_DISABLE_FUSED`` is set (checked on every call), or when
        the extension cannot be built (no compiler, no ninja, compile error); the reason is logged once (INFO).
    """
    global _loaded
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        return False
    if dev.type != "cpu":
        _log_once(f"device:{dev.type}", f"lightning_tiger fused kernels: none for {dev.type}; using foreach")
        return False
    if _env_disabled():
        _log_once("env", f"lightning_tiger fused kernels disabled by {DISABLE_ENV}")
        return False
    if _loaded is None:
        with _lock:
            if _loaded is None:
                try:
                    if hasattr(torch.ops, "lightning_tiger") and hasattr(torch.ops.lightning_tiger, "tiger_step_"):
                        _loaded = True  # already registered in this process (e.g. module reloaded)
                    else:
                        _loaded = _build()
                except Exception as err:  # pragma: no cover - defensive: fused_available never raises
                    _log_once("build", f"lightning_tiger fused kernels unavailable: {err!r}")
                    _loaded = False
    return bool(_loaded)


def fused_supports(param_dtype: torch.dtype, mom_dtype: torch.dtype) -> bool:
    """Whether the kernels handle this (parameter, momentum) dtype pair (grads must have the param dtype)."""
    return (param_dtype, mom_dtype) in _SUPPORTED


def set_rms_cache(enabled: bool) -> None:
    """Turn the cache of Σθ² (whole-tensor RMS, ``lr_mode`` 1) on or off for this process (default: off).

    With the cache on, the sum of squares of θ is accumulated while θ is written and reused at the next final
    step if ``param._version`` and ``param.data_ptr()`` are unchanged, saving one read of θ for tensors larger
    than the cache budget (``group_bytes``). Writes that bypass the version counter (``param.data.<op>_()``,
    NumPy/DLPack views, foreign kernels) are not detected: only enable it when nothing writes parameters that
    way. Pass the same parameter objects on every step (not fresh ``.detach()`` views) for the cache to hit.
    """
    global _rms_cache_on
    _rms_cache_on = bool(enabled)
    if not _rms_cache_on:
        _rms_cache.clear()


def rms_cache_enabled() -> bool:
    """Whether the Σθ² cache of :func:`set_rms_cache` is on."""
    return _rms_cache_on


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
) -> list[bool]:
    """One fused Tiger micro-step over all tensors, in place (contract in the module docstring).

    Args:
        params: θ_i, float32/bfloat16/float16, dense and contiguous, any shape (0-size included).
        grads: g_i, same numel and dtype as θ_i.
        moms: m_i, same numel, float32 or θ_i's dtype.
        lr_modes: per tensor, 0 (η = lr), 1 (η = lr·max(RMS(θ), floor)) or 2 (per-row RMS).
        lrs, weight_decays, centers, rms_floor: per-tensor lr (bias/norm 0.5 factor included), λ, shrink centre
            c and RMS floor.
        b1, b2: this micro-step's momentum coefficients (SPEC §1.2: b1 = β or 1, b2 = (1 − β)/k).
        update: last micro-step of the window (θ moves); otherwise only m changes (12 bytes/param).
        shrink_ratio: s of the non-finite rule.

    Returns:
        Per tensor, whether its gradient held a NaN or ±inf (then m_i was left exactly unchanged and θ_i shrunk).
    """
    n = len(params)
    _check_lengths(n, grads=grads, moms=moms, lr_modes=lr_modes, lrs=lrs, weight_decays=weight_decays,
                   centers=centers, rms_floor=rms_floor)
    if n == 0:
        return []
    _require_loaded()
    cache_on = _rms_cache_on
    sumsq = torch.full((n,), math.nan, dtype=torch.float64)
    if cache_on and update:
        vals = sumsq.numpy()
        for i, p in enumerate(params):
            if lr_modes[i] == 1:
                entry = _rms_cache.get(p)
                if entry is not None and entry[:4] == (p._version, p.data_ptr(), p.numel(), p.dtype):
                    vals[i] = entry[4]
    flags = torch.zeros(n, dtype=torch.uint8)
    with torch.no_grad():
        torch.ops.lightning_tiger.tiger_step_(
            params, grads, moms, [int(x) for x in lr_modes], [float(x) for x in lrs],
            [float(x) for x in weight_decays], [float(x) for x in centers], [float(x) for x in rms_floor],
            float(b1), float(b2), bool(update), float(shrink_ratio), flags, sumsq, cache_on, _group_bytes(),
        )
    if cache_on:
        for i, v in enumerate(sumsq.tolist()):
            if lr_modes[i] != 1:
                continue
            p = params[i]
            if math.isnan(v):
                _rms_cache.pop(p, None)
            else:
                _rms_cache[p] = (p._version, p.data_ptr(), p.numel(), p.dtype, v)
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
) -> None:
    """One fused Lion step over all tensors, in place (SPEC §1.1, the paper's order of operations).

    ``c = β1·m + (1−β1)·g``; ``θ ← θ·(1 − lr·λ)``; ``θ ← θ − lr·sign(c)``; ``m ← β2·m + (1−β2)·g``, math in fp32.

    Args:
        params, grads, moms: as for :func:`tiger_step_`.
        lr: η; beta1, beta2: β1, β2; weight_decay: λ (decoupled, multiplied by lr).
    """
    n = len(params)
    _check_lengths(n, grads=grads, moms=moms)
    if n == 0:
        return
    _require_loaded()
    with torch.no_grad():
        torch.ops.lightning_tiger.lion_step_(
            params, grads, moms, float(lr), float(beta1), float(beta2), float(weight_decay)
        )
