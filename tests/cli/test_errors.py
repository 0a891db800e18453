"""The CLI names the real file, key and class of a mistake, from a terminal as from Python (issue 15, item 4)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from lightning_tiger.cli import ConfigConflictWarning, main
from tests.cli.test_cli import TINY

ROOT = Path(__file__).resolve().parents[2]
OPTIM = ROOT / "examples" / "configs" / "optim"


def _write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _terminal(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m lightning_tiger ...`` in a fresh process: sys.argv, not main([...]), carries the arguments."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "lightning_tiger", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)


def _error(capsys: pytest.CaptureFixture[str], tmp_path: Path, *args: str) -> str:
    with pytest.raises(SystemExit) as info:
        main(["fit", *args, f"--trainer.default_root_dir={tmp_path}"])
    assert info.value.code == 2
    return capsys.readouterr().err


def test_terminal_error_names_the_file(tmp_path: Path) -> None:
    """From a terminal the report used to say `<defaults>` whatever file held the mistake."""
    good = _write(tmp_path, "good.yaml", TINY)
    bad = _write(tmp_path, "bad.yaml", "model:\n  init_args:\n    hidden: eight\n")
    out = _terminal("fit", "--config", good, "--config", bad, f"--trainer.default_root_dir={tmp_path}", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert f"{bad}: model.init_args.hidden: Expected a <class 'int'>" in out.stderr, out.stderr


def test_terminal_help_lists_the_library() -> None:
    out = _terminal("--help", cwd=ROOT)
    assert out.returncode == 0, out.stderr
    for name in ("Tiger", "Lion", "PiecewiseLinearLR", "RectifiedFlowModule", "CausalLMModule", "ToyDataModule",
                 "NonFiniteGuard", "LastCheckpoint", "VerifiedCheckpointIO"):
        assert name in out.stdout, (name, out.stdout)


def test_optimizer_error_is_blamed_on_the_optimizer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """TinyRegression also has an `lr`: the report must still name the optimizer, by short name, and its signature."""
    config = _write(tmp_path, "tiny.yaml", TINY)
    err = _error(capsys, tmp_path, "--config", config, "--optimizer", "Tiger", "--optimizer.lr=-1e-3")
    assert "<command line>: optimizer.init_args.lr: lr must be in [0.0, inf), got -0.001" in err, err
    assert "accepted: Tiger(params" in err and "TinyRegression(" not in err, err


def test_optimizer_error_from_a_file_names_that_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _write(tmp_path, "tiny.yaml", TINY)
    optim = _write(tmp_path, "my_tiger.yaml", "optimizer:\n  class_path: Tiger\n  init_args: {beta: 1.5}\n")
    err = _error(capsys, tmp_path, "--config", config, "--config", optim)
    assert f"{optim}: optimizer.init_args.beta: beta must be in [0.0, 1.0), got 1.5" in err, err
    assert "accepted: Tiger(params" in err, err


def test_short_names_for_library_classes(tmp_path: Path) -> None:
    text = "model:\n  class_path: RectifiedFlowModule\n  init_args: {num_val_samples: 16, val_steps: [1]}\n" \
           "data:\n  class_path: ToyDataModule\n  init_args: {num_train: 64, num_val: 16, batch_size: 32}\n"
    cli = main(["fit", "--config", _write(tmp_path, "short.yaml", text), "--optimizer", "Lion",
                "--trainer.max_steps=0", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
                f"--trainer.default_root_dir={tmp_path}"])
    assert type(cli.model).__name__ == "RectifiedFlowModule"
    assert type(cli.trainer.optimizers[0]).__name__ == "Lion"


def test_option_prefixes_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _write(tmp_path, "tiny.yaml", TINY)
    err = _error(capsys, tmp_path, "--config", config, "--trainer.max_step=3")
    assert "<command line>: trainer.max_step: unknown option" in err and "did you mean trainer.max_steps?" in err, err


def test_dead_model_lr_on_the_command_line_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--optimizer` replaces the model's configure_optimizers, so `--model.init_args.lr` would do nothing."""
    config = _write(tmp_path, "tiny.yaml", TINY)
    err = _error(capsys, tmp_path, "--config", config, "--model.init_args.lr", "0.5")
    assert "<command line>: model.init_args.lr=0.5 has no effect: the optimizer AdamW" in err, err
    assert "runs with lr=0.01" in err and "--optimizer.lr=0.5" in err, err


