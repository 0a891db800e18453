"""Length extrapolation, one command: train every row of Su's table and tabulate accuracy at L … 16L.

Su's table: one setup across "Transformer升级之路" posts kexue.fm/archives/9603, 9675, 9706, 9708 and 9731.

Each row is a config under ``examples/configs/lm/`` (the single source of truth; the same files work with
``lightning-tiger fit --config examples/configs/lm/<row>.yaml ...``). For every row and seed the script

1. trains the row's model (Tiger, ``--steps`` optimizer steps, a checkpoint every ``--ckpt-every`` steps).
   Rows whose *training* configuration is identical — they differ only in ``eval_options``, the options
   switched on at evaluation time (window at inference, NTK/PI scaling) — share one training run: the RoPE
   baseline's weights serve "RoPE + window", "NTK-RoPE", "PI-RoPE", "ReRoPE" and "Leaky ReRoPE", the log-n
   model's serve "RoPE + log n + window" and "ReRoPE + log n";
2. evaluates next-character accuracy on held-out stdlib files at lengths L, 2L, 4L, 8L, 16L, non-repeated
   and repeated (one held-out segment of 2L tiled to the test length);
3. writes ``<row>__s<seed>.json`` to ``--work-dir`` and refreshes the Markdown table, the JSON summary and
   the plot in ``--out`` after every row, so partial results are always on disk.

Resumable: a (row, seed) whose result JSON exists is skipped; a training run restarts from its last
checkpoint (weights, Tiger momentum, schedule and the data order, which the data module restores exactly).

Examples::

    python examples/length_extrapolation.py --quick                   # smoke run, about a minute
    python examples/length_extrapolation.py                           # every row, seed 0, 1500 steps
    python examples/length_extrapolation.py --rows rope,alibi --seeds 0 1 --steps 800
    python examples/length_extrapolation.py --seeds 0 1 --multi-seed-rows rope,rope_window,alibi \\
        --set model.init_args.model.dim=96          # any dotted override of the row configs
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_CONFIG_DIR = HERE / "configs" / "lm"
DEFAULT_OUT = REPO / "docs" / "results" / "length_extrapolation"
DEFAULT_WORK = REPO / "runs" / "length_extrapolation"
# Table order: the rows of Su's table first, then the other position schemes.
ROW_ORDER = [
    "rope", "rope_logn", "rope_pi", "rope_ntk", "rope_window", "rope_window_logn", "rerope_w", "rerope_w_logn",
    "leaky_rerope", "hwfa", "alibi", "kerple_log", "sandwich", "xpos", "rope_random_pos", "nope",
]
# Keys that only matter at evaluation: rows differing only there share a training run.
EVAL_ONLY_MODEL_KEYS = ("eval_options", "metric_last_n", "train_len")
EVAL_ONLY_DATA_KEYS = ("eval_lengths", "num_eval_windows", "repeated", "eval_tokens_per_batch")
QUICK_OVERRIDES = [
    "model.init_args.model.dim=32",
    "model.init_args.model.depth=2",
    "model.init_args.model.num_heads=2",
    "model.init_args.warmup_steps=5",
    "data.init_args.max_chars=200000",
    "data.init_args.num_eval_windows=4",
    "data.init_args.batch_size=8",
]


# ---------------------------------------------------------------------------------------------- configs
def load_row_config(path: Path, overrides: list[str]) -> tuple[dict[str, Any], str]:
    """The row's YAML merged with dotted ``key=value`` overrides, as a plain dict, and the row's label."""
    from omegaconf import OmegaConf

    from lightning_tiger.cli import register_resolvers

    register_resolvers()  # the row files use ${int:${mul:...}} (w = L/2)
    text = path.read_text()
    label_match = re.search(r"^# label: (.+)$", text, re.M)
    label = label_match.group(1).strip() if label_match else path.stem
    cfg = OmegaConf.load(path)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    return OmegaConf.to_container(cfg, resolve=True), label  # type: ignore[return-value]


def training_key(cfg: dict[str, Any], steps: int) -> str:
    """Hash of everything that shapes the trained weights (the config minus evaluation-only keys)."""
    train = copy.deepcopy(cfg)
    for key in EVAL_ONLY_MODEL_KEYS:
        train.get("model", {}).get("init_args", {}).pop(key, None)
    for key in EVAL_ONLY_DATA_KEYS:
        train.get("data", {}).get("init_args", {}).pop(key, None)
    train.pop("trainer", None)
    train["steps"] = steps
    blob = json.dumps(train, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def instantiate(cfg: dict[str, Any]) -> tuple[Any, Any]:
    """Build (module, datamodule) from a row config with LightningCLI's own parser (what ``lightning-tiger``
    does), so a config that works here works on the command line."""
    import yaml
    from lightning.pytorch.cli import LightningCLI

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        path = Path(tmp) / "row.yaml"
        path.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if k in ("model", "data")}))
        cli = LightningCLI(
            args=["--config", str(path)],
            run=False,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=None,
            seed_everything_default=cfg.get("seed_everything", 0),
            trainer_defaults={"logger": False, "enable_checkpointing": False, "enable_progress_bar": False},
            parser_kwargs={"exit_on_error": False},
        )
    return cli.model, cli.datamodule


# ---------------------------------------------------------------------------------------------- training
def _trainer(**kwargs: Any) -> Any:
    import lightning as L

    defaults: dict[str, Any] = dict(accelerator="cpu", devices=1, logger=False, enable_model_summary=False)
    defaults.update(kwargs)
    return L.Trainer(**defaults)


class _PrintProgress:
    """Plain progress lines for logs (used with ``--no-progress``)."""

    @staticmethod
    def make(every: int) -> Any:
        from lightning.pytorch.callbacks import Callback

        class PrintProgress(Callback):
            def __init__(self) -> None:
                self.start = time.time()

            def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
                step = trainer.global_step
                if step % every == 0 or step == trainer.max_steps:
                    loss = trainer.callback_metrics.get("train/loss")
                    rate = step / max(time.time() - self.start, 1e-9)
                    print(f"    step {step}/{trainer.max_steps} loss {float(loss):.3f} ({rate:.2f} steps/s)",
                          flush=True)

        return PrintProgress()


def train_row(cfg: dict[str, Any], train_dir: Path, steps: int, ckpt_every: int, progress: bool) -> Path:
    """Train (or resume) one configuration; returns the final checkpoint."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

    final = train_dir / "final.ckpt"
    if final.exists():
        return final
    train_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(int(cfg.get("seed_everything", 0)), verbose=False)
    module, datamodule = instantiate(cfg)
    callbacks: list[Any] = [
        ModelCheckpoint(dirpath=train_dir, filename="step{step}", every_n_train_steps=ckpt_every,
                        save_last=True, save_top_k=1, auto_insert_metric_name=False)
    ]
    callbacks.append(TQDMProgressBar(refresh_rate=10) if progress else _PrintProgress.make(100))
    trainer = _trainer(max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks,
                       enable_progress_bar=progress, default_root_dir=train_dir, log_every_n_steps=10)
    last = train_dir / "last.ckpt"
    resumed_from = int(torch.load(last, map_location="cpu", weights_only=False)["global_step"]) if last.exists() else 0
    start = time.time()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if last.exists() else None)
    elapsed = time.time() - start
    trainer.save_checkpoint(final, weights_only=True)
    info = {"train_seconds_last_session": elapsed, "steps": trainer.global_step, "resumed_from_step": resumed_from,
            "params": sum(p.numel() for p in module.parameters())}
    (train_dir / "train_info.json").write_text(json.dumps(info, indent=2))
    for extra in train_dir.glob("*.ckpt"):  # keep only the final weights
        if extra != final:
            extra.unlink()
    return final


