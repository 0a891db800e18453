"""Every task config in examples/configs/ parses when composed with each optimizer profile, and runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightning_tiger.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
TASKS = sorted(
    p
    for p in CONFIGS.rglob("*.yaml")
    if p.parent.name not in ("optim", "trainer") and "model" in yaml.safe_load(p.read_text())
)
OPTIMIZERS = sorted((CONFIGS / "optim").glob("*.yaml"))
PROFILES = sorted((CONFIGS / "trainer").glob("*.yaml"))


def _id(path: Path) -> str:
    return str(path.relative_to(CONFIGS))


def test_there_are_task_configs() -> None:
    assert len(TASKS) >= 3, TASKS


@pytest.mark.parametrize("task", TASKS, ids=_id)
@pytest.mark.parametrize("optim", OPTIMIZERS, ids=_id)
def test_task_config_parses_with_each_optimizer(task: Path, optim: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main(
            [
                "fit",
                "--config",
                str(task),
                "--config",
                str(optim),
                f"--trainer.default_root_dir={tmp_path}",
                "--print_config",
            ]
        )
    assert info.value.code in (0, None)


@pytest.mark.parametrize("profile", PROFILES, ids=_id)
def test_trainer_profile_parses(profile: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main(
            [
                "fit",
                "--config",
                str(TASKS[0]),
                "--config",
                str(profile),
                f"--trainer.default_root_dir={tmp_path}",
                "--print_config",
            ]
        )
    assert info.value.code in (0, None)


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS, ids=_id)
def test_task_config_runs_two_steps(task: Path, tmp_path: Path) -> None:
    cli = main(
        [
            "fit",
            "--config",
            str(task),
            "--config",
            str(CONFIGS / "optim" / "tiger.yaml"),
            "--config",
            str(CONFIGS / "trainer" / "smoke.yaml"),
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert cli.trainer.global_step == 2
    assert (Path(cli.trainer.log_dir) / "config.yaml").is_file()
