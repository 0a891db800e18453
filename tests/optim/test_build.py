"""Building the fused kernels (lightning_tiger.optim.build): visible messages, fallback, cache key, locks.

Every build runs in a subprocess with its own temporary ``TORCH_EXTENSIONS_DIR`` (a process loads the kernels
once; the cache must start empty). A failing compiler is a script that answers ``--version`` like the real one
and fails every compile or link, so the fallback is exercised without a real compile; tests that compile for
real are marked slow.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from lightning_tiger.optim import build, build_cache

REPO = Path(__file__).resolve().parents[2]
BUILDING = "building the fused optimizer kernel once"
SIMULATED = "error: simulated compiler failure"

# Runs Tiger with the default path choice (fused when available) and with the PyTorch path; they must agree.
TRAIN = r"""
import torch
from lightning_tiger.optim import Tiger, _fused

def run(fused):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = Tiger.from_module(model, lr=1e-2, fused=fused)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(16, 8)).square().mean().backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]

default, pytorch = run(None), run(False)
assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(default, pytorch))
print("AVAILABLE", _fused.fused_available())
"""


def failing_compiler(tmp_path: Path) -> Path:
    """A ``CXX`` that reports the real compiler's version but fails every compile and link."""
    path = tmp_path / "failing-c++"
    path.write_text("#!/bin/sh\n"
                    'for a in "$@"; do case "$a" in -c|-o) '
                    f'echo "{SIMULATED}" >&2; exit 1;; esac; done\n'
                    'exec c++ "$@"\n')
    path.chmod(0o755)
    return path


