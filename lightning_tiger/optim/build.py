"""Build, cache and load the fused C++ optimizer kernels of ``csrc/`` — once per machine, never hanging.

The kernels (:mod:`lightning_tiger.optim._fused`) are compiled with the system C++ compiler the first time a
process needs them, which takes about 10 s; later runs load the cached library. Prebuild them (prints the folder,
exits non-zero on failure)::

    python -m lightning_tiger.optim.build [--force]

**Cache** (:mod:`.build_cache`): one folder per environment under ``$TORCH_EXTENSIONS_DIR/lightning_tiger/``, keyed
by the kernel sources, flags, torch build, Python, compiler and CPU. **Never hangs**: builds compile into a private
folder and are published by an atomic rename; a :class:`~.build_lock.BuildLock` (``flock``, released by the OS when
its holder dies) serialises builds of one key for at most ``LIGHTNING_TIGER_BUILD_TIMEOUT`` seconds (default 600).
**Messages**: one WARNING log line before compiling; a :class:`FusedKernelWarning` with the cause and the fix when
the PyTorch path is taken; the compiler output in ``<key>.failed.log``. **Distributed**: one build per machine,
then every rank uses the kernels only if all have them (agreed through the process group's key-value store, never
collectives; bounded by the same timeout). Design notes: ``docs`` page "Fused kernel build".

``LIGHTNING_TIGER_DISABLE_FUSED=1`` disables the kernels (checked on every call; under ``torch.distributed`` a
rank with it set makes every rank fall back).

Length: a little over 400 lines on purpose: compiling, loading, the rank agreement and the command-line entry
point share the build plan; the cache key and the lock live in ``build_cache.py`` and ``build_lock.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from .build_cache import (
    BUILD_INFO,
    CSRC,
    DISABLE_ENV,
    FIX_DISABLE,
    SOURCES,
    BuildPlan,
    BuildResult,
    build_folder,
    failed,
    flag_sets,
    host_tag,
    move_aside,
    plan_build,
    publish,
    published_library,
    remove_dead_private_folders,
    tail,
)
from .build_lock import BuildLock

__all__ = [
    "DISABLE_ENV",
    "TIMEOUT_ENV",
    "BuildLock",
    "BuildResult",
    "FusedKernelWarning",
    "build_folder",
    "build_kernels",
    "build_timeout",
    "fused_available",
    "kernel_status",
    "main",
]

# An explicit name (not __name__): ``python -m lightning_tiger.optim.build`` runs this file as ``__main__``.
log = logging.getLogger("lightning_tiger.optim.build")

TIMEOUT_ENV = "LIGHTNING_TIGER_BUILD_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0


class FusedKernelWarning(UserWarning):
    """The fused kernels cannot be used here; the optimizers take the (slower) pure-PyTorch path."""


_lock = threading.Lock()
_local: BuildResult | None = None  # None: not tried yet in this process
_agreed: dict[int, tuple[object, bool]] = {}  # id(group) -> (group, every rank ok); the group is kept alive
_warned: set[str] = set()


def env_disabled() -> bool:
    """Whether ``LIGHTNING_TIGER_DISABLE_FUSED`` is set to a true value."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def build_timeout() -> float:
    """Seconds to wait for another process's build or for the other ranks (``LIGHTNING_TIGER_BUILD_TIMEOUT``).

    Raises:
        ValueError: the variable is set but is not a positive number.
    """
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return value


def _timeout() -> float:
    """:func:`build_timeout`, or the default with a warning: a typo in the variable must not stop training."""
    try:
        return build_timeout()
    except ValueError as err:
        _warn_once("timeout", f"{err}; using {DEFAULT_TIMEOUT_S:g} s")
        return DEFAULT_TIMEOUT_S


def _compiler_errors(text: str) -> str:
    """The compiler's error lines from PyTorch's build exception (else its last lines), for a one-line cause."""
    found = [ln.strip() for ln in text.splitlines()
             if re.search(r"\berror\b", ln, re.IGNORECASE) and "Error building extension" not in ln]
    return " | ".join(found[:3])[:600] if found else tail(text, 2)


