"""A character-level corpus that every machine has: CPython's own standard-library sources.

The length-extrapolation protocol of Su's "Transformer升级之路" experiments (kexue.fm/archives/9603, 9708), mirrored on
CPU: train a causal LM on random windows of length ``L`` from the training files, then measure next-character
accuracy on windows of length ``L, 2L, … 16L`` cut from *held-out files only* ("non-repeated"), and on windows that
tile one held-out segment of length ``2L`` up to the test length ("repeated": only a model that keeps dependencies
further than ``2L`` back can copy it).

Data pipeline, in order:

1. Files: every file under ``source`` whose name matches ``glob`` (``*.py``), walking the tree without
   following symlinks and skipping directories named in ``exclude`` (``site-packages``, ``dist-packages``,
   ``test``, ``tests``, ``idle_test``, ``__pycache__`` and ``pydoc_data`` by default, so the default corpus
   is the ≈11 MB of non-test stdlib code and never a user's installed packages; ``pydoc_data/topics.py`` is
   one generated 757 KB string of English help text that would otherwise be 60% of the held-out text).
2. Split: a file is held out iff ``sha256(relative POSIX path) / 2**256 < val_fraction``. The decision depends
   on the path only (never on file-system order, the machine or the other files), so the same file lands in
   the same split everywhere, and adding a file never moves another. At least one file goes to each side.
   A single-file ``source`` cannot be split by file: its last ``val_fraction`` of characters is held out.
3. Order and cap: files are concatenated in the order of that hash (a fixed pseudo-random order, so that a
   ``max_chars`` cap samples the whole library instead of its alphabetically first packages). ``max_chars``
   caps the *training* text; the held-out text is always read whole (it is ``val_fraction`` of the corpus).
4. Vocabulary: ``"bytes"`` (default; 256 symbols, UTF-8 bytes, nothing to store; Python sources are nearly
   all ASCII, so bits per byte ≈ bits per character) or ``"chars"`` (the code points of the training text,
   sorted, after an ``<unk>`` at index 0 that held-out characters unseen in training map to).

Batches are ``LongTensor [batch, length + 1]``: inputs are ``[:, :-1]``, next-token targets ``[:, 1:]``.
Training batches are random windows of length ``seq_len + 1``; batch ``b`` of epoch ``e`` on rank ``r`` is a
pure function of ``(seed, r, e, b)``, and the training loader implements ``state_dict`` /
``load_state_dict`` so that Lightning resumes a run mid-epoch on exactly the batches it would have seen.
"""

from __future__ import annotations

import hashlib
import math
import os
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_tiger.data.resumable import RandomWindowLoader
from lightning_tiger.validation import check_int, check_int_sequence, check_real

__all__ = ["CharCorpusDataModule"]

_DEFAULT_EXCLUDE = (
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idle_test",
    "__pycache__",
    "pydoc_data",
)
UNK = "<unk>"


def split_fraction(relpath: str) -> float:
    """Stable pseudo-uniform number in [0, 1) for a relative path (the file-level split key).

    Args:
        relpath: path relative to the corpus root, POSIX separators.

    Returns:
        ``int(sha256(relpath)) / 2**256`` (first 8 bytes, enough resolution for any realistic corpus).
    """
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def list_corpus_files(root: Path, glob: str, exclude: Sequence[str]) -> list[str]:
    """Relative POSIX paths of the corpus files under ``root``, sorted (independent of file-system order).

    Args:
        root: directory to walk (symlinks are not followed).
        glob: file-name pattern, e.g. ``"*.py"`` (matched with :meth:`pathlib.PurePath.match` on the name).
        exclude: directory names to skip anywhere in the tree.

    Returns:
        Sorted list of relative paths.
    """
    excluded = set(exclude)
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if d not in excluded]
        for name in filenames:
            full = Path(dirpath) / name
            if full.is_symlink() or not Path(name).match(glob):
                continue
            found.append(full.relative_to(root).as_posix())
    return sorted(found)


class _Rows(Dataset):
    """Map-style view of the rows of a ``[n, length]`` tensor (evaluation windows)."""

    def __init__(self, rows: Tensor) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        return self.rows[index]


