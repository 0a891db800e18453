"""CharCorpusDataModule: deterministic leak-free split, evaluation windows, resumable training order."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from lightning_tiger.data.char_corpus import CharCorpusDataModule
from lightning_tiger.data.resumable import RandomWindowLoader


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run many times faster on one thread when the CPU is shared (no OpenMP spin-waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)



def _make_corpus(root: Path, n_files: int = 60, seed: int = 0, order: list[int] | None = None) -> dict[str, str]:
    """Files with unique markers and random contents, created in the given order. Returns relpath -> text."""
    rng = random.Random(seed)
    contents: dict[str, str] = {}
    for k in range(n_files):
        rel = f"pkg{k % 3}/mod_{k:03d}.py" if k % 2 else f"mod_{k:03d}.py"
        body = "".join(rng.choice("abcdefgh \n=()") for _ in range(rng.randint(300, 900)))
        contents[rel] = f"# FILE<{k:03d}>\n{body}\n"
    for k in order if order is not None else range(n_files):
        rel = list(contents)[k]
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(contents[rel])
    return contents


def _reference_heldout(relpaths: list[str], fraction: float) -> set[str]:
    """The documented rule, written out: first 8 bytes of sha256(path) as a fraction of 2**64."""
    out = set()
    for rel in relpaths:
        u = int(hashlib.sha256(rel.encode()).hexdigest()[:16], 16) / 2**64
        if u < fraction:
            out.add(rel)
    return out


def test_split_is_deterministic_follows_the_hash_rule_and_ignores_creation_order(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    order = list(range(60))
    contents = _make_corpus(a, order=order)
    random.Random(1).shuffle(order)
    _make_corpus(b, order=order)  # same files, created in another order
    dm_a = CharCorpusDataModule(str(a), seq_len=8, eval_lengths=(8, 16), val_fraction=0.2)
    dm_b = CharCorpusDataModule(str(b), seq_len=8, eval_lengths=(8, 16), val_fraction=0.2)
    dm_a.setup()
    dm_b.setup()
    expected = _reference_heldout(list(contents), 0.2)
    assert 0 < len(expected) < 60
    assert set(dm_a.val_files) == expected == set(dm_b.val_files)
    assert set(dm_a.train_files) == set(contents) - expected
    assert dm_a.train_files == dm_b.train_files  # same concatenation order
    assert torch.equal(dm_a.train_data, dm_b.train_data)

    # adding a file never moves another one
    (a / "zzz_new.py").write_text("# FILE<new>\nx = 1\n")
    dm_c = CharCorpusDataModule(str(a), seq_len=8, eval_lengths=(8, 16), val_fraction=0.2)
    dm_c.setup()
    assert set(dm_c.val_files) - {"zzz_new.py"} == expected


def test_no_heldout_file_reaches_training_and_eval_text_is_heldout(tmp_path: Path) -> None:
    contents = _make_corpus(tmp_path)
    dm = CharCorpusDataModule(
        str(tmp_path), seq_len=8, eval_lengths=(8, 32), val_fraction=0.2, num_eval_windows=16, repeated=True
    )
    dm.setup()
    train_text = dm.decode(dm.train_data)
    val_text = dm.decode(dm.val_data)
    assert len(train_text) == sum(len(contents[f]) for f in dm.train_files)
    for rel, text in contents.items():
        marker = text.split("\n", 1)[0]
        if rel in dm.val_files:
            assert marker not in train_text and marker in val_text
        else:
            assert marker in train_text and marker not in val_text
    # training windows are drawn from the training text only
    loader = dm.train_dataloader()
    for batch in list(loader)[:5]:
        for row in batch:
            assert dm.decode(row) in train_text
    # every evaluation window is held-out text (the repeated ones: their 2L period is)
    for name in dm.val_names:
        rows = dm.val_windows(name)
        for row in rows:
            piece = row if not name.endswith("_rep") else row[: 2 * dm.seq_len]
            assert dm.decode(piece) in val_text


def test_nonrepeated_windows_are_evenly_spaced_prefix_consistent_and_sized(tmp_path: Path) -> None:
    _make_corpus(tmp_path)
    dm = CharCorpusDataModule(
        str(tmp_path), seq_len=8, eval_lengths=(8, 16, 64), val_fraction=0.3, num_eval_windows=5, repeated=False
    )
    dm.setup()
    assert dm.val_names == ["8", "16", "64"]
    n = dm.val_data.numel()
    for t in (8, 16, 64):
        rows = dm.val_windows(str(t))
        assert rows.shape == (5, t + 1) and rows.dtype == torch.long
        for k in range(5):
            start = (k * (n - (t + 1))) // 4  # evenly spaced over [0, n - window]
            assert torch.equal(rows[k], dm.val_data[start : start + t + 1].long())
    # (first row starts at 0 for every length, so the short window is the prefix of the long one)
    assert torch.equal(dm.val_windows("64")[0, :9], dm.val_windows("8")[0])


def test_repeated_windows_tile_one_heldout_segment_of_length_2L(tmp_path: Path) -> None:
    _make_corpus(tmp_path)
    seq_len = 8
    dm = CharCorpusDataModule(
        str(tmp_path),
        seq_len=seq_len,
        eval_lengths=(8, 16, 32, 100),
        val_fraction=0.3,
        num_eval_windows=6,
        repeated=True,
    )
    dm.setup()
    # no repeated loader at T <= 2L: such a window holds no repetition
    assert dm.val_names == ["8", "16", "32", "100", "32_rep", "100_rep"]
    val = dm.val_data.long()
    for t in (32, 100):
        rows = dm.val_windows(f"{t}_rep")
        assert rows.shape == (6, t + 1)
        for row in rows:
            period = row[: 2 * seq_len]
            # the period is a contiguous held-out segment...
            hits = [s for s in range(val.numel() - 2 * seq_len + 1) if torch.equal(val[s : s + 2 * seq_len], period)]
            assert hits
            # ...and the window repeats it exactly: row[i] == period[i mod 2L]
            for i in range(t + 1):
                assert row[i] == period[i % (2 * seq_len)]
    # the dataloaders deliver those rows, in order, one loader per name
    loaders = dm.val_dataloader()
    assert len(loaders) == len(dm.val_names)
    got = torch.cat(list(loaders[dm.val_names.index("100_rep")]))
    assert torch.equal(got, dm.val_windows("100_rep"))


def test_max_chars_caps_training_text_and_single_file_source(tmp_path: Path) -> None:
    _make_corpus(tmp_path)
    dm = CharCorpusDataModule(str(tmp_path), seq_len=8, eval_lengths=(8,), max_chars=1234, val_fraction=0.2)
    dm.setup()
    assert dm.train_data.numel() == 1234
    single = tmp_path / "one.txt"
    single.write_text("".join(chr(97 + (i * 7) % 26) for i in range(1000)))
    dm1 = CharCorpusDataModule(str(single), seq_len=8, eval_lengths=(8, 16), val_fraction=0.1, num_eval_windows=3)
    dm1.setup()
    text = single.read_text()
    assert dm1.decode(dm1.train_data) == text[:900]
    assert dm1.decode(dm1.val_data) == text[900:]


def test_chars_vocab_has_unk_for_unseen_characters(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("abcabc" * 50)
    (tmp_path / "b.py").write_text("abcxyz" * 50)
    (tmp_path / "c.py").write_text("aabbcc" * 50)
    # pick the split by the documented rule so the test knows which file is held out
    fraction = 0.5
    held = _reference_heldout(["a.py", "b.py", "c.py"], fraction)
    dm = CharCorpusDataModule(
        str(tmp_path), seq_len=4, eval_lengths=(4,), val_fraction=fraction, vocab="chars", num_eval_windows=2
    )
    dm.setup()
    train_chars = (
        set("".join((tmp_path / f).read_text() for f in ["a.py", "b.py", "c.py"] if f not in held))
        if held and len(held) < 3
        else None
    )
    assert dm.itos is not None and dm.itos[0] == "<unk>"
    if train_chars is not None:
        assert dm.itos[1:] == sorted(train_chars)
        assert dm.vocab_size == 1 + len(train_chars)
    ids = dm.encode("ab\u2603")
    assert ids[-1].item() == 0  # unseen -> <unk>
    assert dm.decode(ids[:2]) == "ab"
    assert CharCorpusDataModule(vocab="bytes").vocab_size == 256


def test_default_source_is_the_stdlib_without_tests_or_installed_packages() -> None:
    dm = CharCorpusDataModule(max_chars=100_000, num_eval_windows=4)
    dm.setup()
    files = dm.train_files + dm.val_files
    assert len(files) > 300 and all(f.endswith(".py") for f in files)
    for f in files:
        parts = f.split("/")[:-1]
        assert not {"site-packages", "dist-packages", "test", "tests", "idle_test"} & set(parts)
    assert "os.py" in files and not set(dm.train_files) & set(dm.val_files)
    assert dm.train_data.numel() == 100_000
    assert dm.val_data.numel() > 16 * 64 * 4


def test_training_loader_is_deterministic_by_seed_epoch_and_index() -> None:
    data = torch.arange(10_000) % 251  # value encodes position: windows must be consecutive runs
    a = RandomWindowLoader(data, seq_len=16, batch_size=4, batches_per_epoch=3, seed=7)
    b = RandomWindowLoader(data, seq_len=16, batch_size=4, batches_per_epoch=3, seed=7)
    c = RandomWindowLoader(data, seq_len=16, batch_size=4, batches_per_epoch=3, seed=8)
    epochs_a = [torch.stack(list(a)) for _ in range(2)]
    epochs_b = [torch.stack(list(b)) for _ in range(2)]
    assert len(epochs_a[0]) == 3 and epochs_a[0].shape == (3, 4, 17)
    assert torch.equal(epochs_a[0], epochs_b[0]) and torch.equal(epochs_a[1], epochs_b[1])
    assert not torch.equal(epochs_a[0], epochs_a[1])  # a new epoch draws new windows
    assert not torch.equal(torch.stack(list(c)), epochs_a[0])
    for row in epochs_a[0].reshape(-1, 17):
        assert torch.equal((row - row[0]) % 251, torch.arange(17) % 251)
    # iter() alone has no side effect (Lightning calls it once to check the object is iterable)
    d = RandomWindowLoader(data, seq_len=16, batch_size=4, batches_per_epoch=3, seed=7)
    iter(d)
    assert torch.equal(torch.stack(list(d)), epochs_a[0])


def _period(row: torch.Tensor) -> int | None:
    """The smallest P < len(row) with row[j] == row[j - P] for every j >= P (None: not periodic)."""
    for p in range(1, len(row)):
        if torch.equal(row[p:], row[:-p]):
            return p
    return None


def test_repeat_fraction_tiles_a_contiguous_segment_with_a_period_in_range() -> None:
    data = torch.arange(50_000)  # distinct values: a window is periodic only if it was tiled
    L = 64
    natural = RandomWindowLoader(data, seq_len=L, batch_size=400, batches_per_epoch=2, seed=5)
    tiled = RandomWindowLoader(data, seq_len=L, batch_size=400, batches_per_epoch=2, seed=5, repeat_fraction=1.0)
    some = RandomWindowLoader(data, seq_len=L, batch_size=400, batches_per_epoch=2, seed=5, repeat_fraction=0.3)
    nat, til, mix = natural.batch(0, 1), tiled.batch(0, 1), some.batch(0, 1)
    # the starts are drawn first, from the same generator: every window begins where the natural one does
    assert torch.equal(til[:, 0], nat[:, 0]) and torch.equal(mix[:, 0], nat[:, 0])
    periods = [_period(row) for row in til]
    assert all(p is not None and L // 8 <= p <= L // 2 for p in periods), periods
    for row, p in zip(til, periods):
        assert torch.equal(row[:p], torch.arange(int(row[0]), int(row[0]) + p))  # one contiguous segment
    assert len(set(periods)) > 20  # periods are drawn per window, over the whole range
    # a window of the mix is either the natural one or periodic; about 30% are periodic (5 standard errors)
    is_tiled = torch.tensor([not torch.equal(m, n) for m, n in zip(mix, nat)])
    for row, t in zip(mix, is_tiled):
        assert (_period(row) is not None) == bool(t)
    se = (0.3 * 0.7 / len(mix)) ** 0.5
    assert abs(is_tiled.float().mean().item() - 0.3) < 5 * se
    assert torch.equal(some.batch(0, 1), mix)  # still a pure function of (seed, rank, epoch, index)


def test_repeat_noise_tiles_independent_characters_in_the_asked_share_of_tiled_windows() -> None:
    data = torch.arange(50_000)
    L = 64
    tiled = RandomWindowLoader(data, seq_len=L, batch_size=400, batches_per_epoch=2, seed=5, repeat_fraction=1.0)
    noisy = RandomWindowLoader(data, seq_len=L, batch_size=400, batches_per_epoch=2, seed=5, repeat_fraction=1.0,
                               repeat_noise=0.5)
    til, noi = tiled.batch(1, 0), noisy.batch(1, 0)
    is_noise = torch.tensor([not torch.equal(a, b) for a, b in zip(noi, til)])
    for row, ref, noise in zip(noi, til, is_noise):
        p = _period(row)
        assert p is not None and L // 8 <= p <= L // 2  # every window is still tiled, period in range
        if noise:  # the segment is scattered characters of the data, not one contiguous span
            assert p == _period(ref) and not torch.equal(row[1:p] - row[: p - 1], torch.ones(p - 1, dtype=row.dtype))
    se = (0.25 / len(noi)) ** 0.5
    assert abs(is_noise.float().mean().item() - 0.5) < 5 * se


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_repeat_fraction_out_of_range_is_refused(bad: float) -> None:
    for name in ("repeat_fraction", "repeat_noise"):
        with pytest.raises(ValueError, match=name):
            RandomWindowLoader(torch.arange(100), seq_len=8, batch_size=2, batches_per_epoch=1, seed=0,
                               **{name: bad})
        with pytest.raises(ValueError, match=name):
            CharCorpusDataModule(**{name: bad})


def test_training_loader_state_resumes_mid_epoch_exactly() -> None:
    data = torch.arange(5_000)
    ref = RandomWindowLoader(data, seq_len=8, batch_size=2, batches_per_epoch=4, seed=3)
    reference = [batch for _ in range(3) for batch in ref]  # 3 epochs, 12 batches
    run = RandomWindowLoader(data, seq_len=8, batch_size=2, batches_per_epoch=4, seed=3)
    seen = list(run)  # epoch 0
    it = iter(run)
    seen += [next(it), next(it)]  # 2 batches into epoch 1, then "checkpoint"
    state = run.state_dict()
    resumed = RandomWindowLoader(data, seq_len=8, batch_size=2, batches_per_epoch=4, seed=3)
    resumed.load_state_dict(state)
    seen += list(resumed) + list(resumed)
    assert len(seen) == 12
    for got, want in zip(seen, reference):
        assert torch.equal(got, want)


class _Recorder(L.LightningModule):
    """Tiny module that records a fingerprint of every training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(1, 1)
        self.seen: list[int] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.seen.append(int(batch[:, 0].sum()))
        return self.layer(batch[:, :1].float()).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(tmp_path: Path, corpus: Path, max_steps: int, ckpt: str | None = None, every: int | None = None) -> list[int]:
    from lightning.pytorch.callbacks import ModelCheckpoint

    dm = CharCorpusDataModule(
        str(corpus), seq_len=8, eval_lengths=(8,), batch_size=4, batches_per_epoch=5, num_eval_windows=2
    )
    module = _Recorder()
    callbacks = [ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_top_k=-1)] if every else []
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        enable_checkpointing=bool(every),
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    return module.seen