def _kernels_registered() -> bool:
    return hasattr(torch.ops, "lightning_tiger") and hasattr(torch.ops.lightning_tiger, "tiger_step_")


def _load_published(plan: BuildPlan) -> BuildResult | None:
    """Load the published build of ``plan`` (None when there is none)."""
    lib = published_library(plan.folder)
    if lib is None:
        return None
    try:
        if not _kernels_registered():
            torch.ops.load_library(str(lib))
    except Exception as err:  # a damaged or foreign file: say so and let the caller fall back
        return failed(f"loading {lib} failed ({type(err).__name__}: {tail(str(err), 2)})",
                     f"delete {plan.folder} and run `python -m lightning_tiger.optim.build`, {FIX_DISABLE}")
    if not _kernels_registered():
        return failed(f"{lib} did not register the lightning_tiger kernels",
                     f"delete {plan.folder} and run `python -m lightning_tiger.optim.build`")
    log.info("lightning_tiger: fused optimizer kernel loaded from %s", plan.folder)
    return BuildResult(ok=True, folder=plan.folder)


def _compile(plan: BuildPlan) -> BuildResult:
    """Compile into a private folder, load, and publish it as ``plan.folder`` by an atomic rename."""
    from torch.utils import cpp_extension  # see cache_root

    log.warning("lightning_tiger: building the fused optimizer kernel once (~10 s, cached for later runs) in %s",
                plan.folder)
    start = time.monotonic()
    host = host_tag()
    private = Path(tempfile.mkdtemp(prefix=f".{plan.name}.tmp-{host}-{os.getpid()}-", dir=plan.root))
    sources = [str(CSRC / s) for s in SOURCES]
    errors: list[str] = []
    try:
        for k, (cflags, ldflags) in enumerate(flag_sets()):
            attempt = private / f"attempt{k}"
            attempt.mkdir()
            try:
                cpp_extension.load(name=plan.name, sources=sources, extra_cflags=cflags, extra_ldflags=ldflags,
                                   build_directory=str(attempt), is_python_module=False, verbose=False)
            except Exception as err:  # compiler errors, missing headers: try the next flags, never raise
                errors.append(f"--- flags {cflags} {ldflags}: {type(err).__name__}:\n{err}")
                continue
            libs = sorted(attempt.glob("*.so"))
            if not _kernels_registered() or not libs:
                errors.append(f"--- flags {cflags}: built, but the kernels did not register")
                continue
            os.replace(libs[0], private / libs[0].name)
            (private / BUILD_INFO).write_text(json.dumps({
                "library": libs[0].name, "cflags": cflags, "ldflags": ldflags, "compiler": plan.compiler,
                "compiler_version": plan.compiler_version, "torch": torch.__version__,
                "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            }, indent=1))
            for a in private.glob("attempt*"):
                shutil.rmtree(a, ignore_errors=True)
            private.chmod(0o755)  # mkdtemp makes it private to this user; the cache may be shared
            publish(private, plan)
            log.info("lightning_tiger: fused optimizer kernel built in %.1f s: %s", time.monotonic() - start,
                     plan.folder)
            return BuildResult(ok=True, folder=plan.folder, built=True)
    finally:
        shutil.rmtree(private, ignore_errors=True)  # gone already when published
    log_file = plan.root / f"{plan.name}.failed.log"
    with contextlib.suppress(OSError):
        log_file.write_text("\n\n".join(errors))
    return failed(f"the C++ compiler {plan.compiler} failed ({_compiler_errors(errors[-1] if errors else '')})",
                 f"see {log_file} for the full output; fix the toolchain (or point CXX at a working compiler) "
                 f"and rerun `python -m lightning_tiger.optim.build`, {FIX_DISABLE}")


def build_kernels(force: bool = False) -> BuildResult:
    """Load the cached kernels, or build, publish and load them (this process only; never raises).

    Args:
        force: delete this environment's published build first and compile again.

    Returns:
        The outcome. Does not warn (see :func:`fused_available`).
    """
    try:
        plan = plan_build()
        if isinstance(plan, BuildResult):
            return plan
        plan.root.mkdir(parents=True, exist_ok=True)
        if _kernels_registered():  # a second library cannot register the same operators in this process
            if force:
                return failed("the kernels are already loaded in this process",
                             "run `python -m lightning_tiger.optim.build --force` in a fresh process")
            return _load_published(plan) or BuildResult(ok=True)
        if not force:
            loaded = _load_published(plan)
            if loaded is not None:
                return loaded
        lock = BuildLock(plan.root / f"{plan.name}.lock", _timeout())
        if not lock.acquire():
            log.warning("lightning_tiger: waited %.0f s for another process's kernel build (%s); building in "
                        "parallel", lock.timeout, lock.owner)
        try:
            if force:
                if plan.folder.exists():
                    move_aside(plan)
            else:
                loaded = _load_published(plan)  # published while this process waited for the lock
                if loaded is not None:
                    return loaded
            if lock.held:
                remove_dead_private_folders(plan)
            return _compile(plan)
        finally:
            lock.release()
    except Exception as err:  # fused_available must never raise: report and fall back
        return failed(f"unexpected {type(err).__name__}: {err}", FIX_DISABLE)


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, FusedKernelWarning, stacklevel=2)


def _fallback_message(result: BuildResult) -> str:
    return (f"lightning_tiger: the fused optimizer kernel is unavailable, so Tiger/Lion use the slower PyTorch "
            f"path. Cause: {result.reason}. Fix: {result.fix}.")


def _distributed_store() -> tuple[object, object, int] | None:
    """(default group, its store, world size) when torch.distributed is initialised with several ranks.

    Relies on the private ``torch.distributed.distributed_c10d._get_default_store`` (torch 2.x): torch has no
    public accessor for the default group's key-value store, and the store is what keeps the agreement free of
    collectives (so it cannot deadlock with the training's own). If torch removes it, the AttributeError reaches
    :func:`fused_available`, which logs it and lets each rank decide alone (no hang, no crash).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    if world <= 1:
        return None
    # The key-value store of the default group: non-collective operations with timeouts (see module docstring).
    return dist.group.WORLD, dist.distributed_c10d._get_default_store(), world


def _wait(store: object, key: str, timeout: float) -> bool:
    try:
        store.wait([key], datetime.timedelta(seconds=timeout))  # type: ignore[attr-defined]
    except (dist.DistStoreError, RuntimeError):
        return False
    return True


def _build_on_one_rank_per_machine(store: object, prefix: str, timeout: float) -> BuildResult:
    """The first rank of this (host, cache folder, key) builds; the others wait for it, then load its build."""
    plan = plan_build()
    if isinstance(plan, BuildResult):
        return plan
    node = hashlib.sha256(f"{socket.gethostname()}|{os.path.realpath(plan.folder)}".encode()).hexdigest()[:16]
    key = f"{prefix}build/{node}"
    if store.add(f"{key}/arrived", 1) == 1:  # type: ignore[attr-defined]
        result = build_kernels()
        store.set(f"{key}/ok", "1" if result.ok else "0")  # type: ignore[attr-defined]
        return result
    if _wait(store, f"{key}/ok", timeout) and store.get(f"{key}/ok") == b"0":  # type: ignore[attr-defined]
        return failed("the kernel build failed on another rank of this machine (its warning names the cause)",
                     "see that rank's warning")
    return build_kernels()  # loads the leader's build (or builds itself if the leader did not answer in time)


def _agree(store: object, prefix: str, ok: bool, world: int, timeout: float) -> bool:
    """Whether every rank reported success (the same answer on every rank, see the module docstring)."""
    if not ok:
        store.add(f"{prefix}failed", 1)  # type: ignore[attr-defined]  # before "reported": the last reporter sees it
    if store.add(f"{prefix}reported", 1) == world:  # type: ignore[attr-defined]
        failed = store.add(f"{prefix}failed", 0)  # type: ignore[attr-defined]
        store.compare_set(f"{prefix}decided", "", "1" if failed == 0 else "0")  # type: ignore[attr-defined]
    if not _wait(store, f"{prefix}decided", timeout):
        # First writer wins: ranks that report later read this "0" too, so the decision stays the same everywhere.
        store.compare_set(f"{prefix}decided", "", "0")  # type: ignore[attr-defined]
        _warn_once("agree-timeout", f"lightning_tiger: not every rank asked for the fused optimizer kernel within "
                   f"{timeout:g} s ({TIMEOUT_ENV}); every rank uses the PyTorch path so that they stay identical")
    return store.get(f"{prefix}decided") == b"1"  # type: ignore[attr-defined]


def _local_result() -> BuildResult:
    global _local
    if _local is None:
        if _kernels_registered():  # e.g. loaded by an earlier import of this module (python -m, reload)
            _local = BuildResult(ok=True)
        else:
            _local = build_kernels()
            if not _local.ok:
                _warn_once("local", _fallback_message(_local))
    return _local


def fused_available(device: torch.device | str = "cpu") -> bool:
    """Whether the fused kernels can run on ``device`` (builds or loads them once per process; never raises).

    Args:
        device: the device of the tensors to update. Only CPU has fused kernels.

    Returns:
        False on a non-CPU device, when ``LIGHTNING_TIGER_DISABLE_FUSED`` is set (checked on every call), when
        the kernels cannot be built or loaded (warned once with the cause and the fix: a
        :class:`FusedKernelWarning`), or — under ``torch.distributed`` — when that is so on any rank.
    """
    global _local
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        return False
    if dev.type != "cpu":
        return False
    disabled = env_disabled()
    try:
        group = _distributed_store()
    except Exception as err:  # pragma: no cover - defensive: a broken process group must not break training
        log.warning("lightning_tiger: cannot reach the process group's store (%r); deciding on this rank", err)
        group = None
    if group is None:
        if disabled:
            return False
        with _lock:
            return _local_result().ok
    pg, store, world = group
    with _lock:
        entry = _agreed.get(id(pg))
        if entry is None:
            timeout = _timeout()
            ok = False
            prefix = f"lightning_tiger/fused/{len(_agreed)}/"  # a fresh namespace per process group
            try:
                if not disabled:
                    if _local is None and not _kernels_registered():
                        _local = _build_on_one_rank_per_machine(store, prefix, timeout)
                        if not _local.ok:
                            _warn_once("local", _fallback_message(_local))
                    ok = _local_result().ok
                agreed = _agree(store, prefix, ok, world, timeout)
            except Exception as err:  # a store that lacks an operation: keep this rank's own answer, say so
                _warn_once("agree", f"lightning_tiger: could not agree on the fused kernel with the other ranks "
                           f"({type(err).__name__}: {err}); this rank decides alone, so ranks may differ")
                agreed = not disabled and _local_result().ok
            if ok and not agreed:
                _warn_once("others", "lightning_tiger: the fused optimizer kernel is unavailable on another rank, "
                           "so every rank uses the PyTorch path (ranks stay identical); that rank's warning "
                           "names the cause")
            entry = _agreed[id(pg)] = (pg, agreed)
    return entry[1] and not disabled


def kernel_status() -> BuildResult:
    """This process's build outcome so far (``ok=False, reason="not tried yet"`` before the first use)."""
    with _lock:
        return _local if _local is not None else BuildResult(ok=False, reason="not tried yet")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lightning_tiger.optim.build``: build (or find) the kernels and print their folder.

    Returns:
        0 when the kernels are built and load, 1 otherwise (the cause and the fix on stderr).
    """
    parser = argparse.ArgumentParser(prog="python -m lightning_tiger.optim.build",
                                     description="Build the fused C++ optimizer kernels of lightning_tiger ahead "
                                                 "of time (otherwise built at the first optimizer step).")
    parser.add_argument("--force", action="store_true", help="delete this environment's build and compile again")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = build_kernels(force=args.force)
    if not result.ok:
        print(f"error: {result.reason}\nfix: {result.fix}", file=sys.stderr)
        return 1
    print(f"{'built' if result.built else 'already built'}: {result.folder}")
    if env_disabled():
        print(f"note: {DISABLE_ENV} is set, so the optimizers will not use it", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
