"""Data parallelism on 2 gloo ranks of this machine: time and bytes per optimizer step, memory per rank.

Usage: ``python benchmarks/distributed.py [--quick]``

A measuring script, not a launcher: it spawns its own 2 CPU ranks (``torch.multiprocessing``, gloo, one thread
each). Model: a residual MLP, ``depth`` blocks ``x + Linear(width, width)(relu(x))`` plus a ``Linear`` head
(width 1024, depth 8: 9.4M fp32 parameters; ``--quick``: width 512, depth 4, 1.3M), 8 rows per rank and
micro-batch, MSE to a fixed random target; the same data on every row.

Rows (one optimizer step = k micro-batches, loss / k each):

- ``DDP``: ``DistributedDataParallel`` × {AdamW (torch, ``fused=True`` where the CPU build has it, else
  ``foreach``), Tiger, Lion}, k = 1;
- ``FSDP2``: ``fully_shard`` on every block and the root × the same three, k = 1 (an optimizer that fails under
  FSDP2 on this checkout has its error in the row);
- ``DDP k=4, sync every micro-batch``: plain ``DistributedDataParallel`` with Tiger, gradients all-reduced on
  each of the 4 backward passes (the naive PyTorch loop);
- ``DDP k=4, no_sync``: the same with ``no_sync()`` on the first 3 (what Lightning's ``DDPStrategy`` does with
  ``accumulate_grad_batches=4``): one gradient all-reduce per step;
- ``tight-fisted DDP k=4``: ``Tiger(fold_in_backward=True)`` + ``Tiger.sync_momenta()`` on the unwrapped module
  (what ``lightning_tiger.plugins.TightFistedDDPStrategy`` runs): gradients folded and freed during backward,
  one int64 flags table and one float32 copy of the momenta all-reduced per step.

Time: per-step wall time on rank 0 (both ranks start each step after a barrier), the median over ``rounds``
interleaved rounds (every row runs ``steps`` steps per round, rows in a rotated order each round, so a slow
period of this shared machine hits every row alike), after one warm-up step per row and round.

Bytes: every collective of the step is counted where it is issued. ``torch.distributed``'s functions are wrapped
in each rank (``all_reduce``, ``all_gather_single``, ``reduce_scatter_single``, ``broadcast``, ...: FSDP2 and
``Tiger.sync_momenta`` call them), and DDP gets ``default_hooks.allreduce_hook`` as its communication hook
(the Python form of its built-in averaging, which goes through the wrapped ``all_reduce``). Reported per step:
the number of collective calls and the bytes each rank sends under a ring algorithm: ``2(R−1)/R·N`` for an
all-reduce of N bytes, ``(R−1)/R·N`` for an all-gather producing N bytes or a reduce-scatter consuming N bytes
(R = 2 here: N, N/2, N/2).

Memory per rank (tight-fisted vs standard DDP with k = 4 and Tiger): each configuration in fresh processes; the
RSS high-water mark (``getrusage(RUSAGE_SELF).ru_maxrss``) minus the RSS after imports, process-group setup and
a warm-up step on a throw-away layer, after 2 optimizer steps, with ``MALLOC_MMAP_THRESHOLD_=65536`` (glibc
then returns every freed tensor to the OS, so RSS follows the live tensors; as ``benchmarks/optimizer_memory.py``).
Also the training state the configuration holds by construction: θ + optimizer state + the gradients alive at
the end of a backward + ``DistributedDataParallel``'s gradient buckets (``bucket_sizes`` of its logging data) +
the momentum reduction's transient float32 bucket (at most ``bucket_cap_mb``).

Writes ``benchmarks/results/distributed.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from residual_mlp import Residual, rss_bytes
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.fsdp import fully_shard

from lightning_tiger.optim import Lion, Tiger, _fused
from lightning_tiger.plugins.tight_fisted import broadcast_module_states

RESULTS = Path(__file__).parent / "results" / "distributed.json"
WORLD, BATCH, K = 2, 8, 4
ROWS = ("DDP AdamW", "DDP Tiger", "DDP Lion", "FSDP2 AdamW", "FSDP2 Tiger", "FSDP2 Lion",
        "DDP k=4 sync every micro-batch", "DDP k=4 no_sync", "tight-fisted DDP k=4")
MEMORY_ROWS = ("DDP k=4 no_sync", "tight-fisted DDP k=4")
_TENSOR_KWARGS = ("tensor", "tensors", "output_tensor", "output", "input_tensor", "input")  # in positional order
_COLLECTIVES = ("all_reduce", "all_reduce_coalesced", "broadcast", "all_gather", "all_gather_single",
                "all_gather_into_tensor", "reduce_scatter_single", "reduce_scatter_tensor")


def _model(width: int, depth: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*(Residual(width) for _ in range(depth)), nn.Linear(width, width))


class Counter:
    """Wraps this process's ``torch.distributed`` collectives: calls and ring bytes sent per rank."""

    def __init__(self) -> None:
        self.calls = 0
        self.bytes = 0.0
        self.active = False
        for name in _COLLECTIVES:
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kw: Any) -> Any:
            if self.active:
                self.calls += 1
                self.bytes += self._ring_bytes(name, args + tuple(kw[k] for k in _TENSOR_KWARGS if k in kw))
            return fn(*args, **kw)
        return wrapped

    @staticmethod
    def _ring_bytes(name: str, args: tuple) -> float:
        def nbytes(t: Any) -> int:
            return sum(nbytes(x) for x in t) if isinstance(t, (list, tuple)) else t.numel() * t.element_size()

        r = dist.get_world_size()
        if name in ("all_reduce", "all_reduce_coalesced"):
            return 2 * (r - 1) / r * nbytes(args[0])
        if name in ("all_gather_single", "all_gather_into_tensor", "all_gather"):
            return (r - 1) / r * nbytes(args[0])  # the output
        if name in ("reduce_scatter_single", "reduce_scatter_tensor"):
            return (r - 1) / r * nbytes(args[1])  # the input
        return nbytes(args[0])  # broadcast: the root sends the tensor

    def reset(self) -> tuple[int, float]:
        out = (self.calls, self.bytes)
        self.calls, self.bytes = 0, 0.0
        return out


