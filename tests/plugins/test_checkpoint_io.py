"""VerifiedCheckpointIO: atomic saves, checksum sidecar, clear errors for damaged checkpoints."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_tiger.plugins import CorruptCheckpointError, VerifiedCheckpointIO, verify_checkpoint
from tests.cli.tiny import TinyData, TinyRegression


def _trainer(tmp_path: Path, max_steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(
        default_root_dir=tmp_path, max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, plugins=[VerifiedCheckpointIO()], **kwargs,
    )


def test_round_trip_and_sidecar(tmp_path: Path) -> None:
    io = VerifiedCheckpointIO()
    ckpt = {"state": torch.arange(10.0), "step": 3}
    io.save_checkpoint(ckpt, tmp_path / "a.ckpt")
    assert (tmp_path / "a.ckpt.sha256").is_file()
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"
    loaded = io.load_checkpoint(tmp_path / "a.ckpt", weights_only=True)
    assert torch.equal(loaded["state"], ckpt["state"]) and loaded["step"] == 3
    io.remove_checkpoint(tmp_path / "a.ckpt")
    assert not (tmp_path / "a.ckpt").exists() and not (tmp_path / "a.ckpt.sha256").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "truncate_no_sidecar"])
def test_damaged_checkpoint_is_named_and_previous_one_loads(tmp_path: Path, damage: str) -> None:
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=2, save_top_k=-1)
    _trainer(tmp_path, 4, callbacks=[ckpt_cb]).fit(TinyRegression(), TinyData())
    first, last = tmp_path / "ckpts" / "epoch=0-step=2.ckpt", tmp_path / "ckpts" / "epoch=0-step=4.ckpt"
    data = last.read_bytes()
    if damage.startswith("truncate"):
        last.write_bytes(data[: len(data) // 2])
        if damage == "truncate_no_sidecar":  # a checkpoint written by plain Lightning: no checksum to compare
            Path(str(last) + ".sha256").unlink()
    else:
        flipped = bytearray(data)
        flipped[len(flipped) // 3] ^= 0xFF
        last.write_bytes(bytes(flipped))
    # other damaged files beside it must not be offered as alternatives
    (tmp_path / "ckpts" / "empty.ckpt").write_bytes(b"")
    (tmp_path / "ckpts" / "cut.ckpt").write_bytes(data[:200])
    with pytest.raises(CorruptCheckpointError, match=r"step=4\.ckpt is truncated or corrupted") as info:
        _trainer(tmp_path, 6).fit(TinyRegression(), TinyData(), ckpt_path=last)
    suggested = str(info.value).split("each verified):")[1]
    assert suggested.strip() == str(first), str(info.value)
    trainer = _trainer(tmp_path, 6)
    trainer.fit(TinyRegression(), TinyData(), ckpt_path=first)
    assert trainer.global_step == 6


def test_verify_checkpoint_without_sidecar(tmp_path: Path) -> None:
    """Plain torch.save files (no sidecar): the zip container's CRC-32s catch truncation and flipped data bits."""
    good = tmp_path / "good.ckpt"
    torch.save({"w": torch.arange(4096.0)}, good)
    verify_checkpoint(good)  # intact: no error
    data = good.read_bytes()
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) - 200])
    flipped = bytearray(data)
    flipped[data.index(torch.arange(4096.0)[1000:1001].numpy().tobytes())] ^= 0x01  # a bit inside the tensor
    (tmp_path / "flip.ckpt").write_bytes(bytes(flipped))
    for name, reason in [("empty", "empty file"), ("cut", "not a readable"), ("flip", "CRC-32 mismatch")]:
        with pytest.raises(CorruptCheckpointError, match=rf"{name}\.ckpt is truncated or corrupted \({reason}.*"
                                                         rf"each verified\): {good}$"):
            verify_checkpoint(tmp_path / f"{name}.ckpt")
    with pytest.raises(FileNotFoundError):
        verify_checkpoint(tmp_path / "missing.ckpt")


def test_verifying_and_loading_stream_the_file(tmp_path: Path) -> None:
    """A 16 MB checkpoint is hashed and checked in chunks, never copied whole into Python memory (a resume used
    to hold it in memory up to three times)."""
    io = VerifiedCheckpointIO()
    path = tmp_path / "big.ckpt"
    io.save_checkpoint({"w": torch.ones(4_000_000)}, path)
    assert path.stat().st_size > 16_000_000
    for action in (lambda: verify_checkpoint(path), lambda: io.load_checkpoint(path, weights_only=True)):
        tracemalloc.start()  # tensor storage comes from torch's allocator: only Python-level copies count here
        try:
            action()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 4_000_000, peak
