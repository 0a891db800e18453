"""Write the measured tables of README.md and docs/*.md from the benchmark JSON files, so numbers cannot drift.

    python docs/build.py            # rewrite every generated block in place
    python docs/build.py --check    # exit 1 (listing the pages) if a page is out of date; nothing is written

A generated block in a page is delimited by two HTML comments (invisible in rendered Markdown)::

    <!-- BEGIN generated: optimizer_step -->
    ... replaced by this script ...
    <!-- END generated -->

``optimizer_step`` names a function in ``GENERATORS`` below; each reads one JSON file (``benchmarks/results/*.json``
written by ``benchmarks/<name>.py``, or ``docs/results/**/*.json`` written by an ``examples/`` script) and returns
the table followed by the command that produced it and, where the JSON records them, the machine and versions.
When a JSON stores its command (``command`` key) that command is printed as recorded; otherwise the command is
derived from the arguments the JSON records, against the benchmark script's argparse defaults, and the text says
"derived". Text outside the markers is never touched.

A JSON that lacks a field a table needs stops the build with a message naming the file and the key (e.g.
``benchmarks/results/rerope.json: missing key 'setting.iters'``), never a traceback. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = "benchmarks/results"
PAGES = ("README.md", "docs/*.md")

BLOCK = re.compile(r"^(<!-- BEGIN generated: ([\w-]+) -->\n)(.*?)^(<!-- END generated -->)$", re.S | re.M)
BEGIN = re.compile(r"^<!-- BEGIN generated:", re.M)  # a marker is a line of its own; inline mentions are text


class DocsBuildError(Exception):
    """A page or a JSON file cannot produce its table; the message names the file and the key."""


_MISSING = object()


class Source:
    """One JSON file, with lookups that fail naming the file and the key path instead of raising KeyError."""

    def __init__(self, rel: str) -> None:
        self.rel = rel
        path = ROOT / rel
        if not path.is_file():
            raise DocsBuildError(f"{rel}: file not found (run the script that writes it)")
        try:
            self.data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DocsBuildError(f"{rel}: not valid JSON ({exc})") from None
        self._paths: dict[int, tuple[str | int, ...]] = {}

    def get(self, *path: str | int, default: Any = _MISSING, within: Any = _MISSING) -> Any:
        """The value at ``path`` (keys and list indices), from the root or from ``within`` (an inner object
        returned by an earlier ``get``, whose path then prefixes ``path`` in error messages)."""
        node = self.data if within is _MISSING else within
        prefix = () if within is _MISSING else self._paths.get(id(within), ("<inner object>",))
        for i, key in enumerate(path):
            found = _MISSING
            in_list = isinstance(key, int) and isinstance(node, list) and -len(node) <= key < len(node)
            if in_list or (isinstance(key, str) and isinstance(node, dict) and key in node):
                found = node[key]
            if found is _MISSING:
                if default is not _MISSING:
                    return default
                where = ".".join(str(k) for k in (*prefix, *path[: i + 1]))
                raise DocsBuildError(f"{self.rel}: missing key {where!r}")
            node = found
        if isinstance(node, (dict, list)):
            self._paths[id(node)] = (*prefix, *path)  # objects live as long as self.data: ids stay unique
        return node

    def rows(self, *path: str) -> list[dict[str, Any]]:
        """A list of objects at ``path``; each is checked to be an object."""
        value = self.get(*path)
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise DocsBuildError(f"{self.rel}: key {'.'.join(path)!r} must be a list of objects")
        return value

    def field(self, row: dict[str, Any], key: str, where: str) -> Any:
        """``row[key]``, failing with the file, the list it came from and the key."""
        if key not in row:
            raise DocsBuildError(f"{self.rel}: missing key {key!r} in {where}")
        return row[key]

    def number(self, row: dict[str, Any], key: str, where: str) -> float:
        value = self.field(row, key, where)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise DocsBuildError(f"{self.rel}: key {key!r} in {where} must be a number, got {value!r}")
        return float(value)


# ---------------------------------------------------------------------------------------------------- formatting
def table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """A Markdown table; ``align`` is one letter per column (``l`` or ``r``)."""
    align = align or "l" * len(header)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]  # a '|' in a cell
    return "\n".join(lines)


def fmt(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}"


def ratio(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}×"


def provenance(command: str, derived: bool, *facts: str) -> str:
    """The lines under a table: the command (recorded or derived) and what the JSON says about the machine."""
    how = "derived from the arguments the JSON records" if derived else "as recorded in the JSON"
    text = f"Command ({how}): `{command}`"
    facts = tuple(f for f in facts if f)
    if facts:
        text += "  \nRecorded: " + "; ".join(facts) + "."
    return text


def quick_note(src: Source) -> str:
    return ("**This JSON is from a `--quick` smoke run, not a measurement.**\n\n"
            if src.get("quick", default=False) else "")


# ---------------------------------------------------------------------------------------------------- generators
def optimizer_step() -> str:
    src = Source(f"{RESULTS}/optimizer_step.json")
    rows = []
    for i, r in enumerate(src.rows("results")):
        where = f"results[{i}]"
        rows.append([
            f"`{src.field(r, 'optimizer', where)}`",
            fmt(src.number(r, "ms", where)),
            ratio(src.number(r, "ratio_to_fused_adamw", where)),
            str(int(src.number(r, "bytes_per_param", where))),
            ratio(src.number(r, "x_bound", where)),
            f"{src.number(r, 'peak_transient_bytes', where) / 2**20:.0f} MiB",
        ])
    out = [quick_note(src) + table(
        ["optimizer", "ms/step (median)", "vs AdamW fused", "bytes/param", "× bandwidth bound", "peak transient"],
        rows, "lrrrrr")]
    sr = src.get("stochastic_over_nearest", default=None)
    if sr is not None:
        out.append(f"Stochastic rounding costs {ratio(sr)} round-to-nearest on the bf16 Tiger step (median of "
                   "per-round ratios).")
    targets = src.get("targets", default={})
    if targets:
        out.append("Targets: " + "; ".join(f"{k}: {'met' if v else '**missed**'}" for k, v in targets.items())
                   + ".")
    skipped = src.get("skipped", default={})
    if skipped:
        out.append("Peers not measured in this run: " + "; ".join(f"`{k}` ({v})" for k, v in skipped.items())
                   + ".")
    cfg = src.get("config")
    rounds = src.get("rounds", within=cfg)
    cmd = "python benchmarks/optimizer_step.py" + (" --quick" if src.get("quick", default=False) else "")
    cmd += f" --rounds {rounds}"
    m = src.get("machine")
    out.append(provenance(
        cmd, True,
        f"{src.get('n_params', within=cfg) / 1e6:.1f}M {src.get('dtype', within=cfg)} parameters "
        f"(d_model {src.get('d_model', within=cfg)}, {src.get('layers', within=cfg)} layers, "
        f"vocabulary {src.get('vocab', within=cfg)})",
        f"in-place bandwidth {src.get('bandwidth_GBps'):.1f} GB/s",
        f"fused kernels {'on' if src.get('fused_kernels') else 'off'}",
        f"{src.get('threads', within=m)} threads, torch {src.get('torch', within=m)}, "
        f"Python {src.get('python', within=m)}, {src.get('platform', within=m)}",
    ))
    return "\n\n".join(out)


def optimizer_memory() -> str:
    src = Source(f"{RESULTS}/optimizer_memory.json")
    rows = []
    for i, r in enumerate(src.rows("results")):
        where = f"results[{i}]"
        rows.append([
            f"`{src.field(r, 'config', where)}`",
            f"{src.number(r, 'peak_over_baseline', where) / 2**20:.0f}",
            fmt(src.number(r, "bytes_per_param_measured", where), 1),
            str(int(src.number(r, "bytes_per_param_theory", where))),
            ratio(src.number(r, "ratio_to_AdamW", where)),
            ratio(src.number(r, "ratio_to_Tiger", where)),
        ])
    out = [quick_note(src) + table(
        ["configuration", "peak MiB", "bytes/param measured", "bytes/param theory", "vs AdamW", "vs Tiger"],
        rows, "lrrrrr")]
    tight = src.get("tight_vs_standard", default={})
    if tight:
        parts = [f"{k}: max |Δθ| = {src.get(k, 'max_abs_diff', within=tight):.2g} "
                 f"({src.get(k, 'n_diff_gt_1em6', within=tight)} of {src.get(k, 'n_compared', within=tight)} "
                 "elements differ by more than 1e-6)" for k in tight]
        out.append("Tight-fisted vs standard Tiger, " + "; ".join(parts) + ".")
    targets = src.get("targets", default={})
    if targets:
        out.append("Targets: " + "; ".join(f"{k}: {'met' if v else '**missed**'}" for k, v in targets.items())
                   + ".")
    out.append(provenance(
        "python benchmarks/optimizer_memory.py" + (" --quick" if src.get("quick", default=False) else ""), True,
        f"{src.get('n_params') / 1e6:.1f}M parameters, accumulation k = {src.get('k')}",
        f"measure: {src.get('measure', default='peak RSS over a warmed-up baseline')}",
        f"torch {src.get('torch', default='?')}",
    ))
    return "\n\n".join(out)


LOW_PRECISION_VARIANTS = ("fp32", "bf16 nearest", "bf16 SR", "bf16 SR, m nearest", "bf16 Kahan")


def low_precision() -> str:
    src = Source(f"{RESULTS}/low_precision.json")
    cells: dict[tuple[str, str], dict[str, str]] = {}
    variants: list[str] = [v for v in LOW_PRECISION_VARIANTS]
    for i, r in enumerate(src.rows("rows")):
        where = f"rows[{i}]"
        key = (src.field(r, "task", where), src.field(r, "optimizer", where))
        variant = src.field(r, "variant", where)
        if variant not in variants:
            variants.append(variant)
        loss, rel = src.number(r, "loss", where), src.number(r, "ratio", where)
        cells.setdefault(key, {})[variant] = fmt(loss, 4) if variant == "fp32" else f"{fmt(loss, 4)} ({ratio(rel)})"
    rows = [[task, opt] + [c.get(v, "—") for v in variants] for (task, opt), c in cells.items()]
    out = [quick_note(src) + table(["task", "optimizer", *variants], rows, "ll" + "r" * len(variants))]
    target = src.get("target", default=None)
    if target:
        out.append(f"Worst bf16-SR / fp32 ratio {fmt(src.get('worst', within=target), 3)} "
                   f"(target ≤ {src.get('bf16_sr_max_ratio', within=target)}: "
                   f"{'met' if src.get('met', within=target) else '**missed**'}).")
    command = str(src.get("command"))
    out.append(provenance(
        command, False,
        f"char-LM rows at {src.get('lm_steps')} steps",
        f"{src.get('threads', default='?')} threads, torch {src.get('torch', default='?')}",
        "`--tasks` replaces only the named tasks' rows, so the other rows come from an earlier invocation "
        "(same script, default arguments)" if "--tasks" in command else "",
    ))
    return "\n\n".join(out)


def optimizer_monitor() -> str:
    src = Source(f"{RESULTS}/optimizer_monitor.json")
    results = src.get("results")
    optimizers = list(results)
    configs: list[str] = []
    for o in optimizers:
        configs += [c for c in src.get(o, within=results) if isinstance(src.get(o, c, within=results), dict)
                    and c not in configs]
    rows = []
    for c in configs:
        row = [f"`{c}`"]
        for o in optimizers:
            cell = src.get(o, c, within=results)
            where = f"results.{o}.{c}"
            row += [fmt(src.number(cell, "ms_per_step", where), 1),
                    f"{src.number(cell, 'overhead_pct', where):+.1f}%"]
        rows.append(row)
    header = ["configuration"] + [h for o in optimizers for h in (f"{o} ms/step", f"{o} overhead")]
    out = [quick_note(src) + table(header, rows, "l" + "r" * (2 * len(optimizers)))]
    iso = src.get("isolated_cpu_ms", default=None)
    if iso:
        out.append("Outside the Trainer (CPU ms, interleaved, median): "
                   + "; ".join(f"{k}: {fmt(v, 1) if isinstance(v, (int, float)) and 'pct' not in k else v}"
                               for k, v in iso.items() if "pct" not in k)
                   + f"; amortised over `log_every_n_steps=50`: "
                   f"{fmt(src.get('amortised_pct_at_n50', within=iso), 2)}% of a step.")
    chk = src.get("nonfinite_check_ms", default=None)
    if chk:
        out.append("Non-finite check alone over all gradients (ms): "
                   + "; ".join(f"{k}: {fmt(v, 2)}" for k, v in chk.items()) + ".")
    cmd = "python benchmarks/optimizer_monitor.py" + (" --quick" if src.get("quick", default=False) else "")
    cmd += f" --rounds {src.get('rounds')} --steps {src.get('steps')} --threads {src.get('threads')}"
    batch = src.get("batch")
    out.append(provenance(
        cmd, True,
        f"{src.get('model')}, {src.get('parameters') / 1e6:.1f}M parameters, batch "
        + " × ".join(str(b) for b in batch),
        f"torch {src.get('torch', default='?')}, lightning {src.get('lightning', default='?')}, "
        f"Python {src.get('python', default='?')}, {src.get('machine', default='?')}",
    ))
    return "\n\n".join(out)


def load_lm() -> str:
    src = Source(f"{RESULTS}/load_lm.json")
    rows = []
    results = src.rows("results")
    for i, r in enumerate(results):
        where = f"results[{i}]"
        rows.append([
            "guarded" if src.field(r, "guard", where) else "unguarded peer",
            str(src.field(r, "precision", where)),
            str(int(src.number(r, "steps", where))),
            fmt(src.number(r, "tokens_per_s_median", where), 0),
            fmt(src.number(r, "rss_first_mb", where), 0),
            fmt(src.number(r, "rss_last_mb", where), 0),
            fmt(src.number(r, "rss_slope_mb_per_1000_steps", where), 2),
            str(src.field(r, "skipped", where)),
            "yes" if src.field(r, "params_finite", where) else "**no**",
        ])
    out = [quick_note(src) + table(
        ["run", "precision", "steps", "tokens/s (median)", "RSS first MB", "RSS last MB", "RSS slope MB/1000 steps",
         "steps vetoed", "parameters finite"], rows, "llrrrrrrl")]
    cmd = "python benchmarks/load_lm.py" + (" --quick" if src.get("quick", default=False)
                                            else f" --steps {src.get('steps', within=results[0])}")
    if len(results) > 1:
        cmd += " --compare"
    out.append(provenance(cmd, True, f"torch {src.get('torch', default='?')}"))
    return "\n\n".join(out)


def attention() -> str:
    src = Source(f"{RESULTS}/attention.json")
    rows = []
    for i, r in enumerate(src.rows("lm")):
        where = f"lm[{i}]"
        ours, peer = src.field(r, "ours", where), src.field(r, "x-transformers", where)
        rows.append([
            str(src.field(r, "position", where)),
            f"{src.field(r, 'batch', where)} × {src.field(r, 'seq', where)}",
            fmt(src.number(ours, "tokens_per_s", f"{where}.ours"), 0),
            fmt(src.number(peer, "tokens_per_s", f"{where}.x-transformers"), 0),
            ratio(src.number(r, "speed_ratio", where)),
            ratio(src.number(r, "memory_ratio", where)),
        ])
    out = [quick_note(src) + table(
        ["position", "batch × tokens", "ours tokens/s", "x-transformers tokens/s", "speed ratio",
         "activation memory ratio"], rows, "llrrrr")]
    op = []
    for i, r in enumerate(src.rows("rope_op")):
        where = f"rope_op[{i}]"
        op.append([str(src.field(r, "seq", where)), fmt(src.number(r, "ours_ms", where)),
                   fmt(src.number(r, "rotary_embedding_torch_ms", where)), ratio(src.number(r, "speed_ratio", where))])
    out.append("The RoPE op alone (q and k, `[8, seq, 4, 64]`, forward + backward):\n\n" + table(
        ["tokens", "ours ms", "rotary-embedding-torch ms", "speed ratio"], op, "rrrr"))
    win = []
    for i, r in enumerate(src.rows("window")):
        where = f"window[{i}]"
        banded, full = src.field(r, "banded", where), src.field(r, "full_mask", where)
        win.append([str(src.field(r, "seq", where)), str(src.field(r, "window", where)),
                    fmt(src.number(banded, "activation_MiB", f"{where}.banded"), 1),
                    fmt(src.number(banded, "ms", f"{where}.banded"), 1),
                    fmt(src.number(full, "activation_MiB", f"{where}.full_mask"), 1),
                    fmt(src.number(full, "ms", f"{where}.full_mask"), 1)])
    out.append("Windowed attention, query blocks over their key band vs one call with the full window mask:\n\n"
               + table(["tokens", "window", "banded MiB", "banded ms", "full-mask MiB", "full-mask ms"], win,
                       "rrrrrr"))
    kernels = src.get("kernels", default={})
    if kernels:
        out.append("Kernel each option lands on: " + "; ".join(f"{k} → `{v}`" for k, v in kernels.items()) + ".")
    bf16 = src.get("bf16_rope_error", default=None)
    if bf16:
        out.append(f"RoPE with bf16 inputs at positions 257–262, max error: ours "
                   f"{src.get('ours', within=bf16):.4f}, rotary-embedding-torch "
                   f"{src.get('rotary_embedding_torch', within=bf16):.2f}.")
    out.append(provenance(
        "python benchmarks/attention.py" + (" --quick" if src.get("quick", default=False) else ""), True,
        f"{src.get('threads')} threads, torch {src.get('torch')}"))
    return "\n\n".join(out)


def rerope() -> str:
    src = Source(f"{RESULTS}/rerope.json")
    layer = src.get("layer_cost_vs_rope")
    rows = []
    for variant in layer:
        rows.append([
            variant,
            ratio(src.get("layer_cost_vs_rope", variant)),
            fmt(src.get("layer_tokens_per_s", variant), 0),
            ratio(src.get("model_cost_vs_rope", variant)),
            ratio(src.get("decode_cost_vs_rope", variant)),
        ])
    out = [table(["variant", "one attention layer (cost)", "layer tokens/s", "whole LM forward (cost)",
                  "KV-cache decode per token (cost)"], rows, "lrrrr")]
    blocks = src.get("rerope_cost_vs_rope_by_block", default={})
    if blocks:
        out.append("ReRoPE layer cost by query-block size: "
                   + "; ".join(f"{k}: {ratio(v)}" for k, v in blocks.items()) + ".")
    met = src.get("target_met", default=None)
    if met is not None:
        out.append(f"Target ReRoPE ≤ 2.2× RoPE per layer at 8L: {'met' if met else '**missed**'}.")
    s, m = src.get("setting"), src.get("machine")
    out.append(provenance(
        f"python benchmarks/rerope.py --threads {src.get('threads', within=s)} --iters {src.get('iters', within=s)}",
        True,
        f"d = {src.get('dim', within=s)}, {src.get('heads', within=s)} heads, "
        f"{src.get('depth', within=s)} layers, {src.get('seq', within=s)} tokens "
        f"(8 × L = {src.get('L_train', within=s)}), batch {src.get('batch', within=s)}",
        f"torch {src.get('torch', within=m)}, {src.get('platform', within=m)}"))
    return "\n\n".join(out)


def _extrapolation_table(path: str, multiples: tuple[int, ...]) -> str:
    """The table of one ``examples/length_extrapolation.py`` run: accuracy at L, then repeated / non-repeated
    at each of ``multiples`` × L, and the accuracy kept at the last one."""
    src = Source(path)
    meta = src.get("meta")
    L = int(src.get("seq_len", within=meta))
    rows = []
    for name, r in src.get("rows").items():
        where = f"rows.{name}"
        acc = src.field(r, "acc", where)

        def cell(key: str, acc: dict = acc, where: str = where) -> tuple[str, float]:
            v = src.field(acc, key, f"{where}.acc")
            mean = src.number(v, "mean", f"{where}.acc.{key}")
            std = v.get("std")
            n = len(v.get("values", [mean]))
            text = f"{100 * mean:.2f} ± {100 * std:.2f}%" if n > 1 and std is not None else f"{100 * mean:.2f}%"
            return text, mean

        at_l, m_l = cell(str(L))
        cells, m_far = [], m_l
        for k in multiples:
            rep, _ = cell(f"{k * L}_rep")
            non, m_far = cell(str(k * L))
            cells += [rep, non]
        rows.append([f"{src.field(r, 'label', where)} (`{name}`)", str(len(src.field(r, 'seeds', where))),
                     at_l, *cells, f"{100 * m_far / m_l:.0f}%"])
    head = ["method", "seeds", f"L = {L} (train)"]
    for k in multiples:
        head += [f"{k}L = {k * L} repeated", f"{k}L non-repeated"]
    head.append(f"kept at {multiples[-1]}L")
    out = [table(head, rows, "lr" + "r" * (len(head) - 2))]
    out.append(provenance(
        src.get("command", within=meta), False,
        f"{src.get('model', within=meta)}, {src.get('params', within=meta):,} parameters, "
        f"{src.get('steps', within=meta)} steps, seeds {src.get('seeds', within=meta)}",
        f"{src.get('machine', within=meta)}, {src.get('wall_minutes', within=meta):.0f} min wall"))
    return "\n\n".join(out)


def length_extrapolation() -> str:
    return _extrapolation_table("docs/results/length_extrapolation/results.json", (8,))


def length_extrapolation_copy() -> str:
    return _extrapolation_table("docs/results/length_extrapolation_copy/results.json", (4, 8))


def diffusion_examples() -> str:
    runs = [("moons", "tiger", "python examples/score_matching.py --task moons --threads {threads}"),
            ("digits", "tiger", "python examples/score_matching.py --task digits --max-steps {max_steps} "
                                "--threads {threads} --ema-decay {ema_decay}"),
            ("digits", "adamw", "python examples/score_matching.py --task digits --max-steps {max_steps} "
                                "--threads {threads} --ema-decay {ema_decay} --optimizer adamw")]
    rows = []
    for task, opt, template in runs:
        src = Source(f"docs/results/diffusion/{task}_{opt}.json")
        samplers = src.get("samplers")
        results = []
        for name in samplers:
            s = src.get(name, within=samplers)
            steps = s.get("steps")
            label = f"{name} {steps} steps" if steps else f"{name} ({s.get('nfe', '?')} evaluations)"
            text = f"{label}: W2 {src.number(s, 'w2', f'samplers.{name}'):.3f}"
            if "fd" in s:
                text += f", Fréchet (raw pixels) **{src.number(s, 'fd', f'samplers.{name}'):.2f}**"
            results.append(text)
        if task == "digits":
            results.append(f"uniform noise {src.get('fd_noise_baseline'):.1f}, train half vs held-out half "
                           f"{src.get('fd_train_vs_heldout'):.2f}")
        command = template.format(threads=src.get("threads"), max_steps=src.get("max_steps"),
                                  ema_decay=src.get("ema_decay", default=0.999))
        rows.append([f"{task}, {opt}, {src.get('max_steps')} steps", f"`{command}`",
                     f"{src.get('train_seconds'):.0f} s", "; ".join(results)])
    return (table(["run", "command (derived from the JSON's arguments)", "train time", "result"], rows, "llrl")
            + "\n\nSource: `docs/results/diffusion/*.json`, written by `examples/score_matching.py`.")


def diffusion_samplers() -> str:
    src = Source(f"{RESULTS}/diffusion.json")
    fixed: dict[str, dict[int, float]] = {}
    adaptive = []
    for i, r in enumerate(src.rows("rows")):
        where = f"rows[{i}]"
        name, steps = src.field(r, "sampler", where), src.field(r, "steps", where)
        w2 = src.number(r, "w2", where)
        if steps is None:
            adaptive.append([f"`{name}`", str(src.field(r, "nfe", where)), f"{w2:.3f}",
                             fmt(src.number(r, "seconds", where), 2)])
        else:
            fixed.setdefault(name, {})[int(steps)] = w2
    all_steps = sorted({s for d in fixed.values() for s in d})
    rows = [[f"`{n}`"] + [f"{d[s]:.3f}" if s in d else "" for s in all_steps] for n, d in fixed.items()]
    out = [quick_note(src) + "Exact W2 against steps:\n\n"
           + table(["sampler", *[str(s) for s in all_steps]], rows, "l" + "r" * len(all_steps))]
    if adaptive:
        out.append("Adaptive probability-flow ODE (ours beside `scipy.integrate.solve_ivp`, same tolerances):\n\n"
                   + table(["sampler", "evaluations", "W2", "seconds"], adaptive, "lrrr"))
    lit, bare = src.get("train_steps_per_s_lightning"), src.get("train_steps_per_s_bare")
    out.append(f"Training: {lit:.1f} steps/s under Lightning + EMA vs {bare:.1f} bare ({ratio(lit / bare)}); "
               f"W2 on {src.get('n')} samples, floor {src.get('w2_floor_n1000')}.")
    trained = str(src.get("trained"))
    cmd = "python benchmarks/diffusion.py" + (" --quick" if src.get("quick", default=False) else "")
    if trained.startswith("checkpoint "):
        cmd += " --checkpoint <moons checkpoint from examples/score_matching.py --save-checkpoint>"
    cmd += f" --threads {src.get('threads')}"
    out.append(provenance(cmd, True, f"model: {trained}"))
    return "\n\n".join(out)


def rectified_flow() -> str:
    src = Source(f"{RESULTS}/rectified_flow.json")
    w2 = src.get("w2_table")
    names = {"1rf": "1-RF", "2rf": "2-RF", "distill": "distilled 2-RF"}
    steps = sorted({int(s) for m in w2.values() for s in m}, key=int)
    rows = [[names.get(m, m)] + [f"{w2[m][str(s)]:.3f}" if str(s) in w2[m] else "" for s in steps] for m in w2]
    out = [table(["model \\ Euler steps", *[str(s) for s in steps]], rows, "l" + "r" * len(steps))]
    tr = src.get("training", default=None)
    if tr:
        ours, peer = src.get("ours", within=tr), src.get("torchcfm", within=tr)
        out.append(
            f"Training side by side with torchcfm's `ConditionalFlowMatcher` loss: "
            f"{src.get('steps_per_s', within=ours):.1f} vs {src.get('steps_per_s', within=peer):.1f} steps/s "
            f"({ratio(src.get('steps_per_s_ratio_ours_over_torchcfm'))}); W2@20 "
            f"{src.get('w2@20', within=ours):.3f} vs {src.get('w2@20', within=peer):.3f}, W2@100 "
            f"{src.get('w2@100', within=ours):.3f} vs {src.get('w2@100', within=peer):.3f}.")
    sm = src.get("sampling", default=None)
    if sm:
        out.append(f"Sampling: {src.get('euler100_samples_per_s', within=sm):.0f} samples/s (Euler, 100 steps), "
                   f"{src.get('adaptive_samples_per_s', within=sm):.0f} samples/s (adaptive RK45, "
                   f"{src.get('adaptive_nfe', within=sm)} evaluations).")
    args = src.get("args")
    cmd = "python benchmarks/rectified_flow.py" + (" --quick" if src.get("quick", within=args, default=False) else "")
    for key, value in args.items():
        if key != "quick":
            cmd += f" --{key.replace('_', '-')} {value}"
    out.append(provenance(cmd, True, f"{src.get('torch_threads', default='?')} torch thread(s)"))
    return "\n\n".join(out)


def pending(rel: str, command: str) -> str | None:
    """For a benchmark that may not have run in this tree yet: the text to show instead of its table, or None when
    its JSON exists. (Only for benchmarks added with the change being documented; after the JSON lands, ``--check``
    fails until ``python docs/build.py`` replaces this text by the table.)"""
    if (ROOT / rel).is_file():
        return None
    return f"Not measured in this tree yet (`{rel}` is absent): run `{command}`, then `python docs/build.py`."


def distributed() -> str:
    rel = f"{RESULTS}/distributed.json"
    text = pending(rel, "python benchmarks/distributed.py")
    if text is not None:
        return text
    src = Source(rel)
    rows = []
    for i, r in enumerate(src.rows("rows")):
        where = f"rows[{i}]"
        name, k = f"`{src.field(r, 'row', where)}`", str(src.field(r, "k", where))
        if "error" in r:
            rows.append([name, k, f"error: {r['error']}", "", "", "", ""])
            continue
        vs_tiger, vs_sync = r.get("time_vs_DDP_Tiger"), r.get("time_vs_sync_every")
        rows.append([
            name, k,
            fmt(src.number(r, "step_ms", where), 0),
            str(src.field(r, "calls_per_step", where)),
            fmt(src.number(r, "mb_sent_per_step", where), 1),
            (f"{ratio(vs_tiger)} / {ratio(r.get('bytes_vs_DDP_Tiger', float('nan')))}" if vs_tiger is not None
             else ""),
            (f"{ratio(vs_sync)} / {ratio(r.get('bytes_vs_sync_every', float('nan')))}" if vs_sync is not None
             else ""),
        ])
    out = [quick_note(src) + table(
        ["row", "k", "ms/step", "collectives/step", "MB sent/rank/step", "time / bytes vs DDP Tiger",
         "time / bytes vs sync every micro-batch"], rows, "lrrrrrr")]
    single = src.get("single_process_compute_ms", default=None)
    if single:
        out.append("One process, no communication, Tiger k = " + str(src.get("k")) + ": "
                   + "; ".join(f"{name} {fmt(v, 0)} ms/step" for name, v in single.items()) + ".")
    mem = []
    for i, r in enumerate(src.rows("memory")):
        where = f"memory[{i}]"
        peaks = src.field(r, "peak_over_baseline_mib", where)
        parts = src.field(r, "parts_mib", where)
        mem.append([f"`{src.field(r, 'row', where)}`", " / ".join(f"{p:.0f}" for p in peaks),
                    fmt(src.number(r, "accounted_mib", where), 0),
                    ", ".join(f"{k} {v:.0f}" for k, v in parts.items())])
    out.append("Peak memory per rank:\n\n" + table(["row", "peak MiB per rank", "accounted MiB", "parts (MiB)"],
                                                   mem, "lrrl"))
    cmd = "python benchmarks/distributed.py" + (" --quick" if src.get("quick", default=False) else "")
    cmd += f" --rounds {src.get('rounds')} --steps {src.get('steps_per_round')}"
    out.append(provenance(
        cmd, True,
        f"{src.get('world_size')} gloo ranks, residual MLP of {src.get('n_params') / 1e6:.1f}M fp32 parameters "
        f"(width {src.get('width')}, depth {src.get('depth')}), {src.get('batch_per_rank')} rows per rank and "
        "micro-batch",
        f"bytes: {src.get('bytes', default='?')}",
        f"memory: {src.get('memory_measure', default='?')}",
        f"torch {src.get('torch', default='?')}"))
    return "\n\n".join(out)


def headline() -> str:
    """The README's summary: one line per area, each number read from its JSON."""
    step = Source(f"{RESULTS}/optimizer_step.json")
    by_name = {src_row.get("optimizer"): src_row for src_row in step.rows("results")}

    def step_ratio(name: str) -> str:
        if name not in by_name:
            raise DocsBuildError(f"{step.rel}: no row with optimizer {name!r} in 'results'")
        return ratio(step.number(by_name[name], "ratio_to_fused_adamw", f"results[optimizer={name!r}]"))

    mem = Source(f"{RESULTS}/optimizer_memory.json")
    mem_rows = {r.get("config"): r for r in mem.rows("results")}
    tight = "Tiger tight-fisted"
    if tight not in mem_rows:
        raise DocsBuildError(f"{mem.rel}: no row with config {tight!r} in 'results'")
    low = Source(f"{RESULTS}/low_precision.json")
    ext = Source("docs/results/length_extrapolation/results.json")
    L = int(ext.get("meta", "seq_len"))

    def kept(row: str) -> str:
        acc = ext.get("rows", row, "acc")
        return f"{100 * ext.get(str(8 * L), 'mean', within=acc) / ext.get(str(L), 'mean', within=acc):.0f}%"

    copy = Source("docs/results/length_extrapolation_copy/results.json")
    copy_far = 8 * int(copy.get("meta", "seq_len"))

    def repeated_far(row: str) -> str:
        return f"{100 * copy.get('rows', row, 'acc', f'{copy_far}_rep', 'mean'):.0f}%"

    att = Source(f"{RESULTS}/attention.json")
    att_512 = [r for r in att.rows("lm") if r.get("seq") == 512]
    if not att_512:
        raise DocsBuildError(f"{att.rel}: no row with seq 512 in 'lm'")
    rf = Source(f"{RESULTS}/rectified_flow.json")
    dist = Source(f"{RESULTS}/distributed.json")
    dist_rows = {r.get("row"): r for r in dist.rows("rows")}
    tight_ddp = f"tight-fisted DDP k={dist.get('k')}"
    if tight_ddp not in dist_rows:
        raise DocsBuildError(f"{dist.rel}: no row {tight_ddp!r} in 'rows'")
    rows = [
        [f"Tiger step, {step.get('config', 'n_params') / 1e6:.0f}M {step.get('config', 'dtype')} parameters "
         "(k = 1 / non-final micro-step)",
         f"{step_ratio('ours Tiger (k=1)')} / {step_ratio('ours Tiger non-final (k=4)')} fused AdamW",
         "[optimizers](docs/optimizers.md#step-time)"],
        ["Lion step", f"{step_ratio('ours Lion')} fused AdamW", "[optimizers](docs/optimizers.md#step-time)"],
        ["Tiger step in low precision: bf16 momentum (fp32 θ) / bf16 θ + m + g, stochastic rounding",
         f"{step_ratio('ours Tiger, bf16 momentum (fp32 θ)')} / "
         f"{step_ratio('ours Tiger, bf16 θ+m+g, stochastic rounding')} fused AdamW (fp32)",
         "[optimizers](docs/optimizers.md#step-time)"],
        [f"peak memory, accumulation k = {mem.get('k')}, Tiger with `fold_in_backward=True`",
         f"{ratio(mem.number(mem_rows[tight], 'ratio_to_AdamW', 'results[config=' + repr(tight) + ']'))} AdamW",
         "[optimizers](docs/optimizers.md#memory)"],
        ["bf16 parameters + stochastic rounding, final loss (worst row)",
         f"{ratio(low.get('target', 'worst'), 3)} fp32", "[low precision](docs/low_precision.md)"],
        [f"RoPE LM trained at {L}, accuracy kept at 8L: plain / inference window / ReRoPE + log n",
         f"{kept('rope')} / {kept('rope_window')} / {kept('rerope_w_logn')}",
         "[attention](docs/attention.md#length-extrapolation-measured)"],
        [f"LM trained at {copy_far // 8} that copies, repeated text at 8L: plain / inference window / "
         "ReRoPE + log n / HWFA",
         " / ".join(repeated_far(r) for r in ("rope", "rope_window", "rerope_w_logn", "hwfa")),
         "[attention](docs/attention.md#a-second-scale-where-copying-shows)"],
        [f"decoder forward + backward vs x-transformers, {att_512[0].get('batch', '?')} × 512 tokens ("
         + " / ".join(str(r.get("position", "?")) for r in att_512) + ")",
         " / ".join(ratio(att.number(r, "speed_ratio", "lm[seq=512]")) for r in att_512) + " the speed",
         "[attention](docs/attention.md#speed)"],
        [f"tight-fisted DDP, {dist.get('world_size')} ranks, k = {dist.get('k')}: bytes sent per step / peak memory "
         "per rank",
         f"{ratio(dist.number(dist_rows[tight_ddp], 'bytes_vs_sync_every', 'rows[row=' + repr(tight_ddp) + ']'))} "
         f"DDP syncing every micro-batch / {ratio(dist.get('tight_over_standard_peak_memory'))} DDP",
         "[distributed](docs/distributed.md)"],
        ["rectified flow on moons, exact W2: 1-RF at 100 steps / 2-RF at 1 step / distilled",
         f"{rf.get('w2_table', '1rf', '100'):.3f} / {rf.get('w2_table', '2rf', '1'):.3f} / "
         f"{rf.get('w2_table', 'distill', '1'):.3f}", "[rectified flow](docs/rectified_flow.md)"],
    ]
    return (table(["measured", "result", "details, command, machine"], rows, "lrl")
            + "\n\nRead from `benchmarks/results/*.json` and `docs/results/**/*.json` by `python docs/build.py`.")