def _adamw(params: Any) -> torch.optim.Optimizer:
    try:
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=1e-4, foreach=True)


def _optimizer(name: str, module: torch.nn.Module, fold: bool = False) -> torch.optim.Optimizer:
    if name == "AdamW":
        return _adamw(module.parameters())
    if name == "Lion":
        return Lion(module.parameters(), lr=1e-4, weight_decay=0.1)
    # kinds from the module's layer types (Linear weights: matrices; biases and norms: half rate, no decay)
    return Tiger.from_module(module, lr=1e-3, fold_in_backward=fold, seed=0)


class Row:
    """One configuration on this rank: its model, optimizer and one optimizer step."""

    def __init__(self, name: str, width: int, depth: int) -> None:
        self.name, self.k = name, (K if "k=4" in name else 1)
        self.module = _model(width, depth)
        self.ddp: nn.parallel.DistributedDataParallel | None = None
        self.no_sync = "no_sync" in name
        if name.startswith("FSDP2"):
            for block in self.module:
                fully_shard(block)
            fully_shard(self.module)
            self.model: nn.Module = self.module
        elif name.startswith("tight-fisted"):
            broadcast_module_states(self.module)
            self.model = self.module
        else:
            self.ddp = nn.parallel.DistributedDataParallel(self.module)
            self.ddp.register_comm_hook(None, default_hooks.allreduce_hook)
            self.model = self.ddp
        opt_name = next((o for o in ("AdamW", "Lion") if o in name), "Tiger")
        self.opt = _optimizer(opt_name, self.module, fold=name.startswith("tight-fisted"))
        if name.startswith("tight-fisted"):
            self.opt.sync_momenta()
        gen = torch.Generator().manual_seed(1 + dist.get_rank())
        self.xs = torch.randn(self.k, BATCH, width, generator=gen)
        self.ys = torch.randn(self.k, BATCH, width, generator=gen)

    def step(self) -> None:
        for j in range(self.k):
            ctx = self.ddp.no_sync() if self.no_sync and self.ddp is not None and j < self.k - 1 \
                else contextlib.nullcontext()
            with ctx:
                (nn.functional.mse_loss(self.model(self.xs[j]), self.ys[j]) / self.k).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _init(rank: int, port: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)


