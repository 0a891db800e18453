"""Every task config in examples/configs/ parses with every optimizer and trainer profile, and runs two steps."""

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


def _mandatory(task: Path) -> list[str]:
    """Dotted keys a task config leaves as OmegaConf's ``???`` (e.g. a reflow stage's teacher checkpoint)."""

    def walk(node: object, prefix: str) -> list[str]:
        if isinstance(node, dict):
            return [k for key, value in node.items() for k in walk(value, f"{prefix}{key}.")]
        return [prefix[:-1]] if node == "???" else []

    return walk(yaml.safe_load(task.read_text()), "")


def _print_config(*args: str) -> None:
    with pytest.raises(SystemExit) as info:
        main(["fit", *args, "--print_config"])
    assert info.value.code in (0, None)


def test_there_are_task_configs() -> None:
    assert len(TASKS) >= 3, TASKS


@pytest.mark.parametrize("task", TASKS, ids=_id)
def test_task_config_keeps_last_checkpoint(task: Path) -> None:
    """Every task config keeps last.ckpt at train end and on Ctrl-C (LastCheckpoint; a plain ModelCheckpoint
    only saves after validation, so a short run or a resume between validations would leave nothing)."""
    callbacks = (yaml.safe_load(task.read_text()).get("trainer") or {}).get("callbacks") or []
    names = ("lightning_tiger.plugins.LastCheckpoint", "LastCheckpoint")
    keepers = [c for c in callbacks if c.get("class_path") in names]
    assert len(keepers) == 1, callbacks
    args = keepers[0].get("init_args") or {}
    assert args.get("save_last", True) is True and args.get("save_on_exception", True) is True, args


@pytest.mark.parametrize("task", TASKS, ids=_id)
@pytest.mark.parametrize("optim", OPTIMIZERS, ids=_id)
def test_task_config_parses_with_each_optimizer(task: Path, optim: Path, tmp_path: Path) -> None:
    filled = [f"--{key}={tmp_path / 'teacher.ckpt'}" for key in _mandatory(task)]
    _print_config("--config", str(task), "--config", str(optim), f"--trainer.default_root_dir={tmp_path}", *filled)


@pytest.mark.parametrize("profile", PROFILES, ids=_id)
def test_trainer_profile_parses(profile: Path, tmp_path: Path) -> None:
    _print_config("--config", str(TASKS[0]), "--config", str(profile), f"--trainer.default_root_dir={tmp_path}")


def test_missing_mandatory_value_is_explained(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    task = next(t for t in TASKS if _mandatory(t))
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(task), f"--trainer.default_root_dir={tmp_path}"])
    assert info.value.code == 2
    assert f"{task}: {_mandatory(task)[0]}: required value missing" in capsys.readouterr().err


def _fit(task: Path, root: Path, *extra: str):
    profile = ["--config", str(CONFIGS / "optim" / "tiger.yaml"), "--config", str(CONFIGS / "trainer" / "smoke.yaml")]
    return main(["fit", "--config", str(task), *profile, f"--trainer.default_root_dir={root}", *extra])


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-step 1-RF checkpoint: the teacher that the reflow / distillation stage configs require."""
    cli = _fit(CONFIGS / "flow" / "moons.yaml", tmp_path_factory.mktemp("teacher"))
    return cli.trainer.checkpoint_callback.last_model_path


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS, ids=_id)
def test_task_config_runs_two_steps(task: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    extra = [f"--{key}={request.getfixturevalue('teacher_ckpt')}" for key in _mandatory(task)]
    if extra:  # a reflow / distillation stage: few pairs, generated into this test's folder
        extra += [
            "--data.init_args.num_pairs=64",
            "--data.init_args.num_val_pairs=64",
            f"--data.init_args.path={tmp_path / 'pairs'}",
        ]
    cli = _fit(task, tmp_path, *extra)
    assert cli.trainer.global_step == 2
    assert (Path(cli.trainer.log_dir) / "config.yaml").is_file()