GENERATORS: dict[str, Callable[[], str]] = {
    f.__name__: f for f in (optimizer_step, optimizer_memory, low_precision, optimizer_monitor, load_lm, attention,
                            rerope, length_extrapolation, length_extrapolation_copy, diffusion_examples,
                            diffusion_samplers, rectified_flow, distributed, headline)
}


# ---------------------------------------------------------------------------------------------------- pages
def pages() -> list[Path]:
    found: list[Path] = []
    for pattern in PAGES:
        found += sorted(ROOT.glob(pattern))
    return found


def render(text: str, rel: str, cache: dict[str, str]) -> str:
    """``text`` with every generated block replaced by its generator's output."""
    def replace(match: re.Match[str]) -> str:
        name = match.group(2)
        if name not in GENERATORS:
            raise DocsBuildError(f"{rel}: unknown generated block {name!r} (known: {', '.join(GENERATORS)})")
        if name not in cache:
            cache[name] = GENERATORS[name]().rstrip() + "\n"
        return match.group(1) + cache[name] + match.group(4)

    begins = len(BEGIN.findall(text))
    if begins != len(BLOCK.findall(text)):
        raise DocsBuildError(f"{rel}: a '<!-- BEGIN generated: name -->' line has no matching "
                             "'<!-- END generated -->' line")
    return BLOCK.sub(replace, text)


def build(check: bool) -> list[str]:
    """Regenerate every page; returns the pages that changed (with ``check``: that would change)."""
    cache: dict[str, str] = {}
    updates: dict[Path, str] = {}
    for path in pages():  # render every page before writing any, so an error leaves all pages as they were
        old = path.read_text()
        new = render(old, path.relative_to(ROOT).as_posix(), cache)
        if new != old:
            updates[path] = new
    if not check:
        for path, new in updates.items():
            path.write_text(new)
    return [path.relative_to(ROOT).as_posix() for path in updates]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a page is out of date; write nothing")
    args = parser.parse_args(argv)
    try:
        changed = build(args.check)
    except DocsBuildError as exc:
        print(f"docs/build.py: error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if changed:
            print("out of date (run `python docs/build.py`): " + ", ".join(changed), file=sys.stderr)
            return 1
        print("docs up to date")
        return 0
    print("rewrote: " + (", ".join(changed) if changed else "nothing (already up to date)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