class CharCorpusDataModule(L.LightningDataModule):
    """Character-level LM data for length-extrapolation experiments (Su, "Transformer升级之路" 7, 8 and 12).

    See the module docstring for the corpus, split, vocabulary and resumable training order.

    Validation dataloaders, in this order (names in :attr:`val_names`, used by
    :class:`~lightning_tiger.modules.CausalLMModule` for metric names such as ``val/acc@512``):

    * ``"T"`` for every ``T`` in ``eval_lengths``: ``num_eval_windows`` windows of ``T + 1`` tokens of the
      concatenated held-out text, starts evenly spaced over it (so the same starts serve every length and the
      window of length ``T`` is the prefix of the longer ones at the same start);
    * ``"T_rep"`` for every ``T > 2L`` in ``eval_lengths`` when ``repeated``: ``num_eval_windows`` held-out
      segments of length ``2L`` (evenly spaced starts), each tiled to ``T + 1`` tokens. Shorter test lengths
      are left out because a tiled window of length ≤ 2L holds no repetition.

    ``test_dataloader`` returns the same loaders.

    Args:
        source: a directory (all files matching ``glob`` below it) or a single text file; ``None`` (default)
            uses CPython's standard library, ``sysconfig.get_paths()["stdlib"]``.
        seq_len: training length L (default 64).
        eval_lengths: evaluation lengths (default L … 16L for L = 64).
        batch_size: training windows per batch (default 32).
        val_fraction: fraction of files held out, in (0, 1) (default 0.05).
        max_chars: cap on the training text in characters (``None``: no cap).
        num_eval_windows: windows per evaluation length (default 128).
        repeated: also build the repeated windows (default ``True``).
        vocab: ``"bytes"`` (256 symbols) or ``"chars"`` (training code points + ``<unk>``).
        seed: seed of the training windows.
        glob: file-name pattern for directory sources (default ``"*.py"``).
        exclude: directory names skipped while walking a directory source.
        batches_per_epoch: training batches per epoch (default 1000).
        eval_tokens_per_batch: evaluation batch size is ``max(1, eval_tokens_per_batch // T)`` windows.
        repeat_fraction: fraction of training windows that tile a random segment of ``L/8 … L/2`` tokens
            (everything after its first period copies it; see
            :class:`~lightning_tiger.data.resumable.RandomWindowLoader`), in [0, 1]. Default 0: natural windows
            only. A curriculum for small budgets: it teaches a small model to copy, so that the "repeated"
            windows can test whether copying survives beyond the training length. Evaluation is unaffected.
        repeat_noise: fraction of those tiled windows whose segment is characters drawn independently from the
            training text instead of a span of it, in [0, 1] (default 0): only copying predicts their repeats.
    """

    def __init__(
        self,
        source: str | None = None,
        seq_len: int = 64,
        eval_lengths: Sequence[int] = (64, 128, 256, 512, 1024),
        batch_size: int = 32,
        val_fraction: float = 0.05,
        max_chars: int | None = None,
        num_eval_windows: int = 128,
        repeated: bool = True,
        vocab: Literal["bytes", "chars"] = "bytes",
        seed: int = 0,
        glob: str = "*.py",
        exclude: Sequence[str] = _DEFAULT_EXCLUDE,
        batches_per_epoch: int = 1000,
        eval_tokens_per_batch: int = 16384,
        repeat_fraction: float = 0.0,
        repeat_noise: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("seq_len", seq_len),
            ("batch_size", batch_size),
            ("num_eval_windows", num_eval_windows),
            ("batches_per_epoch", batches_per_epoch),
            ("eval_tokens_per_batch", eval_tokens_per_batch),
        ):
            check_int(name, value, low=1)
        # A string is refused, not iterated ("64" would be read as (6, 4)), and 8.5 is refused, not truncated.
        eval_lengths = check_int_sequence("eval_lengths", eval_lengths, low=1, distinct=True)
        check_real("val_fraction", val_fraction, low=0.0, high=1.0, low_open=True, high_open=True)
        check_real("repeat_fraction", repeat_fraction, low=0.0, high=1.0)
        check_real("repeat_noise", repeat_noise, low=0.0, high=1.0)
        check_int("max_chars", max_chars, low=seq_len + 1, allow_none=True)
        if vocab not in ("bytes", "chars"):
            raise ValueError(f"vocab must be 'bytes' or 'chars', got {vocab!r}")
        self.source = source
        self.seq_len = seq_len
        self.eval_lengths = eval_lengths
        self.batch_size = batch_size
        self.val_fraction = float(val_fraction)
        self.max_chars = max_chars
        self.num_eval_windows = num_eval_windows
        self.repeated = repeated
        self.vocab = vocab
        self.seed = seed
        self.glob = glob
        self.exclude = tuple(exclude)
        self.batches_per_epoch = batches_per_epoch
        self.eval_tokens_per_batch = eval_tokens_per_batch
        self.repeat_fraction = float(repeat_fraction)
        self.repeat_noise = float(repeat_noise)
        self.save_hyperparameters()

        self.train_files: list[str] = []
        self.val_files: list[str] = []
        self.itos: list[str] | None = None
        self._stoi_codes: np.ndarray | None = None
        self.train_data: Tensor | None = None
        self.val_data: Tensor | None = None
        self._val_windows: list[tuple[str, Tensor]] | None = None
        self._train_loader: RandomWindowLoader | None = None

    # ------------------------------------------------------------------ corpus
    @property
    def root(self) -> Path:
        """The corpus root (a directory or a single file)."""
        return Path(self.source) if self.source is not None else Path(sysconfig.get_paths()["stdlib"])

    def _split_files(self) -> tuple[list[str], list[str]]:
        files = list_corpus_files(self.root, self.glob, self.exclude)
        if len(files) < 2:
            raise ValueError(
                f"source {str(self.root)!r} holds {len(files)} file(s) matching {self.glob!r}; a directory "
                "source needs at least 2 (or pass a single file)"
            )
        keyed = sorted((split_fraction(f), f) for f in files)
        held = [f for u, f in keyed if u < self.val_fraction]
        train = [f for u, f in keyed if u >= self.val_fraction]
        if not held:  # tiny corpora: the file with the smallest key is held out
            held, train = [keyed[0][1]], [f for _, f in keyed[1:]]
        if not train:
            train, held = [keyed[-1][1]], [f for _, f in keyed[:-1]]
        return train, held

    def _read(self, relpaths: list[str], cap: int | None) -> bytes | str:
        parts: list[Any] = []
        total = 0
        for rel in relpaths:
            raw = (self.root / rel).read_bytes()
            chunk: Any = raw if self.vocab == "bytes" else raw.decode("utf-8", errors="replace")
            if cap is not None and total + len(chunk) >= cap:
                parts.append(chunk[: cap - total])
                total = cap
                break
            parts.append(chunk)
            total += len(chunk)
        return (b"" if self.vocab == "bytes" else "").join(parts)

    def _encode_text(self, text: bytes | str) -> Tensor:
        if self.vocab == "bytes":
            assert isinstance(text, bytes)
            return torch.frombuffer(bytearray(text), dtype=torch.uint8).clone()
        assert isinstance(text, str) and self._stoi_codes is not None
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        pos = np.searchsorted(self._stoi_codes, codes)
        pos_clipped = np.minimum(pos, len(self._stoi_codes) - 1)
        known = self._stoi_codes[pos_clipped] == codes
        ids = np.where(known, pos_clipped + 1, 0).astype(np.int32)  # 0 = <unk>
        return torch.from_numpy(ids)

    def encode(self, text: str) -> Tensor:
        """Token ids ``LongTensor [len]`` of ``text`` in this module's vocabulary (after :meth:`setup`)."""
        self.setup()
        if self.vocab == "bytes":
            return self._encode_text(text.encode("utf-8")).long()
        return self._encode_text(text).long()

    def decode(self, ids: Tensor | Sequence[int]) -> str:
        """Inverse of :meth:`encode` (``<unk>`` for id 0 of a ``"chars"`` vocabulary)."""
        self.setup()
        values = [int(i) for i in (ids.tolist() if isinstance(ids, Tensor) else ids)]
        if self.vocab == "bytes":
            return bytes(values).decode("utf-8", errors="replace")
        assert self.itos is not None
        return "".join(self.itos[i] for i in values)

    def setup(self, stage: str | None = None) -> None:
        """Read, split and encode the corpus and cut the evaluation windows (once; later calls are free)."""
        if self.train_data is not None:
            return
        root = self.root
        if not root.exists():
            raise ValueError(f"source {str(root)!r} does not exist")
        if root.is_file():
            raw = root.read_bytes()
            text: Any = raw if self.vocab == "bytes" else raw.decode("utf-8", errors="replace")
            cut = int(len(text) * (1.0 - self.val_fraction))
            train_text, val_text = text[:cut], text[cut:]
            if self.max_chars is not None:
                train_text = train_text[: self.max_chars]
            self.train_files, self.val_files = [root.name], [root.name]
        else:
            self.train_files, self.val_files = self._split_files()
            train_text = self._read(self.train_files, self.max_chars)
            val_text = self._read(self.val_files, None)
        if self.vocab == "chars":
            assert isinstance(train_text, str)
            codes = np.unique(np.frombuffer(train_text.encode("utf-32-le"), dtype=np.uint32))
            self._stoi_codes = codes
            self.itos = [UNK] + [chr(int(c)) for c in codes]
        self.train_data = self._encode_text(train_text)
        self.val_data = self._encode_text(val_text)
        if self.train_data.numel() < self.seq_len + 1:
            raise ValueError(
                f"the training text has {self.train_data.numel()} characters, fewer than seq_len + 1 = "
                f"{self.seq_len + 1}"
            )
        self._val_windows = self._build_val_windows()

    @property
    def vocab_size(self) -> int:
        """256 for ``"bytes"``; ``1 + distinct training characters`` for ``"chars"`` (reads the corpus)."""
        if self.vocab == "bytes":
            return 256
        self.setup()
        assert self.itos is not None
        return len(self.itos)

    # ------------------------------------------------------------------ evaluation windows
    @staticmethod
    def evenly_spaced_starts(text_len: int, window: int, count: int) -> Tensor:
        """``count`` window starts evenly spaced over ``[0, text_len - window]`` (``LongTensor [count]``)."""
        if text_len < window:
            raise ValueError(
                f"the held-out text has {text_len} characters, fewer than one evaluation window of {window}; "
                "lower eval_lengths or raise val_fraction"
            )
        if count == 1:
            return torch.zeros(1, dtype=torch.long)
        return torch.linspace(0, text_len - window, count, dtype=torch.float64).floor().long()

    def _build_val_windows(self) -> list[tuple[str, Tensor]]:
        assert self.val_data is not None
        data = self.val_data
        out: list[tuple[str, Tensor]] = []
        for t in self.eval_lengths:
            starts = self.evenly_spaced_starts(data.numel(), t + 1, self.num_eval_windows)
            out.append((str(t), data[starts[:, None] + torch.arange(t + 1)].long()))
        if self.repeated:
            period = 2 * self.seq_len
            starts = self.evenly_spaced_starts(data.numel(), period, self.num_eval_windows)
            segments = data[starts[:, None] + torch.arange(period)].long()  # [num, 2L]
            for t in self.eval_lengths:
                if t <= period:
                    continue
                reps = math.ceil((t + 1) / period)
                out.append((f"{t}_rep", segments.repeat(1, reps)[:, : t + 1].contiguous()))
        return out

    @property
    def val_names(self) -> list[str]:
        """Names of the validation dataloaders, in order: ``"64"``, …, ``"1024"``, ``"256_rep"``, …"""
        self.setup()
        assert self._val_windows is not None
        return [name for name, _ in self._val_windows]

    def val_windows(self, name: str) -> Tensor:
        """The evaluation windows of dataloader ``name``: ``LongTensor [num_eval_windows, T + 1]``."""
        self.setup()
        assert self._val_windows is not None
        for key, rows in self._val_windows:
            if key == name:
                return rows
        raise ValueError(f"name must be one of {self.val_names}, got {name!r}")

    # ------------------------------------------------------------------ dataloaders
    def train_dataloader(self) -> RandomWindowLoader:
        """Random training windows ``LongTensor [batch_size, seq_len + 1]``, resumable (see module doc)."""
        self.setup()
        assert self.train_data is not None
        rank = self.trainer.global_rank if self.trainer is not None else 0
        if self._train_loader is None or self._train_loader.rank != rank:
            self._train_loader = RandomWindowLoader(
                self.train_data, self.seq_len, self.batch_size, self.batches_per_epoch, self.seed, rank,
                repeat_fraction=self.repeat_fraction, repeat_noise=self.repeat_noise,
            )
        return self._train_loader

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per entry of :attr:`val_names`; batches ``LongTensor [b, T + 1]``."""
        self.setup()
        assert self._val_windows is not None
        return [
            DataLoader(_Rows(rows), batch_size=max(1, self.eval_tokens_per_batch // (rows.shape[1] - 1)))
            for _, rows in self._val_windows
        ]

    def test_dataloader(self) -> list[DataLoader]:
        """The validation loaders (held-out files)."""
        return self.val_dataloader()
