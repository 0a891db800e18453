"""Load test: a long CausalLMModule run (TransformerLM + Tiger + NonFiniteGuard, bf16-mixed) watching memory and
throughput over time.

Every ``--every`` optimizer steps it records the process RSS (``/proc/self/statm``; ``resource`` peak as a
fallback) and the throughput of the last window (tokens/s). Memory growth is reported as the least-squares slope
of RSS against steps over the second half of the run (after allocator warm-up), in MB per 1000 steps, next to
the same run without the guard (the peer here: the guard must not leak) when ``--compare`` is given. NaN
gradients are injected every ``--fault-every`` steps so that the guard's veto path runs too.

    python benchmarks/load_lm.py --compare  # 3000 steps, guarded run and unguarded peer
    python benchmarks/load_lm.py --quick    # 100 steps, < 1 min

Prints a table and writes ``benchmarks/results/load_lm.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_tiger.callbacks import NonFiniteGuard  # noqa: E402
from lightning_tiger.modules import CausalLMModule  # noqa: E402
from lightning_tiger.optim import Tiger  # noqa: E402


def rss_mb() -> float:
    """Resident set size of this process in MB."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):  # pragma: no cover - non-Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RandomTokens(Dataset):
    """An endless-looking stream of random token windows (deterministic per index)."""

    def __init__(self, n: int, seq_len: int, vocab: int) -> None:
        self.n, self.seq_len, self.vocab = n, seq_len, vocab

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(i)
        return torch.randint(0, self.vocab, (self.seq_len + 1,), generator=g)


class FaultyLM(CausalLMModule):
    def __init__(self, fault_every: int = 0, **kw: Any) -> None:
        super().__init__(**kw)
        self.fault_every = fault_every
        self._hook: Any = None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        step = self.trainer.global_step
        if self.fault_every and step > 0 and step % self.fault_every == 0:
            p = next(self.parameters())
            self._hook = p.register_hook(lambda g: torch.full_like(g, float("nan")))
        return super().training_step(batch, batch_idx)


class Probe(L.Callback):
    """RSS and tokens/s every ``every`` optimizer steps."""

    def __init__(self, every: int, tokens_per_step: int) -> None:
        self.every, self.tokens_per_step = every, tokens_per_step
        self.rows: list[dict[str, float]] = []
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        step = trainer.global_step
        if step % self.every == 0:
            now = time.perf_counter()
            self.rows.append({"step": step, "rss_mb": rss_mb(),
                              "tokens_per_s": self.every * self.tokens_per_step / (now - self._t0)})
            self._t0 = now


def slope_mb_per_1000(rows: list[dict[str, float]]) -> float:
    """Least-squares slope of RSS over the second half of the run, MB per 1000 steps."""
    half = rows[len(rows) // 2 :]
    if len(half) < 2:
        return 0.0
    xs = torch.tensor([r["step"] for r in half], dtype=torch.float64)
    ys = torch.tensor([r["rss_mb"] for r in half], dtype=torch.float64)
    xc = xs - xs.mean()
    return float((xc * (ys - ys.mean())).sum() / (xc * xc).sum()) * 1000


def run(steps: int, every: int, guard: bool, fault_every: int, precision: str = "bf16-mixed",
        dim: int = 32, depth: int = 2, seq_len: int = 32, batch: int = 8, root: str | None = None) -> dict[str, Any]:
    """One load run; returns the probe rows and summary numbers."""
    torch.manual_seed(0)
    vocab = 96
    module = FaultyLM(fault_every=fault_every if guard else 0,
                      model={"vocab_size": vocab, "dim": dim, "depth": depth, "num_heads": 4}, warmup_steps=50,
                      optimizer=partial(Tiger, lr=2e-3))  # the default schedule decays over the Trainer's max_steps
    data = DataLoader(RandomTokens(steps * batch, seq_len, vocab), batch_size=batch, shuffle=False)
    probe = Probe(every, batch * seq_len)
    callbacks: list[L.Callback] = [probe]
    g = NonFiniteGuard(max_consecutive=None, verbose=False, log_every_skip=False) if guard else None
    if g is not None:
        callbacks.insert(0, g)
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=steps, callbacks=callbacks,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=root or str(ROOT / "benchmarks" / "results"),
                        num_sanity_val_steps=0, limit_val_batches=0)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train_dataloaders=data)
    wall = time.perf_counter() - start
    rows = probe.rows
    tput = [r["tokens_per_s"] for r in rows[1:]] or [0.0]
    return {
        "guard": guard, "steps": steps, "precision": precision, "wall_s": wall, "rows": rows,
        "rss_first_mb": rows[0]["rss_mb"] if rows else 0.0, "rss_last_mb": rows[-1]["rss_mb"] if rows else 0.0,
        "rss_slope_mb_per_1000_steps": slope_mb_per_1000(rows),
        "tokens_per_s_first_window": tput[0], "tokens_per_s_last_window": tput[-1],
        "tokens_per_s_median": float(torch.tensor(tput).median()),
        "skipped": None if g is None else g.skipped,
        "params_finite": all(bool(torch.isfinite(p).all()) for p in module.parameters()),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 steps (smoke check, < 1 min)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--every", type=int, default=None, help="probe every N steps")
    parser.add_argument("--fault-every", type=int, default=97, help="inject a NaN gradient every N steps (0: off)")
    parser.add_argument("--compare", action="store_true", help="also run without the guard (and without faults)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "load_lm.json")
    args = parser.parse_args(argv)
    steps = args.steps or (100 if args.quick else 3000)
    every = args.every or max(steps // 30, 10)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    results = [run(steps, every, guard=True, fault_every=args.fault_every)]
    if args.compare:
        results.append(run(steps, every, guard=False, fault_every=0))
    header = f"{'run':<18}{'steps':>7}{'RSS first':>11}{'RSS last':>10}{'MB/1000 st':>12}{'tok/s first':>13}" \
             f"{'tok/s last':>12}{'tok/s median':>14}{'skipped':>9}"
    print(header)
    print("-" * len(header))
    for r in results:
        name = "guard+faults" if r["guard"] else "no guard (peer)"
        print(f"{name:<18}{r['steps']:>7}{r['rss_first_mb']:>11.1f}{r['rss_last_mb']:>10.1f}"
              f"{r['rss_slope_mb_per_1000_steps']:>12.2f}{r['tokens_per_s_first_window']:>13.0f}"
              f"{r['tokens_per_s_last_window']:>12.0f}{r['tokens_per_s_median']:>14.0f}"
              f"{r['skipped'] if r['skipped'] is not None else '-':>9}")
    if len(results) == 2 and results[1]["tokens_per_s_median"]:
        ratio = results[0]["tokens_per_s_median"] / results[1]["tokens_per_s_median"]
        out_ratio = {"guard_over_no_guard_median_tokens_per_s": ratio}
        print(f"throughput ratio guard/no-guard (median over windows): {ratio:.3f}")
    else:
        out_ratio = {}
    print("\nRSS / throughput over time (guarded run):")
    for row in results[0]["rows"]:
        print(f"  step {int(row['step']):>6}  RSS {row['rss_mb']:8.1f} MB  {row['tokens_per_s']:9.0f} tok/s")
    out = {"benchmark": "load_lm", "quick": args.quick, "torch": torch.__version__, "results": results, **out_ratio}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
