"""CausalLMModule: metrics on the right tokens at every length, evaluation-time options, random positions,
and a tiny model that learns."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_tiger.data.char_corpus import CharCorpusDataModule
from lightning_tiger.modules.causal_lm import CausalLMModule
from lightning_tiger.nn import TransformerLM
from lightning_tiger.optim import Tiger

_WORDS = ["def ", "self", "return ", "import ", "class ", "lambda ", "yield ", "None", "True", "pass\n"]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run many times faster on one thread when the CPU is shared (no OpenMP spin-waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _corpus(root: Path, n_files: int = 12, chars: int = 3000, seed: int = 0) -> Path:
    """Files of random 'words' from a small dictionary: high unigram entropy, predictable inside a word."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for k in range(n_files):
        text = []
        while sum(map(len, text)) < chars:
            text.append(rng.choice(_WORDS))
        (root / f"f{k:02d}.py").write_text("".join(text))
    return root


def _trainer(tmp_path: Path, **kwargs: Any) -> L.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


class _CopyModel(nn.Module):
    """Predicts 'the next token equals the current one' with logit 5 (others 0)."""

    def __init__(self, vocab: int = 256) -> None:
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, tokens: Tensor, positions: Tensor | None = None) -> Tensor:
        return 5.0 * F.one_hot(tokens, self.vocab).float() + 0.0 * self.dummy


def _reference_metrics(windows: Tensor, last_n: int | None, vocab: int = 256) -> tuple[float, float]:
    """Accuracy and mean NLL of the copy model, by explicit loops over windows and scored positions."""
    log_z = math.log(math.exp(5.0) + vocab - 1)
    correct = total = 0
    nll = 0.0
    for row in windows.tolist():
        t_len = len(row) - 1
        first = 0 if last_n is None else max(0, t_len - last_n)
        for t in range(first, t_len):
            hit = row[t + 1] == row[t]
            correct += hit
            nll += log_z - (5.0 if hit else 0.0)
            total += 1
    return correct / total, nll / total


@pytest.mark.parametrize("last_n", [None, 5])
def test_metrics_per_length_are_token_averages_over_the_scored_positions(tmp_path: Path, last_n: int | None) -> None:
    dm = CharCorpusDataModule(
        str(_corpus(tmp_path / "c")),
        seq_len=8,
        eval_lengths=(8, 16, 40),
        val_fraction=0.3,
        num_eval_windows=7,
        eval_tokens_per_batch=48,
    )  # uneven last batches
    module = CausalLMModule(_CopyModel(), metric_last_n=last_n)
    trainer = _trainer(tmp_path)
    trainer.validate(module, datamodule=dm, verbose=False)
    metrics = trainer.callback_metrics
    assert dm.val_names == ["8", "16", "40", "40_rep"]
    for name in dm.val_names:
        acc, loss = _reference_metrics(dm.val_windows(name), last_n)
        assert metrics[f"val/acc@{name}"].item() == pytest.approx(acc, abs=1e-6)
        assert metrics[f"val/loss@{name}"].item() == pytest.approx(loss, rel=1e-5)
        assert metrics[f"val/bpc@{name}"].item() == pytest.approx(loss / math.log(2), rel=1e-5)
    assert metrics["val/loss"].item() == pytest.approx(metrics["val/loss@8"].item())
    # the repeated windows really differ from the natural ones in what a copier sees
    assert metrics["val/acc@40_rep"].item() != metrics["val/acc@40"].item()


def _explicit_accuracy(model: nn.Module, windows: Tensor) -> float:
    with torch.no_grad():
        logits = model(windows[:, :-1])
    return (logits.argmax(-1) == windows[:, 1:]).float().mean().item()


def test_eval_options_switch_at_evaluation_and_restore_training_options(tmp_path: Path) -> None:
    dm = CharCorpusDataModule(
        str(_corpus(tmp_path / "c")),
        seq_len=8,
        eval_lengths=(8, 32),
        val_fraction=0.3,
        num_eval_windows=6,
        repeated=False,
    )
    config = dict(vocab_size=256, dim=32, depth=2, num_heads=2)
    module = CausalLMModule(model=config, eval_options={"window": 4, "logn": "posthoc", "logn_base": "auto"})
    trainer = _trainer(tmp_path)
    trainer.validate(module, datamodule=dm, verbose=False)
    # the reference: the same weights in a model *built* with those options
    reference = TransformerLM(**config, window=4, logn="posthoc", logn_base=8).eval()
    reference.load_state_dict(module.model.state_dict())
    for name in ("8", "32"):
        want = _explicit_accuracy(reference, dm.val_windows(name))
        assert trainer.callback_metrics[f"val/acc@{name}"].item() == pytest.approx(want, abs=1e-6)
    # and the training options are back
    for block in module.model.blocks:
        assert block.attn.window is None and block.attn.logn == "none"
    plain = TransformerLM(**config).eval()
    plain.load_state_dict(module.model.state_dict())
    x = dm.val_windows("32")[:, :-1]
    module.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(module.model(x), plain(x))


def test_auto_ntk_factor_follows_the_test_length(tmp_path: Path) -> None:
    dm = CharCorpusDataModule(
        str(_corpus(tmp_path / "c")),
        seq_len=8,
        eval_lengths=(8, 16, 32),
        val_fraction=0.3,
        num_eval_windows=2,
        repeated=False,
    )
    module = CausalLMModule(
        model=dict(dim=32, depth=1, num_heads=2), eval_options={"rope_scaling": {"type": "ntk", "factor": "auto"}}
    )
    seen: dict[int, Any] = {}
    rotary = module.model.blocks[0].attn.rotary

    def spy(mod: nn.Module, args: tuple) -> None:
        scaling = rotary.scaling
        seen[args[0].shape[1]] = None if scaling is None else scaling["factor"]

    module.model.register_forward_pre_hook(spy)
    _trainer(tmp_path).validate(module, datamodule=dm, verbose=False)
    assert seen[8] is None  # T <= L: plain RoPE
    assert seen[16] == pytest.approx(2.0) and seen[32] == pytest.approx(4.0)
    assert rotary.scaling is None  # restored


