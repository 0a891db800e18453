"""The lightning-tiger command: interpolation after merges, saved config, clear config errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_tiger.cli import main

TINY = """
model:
  class_path: tests.cli.tiny.TinyRegression
  init_args: {hidden: 8}
data:
  class_path: tests.cli.tiny.TinyData
optimizer:
  class_path: torch.optim.AdamW
  init_args: {lr: 0.01}
lr_scheduler:
  class_path: torch.optim.lr_scheduler.LinearLR
  init_args:
    start_factor: 1.0
    end_factor: 0.1
    total_iters: ${trainer.max_steps}
trainer:
  max_steps: 10
  enable_progress_bar: false
  enable_model_summary: false
"""


def _write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _run(tmp_path: Path, *args: str):
    return main(["fit", *args, f"--trainer.default_root_dir={tmp_path}"])


def test_override_of_max_steps_reaches_interpolated_schedule(tmp_path: Path) -> None:
    base = _write(tmp_path, "tiny.yaml", TINY)
    later = _write(tmp_path, "later.yaml", "trainer:\n  max_steps: 9\n")
    # A later --config file and then the command line both override max_steps; the schedule follows the last.
    cli = _run(tmp_path, "--config", base, "--config", later, "--trainer.max_steps=7")
    scheduler = cli.trainer.lr_scheduler_configs[0]
    assert scheduler.scheduler.total_iters == 7
    assert scheduler.interval == "step"  # our CLI steps schedules per optimizer step
    assert cli.trainer.global_step == 7
    saved = yaml.safe_load((Path(cli.trainer.log_dir) / "config.yaml").read_text())
    assert saved["trainer"]["max_steps"] == 7
    assert saved["lr_scheduler"]["init_args"]["total_iters"] == 7


def test_resolvers_allow_arithmetic(tmp_path: Path) -> None:
    text = TINY.replace("total_iters: ${trainer.max_steps}", "total_iters: ${int:${mul:${trainer.max_steps},0.5}}")
    cli = _run(tmp_path, "--config", _write(tmp_path, "t.yaml", text), "--trainer.max_steps=6")
    assert cli.trainer.lr_scheduler_configs[0].scheduler.total_iters == 3


def test_tensorboard_is_default_logger_with_config_text(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = _write(tmp_path, "tiny.yaml", TINY)
    cli = _run(tmp_path, "--config", config, "--trainer.max_steps=3", "--trainer.log_every_n_steps=1")
    events = list(Path(cli.trainer.log_dir).glob("events.out.tfevents.*"))
    assert events, "TensorBoard event file missing"
    acc = EventAccumulator(str(cli.trainer.log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    assert any("config" in tag for tag in acc.Tags()["tensors"])
    assert "train/loss" in acc.Tags()["scalars"]


@pytest.mark.parametrize(
    ("init_args", "key", "fragment"),
    [
        ("{hiden: 8}", "model.init_args.hiden", "not accepted"),  # unknown key
        ("{hidden: eight}", "model.init_args.hidden", "Expected a <class 'int'>"),  # wrong type
        ("{hidden: -3}", "model.init_args.hidden", "hidden must be >= 1, got -3"),  # out of range
    ],
)
def test_bad_config_names_file_key_and_accepted_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], init_args: str, key: str, fragment: str
) -> None:
    good = _write(tmp_path, "good.yaml", TINY)
    text = f"model:\n  class_path: tests.cli.tiny.TinyRegression\n  init_args: {init_args}\n"
    bad = _write(tmp_path, "bad.yaml", text)
    with pytest.raises(SystemExit) as info:
        _run(tmp_path, "--config", good, "--config", bad)
    assert info.value.code == 2
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if key in x)
    assert line.startswith(bad), err  # the file that set the key, not the other one
    assert fragment in line
    assert "accepted: TinyRegression(hidden: 'int' = 8" in err


def test_bad_value_from_command_line_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = _write(tmp_path, "good.yaml", TINY)
    with pytest.raises(SystemExit):
        _run(tmp_path, "--config", good, "--data.init_args.batch_size=0")
    err = capsys.readouterr().err
    assert "<command line>: data.init_args.batch_size: batch_size must be >= 1, got 0" in err


def test_module_entry_point_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lightning_tiger", "fit", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0
    assert "--optimizer" in out.stdout and "--lr_scheduler" in out.stdout and "--ckpt_path" in out.stdout
