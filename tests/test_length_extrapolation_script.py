"""examples/length_extrapolation.py: the row configs and a tiny end-to-end run of the script."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from omegaconf import OmegaConf

from lightning_tiger.cli import register_resolvers

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "examples" / "configs" / "lm"
ROWS = ["rope", "rope_logn", "rope_window", "rope_window_logn", "alibi", "rope_random_pos", "nope", "hwfa",
        "rope_ntk", "rope_pi", "rerope_w", "rerope_w_logn", "leaky_rerope", "kerple_log", "sandwich", "xpos"]
# What each row may change relative to rope.yaml (model.init_args keys; "model.<k>" = TransformerLM argument).
ALLOWED = {
    "rope": set(),
    "rope_logn": {"model.logn", "model.logn_base"},
    "rope_window": {"eval_options"},
    "rope_window_logn": {"model.logn", "model.logn_base", "eval_options"},
    "alibi": {"model.position"},
    "rope_random_pos": {"train_positions"},  # max_position: null = the longest test length
    "nope": {"model.position"},
    "hwfa": {"model.window", "model.logn_base", "model.layer_overrides"},
    "rope_ntk": {"eval_options"},
    "rope_pi": {"eval_options"},
    "rerope_w": {"eval_options"},
    "rerope_w_logn": {"model.logn", "model.logn_base", "eval_options"},
    "leaky_rerope": {"eval_options"},
    "kerple_log": {"model.position"},
    "sandwich": {"model.position"},
    "xpos": {"model.position"},
}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _resolvers() -> None:
    register_resolvers()  # the row files compute w = L/2 and HWFA's window L/4 with ${int:${mul:...}}


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("length_extrapolation", REPO / "examples" / "length_extrapolation.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["length_extrapolation"] = module
    spec.loader.exec_module(module)
    return module


def _flat(init_args: dict) -> dict:
    out = {k: v for k, v in init_args.items() if k != "model"}
    out.update({f"model.{k}": v for k, v in init_args.get("model", {}).items()})
    return out


def test_row_configs_exist_and_differ_from_the_baseline_only_where_documented() -> None:
    assert {p.stem for p in CONFIG_DIR.glob("*.yaml")} == set(ROWS)
    base = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "rope.yaml"), resolve=True)
    for row in ROWS:
        cfg = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / f"{row}.yaml"), resolve=True)
        assert cfg["data"] == base["data"], row
        assert cfg["model"]["class_path"] == "lightning_tiger.modules.CausalLMModule"
        a, b = _flat(base["model"]["init_args"]), _flat(cfg["model"]["init_args"])
        changed = {k for k in set(a) | set(b) if a.get(k) != b.get(k)}
        assert changed == ALLOWED[row], (row, changed)
    # the windows at inference equal the training length, and log n's base is the training length
    seq_len = base["data"]["init_args"]["seq_len"]
    window = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "rope_window.yaml"), resolve=True)
    assert window["model"]["init_args"]["eval_options"] == {"window": seq_len}
    # ReRoPE rows: w = L/2 (the notes' w = 256 at L = 512); Leaky keeps every relative position < L up to 16L
    for row in ("rerope_w", "rerope_w_logn", "leaky_rerope"):
        opts = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / f"{row}.yaml"), resolve=True)
        assert opts["model"]["init_args"]["eval_options"]["rerope_window"] == seq_len // 2, row
    leak = OmegaConf.load(CONFIG_DIR / "leaky_rerope.yaml").model.init_args.eval_options.rerope_leak
    assert seq_len // 2 + (16 * seq_len - 1 - seq_len // 2) / leak < seq_len
    # ... and they follow the training length when it is overridden (the second scale sets seq_len only)
    script = _script()
    for L in (128, 512):
        at = {row: script.load_row_config(CONFIG_DIR / f"{row}.yaml", [f"data.init_args.seq_len={L}"])[0]["model"]
              ["init_args"] for row in ("rerope_w", "rerope_w_logn", "leaky_rerope", "hwfa", "rope_window")}
        assert all(at[r]["eval_options"]["rerope_window"] == L // 2 for r in ("rerope_w", "rerope_w_logn",
                                                                             "leaky_rerope"))
        assert at["hwfa"]["model"]["window"] == L // 4 and at["hwfa"]["model"]["logn_base"] == L
        assert at["rope_window"]["eval_options"]["window"] == L


def test_rows_that_differ_only_in_eval_options_share_one_training_run() -> None:
    script = _script()
    keys = {row: script.training_key(script.load_row_config(CONFIG_DIR / f"{row}.yaml", [])[0], 100) for row in ROWS}
    assert keys["rope"] == keys["rope_window"] == keys["rope_ntk"] == keys["rope_pi"] == keys["rerope_w"]
    assert keys["rope"] == keys["leaky_rerope"]
    assert keys["rope_logn"] == keys["rope_window_logn"] == keys["rerope_w_logn"]
    trained = ("rope", "rope_logn", "alibi", "rope_random_pos", "nope", "hwfa", "kerple_log", "sandwich", "xpos")
    assert len({keys[r] for r in trained}) == len(trained)
    seeded = script.load_row_config(CONFIG_DIR / "rope.yaml", ["seed_everything=1"])[0]
    assert script.training_key(seeded, 100) != keys["rope"]
    assert script.training_key(script.load_row_config(CONFIG_DIR / "rope.yaml", [])[0], 101) != keys["rope"]


@pytest.mark.parametrize("rows", [pytest.param(["rope", "hwfa"]), pytest.param(ROWS, marks=pytest.mark.slow)])
def test_every_row_instantiates_through_lightningcli(rows: list[str]) -> None:
    script = _script()
    for row in rows:
        cfg, label = script.load_row_config(CONFIG_DIR / f"{row}.yaml", ["model.init_args.model.dim=32"])
        module, datamodule = script.instantiate(cfg)
        assert label and not label.startswith(row + ".yaml")
        assert datamodule.seq_len == 64 and module.model.dim == 32
    hwfa, _ = script.instantiate(script.load_row_config(CONFIG_DIR / "hwfa.yaml", [])[0])
    attns = [b.attn for b in hwfa.model.blocks]
    assert [a.position for a in attns] == ["rope", "rope", "rope", "none"]
    assert [a.window for a in attns] == [16, 16, 16, None] and attns[-1].logn == "trained"
    # ReRoPE is an evaluation option: on during validation, off again afterwards
    rr, _ = script.instantiate(script.load_row_config(CONFIG_DIR / "rerope_w_logn.yaml", [])[0])
    rr._apply_eval_options(512)
    assert [b.attn.rerope_window for b in rr.model.blocks] == [32] * 4
    rr._restore_options()
    assert [b.attn.rerope_window for b in rr.model.blocks] == [None] * 4
    assert [b.attn.logn for b in rr.model.blocks] == ["trained"] * 4


def _corpus(root: Path) -> Path:
    rng = random.Random(0)
    words = ["def ", "self", "return ", "import ", "class ", "yield ", "None", "pass\n"]
    root.mkdir(parents=True)
    for k in range(16):
        (root / f"f{k:02d}.py").write_text("".join(rng.choice(words) for _ in range(800)))
    return root


def test_tiny_run_writes_table_json_plot_and_skips_finished_rows(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    script = _script()
    corpus = _corpus(tmp_path / "corpus")
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--quick", "--rows", "rope,rope_window,rerope_w,alibi", "--seeds", "0", "1", "--multi-seed-rows", "rope",
            "--steps", "3", "--out", str(out), "--work-dir", str(work), "--no-progress",
            "--set", f"data.init_args.source={corpus}", "--set", "data.init_args.seq_len=16",
            "--set", "data.init_args.eval_lengths=[16,32,64,128,256]", "--set", "data.init_args.val_fraction=0.3"]
    summary = script.main(argv)
    assert set(summary) == {"rope", "rope_window", "rerope_w", "alibi"}
    assert summary["rope"]["seeds"] == [0, 1] and summary["alibi"]["seeds"] == [0]
    # rope, rope_window and rerope_w share their training runs: 2 seeds of rope + 1 alibi = 3 runs
    assert len(list((work / "train").iterdir())) == 3
    for name in ("table.md", "results.json", "accuracy_vs_length.png"):
        assert (out / name).stat().st_size > 0
    table = (out / "table.md").read_text()
    assert "| method | seeds | 16 (train) | 128 repeated | 128 non-repeated |" in table
    data = json.loads((out / "results.json").read_text())
    acc = data["rows"]["rope"]["acc"]
    assert set(acc) == {"16", "32", "64", "128", "256", "64_rep", "128_rep", "256_rep"}
    # the window equals L, so at the training length window and baseline see the same keys
    assert data["rows"]["rope_window"]["acc"]["16"]["values"] == pytest.approx(acc["16"]["values"][:1])
    # ReRoPE's w = 32 >= every relative position of a 16- or 32-character window: exactly RoPE there
    rerope = data["rows"]["rerope_w"]["acc"]
    assert [rerope[t]["values"] for t in ("16", "32")] == [acc[t]["values"][:1] for t in ("16", "32")]
    info = json.loads(next((work / "train").iterdir()).joinpath("train_info.json").read_text())
    assert info["steps"] == 3
    # a second invocation trains nothing and reproduces the table
    capsys.readouterr()
    again = script.main(argv)
    logs = capsys.readouterr().out
    assert "[train]" not in logs and logs.count("[skip]") == 5
    assert again["rope"]["acc"] == summary["rope"]["acc"]


def test_training_resumes_from_the_last_checkpoint(tmp_path: Path) -> None:
    script = _script()
    corpus = _corpus(tmp_path / "corpus")
    cfg, _ = script.load_row_config(
        CONFIG_DIR / "rope.yaml",
        [*script.QUICK_OVERRIDES, f"data.init_args.source={corpus}", "data.init_args.seq_len=16",
         "data.init_args.eval_lengths=[16]"],
    )
    train_dir = tmp_path / "train"
    # an interrupted run: 2 of 4 steps, checkpoint written as the script writes them
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    module, dm = script.instantiate(cfg)
    ckpt = ModelCheckpoint(dirpath=train_dir, every_n_train_steps=2, save_last=True)
    L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              limit_val_batches=0, callbacks=[ckpt]).fit(module, datamodule=dm)
    assert (train_dir / "last.ckpt").exists()
    final = script.train_row(cfg, train_dir, steps=4, ckpt_every=2, progress=False)
    info = json.loads((train_dir / "train_info.json").read_text())
    assert info["resumed_from_step"] == 2 and info["steps"] == 4
    assert final.exists() and [p.name for p in train_dir.glob("*.ckpt")] == ["final.ckpt"]


@pytest.mark.slow
@pytest.mark.parametrize("row", ROWS)
def test_row_config_runs_with_the_lightning_tiger_cli(tmp_path: Path, row: str) -> None:
    """``lightning-tiger fit --config lm/<row>.yaml --config optim/tiger.yaml --config trainer/smoke.yaml``."""
    from lightning_tiger.cli import main

    corpus = _corpus(tmp_path / "corpus")
    cli = main([
        "fit", "--config", str(CONFIG_DIR / f"{row}.yaml"),
        "--config", str(REPO / "examples" / "configs" / "optim" / "tiger.yaml"),
        "--config", str(REPO / "examples" / "configs" / "trainer" / "smoke.yaml"),
        f"--data.init_args.source={corpus}", "--data.init_args.seq_len=16", "--data.init_args.val_fraction=0.3",
        "--data.init_args.eval_lengths=[16,32,64,128,256]", "--model.init_args.model.dim=32",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
        # 20 steps: optim/tiger.yaml puts its warm-up knot at 5% of max_steps, which must not round to 0
        "--trainer.max_steps=20", "--trainer.val_check_interval=20",
    ])
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 20
    assert {"val/acc@16", "val/acc@128", "val/acc@128_rep", "val/bpc@256"} <= set(metrics)
