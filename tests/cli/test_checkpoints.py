"""Short runs, Ctrl-C and resumes keep their work; damaged checkpoints are refused clearly (issue 15, items 3, 6)."""

from __future__ import annotations

import io
import signal
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from lightning_tiger.cli import main
from tests.cli.test_cli import TINY

# TINY with last.ckpt kept (LastCheckpoint, as every task config has), a validation every 4 steps and the
# warm-up/decay schedule of examples/configs/optim/*.yaml, whose knots interpolate trainer.max_steps.
KEEP = TINY.replace(
    """lr_scheduler:
  class_path: torch.optim.lr_scheduler.LinearLR
  init_args:
    start_factor: 1.0
    end_factor: 0.1
    total_iters: ${trainer.max_steps}
""",
    """lr_scheduler:
  class_path: lightning_tiger.optim.PiecewiseLinearLR
  init_args:
    schedule:
      - [0, 0.0]
      - [2, 1.0]
      - ["${trainer.max_steps}", 0.1]
""",
).replace(
    "  enable_model_summary: false\n",
    """  enable_model_summary: false
  val_check_interval: 4
  check_val_every_n_epoch: null
  num_sanity_val_steps: 0
  callbacks:
    - class_path: lightning_tiger.plugins.LastCheckpoint
      init_args: {dirpath: CKPTS}
""",
)


def _config(tmp_path: Path, text: str = KEEP) -> str:
    path = tmp_path / "keep.yaml"
    path.write_text(text.replace("CKPTS", str(tmp_path / "ckpts")))
    return str(path)


def _fit(tmp_path: Path, *args: str):
    return main(["fit", "--config", _config(tmp_path), f"--trainer.default_root_dir={tmp_path}", *args])


