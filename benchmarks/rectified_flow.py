"""Rectified flow on moons: W2 against Euler steps (1-RF, 2-RF, distilled), training steps/s, sampling samples/s,
and the same 1-RF task trained with torchcfm's ConditionalFlowMatcher loss side by side.

    python benchmarks/rectified_flow.py [--quick] [--ckpt-dir runs/rectified_flow] [--train-steps 2000]

- W2 table: exact W2 (1000 samples, independent moons reference; floor 0.035) of the checkpoints written by
  ``examples/rectified_flow.py`` (skipped with a message when absent).
- Training: the same TimeMLP, Tiger optimizer (same lr, schedule, EMA) and batches, trained for
  ``--train-steps`` plain-PyTorch steps with (a) ``RectifiedFlowModule.compute_loss`` and (b) torchcfm's
  ``ConditionalFlowMatcher(sigma=0)`` target (the same rectified-flow / I-CFM path); steps/s and W2 at 20 and
  100 Euler steps of each (skipped with a message if torchcfm is absent). Ratios are ours / peer.
- Sampling: samples/s of 100-step Euler on 10000 points and of the adaptive RK45 (its NFE reported).
Timings on a shared machine are noisy; rerun on a quiet one.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch

from lightning_tiger.data.toy2d import sample_toy
from lightning_tiger.metrics.functional import wasserstein2
from lightning_tiger.modules.rectified_flow import RectifiedFlowModule, load_rectified_flow
from lightning_tiger.nn.time_mlp import TimeMLP
from lightning_tiger.optim import PiecewiseLinearLR, Tiger, tiger_param_groups

RESULTS = Path(__file__).resolve().parent / "results" / "rectified_flow.json"


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def train(loss_kind: str, steps: int, args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(0)
    model = RectifiedFlowModule(net=TimeMLP(2, args.hidden, args.depth))
    ema = copy.deepcopy(model)
    opt = Tiger(tiger_param_groups(model, weight_decay=0.01), lr=args.lr)
    sched = PiecewiseLinearLR(opt, {max(1, steps // 20): 1.0, steps: 0.05})
    data = sample_toy("moons", 20000, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    if loss_kind == "torchcfm":
        from torchcfm.conditional_flow_matching import ConditionalFlowMatcher

        cfm = ConditionalFlowMatcher(sigma=0.0)
    start = time.perf_counter()
    for _ in range(steps):
        x1 = data[torch.randint(len(data), (args.batch_size,), generator=gen)]
        if loss_kind == "ours":
            loss = model.compute_loss(x1)
        else:
            x0 = torch.randn_like(x1)
            t, xt, ut = cfm.sample_location_and_conditional_flow(x0, x1)
            loss = ((model(xt, t) - ut) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        _ema_update(ema, model, args.ema_decay)
    elapsed = time.perf_counter() - start
    ref = sample_toy("moons", 1000, generator=torch.Generator().manual_seed(12345))
    z0 = torch.randn(1000, 2, generator=torch.Generator().manual_seed(777))
    return {
        "steps_per_s": steps / elapsed,
        "w2@20": float(wasserstein2(ema.sample(0, steps=20, z0=z0), ref)),
        "w2@100": float(wasserstein2(ema.sample(0, steps=100, z0=z0), ref)),
    }


def sampling_speed(model: RectifiedFlowModule, n: int) -> dict[str, float]:
    z0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    model.sample(0, steps=100, z0=z0)
    euler = n / (time.perf_counter() - start)
    from lightning_tiger.generative.flow import integrate

    start = time.perf_counter()
    with torch.no_grad():
        sol = integrate(model.forward, z0, steps=10, solver="adaptive", rtol=1e-4, atol=1e-4)
    adaptive = n / (time.perf_counter() - start)
    return {"euler100_samples_per_s": euler, "adaptive_samples_per_s": adaptive, "adaptive_nfe": sol.nfe}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke check, < 1 min")
    p.add_argument("--ckpt-dir", default="runs/rectified_flow")
    p.add_argument("--train-steps", type=int, default=2000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--ema-decay", type=float, default=0.998)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default; 1 on a busy machine)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.train_steps, args.hidden, args.ema_decay = 60, 64, 0.9
    out: dict[str, object] = {"args": vars(args), "torch_threads": torch.get_num_threads()}

    # 1) W2 table from the example's checkpoints.
    ref = sample_toy("moons", 1000, generator=torch.Generator().manual_seed(12345))
    z0 = torch.randn(1000, 2, generator=torch.Generator().manual_seed(777))
    table: dict[str, dict[int, float]] = {}
    models = {}
    for name in ("1rf", "2rf", "distill"):
        path = os.path.join(args.ckpt_dir, f"{name}.ckpt")
        if not os.path.exists(path):
            print(f"[skip] {path} not found: run examples/rectified_flow.py first for the W2 table")
            continue
        models[name] = load_rectified_flow(path, net=TimeMLP(2, args.hidden, args.depth))
        steps_list = (1,) if name == "distill" else (1, 2, 4, 8, 20, 100)
        table[name] = {k: float(wasserstein2(models[name].sample(0, steps=k, z0=z0), ref)) for k in steps_list}
    if table:
        print("| model | " + " | ".join(f"W2@{k}" for k in (1, 2, 4, 8, 20, 100)) + " |")
        print("|---|" + "---|" * 6)
        for name, row in table.items():
            print(f"| {name} | " + " | ".join(f"{row[k]:.3f}" if k in row else "" for k in (1, 2, 4, 8, 20, 100))
                  + " |")
        print("floor n=1000: 0.035; DSBM anchor (rectified flow, 20 Euler steps, moons): 0.129")
    out["w2_table"] = table

    # 2) Training side by side.
    train_rows = {"ours": train("ours", args.train_steps, args)}
    try:
        import torchcfm  # noqa: F401

        train_rows["torchcfm"] = train("torchcfm", args.train_steps, args)
    except ImportError:
        print("[skip] torchcfm is not installed: no side-by-side training")
    print(f"\ntraining ({args.train_steps} steps, TimeMLP({args.hidden}, depth {args.depth}), batch "
          f"{args.batch_size}, Tiger lr {args.lr}, EMA {args.ema_decay})")
    print("| loss | steps/s | W2@20 | W2@100 |\n|---|---|---|---|")
    for name, row in train_rows.items():
        print(f"| {name} | {row['steps_per_s']:.1f} | {row['w2@20']:.3f} | {row['w2@100']:.3f} |")
    if "torchcfm" in train_rows:
        ratio = train_rows["ours"]["steps_per_s"] / train_rows["torchcfm"]["steps_per_s"]
        print(f"steps/s ratio ours/torchcfm: {ratio:.2f}")
        out["steps_per_s_ratio_ours_over_torchcfm"] = ratio
    out["training"] = train_rows

    # 3) Sampling speed.
    model = models.get("1rf") or RectifiedFlowModule(net=TimeMLP(2, args.hidden, args.depth))
    speed = sampling_speed(model, 2000 if args.quick else 10000)
    print(f"\nsampling: Euler-100 {speed['euler100_samples_per_s']:.0f} samples/s, adaptive RK45 "
          f"{speed['adaptive_samples_per_s']:.0f} samples/s (NFE {speed['adaptive_nfe']})")
    out["sampling"] = speed
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
