"""Kill-and-resume: a training process SIGKILLed inside a step or in the middle of a checkpoint write, then
resumed from the newest checkpoint that loads, ends with exactly the state of a run that never stopped:
parameters, Tiger's state, EMA weights, the PiecewiseLinearLR scheduler, NonFiniteGuard's counters (NaN
gradients are injected at two steps), the data order and the RNG state (``torch.equal`` on everything).
A truncated or bit-flipped checkpoint is refused with an error naming it, and the previous one still loads.

The training process is :mod:`tests.reliability.resume_script`; set ``LT_KILL_SEED`` to vary the kill points.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = [sys.executable, "-m", "tests.reliability.resume_script"]
MAX_STEPS, EVERY = 40, 5
TIMEOUT = 240


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _run(*args: str) -> str:
    proc = subprocess.run([*SCRIPT, *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"training process failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _run_and_kill(when: str, *args: str) -> list[str]:
    """Start the process, SIGKILL it as soon as a stdout line starts with ``when``; return the lines seen."""
    proc = subprocess.Popen([*SCRIPT, *args], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.strip())
            if line.startswith(when):
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the process was not killed at {when!r} (lines: {lines[-5:]})"
    return lines


def _assert_same(a: Any, b: Any, where: str = "state") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype, where
        assert torch.equal(a, b), f"{where} differs (max |Δ| {(a.double() - b.double()).abs().max()})"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("reference")
    _run("--dir", str(d), "--out", str(d / "final.pt"))
    ref = torch.load(d / "final.pt", weights_only=False)
    assert ref["global_step"] == MAX_STEPS
    assert ref["guard"]["skipped"] == 2, "the NaN gradients injected at two steps must have been vetoed"
    assert ref["seen"].shape[0] == MAX_STEPS
    ref["dir"] = d
    return ref


def _compare(final: Path, ref: dict[str, Any]) -> None:
    got = torch.load(final, weights_only=False)
    for key in ("params", "ema", "optimizer", "scheduler", "guard", "seen", "global_step", "rng"):
        _assert_same(got[key], ref[key], key)


def test_sigkill_inside_a_step_then_resume_is_exact(reference: dict[str, Any], tmp_path: Path,
                                                    fault_tally: Any) -> None:
    rng = random.Random(int(os.environ.get("LT_KILL_SEED", "0")))
    target = rng.randint(EVERY + 1, MAX_STEPS - 2)
    lines = _run_and_kill(f"STEP {target}", "--dir", str(tmp_path), "--step-sleep", "0.05")
    assert f"STEP {target}" in lines
    out = _run("--dir", str(tmp_path), "--out", str(tmp_path / "final.pt"), "--resume")
    expected = f"step={(target // EVERY) * EVERY}.ckpt"
    assert any(line.startswith("RESUME") and line.endswith(expected) for line in out.splitlines()), out[-500:]
    _compare(tmp_path / "final.pt", reference)
    fault_tally.record("resume", f"SIGKILL inside step {target}, resumed from {expected}", "survived")


def test_sigkill_during_checkpoint_write_then_resume_is_exact(reference: dict[str, Any], tmp_path: Path,
                                                              fault_tally: Any) -> None:
    # the 3rd checkpoint (step=15) is written slowly; the kill lands after half of its bytes are on disk
    lines = _run_and_kill("WRITING", "--dir", str(tmp_path), "--slow-save", "3")
    assert any("step=15.ckpt" in line for line in lines if line.startswith("WRITING")), lines[-3:]
    assert not (tmp_path / "step=15.ckpt").exists(), "a half-written checkpoint appeared under its final name"
    partial = list(tmp_path.glob(".step=15.ckpt.tmp-*"))
    assert partial, "no partial temporary file: the kill did not land mid-write"
    full_size = (reference["dir"] / "step=15.ckpt").stat().st_size
    assert 0 < partial[0].stat().st_size < full_size
    out = _run("--dir", str(tmp_path), "--out", str(tmp_path / "final.pt"), "--resume")
    assert any(line.startswith("RESUME") and line.endswith("step=10.ckpt") for line in out.splitlines())
    _compare(tmp_path / "final.pt", reference)
    fault_tally.record("resume", "SIGKILL half-way through writing checkpoint step=15", "survived")


def test_corrupt_checkpoints_are_named_and_the_previous_one_resumes(reference: dict[str, Any], tmp_path: Path,
                                                                   fault_tally: Any) -> None:
    from lightning_tiger.plugins import CorruptCheckpointError, VerifiedCheckpointIO

    for step in (20, 25, 30):
        for suffix in (".ckpt", ".ckpt.sha256"):
            shutil.copy(reference["dir"] / f"step={step}{suffix}", tmp_path / f"step={step}{suffix}")
    newest, middle = tmp_path / "step=30.ckpt", tmp_path / "step=25.ckpt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # truncated (a copy cut short, a full disk)
    flipped = bytearray(middle.read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF  # one flipped bit-pattern, same size
    middle.write_bytes(bytes(flipped))
    io = VerifiedCheckpointIO()
    for bad in (newest, middle):
        with pytest.raises(CorruptCheckpointError) as info:
            io.load_checkpoint(bad, weights_only=False)
        msg = str(info.value)
        assert str(bad) in msg and "step=20.ckpt" in msg, msg
    # without its sidecar (e.g. a checkpoint copied without it) truncation is still a clear error, not a zip error
    (tmp_path / "step=30.ckpt.sha256").unlink()
    with pytest.raises(CorruptCheckpointError, match=r"step=30\.ckpt"):
        io.load_checkpoint(newest, weights_only=False)
    out = _run("--dir", str(tmp_path), "--out", str(tmp_path / "final.pt"), "--resume")
    assert sum(line.startswith("CORRUPT") for line in out.splitlines()) == 2
    assert any(line.startswith("RESUME") and line.endswith("step=20.ckpt") for line in out.splitlines())
    _compare(tmp_path / "final.pt", reference)
    fault_tally.record("resume", "truncated + bit-flipped newest checkpoints: named, previous one resumed", "stopped")
