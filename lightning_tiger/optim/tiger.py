"""Tiger: "tight-fisted" sign-momentum optimizer (Su 2023), faithful to the official code (SPEC §1.2)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_tiger.optim import _functional as F
from lightning_tiger.optim._fused import RMSCache
from lightning_tiger.optim.param_groups import ParamKind, classify_parameters

__all__ = ["Tiger"]

_HALF_LR_KINDS = (ParamKind.BIAS, ParamKind.NORM_SCALE, ParamKind.NORM_SHIFT)


def _fold_hook(opt_ref: weakref.ReferenceType[Tiger], param: Tensor) -> None:
    # Module-level function + weakref: the hook stored on the parameter must not keep the optimizer alive.
    opt = opt_ref()
    if opt is not None and opt._hooks.active:
        opt._fold(param)


class _Hooks:
    """Fold-mode bookkeeping, one object shared by reference with wrappers that copy the optimizer's __dict__."""

    def __init__(self) -> None:
        self.active = False
        self.handles: list[Any] = []
        self.owner_id: int | None = None


@dataclasses.dataclass
class _Batch:
    """The tensors of one step that share the micro-step coefficients (one fused call)."""

    params: list[Tensor] = dataclasses.field(default_factory=list)
    grads: list[Tensor] = dataclasses.field(default_factory=list)
    moms: list[Tensor] = dataclasses.field(default_factory=list)
    settings: list[tuple[int, float, float, float, float]] = dataclasses.field(default_factory=list)
    sr: list[dict[str, Any] | None] = dataclasses.field(default_factory=list)  # state holding a generator
    kahan: list[Tensor | None] = dataclasses.field(default_factory=list)


