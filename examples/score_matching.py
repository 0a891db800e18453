"""Train ScoreMatchingModule (Tiger + EMA) on moons or digits, evaluate every sampler, save pictures.

    python examples/score_matching.py --task moons [--max-steps 5000] [--out docs/results/diffusion]
    python examples/score_matching.py --task digits [--max-steps 3000]

The YAML configs in examples/configs/diffusion/ describe the same runs for ``lightning-tiger fit``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from functools import partial

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging

from lightning_tiger import plotting
from lightning_tiger.data.digits import DigitsDataModule
from lightning_tiger.data.toy2d import ToyDataModule
from lightning_tiger.metrics.functional import frechet_distance, wasserstein2
from lightning_tiger.modules.score_matching import ScoreMatchingModule
from lightning_tiger.nn.small_unet import SmallUNet
from lightning_tiger.nn.time_mlp import TimeMLP
from lightning_tiger.optim import Tiger


class _Progress(Callback):
    def __init__(self, every: int) -> None:
        self.every, self.t0 = every, time.time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        if trainer.global_step % self.every == 0:
            loss = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)
            print(f"step {trainer.global_step:6d}  loss {loss:.4f}  {time.time() - self.t0:7.1f}s", flush=True)


def build(task: str, optimizer: str, lr: float | None) -> tuple[ScoreMatchingModule, L.LightningDataModule]:
    # The measured recipe (README): a constant learning rate, EMA from the Trainer's callback (below).
    factory = partial(torch.optim.AdamW, lr=lr or 1e-3) if optimizer == "adamw" else partial(Tiger, lr=lr or 2e-3)
    constant = partial(torch.optim.lr_scheduler.ConstantLR, factor=1.0)
    if task == "moons":
        net = TimeMLP(data_dim=2, hidden_dim=128, depth=3, time_dim=32)
        module = ScoreMatchingModule(net=net, sampler="pc", sample_steps=200, num_val_samples=0,
                                     optimizer=factory, lr_scheduler=constant)
        return module, ToyDataModule("moons", batch_size=256)
    net = SmallUNet(in_channels=1, base_channels=16, time_dim=32)
    module = ScoreMatchingModule(net=net, data_shape=[1, 8, 8], sampler="ode_heun", sample_steps=25,
                                 num_val_samples=0, optimizer=factory, lr_scheduler=constant)
    return module, DigitsDataModule(batch_size=128)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["moons", "digits"], default="moons")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--out", default="docs/results/diffusion")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (1 on a shared machine)")
    p.add_argument("--optimizer", choices=["tiger", "adamw"], default="tiger")
    p.add_argument("--lr", type=float, default=None, help="default: 2e-3 (Tiger, relative) / 1e-3 (AdamW)")
    p.add_argument("--ema-decay", type=float, default=0.999, help="EMAWeightAveraging decay (0.99 for short runs)")
    p.add_argument("--save-checkpoint", default=None, help="path to save the trained (EMA) module weights")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    module, dm = build(args.task, args.optimizer, args.lr)
    max_steps = args.max_steps or (5000 if args.task == "moons" else 3000)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                        callbacks=[EMAWeightAveraging(decay=args.ema_decay), _Progress(max(max_steps // 10, 1))],
                        default_root_dir="/tmp/lightning_tiger_score_example")
    t0 = time.time()
    trainer.fit(module, dm)  # EMAWeightAveraging copies the average into the module at the end
    train_s = time.time() - t0
    if args.save_checkpoint:
        torch.save(module.state_dict(), args.save_checkpoint)
    dm.setup()
    ref = dm.val_reference()
    n = ref.shape[0]
    results: dict = {"task": args.task, "max_steps": max_steps, "optimizer": args.optimizer,
                     "ema_decay": args.ema_decay,
                     "train_seconds": round(train_s, 1), "threads": torch.get_num_threads(), "samplers": {}}
    settings = [("ode_heun", 50), ("ode_adaptive", None), ("pc", 200), ("em", 500)] if args.task == "moons" \
        else [("ode_heun", 25)]
    for sampler, steps in settings:
        t1 = time.time()
        x = module.sample(n, sampler, steps, generator=torch.Generator().manual_seed(1))
        entry = {"steps": steps, "seconds": round(time.time() - t1, 1),
                 "w2": float(wasserstein2(x.reshape(n, -1), ref.reshape(n, -1)))}
        if sampler == "ode_adaptive":
            entry["nfe"] = module.last_nfe
        if args.task == "digits":
            entry["fd"] = float(frechet_distance(x.reshape(n, -1), ref.reshape(n, -1)))
        results["samplers"][sampler] = entry
        print(sampler, entry, flush=True)
        if sampler in ("ode_heun", "pc") and args.task == "moons":
            fig = plotting.scatter_figure(x, ref, title=f"VP score model, {sampler} {steps} steps, "
                                                         f"W2 = {entry['w2']:.3f}")
            plotting.save_figure(fig, os.path.join(args.out, f"moons_{sampler}.png"))
        if sampler == "ode_heun" and args.task == "digits":
            plotting.save_image(plotting.image_grid(x[:64]),
                                 os.path.join(args.out, f"digits_ode_heun_{args.optimizer}.png"))
    if args.task == "digits":
        noise = torch.rand(ref.shape, generator=torch.Generator().manual_seed(2)) * 2 - 1
        results["fd_noise_baseline"] = float(frechet_distance(noise.reshape(n, -1), ref.reshape(n, -1)))
        dm2 = DigitsDataModule()
        dm2.setup()
        half = dm2._train[: ref.shape[0]]
        results["fd_train_vs_heldout"] = float(frechet_distance(half.reshape(len(half), -1),
                                                                ref[: len(half)].reshape(len(half), -1)))
    print(json.dumps(results, indent=1))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.task}_{args.optimizer}.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
