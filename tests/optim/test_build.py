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
import time
from pathlib import Path

import pytest
import torch

from lightning_tiger.optim import build

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
    opt = Tiger(model.parameters(), lr=1e-2, fused=fused)
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


# Plants the lock file of the build about to start (in the subprocess, so that its age is what the test says).
PLANT = """
import json, socket, sys, time
from pathlib import Path
from lightning_tiger.optim import build
pid, age = int(sys.argv[1]), float(sys.argv[2])
folder = build.build_folder()
folder.parent.mkdir(parents=True)
Path(f"{folder}.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "time": time.time() - age}))
"""


@needs_compiler
@pytest.mark.parametrize("holder", ["dead pid", "live pid, old", "live pid, fresh"])
def test_stale_or_held_lock_does_not_hang_the_build(tmp_path: Path, holder: str) -> None:
    """A lock left by a dead build, or held too long, is passed within the timeout (the compile then runs)."""
    env = env_for(tmp_path / "ext", CXX=str(failing_compiler(tmp_path)), LIGHTNING_TIGER_BUILD_TIMEOUT="4")
    pid = _dead_pid() if holder == "dead pid" else os.getpid()
    age = 3600 if holder == "live pid, old" else 0
    out = run_py(["-c", PLANT + TRAIN, str(pid), str(age)], env, timeout=120)  # a hang: TimeoutExpired
    assert out.returncode == 0, out.stderr
    assert out.stderr.count(BUILDING) == 1 and SIMULATED in out.stderr, out.stderr  # it went on to compile
    # a live builder is given up on once the timeout has passed: by its lock's age or by the wait's deadline
    expected = {"dead pid": [f"(its process {pid} is dead)"], "live pid, old": [f"(held by {socket.gethostname()}:"],
                "live pid, fresh": ["waited 4 s for another process's kernel build", " s (> 4 s))"]}[holder]
    assert any(e in out.stderr for e in expected), out.stderr


def test_lock_excludes_and_recovers(tmp_path: Path) -> None:
    path = tmp_path / "k.lock"
    first, second = (build.BuildLock(path, timeout=0.3, stale_after=60) for _ in range(2))
    assert first.acquire()
    info = json.loads(path.read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    assert not second.acquire()  # live owner, young lock: gives up after the timeout instead of blocking
    first.release()
    assert not path.exists()
    assert second.acquire()
    first.held = True  # a holder whose lock was judged stale and taken over must not delete the new owner's
    first.release()
    assert path.exists()
    second.release()
    assert not path.exists()
    path.write_text("")  # creator died before writing: stale once it is old
    old = time.time() - 60
    os.utime(path, (old, old))
    assert build.BuildLock(path, timeout=0.3, stale_after=60).acquire()


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
    assert f"(its process {victim.pid} is dead)" in out.stderr  # its lock was recognised as stale
    assert not list((ext / "lightning_tiger").glob(".*.tmp-*"))  # and its half-built folder removed


@pytest.mark.parametrize("damage", ["no build.json", "library deleted"])
def test_damaged_published_folder_is_replaced_by_the_next_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                damage: str) -> None:
    """A published folder without a loadable build is moved aside, so the next build publishes (else every later
    process would compile again, its rename failing on the non-empty folder)."""
    plan = build._Plan(name="lightning_tiger_fused_test", root=tmp_path, compiler="c++", compiler_version="c++ 1")
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
