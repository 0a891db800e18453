"""One fused-kernel build per machine under torch.distributed, and one answer for every rank (2 gloo ranks).

Each case starts ``torch.distributed.run --standalone --nproc_per_node 2`` on ``kernel_build_worker.py`` with a
temporary ``TORCH_EXTENSIONS_DIR`` shared by the module (the first case builds into it, the others reuse it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_tiger.optim import build
from tests.optim.test_build import BUILDING, SIMULATED, env_for, failing_compiler

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(build.build_folder() is None, reason="no C++ compiler/ninja here"),
]

WORKER = Path(__file__).with_name("kernel_build_worker.py")
REPO = Path(__file__).resolve().parents[2]


def launch(mode: str, ext: Path, out: Path, *extra: str, **env: str) -> tuple[list[dict], str]:
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
         mode, str(out), *extra],
        env=env_for(ext, OMP_NUM_THREADS="1", **env), cwd=REPO, capture_output=True, text=True, timeout=600,
        check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return ranks, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict], str]:
    ext = tmp_path_factory.mktemp("ext")
    ranks, log = launch("build", ext, tmp_path_factory.mktemp("out") / "build")
    return ext, ranks, log


def test_one_build_per_machine_and_both_ranks_use_it(built: tuple[Path, list[dict], str]) -> None:
    _, ranks, log = built
    assert log.count(BUILDING) == 1, log
    assert [r["available"] for r in ranks] == [True, True] and not any(r["refused"] for r in ranks)
    assert sorted(r["built"] for r in ranks) == [False, True]  # one rank compiled, the other loaded its build
    assert "FusedKernelWarning" not in log


def test_failing_build_on_one_rank_sends_every_rank_to_the_fallback(built: tuple[Path, list[dict], str],
                                                                    tmp_path: Path) -> None:
    ext, _, _ = built
    ranks, log = launch("fail_one", ext, tmp_path / "out", str(failing_compiler(tmp_path)))
    assert [r["available"] for r in ranks] == [False, False], log
    assert [r["refused"] for r in ranks] == [True, True]  # fused=True refuses on both
    assert [r["local_ok"] for r in ranks] == [True, False]  # rank 0 loaded the kernels, yet does not use them
    assert SIMULATED in log and "unavailable on another rank" in log


def test_a_rank_that_asks_late_cannot_hang_the_others(built: tuple[Path, list[dict], str], tmp_path: Path) -> None:
    """Rank 1 asks only after rank 0 has returned: rank 0 gives up after the timeout and both fall back."""
    ext, _, _ = built
    ranks, log = launch("late", ext, tmp_path / "out", LIGHTNING_TIGER_BUILD_TIMEOUT="5")
    assert [r["available"] for r in ranks] == [False, False], log
    assert "not every rank asked for the fused optimizer kernel within 5 s" in log


def test_followers_get_the_leaders_failure_without_building_again(tmp_path: Path) -> None:
    """Both ranks share one failing compiler (one cache key): one builds, the other waits and takes its failure."""
    ranks, log = launch("build", tmp_path / "ext", tmp_path / "out", CXX=str(failing_compiler(tmp_path)))
    assert log.count(BUILDING) == 1, log
    assert [r["available"] for r in ranks] == [False, False] and [r["local_ok"] for r in ranks] == [False, False]
    assert sorted(r["built"] for r in ranks) == [False, False]
    assert log.count(SIMULATED) >= 1 and "the kernel build failed on another rank of this machine" in log, log