def evaluate_row(cfg: dict[str, Any], checkpoint: Path) -> dict[str, float]:
    """Validation metrics of the row's module (its eval options included) with the trained weights."""
    import torch

    module, datamodule = instantiate(cfg)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    module.load_state_dict(state)
    trainer = _trainer(enable_progress_bar=False, enable_checkpointing=False)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


# ---------------------------------------------------------------------------------------------- report
def _fmt(values: list[float]) -> str:
    if not values:
        return "—"
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.2f}%"
    return f"{mean:.2f} ± {100 * statistics.stdev(values):.2f}%"


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per row: mean, sample std and per-seed values of every accuracy / bpc metric."""
    rows: dict[str, Any] = {}
    for res in results:
        entry = rows.setdefault(res["row"], {"label": res["label"], "seeds": [], "acc": {}, "bpc": {},
                                             "train_key": res["train_key"]})
        entry["seeds"].append(res["seed"])
        for key, value in res["metrics"].items():
            m = re.fullmatch(r"val/(acc|bpc)@(\w+)", key)
            if m:
                entry[m.group(1)].setdefault(m.group(2), []).append(value)
    for entry in rows.values():
        for kind in ("acc", "bpc"):
            entry[kind] = {
                name: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else None,
                       "values": v}
                for name, v in entry[kind].items()
            }
    return rows


def _ordered(rows: dict[str, Any]) -> list[str]:
    return sorted(rows, key=lambda r: (ROW_ORDER.index(r) if r in ROW_ORDER else len(ROW_ORDER), r))


def markdown_table(rows: dict[str, Any], seq_len: int, lengths: list[int]) -> str:
    """Su's layout (train length, 8L repeated, 8L non-repeated) plus every other test length."""
    test = 8 * seq_len
    others = [t for t in lengths if t not in (seq_len, test)]
    header = ["method", "seeds", f"{seq_len} (train)", f"{test} repeated", f"{test} non-repeated"]
    header += [str(t) for t in others] + [f"{16 * seq_len} repeated", f"{test}/{seq_len} kept"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in _ordered(rows):
        entry = rows[row]
        acc = entry["acc"]

        def cell(name: str, acc: dict = acc) -> str:
            return _fmt(acc[name]["values"]) if name in acc else "—"

        kept = "—"
        if str(seq_len) in acc and str(test) in acc:
            ratios = [b / a for a, b in zip(acc[str(seq_len)]["values"], acc[str(test)]["values"])]
            kept = f"{100 * statistics.fmean(ratios):.1f}%"
        cells = [f"{entry['label']} (`{row}`)", str(len(entry["seeds"])), cell(str(seq_len)), cell(f"{test}_rep"),
                 cell(str(test))]
        cells += [cell(str(t)) for t in others] + [cell(f"{16 * seq_len}_rep"), kept]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def claims(rows: dict[str, Any], seq_len: int) -> list[str]:
    """Check the notes' qualitative claims (Su, "Transformer升级之路" 7, 8 and 12) on the measured numbers."""
    out = []
    test = str(8 * seq_len)
    train = str(seq_len)

    def kept(row: str) -> float | None:
        acc = rows.get(row, {}).get("acc", {})
        if train not in acc or test not in acc:
            return None
        return acc[test]["mean"] / acc[train]["mean"]

    windowed = [r for r in ("rope_window", "rope_window_logn", "hwfa") if kept(r) is not None]
    for r in windowed:
        k = kept(r)
        verdict = "confirmed" if k >= 0.95 else "refuted"  # type: ignore[operator]
        out.append(f"- `{r}` keeps {100 * k:.1f}% of its L accuracy at 8L (claim ≥ 95%: {verdict}).")  # type: ignore[operator]
    k = kept("rope")
    if k is not None:
        verdict = "confirmed" if k < 0.75 else "refuted"
        out.append(f"- `rope` (baseline) keeps {100 * k:.1f}% at 8L, i.e. loses {100 * (1 - k):.1f}% "
                   f"(claim: loses > 25%: {verdict}).")
    k = kept("rerope_w_logn")
    if k is not None:
        verdict = "confirmed" if k >= 0.98 else "refuted"
        out.append(f"- `rerope_w_logn` keeps {100 * k:.1f}% of its L accuracy at 8L (notes: 99.3%; must show "
                   f"≥ 98%: {verdict}).")
        rep8 = f"{test}_rep"
        mine = rows["rerope_w_logn"]["acc"].get(rep8)
        window = rows.get("rope_window_logn", rows.get("rope_window", {})).get("acc", {}).get(rep8)
        if mine is not None and window is not None:
            cmp = "≥" if mine["mean"] >= window["mean"] else "<"
            out.append(f"- `rerope_w_logn` repeated accuracy at 8L {100 * mine['mean']:.2f}% {cmp} the windowed "
                       f"row's {100 * window['mean']:.2f}% (must show ≥).")
    for r in ("rope_logn", "rope_ntk", "rope_pi", "rerope_w", "leaky_rerope", "alibi", "kerple_log", "sandwich",
              "xpos", "rope_random_pos", "nope"):
        kr = kept(r)
        if kr is not None:
            out.append(f"- `{r}` keeps {100 * kr:.1f}% of its L accuracy at 8L.")
    rep = f"{test}_rep"
    copiers = [r for r in rows if rep in rows[r]["acc"] and train in rows[r]["acc"]
               and rows[r]["acc"][rep]["mean"] > rows[r]["acc"][train]["mean"] + 0.05]
    out.append(
        f"- Copying across 2L (repeated {test} > L accuracy + 5 points): "
        + (", ".join(f"`{r}`" for r in copiers) if copiers else "no row")
        + "."
    )
    return out


def plot(rows: dict[str, Any], seq_len: int, lengths: list[int], path: Path) -> None:
    """Accuracy against test length (log2 axis), non-repeated and repeated panels, mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), sharey=True)
    colors = plt.get_cmap("tab20").colors  # up to 20 rows, one colour each (the default cycle repeats after 10)
    for ax, suffix, title in ((axes[0], "", "non-repeated (held-out files)"),
                              (axes[1], "_rep", "repeated (2L segment tiled)")):
        for n_row, row in enumerate(_ordered(rows)):
            acc = rows[row]["acc"]
            xs = [t for t in lengths if f"{t}{suffix}" in acc]
            if suffix and str(seq_len) in acc:  # a repeated curve starts from the shared L point
                xs = [seq_len, *xs]
            if not xs:
                continue
            names = [str(t) if (t == seq_len and suffix) else f"{t}{suffix}" for t in xs]
            ys = [100 * acc[n]["mean"] for n in names]
            es = [100 * (acc[n]["std"] or 0.0) for n in names]
            # dashed: rows that only change evaluation-time options of a trained model
            style = "--" if row in ("rope_pi", "rope_ntk", "rope_window", "rope_window_logn", "rerope_w",
                                    "rerope_w_logn", "leaky_rerope") else "-"
            ax.errorbar(xs, ys, yerr=es, marker="o", ms=3, capsize=2, ls=style, label=rows[row]["label"],
                        color=colors[n_row % len(colors)])
        ax.axvline(seq_len, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths)
        ax.set_xticklabels([str(t) for t in lengths])
        ax.set_xlabel("test length (characters)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("next-character accuracy (%)")
    axes[1].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"Length extrapolation: trained at L = {seq_len}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: list[dict[str, Any]], out: Path, meta: dict[str, Any]) -> str:
    """Markdown + JSON + PNG from all result files so far; returns the table."""
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(results)
    seq_len, lengths = meta["seq_len"], meta["eval_lengths"]
    table = markdown_table(rows, seq_len, lengths)
    plot(rows, seq_len, lengths, out / "accuracy_vs_length.png")
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "runs": results}, indent=2))
    text = [
        "# Length extrapolation: measured table (CPU mirror of Su's setup)",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"- Data: {meta['corpus']}. Training windows of L = {seq_len} characters; evaluation on "
        f"{meta['num_eval_windows']} windows per length from held-out files only (file-level split by a hash "
        f"of the path); 'repeated' = one held-out segment of 2L = {2 * seq_len} tiled to the test length.",
        f"- Model: {meta['model']}, {meta['params']:,} parameters; Tiger (α = {meta['lr']}, β = 0.965, "
        f"λ = 0.01), {meta['warmup_steps']} warm-up steps then linear decay to 10%; {meta['steps']} steps of "
        f"{meta['batch_size']} × {seq_len} characters; seeds {meta['seeds']}."
        + (f" Copying curriculum: {100 * meta['repeat_fraction']:.0f}% of the training windows tile a random "
           "segment of L/8 … L/2 characters (`repeat_fraction`)"
           + (f", {100 * meta.get('repeat_noise', 0.0):.0f}% of those a segment of characters drawn independently "
              "from the training text (`repeat_noise`)" if meta.get("repeat_noise") else "")
           + "; evaluation windows are unchanged." if meta.get("repeat_fraction") else ""),
        "- Metric: next-character accuracy over every position of each window (Su's definition); mean ± "
        "sample std over seeds. 'kept' = accuracy at 8L / accuracy at L.",
        f"- Machine: {meta['machine']}. Wall time: {meta['wall_minutes']:.1f} min for the runs in this table.",
        "",
        table,
        "",
        "Su's reference (≈100M GAU, L = 512, tested at 4096; kexue.fm/archives/9603 … 9731): RoPE 49.41% "
        "→ 24.17% (repeated) / 23.16% (non-repeated); ReRoPE-w256-log n 49.40% → 85.12% / 49.07%; HWFA 48.70% → "
        "80.84% / 48.15%. An earlier single-seed CPU probe (1500 AdamW steps): RoPE 67.15% → 40.10%, RoPE + "
        "window 67.15% → 68.69%, ALiBi 65.59% → 67.23% at 8L.",
        "",
        "## Claims",
        "",
        *claims(rows, seq_len),
        "",
        "![accuracy against test length](accuracy_vs_length.png)",
        "",
    ]
    (out / "table.md").write_text("\n".join(text))
    return table


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=None, help="comma-separated row names (default: every config in --config-dir)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default: 0)")
    p.add_argument("--multi-seed-rows", default=None,
                   help="rows that get every seed of --seeds; the others only the first (default: all rows)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per training run (default 1500)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, 30 steps, few eval windows")
    p.add_argument("--config-dir", type=Path, default=DEFAULT_CONFIG_DIR)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the table, JSON and plot go")
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK, help="checkpoints and per-run results")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="dotted config override applied to every row, e.g. model.init_args.model.dim=96")
    p.add_argument("--ckpt-every", type=int, default=100, help="checkpoint interval in steps (resume points)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice; 1 is much faster on a busy shared machine)")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the experiment; returns the summary (also written to ``--out``)."""
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from tqdm.auto import tqdm

    available = sorted(p.stem for p in args.config_dir.glob("*.yaml"))
    rows = args.rows.split(",") if args.rows else [r for r in ROW_ORDER if r in available] + [
        r for r in available if r not in ROW_ORDER]
    unknown = [r for r in rows if r not in available]
    if unknown:
        raise SystemExit(f"--rows: unknown row(s) {unknown}; available: {available}")
    multi = set(args.multi_seed_rows.split(",")) if args.multi_seed_rows else set(rows)
    steps = args.steps if args.steps is not None else (30 if args.quick else 1500)
    overrides = (QUICK_OVERRIDES if args.quick else []) + list(args.overrides)
    jobs = [(row, seed) for seed_idx, seed in enumerate(args.seeds) for row in rows
            if seed_idx == 0 or row in multi]
    results_dir = args.work_dir / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    command = "python examples/length_extrapolation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    start = time.time()
    meta: dict[str, Any] = {}
    results: list[dict[str, Any]] = []
    bar = tqdm(jobs, desc="rows", disable=args.no_progress)
    for row, seed in bar:
        bar.set_postfix_str(f"{row} seed {seed}")
        seed_overrides = [f"seed_everything={seed}", f"data.init_args.seed={seed}",
                          f"model.init_args.position_seed={seed}"]
        cfg, label = load_row_config(args.config_dir / f"{row}.yaml", overrides + seed_overrides)
        key = training_key(cfg, steps)
        result_path = results_dir / f"{row}__s{seed}__{key}.json"
        if not meta:
            meta = _meta(cfg, steps, args, command)
        if result_path.exists():
            results.append(json.loads(result_path.read_text()))
            print(f"[skip] {row} seed {seed}: {result_path.name} exists", flush=True)
            continue
        train_dir = args.work_dir / "train" / key
        print(f"[train] {row} seed {seed} -> {train_dir}", flush=True)
        t0 = time.time()
        ckpt = train_row(cfg, train_dir, steps, args.ckpt_every, progress=not args.no_progress)
        t1 = time.time()
        print(f"[eval]  {row} seed {seed}", flush=True)
        metrics = evaluate_row(cfg, ckpt)
        t2 = time.time()
        res = {"row": row, "label": label, "seed": seed, "train_key": key, "steps": steps, "metrics": metrics,
               "train_seconds": t1 - t0, "eval_seconds": t2 - t1, "config": cfg}
        result_path.write_text(json.dumps(res, indent=2))
        results.append(res)
        meta["wall_minutes"] = (time.time() - start) / 60
        print(write_report(results, args.out, meta), flush=True)
    meta["wall_minutes"] = sum(r.get("train_seconds", 0) + r.get("eval_seconds", 0) for r in results) / 60
    table = write_report(results, args.out, meta) if results else ""
    print("\n" + table)
    print(f"\nwrote {args.out / 'table.md'}, {args.out / 'results.json'}, {args.out / 'accuracy_vs_length.png'}")
    return summarize(results)


def _meta(cfg: dict[str, Any], steps: int, args: argparse.Namespace, command: str) -> dict[str, Any]:
    model_cfg = cfg["model"]["init_args"]
    data_cfg = cfg["data"]["init_args"]
    net = model_cfg.get("model", {})
    dim, depth = net.get("dim", 256), net.get("depth", 4)
    heads = net.get("num_heads", 4)
    try:
        module, _ = instantiate(cfg)
        params = sum(p.numel() for p in module.parameters())
    except Exception:  # pragma: no cover - the report still gets written
        params = -1
    source = data_cfg.get("source") or "CPython standard library (*.py, no tests / site-packages / pydoc_data)"
    cap = data_cfg.get("max_chars")
    return {
        "seq_len": int(data_cfg.get("seq_len", 64)),
        "eval_lengths": [int(t) for t in data_cfg.get("eval_lengths", [64, 128, 256, 512, 1024])],
        "num_eval_windows": data_cfg.get("num_eval_windows", 128),
        "batch_size": data_cfg.get("batch_size", 32),
        "repeat_fraction": float(data_cfg.get("repeat_fraction", 0.0)),
        "repeat_noise": float(data_cfg.get("repeat_noise", 0.0)),
        "corpus": f"{source}{f', training text capped at {cap:,} characters' if cap else ''}",
        "model": f"pre-norm decoder, {depth} layers, d = {dim}, {heads} heads, SwiGLU, byte vocabulary",
        "params": params,
        "lr": (model_cfg.get("optimizer") or {}).get("init_args", {}).get("lr"),
        "warmup_steps": model_cfg.get("warmup_steps"),
        "steps": steps,
        "seeds": args.seeds,
        "multi_seed_rows": args.multi_seed_rows,
        "overrides": args.overrides + (QUICK_OVERRIDES if args.quick else []),
        "machine": f"{os.cpu_count()} CPU cores, torch threads {args.threads or 'default'}",
        "command": command,
        "wall_minutes": 0.0,
    }


if __name__ == "__main__":
    main()
