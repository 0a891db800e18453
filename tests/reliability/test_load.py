"""A shortened load run of ``benchmarks/load_lm.py``: CausalLMModule + Tiger + NonFiniteGuard in bf16-mixed with NaN
gradients injected every 37 steps, 300 steps, asserting that memory does not grow.

Bound: RSS slope over the second half of the run <= 10 MB per 1000 steps and the last RSS within 8 MB of the
RSS at the midpoint. A leak of one step's activations or autograd graph (this model: ~0.1 MB per step) would
add >= 30 MB per 1000 steps; allocator noise on this size stays well under 1 MB.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _load_benchmark() -> Any:
    spec = importlib.util.spec_from_file_location("load_lm", ROOT / "benchmarks" / "load_lm.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_long_bf16_run_with_guard_has_flat_memory(tmp_path: Path, fault_tally: Any) -> None:
    bench = _load_benchmark()
    res = bench.run(steps=300, every=15, guard=True, fault_every=37, root=str(tmp_path))
    rows = res["rows"]
    assert len(rows) == 20
    mid = rows[len(rows) // 2]["rss_mb"]
    assert res["rss_slope_mb_per_1000_steps"] <= 10.0, res["rss_slope_mb_per_1000_steps"]
    assert rows[-1]["rss_mb"] - mid <= 8.0, [r["rss_mb"] for r in rows]
    assert res["params_finite"]
    assert res["skipped"] == 300 // 37  # steps 37, 74, ..., 296
    fault_tally.record("lm", f"load: NaN gradient every 37 steps over 300 bf16-mixed steps ({res['skipped']})",
                       "survived")
