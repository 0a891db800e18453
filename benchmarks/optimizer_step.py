"""Optimizer step time, side by side, on GPT-2-like fp32 parameter shapes (issues #2 and #13).

Usage: ``python benchmarks/optimizer_step.py [--quick] [--rounds N] [--threads T]``

Shape set (full run, 51.5M parameters): a GPT-2-style decoder with d_model 512, 8 layers, vocabulary 50257,
context 1024: token embedding [50257, 512] (tied LM head, 25.7M, half the parameters: the "one huge tensor"
case), position embedding [1024, 512], per layer LayerNorm x2 (scale+shift [512]), attention qkv [1536, 512] +
bias, attention out [512, 512] + bias, MLP in [2048, 512] + bias, MLP out [512, 2048] + bias; a final LayerNorm.
``--quick``: d 256, 4 layers, vocabulary 8192, context 512 (2.9M parameters).

Measured in one process and interleaved (round-robin over the optimizers, the starting optimizer rotating each
round, several rounds, the first two discarded as warm-up) so that machine noise hits all alike. Reported: the
median ms per step, and the median over rounds of the per-round ratio to fused AdamW (both measured within
the same few hundred milliseconds, so a slow phase of a shared machine cancels out). Every optimizer owns its
copy of the parameters (as in training, where the optimizer is their only writer: Tiger's RMS cache relies on
it) and reads the same fixed gradients, so the memory traffic of each step is that of a real step. Our Tiger
is also timed with ``exact_nonfinite=True`` (the bit-exact non-finite rule, which reads every gradient before
writing; no target applies to it).

Low precision (issue #13): Tiger with a bf16 momentum on the fp32 parameters (16 bytes per parameter: θ and g
4 each, m 2, read and write), and Tiger on a bf16 copy of the model with bf16 gradients and momentum (10 bytes),
both against fused AdamW on the fp32 parameters (the baseline of the targets), plus fused AdamW on the bf16
copy for reference. The cost of stochastic rounding is the median per-round ratio of the bf16 Tiger step with
stochastic rounding to the same step rounding to nearest, both through ``Tiger`` when it has the
``stochastic_rounding`` option, else (a tree without it) through the fused kernel called as Tiger calls it
(``lightning_tiger.optim._fused.tiger_step_`` with per-tensor keys from ``stochastic_rounding.step_key``).

Reported per optimizer: ms per step, ratio to ``torch.optim.AdamW(fused=True)``, and the multiple of its
bandwidth bound = (bytes it must move per step) / (in-place bandwidth ``a.add_(b)`` measured in the same run,
12 bytes per element: read a, b; write a). Bytes per fp32 parameter: AdamW 28 (read θ, g, m, v; write θ, m, v),
Lion/Tiger 20 (read θ, g, m; write θ, m), a non-final Tiger micro-step 12 (read g, m; write m).

Peak transient allocation: one extra, untimed step per optimizer under ``torch.profiler`` with
``profile_memory=True``, which records every allocation and free of PyTorch's CPU allocator (all tensor memory,
including temporaries inside C++ ops); the peak of the running sum of allocated bytes during the step is the
transient memory on top of what existed before it (states created lazily at the first step are excluded
because the optimizers have already stepped). Target: no more than the largest single parameter.

Writes ``benchmarks/results/optimizer_step.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).parent / "results" / "optimizer_step.json"
ROW_BF16_MOM = "ours Tiger, bf16 momentum (fp32 θ)"
ROW_BF16_SR = "ours Tiger, bf16 θ+m+g, stochastic rounding"
ROW_BF16_RN = "ours Tiger, bf16 θ+m+g, round to nearest"
_BEFORE: dict[Callable[[], None], Callable[[], None]] = {}  # timed fn -> untimed preparation before each call


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)


class GPT2Like(nn.Module):
    """Parameters only (no forward needed): the shapes of a GPT-2-style decoder with a tied LM head."""

    def __init__(self, d: int, layers: int, vocab: int, ctx: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)


def _bandwidth_fn(numel: int) -> tuple[Callable[[], None], int]:
    a, b = torch.randn(numel), torch.randn(numel)

    def run() -> None:
        a.add_(b)

    return run, 12 * numel


def _peak_transient(fn: Callable[[], None]) -> int:
    """Peak of the running sum of CPU allocator bytes during ``fn()`` (relative to its start)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    return peak


def _copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its own parameters whose ``.grad`` are the original's gradient tensors."""
    twin = copy.deepcopy(model)
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = p.grad
    return twin


def _bf16_copy(model: nn.Module) -> nn.Module:
    """A bf16 copy of ``model`` whose gradients are bf16 copies of the original's (as under ``bf16-true``)."""
    twin = copy.deepcopy(model).to(torch.bfloat16)
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = p.grad.to(torch.bfloat16)
    return twin


