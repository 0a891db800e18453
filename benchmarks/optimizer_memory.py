"""Peak memory of whole training steps with gradient accumulation, one process per optimizer (issue #2).

Tiger's memory claim (Su 2023, kexue.fm/archives/9512): with accumulation folded into the momentum, training holds
no separate gradient buffer.

Usage: ``python benchmarks/optimizer_memory.py [--quick]``

Model: a parameter-dominated deep residual MLP, fp32: ``depth`` blocks ``x + Linear(width, width)(relu(x))``
(full run: width 2048, depth 24, 100.7M parameters; ``--quick``: width 1024, depth 8, 8.4M), batch 8, MSE to a
fixed random target. (Residual, so that gradients do not vanish with depth: with a plain deep ReLU MLP the
early layers' momenta sit at the rounding floor and many signs become rounding noise.) Each configuration runs
2 optimizer steps of an accumulation window of k = 4 micro-batches, Lightning style (``accumulate_grad_batches``):
k backward passes of ``loss / k``, then one ``step()`` and ``zero_grad(set_to_none=True)``, with identical data
and initial weights:

- ``AdamW``: ``torch.optim.AdamW`` (default path), 16 bytes/parameter (θ, g, m, v);
- ``Lion``: ours, 12 bytes/parameter; ``Tiger``: ours, ``grad_accum_steps=1``, 12 bytes/parameter;
- ``Tiger tight-fisted``: ours, ``fold_in_backward=True`` (post-accumulate-grad hooks fold every gradient into
  the momentum during backward and free it), 8 bytes/parameter;
- ``Tiger tight-fisted bf16 m``: same with ``momentum_dtype=torch.bfloat16``, 6 bytes/parameter (extra row).

Memory measure: the RSS high-water mark of the worker process (``getrusage(RUSAGE_SELF).ru_maxrss``), minus its
RSS after ``import torch``, the package and a warm-up step of a throw-away layer (interpreter, libraries,
BLAS, thread pools, the first-``Optimizer`` imports, our kernels: identical in every run), so the
numbers are what the training step itself holds. Workers run with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then
serves every large tensor by ``mmap`` and returns it to the OS at ``free``, so RSS follows the live tensor memory
(without it, glibc's adaptive threshold can keep freed gradient buffers in the heap and inflate the RSS).

Targets: tight-fisted Tiger <= 0.55x AdamW's peak and <= 0.70x standard Tiger's; the final parameters of the
tight-fisted and the standard Tiger agree within fp32 rounding (the max abs difference is reported; the two
modes sum the k micro-gradients in a different order, so a momentum within rounding of 0 can take the other
sign and move that element by ±2η, after which the trajectories differ slightly; reported after the first
and after the last step, the former from two extra 1-step runs).

Writes ``benchmarks/results/optimizer_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from residual_mlp import Residual, rss_bytes
from torch import nn

RESULTS = Path(__file__).parent / "results" / "optimizer_memory.json"
CONFIGS = ("AdamW", "Lion", "Tiger", "Tiger tight-fisted", "Tiger tight-fisted bf16 m")
BYTES_PER_PARAM = {"AdamW": 16, "Lion": 12, "Tiger": 12, "Tiger tight-fisted": 8, "Tiger tight-fisted bf16 m": 6}
K = 4


def worker(config: str, quick: bool, out: str, steps: int = 2) -> None:  # steps <= 2
    """Runs one configuration and writes {peak, baseline, ...} JSON to ``out`` and the final weights next to it."""
    from lightning_tiger.optim import Lion, Tiger

    width, depth, batch = (1024, 8, 8) if quick else (2048, 24, 8)
    # Warm-up on a throw-away layer: loads BLAS/oneDNN, starts the autograd and OpenMP threads, imports what
    # torch.optim.Optimizer pulls in at first construction (~70 MB of torch._dynamo) and loads our kernels, so
    # that the baseline below holds every one-off cost and the peak over it is what training itself holds.
    from lightning_tiger.optim import _fused

    _fused.fused_available()
    warm = nn.Linear(width, width)
    warm_opt = torch.optim.AdamW(warm.parameters())
    warm(torch.randn(batch, width)).square().mean().backward()
    warm_opt.step()
    del warm, warm_opt
    baseline = rss_bytes()
    torch.manual_seed(0)
    model = nn.Sequential(*(Residual(width) for _ in range(depth)))
    n_params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    xs = torch.randn(2 * K, batch, width, generator=gen)  # the same data whatever `steps`
    ys = torch.randn(2 * K, batch, width, generator=gen)
    params = list(model.parameters())
    if config == "AdamW":
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=1e-4)
    elif config == "Lion":
        opt = Lion(params, lr=1e-4, weight_decay=0.1)
    elif config == "Tiger":
        opt = Tiger(params, lr=1e-3)
    elif config == "Tiger tight-fisted":
        opt = Tiger(params, lr=1e-3, fold_in_backward=True)
    elif config == "Tiger tight-fisted bf16 m":
        opt = Tiger(params, lr=1e-3, fold_in_backward=True, momentum_dtype=torch.bfloat16)
    else:
        raise ValueError(f"config must be one of {CONFIGS}, got {config!r}")
    after_model = rss_bytes()
    for s in range(steps):
        for j in range(K):
            loss = nn.functional.mse_loss(model(xs[s * K + j]), ys[s * K + j]) / K
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    torch.save([p.detach() for p in params], out + ".pt")
    Path(out).write_text(json.dumps(dict(config=config, n_params=n_params, baseline_rss=baseline,
                                         model_rss=after_model - baseline, peak_rss=peak,
                                         peak_over_baseline=peak - baseline, loss=loss.item() * K)))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="an 8.4M-parameter MLP (smoke check)")
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.quick, args.out, args.steps)
        return {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(c, 2) for c in CONFIGS] + [("Tiger", 1), ("Tiger tight-fisted", 1)]
        for config, steps in runs:
            # the 1-step runs only give the parameters after one window (rounding-level comparison)
            out = os.path.join(tmp, config.replace(" ", "_") + f"_{steps}.json")
            cmd = [sys.executable, __file__, "--worker", config, "--out", out, "--steps", str(steps)]
            subprocess.run(cmd + (["--quick"] if args.quick else []), check=True, env=env)
            if steps == 2:
                rows.append(json.loads(Path(out).read_text()))
        compare = {}
        for steps in (1, 2):
            std = torch.load(os.path.join(tmp, f"Tiger_{steps}.json.pt"))
            fold = torch.load(os.path.join(tmp, f"Tiger_tight-fisted_{steps}.json.pt"))
            diffs = [(a - b).abs() for a, b in zip(std, fold)]
            compare[f"after {steps} step" + ("s" if steps > 1 else "")] = dict(
                max_abs_diff=max(float(d.max()) for d in diffs),
                n_diff_gt_1em6=sum(int((d > 1e-6).sum()) for d in diffs),
                n_compared=sum(d.numel() for d in diffs),
            )
    by = {r["config"]: r for r in rows}
    n_params = rows[0]["n_params"]
    for r in rows:
        r["bytes_per_param_theory"] = BYTES_PER_PARAM[r["config"]]
        r["ratio_to_AdamW"] = r["peak_over_baseline"] / by["AdamW"]["peak_over_baseline"]
        r["ratio_to_Tiger"] = r["peak_over_baseline"] / by["Tiger"]["peak_over_baseline"]
        r["bytes_per_param_measured"] = r["peak_over_baseline"] / n_params
    tf = by["Tiger tight-fisted"]
    targets = {
        "tight-fisted <= 0.55x AdamW peak": tf["ratio_to_AdamW"] <= 0.55,
        "tight-fisted <= 0.70x standard Tiger peak": tf["ratio_to_Tiger"] <= 0.70,
    }
    print(f"\nMLP of {n_params / 1e6:.1f}M fp32 parameters, k={K} accumulation, peak RSS over the warmed-up "
          f"baseline (interpreter + libraries: {rows[0]['baseline_rss'] / 2**20:.0f} MiB)")
    print(f"{'config':28s} {'peak MiB':>9s} {'B/param':>8s} {'theory':>7s} {'/AdamW':>7s} {'/Tiger':>7s} "
          f"{'raw peak RSS MiB':>17s}")
    for r in rows:
        print(f"{r['config']:28s} {r['peak_over_baseline'] / 2**20:9.0f} {r['bytes_per_param_measured']:8.2f} "
              f"{r['bytes_per_param_theory']:7d} {r['ratio_to_AdamW']:7.2f} {r['ratio_to_Tiger']:7.2f} "
              f"{r['peak_rss'] / 2**20:17.0f}")
    for when, c in compare.items():
        print(f"parameters {when}, tight-fisted vs standard Tiger: max abs diff {c['max_abs_diff']:.3g}; "
              f"{c['n_diff_gt_1em6']} of {c['n_compared']} elements differ by more than 1e-6")
    for t, ok in targets.items():
        print(f"target {'PASS' if ok else 'MISS'}: {t}")
    out = dict(benchmark="optimizer_memory", quick=args.quick, k=K, n_params=n_params, results=rows,
               tight_vs_standard=compare, targets=targets, torch=torch.__version__,
               measure="ru_maxrss minus warmed-up RSS, MALLOC_MMAP_THRESHOLD_=65536")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS}")
    return out


if __name__ == "__main__":
    main()