class Tiger(torch.optim.Optimizer):
    r"""Tiger (Su 2023, kexue.fm/archives/9512; official TF code bojone/tiger ``tiger.py``), SPEC §1.2.

    Exact up to one documented deviation: the fused CPU kernels restore m and θ to within float rounding, not
    bit for bit, on a non-finite step (see "Non-finite gradients"; ``exact_nonfinite=True`` removes it).

    Tiger is Lion with β1 = β2 = β: sign of a momentum, a per-tensor learning rate *relative* to the
    parameter's RMS, decoupled weight decay scaled by the same effective rate, and gradient accumulation
    folded into the momentum. With the micro-step counter ``t`` (0, 1, 2, ...) and ``k = grad_accum_steps``::

        b1 = β if t % k == 0 else 1          # decay the momentum on the first micro-step of a window only
        b2 = (1 − β) / k
        m  ← b1·m + b2·g
        if (t + 1) % k == 0:                 # parameters move on the last micro-step only
            θ ← θ − η·(sign(m) + λ·θ)

    Per parameter kind (:class:`~lightning_tiger.optim.ParamKind`; RMS taken on θ *before* the update):

    =============  ================================  =====  ==============
    kind           η                                 λ      shrink centre c
    =============  ================================  =====  ==============
    matrix         lr·max(RMS(θ), floor)             λ      0
    embedding      lr·max(RMS(row of θ), floor)      λ      0
    bias           0.5·lr                            0      0
    norm_scale     0.5·lr                            0      1
    norm_shift     0.5·lr                            0      0
    =============  ================================  =====  ==============

    Embedding rows are those of θ viewed as ``[shape[0], -1]`` (``[vocab, dim]``: one RMS per token, like the
    official ``root_mean_square(var, axis=-1, keepdims=True)``). ``sign(m)`` is taken on the momentum as
    stored (after rounding to ``momentum_dtype``), like the official ``sign(m_t)`` of the assigned slot;
    sign(0) = 0. A parameter whose ``grad`` is None is skipped on that micro-step (momentum and parameter
    untouched), like a variable without gradient in the official code.

    **Kinds.** A group's ``"kind"`` key (set by :func:`~lightning_tiger.optim.tiger_param_groups`) applies to
    all its parameters. Without it, a parameter's kind comes from :meth:`assign_kinds` (module types; the CLI
    calls it because ``LightningCLI`` passes ``model.parameters()``), else from ``ndim``: >= 2 -> matrix (so
    embeddings get a whole-table RMS), else bias (so norm scales shrink toward 0, not 1).

    **Non-finite gradients** (per tensor, on any micro-step; the official code tests ``isnan`` only, we treat
    ±inf the same way): the momentum is kept (b1 = 1, g = 0) and the parameter shrinks toward its centre,
    ``θ ← (θ − c)·s + c`` with ``s = shrink_ratio``, instead of its update. A last resort for mixed-precision
    blow-ups; note that ``precision="16-mixed"`` uses a ``GradScaler`` that skips such steps before Tiger sees
    them, so this rule acts under ``bf16-mixed`` / ``*-true`` (SPEC §2). **Where the fused CPU kernels differ:**
    by default they update in one pass, checking g just before writing, and undo the part already written
    when a non-finite value turns up later in the tensor, by inverting the update in fp32. The kept momentum
    and the shrunk parameter then match the rule to within float rounding (a few ulp of ``|m| + |b2·g|`` and
    of ``|θ|``), not bit for bit; finite steps are bit-identical. Why: the exact rule must read a whole
    gradient before writing any of it, i.e. read every gradient twice from memory for tensors larger than the
    caches (measured in ``benchmarks/optimizer_step.py``: 0.1–0.15× of fused AdamW's step time more).
    ``exact_nonfinite=True`` gives the bit-exact rule (the foreach and single-tensor paths always do, and so
    do the kernels on micro-steps with b1 < 0.5, i.e. ``beta < 0.5``, where inverting would amplify rounding).

    **Zero-initialised matrices** would have RMS 0 and never move: η uses ``max(RMS, rms_floor)``.
    ``rms_floor=None`` (default) is per tensor ``0.1/sqrt(fan_in)``, ``fan_in = numel/shape[0]`` (the input
    size of a Linear/Conv weight, the width of an embedding row): one tenth of the ``1/sqrt(fan_in)`` the
    seed notes suggest as a cheap RMS substitute, hence below PyTorch's default init RMS (≈0.58/sqrt(fan_in))
    and usual LM inits, so that it only acts on (near) zero tensors. ``rms_floor=0`` is the official code.

    **Schedule.** ``lr`` is the relative rate α; the official schedule counts micro-steps: step a
    :class:`~lightning_tiger.optim.PiecewiseLinearLR` after every ``step()`` call.

    **Gradient accumulation, two usage patterns.** (a) Official style: call ``step()`` after *every* backward
    with ``grad_accum_steps=k`` (and ``zero_grad()`` each time); the momentum accumulates, parameters move
    every k-th call (Lightning: ``accumulate_grad_batches=1``, the scheduler then counts micro-steps, as in
    the official code). (b) PyTorch/Lightning style
    (``Trainer(accumulate_grad_batches=k)``): ``grad_accum_steps=1``, gradients accumulate in ``.grad`` (the
    loss divided by k), one ``step()`` per window. Both give the same parameters.

    **Tight-fisted mode** (``fold_in_backward=True``, SPEC §1.2 Memory): a post-accumulate-grad hook on every
    parameter folds each gradient into the momentum during backward and frees it at once (``p.grad = None``),
    so training never holds a full set of gradients (8 bytes/parameter in fp32 instead of 12; 6 with bf16
    momentum). ``step(closure)`` calls the closure (Lightning always passes one) and then moves the parameters.
    Fold rule: ``b1 = β`` on the first finite fold of a parameter since the last ``step()`` call when
    ``t % k == 0``, else 1; a non-finite gradient is not folded and flags the parameter, which then shrinks
    instead of moving at the next ``step()``. Pattern (a) reproduces the standard mode (up to float rounding),
    NaN rule included. Pattern (b) matches it without non-finite values; with one, the standard mode drops the whole
    window's summed gradient of that tensor, whereas here only the non-finite micro-batches are dropped (the
    finite ones are already in m); the parameter itself shrinks instead of moving, as in the standard mode.
    Parameters are never modified inside a hook. Limits: gradient clipping cannot see folded gradients (the
    Lightning integration refuses ``gradient_clip_val``); a ``GradScaler`` (fp16 AMP) finds no gradients to
    unscale, so use bf16 or fp32; sparse gradients are refused; under ``torch.distributed`` with more than one
    process the hooks would see local, un-reduced gradients, so construction and ``step()`` raise
    ``RuntimeError``. Save checkpoints at ``step()`` boundaries (which gradients were folded within a window
    is not saved). Hooks go on the parameters that require grad at construction (or in ``add_param_group``).
    :meth:`remove_hooks` turns the mode off (then ``step()`` reads ``.grad`` again).

    **Distributed.** The standard mode works under DDP (every rank sees the all-reduced gradient and makes
    the same non-finite decision). Under FSDP each rank holds shards, so "RMS of the tensor" would be the RMS
    of the local shard (per-rank η, different from DDP) and the non-finite test would be per shard: not
    supported as the published algorithm.

    **Dtypes.** Parameters in fp32, bf16, fp16 (or fp64). The momentum has ``momentum_dtype`` (default: the
    parameter's dtype; like optax's ``mu_dtype``), kept across ``load_state_dict``. Math is float32 (float64
    for float64 tensors); results are rounded once to the storage dtype.

    **Low-precision parameters** (bf16/fp16, e.g. ``Trainer(precision="bf16-true")``). Tiger's relative step
    (lr·RMS, ~1e-3 of a typical element) is below half a bf16 ulp (2⁻⁹ relative), so rounding the new value to
    nearest would give back the old value for most elements and training would stall. By default
    (``stochastic_rounding=True``) the fp32 result is rounded *stochastically* (Gupta et al. 2015, eq. 2: up
    with probability equal to the distance from the lower neighbour in ulps), so every write is unbiased and
    parameters move on average as in fp32 (Zamirai et al. 2020, "Revisiting BFloat16 Training"). The same
    applies to a bf16/fp16 momentum (``momentum_sr=True``, default; ``False`` rounds it to nearest:
    ``benchmarks/low_precision.py`` measures both). The random bits are a counter-based hash of (stream, step,
    element) (``lightning_tiger.optim.stochastic_rounding``): every path (fused kernels, foreach, single
    tensor, any chunking or thread count) draws the same bits, and the whole generator state is two int64
    tensors per parameter in the optimizer state (``sr_stream``: from ``seed`` and the parameter's index in the
    optimizer; ``sr_step``: calls so far), so ``state_dict()`` / ``load_state_dict()`` resume bit for bit.
    ``seed=None`` takes ``torch.initial_seed()`` (so ``L.seed_everything`` / ``torch.manual_seed`` make runs
    reproducible, and constructing the optimizer draws nothing from the generator the rest of the run uses).
    ``compensation="kahan"`` is the deterministic alternative (as in the ``optimi`` library): one extra buffer of
    the parameter's dtype (``state["kahan_comp"]``) keeps what each round-to-nearest write lost and adds it to
    the next write (compensated summation, Kahan 1965); θ + comp tracks the fp32 trajectory; momenta are then rounded to
    nearest. ``stochastic_rounding=False`` (without compensation) rounds to nearest, the behaviour before.
    fp32/fp64 tensors are unaffected by all of this (and get no extra state).

    **Compiling; accelerators.** The PyTorch paths never read a value back to the host: non-finite flags, RMS
    and rates stay on the device as tensors, the non-finite rule is a ``torch.where`` and Python branches only
    on settings (dtype, shape, micro-step), never on data. The foreach path works on chunks of at most
    ``_functional.FOREACH_CHUNK_BYTES`` (32 MiB of fp32) at a time, bounding temporaries. Hence
    ``torch.compile(opt.step, fullgraph=True)`` captures the whole step (the fused CPU op is skipped while
    compiling). On a GPU that is how to get fused kernels: inductor emits Triton kernels that read each
    tensor once, e.g.::

        opt = Tiger(tiger_param_groups(model), lr=1e-3)     # CUDA tensors: the foreach path
        step = torch.compile(opt.step, fullgraph=True)      # Triton kernels, no host sync per step
        ...; loss.backward(); step(); opt.zero_grad()

    Expect one graph per distinct micro-step kind (moving / accumulating) and a recompile when a float
    hyperparameter (lr under a schedule) changes unless dynamo treats floats as dynamic. Fold-in-backward mode's
    per-gradient finiteness check also stays on the device.

    **Sparse gradients** (``nn.Embedding(sparse=True)``, ``grad_accum_steps=1``, standard mode): lazy row
    updates: only rows with a gradient change (parameter and momentum; others keep their momentum undecayed).
    This is the remedy of SPEC §1.2's embedding caveat (rows of rare tokens drifting to ±1/λ) and differs from
    the official code, whose sparse path decays every row's momentum and moves every row.

    **Paths.** ``fused=None`` uses the compiled kernels of ``lightning_tiger.optim._fused`` when they load and
    every tensor qualifies (dense, contiguous, fp32/bf16/fp16 parameter and gradient of one dtype, a momentum
    dtype the kernels take: ``_fused.fused_supports``), else ``foreach`` (default on CUDA) or one tensor at a
    time (default on CPU, smallest transient memory). ``fused=True`` raises where the kernels are unavailable
    or a tensor does not qualify. All paths share the semantics above; the fold-in-backward hooks and the
    update of that mode always use PyTorch ops (the fused op marks θ as written).

    **RMS cache** (``rms_cache=True``, fused path): the kernel returns Σθ² of the θ it wrote, and the next
    step reuses it instead of reading θ again, if ``param._version``, ``param.data_ptr()`` and a fingerprint of
    128 sampled elements are unchanged (so writes through ``param.data`` are caught unless they leave every
    sampled element bit-identical; then one step would use the previous θ's RMS). Cached and recomputed sums
    are bit-identical, so the cache changes no result; ``rms_cache=False`` recomputes every RMS.

    **Checkpointing.** The micro-step counter lives in each param group (``"micro_step"``), so
    ``state_dict()``/``load_state_dict()`` resume bit-for-bit as if never stopped.

    Args:
        params: parameters or param groups (e.g. from ``tiger_param_groups``). Group keys: ``lr``, ``beta``,
            ``weight_decay``, ``grad_accum_steps``, ``shrink_ratio``, ``rms_floor``, ``kind``.
        lr: relative learning rate α, >= 0. Default 1e-3 (typical peak 1e-3 … 2e-3).
        beta: momentum β in [0, 1). Default 0.965 (language); 0.945 for vision.
        weight_decay: λ >= 0, decoupled and multiplied by η. Default 0.01.
        grad_accum_steps: k >= 1 (int), micro-steps per parameter update. Default 1.
        shrink_ratio: s in (0, 1] of the non-finite rule. Default 0.99.
        rms_floor: floor of the RMS in η (>= 0), or None for the automatic ``0.1/sqrt(fan_in)``.
        momentum_dtype: floating dtype (or its name, e.g. ``"bfloat16"``) of the momentum; None = param dtype.
        fold_in_backward: the tight-fisted mode above. Default False.
        foreach: use ``torch._foreach_*`` kernels; None picks by device.
        fused: use the compiled kernels; None = when available.
        exact_nonfinite: fused kernels: bit-exact non-finite rule (reads each gradient before writing; slower).
            Default False: one pass with a rollback to within rounding (see above).
        rms_cache: fused kernels: reuse Σθ² of the θ written at the previous step (see above). Default True.
        stochastic_rounding: round bf16/fp16 parameters (and momenta) stochastically. Default True.
        compensation: None (default) or ``"kahan"`` (deterministic compensated rounding of bf16/fp16
            parameters, one extra buffer each; runs in PyTorch, so ``fused=True`` is refused with it).
        seed: int >= 0 seeding the rounding streams, or None (``torch.initial_seed()``).
        momentum_sr: with stochastic rounding, also round a bf16/fp16 momentum stochastically. Default True.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        beta: float = 0.965,
        weight_decay: float = 0.01,
        grad_accum_steps: int = 1,
        shrink_ratio: float = 0.99,
        rms_floor: float | None = None,
        momentum_dtype: torch.dtype | str | None = None,
        fold_in_backward: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        exact_nonfinite: bool = False,
        rms_cache: bool = True,
        stochastic_rounding: bool = True,
        compensation: str | None = None,
        seed: int | None = None,
        momentum_sr: bool = True,
    ) -> None:
        defaults = _validated({
            "lr": lr, "beta": beta, "weight_decay": weight_decay, "grad_accum_steps": grad_accum_steps,
            "shrink_ratio": shrink_ratio, "rms_floor": rms_floor,
        }, where="")
        self.momentum_dtype = F.parse_dtype("momentum_dtype", momentum_dtype)
        self.fold_in_backward = bool(F.check_flag("fold_in_backward", fold_in_backward, allow_none=False))
        self.foreach = F.check_flag("foreach", foreach)
        self.fused = F.check_flag("fused", fused)
        if self.fused and self.foreach:
            raise ValueError("fused=True and foreach=True are mutually exclusive")
        self.exact_nonfinite = bool(F.check_flag("exact_nonfinite", exact_nonfinite, allow_none=False))
        self.rms_cache = bool(F.check_flag("rms_cache", rms_cache, allow_none=False))
        self.seed = F.check_rounding(stochastic_rounding, compensation, seed, momentum_sr)
        self.stochastic_rounding, self.compensation, self.momentum_sr = stochastic_rounding, compensation, momentum_sr
        if self.fused and compensation is not None:
            raise ValueError("compensation='kahan' runs in PyTorch (foreach/single-tensor paths): use fused=None "
                             "or fused=False with it")
        # param -> Σθ² of the θ the fused kernel last wrote (not state: never saved, rebuilt after a resume)
        self._rms_cache: RMSCache | None = RMSCache() if self.rms_cache else None
        self._hooks = _Hooks()
        self._window: dict[Tensor, list[Any]] = {}  # param -> [folded a finite grad, saw a non-finite grad, folds]
        self._param_group: dict[Tensor, dict[str, Any]] = {}
        self._static: dict[int, tuple[tuple, tuple[int, bool, float, float]]] = {}  # id(param) -> see _settings
        super().__init__(params, defaults)
        all_params = [p for g in self.param_groups for p in g["params"]]
        if self.fused:
            if not F.fused_available_for(all_params):
                raise RuntimeError(
                    "fused=True but the compiled Tiger kernels are unavailable here (no C++ compiler, or the build "
                    "failed: see the FusedKernelWarning, or run `python -m lightning_tiger.optim.build`); use "
                    "fused=None to fall back to PyTorch"
                )
        elif self.fused is None and any(p.device.type == "cpu" for p in all_params):
            # Build (or load) the kernels now, so that a first build's one visible line comes while the run is set
            # up rather than as a silent stall of the first step; every rank constructs its optimizer, so the
            # ranks' agreement on the kernel stays symmetric.
            F.fused_available_for([p for p in all_params if p.device.type == "cpu"])
        if self.fold_in_backward:
            _refuse_distributed()
            self._hooks.active = True
            for group in self.param_groups:
                self._register_hooks(group)

    # ------------------------------------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (validated like the constructor's arguments); it joins the current micro-step count."""
        if "kind" in param_group:
            param_group["kind"] = ParamKind.parse(param_group["kind"], "param group 'kind'").value
        if "micro_step" not in param_group:
            param_group["micro_step"] = self.param_groups[0]["micro_step"] if self.param_groups else 0
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.update(_validated(group, where=f" (param group {len(self.param_groups) - 1})"))
        if isinstance(group["micro_step"], bool) or not isinstance(group["micro_step"], int) \
                or group["micro_step"] < 0:
            raise ValueError(f"micro_step must be an int >= 0, got {group['micro_step']!r}")
        for p in group["params"]:
            self._param_group[p] = group
        if self._hooks.active:
            self._register_hooks(group)

    def assign_kinds(self, module: nn.Module) -> dict[str, ParamKind]:
        """Classify by module type the parameters whose group has no ``"kind"`` key (see ``classify_parameters``).

        Call it when the optimizer was built from ``model.parameters()`` (LightningCLI does). The kinds are
        stored in the optimizer state (``state[p]["kind"]``), hence saved in checkpoints.

        Returns:
            ``{name: kind}`` of the parameters that were assigned.
        """
        named = dict(module.named_parameters())
        assigned: dict[str, ParamKind] = {}
        for name, kind in classify_parameters(module).items():
            p = named[name]
            group = self._param_group.get(p)
            if group is None or "kind" in group:
                continue
            self.state[p]["kind"] = kind.value
            assigned[name] = kind
        return assigned

    def _kind(self, p: Tensor, group: dict[str, Any]) -> ParamKind:
        if "kind" in group:
            return ParamKind(group["kind"])
        kind = self.state[p].get("kind") if p in self.state else None
        return ParamKind(kind) if kind is not None else ParamKind.from_ndim(p.ndim)

    def _settings(self, p: Tensor, group: dict[str, Any], lr: float,
                  state: dict[str, Any] | None = None) -> tuple[int, float, float, float, float]:
        """(lr_mode, lr, weight_decay, centre, floor) of one parameter, from its kind (SPEC §1.2 table)."""
        # The kind-dependent part is memoised per parameter (this runs for every tensor on every step; keyed by
        # id: Tensor.__hash__ is a Python function); the key holds everything it depends on, so assign_kinds,
        # load_state_dict or editing a group's "kind" / "rms_floor" / the parameter's shape recompute it.
        if state is None:
            state = self.state.get(p)
        key = (group.get("kind"), state.get("kind") if state else None, group["rms_floor"], p.shape)
        cached = self._static.get(id(p))
        if cached is None or cached[0] != key:
            kind = self._kind(p, group)
            floor = group["rms_floor"]
            if floor is None:
                floor = F.auto_rms_floor(p.shape)
            if kind in _HALF_LR_KINDS:
                static = (F.LR_CONSTANT, True, 1.0 if kind is ParamKind.NORM_SCALE else 0.0, floor)
            else:
                static = (F.LR_ROW_RMS if kind is ParamKind.EMBEDDING and p.ndim >= 2 else F.LR_RMS, False, 0.0, floor)
            cached = self._static[id(p)] = (key, static)
        mode, half, center, floor = cached[1]
        if half:
            return mode, 0.5 * lr, 0.0, center, floor
        return mode, lr, group["weight_decay"], center, floor

    def _momentum(self, p: Tensor) -> Tensor:
        return F.momentum_of(self.state[p], "momentum", p, self.momentum_dtype)

    # ------------------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One micro-step (the parameters move on every ``grad_accum_steps``-th call).

        Args:
            closure: re-evaluates the model and returns the loss (called with grad enabled, before the update;
                Lightning runs ``training_step`` + ``backward`` in it).

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._hooks.active:
            self._fold_step()
            return loss
        # torch.compile traces the PyTorch paths (the fused op is opaque to it and its flags come back to the host)
        compiling = torch.compiler.is_compiling()
        fused_mod = F.load_fused() if self.fused is not False and not self.foreach and not compiling else None
        # Groups that share this micro-step's coefficients are updated by ONE kernel call: one pass of the
        # thread pool over all tensors balances the threads better than one call per group.
        batches: dict[tuple[float, float, bool, float], _Batch] = {}
        sparse: list[tuple[Tensor, dict[str, Any]]] = []
        first = 0
        for group in self.param_groups:
            self._collect_group(group, batches, sparse, first)
            first += len(group["params"])
        # choose every batch's path first: a refused step (fused=True, a tensor the kernels cannot take) raises
        # before any tensor or counter moves
        paths = [F.step_path(self.fused, self.foreach, fused_mod, b.params, b.grads, b.moms,
                             kernel_ok=self._kernel_ok(fused_mod, b)) for b in batches.values()]
        for p, group in sparse:
            self._sparse_step(p, group)
        for ((b1, b2, update, shrink), batch), path in zip(batches.items(), paths):
            self._apply(batch, path, fused_mod, b1=b1, b2=b2, update=update, shrink_ratio=shrink)
        for group in self.param_groups:
            group["micro_step"] += 1
        return loss

    @staticmethod
    def _coefficients(group: dict[str, Any]) -> tuple[float, float, bool]:
        """(b1, b2, update) of the group's current micro-step (SPEC §1.2 accumulation)."""
        t, k, beta = group["micro_step"], group["grad_accum_steps"], group["beta"]
        return (beta if t % k == 0 else 1.0), (1.0 - beta) / k, (t + 1) % k == 0

    def _collect_group(self, group: dict[str, Any], batches: dict[tuple[float, float, bool, float], _Batch],
                       sparse: list[tuple[Tensor, dict[str, Any]]], first: int) -> None:
        b1, b2, update = self._coefficients(group)
        batch = None
        for index, p in enumerate(group["params"], start=first):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                sparse.append((p, group))
                continue
            if batch is None:
                batch = batches.setdefault((b1, b2, update, group["shrink_ratio"]), _Batch())
            state = self.state[p]
            m = F.momentum_of(state, "momentum", p, self.momentum_dtype)
            batch.params.append(p)
            batch.grads.append(p.grad)
            batch.moms.append(m)
            batch.settings.append(self._settings(p, group, group["lr"], state))
            batch.sr.append(self._sr_state(state, p, m, index))
            batch.kahan.append(self._kahan(state, p))

    def _sr_state(self, state: dict[str, Any], p: Tensor, m: Tensor, index: int | None) -> dict[str, Any] | None:
        """The state dict holding p's rounding generator when its update rounds stochastically, else None.

        ``index``: p's position in the flat parameter order (None: looked up, only when the stream is created).
        """
        if not F.sr_key_needed(self.stochastic_rounding, self.compensation, self.momentum_sr, p, m):
            return None
        if index is None and "sr_stream" not in state:
            index = self._flat_index(p)
        return F.sr_state(state, p, self.seed, index or 0)

    def _kahan(self, state: dict[str, Any], p: Tensor) -> Tensor | None:
        if self.compensation != "kahan" or not F.is_low_precision(p):
            return None
        return F.kahan_buffer(state, p)

    def _kernel_ok(self, fused_mod: Any, batch: _Batch) -> bool:
        """Whether the fused kernels implement this batch's rounding (stochastic or nearest: yes; Kahan: no)."""
        return all(c is None for c in batch.kahan)

    def _apply(self, batch: _Batch, path: str, fused_mod: Any, **coefs: Any) -> None:
        params, grads, moms = batch.params, batch.grads, batch.moms
        modes, lrs, wds, centers, floors = (list(x) for x in zip(*batch.settings))
        kwargs = dict(lr_modes=modes, lrs=lrs, weight_decays=wds, centers=centers, rms_floor=floors, **coefs)
        keys = F.sr_keys_of(batch.sr)
        if path == "fused":
            kwargs.update(F.fused_rounding_kwargs(keys, self.momentum_sr))
            fused_mod.tiger_step_(params, grads, moms, exact=self.exact_nonfinite, rms_cache=self._rms_cache,
                                  **kwargs)
        else:
            F.tiger_step_(params, grads, moms, keys=keys, momentum_sr=self.momentum_sr, kahan=batch.kahan,
                          foreach=path == "foreach", **kwargs)
        F.sr_advance(batch.sr)

    def _sparse_step(self, p: Tensor, group: dict[str, Any]) -> None:
        b1, b2, update = self._coefficients(group)
        k = group["grad_accum_steps"]
        if k != 1:
            raise RuntimeError(
                "Tiger: sparse gradients need grad_accum_steps=1 (lazy row updates cannot fold a window whose "
                f"micro-steps touch different rows); got grad_accum_steps={k}"
            )
        mode, lr, wd, center, floor = self._settings(p, group, group["lr"])
        F.tiger_sparse_step_(p, p.grad, self._momentum(p), lr_mode=mode, lr=lr, weight_decay=wd, center=center,
                             rms_floor=floor, b1=b1, b2=b2, update=update, shrink_ratio=group["shrink_ratio"])

    # ------------------------------------------------------------------------------------ tight-fisted mode
    def _register_hooks(self, group: dict[str, Any]) -> None:
        self._hooks.owner_id = id(self)
        hook = functools.partial(_fold_hook, weakref.ref(self))
        for p in group["params"]:
            if p.requires_grad:
                self._hooks.handles.append(p.register_post_accumulate_grad_hook(hook))

    @torch.no_grad()
    def _fold(self, p: Tensor) -> None:
        """Fold ``p.grad`` into the momentum (hook body); never touches ``p`` itself. Frees ``p.grad``.

        No host synchronisation: the finiteness of the gradient, and whether a finite gradient was already
        folded in this window (which decides b1), stay on the device as 0-dim bool tensors.
        """
        g = p.grad
        if g is None:
            return
        _refuse_distributed()
        if g.is_sparse:
            raise RuntimeError("Tiger(fold_in_backward=True) does not support sparse gradients")
        group = self._param_group[p]
        window = self._window.get(p)  # [folded a finite grad, saw a non-finite grad, folds so far] or None
        t, k, beta = group["micro_step"], group["grad_accum_steps"], group["beta"]
        b1: float | Tensor = 1.0
        if t % k == 0:
            b1 = beta if window is None else torch.where(window[0], 1.0, beta)
        state = self.state[p]
        m = self._momentum(p)
        st = self._sr_state(state, p, m, None)
        key = None
        if st is not None and self.momentum_sr and F.is_low_precision(m):
            key = F.sr_fold_key(st, 0 if window is None else window[2])
        # Pure PyTorch on purpose: the fused op declares θ mutable, so calling it here would bump θ's
        # version counter inside backward (autograd may still need θ).
        bad = F.tiger_fold_(g, m, b1, (1.0 - beta) / k, key)
        if window is None:
            self._window[p] = [bad.logical_not(), bad, 1]
        else:
            window[0] = window[0] | bad.logical_not()
            window[1] = window[1] | bad
            window[2] += 1
        p.grad = None

    def _flat_index(self, p: Tensor) -> int:
        """Position of ``p`` in the optimizer's flat parameter order (its stochastic-rounding stream)."""
        return next(i for i, q in enumerate(q for g in self.param_groups for q in g["params"]) if q is p)

    def _fold_step(self) -> None:
        _refuse_distributed()
        first = 0
        for group in self.param_groups:
            update = (group["micro_step"] + 1) % group["grad_accum_steps"] == 0
            params, moms, bads, folded, settings, srs, kahans = [], [], [], [], [], [], []
            for index, p in enumerate(group["params"], start=first):
                window = self._window.get(p)
                if window is None:
                    continue
                state = self.state[p]
                params.append(p)
                moms.append(state["momentum"])
                folded.append(window[0])
                bads.append(window[1])
                settings.append(self._settings(p, group, group["lr"]))
                srs.append(self._sr_state(state, p, state["momentum"], index))
                kahans.append(self._kahan(state, p))
            first += len(group["params"])
            if params:
                modes, lrs, wds, centers, floors = (list(x) for x in zip(*settings))
                F.tiger_fold_update_(params, moms, bads, folded, lr_modes=modes, lrs=lrs, weight_decays=wds,
                                     centers=centers, rms_floor=floors, update=update,
                                     shrink_ratio=group["shrink_ratio"], keys=F.sr_keys_of(srs), kahan=kahans)
                F.sr_advance(srs)
            group["micro_step"] += 1
        self._window.clear()

    def remove_hooks(self) -> None:
        """Remove the fold-in-backward hooks; afterwards ``step()`` reads ``.grad`` like the standard mode."""
        for handle in self._hooks.handles:
            handle.remove()
        self._hooks.handles.clear()
        self._hooks.active = False
        self._window.clear()

    def __del__(self) -> None:
        # Only the optimizer that registered the hooks removes them: wrappers that copy our __dict__ (Lightning's
        # LightningOptimizer subclasses the optimizer's class) share ``_hooks`` and die earlier.
        with contextlib.suppress(Exception):  # interpreter shutdown: attributes may already be gone
            if self._hooks.owner_id == id(self):
                self.remove_hooks()

    # ------------------------------------------------------------------------------------------- state I/O
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; the momentum keeps ``momentum_dtype`` (torch would cast it to the param dtype)."""
        # torch's _cast turns string state values into generators: take the kinds out and put them back.
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        kinds = {i: s["kind"] for i, s in state_dict["state"].items() if isinstance(s, dict) and "kind" in s}
        if kinds:
            state_dict = dict(state_dict)
            state_dict["state"] = {i: {k: v for k, v in s.items() if k != "kind"} if i in kinds else s
                                   for i, s in state_dict["state"].items()}
        state_dict, generators = F.split_int_state(state_dict)
        super().load_state_dict(state_dict)
        F.restore_int_state(self, saved_ids, generators)
        self._param_group = {p: g for g in self.param_groups for p in g["params"]}
        id_to_param = dict(zip(saved_ids, (p for g in self.param_groups for p in g["params"])))
        for i, kind in kinds.items():
            self.state[id_to_param[i]]["kind"] = ParamKind.parse(kind, "state 'kind'").value
        F.cast_momenta(self.state.values(), "momentum", self.momentum_dtype)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(momentum_dtype=self.momentum_dtype, fold_in_backward=self.fold_in_backward,
                     foreach=self.foreach, fused=self.fused, exact_nonfinite=self.exact_nonfinite,
                     rms_cache=self.rms_cache, stochastic_rounding=self.stochastic_rounding,
                     compensation=self.compensation, seed=self.seed, momentum_sr=self.momentum_sr)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Called by load_state_dict (keep our settings) and by unpickling/deepcopy (a fresh object: a copy holds
        # other tensors than the hooked ones, so it starts in the standard mode).
        for key, default in (("momentum_dtype", None), ("fold_in_backward", False), ("foreach", None),
                             ("fused", None), ("exact_nonfinite", False), ("rms_cache", True),
                             ("stochastic_rounding", False), ("compensation", None), ("seed", 0),
                             ("momentum_sr", True)):
            state.setdefault(key, self.__dict__.get(key, default))
        super().__setstate__(state)
        self.__dict__.setdefault("_static", {})
        if "_rms_cache" not in self.__dict__:
            self._rms_cache = RMSCache() if self.rms_cache else None
        if "_hooks" not in self.__dict__:
            self._hooks = _Hooks()
            self._window = {}
        self._param_group = {p: g for g in self.param_groups for p in g["params"]}


def _refuse_distributed() -> None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError(
            "Tiger(fold_in_backward=True) is not supported with torch.distributed world_size > 1: the "
            "post-accumulate-grad hooks see each rank's local, un-reduced gradient (before DDP's all-reduce), "
            "so the replicas' momenta would diverge. Use fold_in_backward=False under DDP."
        )


def _validated(group: dict[str, Any], where: str) -> dict[str, Any]:
    """Checked hyperparameters of one group (``where`` names the group in error messages)."""
    out = {
        "lr": F.check_float(f"lr{where}", group["lr"], low=0.0, high=None),
        "beta": F.check_float(f"beta{where}", group["beta"], low=0.0, high=1.0),
        "weight_decay": F.check_float(f"weight_decay{where}", group["weight_decay"], low=0.0, high=None),
        "shrink_ratio": F.check_float(f"shrink_ratio{where}", group["shrink_ratio"], low=0.0, high=1.0,
                                      low_open=True, high_open=False),
    }
    k = group["grad_accum_steps"]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"grad_accum_steps{where} must be an int >= 1, got {k!r}")
    out["grad_accum_steps"] = k
    floor = group["rms_floor"]
    out["rms_floor"] = None if floor is None else F.check_float(f"rms_floor{where}", floor, low=0.0, high=None)
    return out
