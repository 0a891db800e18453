"""Rectified flow on moons, the whole chain: 1-RF -> reflow pairs -> 2-RF -> one-step distillation -> table.

Run (2 CPU cores: ~30-40 min for the full chain on a quiet machine, longer on a shared one)::

    python examples/rectified_flow.py                      # everything, Tiger optimizer
    python examples/rectified_flow.py --quick              # a 2-minute smoke version (numbers meaningless)
    python examples/rectified_flow.py --stage 2rf          # one stage alone (needs the previous checkpoint)

Every stage writes a checkpoint into ``--out`` (default ``runs/rectified_flow``): ``1rf.ckpt``, ``2rf.ckpt``,
``distill.ckpt`` (EMA weights in ``state_dict``), TensorBoard logs under ``--out/tb``, the reflow pairs as
``.pt`` shards under ``--out/pairs_2rf`` and ``--out/pairs_distill``. The last stage measures exact W2 on 1000
samples against an independent moons sample (floor 0.035: W2 between two independent 1000-point samples) at
1, 2, 4, 8, 20, 100 Euler steps, the straightness of each flow, writes ``--out/results.json`` and pictures to
``--docs`` (``docs/results/flow``).

The same stages from the command line (one config per stage; the reflow stages take the previous checkpoint)::

    lightning-tiger fit --config examples/configs/flow/moons.yaml --config examples/configs/optim/tiger.yaml \\
        --config examples/configs/trainer/cpu.yaml
    lightning-tiger fit --config examples/configs/flow/moons_reflow.yaml \\
        --config examples/configs/optim/tiger.yaml --config examples/configs/trainer/cpu.yaml \\
        --data.init_args.teacher_ckpt=<1-RF checkpoint>
    lightning-tiger fit --config examples/configs/flow/moons_distill.yaml \\
        --config examples/configs/optim/tiger.yaml --config examples/configs/trainer/cpu.yaml \\
        --data.init_args.teacher_ckpt=<2-RF checkpoint>

Reference point (Shi et al. 2023, DSBM, Table 2): rectified flow on moons, W2 after 20 Euler steps
0.129 (OT-CFM 0.111); their setup differs (networks, training length, 5 seeds), so compare orders of magnitude.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from functools import partial
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_tiger import plotting
from lightning_tiger.data.reflow import ReflowPairsDataModule
from lightning_tiger.data.toy2d import ToyDataModule, sample_toy
from lightning_tiger.metrics.functional import wasserstein2
from lightning_tiger.modules.rectified_flow import RectifiedFlowModule, load_rectified_flow
from lightning_tiger.nn.time_mlp import TimeMLP
from lightning_tiger.optim import PiecewiseLinearLR, Tiger

EVAL_STEPS = (1, 2, 4, 8, 20, 100)


def _trainer(args: argparse.Namespace, name: str, max_steps: int) -> Trainer:
    return Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        precision="32-true",
        val_check_interval=max(1, max_steps // 4),
        check_val_every_n_epoch=None,
        log_every_n_steps=25,
        logger=TensorBoardLogger(os.path.join(args.out, "tb"), name=name, default_hp_metric=False),
        callbacks=[EMAWeightAveraging(decay=args.ema_decay)],
        enable_checkpointing=False,  # one explicit checkpoint per stage (below)
        enable_progress_bar=not args.no_progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=args.out,
    )


def _module(args: argparse.Namespace, max_steps: int, **kwargs: object) -> RectifiedFlowModule:
    schedule = {max(1, max_steps // 20): 1.0, max_steps: 0.05}  # 5% warm-up, linear decay to 5%
    return RectifiedFlowModule(
        net=TimeMLP(2, args.hidden, args.depth), optimizer=partial(Tiger, lr=args.lr),
        lr_scheduler=partial(PiecewiseLinearLR, schedule=schedule),
        num_val_samples=1000, val_steps=(1, 2, 4, 8, 100), **kwargs,  # type: ignore[arg-type]
    )


def stage_1rf(args: argparse.Namespace) -> float:
    t0 = time.time()
    data = ToyDataModule("moons", num_train=args.num_train, batch_size=args.batch_size, seed=0)
    model = _module(args, args.steps_1rf)
    trainer = _trainer(args, "1rf", args.steps_1rf)
    trainer.fit(model, data)
    trainer.save_checkpoint(os.path.join(args.out, "1rf.ckpt"))
    return time.time() - t0


def _stage_pairs(args: argparse.Namespace, name: str, teacher: str, mode: str, max_steps: int) -> float:
    t0 = time.time()
    data = ReflowPairsDataModule(
        teacher_ckpt=teacher, teacher_net=TimeMLP(2, args.hidden, args.depth),
        data=ToyDataModule("moons", num_train=16, seed=0), num_pairs=args.num_pairs,
        steps=args.pair_steps, batch_size=args.batch_size, path=os.path.join(args.out, f"pairs_{name}"),
        progress=not args.no_progress,
    )
    # Warm start from the teacher, as in the paper (2-RF from 1-RF; the distilled model from its flow).
    model = _module(args, max_steps, mode=mode, init_from=teacher)
    trainer = _trainer(args, name, max_steps)
    trainer.fit(model, data)
    trainer.save_checkpoint(os.path.join(args.out, f"{name}.ckpt"))
    return time.time() - t0


def evaluate(args: argparse.Namespace, wall: dict[str, float]) -> dict[str, object]:
    ref = sample_toy("moons", 1000, generator=torch.Generator().manual_seed(12345))  # independent of training
    z0 = torch.randn(1000, 2, generator=torch.Generator().manual_seed(777))
    results: dict[str, object] = {"n": 1000, "wall_s": wall, "w2": {}, "straightness": {}, "transport_cost": {}}
    figures = Path(args.docs)
    for name, steps in (("1rf", EVAL_STEPS), ("2rf", EVAL_STEPS), ("distill", (1,))):
        path = os.path.join(args.out, f"{name}.ckpt")
        if not os.path.exists(path):
            continue
        model = load_rectified_flow(path, net=TimeMLP(2, args.hidden, args.depth))
        row = {}
        for k in steps:
            row[k] = float(wasserstein2(model.sample(0, steps=k, z0=z0), ref))
        results["w2"][name] = row  # type: ignore[index]
        metrics = model.flow_metrics(z0, steps=100 if name != "distill" else 1)
        results["straightness"][name] = float(metrics["straightness"])  # type: ignore[index]
        results["transport_cost"][name] = float(metrics["transport_cost"])  # type: ignore[index]
        shown = 1 if name == "distill" else 100
        z1, traj = model.sample(0, steps=shown, z0=z0, return_trajectory=True)
        title = f"{name}: {shown} Euler step(s), W2 = {row[shown]:.3f}"
        plotting.save_figure(plotting.scatter_figure(z1, ref, trajectories=traj, title=title),
                              figures / f"moons_{name}.png")
        if name != "distill":
            z1_one = model.sample(0, steps=1, z0=z0)
            fig = plotting.scatter_figure(z1_one, ref, title=f"{name}: 1 Euler step, W2 = {row[1]:.3f}")
            plotting.save_figure(fig, figures / f"moons_{name}_1step.png")
    w2 = results["w2"]
    checks = {}
    if "1rf" in w2:  # type: ignore[operator]
        checks["1-RF W2@100 <= 0.10"] = w2["1rf"][100] <= 0.10  # type: ignore[index]
    if "1rf" in w2 and "2rf" in w2:  # type: ignore[operator]
        checks["2-RF W2@1 <= 1.5 x 1-RF W2@100"] = w2["2rf"][1] <= 1.5 * w2["1rf"][100]  # type: ignore[index]
        checks["S(2-RF) <= S(1-RF)/3"] = (results["straightness"]["2rf"]  # type: ignore[index]
                                          <= results["straightness"]["1rf"] / 3)  # type: ignore[index]
    if "1rf" in w2 and "distill" in w2:  # type: ignore[operator]
        checks["distilled W2@1 <= 1-RF W2@1 / 3"] = w2["distill"][1] * 3 <= w2["1rf"][1]  # type: ignore[index]
    results["checks"] = checks
    return results


def print_table(results: dict[str, object]) -> None:
    w2 = results["w2"]
    header = "| model | " + " | ".join(f"W2@{k}" for k in EVAL_STEPS) + " | straightness | E‖Z1−Z0‖² |"
    print(header)
    print("|" + "---|" * (len(EVAL_STEPS) + 3))
    for name, row in w2.items():  # type: ignore[union-attr]
        cells = [f"{row[k]:.3f}" if k in row else "" for k in EVAL_STEPS]
        s, c = results["straightness"][name], results["transport_cost"][name]  # type: ignore[index]
        print(f"| {name} | " + " | ".join(cells) + f" | {s:.4f} | {c:.3f} |")
    print("floor (two moons samples, n=1000): 0.035; DSBM anchor, rectified flow W2@20 on moons: 0.129")
    for check, ok in results["checks"].items():  # type: ignore[union-attr]
        print(f"  [{'PASS' if ok else 'FAIL'}] {check}")
    print("wall time (s):", {k: round(v) for k, v in results["wall_s"].items()})  # type: ignore[union-attr]


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", choices=["all", "1rf", "2rf", "distill", "eval"], default="all")
    p.add_argument("--out", default="runs/rectified_flow")
    p.add_argument("--docs", default="docs/results/flow")
    p.add_argument("--quick", action="store_true", help="tiny run for a smoke check")
    p.add_argument("--steps-1rf", type=int, default=4000)
    p.add_argument("--steps-2rf", type=int, default=2000)
    p.add_argument("--steps-distill", type=int, default=1500)
    p.add_argument("--num-pairs", type=int, default=20000)
    p.add_argument("--pair-steps", type=int, default=100)
    p.add_argument("--num-train", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-3, help="Tiger's relative learning rate")
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps_1rf, args.steps_2rf, args.steps_distill = 60, 40, 40
        args.num_pairs, args.pair_steps, args.hidden, args.num_train = 1024, 20, 64, 4096
        args.out = args.out + "_quick"
        args.docs = os.path.join(args.out, "pictures")
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(0, workers=True)
    os.makedirs(args.out, exist_ok=True)
    wall_file = Path(args.out) / "wall.json"
    wall: dict[str, float] = json.loads(wall_file.read_text()) if wall_file.exists() else {}
    ckpt = {name: os.path.join(args.out, f"{name}.ckpt") for name in ("1rf", "2rf", "distill")}
    if args.stage in ("all", "1rf"):
        wall["1rf"] = stage_1rf(args)
    if args.stage in ("all", "2rf"):
        wall["2rf"] = _stage_pairs(args, "2rf", ckpt["1rf"], "reflow", args.steps_2rf)
    if args.stage in ("all", "distill"):
        wall["distill"] = _stage_pairs(args, "distill", ckpt["2rf"], "distill", args.steps_distill)
    wall_file.write_text(json.dumps(wall))
    results = evaluate(args, wall)
    results["args"] = vars(args)
    Path(args.out, "results.json").write_text(json.dumps(results, indent=2, default=str))
    print_table(results)
    return results


if __name__ == "__main__":
    main()