def timing_worker(rank: int, port: int, args: dict[str, Any], out: str) -> None:
    """Every row, interleaved rounds; rank 0 writes {row: {times, calls, bytes} or {error}} to ``out``."""
    _init(rank, port)
    counter = Counter()
    results: dict[str, dict[str, Any]] = {name: {"times": []} for name in ROWS}
    for rnd in range(args["rounds"]):
        order = ROWS[rnd % len(ROWS):] + ROWS[:rnd % len(ROWS)]
        for name in order:
            res = results[name]
            if "error" in res:
                continue
            try:
                row = Row(name, args["width"], args["depth"])
                row.step()  # warm-up (allocations, kernel build, first bucket rebuild)
                for _ in range(args["steps"]):
                    dist.barrier()
                    counter.active = True
                    t0 = time.perf_counter()
                    row.step()
                    res["times"].append(time.perf_counter() - t0)
                    counter.active = False
                    res["calls"], res["bytes"] = counter.reset()
                del row
            except Exception as e:  # an optimizer that does not run under this parallelism: say so in the row
                counter.active = False
                counter.reset()
                res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                dist.barrier()
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def memory_worker(rank: int, port: int, args: dict[str, Any], out: str) -> None:
    """One memory row in fresh processes: peak RSS over the warmed-up baseline, and the accounted state bytes."""
    _init(rank, port)
    warm = nn.Linear(args["width"], args["width"])
    warm_opt = torch.optim.AdamW(warm.parameters())
    warm(torch.randn(BATCH, args["width"])).square().mean().backward()
    warm_opt.step()
    _fused.fused_available()
    del warm, warm_opt
    dist.barrier()
    baseline = rss_bytes()
    row = Row(args["row"], args["width"], args["depth"])
    live_grads = 0

    def note_grads(*_: Any) -> None:
        nonlocal live_grads
        live_grads = max(live_grads, sum(p.grad.numel() * p.grad.element_size() for p in row.module.parameters()
                                         if p.grad is not None))

    for _ in range(2):
        row.step()
        note_grads()
    # gradients alive at the end of a window's last backward: run one more window, stopping before step()
    for j in range(row.k):
        with (row.ddp.no_sync() if row.no_sync and row.ddp is not None and j < row.k - 1
              else contextlib.nullcontext()):
            (nn.functional.mse_loss(row.model(row.xs[j]), row.ys[j]) / row.k).backward()
    note_grads()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params = sum(p.numel() * p.element_size() for p in row.module.parameters())
    state = sum(t.numel() * t.element_size() for s in row.opt.state.values() for t in s.values()
                if isinstance(t, torch.Tensor) and t.dim() > 0)
    buckets = 0
    if row.ddp is not None:
        buckets = sum(int(b) for b in str(row.ddp._get_ddp_logging_data().get("bucket_sizes", "0")).split(",") if b)
    transient = 0
    if args["row"].startswith("tight-fisted"):
        cap = 25 * 2**20
        transient = min(cap, sum(p.numel() * 4 for p in row.module.parameters()))
    result = dict(rank=rank, n_params=sum(p.numel() for p in row.module.parameters()), baseline_rss=baseline,
                  peak_over_baseline=peak - baseline, params=params, optimizer_state=state, live_grads=live_grads,
                  ddp_buckets=buckets, reduction_bucket=transient,
                  accounted=params + state + live_grads + buckets + transient)
    Path(f"{out}.rank{rank}").write_text(json.dumps(result))
    dist.destroy_process_group()