def test_lightning_resume_mid_epoch_sees_the_uninterrupted_batches(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _make_corpus(corpus, n_files=10)
    reference = _fit(tmp_path / "ref", corpus, max_steps=13)
    first = _fit(tmp_path / "run", corpus, max_steps=7, every=7)  # stops mid epoch 1 (5 batches per epoch)
    ckpts = sorted((tmp_path / "run" / "ckpt").glob("*.ckpt"))
    assert ckpts
    rest = _fit(tmp_path / "run2", corpus, max_steps=13, ckpt=str(ckpts[-1]))
    assert len(reference) == 13
    assert first + rest == reference


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"seq_len": 0}, "seq_len"),
        ({"eval_lengths": ()}, "eval_lengths"),
        ({"eval_lengths": (64, 64)}, "eval_lengths"),
        ({"vocab": "words"}, "vocab"),
        ({"max_chars": 3}, "max_chars"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_arguments_raise_naming_the_parameter(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CharCorpusDataModule(**kwargs)


def test_missing_source_and_too_short_heldout_text_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="source"):
        CharCorpusDataModule(str(tmp_path / "nope")).setup()
    (tmp_path / "a.py").write_text("x" * 100)
    (tmp_path / "b.py").write_text("y" * 100)
    with pytest.raises(ValueError, match="eval_lengths"):
        CharCorpusDataModule(str(tmp_path), seq_len=8, eval_lengths=(8, 1000)).setup()
