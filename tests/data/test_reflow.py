"""ReflowPairsDataModule: pairs equal the teacher's Euler integration; shards round-trip; online mode."""

from __future__ import annotations

import pytest
import torch

from lightning_tiger.data.reflow import ReflowPairsDataModule, load_flow_teacher, read_pair_shards
from lightning_tiger.data.toy2d import ToyDataModule
from lightning_tiger.modules.rectified_flow import RectifiedFlowModule
from lightning_tiger.nn.time_mlp import TimeMLP


@pytest.fixture
def teacher_ckpt(tmp_path):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    net = TimeMLP(2, 16, 1)
    torch.nn.init.normal_(net.output.weight, std=0.5)  # non-trivial velocity (the default output is zero)
    model = RectifiedFlowModule(net=net)
    path = tmp_path / "teacher.ckpt"
    # The two keys load_rectified_flow reads from a Lightning checkpoint.
    # A module built in Python keeps no net in its hparams; record the architecture as LightningCLI would.
    spec = {"class_path": "lightning_tiger.nn.TimeMLP", "init_args": {"data_dim": 2, "hidden_dim": 16, "depth": 1}}
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": {**dict(model.hparams), "net": spec}}, path)
    return path, net


def _euler_reference(net: torch.nn.Module, z0: torch.Tensor, steps: int) -> torch.Tensor:
    z = z0.clone()
    with torch.no_grad():
        for k in range(steps):
            z = z + net(z, torch.full((len(z),), k / steps)) / steps
    return z


def test_stored_pairs_follow_the_teacher_and_round_trip(teacher_ckpt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ckpt, net = teacher_ckpt
    shards = tmp_path / "pairs"
    dm = ReflowPairsDataModule(teacher_ckpt=str(ckpt), num_pairs=300, num_val_pairs=50, steps=5,
                               batch_size=64, generate_batch_size=128, path=str(shards), progress=False)
    z0, z1 = dm.pairs()
    assert z0.shape == z1.shape == (300, 2)
    assert torch.allclose(z1, _euler_reference(net, z0, 5), atol=1e-5)
    # Source draws are N(0, I) from the seeded generator.
    assert torch.equal(z0[:128], torch.randn(128, 2, generator=torch.Generator().manual_seed(0)))
    assert len(list(shards.glob("pairs_*.pt"))) == 3  # 128 + 128 + 44
    r0, r1, meta = read_pair_shards(shards)
    assert torch.equal(r0, z0) and torch.equal(r1, z1) and meta["steps"] == 5
    # A second module without a teacher reads the same pairs back.
    again = ReflowPairsDataModule(teacher_ckpt=None, num_pairs=300, num_val_pairs=50, steps=5, path=str(shards))
    a0, _ = again.pairs()
    assert torch.equal(torch.cat([a0, again._val[0]]), z0)  # tail held out for validation without a teacher
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, list) and batch[0].shape == (64, 2) and dm.data_shape == (2,)
    vz0, vz1 = next(iter(dm.val_dataloader()))
    assert torch.allclose(vz1, _euler_reference(net, vz0, 5), atol=1e-5)
    assert not torch.equal(vz0[:10], z0[:10])  # held-out pairs come from another seed


def test_mismatched_shards_are_regenerated(teacher_ckpt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ckpt, _ = teacher_ckpt
    shards = tmp_path / "pairs"
    ReflowPairsDataModule(teacher_ckpt=str(ckpt), num_pairs=100, steps=3, path=str(shards), progress=False).pairs()
    dm = ReflowPairsDataModule(teacher_ckpt=str(ckpt), num_pairs=100, steps=6, path=str(shards), progress=False)
    dm.pairs()
    assert read_pair_shards(shards)[2]["steps"] == 6


def test_online_pairs_are_fresh_and_follow_the_teacher(teacher_ckpt) -> None:  # type: ignore[no-untyped-def]
    ckpt, net = teacher_ckpt
    dm = ReflowPairsDataModule(teacher_ckpt=str(ckpt), num_pairs=64, num_val_pairs=16, steps=4, batch_size=32,
                               online=True, progress=False)
    dl = dm.train_dataloader()
    epoch1 = list(dl)
    epoch2 = list(dl)
    assert len(epoch1) == 2
    for z0, z1 in epoch1:
        assert torch.allclose(z1, _euler_reference(net, z0, 4), atol=1e-5)
    assert not torch.equal(epoch1[0][0], epoch2[0][0])
    with pytest.raises(ValueError, match="online"):
        dm.pairs()


def test_val_reference_delegates_to_the_data(teacher_ckpt) -> None:  # type: ignore[no-untyped-def]
    ckpt, _ = teacher_ckpt
    data = ToyDataModule("moons", num_train=64, num_val=100)
    dm = ReflowPairsDataModule(teacher_ckpt=str(ckpt), data=data, num_pairs=64, num_val_pairs=20, steps=2,
                               progress=False)
    assert torch.equal(dm.val_reference(), data.val_reference())


def test_errors() -> None:
    with pytest.raises(ValueError, match="teacher_ckpt"):
        ReflowPairsDataModule()
    with pytest.raises(ValueError, match="num_pairs"):
        ReflowPairsDataModule(teacher_ckpt="x.ckpt", num_pairs=0)
    with pytest.raises(ValueError, match="solver"):
        ReflowPairsDataModule(teacher_ckpt="x.ckpt", solver="rk4")


def test_teacher_from_a_default_net_checkpoint_samples_like_the_module(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # A module built with net=None keeps no architecture: the teacher rebuilds the default net of data_shape.
    torch.manual_seed(1)
    model = RectifiedFlowModule(data_shape=(2,))
    torch.nn.init.normal_(model.net.output.weight, std=0.5)
    pool = torch.randn(50, 2) + 5.0
    path = tmp_path / "default.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "rf_source_pool": pool},
               path)
    teacher = load_flow_teacher(path)
    z0 = torch.randn(16, 2)
    assert torch.allclose(teacher.sample(16, steps=3, z0=z0), model.sample(16, steps=3, z0=z0), atol=1e-6)
    assert torch.allclose(teacher.sample(16, steps=3, solver="heun", z0=z0), _heun_reference(model.net, z0, 3),
                          atol=1e-5)
    draws = teacher.sample_source(40, torch.Generator().manual_seed(0))
    assert all(bool((pool == d).all(1).any()) for d in draws)  # data-to-data source: draws from the pool
    assert not any(p.requires_grad for p in teacher.net.parameters()) and not teacher.net.training
    with pytest.raises(ValueError, match="do not fit"):
        load_flow_teacher(path, net=TimeMLP(2, 8, 1))


def _heun_reference(net: torch.nn.Module, z0: torch.Tensor, steps: int) -> torch.Tensor:
    z, h = z0.clone(), 1.0 / steps
    with torch.no_grad():
        for k in range(steps):
            t0, t1 = torch.full((len(z),), k * h), torch.full((len(z),), (k + 1) * h)
            v0 = net(z, t0)
            z = z + h / 2 * (v0 + net(z + h * v0, t1))
    return z
