"""Tiger and Lion through Lightning's ``ModelParallelStrategy`` (FSDP2) with 2 CPU processes (gloo).

Each launch runs ``lightning_fsdp_worker.py``: Lightning starts the second process itself (its subprocess script
launcher), the LightningModule applies ``fully_shard`` in ``configure_model``, both ranks read the same batches, and
rank 0 then runs the same module in one process (a plain loop). A sharded checkpoint (Lightning's distributed
checkpoint: a folder with one file per rank) is saved after 10 of the 20 steps; a second launch resumes from it.

Tolerances as in ``test_fsdp2_optim.py``: Tiger within 1e-7 of the single process (its global RMS is summed in
another order), Lion and the resume bit for bit. Lightning's ``FSDPStrategy`` (FSDP1) refuses CPU accelerators
(``tests/optim/test_sharding.py`` shows where); the FSDP1 path itself is covered at the torch level in
``test_fsdp2_optim.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = Path(__file__).with_name("lightning_fsdp_worker.py")
REPO = Path(__file__).resolve().parents[2]


def launch(out: Path, mode: str, optimizer: str, *extra: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run([sys.executable, str(WORKER), str(out), mode, optimizer, *extra], env=env, cwd=out,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def params(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def tiger_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiger")
    launch(out, "fsdp2", "Tiger")
    return out


def test_tiger_model_parallel_strategy_equals_single_process(tiger_run: Path) -> None:
    got, single = params(tiger_run / "fsdp2.pt"), params(tiger_run / "single.pt")
    assert got.keys() == single.keys()
    for k in single:
        torch.testing.assert_close(got[k], single[k], rtol=0, atol=1e-7, msg=k)
    files = {p.name for p in (tiger_run / "ckpt" / "epoch=0-step=10.ckpt").iterdir()}
    assert {"__0_0.distcp", "__1_0.distcp", "meta.pt"} <= files, files  # sharded: one file per rank


def test_tiger_resumes_bit_exactly_from_lightning_distributed_checkpoint(tiger_run: Path) -> None:
    resumed = tiger_run / "resumed"
    launch(resumed, "resume", "Tiger", str(tiger_run / "ckpt" / "epoch=0-step=10.ckpt"))
    got, expected = params(resumed / "resume.pt"), params(tiger_run / "fsdp2.pt")
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


def test_lion_model_parallel_strategy_is_bit_identical_to_single_process(tmp_path: Path) -> None:
    launch(tmp_path, "fsdp2", "Lion")
    got, single = params(tmp_path / "fsdp2.pt"), params(tmp_path / "single.pt")
    for k in single:
        assert torch.equal(got[k], single[k]), k


def test_cli_trains_a_causal_lm_with_the_fsdp_profile(tmp_path: Path) -> None:
    """``examples/configs/trainer/fsdp.yaml`` with an LM task: CausalLMModule.configure_model shards the model
    with fully_shard, Tiger (the module's own) steps on the shards, last.ckpt is a sharded folder."""
    configs = REPO / "examples" / "configs"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_tiger", "fit", "--config", str(configs / "lm" / "rope.yaml"),
         "--config", str(configs / "trainer" / "fsdp.yaml"), "--trainer.accelerator=cpu",
         "--trainer.precision=32-true", "--trainer.max_steps=2", "--trainer.val_check_interval=2",
         "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
         "--model.init_args.model.dim=32", "--model.init_args.model.depth=1", "--model.init_args.model.num_heads=2",
         "--data.init_args.batch_size=4", "--data.init_args.num_eval_windows=2",
         "--data.init_args.eval_lengths=[64]", f"--trainer.default_root_dir={tmp_path}"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    last = next(tmp_path.rglob("last.ckpt"))
    assert last.is_dir() and {"__0_0.distcp", "__1_0.distcp"} <= {p.name for p in last.iterdir()}
    assert "FSDPTransformerLM" in proc.stdout + proc.stderr  # the model summary names the sharded class
