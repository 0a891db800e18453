"""Causal language modelling with evaluation at several lengths: the length-extrapolation module (Su's
"Transformer升级之路" series, posts 7, 8 and 9–12: kexue.fm/archives/9603, 9708).

Metrics (Su's protocol, e.g. kexue.fm/archives/9708): per-token next-token accuracy, cross-entropy in nats and bits per
character (``loss / ln 2``; bits per *byte* with a byte vocabulary), each computed per validation dataloader
and logged as ``val/acc@<name>``, ``val/loss@<name>``, ``val/bpc@<name>`` where ``<name>`` comes from the
datamodule's ``val_names`` (``"512"``, ``"512_rep"`` for :class:`~lightning_tiger.data.CharCorpusDataModule`)
or, without it, the window length. Averages are exact token averages over the whole loader (each batch is
logged with ``batch_size`` = its number of scored tokens). ``val/loss`` (loss on the first loader, the
training length for the char corpus) is logged as well for checkpoint monitoring, and ``hp_metric`` (accuracy on
the first loader) for TensorBoard's hparams tab.

Which tokens are scored: all of them by default (Su's definition, and that of the reference numbers of
kexue.fm/archives/9603 … 9731), or only the last ``metric_last_n`` positions of each window (e.g.
``metric_last_n = L``: the tokens that have the longest context, which isolates the long-context behaviour
from the in-distribution prefix of every long window).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_tiger.modules.defaults import Optimization, save_config_hyperparameters
from lightning_tiger.nn import TransformerLM, random_positions
from lightning_tiger.validation import check_int

__all__ = ["CausalLMModule"]

_TRAIN_POSITIONS = ("contiguous", "random_int", "random_float")
_EVAL_KEYS = (
    "window", "window_at", "sink_tokens", "logn", "logn_base", "rope_scaling", "rerope_window", "rerope_leak",
    "layers",
)


class CausalLMModule(L.LightningModule):
    """Next-token language model around :class:`~lightning_tiger.nn.TransformerLM` (or any LM ``nn.Module``).

    Batches are ``LongTensor [batch, seq + 1]``: inputs ``[:, :-1]``, targets ``[:, 1:]``. One validation pass
    evaluates every length the datamodule offers (one dataloader per length, see the module docstring).

    Training positions (Su, "Transformer升级之路：8"): ``"contiguous"`` (``0 … L−1``); ``"random_int"``: per
    sequence ``L``
    distinct sorted integers from ``{0, …, max_position − 1}`` (Ruoss et al. 2023); ``"random_float"``:
    Su's equal-mean float variant (RoPE only) — both through :func:`~lightning_tiger.nn.random_positions`,
    drawn from a generator seeded by ``(position_seed, global_step, batch_idx)`` so a resumed run draws the same
    positions. Evaluation always uses contiguous positions ``0 … T−1`` (so ``max_position`` should cover
    the longest test length; default: the datamodule's largest ``eval_lengths`` or ``16·L``).

    Evaluation-time options (``eval_options``; applied when validation/test starts, the training values are
    restored afterwards, nothing is retrained): any of ``window``, ``window_at``, ``sink_tokens``, ``logn``,
    ``logn_base``, ``rope_scaling``, ``rerope_window``, ``rerope_leak`` (ReRoPE, Su, kexue.fm/archives/9708; see
    :meth:`TransformerLM.set_attention_options`), plus ``layers`` (list
    of layer indices; default all). Two values depend on the test length ``T`` of each dataloader:
    ``rope_scaling["factor"] = "auto"`` means ``T / L_train`` (plain RoPE when ``T <= L_train``, the way
    NTK-RoPE is evaluated by Su), and ``logn_base = "auto"`` means ``L_train``; ``L_train`` is
    ``train_len`` or the datamodule's ``seq_len``.

    Optimizer and schedule (the convention of all the library's modules, :mod:`lightning_tiger.modules.defaults`):
    ``optimizer`` / ``lr_scheduler`` callables (LightningCLI's ``OptimizerCallable`` / ``LRSchedulerCallable``);
    the optimizer callable receives :func:`~lightning_tiger.modules.defaults.default_param_groups` (they suit
    any ``torch.optim`` optimizer). By default Tiger (Su 2023, "Tiger:一个“抠”到极致的优化器"; bojone/tiger), relative
    lr 5e-3, β 0.965, weight decay 0.01, with a per-step piecewise-linear schedule (the format of bojone/tiger's
    ``piecewise_linear``): linear warm-up from 0 over ``warmup_steps``, then linear decay to 10 % of the peak at
    the run's last step (``trainer.estimated_stepping_batches``; constant after the warm-up when unknown).

    Args:
        model: ``TransformerLM`` keyword arguments (a dict, YAML-friendly; ``vocab_size`` defaults to 256,
            the byte vocabulary) or a ready ``nn.Module`` with ``forward(tokens [batch, seq], positions=None) ->
            logits [batch, seq, vocab]``.
        train_positions: ``"contiguous"``, ``"random_int"`` or ``"random_float"``.
        max_position: the ``L`` of random positions (see above).
        position_seed: seed of the random training positions.
        eval_options: evaluation-time attention options (see above) or ``None``.
        metric_last_n: score only the last ``n`` tokens of each evaluation window (``None``: all tokens).
        train_len: the training length ``L_train`` for the ``"auto"`` options (default: datamodule's).
        optimizer: ``params -> Optimizer`` (e.g. ``functools.partial(Tiger, lr=2e-2)``); ``None``: the default Tiger.
        lr_scheduler: ``optimizer -> LRScheduler``, stepped every optimizer step; ``None``: the default schedule.
        warmup_steps: warm-up of the default schedule (``None``: 5 % of the run + 1 step).
    """

    def __init__(
        self,
        model: dict[str, Any] | nn.Module | None = None,
        train_positions: Literal["contiguous", "random_int", "random_float"] = "contiguous",
        max_position: int | None = None,
        position_seed: int = 0,
        eval_options: dict[str, Any] | None = None,
        metric_last_n: int | None = None,
        train_len: int | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        warmup_steps: int | None = None,
    ) -> None:
        super().__init__()
        # Checked without rebinding: save_hyperparameters() records the arguments as given.
        optimization = Optimization(optimizer, lr_scheduler, warmup_steps)
        if train_positions not in _TRAIN_POSITIONS:
            raise ValueError(f"train_positions must be one of {_TRAIN_POSITIONS}, got {train_positions!r}")
        check_int("max_position", max_position, low=1, allow_none=True)
        check_int("metric_last_n", metric_last_n, low=1, allow_none=True)
        check_int("train_len", train_len, low=1, allow_none=True)
        if eval_options is not None:
            if not isinstance(eval_options, dict):
                raise TypeError(f"eval_options must be a dict or None, got {type(eval_options).__name__}")
            unknown = set(eval_options) - set(_EVAL_KEYS)
            if unknown:
                raise ValueError(f"eval_options has unknown keys {sorted(unknown)}; accepted: {_EVAL_KEYS}")

        if model is None:
            model = {}
        if isinstance(model, nn.Module):
            self.model = model
        elif isinstance(model, dict):

            config = dict(model)
            config.setdefault("vocab_size", 256)
            self.model = TransformerLM(**config)
        else:
            raise TypeError(
                f"model must be a dict of TransformerLM arguments or an nn.Module, got {type(model).__name__}"
            )
        # A module object and Python callables are left out (unpicklable or weights_only-unsafe); configs are kept.
        save_config_hyperparameters(self, objects=("model", "optimizer", "lr_scheduler"))
        if eval_options and not hasattr(self.model, "set_attention_options"):
            raise TypeError("eval_options needs a model with set_attention_options (e.g. TransformerLM)")
        self.optimization = optimization
        self.eval_options = dict(eval_options or {})
        self._saved_options: list[dict[str, Any]] | None = None
        self._applied_for_length: int | None = None

    # ------------------------------------------------------------------ helpers
    def forward(self, tokens: Tensor, positions: Tensor | None = None) -> Tensor:
        """Logits ``[batch, seq, vocab]`` of ``tokens [batch, seq]``."""
        return self.model(tokens, positions=positions)

    def configure_model(self) -> None:
        """Shard the model with FSDP2 under Lightning's ``ModelParallelStrategy`` (``trainer/fsdp.yaml``).

        Each block of ``self.model.blocks`` (``TransformerLM``), then the whole model, is wrapped with
        ``torch.distributed.fsdp.fully_shard`` over the data-parallel mesh: parameters, gradients and the
        Tiger/Lion momenta are sharded across processes, and Tiger stays exact (its per-tensor RMS and non-finite
        decision are reduced across the shards). A no-op under any other strategy (no device mesh).

        Raises:
            ValueError: the mesh has a tensor-parallel dimension larger than 1 (this module has no
                tensor-parallel plan: use ``tensor_parallel_size=1``).
        """
        mesh = self.device_mesh
        if mesh is None:
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self.model, FSDPModule):  # already sharded (configure_model runs once per trainer call)
            return
        names = mesh.mesh_dim_names or ()
        if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
            raise ValueError(
                f"CausalLMModule has no tensor-parallel plan, got tensor_parallel_size="
                f"{mesh['tensor_parallel'].size()}; use ModelParallelStrategy(data_parallel_size=<processes>, "
                "tensor_parallel_size=1)")
        dp_mesh = mesh["data_parallel"] if "data_parallel" in names else mesh
        for block in getattr(self.model, "blocks", ()):
            fully_shard(block, mesh=dp_mesh)
        fully_shard(self.model, mesh=dp_mesh)

    def _datamodule_attr(self, name: str) -> Any:
        trainer = self._trainer
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        return getattr(dm, name, None)

    def _train_length(self) -> int | None:
        return self.hparams.get("train_len") or self._datamodule_attr("seq_len")

    def _max_position(self, seq_len: int) -> int:
        if self.hparams.max_position is not None:
            return int(self.hparams.max_position)
        lengths = self._datamodule_attr("eval_lengths")
        return int(max(lengths)) if lengths else 16 * seq_len

    def _train_positions(self, batch: int, seq_len: int, batch_idx: int, device: torch.device) -> Tensor | None:
        kind = self.hparams.train_positions
        if kind == "contiguous":
            return None

        # (seed, optimizer step, batch index): reproducible on resume, distinct across accumulated micro-batches
        entropy = [int(self.hparams.position_seed), int(self.global_step), int(batch_idx)]
        state = np.random.SeedSequence(entropy).generate_state(2)
        generator = torch.Generator(device="cpu").manual_seed(int(state[0]) << 32 | int(state[1]))
        mode = "sorted_int" if kind == "random_int" else "equal_mean_float"
        positions = random_positions(batch, seq_len, self._max_position(seq_len), mode=mode, generator=generator)
        return positions.to(device)

    @staticmethod
    def _split(batch: Any) -> tuple[Tensor, Tensor]:
        if isinstance(batch, (list, tuple)):
            batch = batch[0]
        if not isinstance(batch, Tensor) or batch.dim() != 2 or batch.shape[1] < 2:
            raise ValueError("batches must be LongTensor [batch, seq + 1] with seq >= 1")
        return batch[:, :-1], batch[:, 1:]

    # ------------------------------------------------------------------ evaluation-time options
    def _attention_layers(self) -> list[nn.Module]:
        blocks = getattr(self.model, "blocks", None)
        return [b.attn for b in blocks] if blocks is not None else []

    def _snapshot_options(self) -> list[dict[str, Any]]:
        snaps = []
        for attn in self._attention_layers():
            snap = {k: getattr(attn, k) for k in ("window", "window_at", "sink_tokens", "logn", "logn_base",
                                                  "rerope_window", "rerope_leak")}
            rotary = getattr(attn, "rotary", None)
            if rotary is not None:
                snap["rope_scaling"] = copy.deepcopy(rotary.scaling)
            snaps.append(snap)
        return snaps

    def _resolved_options(self, length: int) -> dict[str, Any]:
        opts = {k: copy.deepcopy(v) for k, v in self.eval_options.items() if k != "layers"}
        needs_len = opts.get("logn_base") == "auto" or (
            isinstance(opts.get("rope_scaling"), dict) and opts["rope_scaling"].get("factor") == "auto"
        )
        train_len = self._train_length() if needs_len else None
        if needs_len and train_len is None:
            raise ValueError("eval_options with 'auto' need train_len (or a datamodule with seq_len)")
        if opts.get("logn_base") == "auto":
            opts["logn_base"] = int(train_len)  # type: ignore[arg-type]
        scaling = opts.get("rope_scaling")
        if isinstance(scaling, dict) and scaling.get("factor") == "auto":
            factor = length / float(train_len)  # type: ignore[arg-type]
            opts["rope_scaling"] = None if factor <= 1.0 else {**scaling, "factor": factor}
        return opts

    def _apply_eval_options(self, length: int) -> None:
        if not self.eval_options or self._applied_for_length == length:
            return
        if self._saved_options is None:
            self._saved_options = self._snapshot_options()
        self.model.set_attention_options(layers=self.eval_options.get("layers"), **self._resolved_options(length))
        self._applied_for_length = length

    def _restore_options(self) -> None:
        if self._saved_options is None:
            return
        for i, snap in enumerate(self._saved_options):
            self.model.set_attention_options(layers=[i], **snap)
        self._saved_options = None
        self._applied_for_length = None

    def on_validation_end(self) -> None:
        self._restore_options()

    def on_test_end(self) -> None:
        self._restore_options()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Checkpoints hold weights only; options are hyperparameters. Nothing to strip, but make sure a
        # checkpoint written mid-validation never records evaluation options as the training state.
        checkpoint["causal_lm_eval_options_active"] = self._saved_options is not None

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = self._split(batch)
        positions = self._train_positions(x.shape[0], x.shape[1], batch_idx, x.device)
        logits = self.model(x, positions=positions)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        with torch.no_grad():
            acc = (logits.argmax(-1) == y).float().mean()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/bpc", loss.detach() / math.log(2))
        self.log("train/acc", acc)
        return loss

    def _loader_name(self, dataloader_idx: int, length: int) -> str:
        names = self._datamodule_attr("val_names")
        if names is not None and dataloader_idx < len(names):
            return str(names[dataloader_idx])
        return str(length)

    def _evaluate(self, batch: Any, dataloader_idx: int, stage: str) -> None:
        x, y = self._split(batch)
        length = x.shape[1]
        self._apply_eval_options(length)
        logits = self.model(x)
        n_last = self.hparams.metric_last_n
        if n_last is not None and n_last < length:
            logits, y = logits[:, length - n_last :], y[:, length - n_last :]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), reduction="none")
        correct = (logits.argmax(-1) == y).reshape(-1).float()
        n_tokens = y.numel()
        name = self._loader_name(dataloader_idx, length)
        kwargs: dict[str, Any] = dict(
            on_step=False, on_epoch=True, add_dataloader_idx=False, batch_size=n_tokens, sync_dist=True
        )
        loss = nll.mean()
        self.log(f"{stage}/acc@{name}", correct.mean(), **kwargs)
        self.log(f"{stage}/loss@{name}", loss, **kwargs)
        self.log(f"{stage}/bpc@{name}", loss / math.log(2), **kwargs)
        if dataloader_idx == 0:
            self.log(f"{stage}/loss", loss, prog_bar=True, **kwargs)
            if stage == "val":  # TensorBoard's hparams tab: accuracy at the first (training) length
                self.log("hp_metric", correct.mean(), **kwargs)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, dataloader_idx, "val")

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, dataloader_idx, "test")

    # ------------------------------------------------------------------ optimization
    def configure_optimizers(self) -> Any:
        """``optimizer`` / ``lr_scheduler`` from init, or the defaults (Tiger, warm-up + decay over the run)."""
        return self.optimization.configure_optimizers(self)
