"""The README's Quickstart: its demo command produces what the README promises, and its test command is CI's."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from lightning_tiger.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _quickstart_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README Quickstart has no bash block"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _demo_args() -> list[str]:
    commands = _quickstart_commands()
    assert len(commands) == 2, f"Quickstart must be exactly two commands, got {commands}"
    install, _, run = commands[0].partition("&&")
    assert "pip install" in install and "constraints" in install
    argv = shlex.split(run)
    assert argv[0] == "lightning-tiger", argv
    return argv[1:]


def test_second_command_is_ci() -> None:
    commands = _quickstart_commands()
    assert commands[1].strip() == "bash .ci/run"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install" in ci and "pytest" in ci


def _check_tensorboard(log_dir: Path, max_steps: int) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "val/w2@1", "val/w2@100"):
        assert tag in scalars, (tag, sorted(scalars))
    assert acc.Tags()["images"], "no sample picture logged"
    assert acc.Scalars("train/loss")[-1].step <= max_steps


def test_demo_short(tmp_path: Path) -> None:
    """The demo command itself, shortened to a few steps (the full run is the slow test below)."""
    args = [*_demo_args(), f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=20",
            "--trainer.val_check_interval=20", "--trainer.log_every_n_steps=5", "--trainer.enable_progress_bar=false"]
    cli = main(args)
    assert cli.trainer.global_step == 20
    _check_tensorboard(Path(cli.trainer.log_dir), 20)


W2_PROMISE = 0.08  # README Quickstart: the demo's final exact W2 at 100 Euler steps


def test_readme_states_the_promise() -> None:
    section = (ROOT / "README.md").read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    assert f"W2@100 ≤ {W2_PROMISE}" in section, "the Quickstart must state the W2 it promises"


@pytest.mark.slow
def test_demo_full(tmp_path: Path) -> None:
    """The README's first command as written (~1 min): its last validation logs W2@100 <= 0.08 and a picture."""
    cli = main([*_demo_args(), f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"])
    max_steps = cli.trainer.max_steps
    assert cli.trainer.global_step == max_steps
    log_dir = Path(cli.trainer.log_dir)
    _check_tensorboard(log_dir, max_steps)
    assert (log_dir / "samples" / f"val_samples_step{max_steps:06d}.png").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    last = acc.Scalars("val/w2@100")[-1]
    assert last.step == max_steps - 1  # Lightning logs validation at the last optimizer step's index
    assert last.value <= W2_PROMISE, f"demo 1-RF should end with W2@100 <= {W2_PROMISE} on moons, got {last.value:.3f}"
