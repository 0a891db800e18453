"""Build, cache and load the fused C++ optimizer kernels of ``csrc/`` — once per machine, never hanging.

The kernels (:mod:`lightning_tiger.optim._fused`) are compiled with the system C++ compiler the first time a
process needs them, which takes about 10 s; later runs load the cached library. Prebuild them (prints the folder,
exits non-zero on failure)::

    python -m lightning_tiger.optim.build [--force]

**Cache.** ``$TORCH_EXTENSIONS_DIR/lightning_tiger/lightning_tiger_fused_<key>/`` (PyTorch's extension cache root,
default ``~/.cache/torch_extensions``). The key hashes the kernel sources, the compiler flags, the torch build
(version, git revision, CUDA/ROCm version or CPU build, install path, C++ ABI), Python's version and extension
suffix, the compiler (resolved path and ``--version`` output) and the CPU (the build uses ``-march=native``), so two
environments sharing the cache each keep their own build instead of overwriting each other's.

**No hang after a killed build.** A build compiles into a fresh private folder (so PyTorch's own ``lock`` file,
which it waits on forever, can never be one left by a dead build) and is published by an atomic ``rename``: a
published folder is always complete. Builds of the same key are serialised by an exclusive ``flock`` on a lock file
next to it (never deleted; it holds the builder's host, pid and start time for messages). The operating system
releases the lock when its holder dies, so a killed build never blocks; a process that has waited
``LIGHTNING_TIGER_BUILD_TIMEOUT`` seconds (default 600) for a live (or hung) builder builds in parallel in its own
folder (harmless: the first to publish wins). The lock only saves work; correctness never depends on it. A
published folder without a loadable build (damaged by hand) is replaced by the next build.

**Messages.** One WARNING-level log line before compiling (Python prints WARNING records to stderr even when
logging is not configured); a :class:`FusedKernelWarning` naming the cause and the fix when the kernels cannot
be used and the PyTorch path is taken; the full compiler output in ``<key>.failed.log`` next to the build.

**Distributed** (``torch.distributed`` initialised, world size > 1). The first rank of each (host, cache folder,
key) to need the kernels builds while the others of that machine wait for its outcome and then load its build
(one build per machine). Then every rank reports success or failure and all of them use the kernels only if all
succeeded, so ranks cannot drift apart by rounding differences between the paths. Both exchanges go through the
process group's key-value store (``add``/``compare_set``/``wait``), not collectives: they cannot interleave with
the training's collectives, and a rank that never asks for the kernels makes the others wait at most
``LIGHTNING_TIGER_BUILD_TIMEOUT`` seconds, after which the decision is forced to the fallback for every rank
(warned) — never a hang. The agreement happens at each process's first :func:`fused_available` call after the
group is initialised (for Tiger/Lion: construction with ``fused=True``, else the first step, which every rank
runs).

``LIGHTNING_TIGER_DISABLE_FUSED=1`` disables the kernels (checked on every call; under ``torch.distributed`` a
rank with it set makes every rank fall back).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

try:
    import fcntl
except ImportError:  # Windows: nothing is built there (see _plan), so no BuildLock is ever taken
    fcntl = None  # type: ignore[assignment]

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

DISABLE_ENV = "LIGHTNING_TIGER_DISABLE_FUSED"
TIMEOUT_ENV = "LIGHTNING_TIGER_BUILD_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
CSRC = Path(__file__).parent / "csrc"
SOURCES = ("fused_optim.cpp",)
LIB_PREFIX = "lightning_tiger_fused"
# Bump when the cache layout changes, so an older layout is never read as the current one.
_LAYOUT = "2"
_BUILD_INFO = "build.json"


class FusedKernelWarning(UserWarning):
    """The fused kernels cannot be used here; the optimizers take the (slower) pure-PyTorch path."""


@dataclass(frozen=True)
class BuildResult:
    """Outcome of making the kernels available in this process.

    Attributes:
        ok: the kernels are registered (``torch.ops.lightning_tiger``) in this process.
        folder: the published build folder (None when there is none).
        built: this process compiled them (False when it loaded a cached build).
        reason: why not ``ok`` ("" when ok).
        fix: what the user can do about it ("" when ok).
    """

    ok: bool
    folder: Path | None = None
    built: bool = False
    reason: str = ""
    fix: str = ""


@dataclass(frozen=True)
class _Plan:
    name: str
    root: Path
    compiler: str
    compiler_version: str

    @property
    def folder(self) -> Path:
        return self.root / self.name


_lock = threading.Lock()
_local: BuildResult | None = None  # None: not tried yet in this process
_agreed: dict[int, tuple[object, bool]] = {}  # id(group) -> (group, every rank ok); the group is kept alive
_warned: set[str] = set()

_FIX_DISABLE = f"or set {DISABLE_ENV}=1 to use the PyTorch path without this warning"


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


def cache_root() -> Path:
    """``$TORCH_EXTENSIONS_DIR/lightning_tiger`` (PyTorch's default root when the variable is unset)."""
    # Imported here because the module costs ~0.35 s and is needed only once the kernels are first requested.
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return Path(root).expanduser() / "lightning_tiger"


def torch_signature() -> str:
    """The torch build and Python ABI the library links against: any change needs another build."""
    return "|".join(str(x) for x in (
        torch.__version__, torch.version.git_version, torch.version.cuda, getattr(torch.version, "hip", None),
        os.path.realpath(os.path.dirname(torch.__file__)), torch.compiled_with_cxx11_abi(),
        sys.version, sysconfig.get_config_var("EXT_SUFFIX"),
    ))


def cpu_signature() -> str:
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


def flag_sets() -> list[tuple[list[str], list[str]]]:
    """(cflags, ldflags) to try in order: native ISA + OpenMP, portable + OpenMP, portable serial."""
    base = ["-O3", "-ffp-contract=off", "-fno-strict-aliasing"]
    omp = (["-fopenmp"], ["-fopenmp"])
    native = ["-march=native"] if platform.machine() in ("x86_64", "AMD64") else ["-mcpu=native"]
    return [
        (base + native + omp[0], omp[1]),
        (base + omp[0], omp[1]),
        (base, []),
    ]


def _source_files() -> list[Path]:
    # every file of csrc/ (headers included) enters the key; only SOURCES are compiled
    return sorted(p for p in CSRC.iterdir() if p.is_file())


def _fail(reason: str, fix: str) -> BuildResult:
    return BuildResult(ok=False, reason=reason, fix=fix)


def _plan() -> _Plan | BuildResult:
    """The cache folder for this environment, or a failed result saying why nothing can be built."""
    from torch.utils import cpp_extension  # see cache_root

    if platform.system() == "Windows":
        return _fail("the fused kernels are not built on Windows", "none needed: the PyTorch path is used")
    cxx = os.environ.get("CXX", "c++")
    path = shutil.which(cxx)
    if path is None:
        return _fail(f"no C++ compiler found (CXX={cxx!r})",
                     f"install one (e.g. `apt install g++`) or point CXX at it, {_FIX_DISABLE}")
    try:
        proc = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as err:
        return _fail(f"the C++ compiler {path} does not run ({err})", f"fix or replace it (CXX), {_FIX_DISABLE}")
    if proc.returncode != 0:
        return _fail(f"`{path} --version` failed (exit {proc.returncode}): {_tail(proc.stderr or proc.stdout)}",
                     f"fix or replace the compiler (CXX), {_FIX_DISABLE}")
    if not cpp_extension.is_ninja_available():
        return _fail("ninja is not installed (PyTorch needs it to build extensions)",
                     f"`pip install ninja`, {_FIX_DISABLE}")
    digest = hashlib.sha256(f"layout {_LAYOUT}\n".encode())
    for src in _source_files():
        digest.update(src.name.encode() + b"\0" + src.read_bytes() + b"\0")
    for part in (repr(flag_sets()), torch_signature(), os.path.realpath(path), proc.stdout, cpu_signature()):
        digest.update(part.encode() + b"\0")
    return _Plan(name=f"{LIB_PREFIX}_{digest.hexdigest()[:16]}", root=cache_root(), compiler=path,
                 compiler_version=proc.stdout.splitlines()[0] if proc.stdout else "")


def build_folder() -> Path | None:
    """This environment's cache folder for the kernels, whether built yet or not (None when nothing can be built
    here: no compiler, no ninja, Windows). Its lock file is ``<folder>.lock``, a failed build's compiler output
    ``<folder>.failed.log``."""
    plan = _plan()
    return None if isinstance(plan, BuildResult) else plan.folder


def _tail(text: str, lines: int = 6) -> str:
    kept = [ln for ln in text.strip().splitlines() if ln.strip()][-lines:]
    return " | ".join(kept)[-800:]


def _compiler_errors(text: str) -> str:
    """The compiler's error lines from PyTorch's build exception (else its last lines), for a one-line cause."""
    found = [ln.strip() for ln in text.splitlines()
             if re.search(r"\berror\b", ln, re.IGNORECASE) and "Error building extension" not in ln]
    return " | ".join(found[:3])[:600] if found else _tail(text, 2)


def _kernels_registered() -> bool:
    return hasattr(torch.ops, "lightning_tiger") and hasattr(torch.ops.lightning_tiger, "tiger_step_")


def _published_library(folder: Path) -> Path | None:
    try:
        info = json.loads((folder / _BUILD_INFO).read_text())
        lib = folder / info["library"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return lib if lib.is_file() else None


def _load_published(plan: _Plan) -> BuildResult | None:
    """Load the published build of ``plan`` (None when there is none)."""
    lib = _published_library(plan.folder)
    if lib is None:
        return None
    try:
        if not _kernels_registered():
            torch.ops.load_library(str(lib))
    except Exception as err:  # a damaged or foreign file: say so and let the caller fall back
        return _fail(f"loading {lib} failed ({type(err).__name__}: {_tail(str(err), 2)})",
                     f"delete {plan.folder} and run `python -m lightning_tiger.optim.build`, {_FIX_DISABLE}")
    if not _kernels_registered():
        return _fail(f"{lib} did not register the lightning_tiger kernels",
                     f"delete {plan.folder} and run `python -m lightning_tiger.optim.build`")
    log.info("lightning_tiger: fused optimizer kernel loaded from %s", plan.folder)
    return BuildResult(ok=True, folder=plan.folder)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


class BuildLock:
    """An exclusive ``flock`` on a lock file that is never deleted, with a bounded wait.

    The kernel releases the lock when its holder dies (however it dies), so a killed build never blocks the next
    one, and no process ever judges a lock stale and deletes it: there is no check-then-delete race between
    waiters. The holder writes its host, pid and start time into the file, for the message of a waiter that
    gives up.

    Args:
        path: the lock file (created if missing, left in place).
        timeout: seconds :meth:`acquire` waits for a live holder before giving up.
    """

    def __init__(self, path: Path, timeout: float) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.held = False
        self.owner: dict | None = None  # the holder seen while waiting (None when unknown)
        self._fd: int | None = None

    def _read_owner(self, fd: int) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.owner = json.loads(os.pread(fd, 4096, 0).decode() or "null")

    def acquire(self) -> bool:
        """Take the lock; False after ``timeout`` seconds of a live holder (never blocks longer)."""
        if self.held:
            return True
        deadline = time.monotonic() + self.timeout
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    # polled rather than a blocking flock: a blocking call cannot be given a timeout
                    self._read_owner(fd)
                    if time.monotonic() >= deadline:
                        os.close(fd)
                        return False
                    time.sleep(0.2)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                      "time": time.time()}).encode(), 0)
        except BaseException:
            os.close(fd)  # closing releases the lock too
            raise
        self._fd = fd
        self.held = True
        return True

    def release(self) -> None:
        """Release the lock (the file stays: deleting it would let two processes lock two different files)."""
        if not self.held or self._fd is None:
            return
        self.held = False
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # releases the flock


