"""Score-matching diffusion on moons: W2 against sampler steps for every sampler, and training steps/s.

    python benchmarks/diffusion.py [--quick] [--checkpoint PATH] [--train-steps N] [--threads K]

Trains (or loads) a VP ScoreMatchingModule on moons (TimeMLP 128×3, Tiger, EMA 0.999), then samples 1000 points with
each sampler at several step counts and reports the exact W2 against the held-out 1000 (floor: two independent moons
samples of n = 1000 are ≈ 0.035 apart). Peer: ``scipy.integrate.solve_ivp(method="RK45")`` on the flattened batch for
the probability-flow ODE, beside our Dormand–Prince ``ode_adaptive`` at the same tolerances (same tableau, so NFE and W2
should agree; time shows the host-side overhead). No installed package implements score-SDE samplers, so there is no
other peer. Writes ``benchmarks/results/diffusion.json`` and ``benchmarks/results/diffusion.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from functools import partial

import lightning as L
import numpy as np
import torch

from lightning_tiger.data.toy2d import ToyDataModule
from lightning_tiger.metrics.functional import wasserstein2
from lightning_tiger.modules.score_matching import ScoreMatchingModule
from lightning_tiger.nn.time_mlp import TimeMLP
from lightning_tiger.optim import Tiger

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def make_module() -> ScoreMatchingModule:
    return ScoreMatchingModule(net=TimeMLP(data_dim=2, hidden_dim=128, depth=3, time_dim=32), num_val_samples=0,
                               optimizer=partial(Tiger, lr=2e-3),
                               lr_scheduler=partial(torch.optim.lr_scheduler.ConstantLR, factor=1.0))


def train(steps: int, dm: ToyDataModule) -> tuple[ScoreMatchingModule, float]:
    from lightning.pytorch.callbacks import EMAWeightAveraging

    torch.manual_seed(0)
    module = make_module()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                        callbacks=[EMAWeightAveraging(decay=0.999)], default_root_dir="/tmp/lt_bench_diffusion")
    t0 = time.perf_counter()
    trainer.fit(module, dm)
    return module, steps / (time.perf_counter() - t0)


def plain_steps_per_second(dm: ToyDataModule, steps: int) -> float:
    """Bare loop (no Trainer): DSM loss + backward + Tiger step; the Lightning overhead is the gap."""
    from lightning_tiger.optim.param_groups import tiger_param_groups
    from lightning_tiger.optim.tiger import Tiger

    module = make_module()
    opt = Tiger(tiger_param_groups(module), lr=2e-3)
    loader = iter(dm.train_dataloader())
    t0 = time.perf_counter()
    for _ in range(steps):
        try:
            x = next(loader)
        except StopIteration:
            loader = iter(dm.train_dataloader())
            x = next(loader)
        loss = module.dsm_loss(x).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps / (time.perf_counter() - t0)


def scipy_rk45(module: ScoreMatchingModule, n: int, rtol: float, atol: float, gen: torch.Generator
               ) -> tuple[torch.Tensor, int]:
    from scipy.integrate import solve_ivp

    sde = module.sde
    x0 = sde.prior_sample((n, 2), generator=gen)
    nfe = 0

    def f(t: float, y: np.ndarray) -> np.ndarray:
        nonlocal nfe
        nfe += 1
        x = torch.from_numpy(y).float().reshape(n, 2)
        tt = torch.full((n,), t)
        with torch.no_grad():
            v = sde.reverse_drift(x, tt, module.score(x, tt), ode=True)
        return v.reshape(-1).double().numpy()

    sol = solve_ivp(f, (1.0, 1e-3), x0.reshape(-1).double().numpy(), method="RK45", rtol=rtol, atol=atol)
    return torch.from_numpy(sol.y[:, -1]).float().reshape(n, 2), nfe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short training and two step counts (< 1 min)")
    p.add_argument("--checkpoint", default=None, help="state_dict of a trained module (examples/score_matching.py "
                                                      "--save-checkpoint); trains one when absent")
    p.add_argument("--train-steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dm = ToyDataModule("moons", batch_size=256)
    dm.setup()
    ref = dm.val_reference()
    n = ref.shape[0]
    speed_steps = 50 if args.quick else 300
    plain = plain_steps_per_second(dm, speed_steps)
    if args.checkpoint and os.path.exists(args.checkpoint):
        module = make_module()
        module.load_state_dict(torch.load(args.checkpoint, weights_only=True))
        _, lightning_sps = train(speed_steps, dm)
        trained = f"checkpoint {args.checkpoint}"
    else:
        steps = args.train_steps or (300 if args.quick else 5000)
        module, lightning_sps = train(steps, dm)
        trained = f"{steps} Tiger steps in this run"
    module.eval()
    step_grid = [10, 50] if args.quick else [10, 25, 50, 100, 200, 500]
    rows: list[dict] = []
    for sampler in ("em", "pc", "ode_euler", "ode_heun"):
        for steps in step_grid:
            t0 = time.perf_counter()
            x = module.sample(n, sampler, steps, generator=torch.Generator().manual_seed(1))
            nfe = steps * (2 if sampler in ("pc", "ode_heun") else 1)
            rows.append({"sampler": sampler, "steps": steps, "nfe": nfe, "seconds": time.perf_counter() - t0,
                         "w2": float(wasserstein2(x, ref))})
    for tol in ([1e-3] if args.quick else [1e-2, 1e-3, 1e-5]):
        t0 = time.perf_counter()
        x = module.sample(n, "ode_adaptive", rtol=tol, atol=tol, generator=torch.Generator().manual_seed(1))
        rows.append({"sampler": f"ode_adaptive(tol={tol:g})", "steps": None, "nfe": module.last_nfe,
                     "seconds": time.perf_counter() - t0, "w2": float(wasserstein2(x, ref))})
        t0 = time.perf_counter()
        x, nfe = scipy_rk45(module, n, tol, tol, torch.Generator().manual_seed(1))
        rows.append({"sampler": f"scipy RK45(tol={tol:g}) [peer]", "steps": None, "nfe": nfe,
                     "seconds": time.perf_counter() - t0, "w2": float(wasserstein2(x, ref))})
    print(f"moons, VP SDE, TimeMLP 128x3, {trained}; n = {n}; W2 floor at n=1000 ≈ 0.035 (two moons samples)")
    print(f"training: {lightning_sps:.1f} steps/s with Lightning+EMA, {plain:.1f} steps/s bare loop "
          f"(ratio {lightning_sps / plain:.2f}); threads={torch.get_num_threads()}")
    print(f"{'sampler':34s} {'steps':>6s} {'NFE':>6s} {'W2':>8s} {'sec':>7s}")
    for r in rows:
        print(f"{r['sampler']:34s} {r['steps'] or '-':>6} {r['nfe']:>6} {r['w2']:8.4f} {r['seconds']:7.2f}")
    ours = [r for r in rows if r["sampler"].startswith("ode_adaptive")]
    peers = [r for r in rows if r["sampler"].startswith("scipy")]
    for o, pe in zip(ours, peers):
        print(f"{o['sampler']}: time ratio ours/scipy = {o['seconds'] / pe['seconds']:.2f}, "
              f"W2 {o['w2']:.4f} vs {pe['w2']:.4f}")
    os.makedirs(RESULTS, exist_ok=True)
    out = {"trained": trained, "n": n, "w2_floor_n1000": 0.035, "train_steps_per_s_lightning": lightning_sps,
           "train_steps_per_s_bare": plain, "threads": torch.get_num_threads(), "quick": args.quick, "rows": rows}
    with open(os.path.join(RESULTS, "diffusion.json"), "w") as f:
        json.dump(out, f, indent=1)
    from lightning_tiger import plotting

    fig = plotting.new_figure((5.5, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    for sampler in ("em", "pc", "ode_euler", "ode_heun"):
        pts = [(r["nfe"], r["w2"]) for r in rows if r["sampler"] == sampler]
        ax.plot(*zip(*pts), marker="o", label=sampler)
    ax.scatter([r["nfe"] for r in ours], [r["w2"] for r in ours], marker="*", s=80, c="k", label="ode_adaptive")
    ax.axhline(0.035, ls="--", c="0.5", lw=1, label="floor n=1000")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("score evaluations (NFE)")
    ax.set_ylabel("W2 vs held-out (n=1000)")
    ax.legend(fontsize=7)
    plotting.save_figure(fig, os.path.join(RESULTS, "diffusion.png"))


if __name__ == "__main__":
    main()