def local_compute_ms(width: int, depth: int, rounds: int, steps: int) -> dict[str, float]:
    """Single process, no communication: median step time of standard vs tight-fisted Tiger, k = 4, interleaved.

    Attributes the tight-fisted row's time to arithmetic (the fold of every micro-batch during backward) vs
    communication."""
    torch.set_num_threads(1)
    times: dict[str, list[float]] = {"standard": [], "tight-fisted": []}
    for _ in range(rounds):
        for name in times:
            model = _model(width, depth)
            opt = Tiger.from_module(model, lr=1e-3, fold_in_backward=name == "tight-fisted", seed=0)
            gen = torch.Generator().manual_seed(1)
            xs, ys = torch.randn(K, BATCH, width, generator=gen), torch.randn(K, BATCH, width, generator=gen)
            for i in range(steps + 1):
                t0 = time.perf_counter()
                for j in range(K):
                    (nn.functional.mse_loss(model(xs[j]), ys[j]) / K).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if i:  # the first is a warm-up
                    times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 1.3M-parameter MLP, 2 rounds (smoke check)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 5; quick 2)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row and round")
    args = parser.parse_args(argv)
    width, depth = (512, 4) if args.quick else (1024, 8)
    rounds = args.rounds or (2 if args.quick else 5)
    common = dict(width=width, depth=depth, rounds=rounds, steps=args.steps)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the spawned ranks (see the docstring)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "timing.json")
        mp.spawn(timing_worker, args=(_free_port(), common, out), nprocs=WORLD, join=True)
        timing = json.loads(Path(out).read_text())
        memory = {}
        for name in MEMORY_ROWS:
            out = os.path.join(tmp, name.replace(" ", "_"))
            mp.spawn(memory_worker, args=(_free_port(), dict(common, row=name), out), nprocs=WORLD, join=True)
            memory[name] = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(WORLD)]
    local = local_compute_ms(width, depth, rounds, args.steps)
    n_params = memory[MEMORY_ROWS[0]][0]["n_params"]
    rows = []
    for name in ROWS:
        t = timing[name]
        row: dict[str, Any] = {"row": name, "k": K if "k=4" in name else 1}
        if "error" in t:
            row["error"] = t["error"]
        else:
            row.update(step_ms=1e3 * statistics.median(t["times"]), calls_per_step=t["calls"],
                       mb_sent_per_step=t["bytes"] / 2**20, n_timed_steps=len(t["times"]))
        rows.append(row)
    by = {r["row"]: r for r in rows}
    ref_t, ref_b = by["DDP Tiger"].get("step_ms"), by["DDP Tiger"].get("mb_sent_per_step")
    naive = by["DDP k=4 sync every micro-batch"]
    for r in rows:
        if "error" in r:
            continue
        if r["k"] == 1 and ref_t:
            r["time_vs_DDP_Tiger"], r["bytes_vs_DDP_Tiger"] = r["step_ms"] / ref_t, r["mb_sent_per_step"] / ref_b
        if r["k"] == K and "error" not in naive:
            r["time_vs_sync_every"] = r["step_ms"] / naive["step_ms"]
            r["bytes_vs_sync_every"] = r["mb_sent_per_step"] / naive["mb_sent_per_step"]
    mem_rows = []
    for name, ranks in memory.items():
        mem_rows.append(dict(row=name, peak_over_baseline_mib=[m["peak_over_baseline"] / 2**20 for m in ranks],
                             accounted_mib=ranks[0]["accounted"] / 2**20,
                             parts_mib={k: ranks[0][k] / 2**20 for k in ("params", "optimizer_state", "live_grads",
                                                                         "ddp_buckets", "reduction_bucket")}))
    tight_mem, std_mem = mem_rows[1], mem_rows[0]
    mem_ratio = max(tight_mem["peak_over_baseline_mib"]) / max(std_mem["peak_over_baseline_mib"])

    print(f"\nResidual MLP, {n_params / 1e6:.1f}M fp32 parameters, {WORLD} gloo ranks x 1 thread, {BATCH} rows per "
          f"rank and micro-batch; median of {rounds} interleaved rounds x {args.steps} steps")
    print(f"{'row':32s} {'ms/step':>8s} {'calls':>6s} {'MB sent/rank':>13s} {'t/DDP Tiger':>12s} "
          f"{'B/DDP Tiger':>12s} {'t/sync-every':>13s} {'B/sync-every':>13s}")
    for r in rows:
        if "error" in r:
            print(f"{r['row']:32s} error: {r['error']}")
            continue

        ratios = [f"{r[key]:.2f}" if key in r else "-" for key in
                  ("time_vs_DDP_Tiger", "bytes_vs_DDP_Tiger", "time_vs_sync_every", "bytes_vs_sync_every")]
        print(f"{r['row']:32s} {r['step_ms']:8.1f} {r['calls_per_step']:6d} {r['mb_sent_per_step']:13.2f} "
              f"{ratios[0]:>12s} {ratios[1]:>12s} {ratios[2]:>13s} {ratios[3]:>13s}")
    print(f"single process, no communication, Tiger k={K}: standard {local['standard']:.1f} ms/step, tight-fisted "
          f"{local['tight-fisted']:.1f} ms/step (the fold arithmetic during backward)")
    print(f"\nMemory per rank, k={K}, Tiger, 2 optimizer steps (peak RSS over the warmed-up baseline; accounted: "
          "θ + optimizer state + live gradients + DDP buckets + reduction bucket)")
    print(f"{'row':32s} {'peak MiB r0/r1':>16s} {'accounted MiB':>14s}  parts (MiB)")
    for m in mem_rows:
        peaks = "/".join(f"{p:.0f}" for p in m["peak_over_baseline_mib"])
        parts = ", ".join(f"{k} {v:.0f}" for k, v in m["parts_mib"].items())
        print(f"{m['row']:32s} {peaks:>16s} {m['accounted_mib']:14.0f}  {parts}")
    print(f"tight-fisted / standard DDP peak memory per rank: {mem_ratio:.2f}")
    result = dict(benchmark="distributed", quick=args.quick, world_size=WORLD, k=K, n_params=n_params,
                  width=width, depth=depth, batch_per_rank=BATCH, rounds=rounds, steps_per_round=args.steps,
                  rows=rows, single_process_compute_ms=local, memory=mem_rows,
                  tight_over_standard_peak_memory=mem_ratio, torch=torch.__version__,
                  bytes="ring model: all_reduce 2(R-1)/R*N, all_gather/reduce_scatter (R-1)/R*N, per rank",
                  memory_measure="ru_maxrss minus warmed-up RSS, MALLOC_MMAP_THRESHOLD_=65536")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