def env_for(ext_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (build.DISABLE_ENV, build.TIMEOUT_ENV, "CXX")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["TORCH_EXTENSIONS_DIR"] = str(ext_dir)
    env.update(extra)
    return env


def run_py(args: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, check=False)


def folder_in(env: dict[str, str]) -> Path:
    """The cache folder the environment ``env`` builds into (asked in a subprocess: CXX and paths differ)."""
    out = run_py(["-c", "from lightning_tiger.optim import build; print(build.build_folder())"], env, 120)
    assert out.returncode == 0, out.stderr
    return Path(out.stdout.strip().splitlines()[-1])


needs_compiler = pytest.mark.skipif(build.build_folder() is None, reason="no C++ compiler/ninja here")


@needs_compiler
def test_failing_compiler_falls_back_with_one_visible_line_and_one_warning(tmp_path: Path) -> None:
    env = env_for(tmp_path / "ext", CXX=str(failing_compiler(tmp_path)))
    out = run_py(["-c", TRAIN], env)
    assert out.returncode == 0, out.stderr
    assert "AVAILABLE False" in out.stdout
    # default logging and warning filters: both reach stderr
    assert out.stderr.count(BUILDING) == 1, out.stderr
    warning = [ln for ln in out.stderr.splitlines() if "FusedKernelWarning" in ln]
    assert len(warning) == 1, out.stderr
    assert "Cause:" in warning[0] and SIMULATED in warning[0] and "Fix:" in warning[0]
    assert "python -m lightning_tiger.optim.build" in warning[0]
    logs = list((tmp_path / "ext" / "lightning_tiger").glob("*.failed.log"))
    assert len(logs) == 1 and SIMULATED in logs[0].read_text()


@needs_compiler
def test_prebuild_command_exits_non_zero_naming_the_cause(tmp_path: Path) -> None:
    env = env_for(tmp_path / "ext", CXX=str(failing_compiler(tmp_path)))
    out = run_py(["-m", "lightning_tiger.optim.build"], env)
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "error: the C++ compiler" in out.stderr and SIMULATED in out.stderr and "fix:" in out.stderr


def test_missing_compiler_falls_back_with_warning(tmp_path: Path) -> None:
    env = env_for(tmp_path / "ext", CXX=str(tmp_path / "no-such-c++"))
    out = run_py(["-c", TRAIN], env)
    assert out.returncode == 0, out.stderr
    assert "AVAILABLE False" in out.stdout
    assert BUILDING not in out.stderr
    warning = [ln for ln in out.stderr.splitlines() if "FusedKernelWarning" in ln]
    assert len(warning) == 1 and "no C++ compiler found" in warning[0] and "CXX" in warning[0], out.stderr


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# Plants the lock file of the build about to start (in the subprocess, so that its age is what the test says), as a
# dead holder leaves it (its record, no lock) or as a live holder holds it (flocked through another open file
# description, which conflicts with the build's own even in the same process).
PLANT = """
import fcntl, json, os, socket, sys, time
from pathlib import Path
from lightning_tiger.optim import build
pid, held = int(sys.argv[1]), sys.argv[2] == "held"
folder = build.build_folder()
folder.parent.mkdir(parents=True)
Path(f"{folder}.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "time": time.time()}))
if held:
    holder = os.open(f"{folder}.lock", os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
"""


@needs_compiler
@pytest.mark.parametrize("holder", ["dead", "live"])
def test_dead_or_live_lock_holder_does_not_hang_the_build(tmp_path: Path, holder: str) -> None:
    """A lock left by a dead build does not block; a live (or hung) holder is given up on after the timeout."""
    env = env_for(tmp_path / "ext", CXX=str(failing_compiler(tmp_path)), LIGHTNING_TIGER_BUILD_TIMEOUT="4")
    pid = _dead_pid() if holder == "dead" else os.getpid()
    out = run_py(["-c", PLANT + TRAIN, str(pid), "held" if holder == "live" else "free"], env, timeout=120)
    assert out.returncode == 0, out.stderr  # a hang: TimeoutExpired
    assert out.stderr.count(BUILDING) == 1 and SIMULATED in out.stderr, out.stderr  # it went on to compile
    waited = "waited 4 s for another process's kernel build"
    if holder == "dead":
        assert waited not in out.stderr, out.stderr
    else:
        assert waited in out.stderr and f"'pid': {pid}" in out.stderr, out.stderr


HOLD = """
import sys, time
from pathlib import Path
from lightning_tiger.optim import build
lock = build.BuildLock(Path(sys.argv[1]), timeout=5)
assert lock.acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_lock_excludes_and_recovers_from_a_killed_holder(tmp_path: Path) -> None:
    path = tmp_path / "k.lock"
    first, second = (build.BuildLock(path, timeout=0.3) for _ in range(2))
    assert first.acquire()
    info = json.loads(path.read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    assert not second.acquire()  # live holder: gives up after the timeout instead of blocking
    assert second.owner is not None and second.owner["pid"] == os.getpid()
    first.release()
    assert second.acquire()
    second.release()
    env = env_for(tmp_path / "ext")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], env=env, cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert not first.acquire()
        holder.kill()  # killed while holding: the kernel releases its lock, nothing is left to clear
        holder.wait()
        assert build.BuildLock(path, timeout=5).acquire()
    finally:
        holder.kill()
        holder.wait()


def test_lock_admits_one_holder_at_a_time_after_a_dead_holder(tmp_path: Path) -> None:
    """Waiters that all find a dead holder's lock must not both take it (the old check-then-delete race)."""
    path = tmp_path / "k.lock"
    dead = _dead_pid()
    overlaps, holding = [], []

    def contend() -> None:
        lock = build.BuildLock(path, timeout=30)
        assert lock.acquire()
        holding.append(1)
        overlaps.append(len(holding))
        time.sleep(0.01)
        holding.pop()
        lock.release()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so that the waiters interleave between check and act
    try:
        for _ in range(10):
            path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead, "time": time.time()}))
            threads = [threading.Thread(target=contend) for _ in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        sys.setswitchinterval(interval)
    assert len(overlaps) == 60 and max(overlaps) == 1, overlaps


@needs_compiler
def test_cache_key_covers_torch_install_and_compiler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two environments sharing the cache never share (and so never rebuild) each other's folder."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    base = build.build_folder()
    assert base is not None and base.parent == tmp_path / "lightning_tiger"
    assert build.build_folder() == base  # deterministic

    monkeypatch.setattr(torch, "__file__", str(tmp_path / "other-venv" / "torch" / "__init__.py"))
    assert build.build_folder() != base
    monkeypatch.undo()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))

    monkeypatch.setattr(torch.version, "git_version", "0" * 40)
    assert build.build_folder() != base
    monkeypatch.undo()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))

    wrapper = tmp_path / "bin" / "c++"  # the same compiler under another path
    wrapper.parent.mkdir()
    wrapper.write_text('#!/bin/sh\nexec c++ "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CXX", str(wrapper))
    assert build.build_folder() != base
    other_version = tmp_path / "bin" / "c++-other"  # same path semantics, another --version
    other_version.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo "c++ 99.0"; exit 0; fi\nexec c++ "$@"\n')
    other_version.chmod(0o755)
    monkeypatch.setenv("CXX", str(other_version))
    assert build.build_folder() not in (base, None)


def test_bad_timeout_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    for raw in ("0", "-3", "soon", "inf"):
        monkeypatch.setenv(build.TIMEOUT_ENV, raw)
        with pytest.raises(ValueError, match=build.TIMEOUT_ENV):
            build.build_timeout()
    monkeypatch.setenv(build.TIMEOUT_ENV, "2.5")
    assert build.build_timeout() == 2.5


@pytest.mark.slow
@needs_compiler
def test_build_once_then_load_and_use(tmp_path: Path) -> None:
    env = env_for(tmp_path / "ext")
    first = run_py(["-m", "lightning_tiger.optim.build"], env, timeout=600)
    assert first.returncode == 0, first.stderr
    assert first.stderr.count(BUILDING) == 1
    folder = Path(re.search(r"^built: (.+)$", first.stdout, re.M).group(1))
    assert folder == folder_in(env) and (folder / "build.json").is_file()
    again = run_py(["-m", "lightning_tiger.optim.build"], env)
    assert again.returncode == 0 and f"already built: {folder}" in again.stdout and BUILDING not in again.stderr
    train = run_py(["-c", TRAIN], env)
    assert train.returncode == 0, train.stderr
    assert "AVAILABLE True" in train.stdout and BUILDING not in train.stderr and "Warning" not in train.stderr


@pytest.mark.slow
@needs_compiler
def test_build_killed_mid_compile_does_not_hang_the_next_run(tmp_path: Path) -> None:
    """The reported hang: a build killed while compiling left PyTorch's lock and every later run waited forever."""
    ext = tmp_path / "ext"
    env = env_for(ext)
    code = "import sys; from lightning_tiger.optim import _fused; sys.exit(0 if _fused.fused_available() else 3)"
    victim = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not any(p.name == "build.ninja" for p in ext.rglob("*")):  # the compiler is running
            assert victim.poll() is None, "the build ended before it could be killed"
            assert time.monotonic() < deadline, "the build never started"
            time.sleep(0.1)
        time.sleep(1.0)
    finally:
        os.killpg(victim.pid, signal.SIGKILL)  # with the compiler it started
        victim.wait()
    out = run_py(["-c", code], env, timeout=600)  # before the fix: TimeoutExpired (waits on the dead build)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count(BUILDING) == 1, out.stderr
    assert "waited" not in out.stderr  # its lock died with it
    assert not list((ext / "lightning_tiger").glob(".*.tmp-*"))  # and its half-built folder removed


@pytest.mark.parametrize("damage", ["no build.json", "library deleted"])
def test_damaged_published_folder_is_replaced_by_the_next_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                damage: str) -> None:
    """A published folder without a loadable build is moved aside, so the next build publishes (else every later
    process would compile again, its rename failing on the non-empty folder)."""
    plan = build_cache.BuildPlan(name="lightning_tiger_fused_test", root=tmp_path, compiler="c++",
                                 compiler_version="c++ 1")
    plan.folder.mkdir()
    (plan.folder / "stale.o").write_text("left over")
    if damage == "library deleted":
        (plan.folder / "build.json").write_text(json.dumps({"library": "gone.so"}))

    def fake_load(name: str, build_directory: str, **_: object) -> None:  # "compiles" without a compiler
        (Path(build_directory) / f"{name}.so").write_text("library")

    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(build, "_kernels_registered", lambda: True)
    result = build._compile(plan)
    assert result.ok and result.built
    info = json.loads((plan.folder / "build.json").read_text())
    assert (plan.folder / info["library"]).read_text() == "library"
    assert not (plan.folder / "stale.o").exists()
    assert [p.name for p in tmp_path.iterdir()] == [plan.name]  # no private or set-aside folder left behind
