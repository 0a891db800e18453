"""Every ```python block of README.md runs as written, each in a fresh namespace (the Quickstart's bash commands
are tested in tests/test_quickstart.py)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks() -> list[tuple[int, str]]:
    """(first line number, source) of each ```python block in README.md."""
    readme = (ROOT / "README.md").read_text()
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", readme, re.S | re.M):
        line = readme.count("\n", 0, match.start()) + 2
        blocks.append((line, match.group(1)))
    return blocks


BLOCKS = _python_blocks()


SUBPACKAGES = ("optim", "callbacks", "nn", "modules", "data", "metrics")


def test_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 5, f"expected the optimizer, callback, attention, diffusion and subclassing blocks: {BLOCKS}"


@pytest.mark.parametrize("subpackage", SUBPACKAGES)
def test_readme_shows_each_subpackage(subpackage: str) -> None:
    """One short example per subpackage, and it runs (it is one of BLOCKS)."""
    assert any(f"from lightning_tiger.{subpackage} import" in source for _, source in BLOCKS), subpackage


@pytest.mark.parametrize(("line", "source"), BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_block_runs(line: int, source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a snippet that trains writes lightning_logs/ here, not into the checkout
    code = compile(source, f"README.md:{line}", "exec")
    namespace = {"__name__": "__readme__"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers / logging intervals is not the point here
        exec(code, namespace)