def build_optimizers(model: nn.Module, skipped: dict[str, str]) -> dict[str, tuple[Callable[[], None], int]]:
    """name -> (one timed step, bytes moved per parameter); each optimizer on its own copy of the parameters."""
    from lightning_tiger.optim import Lion, Tiger, tiger_param_groups

    opts: dict[str, tuple[Callable[[], None], int]] = {}
    for suffix, exact in (("", False), (", exact_nonfinite", True)):
        tiger = Tiger(tiger_param_groups(_copy(model), weight_decay=0.01), lr=1e-3, beta=0.965,
                      exact_nonfinite=exact)
        opts[f"ours Tiger (k=1{suffix})"] = (tiger.step, 20)
        tiger4 = Tiger(tiger_param_groups(_copy(model), weight_decay=0.01), lr=1e-3, beta=0.965, grad_accum_steps=4,
                       exact_nonfinite=exact)

        def before_nonfinal(opt: Tiger = tiger4) -> None:
            # keep the timed call a non-final micro-step: run the window's final one, untimed, when it is next
            if (opt.param_groups[0]["micro_step"] + 1) % 4 == 0:
                opt.step()

        step = tiger4.step
        opts[f"ours Tiger non-final (k=4{suffix})"] = (step, 12)
        _BEFORE[step] = before_nonfinal
    lion = Lion(_copy(model).parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1)
    opts["ours Lion"] = (lion.step, 20)
    # issue #13: low-precision rows (bytes per parameter: θ and g in their dtype, m in bf16, read and write)
    tiger_bm = Tiger(tiger_param_groups(_copy(model), weight_decay=0.01), lr=1e-3, beta=0.965,
                     momentum_dtype=torch.bfloat16)
    opts[ROW_BF16_MOM] = (tiger_bm.step, 16)
    for row, stochastic in ((ROW_BF16_SR, True), (ROW_BF16_RN, False)):
        opt = Tiger(tiger_param_groups(_bf16_copy(model), weight_decay=0.01), lr=1e-3, beta=0.965,
                    stochastic_rounding=stochastic)
        opts[row] = (opt.step, 10)
    adam_bf16 = torch.optim.AdamW(_bf16_copy(model).parameters(), lr=1e-3, weight_decay=0.01, fused=True)
    opts["torch AdamW fused, bf16 θ+m+v+g"] = (adam_bf16.step, 14)
    for flavour, kw in (("single-tensor", dict(foreach=False)), ("foreach", dict(foreach=True)),
                        ("fused", dict(fused=True))):
        adam = torch.optim.AdamW(_copy(model).parameters(), lr=1e-3, weight_decay=0.01, **kw)
        opts[f"torch AdamW {flavour}"] = (adam.step, 28)
    try:
        import lion_pytorch

        lp = lion_pytorch.Lion(_copy(model).parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1)
        opts["lion-pytorch Lion"] = (lp.step, 20)
    except ImportError as err:
        skipped["lion-pytorch"] = f"not installed ({err}); pip install '.[bench]'"
    try:
        import pytorch_optimizer

        po_lion = pytorch_optimizer.Lion(_copy(model).parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1)
        opts["pytorch_optimizer Lion"] = (po_lion.step, 20)
        po_tiger = pytorch_optimizer.Tiger(_copy(model).parameters(), lr=1e-3, beta=0.965, weight_decay=0.01)
        opts["pytorch_optimizer Tiger"] = (po_tiger.step, 20)
    except ImportError as err:
        skipped["pytorch_optimizer"] = f"not installed ({err}); pip install '.[bench]'"
    return opts


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes and few rounds (smoke check)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds after 2 warm-up rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-memory", action="store_true", help="skip the profiler pass (peak transient)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d, layers, vocab, ctx = (256, 4, 8192, 512) if args.quick else (512, 8, 50257, 1024)
    rounds = args.rounds or (4 if args.quick else 12)
    model = GPT2Like(d, layers, vocab, ctx)
    params = list(model.parameters())
    with torch.no_grad():
        for p in params:
            p.grad = torch.randn_like(p)
    n_params = sum(p.numel() for p in params)
    largest = max(p.numel() * p.element_size() for p in params)

    from lightning_tiger.optim import _fused

    fused_ok = _fused.fused_available()
    skipped: dict[str, str] = {}
    opts = build_optimizers(model, skipped)
    bw_fn, bw_bytes = _bandwidth_fn((4 << 20) if args.quick else (32 << 20))
    fns: dict[str, Callable[[], None]] = {"bandwidth a.add_(b)": bw_fn, **{k: v[0] for k, v in opts.items()}}
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds + 2):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            before = _BEFORE.get(fns[name])
            if before is not None:
                before()
            t0 = time.perf_counter()
            fns[name]()
            dt = time.perf_counter() - t0
            if r >= 2:
                times[name].append(dt)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    bw = bw_bytes / (med["bandwidth a.add_(b)"] * 1e-3)  # bytes/s
    peaks = {} if args.no_memory else {k: _peak_transient(fn) for k, (fn, _) in opts.items()}
    adam_fused = med.get("torch AdamW fused")
    rows = []
    for name, (_, bpp) in opts.items():
        bound_ms = bpp * n_params / bw * 1e3
        rows.append(dict(
            optimizer=name, ms=med[name], ms_rounds=[t * 1e3 for t in times[name]],
            ratio_to_fused_adamw=statistics.median(
                t / a for t, a in zip(times[name], times["torch AdamW fused"])) if adam_fused else None,
            bytes_per_param=bpp, bound_ms=bound_ms, x_bound=med[name] / bound_ms,
            peak_transient_bytes=peaks.get(name), peak_transient_vs_largest_param=(
                peaks[name] / largest if name in peaks else None),
        ))
    by = {r["optimizer"]: r for r in rows}
    # None when a row was skipped (e.g. no fused kernel): its targets are skipped too
    sr_row = next((k for k in by if k.startswith(ROW_BF16_SR)), None)
    rn_row = next((k for k in by if k.startswith(ROW_BF16_RN)), None)
    sr_cost = (statistics.median(a / b for a, b in zip(times[sr_row], times[rn_row]))
               if sr_row is not None and rn_row is not None else None)
    targets = {}
    if adam_fused:
        for ours in ("ours Tiger (k=1)", "ours Lion"):
            targets[f"{ours} <= 0.8x AdamW fused"] = by[ours]["ratio_to_fused_adamw"] <= 0.8
        targets["ours Tiger non-final <= 0.5x AdamW fused"] = by["ours Tiger non-final (k=4)"][
            "ratio_to_fused_adamw"] <= 0.5
        targets[f"{ROW_BF16_MOM} <= 0.65x AdamW fused"] = by[ROW_BF16_MOM]["ratio_to_fused_adamw"] <= 0.65
        if sr_row is not None:
            targets[f"{sr_row} <= 0.45x AdamW fused (fp32)"] = by[sr_row]["ratio_to_fused_adamw"] <= 0.45
    if sr_cost is not None:
        targets["stochastic rounding <= 1.10x round to nearest (bf16 Tiger step)"] = sr_cost <= 1.10
    for ours, peer in (("ours Lion", "pytorch_optimizer Lion"), ("ours Tiger (k=1)", "pytorch_optimizer Tiger")):
        if peer in by:
            targets[f"{ours} >= 2x faster than {peer}"] = by[peer]["ms"] >= 2 * by[ours]["ms"]
    if peaks:
        for ours in ("ours Tiger (k=1)", "ours Tiger non-final (k=4)", "ours Lion"):
            targets[f"{ours} peak transient <= largest parameter"] = peaks[ours] <= largest

    print(f"\n{n_params / 1e6:.1f}M fp32 parameters in {len(params)} tensors (largest {largest / 2**20:.0f} MiB), "
          f"{torch.get_num_threads()} threads, fused kernels: {fused_ok}, rounds: {rounds}")
    print(f"in-place bandwidth a.add_(b): {bw / 1e9:.1f} GB/s ({med['bandwidth a.add_(b)']:.2f} ms)")
    print(f"{'optimizer':42s} {'ms/step':>9s} {'/AdamW fused':>13s} {'B/param':>8s} {'x bound':>8s} "
          f"{'peak transient':>15s}")
    for r in rows:
        ratio = f"{r['ratio_to_fused_adamw']:.2f}" if r["ratio_to_fused_adamw"] else "-"
        pk = r["peak_transient_bytes"]
        pk_s = f"{pk / 2**20:.1f} MiB" if pk is not None else "-"
        print(f"{r['optimizer']:42s} {r['ms']:9.2f} {ratio:>13s} {r['bytes_per_param']:8d} {r['x_bound']:8.2f} "
              f"{pk_s:>15s}")
    if sr_cost is not None:
        print(f"stochastic rounding / round to nearest (bf16 Tiger step, median of per-round ratios): {sr_cost:.3f}")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    for t, ok in targets.items():
        print(f"target {'PASS' if ok else 'MISS'}: {t}")
    out = dict(
        benchmark="optimizer_step", quick=args.quick,
        config=dict(d_model=d, layers=layers, vocab=vocab, ctx=ctx, n_params=n_params, n_tensors=len(params),
                    largest_param_bytes=largest, dtype="float32", rounds=rounds, warmup_rounds=2),
        machine=dict(threads=torch.get_num_threads(), torch=torch.__version__, python=sys.version.split()[0],
                     platform=platform.platform(), processor=platform.processor()),
        fused_kernels=fused_ok, bandwidth_GBps=bw / 1e9, bandwidth_ms=med["bandwidth a.add_(b)"],
        results=rows, stochastic_over_nearest=sr_cost, skipped=skipped, targets=targets,
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS}")
    return out


if __name__ == "__main__":
    main()
