"""ReRoPE / Leaky ReRoPE inference cost vs plain RoPE attention at 8L (issue 17; target: ReRoPE ≤ 2.2× RoPE).

Run ``python benchmarks/rerope.py [--quick] [--threads N]``; prints a table and writes
``benchmarks/results/rerope.json``.

Setting: the small length-extrapolation table's model (d = 64, 4 heads of 16, 4 layers, SwiGLU, byte vocabulary)
evaluated at 8L = 8 × 64 = 512 tokens with the table's evaluation batch (16384 tokens per batch = 32 windows),
inference mode. Rows:

* plain RoPE — fused SDPA (``is_causal=True``), the cost ReRoPE is compared with;
* RoPE + window w = L at inference — the notes' "super strong baseline" (banded SDPA blocks);
* ReRoPE w = L/2 (``rerope_w``), ReRoPE w = L/2 + log n (``rerope_w_logn``), Leaky ReRoPE w = L/2, k = 32
  (``leaky_rerope``) — :func:`lightning_tiger.nn.rerope_attention`, query blocks of ``Attention.rerope_block``.

Two scopes: one attention layer (projections included) and the whole LM forward. Also the per-token cost of
KV-cache decoding at 512 cached tokens. Best of ``--iters`` runs (the least noisy statistic on a shared machine);
compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_tiger.nn import Attention, TransformerLM

RESULTS = Path(__file__).resolve().parent / "results" / "rerope.json"
L_TRAIN = 64

VARIANTS: dict[str, dict[str, Any]] = {
    "RoPE (SDPA, causal)": {},
    "RoPE + window w=L": {"window": L_TRAIN},
    "ReRoPE w=L/2": {"rerope_window": L_TRAIN // 2},
    "ReRoPE w=L/2 + log n": {"rerope_window": L_TRAIN // 2, "logn": "posthoc", "logn_base": L_TRAIN},
    "Leaky ReRoPE w=L/2, k=32": {"rerope_window": L_TRAIN // 2, "rerope_leak": 32.0},
}


def time_round_robin(fns: dict[str, Any], iters: int) -> dict[str, float]:
    """Best-of-``iters`` seconds per call of each function, measured in alternation (one call of each per
    round), so a change of load on a shared machine hits every variant alike and the ratios stay fair."""
    for fn in fns.values():
        fn()  # warm-up
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(iters):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def bench_layer(
    batch: int, seq: int, iters: int, block: int | None = None, names: tuple[str, ...] | None = None
) -> dict[str, float]:
    """tokens/s of one attention layer (d = 64, 4 heads) per variant."""
    torch.manual_seed(0)
    x = torch.randn(batch, seq, 64)
    base = Attention(64, 4)
    fns = {}
    for name, opts in VARIANTS.items():
        if names is not None and name not in names:
            continue
        attn = Attention(64, 4).eval()
        attn.load_state_dict(base.state_dict())
        attn.set_options(**opts)
        if block is not None:
            attn.rerope_block = block
        fns[name] = lambda attn=attn: attn(x)
    with torch.inference_mode():
        secs = time_round_robin(fns, iters)
    return {name: batch * seq / t for name, t in secs.items()}


def bench_model(batch: int, seq: int, iters: int) -> dict[str, float]:
    """tokens/s of the whole LM forward (the small table's model) per variant."""
    torch.manual_seed(0)
    tokens = torch.randint(0, 256, (batch, seq))
    base = TransformerLM(256, dim=64, depth=4, num_heads=4)
    fns = {}
    for name, opts in VARIANTS.items():
        model = TransformerLM(256, dim=64, depth=4, num_heads=4).eval()
        model.load_state_dict(base.state_dict())
        model.set_attention_options(**opts)
        fns[name] = lambda model=model: model(tokens)
    with torch.inference_mode():
        secs = time_round_robin(fns, iters)
    return {name: batch * seq / t for name, t in secs.items()}


def bench_decode(batch: int, prompt: int, new: int) -> dict[str, float]:
    """Decoded tokens/s (one token per call, KV cache) after a ``prompt``-token prefix, per variant."""
    torch.manual_seed(0)
    tokens = torch.randint(0, 256, (batch, prompt + new))
    model = TransformerLM(256, dim=64, depth=4, num_heads=4).eval()
    out = {}
    for name, opts in VARIANTS.items():
        model.set_attention_options(window=None, logn="none", rerope_window=None, rerope_leak=None)
        model.set_attention_options(**opts)
        with torch.inference_mode():
            cache = model.new_cache()
            model(tokens[:, :prompt], cache=cache)
            t = time.perf_counter()
            for i in range(prompt, prompt + new):
                model(tokens[:, i : i + 1], cache=cache)
            out[name] = batch * new / (time.perf_counter() - t)
    return out


def _table(title: str, res: dict[str, float]) -> str:
    ref = res["RoPE (SDPA, causal)"]
    lines = [f"\n{title}", "| variant | tokens/s | cost vs RoPE |", "|---|---|---|"]
    for name, tps in res.items():
        lines.append(f"| {name} | {tps:,.0f} | {ref / tps:.2f}× |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: stable on a busy machine)")
    parser.add_argument("--iters", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    iters = args.iters or (2 if args.quick else 7)
    seq, batch = 8 * L_TRAIN, 16384 // (8 * L_TRAIN)
    layer = bench_layer(batch, seq, iters)
    blocks = {}  # ReRoPE's cost relative to RoPE (measured in alternation) per query-block size
    for b in (32, 64, 128, 512):
        res = bench_layer(batch, seq, iters, block=b, names=("RoPE (SDPA, causal)", "ReRoPE w=L/2"))
        blocks[str(b)] = res["RoPE (SDPA, causal)"] / res["ReRoPE w=L/2"]
    model = bench_model(batch, seq, iters)
    decode = bench_decode(4, seq, 16 if args.quick else 64)
    ref = layer["RoPE (SDPA, causal)"]
    print(f"8L = {seq} tokens, batch {batch}, d = 64, 4 heads, torch threads {args.threads}")
    print(_table("One attention layer (forward, inference mode)", layer))
    print(_table("Whole LM forward (4 layers)", model))
    print(_table(f"KV-cache decoding, batch 4, one token per call after {seq} tokens", decode))
    print("\nReRoPE w=L/2 layer cost vs block size (query rows per block):")
    for b, cost in blocks.items():
        print(f"  block {b:>3}: {cost:.2f}× RoPE")
    verdict = layer["ReRoPE w=L/2 + log n"] >= ref / 2.2 and layer["ReRoPE w=L/2"] >= ref / 2.2
    print(f"\ntarget ReRoPE ≤ 2.2× plain RoPE attention at 8L: {'met' if verdict else 'NOT met'}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "setting": {"seq": seq, "batch": batch, "dim": 64, "heads": 4, "depth": 4, "L_train": L_TRAIN,
                    "threads": args.threads, "iters": iters},
        "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(), "torch": torch.__version__},
        "layer_tokens_per_s": layer,
        "layer_cost_vs_rope": {k: ref / v for k, v in layer.items()},
        "model_tokens_per_s": model,
        "model_cost_vs_rope": {k: model["RoPE (SDPA, causal)"] / v for k, v in model.items()},
        "decode_tokens_per_s": decode,
        "decode_cost_vs_rope": {k: decode["RoPE (SDPA, causal)"] / v for k, v in decode.items()},
        "rerope_cost_vs_rope_by_block": blocks,
        "target_met": verdict,
    }, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
