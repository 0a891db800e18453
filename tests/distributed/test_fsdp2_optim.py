"""Tiger and Lion under PyTorch FSDP2 (``fully_shard`` over a CPU device mesh, 2 gloo ranks) equal the single-process
run to float rounding; FSDP1 and placements that cannot be handled are refused with a clear error.

One ``torch.distributed.run`` launch of ``fsdp2_worker.py`` runs every case (the model: an embedding, a LayerNorm,
biases, three matrices, one zero-initialised; 20 steps; both ranks read the same batches, so FSDP2's gradient equals
the single process's bit for bit and any difference comes from the optimizer).

Tolerances, and why: Tiger's whole-tensor RMS is summed in another order (each rank's shard in float64, then the
ranks' sums; the kernel adds 16-lane float32 partial sums per block), so η can differ by one float32 ulp on some
steps. Over 20 steps that moves parameters by a few ulp (we allow 1e-7 absolute on values of order 1, i.e. about
one ulp; observed: 3e-8). A sign flip of the momentum (2·η ≈ 4e-3 here) or a rank using its local RMS or its local
non-finite decision would exceed that by four orders of magnitude. Against the Tiger written from the formula (float
arithmetic in another order) we allow 5e-6. Lion is elementwise: bit-identical. A resume from a distributed
checkpoint continues bit for bit.

Low precision (``*_bf16m``: bf16 momentum; ``*_bf16p``: bf16 parameters, fp32 momentum): stochastic rounding draws
the bits of each element's global index (the shard's key is shifted by its offset), so these runs are bit-identical
to one process here; with the unshifted key they differed by up to 8e-3 (bf16m) and 0.13 (bf16p), in 132 and 250
of 571 elements.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = Path(__file__).with_name("fsdp2_worker.py")
REPO = Path(__file__).resolve().parents[2]
CASES = ["tiger", "tiger_nan", "tiger_hsdp", "tiger_shard1", "tiger_accum", "tiger_bf16m", "tiger_bf16p",
         "tiger_ndim", "tiger_resume", "tiger_kinds_resume", "lion", "lion_bf16m", "lion_bf16p", "lion_resume", "fsdp1",
         "embedding_shard1"]
SINGLE_TOL = 1e-7
FORMULA_TOL = 5e-6


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    out = tmp_path_factory.mktemp("fsdp2")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER), str(out),
         *CASES], env=env, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return {case: json.loads((out / f"{case}.json").read_text()) for case in CASES}


def _ok(res: dict[str, Any]) -> dict[str, Any]:
    assert "error" not in res, res["error"]
    return res


@pytest.mark.parametrize("case", ["tiger", "tiger_nan", "tiger_accum", "tiger_bf16m", "tiger_bf16p", "tiger_ndim",
                                  "tiger_hsdp", "tiger_shard1"])
def test_tiger_fsdp2_equals_single_process(results: dict[str, dict[str, Any]], case: str) -> None:
    res = _ok(results[case])
    assert res["finite"] and res["moved"] > 0.05, res  # it trained
    assert res["vs_single"]["max_abs"] <= SINGLE_TOL, res["vs_single"]
    if "vs_formula" in res:
        assert res["vs_formula"]["max_abs"] <= FORMULA_TOL, res["vs_formula"]
    # Σθ² of every tensor and every non-finite flag travel in ONE all-reduce per step (the mesh's group)
    assert res["collectives_per_step"] == {"all_reduce": 1.0}, res["collectives_per_step"]
    if res["fused_available"]:  # the fused CPU kernel updates the local shards, once per step
        assert res["fused_calls_per_step"] == {"tiger_step_": 1.0}, res["fused_calls_per_step"]


def test_tiger_fsdp2_momentum_is_a_sharded_dtensor_and_state_has_no_strings(
        results: dict[str, dict[str, Any]]) -> None:
    assert _ok(results["tiger"])["state_types"] == ["DTensor"]
    assert _ok(results["tiger_bf16m"])["state_types"] == ["DTensor", "Tensor"]  # + the rounding streams (int64)


@pytest.mark.parametrize("case", ["tiger_resume", "tiger_kinds_resume", "lion_resume"])
def test_distributed_checkpoint_resume_is_bit_exact(results: dict[str, dict[str, Any]], case: str) -> None:
    """Save after 10 steps with torch.distributed.checkpoint (one file per rank), load into a fresh model and
    optimizer, continue: bit-identical to the run that never stopped. ``tiger_kinds_resume`` takes its kinds from
    ``assign_kinds`` (the CLI's way): with kinds kept as strings in the per-parameter state, the fresh optimizer's
    state was not empty, ``get_state_dict`` skipped its state initialisation and the momenta were silently not
    loaded."""
    res = _ok(results[case])
    assert res["vs_uninterrupted"]["unequal"] == 0, res["vs_uninterrupted"]
    assert "str" not in res["saved_state_types"], res["saved_state_types"]
    assert {"__0_0.distcp", "__1_0.distcp"} <= set(res["files"])


@pytest.mark.parametrize("case", ["lion", "lion_bf16m", "lion_bf16p"])
def test_lion_fsdp2_is_bit_identical_to_single_process(results: dict[str, dict[str, Any]], case: str) -> None:
    res = _ok(results[case])
    assert res["finite"] and res["moved"] > 0.01, res
    assert res["vs_single"]["unequal"] == 0, res["vs_single"]
    assert res["collectives_per_step"] == {}, res["collectives_per_step"]  # elementwise: no communication
    if res["fused_available"]:
        assert res["fused_calls_per_step"] == {"lion_step_": 1.0}, res["fused_calls_per_step"]


def test_fsdp1_tiger_is_refused_and_lion_is_exact(results: dict[str, dict[str, Any]]) -> None:
    res = _ok(results["fsdp1"])
    assert all(len(s) == 1 for s in res["shapes"]), res["shapes"]  # flat 1-D pieces, matrices included
    msg = res["Tiger"]
    assert msg is not None and "FSDP1" in msg and "FSDPStrategy" in msg and "ModelParallelStrategy" in msg, msg
    assert res["lion_vs_single"]["unequal"] == 0, res["lion_vs_single"]


def test_embedding_sharded_along_dim_1_is_refused(results: dict[str, dict[str, Any]]) -> None:
    msg = _ok(results["embedding_shard1"])["Tiger"]
    assert msg is not None and "Shard(dim=1)" in msg and "per-row RMS" in msg and "Shard(0)" in msg, msg