def _host_tag() -> str:
    # "-" separates the fields of a private folder's name
    return socket.gethostname().replace("-", "_")


def _remove_dead_private_folders(plan: _Plan) -> None:
    """Private build folders of dead processes on this host (a killed build): free the disk."""
    host = _host_tag()
    for d in plan.root.glob(f".{plan.name}.tmp-*"):
        parts = d.name.rsplit(".tmp-", 1)[-1].split("-")
        if len(parts) >= 3 and parts[-3] == host and parts[-2].isdigit() and not _pid_alive(int(parts[-2])):
            shutil.rmtree(d, ignore_errors=True)


def _move_aside(plan: _Plan) -> None:
    """Delete the published folder: renamed away first (atomic: readers see the old or no folder, never half of
    one), then removed."""
    trash = plan.root / f".{plan.name}.old-{os.getpid()}-{time.time_ns()}"
    os.rename(plan.folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _publish(private: Path, plan: _Plan) -> None:
    """Rename the complete build ``private`` to ``plan.folder``.

    The rename fails when the folder exists. If it holds a loadable build (a process that did not wait for the
    lock published first), keep it; if not (no valid ``build.json``, the library deleted), it would make every
    later process compile again, so it is moved aside and the rename retried. Two processes replacing the same
    damaged folder at once can at worst replace each other's complete build: both are valid.
    """
    try:
        os.rename(private, plan.folder)
        return
    except OSError:
        if _published_library(plan.folder) is not None:
            return
    log.warning("lightning_tiger: replacing the damaged kernel build folder %s (no loadable build in it)",
                plan.folder)
    with contextlib.suppress(FileNotFoundError):  # another process may have moved it aside already
        _move_aside(plan)
    with contextlib.suppress(OSError):  # another process published in between: keep theirs
        os.rename(private, plan.folder)


def _compile(plan: _Plan) -> BuildResult:
    """Compile into a private folder, load, and publish it as ``plan.folder`` by an atomic rename."""
    from torch.utils import cpp_extension  # see cache_root

    log.warning("lightning_tiger: building the fused optimizer kernel once (~10 s, cached for later runs) in %s",
                plan.folder)
    start = time.monotonic()
    host = _host_tag()
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
            (private / _BUILD_INFO).write_text(json.dumps({
                "library": libs[0].name, "cflags": cflags, "ldflags": ldflags, "compiler": plan.compiler,
                "compiler_version": plan.compiler_version, "torch": torch.__version__,
                "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            }, indent=1))
            for a in private.glob("attempt*"):
                shutil.rmtree(a, ignore_errors=True)
            private.chmod(0o755)  # mkdtemp makes it private to this user; the cache may be shared
            _publish(private, plan)
            log.info("lightning_tiger: fused optimizer kernel built in %.1f s: %s", time.monotonic() - start,
                     plan.folder)
            return BuildResult(ok=True, folder=plan.folder, built=True)
    finally:
        shutil.rmtree(private, ignore_errors=True)  # gone already when published
    log_file = plan.root / f"{plan.name}.failed.log"
    with contextlib.suppress(OSError):
        log_file.write_text("\n\n".join(errors))
    return _fail(f"the C++ compiler {plan.compiler} failed ({_compiler_errors(errors[-1] if errors else '')})",
                 f"see {log_file} for the full output; fix the toolchain (or point CXX at a working compiler) "
                 f"and rerun `python -m lightning_tiger.optim.build`, {_FIX_DISABLE}")


def build_kernels(force: bool = False) -> BuildResult:
    """Load the cached kernels, or build, publish and load them (this process only; never raises).

    Args:
        force: delete this environment's published build first and compile again.

    Returns:
        The outcome. Does not warn (see :func:`fused_available`).
    """
    try:
        plan = _plan()
        if isinstance(plan, BuildResult):
            return plan
        plan.root.mkdir(parents=True, exist_ok=True)
        if _kernels_registered():  # a second library cannot register the same operators in this process
            if force:
                return _fail("the kernels are already loaded in this process",
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
                    _move_aside(plan)
            else:
                loaded = _load_published(plan)  # published while this process waited for the lock
                if loaded is not None:
                    return loaded
            if lock.held:
                _remove_dead_private_folders(plan)
            return _compile(plan)
        finally:
            lock.release()
    except Exception as err:  # fused_available must never raise: report and fall back
        return _fail(f"unexpected {type(err).__name__}: {err}", _FIX_DISABLE)


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
    plan = _plan()
    if isinstance(plan, BuildResult):
        return plan
    node = hashlib.sha256(f"{socket.gethostname()}|{os.path.realpath(plan.folder)}".encode()).hexdigest()[:16]
    key = f"{prefix}build/{node}"
    if store.add(f"{key}/arrived", 1) == 1:  # type: ignore[attr-defined]
        result = build_kernels()
        store.set(f"{key}/ok", "1" if result.ok else "0")  # type: ignore[attr-defined]
        return result
    if _wait(store, f"{key}/ok", timeout) and store.get(f"{key}/ok") == b"0":  # type: ignore[attr-defined]
        return _fail("the kernel build failed on another rank of this machine (its warning names the cause)",
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
