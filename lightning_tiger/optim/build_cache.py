"""Where the fused kernels' build lives and how it is published: the cache key of this environment, the
folder layout, and the atomic publication of a finished build (see :mod:`lightning_tiger.optim.build`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .build_lock import pid_alive

__all__ = [
    "BUILD_INFO",
    "CSRC",
    "DISABLE_ENV",
    "FIX_DISABLE",
    "LIB_PREFIX",
    "SOURCES",
    "BuildPlan",
    "BuildResult",
    "build_folder",
    "cache_root",
    "cpu_signature",
    "failed",
    "flag_sets",
    "host_tag",
    "move_aside",
    "plan_build",
    "publish",
    "published_library",
    "remove_dead_private_folders",
    "tail",
    "torch_signature",
]

log = logging.getLogger(__name__)

DISABLE_ENV = "LIGHTNING_TIGER_DISABLE_FUSED"
CSRC = Path(__file__).parent / "csrc"
SOURCES = ("fused_optim.cpp",)
LIB_PREFIX = "lightning_tiger_fused"
# Bump when the cache layout changes, so an older layout is never read as the current one.
_LAYOUT = "2"
BUILD_INFO = "build.json"
FIX_DISABLE = f"or set {DISABLE_ENV}=1 to use the PyTorch path without this warning"


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
class BuildPlan:
    """This environment's build: its folder ``root / name`` and the compiler that makes it."""

    name: str
    root: Path
    compiler: str
    compiler_version: str

    @property
    def folder(self) -> Path:
        return self.root / self.name


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


def failed(reason: str, fix: str) -> BuildResult:
    """A failed :class:`BuildResult` with its cause and fix."""
    return BuildResult(ok=False, reason=reason, fix=fix)


def plan_build() -> BuildPlan | BuildResult:
    """The cache folder for this environment, or a failed result saying why nothing can be built."""
    from torch.utils import cpp_extension  # see cache_root

    if platform.system() == "Windows":
        return failed("the fused kernels are not built on Windows", "none needed: the PyTorch path is used")
    cxx = os.environ.get("CXX", "c++")
    path = shutil.which(cxx)
    if path is None:
        return failed(f"no C++ compiler found (CXX={cxx!r})",
                     f"install one (e.g. `apt install g++`) or point CXX at it, {FIX_DISABLE}")
    try:
        proc = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as err:
        return failed(f"the C++ compiler {path} does not run ({err})", f"fix or replace it (CXX), {FIX_DISABLE}")
    if proc.returncode != 0:
        return failed(f"`{path} --version` failed (exit {proc.returncode}): {tail(proc.stderr or proc.stdout)}",
                     f"fix or replace the compiler (CXX), {FIX_DISABLE}")
    if not cpp_extension.is_ninja_available():
        return failed("ninja is not installed (PyTorch needs it to build extensions)",
                     f"`pip install ninja`, {FIX_DISABLE}")
    digest = hashlib.sha256(f"layout {_LAYOUT}\n".encode())
    for src in _source_files():
        digest.update(src.name.encode() + b"\0" + src.read_bytes() + b"\0")
    for part in (repr(flag_sets()), torch_signature(), os.path.realpath(path), proc.stdout, cpu_signature()):
        digest.update(part.encode() + b"\0")
    return BuildPlan(name=f"{LIB_PREFIX}_{digest.hexdigest()[:16]}", root=cache_root(), compiler=path,
                 compiler_version=proc.stdout.splitlines()[0] if proc.stdout else "")


def build_folder() -> Path | None:
    """This environment's cache folder for the kernels, whether built yet or not (None when nothing can be built
    here: no compiler, no ninja, Windows). Its lock file is ``<folder>.lock``, a failed build's compiler output
    ``<folder>.failed.log``."""
    plan = plan_build()
    return None if isinstance(plan, BuildResult) else plan.folder


def tail(text: str, lines: int = 6) -> str:
    """The last non-blank ``lines`` of ``text`` on one line (at most 800 characters), for messages."""
    kept = [ln for ln in text.strip().splitlines() if ln.strip()][-lines:]
    return " | ".join(kept)[-800:]


def published_library(folder: Path) -> Path | None:
    """The library a published build folder names in its ``build.json``, if that file exists."""
    try:
        info = json.loads((folder / BUILD_INFO).read_text())
        lib = folder / info["library"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return lib if lib.is_file() else None


def host_tag() -> str:
    """This host's name as it appears in private build folders' names."""
    # "-" separates the fields of a private folder's name
    return socket.gethostname().replace("-", "_")


def remove_dead_private_folders(plan: BuildPlan) -> None:
    """Private build folders of dead processes on this host (a killed build): free the disk."""
    host = host_tag()
    for d in plan.root.glob(f".{plan.name}.tmp-*"):
        parts = d.name.rsplit(".tmp-", 1)[-1].split("-")
        if len(parts) >= 3 and parts[-3] == host and parts[-2].isdigit() and not pid_alive(int(parts[-2])):
            shutil.rmtree(d, ignore_errors=True)


def move_aside(plan: BuildPlan) -> None:
    """Delete the published folder: renamed away first (atomic: readers see the old or no folder, never half of
    one), then removed."""
    trash = plan.root / f".{plan.name}.old-{os.getpid()}-{time.time_ns()}"
    os.rename(plan.folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def publish(private: Path, plan: BuildPlan) -> None:
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
        if published_library(plan.folder) is not None:
            return
    log.warning("lightning_tiger: replacing the damaged kernel build folder %s (no loadable build in it)",
                plan.folder)
    with contextlib.suppress(FileNotFoundError):  # another process may have moved it aside already
        move_aside(plan)
    with contextlib.suppress(OSError):  # another process published in between: keep theirs
        os.rename(private, plan.folder)
