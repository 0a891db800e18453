"""Attention benchmark: our TransformerLM vs x-transformers, RoPE op vs rotary-embedding-torch, windowed memory.

Run ``python benchmarks/attention.py [--quick]``; prints tables and writes ``benchmarks/results/attention.json``.

Sections
1. Decoder LM forward+backward tokens/s and activation memory (bytes saved for backward), ours vs
   x-transformers with the same configuration (dim 256, depth 4, 4 heads, GELU MLP ×4, no absolute positions;
   x-transformers 2.31 was measured at 4336 / 5190 tokens/s at batch 8 × 512 with rotary / ALiBi on a quiet
   2-core machine), at several sequence lengths with batch·seq = 4096 tokens.
2. The RoPE op alone (queries + keys, forward+backward) vs rotary-embedding-torch.
3. Windowed attention (w = 128): activation memory and time vs sequence length, banded (chunked) path vs one
   SDPA call with the full L×S window mask (``chunk_windows = False``) — banded memory is linear in L.
4. Which kernel each option ends up on (aten op recorded by the profiler).

"Activation memory" is the total size of the distinct tensors autograd saves for backward during the forward
(``torch.autograd.graph.saved_tensors_hooks``): on CPU there is no allocator peak counter, and saved
activations are what grows with sequence length. Timings on a shared machine are noisy: compare ratios.
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

from lightning_tiger.nn import Attention, RotaryEmbedding, TransformerLM

RESULTS = Path(__file__).resolve().parent / "results" / "attention.json"


def saved_bytes(fn) -> int:  # type: ignore[no-untyped-def]
    """Bytes of the distinct storages autograd saves for backward while running ``fn()``."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def time_it(fn, iters: int, warmup: int = 1) -> float:  # type: ignore[no-untyped-def]
    """Best-of-``iters`` seconds per call (the minimum is the least noisy on a shared machine)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


# ---------------------------------------------------------------------------------------------- section 1
def build_models(position: str, seq: int) -> dict[str, torch.nn.Module]:
    models: dict[str, torch.nn.Module] = {
        "ours": TransformerLM(256, dim=256, depth=4, num_heads=4, position=position, mlp="gelu")
    }
    try:
        from x_transformers import Decoder, TransformerWrapper

        models["x-transformers"] = TransformerWrapper(
            num_tokens=256, max_seq_len=seq, use_abs_pos_emb=False,
            attn_layers=Decoder(dim=256, depth=4, heads=4, rotary_pos_emb=position == "rope",
                                alibi_pos_bias=position == "alibi"),
        )
    except ImportError:
        print("x-transformers not installed: peer skipped")
    return models


def bench_lm(seqs: list[int], tokens: int, iters: int) -> list[dict[str, Any]]:
    rows = []
    for position in ("rope", "alibi"):
        for seq in seqs:
            batch = max(1, tokens // seq)
            x = torch.randint(0, 256, (batch, seq))
            res: dict[str, Any] = {"position": position, "seq": seq, "batch": batch}
            for name, model in build_models(position, seq).items():
                model.train()

                def step(model=model, x=x) -> None:  # type: ignore[no-untyped-def]
                    model(x).float().mean().backward()

                sec = time_it(step, iters)
                mem = saved_bytes(lambda model=model, x=x: model(x))
                res[name] = {"tokens_per_s": batch * seq / sec, "activation_MiB": mem / 2**20}
            if "x-transformers" in res:
                res["speed_ratio"] = res["ours"]["tokens_per_s"] / res["x-transformers"]["tokens_per_s"]
                res["memory_ratio"] = res["ours"]["activation_MiB"] / res["x-transformers"]["activation_MiB"]
            rows.append(res)
            peer = res.get("x-transformers", {})
            nan = float("nan")
            print(
                f"{position:6s} {batch:3d}x{seq:<5d} ours {res['ours']['tokens_per_s']:8.0f} tok/s "
                f"{res['ours']['activation_MiB']:7.1f} MiB | x-transformers "
                f"{peer.get('tokens_per_s', nan):8.0f} tok/s {peer.get('activation_MiB', nan):7.1f} MiB"
                f" | speed x{res.get('speed_ratio', nan):.2f} mem x{res.get('memory_ratio', nan):.2f}",
                flush=True,
            )
    return rows


# ---------------------------------------------------------------------------------------------- section 2
def bench_rope(seqs: list[int], iters: int) -> list[dict[str, Any]]:
    rows = []
    B, H, D = 8, 4, 64
    try:
        from rotary_embedding_torch import RotaryEmbedding as PeerRoPE
    except ImportError:
        PeerRoPE = None
        print("rotary-embedding-torch not installed: peer skipped")
    for seq in seqs:
        ours = RotaryEmbedding(D)
        q = torch.randn(B, seq, H, D, requires_grad=True)
        k = torch.randn(B, seq, H, D, requires_grad=True)

        def run_ours(ours=ours, q=q, k=k) -> None:  # type: ignore[no-untyped-def]
            qr, kr = ours(q, k)
            (qr.sum() + kr.sum()).backward()

        res: dict[str, Any] = {"seq": seq, "ours_ms": 1e3 * time_it(run_ours, iters)}
        if PeerRoPE is not None:
            peer = PeerRoPE(dim=D)
            qp = torch.randn(B, H, seq, D, requires_grad=True)
            kp = torch.randn(B, H, seq, D, requires_grad=True)

            def run_peer(peer=peer, qp=qp, kp=kp) -> None:  # type: ignore[no-untyped-def]
                (peer.rotate_queries_or_keys(qp).sum() + peer.rotate_queries_or_keys(kp).sum()).backward()

            res["rotary_embedding_torch_ms"] = 1e3 * time_it(run_peer, iters)
            res["speed_ratio"] = res["rotary_embedding_torch_ms"] / res["ours_ms"]
        rows.append(res)
        nan = float("nan")
        print(
            f"rope op  seq {seq:5d}: ours {res['ours_ms']:7.2f} ms | rotary-embedding-torch "
            f"{res.get('rotary_embedding_torch_ms', nan):7.2f} ms | x{res.get('speed_ratio', nan):.2f}",
            flush=True,
        )
    return rows


# ---------------------------------------------------------------------------------------------- section 3
def bench_window(seqs: list[int], iters: int, window: int = 128) -> list[dict[str, Any]]:
    rows = []
    for seq in seqs:
        res: dict[str, Any] = {"seq": seq, "window": window}
        x = torch.randn(1, seq, 256)
        for name, chunk in (("banded", True), ("full_mask", False)):
            attn = Attention(256, 4, window=window, sink_tokens=4)
            attn.chunk_windows = chunk

            def step(attn=attn, x=x) -> None:  # type: ignore[no-untyped-def]
                attn(x).sum().backward()

            res[name] = {
                "activation_MiB": saved_bytes(lambda attn=attn, x=x: attn(x)) / 2**20,
                "ms": 1e3 * time_it(step, iters),
            }
        rows.append(res)
        full = res.get("full_mask", {})
        print(
            f"window {window} seq {seq:5d}: banded {res['banded']['activation_MiB']:7.2f} MiB "
            f"{res['banded']['ms']:8.1f} ms ({res['banded']['activation_MiB'] / seq * 1024:.2f} MiB/1k tok) | "
            f"full mask {full.get('activation_MiB', float('nan')):8.2f} MiB {full.get('ms', float('nan')):8.1f} ms",
            flush=True,
        )
    return rows


# ---------------------------------------------------------------------------------------------- section 4
def kernel_report() -> dict[str, str]:
    """The aten attention op each configuration ends up on (profiler op names)."""
    configs: dict[str, dict[str, Any]] = {
        "rope causal": {"position": "rope"},
        "rope bidirectional": {"position": "rope", "causal": False},
        "alibi causal": {"position": "alibi"},
        "rope window 16 + 2 sinks": {"position": "rope", "window": 16, "sink_tokens": 2},
        "rope window 16 (long: banded)": {"position": "rope", "window": 16, "_len": 256},
        "rope logn trained": {"position": "rope", "logn": "trained", "logn_base": 64},
        "rope GQA 4/2": {"position": "rope", "num_kv_heads": 2},
        "rope dropout 0.1 (training)": {"position": "rope", "dropout": 0.1},
        "kv-cache decode step": {"position": "rope", "_decode": True},
    }
    out = {}
    for name, cfg in configs.items():
        cfg = dict(cfg)
        seq, decode = cfg.pop("_len", 64), cfg.pop("_decode", False)
        attn = Attention(64, 4, **cfg)
        x = torch.randn(2, seq, 64)
        from lightning_tiger.nn import KVCache

        cache = KVCache() if decode else None
        if decode:
            attn(x, cache=cache)
            x = x[:, :1]
        with torch.profiler.profile() as prof:
            attn(x, cache=cache).sum().backward()
        ops = sorted({e.key for e in prof.key_averages() if "scaled_dot_product" in e.key and "backward" not in e.key
                      and e.key != "aten::scaled_dot_product_attention"})
        out[name] = ", ".join(ops) or "none"
        print(f"{name:32s} -> {out[name]}")
    return out


# ---------------------------------------------------------------------------------------------- section 5
def bf16_precision() -> dict[str, float]:
    """Max abs error of RoPE on bf16 inputs at positions 257…262 vs an fp64 reference (Su, "Transformer升级之路：6")."""
    torch.manual_seed(0)
    D = 64
    x = torch.randn(1, 263, 1, D).bfloat16()
    theta = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(263, dtype=torch.float64)[:, None] * theta  # [L, D/2]
    xd = x.double()[0, :, 0]
    x1, x2 = xd[:, 0::2], xd[:, 1::2]
    ref = torch.stack((x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()), -1).flatten(-2)
    out = {"ours": (RotaryEmbedding(D).bfloat16()(x)[0][0, :, 0].double() - ref)[257:].abs().max().item()}
    try:
        from rotary_embedding_torch import RotaryEmbedding as PeerRoPE

        peer = PeerRoPE(dim=D).bfloat16()
        got = peer.rotate_queries_or_keys(x.transpose(1, 2))[0, 0].double()
        out["rotary_embedding_torch"] = (got - ref)[257:].abs().max().item()
    except ImportError:
        pass
    for name, err in out.items():
        print(f"{name:24s} max |error| at positions 257..262 (bf16 input): {err:.4f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (< 1 min)")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.quick:
        lm_seqs, tokens, iters, rope_seqs, win_seqs = [256], 512, 1, [256, 1024], [512, 1024, 2048]
    else:
        lm_seqs, tokens, iters, rope_seqs, win_seqs = [256, 512, 1024, 2048], 4096, 3, [256, 512, 1024, 2048], [
            512, 1024, 2048, 4096, 8192]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    print("\n== 1. decoder LM forward+backward (dim 256, depth 4, 4 heads, GELU) ==")
    lm = bench_lm(lm_seqs, tokens, iters)
    print("\n== 2. RoPE op (q and k, [8, seq, 4, 64], forward+backward) ==")
    rope = bench_rope(rope_seqs, 10)  # a cheap op: more repeats against scheduler noise
    print("\n== 3. windowed attention (dim 256, 4 heads, w=128, 4 sinks), forward+backward ==")
    win = bench_window(win_seqs, iters)
    print("\n== 4. kernels (CPU) ==")
    kernels = kernel_report()
    print("\n== 5. RoPE on bf16 inputs beyond position 256 ==")
    precision = bf16_precision()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "torch": torch.__version__, "threads": torch.get_num_threads(), "quick": args.quick,
        "spec_peer_tokens_per_s_512": {"rope": 4336, "alibi": 5190},
        "lm": lm, "rope_op": rope, "window": win, "kernels": kernels, "bf16_rope_error": precision,
    }, indent=2))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