def test_dead_module_optimizer_settings_on_the_command_line_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The library's modules read their own optimizer / lr_scheduler / warmup_steps in configure_optimizers, which
    `--optimizer` replaces: typing one next to an optimizer config would silently do nothing."""
    flow = str(ROOT / "examples" / "configs" / "flow" / "moons.yaml")
    trainer = str(ROOT / "examples" / "configs" / "trainer" / "cpu-quick.yaml")
    err = _error(capsys, tmp_path, "--config", flow, "--config", str(OPTIM / "tiger.yaml"), "--config", trainer,
                 "--model.init_args.warmup_steps=5")
    assert "<command line>: model.init_args.warmup_steps has no effect: the optimizer Tiger" in err, err
    assert "replaces RectifiedFlowModule.configure_optimizers" in err, err


def test_dead_model_lr_from_a_file_warns_and_the_optimizer_lr_runs(tmp_path: Path) -> None:
    config = _write(tmp_path, "tiny.yaml", TINY.replace("init_args: {hidden: 8}", "init_args: {hidden: 8, lr: 0.5}"))
    with pytest.warns(ConfigConflictWarning, match=rf"{config}: model.init_args.lr=0.5 has no effect"):
        cli = main(["fit", "--config", config, "--trainer.max_steps=1", f"--trainer.default_root_dir={tmp_path}"])
    assert cli.trainer.optimizers[0].param_groups[0]["initial_lr"] == 0.01


def test_schedule_on_unset_max_steps_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """optim/tiger.yaml without a trainer profile: the knots would be derived from max_steps = -1."""
    text = TINY.split("optimizer:")[0] + "trainer:\n  enable_progress_bar: false\n"
    tiny = _write(tmp_path, "tiny.yaml", text)
    err = _error(capsys, tmp_path, "--config", tiny, "--config", str(OPTIM / "tiger.yaml"))
    assert f"{OPTIM / 'tiger.yaml'}: lr_scheduler.init_args.schedule: interpolates ${{trainer.max_steps}}, but " \
           "trainer.max_steps is not set (-1" in err, err
    assert "--trainer.max_steps=N" in err, err


def test_task_file_lr_replaced_by_a_later_optimizer_config_is_only_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The README's composition (a task file's lr for the module's own optimizer, then --config optim/...) is the
    intended use: reported at INFO, not a ConfigConflictWarning on every run."""
    model, rest = TINY.split("optimizer:")
    task = _write(tmp_path, "task.yaml", model.replace("init_args: {hidden: 8}", "init_args: {hidden: 8, lr: 0.5}")
                  + "trainer:" + rest.split("trainer:")[1])
    optim = _write(tmp_path, "optim.yaml", "optimizer:" + rest.split("trainer:")[0])
    with warnings.catch_warnings(), caplog.at_level(logging.INFO, logger="lightning_tiger.cli"):
        warnings.simplefilter("error", ConfigConflictWarning)
        cli = main(["fit", "--config", task, "--config", optim, "--trainer.max_steps=1",
                    f"--trainer.default_root_dir={tmp_path}"])
    assert cli.trainer.optimizers[0].param_groups[0]["initial_lr"] == 0.01
    assert f"{task}: model.init_args.lr=0.5 has no effect" in caplog.text, caplog.text
    # the other order (the file read after the optimizer's sets the lr again): still a warning
    with pytest.warns(ConfigConflictWarning, match=rf"{task}: model.init_args.lr=0.5 has no effect"):
        main(["fit", "--config", optim, "--config", task, "--trainer.max_steps=1",
              f"--trainer.default_root_dir={tmp_path}"])


def test_cli_leaves_the_process_warning_filters_alone(tmp_path: Path) -> None:
    """The CLI silences LightningCLI's "configure_optimizers will be overridden" warning (its documented behaviour)
    only while it instantiates the classes: the process's warning filters are the same before and after, and the
    warning does not reach the user."""
    config = _write(tmp_path, "tiny.yaml", TINY)
    # A first run imports what fit needs: some libraries (urllib3 via tensorboard) add filters when imported.
    main(["fit", "--config", config, "--trainer.max_steps=1", f"--trainer.default_root_dir={tmp_path}"])
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        inside = list(warnings.filters)
        main(["fit", "--config", config, "--trainer.max_steps=1", f"--trainer.default_root_dir={tmp_path}"])
        assert list(warnings.filters) == inside
    assert list(warnings.filters) == before
    assert not [f for f in warnings.filters if f[1] is not None and "overridden" in f[1].pattern]
    assert not [w for w in seen if "will be overridden by" in str(w.message)]
