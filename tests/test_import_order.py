"""Each subpackage imports first in a fresh interpreter, then the others after it.

The subpackages' ``__init__`` files import their public names eagerly (``from .tiger import Tiger as Tiger``), so
an import cycle would surface as ``ImportError: ... partially initialized module`` only for some first import.
``tests/test_layering.py`` refuses cycles and upward imports statically; this runs the real thing, one fresh
interpreter per starting point (slow: every one pays for importing torch and Lightning again).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("optim", "nn", "generative", "data", "metrics", "callbacks", "plugins", "modules", "cli")

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("first", SUBPACKAGES)
def test_subpackage_imports_first_in_a_fresh_interpreter(first: str) -> None:
    rest = "; ".join(f"import lightning_tiger.{sub}" for sub in SUBPACKAGES if sub != first)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", f"import lightning_tiger.{first}; {rest}"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
