"""Micro-benchmark of the fused Tiger/Lion CPU kernel against torch's fused AdamW on the same shapes (issue #13).

Usage::

    python benchmarks/kernel_micro.py [--shape 3x4096x4096] [--rounds 9] [--threads 1,2] [--ref OLD.cpp]

Times the raw ops ``torch.ops.lightning_tiger.{tiger,lion}_step_`` (no Python wrapper, no optimizer class) and
``torch.optim.AdamW(fused=True)`` on ``N`` fp32 tensors of one shape, interleaved (round-robin, the starting row
rotating each round, two warm-up rounds discarded), and reports the median ms and the median over rounds of the
per-round ratio to fused AdamW. Every row owns its θ and m (Tiger's RMS cache is fed back as Tiger does:
``lr_mode`` 1 with the sum of squares and fingerprint the previous call returned) and reads fixed gradients.

Rows (bytes per parameter moved by a step in parentheses): Tiger fp32 k=1 (20), non-final micro-step (12),
Lion fp32 (20), Tiger fp32 θ + bf16 m with and without momentum stochastic rounding (16), Tiger bf16 θ + m + g
with stochastic rounding and to nearest (10), and ``a.add_(b)`` (12) for the in-place bandwidth, from which
"x bound" = time / (bytes / bandwidth).

``--ref OLD.cpp`` (repeatable): also builds another version of ``fused_optim.cpp`` (e.g.
``git show main:lightning_tiger/optim/csrc/fused_optim.cpp > old.cpp``) under the op namespace
``lightning_tiger_ref<k>`` and times the same rows on it ("ref<k> ..."), in the same rounds, for a before/after
comparison; ``--only TEXT`` keeps the rows whose name contains TEXT (plus the bandwidth and AdamW rows). Nothing
is written to ``benchmarks/results/`` (the reference figures are those of ``benchmarks/optimizer_step.py``);
``--json PATH`` writes the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lightning_tiger.optim import build
from lightning_tiger.optim.stochastic_rounding import step_key


def _load_ref(src: Path, k: int) -> str:
    """Builds ``src`` with its op library renamed to ``lightning_tiger_ref<k>``; returns that namespace."""
    from torch.utils import cpp_extension

    ns = f"lightning_tiger_ref{k}"
    text = src.read_text().replace("TORCH_LIBRARY(lightning_tiger,", f"TORCH_LIBRARY({ns},")
    text = text.replace("TORCH_LIBRARY_IMPL(lightning_tiger,", f"TORCH_LIBRARY_IMPL({ns},")
    folder = Path(tempfile.mkdtemp(prefix="lt_ref_"))
    (folder / "ref.cpp").write_text(text)
    cflags, ldflags = build.flag_sets()[0]
    cpp_extension.load(name=f"lt_ref_kernel{k}", sources=[str(folder / "ref.cpp")], extra_cflags=cflags,
                       extra_ldflags=ldflags, build_directory=str(folder), is_python_module=False, verbose=False)
    return ns


class TigerRow:
    """One Tiger configuration on its own θ/m, calling the raw op of namespace ``ns``."""

    def __init__(self, ns: str, shape: tuple[int, ...], count: int, pdtype: torch.dtype, mdtype: torch.dtype,
                 grads: list[torch.Tensor], *, update: bool = True, sr: bool = False, momentum_sr: bool = True):
        self.op = getattr(torch.ops, ns).tiger_step_
        gen = torch.Generator().manual_seed(1)
        self.params = [(torch.randn(shape, generator=gen) * 0.02).to(pdtype) for _ in range(count)]
        self.moms = [torch.zeros(shape, dtype=mdtype) for _ in range(count)]
        self.grads = grads
        n = count
        self.flags = torch.zeros(n, dtype=torch.uint8)
        self.sumsq = torch.full((n,), float("nan"), dtype=torch.float64)
        self.fps = torch.zeros(n, dtype=torch.int64)
        self.update, self.sr, self.momentum_sr, self.step = update, sr, momentum_sr, 0
        self.b1, self.b2 = (0.965, 0.035) if update else (1.0, 0.035 / 4)

    def __call__(self) -> None:
        n = len(self.params)
        self.step += 1
        keys = [int(step_key(1000 + i, self.step)) for i in range(n)] if self.sr else []
        self.op(self.params, self.grads, self.moms, [1] * n, [1e-3] * n, [0.01] * n, [0.0] * n, [0.0] * n,
                self.b1, self.b2, self.update, 0.5, False, self.flags, self.sumsq, self.fps, True, 8 << 20, keys,
                self.momentum_sr)


class LionRow:
    def __init__(self, ns: str, shape: tuple[int, ...], count: int, grads: list[torch.Tensor]):
        self.op = getattr(torch.ops, ns).lion_step_
        self.params = [torch.randn(shape) * 0.02 for _ in range(count)]
        self.moms = [torch.zeros(shape) for _ in range(count)]
        self.grads = grads

    def __call__(self) -> None:
        self.op(self.params, self.grads, self.moms, 1e-4, 0.9, 0.99, 0.1, [], True)


def rows_for(ns: str, shape: tuple[int, ...], count: int, g32: list[torch.Tensor], g16: list[torch.Tensor],
             tag: str) -> dict[str, tuple[Callable[[], None], int]]:
    bf = torch.bfloat16
    return {
        f"{tag}Tiger fp32 k=1": (TigerRow(ns, shape, count, torch.float32, torch.float32, g32), 20),
        f"{tag}Tiger fp32 non-final": (TigerRow(ns, shape, count, torch.float32, torch.float32, g32,
                                                update=False), 12),
        f"{tag}Lion fp32": (LionRow(ns, shape, count, g32), 20),
        f"{tag}Tiger fp32 θ, bf16 m, SR": (TigerRow(ns, shape, count, torch.float32, bf, g32, sr=True), 16),
        f"{tag}Tiger fp32 θ, bf16 m, RN": (TigerRow(ns, shape, count, torch.float32, bf, g32, sr=True,
                                                    momentum_sr=False), 16),
        f"{tag}Tiger bf16 θ+m+g, SR": (TigerRow(ns, shape, count, bf, bf, g16, sr=True), 10),
        f"{tag}Tiger bf16 θ+m+g, RN": (TigerRow(ns, shape, count, bf, bf, g16), 10),
    }


def run(threads: int, rows: dict[str, tuple[Callable[[], None], int]], rounds: int, numel: int,
        reps: int = 1, cpu_time: bool = False) -> dict:
    torch.set_num_threads(threads)
    clock = time.thread_time if cpu_time else time.perf_counter
    names = list(rows)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds + 2):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            fn = rows[name][0]
            t0 = clock()
            for _ in range(reps):
                fn()
            dt = (clock() - t0) / reps
            if r >= 2:
                times[name].append(dt)
    adam = times["torch AdamW fused"]
    bw_ms = statistics.median(times["bandwidth a.add_(b)"]) * 1e3
    bw = 12 * numel / (bw_ms * 1e-3)
    out = {}
    print(f"\n{threads} thread(s), {numel / 1e6:.1f}M parameters, {rounds} rounds; "
          f"in-place bandwidth {bw / 1e9:.1f} GB/s")
    print(f"{'row':36s} {'ms':>8s} {'/AdamW':>7s} {'B/param':>8s} {'x bound':>8s}")
    for name in names:
        ms = statistics.median(times[name]) * 1e3
        ratio = statistics.median(t / a for t, a in zip(times[name], adam))
        bpp = rows[name][1]
        xb = ms / (bpp * numel / bw * 1e3)
        out[name] = dict(ms=ms, ratio_to_fused_adamw=ratio, bytes_per_param=bpp, x_bound=xb)
        print(f"{name:36s} {ms:8.2f} {ratio:7.3f} {bpp:8d} {xb:8.2f}")
    pairs = [(a, a[:-2] + "RN") for a in names if a.endswith("θ+m+g, SR")]
    for sr, rn in pairs:
        cost = statistics.median(a / b for a, b in zip(times[sr], times[rn]))
        out[f"{sr} / RN"] = cost
        print(f"{sr} / RN: {cost:.3f}")
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="3x4096x4096", help="COUNTxD0xD1...: COUNT tensors of that shape")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--ref", type=Path, action="append", default=[],
                        help="another fused_optim.cpp to time side by side (repeatable: 'ref0 ', 'ref1 ', ...)")
    parser.add_argument("--only", default=None, help="time only the rows whose name contains this text")
    parser.add_argument("--reps", type=int, default=1,
                        help="calls per timed sample (for small, cache-resident shapes: compute throughput)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with the calling thread's CPU time (1 thread only: the kernels run inline), "
                             "which a loaded machine's descheduling does not inflate")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    count, *dims = (int(x) for x in args.shape.split("x"))
    shape = tuple(dims)
    if not build.fused_available():
        raise SystemExit(f"fused kernels unavailable: {build.kernel_status()}")
    rows: dict[str, tuple[Callable[[], None], int]] = {}
    gen = torch.Generator().manual_seed(0)
    g32 = [torch.randn(shape, generator=gen) for _ in range(count)]
    g16 = [g.to(torch.bfloat16) for g in g32]
    numel = count * g32[0].numel()
    a, b = torch.randn(numel), torch.randn(numel)
    rows["bandwidth a.add_(b)"] = (lambda: a.add_(b), 12)
    adam_params = [torch.nn.Parameter(torch.randn(shape) * 0.02) for _ in range(count)]
    for p, g in zip(adam_params, g32):
        p.grad = g
    adam = torch.optim.AdamW(adam_params, lr=1e-3, weight_decay=0.01, fused=True)
    rows["torch AdamW fused"] = (adam.step, 28)
    rows.update(rows_for("lightning_tiger", shape, count, g32, g16, ""))
    for k, src in enumerate(args.ref):
        rows.update(rows_for(_load_ref(src, k), shape, count, g32, g16, f"ref{k} "))
    if args.only:
        keep = ("bandwidth a.add_(b)", "torch AdamW fused")
        rows = {name: row for name, row in rows.items() if name in keep or args.only in name}
    if args.cpu_time and args.threads != "1":
        parser.error("--cpu-time needs --threads 1")
    threads = [int(x) for x in args.threads.split(",")]
    results = {t: run(t, rows, args.rounds, numel, args.reps, args.cpu_time) for t in threads}
    if args.json is not None:
        args.json.write_text(json.dumps(dict(shape=args.shape, rounds=args.rounds, results=results), indent=2))
    return results


if __name__ == "__main__":
    main()