def _largest_member_data(data: bytes) -> int:
    """Offset of the first byte of the largest member's data in a zip archive (torch.save's format)."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    start = info.header_offset
    name_len, extra_len = struct.unpack("<HH", data[start + 26 : start + 30])  # local file header, APPNOTE 4.3.7
    return start + 30 + name_len + extra_len


def _step(path: Path | str) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


def test_last_checkpoint_holds_the_final_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """6 steps, validation (and Lightning's own save) at step 4: last.ckpt must still hold step 6."""
    _fit(tmp_path, "--trainer.max_steps=6")
    last = tmp_path / "ckpts" / "last.ckpt"
    assert _step(last) == 6
    assert f"checkpoint:      {last}" in capsys.readouterr().err


def test_resume_saves_and_the_summary_names_this_runs_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Resume 3 -> 6 with a longer max_steps: the schedule follows the new max_steps, last.ckpt holds step 6."""
    _fit(tmp_path, "--trainer.max_steps=3")
    last = tmp_path / "ckpts" / "last.ckpt"
    assert _step(last) == 3
    capsys.readouterr()
    new_knots = r"knots \[\(0, 0\.0\), \(2, 1\.0\), \(6, 0\.1\)\] instead of the checkpoint's"
    with pytest.warns(UserWarning, match=new_knots):
        cli = _fit(tmp_path, "--trainer.max_steps=6", f"--ckpt_path={last}")
    scheduler = cli.trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.points == [(0, 0.0), (2, 1.0), (6, 0.1)]
    assert scheduler.get_last_lr()[0] == pytest.approx(0.01 * 0.1)  # base lr x the new schedule at step 6
    assert _step(last) == 6
    assert f"checkpoint:      {last}" in capsys.readouterr().err


def test_summary_does_not_claim_an_older_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A resumed run that writes nothing must say so, not point at the checkpoint it resumed from."""
    _fit(tmp_path, "--trainer.max_steps=3")
    last = tmp_path / "ckpts" / "last.ckpt"
    capsys.readouterr()
    # a plain ModelCheckpoint that saves only every 100 steps: nothing during steps 3 -> 5
    text = KEEP.replace("class_path: lightning_tiger.plugins.LastCheckpoint\n      init_args: {dirpath: CKPTS}",
                        "class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
                        "      init_args: {dirpath: CKPTS, every_n_train_steps: 100}")
    main(["fit", "--config", _config(tmp_path, text), f"--trainer.default_root_dir={tmp_path}",
          "--trainer.max_steps=5", f"--ckpt_path={last}", "--trainer.val_check_interval=100"])
    err = capsys.readouterr().err
    assert "checkpoint:      none written by this run" in err, err
    assert str(last) not in err.split("Run finished.")[1], err


def test_ctrl_c_leaves_a_checkpoint_to_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = KEEP.replace("      init_args: {dirpath: CKPTS}\n",
                        "      init_args: {dirpath: CKPTS}\n    - class_path: tests.cli.tiny.InterruptAt\n"
                        "      init_args: {step: 3}\n")
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning's answer to KeyboardInterrupt: on_exception hooks, exit(1)
            main(["fit", "--config", _config(tmp_path, text), f"--trainer.default_root_dir={tmp_path}",
                  "--trainer.max_steps=10"])
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl-C after the first
    last = tmp_path / "ckpts" / "last.ckpt"
    assert _step(last) == 3
    err = capsys.readouterr().err
    assert "Run interrupted." in err and f"checkpoint:      {last}" in err, err
    cli = _fit(tmp_path, "--trainer.max_steps=5", f"--ckpt_path={last}")
    assert cli.trainer.global_step == 5


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_ckpt_path_is_refused_with_only_verified_alternatives(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    """Without VerifiedCheckpointIO (no sidecar) LightningCLI used to fail in torch.load with a raw zip error."""
    _fit(tmp_path, "--trainer.max_steps=4")  # writes epoch=0-step=4.ckpt (validation) and last.ckpt
    folder = tmp_path / "ckpts"
    good = folder / "epoch=0-step=4.ckpt"
    assert good.is_file()
    data = (folder / "last.ckpt").read_bytes()
    if damage == "truncate":
        broken = data[: len(data) // 2]
    else:  # one bit of the largest stored tensor (a flip in the zip's alignment padding would change nothing)
        flipped = bytearray(data)
        flipped[_largest_member_data(data)] ^= 0x10
        broken = bytes(flipped)
    (folder / "last.ckpt").write_bytes(broken)
    (folder / "empty.ckpt").write_bytes(b"")
    (folder / "other-broken.ckpt").write_bytes(data[:100])
    with pytest.raises(SystemExit) as info:
        _fit(tmp_path, "--trainer.max_steps=6", f"--ckpt_path={folder / 'last.ckpt'}")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"checkpoint {folder / 'last.ckpt'} is truncated or corrupted" in err, err
    suggested = err.split("newest first, each verified):")[1]
    assert str(good) in suggested and "empty.ckpt" not in suggested and "other-broken" not in suggested, err


def test_resume_refuses_a_torch_schedule_that_would_keep_old_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """LinearLR(total_iters=${trainer.max_steps}) restores total_iters from the checkpoint: refuse, don't ignore."""
    text = TINY.replace("  enable_model_summary: false\n", "  enable_model_summary: false\n  callbacks:\n"
                        "    - class_path: lightning_tiger.plugins.LastCheckpoint\n      init_args: {dirpath: CKPTS}\n")
    config = _config(tmp_path, text)
    main(["fit", "--config", config, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=3"])
    last = tmp_path / "ckpts" / "last.ckpt"
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", config, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=6",
              f"--ckpt_path={last}"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"{config}: lr_scheduler.init_args.total_iters: 6 now, 3 in the checkpoint {last}" in err, err
    assert "PiecewiseLinearLR" in err, err
    cli = main(["fit", "--config", config, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=3",
                f"--ckpt_path={last}"])  # the same schedule resumes
    assert cli.trainer.lr_scheduler_configs[0].scheduler.total_iters == 3


def test_validate_a_checkpoint_with_another_or_no_max_steps(tmp_path: Path) -> None:
    """No scheduler is built outside fit: neither the resumed-schedule check nor the max_steps one applies."""
    text = TINY.replace("  enable_model_summary: false\n", "  enable_model_summary: false\n  callbacks:\n"
                        "    - class_path: lightning_tiger.plugins.LastCheckpoint\n      init_args: {dirpath: CKPTS}\n")
    config = _config(tmp_path, text)
    main(["fit", "--config", config, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=3"])
    last = tmp_path / "ckpts" / "last.ckpt"
    for max_steps in ("-1", "6"):  # Lightning's "no limit" (no trainer profile); another schedule length
        cli = main(["validate", "--config", config, f"--trainer.default_root_dir={tmp_path}",
                    f"--trainer.max_steps={max_steps}", f"--ckpt_path={last}"])
        assert cli.trainer.ckpt_path == str(last)


def test_a_failing_run_summary_hides_neither_the_run_nor_its_error(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_tiger.cli import TigerCLI

    def broken(*_: object) -> str:
        raise OSError("log dir vanished")

    monkeypatch.setattr(TigerCLI, "_summary", broken)
    assert _fit(tmp_path, "--trainer.max_steps=3").trainer.global_step == 3  # a finished run stays finished
    text = KEEP.replace("      init_args: {dirpath: CKPTS}\n",
                        "      init_args: {dirpath: CKPTS}\n    - class_path: tests.cli.tiny.InterruptAt\n"
                        "      init_args: {step: 1}\n")
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # the run's own outcome, not the summary's OSError
            main(["fit", "--config", _config(tmp_path, text), f"--trainer.default_root_dir={tmp_path}",
                  "--trainer.max_steps=4"])
    finally:
        signal.signal(signal.SIGINT, handler)