class _PositionSpy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Embedding(256, 256)
        self.positions: list[Tensor | None] = []

    def forward(self, tokens: Tensor, positions: Tensor | None = None) -> Tensor:
        self.positions.append(None if positions is None else positions.clone())
        return self.linear(tokens)


@pytest.mark.parametrize("kind", ["contiguous", "random_int", "random_float"])
def test_training_positions(tmp_path: Path, kind: str) -> None:
    dm = CharCorpusDataModule(
        str(_corpus(tmp_path / "c")),
        seq_len=8,
        eval_lengths=(8, 64),
        val_fraction=0.3,
        num_eval_windows=2,
        batch_size=3,
    )
    spy = _PositionSpy()
    module = CausalLMModule(spy, train_positions=kind, optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    _trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(module, datamodule=dm)
    assert len(spy.positions) == 3
    if kind == "contiguous":
        assert all(p is None for p in spy.positions)
        return
    for p in spy.positions:
        assert p is not None and p.shape == (3, 8)
        assert (p[:, 1:] > p[:, :-1]).all() and (p >= 0).all() and (p <= 63).all()  # max_position = 64
        if kind == "random_int":
            assert p.dtype == torch.int64 and len({tuple(r) for r in p.tolist()}) == 3
        else:
            assert p.dtype.is_floating_point
    assert not torch.equal(spy.positions[0], spy.positions[1])
    # a second run draws the same positions step by step (resumable)
    spy2 = _PositionSpy()
    module2 = CausalLMModule(spy2, train_positions=kind, optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    _trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(module2, datamodule=dm)
    for a, b in zip(spy.positions, spy2.positions):
        assert torch.equal(a, b)


def _unigram_entropy_nats(data: Tensor) -> float:
    counts: dict[int, int] = {}
    for v in data.tolist():
        counts[v] = counts.get(v, 0) + 1
    n = sum(counts.values())
    return -sum(c / n * math.log(c / n) for c in counts.values())


def test_tiny_model_learns_well_below_the_unigram_entropy(tmp_path: Path) -> None:
    dm = CharCorpusDataModule(
        str(_corpus(tmp_path / "c", n_files=20)),
        seq_len=32,
        eval_lengths=(32,),
        val_fraction=0.2,
        num_eval_windows=16,
        repeated=False,
        batch_size=16,
    )
    dm.setup()
    unigram = _unigram_entropy_nats(dm.val_data)
    module = CausalLMModule(model=dict(dim=32, depth=1, num_heads=2), optimizer=partial(Tiger, lr=5e-2), warmup_steps=5)
    trainer = _trainer(tmp_path, max_steps=150, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    result = _trainer(tmp_path).validate(module, datamodule=dm, verbose=False)[0]
    assert unigram > 2.0  # the dictionary makes characters far from uniform but still uncertain
    assert result["val/loss@32"] < unigram - 1.0, (result, unigram)
    assert result["val/acc@32"] > 0.5


def test_optimizer_callable_with_the_default_warmup_then_linear_decay(tmp_path: Path) -> None:
    module = CausalLMModule(model=dict(dim=16, depth=1, num_heads=2), optimizer=partial(Tiger, lr=1e-2),
                            warmup_steps=10)
    module.trainer = L.Trainer(max_steps=110, logger=False, default_root_dir=tmp_path)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, Tiger) and config["lr_scheduler"]["interval"] == "step"
    kinds = {g.get("kind") for g in optimizer.param_groups}
    assert {"matrix", "embedding", "norm_scale"} <= {str(getattr(k, "value", k)) for k in kinds}
    lrs = []
    for _ in range(130):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [1e-2 * (s / 10 if s <= 10 else max(0.1, 1 - 0.9 * (s - 10) / 100)) for s in range(130)]
    assert lrs == pytest.approx(expected, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"train_positions": "shuffled"}, "train_positions"),
        ({"metric_last_n": 0}, "metric_last_n"),
        ({"eval_options": {"widow": 3}}, "eval_options"),
    ],
)
def test_bad_arguments_raise_naming_the_parameter(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CausalLMModule(model=dict(dim=16, depth=1, num_heads=2), **kwargs)


def test_model_type_is_checked() -> None:
    with pytest.raises(TypeError, match="model"):
        CausalLMModule(model="rope")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="set_attention_options"):
        CausalLMModule(_CopyModel(), eval_options={"window": 4})


def test_checkpoint_roundtrip_rebuilds_the_model_from_hparams(tmp_path: Path) -> None:
    module = CausalLMModule(model=dict(dim=16, depth=1, num_heads=2, position="alibi"), eval_options={"window": 8})
    path = tmp_path / "m.ckpt"
    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0)
    dm = CharCorpusDataModule(
        str(_corpus(tmp_path / "c")), seq_len=8, eval_lengths=(8,), val_fraction=0.3, num_eval_windows=2
    )
    trainer.fit(module, datamodule=dm)
    trainer.save_checkpoint(path)
    loaded = CausalLMModule.load_from_checkpoint(path)
    assert loaded.model.blocks[0].attn.position == "alibi" and loaded.eval_options == {"window": 8}
    for (k, a), (_, b) in zip(module.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
