"""Training: the whole training split on the device, mini-batches drawn by index.

:func:`train` builds a model for a :class:`~sams_core.data.screen.PerturbationData` and a split, fits it
with Adam and returns it with its per-epoch history; :func:`fit` does the same for a model that
already exists. The state with the best validation loss is kept. Progress is reported through a
callback (tqdm on the command line, ``st.progress`` in the app).

:func:`fit` is a short loop over a :class:`TrainStep`, the object that owns everything one
optimisation step needs (model or its DDP wrapper, Adam, the cut of a batch into shards,
autocast) and keeps the running sums of the loss and the ELBO terms on the device; the loop reads
them once per epoch. Validation (:func:`validate`) and the best-state keeping are beside it.

GPU (DESIGN §6): ``TrainConfig(compile="default")`` compiles the whole step (gather of the batch,
forward, backward, clipping, Adam) into one graph with ``torch.compile(fullgraph=True)``;
``compile="reduce-overhead"`` also captures it in a CUDA graph on a GPU. Shapes are static: the
last partial batch of an epoch is dropped (``drop_last``), or run eagerly with
``drop_last=False``. When compiling is unavailable or fails, training continues eagerly and says
why (a warning, and ``TrainResult.notes``). ``TrainConfig(data_dtype="float16")`` halves the
memory of the expression matrix on the device when the values are exact in float16.

Scale (DESIGN §7):

- inside a ``torch.distributed`` process group (``torchrun``), :func:`fit` wraps the model in
  ``DistributedDataParallel``: all ranks draw the same permutation from the shared seed, each
  mini-batch is cut into one shard per rank, every rank computes the loss of its shard and DDP
  all-reduces the gradients; validation is reduced over ranks and only rank 0 reports progress.
  See :mod:`sams_core.training.distributed` and ``TrainConfig.shards``;
- when ``X`` is a backed ``.h5ad`` matrix (:func:`sams_core.data.backed.read_h5ad_backed`), or with
  ``TrainConfig(chunked=True)``, cells are read in chunks of rows (shuffled by chunk, then within
  a shuffle buffer of chunks) instead of being held on the device all at once.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import time
import types
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch.optim.adam import adam as adam_update

from sams_core.data.batches import (
    STORAGES,
    ChunkedSource,
    DeviceData,
    _is_backed,
    condition_ids,
    covariate_matrix,
    default_device,
)
from sams_core.data.screen import PerturbationData
from sams_core.data.splits import TRAIN, VAL
from sams_core.errors import SamsError
from sams_core.models.base import Batch, LossOutput, PerturbationModel
from sams_core.training import distributed
from sams_core.training.build import build_for_data

ProgressFn = Callable[["EpochRecord"], None]


PRECISIONS: tuple[str, ...] = ("float32", "bf16-mixed")
COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead")
"""``torch.compile`` modes of the training step; ``reduce-overhead`` adds CUDA graphs on a GPU."""


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the networks' matrix products (``bf16-mixed``), else nothing.

    Weights, optimiser state and the likelihood stay in float32.
    """
    if precision not in PRECISIONS:
        raise SamsError(f"Unknown precision {precision!r}. Choose one of: {', '.join(PRECISIONS)}.")
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class TrainConfig:
    """How to train: budget (epochs or steps), optimiser, particles, stopping, device, seed."""

    epochs: int = 100
    max_steps: int | None = None
    batch_size: int = 512
    lr: float = 1e-3
    n_particles: int = 5
    grad_clip: float | None = None
    early_stopping: int | None = None
    seed: int = 0
    device: str | None = None
    val_batch_size: int = 4096
    global_lr_scale: float = 10.0
    precision: str = "float32"
    # Cut every mini-batch into this many contiguous shards, each with its own noise stream
    # seeded from (seed, step, shard); the gradient is the cell-weighted mean over shards, i.e.
    # that of the whole batch. Under DistributedDataParallel the default is one shard per rank
    # (must be a multiple of the number of ranks); on one process ``shards=N`` reproduces an
    # N-process run exactly (and is gradient accumulation). None on one process: no sharding.
    shards: int | None = None
    # None: use DistributedDataParallel when a torch.distributed process group is running.
    distributed: bool | None = None
    # Read the training/validation cells in chunks of ``chunk_size`` rows (shuffled by chunk,
    # then within ``chunks_per_buffer`` chunks) instead of holding them on the device.
    # None: automatic, on when X is a backed .h5ad matrix (sams_core.data.backed).
    chunked: bool | None = None
    chunk_size: int | None = None
    chunks_per_buffer: int = 8
    # torch.compile the whole step with fullgraph=True: "default", or "reduce-overhead" (CUDA
    # graphs on a GPU). None: eager. Single-process, unsharded training only; anything else, or a
    # failure to compile, trains eagerly and says why (a warning and TrainResult.notes).
    compile: str | None = None
    # Leave out the last partial batch of every epoch (static shapes). None: leave it out when
    # compiling; with compile and drop_last=False it runs eagerly.
    drop_last: bool | None = None
    # How the expression matrix is held on the device: "float16" halves its memory when every
    # value is exact in float16 (integer counts up to 2048), else it stays float32 with a warning.
    data_dtype: str = "float32"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def drops_last(self) -> bool:
        """Whether epochs leave out their last partial batch (``drop_last``, by default when compiling)."""
        return self.compile is not None if self.drop_last is None else bool(self.drop_last)


@dataclass
class EpochRecord:
    """One epoch of history: losses, ELBO terms, mask sparsity, timing."""

    epoch: int
    step: int
    train_loss: float
    val_loss: float | None
    terms: dict[str, float]
    mask_frac_high: float | None
    mask_frac_low: float | None
    seconds: float
    total_epochs: int
    val_seconds: float = 0.0
    phase: str | None = None  # the model's training-schedule phase during this epoch

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update({f"term_{k}": v for k, v in d.pop("terms").items()})
        return d


@dataclass
class TrainResult:
    """History of a run, where its kept (best-validation) state came from, and how it ran.

    ``compiled`` is the ``torch.compile`` mode the step ran with (None: eagerly); ``cuda_graphs``
    whether it was captured in CUDA graphs; ``data_bytes`` what the training cells hold on the
    device (0 when read in chunks); ``notes`` say why anything asked for did not happen (a compile
    that fell back to eager, float16 storage refused).
    """

    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = -1
    best_phase: str | None = None  # the schedule phase the kept state is from
    best_val_loss: float = math.inf
    seconds: float = 0.0
    stopped_early: bool = False
    compiled: str | None = None
    cuda_graphs: bool = False
    data_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def history_table(self) -> list[dict[str, Any]]:
        return [h.as_dict() for h in self.history]


def mask_sparsity(model: PerturbationModel) -> tuple[float | None, float | None]:
    """Fraction of mask probabilities ≥ 0.5 and ≤ 0.2 (None without masks)."""
    p = model.mask_probs()
    if p is None:
        return None, None
    p = p.detach()
    return float((p >= 0.5).float().mean()), float((p <= 0.2).float().mean())


# ---- where a run trains ----------------------------------------------------------------------
@dataclass(frozen=True)
class Placement:
    """Where a run trains: its device, and how every mini-batch is cut over processes.

    ``n_shards`` contiguous shards per batch (1 when not ``sharded``), shard s computed by rank
    ``s % world``; ``ddp``: the model is wrapped in DistributedDataParallel.
    """

    device: torch.device
    ddp: bool = False
    rank: int = 0
    world: int = 1
    n_shards: int = 1
    sharded: bool = False

    @property
    def my_shards(self) -> list[int]:
        """The shards of each batch that this process computes."""
        return list(range(self.rank, self.n_shards, self.world))

    @classmethod
    def for_config(cls, cfg: TrainConfig) -> Placement:
        """The placement ``cfg`` asks for in this process (raises :class:`SamsError` when it cannot be had)."""
        use_ddp = distributed.active() if cfg.distributed is None else bool(cfg.distributed)
        if use_ddp and not distributed.active():
            raise SamsError(
                "distributed=True needs a torch.distributed process group. Launch with torchrun: "
                "python -m torch.distributed.run --standalone --nproc_per_node=N -m sams_core train ..."
            )
        world = distributed.world_size() if use_ddp else 1
        rank = distributed.rank() if use_ddp else 0
        sharded = use_ddp or cfg.shards is not None
        n_shards = (world if cfg.shards is None else int(cfg.shards)) if sharded else 1
        if n_shards < 1 or n_shards % world:
            raise SamsError(f"shards ({n_shards}) must be a positive multiple of the number of processes ({world}).")
        if use_ddp and (not cfg.device or torch.device(cfg.device).index is None):
            device = distributed.rank_device(cfg.device)
        else:
            device = torch.device(cfg.device) if cfg.device else default_device()
        return cls(device, use_ddp, rank, world, n_shards, sharded)


def _check_config(cfg: TrainConfig) -> None:
    """Refuse settings that cannot train, before any work, with the fix in the message."""
    if cfg.batch_size < 1 or cfg.n_particles < 1 or cfg.lr <= 0:
        raise SamsError("batch_size and n_particles must be ≥ 1 and lr > 0.")
    if cfg.compile is not None and cfg.compile not in COMPILE_MODES:
        raise SamsError(f"Unknown compile mode {cfg.compile!r}. Choose one of: {', '.join(COMPILE_MODES)}, or None (eager).")
    if cfg.data_dtype not in STORAGES:
        raise SamsError(f"Unknown data_dtype {cfg.data_dtype!r}. Choose one of: {', '.join(STORAGES)}.")
    autocast_context(torch.device("cpu"), cfg.precision)  # validates the precision


def _sources(model: PerturbationModel, data: PerturbationData, split: np.ndarray, cfg: TrainConfig, device: torch.device) -> tuple[Any, Any]:
    """The training cells and the validation cells (None without any) as batch sources on ``device``."""
    cond = condition_ids(model, data)
    chunked = _is_backed(data.X) if cfg.chunked is None else bool(cfg.chunked)

    def source(idx: np.ndarray) -> Any:
        if chunked:
            return ChunkedSource(
                data.X, idx, data.dosages, data.library, cond, device, cfg.chunk_size, cfg.chunks_per_buffer,
                storage=cfg.data_dtype, covariates=covariate_matrix(data),
            )
        return DeviceData(data, idx, device, cond, storage=cfg.data_dtype)

    val_idx = np.flatnonzero(split == VAL)
    return source(np.flatnonzero(split == TRAIN)), (source(val_idx) if val_idx.size else None)


def _wrap_ddp(model: PerturbationModel) -> torch.nn.Module:
    """``model`` in DistributedDataParallel; its buffers (input statistics, counts) are fixed before
    training, so they are synced once, not at every step."""
    ddp_cls = torch.nn.parallel.DistributedDataParallel
    no_buffer_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(ddp_cls.__init__).parameters
        else {"broadcast_buffers": False}
    )
    return ddp_cls(model, **no_buffer_sync)


def _own_code(method: Any) -> Any:
    """``method`` with a code object of its own. torch.compile keeps its graphs, and counts them
    against its recompile limit, per code object: without this, every model trained in one process
    would add to one shared count and the ninth would stop compiling."""
    f = method.__func__
    g = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    return types.MethodType(g, method.__self__)


def _scalar_dtype() -> torch.dtype:
    """The dtype Adam gives its step counters (float64 only under a float64 default)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


# ---- one optimisation step -------------------------------------------------------------------
class TrainStep:
    """One optimisation step of a model on a mini-batch of training cells given by position.

    Owns what a step needs: the model (wrapped in DistributedDataParallel under a process group),
    Adam over the model's parameter groups (networks at ``lr``, per-perturbation globals at
    ``lr × global_lr_scale``), the cut of every batch into shards with their noise streams
    (:class:`Placement`), autocast, and the running sums of the loss and of each ELBO term, one slot
    per shard, which stay on the device: a step never reads a value back to the host. The loop
    reads them once per epoch with :meth:`epoch_means`.

    A step is: gather the batch, the loss (``model.loss``), its gradient, clipping, Adam's update
    (``torch.optim.adam.adam`` on the optimiser's own state, the update ``Adam.step`` makes).
    With ``TrainConfig(compile=...)`` the whole of it is one ``torch.compile(fullgraph=True)``
    graph with static shapes; the first step after the optimiser (re)starts runs eagerly, creating
    Adam's state and the running sums that the compiled steps then update in place, and a batch of
    another size (the last, partial one) runs eagerly too.
    """

    def __init__(self, model: PerturbationModel, source: Any, cfg: TrainConfig, placement: Placement):
        self.model = model
        self.source = source
        self.cfg = cfg
        self.placement = placement
        self.net: torch.nn.Module | None = _wrap_ddp(model) if placement.ddp else model
        self.groups = [
            {**g, "params": [p for p in g["params"] if p.requires_grad]}
            for g in model.parameter_groups(cfg.lr, cfg.global_lr_scale)
        ]
        self.params = [p for g in self.groups for p in g["params"]]
        # the gradient norm sums over parameters in the model's order, as clip_grad_norm_ does
        pos = {id(p): i for i, p in enumerate(self.params)}
        self._norm_order = [pos[id(p)] for p in model.parameters() if id(p) in pos]
        self.loss_sum = torch.zeros(placement.n_shards, device=placement.device)
        self.term_sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.compiled: str | None = None
        self.cuda_graphs = False
        self.notes: list[str] = list(getattr(source, "notes", []))
        self._compiled_fn: Callable[[Any], None] | None = None
        self._tried = False  # whether the compiled function has run (compiled) once
        self._static = False  # whether tensors the step updates are marked for CUDA graphs
        on_cuda = placement.device.type == "cuda"
        # Adam's step counters on the device when compiling for a GPU: no host tensor in the graph
        self._capturable = cfg.compile is not None and on_cuda
        self.restart_optimizer()
        if cfg.compile is not None:
            self.compile(cfg.compile)

    # ---- optimiser ------------------------------------------------------------------------
    def restart_optimizer(self) -> None:
        """A new Adam over the same parameter groups: no running moments (after a model re-expresses
        its parameters or its schedule changes the objective, see :meth:`PerturbationModel.end_epoch`)."""
        self.opt = torch.optim.Adam([g for g in self.groups if g["params"]], capturable=self._capturable)
        self._warm = False

    def _adam_state(self, p: torch.nn.Parameter, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Adam's state of ``p``, created as ``torch.optim.Adam`` creates it on its first step."""
        state = self.opt.state[p]
        if not state:
            host_step = not (group["capturable"] or group["fused"])  # Adam keeps `step` on the host then
            state["step"] = torch.zeros((), dtype=_scalar_dtype(), device="cpu" if host_step else p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            self._mark_static(state.values())
        return state

    def _update(self, grads: Sequence[torch.Tensor | None]) -> None:
        """Clip the gradients (``grad_clip``, as ``clip_grad_norm_``) and apply Adam's update."""
        if self.cfg.grad_clip:
            present = [g for g in (grads[i] for i in self._norm_order) if g is not None]
            total = torch.nn.utils.get_total_norm(present, 2.0)
            coef = torch.clamp(float(self.cfg.grad_clip) / (total + 1e-6), max=1.0)
            for g in present:
                g.mul_(coef)
        k = 0
        for group in self.opt.param_groups:
            n = len(group["params"])
            live = [(p, g) for p, g in zip(group["params"], grads[k : k + n]) if g is not None]
            k += n
            if not live:
                continue
            states = [self._adam_state(p, group) for p, _ in live]
            beta1, beta2 = group["betas"]
            with torch.no_grad():
                adam_update(
                    [p for p, _ in live], [g for _, g in live],
                    [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states],
                    amsgrad=False, has_complex=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                    weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
                    foreach=group["foreach"], capturable=group["capturable"], differentiable=False,
                    fused=group["fused"], grad_scale=None, found_inf=None,
                    decoupled_weight_decay=group["decoupled_weight_decay"],
                )

    # ---- running sums ---------------------------------------------------------------------
    def begin_epoch(self) -> None:
        """Zero the running sums (in place: compiled steps hold on to them)."""
        self.loss_sum.zero_()
        for t in self.term_sums.values():
            t.zero_()

    def _accumulate(self, shard: int, out: LossOutput, weight: float) -> None:
        loss = out.loss.detach()
        self.loss_sum[shard] += loss if weight == 1.0 else loss * weight
        for k, v in out.terms.items():
            acc = self.term_sums.get(k)
            if acc is None:
                acc = self.term_sums[k] = torch.zeros(self.placement.n_shards, device=self.placement.device)
                self._mark_static([acc])
            acc[shard] += v if weight == 1.0 else v * weight

    def epoch_means(self, n_steps: int) -> tuple[float, dict[str, float]]:
        """Mean training loss and ELBO terms per step this epoch (summed over ranks): the one read
        from the device per epoch."""
        sums = torch.stack([self.loss_sum, *self.term_sums.values()])
        if self.placement.ddp:
            sums = distributed.all_reduce_sum(sums)
        totals = sums.sum(1).tolist()
        return totals[0] / n_steps, {k: v / n_steps for k, v in zip(self.term_sums, totals[1:])}

    # ---- the step -------------------------------------------------------------------------
    def __call__(self, idx: torch.Tensor) -> None:
        """One optimisation step on the training cells at positions ``idx``."""
        if self.placement.sharded:
            self._sharded_step(idx)
        elif self._compiled_fn is not None and self._warm and idx.numel() == self.cfg.batch_size:
            self._compiled_step(idx)
        else:
            self._positions_step(idx)
        self._warm = True
        self.steps += 1

    def _positions_step(self, idx: torch.Tensor) -> None:
        self._batch_step(self.source.batch(idx))

    def _batch_step(self, batch: Batch) -> None:
        with autocast_context(self.placement.device, self.cfg.precision):
            out = self.model.loss(batch, self.cfg.n_particles)
        grads = torch.autograd.grad(out.loss, self.params, allow_unused=True)
        self._update(grads)
        self._accumulate(0, out, 1.0)

    def _sharded_step(self, idx: torch.Tensor) -> None:
        """Each of this process's shards: its own noise stream, its loss weighted by its share of the
        batch (times the number of ranks, which DDP's gradient averaging divides out)."""
        pl, cfg = self.placement, self.cfg
        for p in self.params:
            p.grad = None
        nb = int(idx.numel())
        bounds = distributed.shard_bounds(nb, pl.n_shards)
        mine = pl.my_shards
        for j, s in enumerate(mine):
            lo, hi = bounds[s]
            w = (hi - lo) / nb
            # an empty shard (batch smaller than the shard count) still joins the gradient
            # all-reduce, with one cell at weight 0
            piece = idx[lo:hi] if hi > lo else idx[:1]
            # noise that depends on (seed, step, shard) only: the same draws whatever the number of
            # processes the shards are spread over
            distributed.seed_noise(pl.device, distributed.noise_seed(cfg.seed, distributed.TRAIN_NOISE, self.steps, s))
            sync = self.net.no_sync() if (pl.ddp and j < len(mine) - 1) else contextlib.nullcontext()
            with sync:
                with autocast_context(pl.device, cfg.precision):
                    out = self.net(self.source.batch(piece), cfg.n_particles)
                (out.loss * (w * pl.world)).backward()
            self._accumulate(s, out, w)
        self._update([p.grad for p in self.params])

    # ---- compiling ------------------------------------------------------------------------
    def compile(self, mode: str = "default", backend: str | Callable[..., Any] = "inductor") -> None:
        """Compile the whole step with ``torch.compile(fullgraph=True, dynamic=False)``, or record why
        it runs eagerly (``TrainConfig(compile=mode)`` calls this; ``backend`` is for tests).

        Compilation happens at the first compiled step; if it fails there (a graph break, no C++
        compiler), that step and the rest run eagerly and :attr:`notes` says why.
        """
        device = self.placement.device
        if self.placement.sharded:
            self._fall_back("compile runs single-process training without shards; this run is sharded "
                            "(DistributedDataParallel or TrainConfig.shards)")
            return
        if not torch._dynamo.is_dynamo_supported():
            self._fall_back("torch.compile is not supported with this Python or platform")
            return
        if not hasattr(torch._dynamo.config, "trace_autograd_ops"):
            self._fall_back(f"tracing the backward pass into the step's graph needs torch 2.11 or later (this is {torch.__version__})")
            return
        if mode == "reduce-overhead" and device.type != "cuda":
            self.notes.append(f"compile='reduce-overhead' captures CUDA graphs on a GPU only; on {device.type} the step is compiled without them")
            mode = "default"
        self._in_graph_gather = bool(getattr(self.source, "gathers_on_device", False))
        fn = _own_code(self._positions_step if self._in_graph_gather else self._batch_step)
        options = {"mode": mode} if backend == "inductor" else {}
        self._compiled_fn = torch.compile(fn, fullgraph=True, dynamic=False, backend=backend, **options)
        self._mode = mode
        self._static = True
        if self._in_graph_gather:  # the data is read in place by the captured graph, not copied
            self._mark_static(self.source.tensors)
        self._mark_static([self.loss_sum])

    def _mark_static(self, tensors: Any) -> None:
        """Tell CUDA graphs that these tensors keep their address (read or updated in place)."""
        if self._static:
            for t in tensors:
                torch._dynamo.mark_static_address(t)

    def _compiled_step(self, idx: torch.Tensor) -> None:
        arg = idx if self._in_graph_gather else self.source.batch(idx)
        if self._tried:
            with torch._dynamo.config.patch(trace_autograd_ops=True):
                self._compiled_fn(arg)
            return
        skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
        try:
            with torch._dynamo.config.patch(trace_autograd_ops=True):
                self._compiled_fn(arg)
        except Exception as err:  # noqa: BLE001 - any failure to compile means: train eagerly
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            self._fall_back(f"torch.compile failed ({type(err).__name__}: {first[:300]})")
            self._positions_step(idx)
            return
        self._tried = True
        self.compiled = self._mode
        if self._mode == "reduce-overhead":
            skipped = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] - skips
            self.cuda_graphs = skipped == 0
            if skipped:
                self.notes.append("CUDA graphs were skipped for the compiled step; run with TORCH_LOGS=cudagraphs to see why")

    def _fall_back(self, why: str) -> None:
        """Train eagerly from here on, and say why."""
        self._compiled_fn = None
        self.compiled = None
        note = f"compile={self.cfg.compile!r} fell back to eager: {why}."
        self.notes.append(note)
        warnings.warn(note, RuntimeWarning, stacklevel=3)

    def close(self) -> None:
        """Drop the DDP wrapper (and its gradient hooks on the model's parameters)."""
        self.net = None


# ---- the loop and what it calls ----------------------------------------------------------------
def _epochs(n_train: int, cfg: TrainConfig) -> int:
    """Epochs to run: ``epochs``, or enough for ``max_steps``."""
    if cfg.drops_last and n_train < cfg.batch_size:
        raise SamsError(
            f"Only {n_train} training cells, fewer than one batch of {cfg.batch_size}, and the last partial "
            "batch is left out (drop_last, the default when compiling). Lower batch_size or set drop_last=False."
        )
    full = n_train // cfg.batch_size
    steps_per_epoch = max(1, full if cfg.drops_last else math.ceil(n_train / cfg.batch_size))
    return cfg.epochs if cfg.max_steps is None else math.ceil(cfg.max_steps / steps_per_epoch)


def _train_epoch(step: TrainStep, order: torch.Tensor, n_train: int, cfg: TrainConfig) -> int:
    """The steps of one epoch over the positions in ``order``; returns how many were taken."""
    stop = n_train - n_train % cfg.batch_size if cfg.drops_last else n_train
    step.begin_epoch()
    taken = 0
    for i in range(0, stop, cfg.batch_size):
        if cfg.max_steps is not None and step.steps >= cfg.max_steps:
            break
        step(order[i : i + cfg.batch_size])
        taken += 1
    return taken


def _neg_elbo(out: LossOutput) -> torch.Tensor:
    """The paper's negative ELBO per cell of a loss: the ``neg_elbo`` term where the model reports
    one (it differs from the loss while a schedule weights the prior terms), else the loss."""
    return out.terms.get("neg_elbo", out.loss)


@torch.no_grad()
def evaluate_loss(model: PerturbationModel, dd: DeviceData, n_particles: int, batch_size: int) -> float:
    """Mean (untempered) negative ELBO per cell over all cells in ``dd``."""
    model.eval()
    total = torch.zeros((), device=dd.device)
    for b in dd.batches(batch_size):
        total += _neg_elbo(model.loss(b, n_particles)) * b.size
    model.train()
    return float(total) / max(dd.n, 1)


@torch.no_grad()
def _sharded_val_loss(model: PerturbationModel, va: Any, cfg: TrainConfig, pl: Placement, epoch: int) -> float:
    """Mean negative ELBO per validation cell, the cells cut into ``pl.n_shards`` pieces over ranks.

    Each shard is evaluated with noise seeded from (seed, epoch, shard) and its sum kept in its
    own slot, so the total (summed over slots after the all-reduce) does not depend on how the
    shards are spread over processes.
    """
    model.eval()
    totals = torch.zeros(pl.n_shards, dtype=torch.float64, device=pl.device)
    for s, (lo, hi) in enumerate(distributed.shard_bounds(va.n, pl.n_shards)):
        if s % pl.world != pl.rank or hi <= lo:
            continue
        distributed.seed_noise(pl.device, distributed.noise_seed(cfg.seed, distributed.VAL_NOISE, epoch, s))
        for b in va.batches(cfg.val_batch_size, lo, hi):
            totals[s] += _neg_elbo(model.loss(b, cfg.n_particles)).double() * b.size
    distributed.all_reduce_sum(totals)
    model.train()
    return float(totals.sum()) / max(va.n, 1)


def validate(model: PerturbationModel, va: Any, cfg: TrainConfig, pl: Placement, epoch: int) -> float | None:
    """Mean negative ELBO per validation cell after ``epoch`` (0-based), in float32; None without
    validation cells. Sharded runs reduce it over ranks, with noise that does not depend on them.

    It is the paper's (untempered) ELBO whatever prior weight the schedule trains with; :func:`fit`
    calls it with global terms charged to the validation split's N_t
    (:meth:`~sams_core.models.base.PerturbationModel.charged_to`)."""
    if va is None:
        return None
    if pl.sharded:
        return _sharded_val_loss(model, va, cfg, pl, epoch)
    return evaluate_loss(model, va, cfg.n_particles, cfg.val_batch_size)


class _BestState:
    """The lowest score so far (validation loss, else training loss), the model state that reached
    it, and the epochs since; it writes the score, epoch and schedule phase into the run's result.

    Only states of the schedule's current phase are kept (an earlier phase trained another
    objective or another basis). A better state of an earlier phase is not dropped silently:
    :meth:`note` says which it was and where the kept state comes from.
    """

    def __init__(self, result: TrainResult):
        self.result = result
        self.state: dict[str, torch.Tensor] | None = None
        self.since = 0
        self.passed: tuple[float, int, str | None] | None = None  # best of the earlier phases

    def offer(self, score: float, epoch: int, model: PerturbationModel) -> None:
        if score < self.result.best_val_loss:
            self.result.best_val_loss = score
            self.result.best_epoch = epoch
            self.result.best_phase = model.schedule_phase
            self.state = copy.deepcopy(model.state_dict())
            self.since = 0
        else:
            self.since += 1

    def forget(self) -> None:
        """The schedule moved to a new phase (or the model re-expressed its parameters): the best
        state so far is put aside and recorded, and keeping starts afresh."""
        r = self.result
        if self.state is not None and (self.passed is None or r.best_val_loss < self.passed[0]):
            self.passed = (r.best_val_loss, r.best_epoch, r.best_phase)
        r.best_val_loss = math.inf
        self.state = None
        self.since = 0

    def note(self) -> str | None:
        """What the run should say when an earlier phase had a better state than the kept one."""
        r = self.result
        if self.passed is None or not self.passed[0] < r.best_val_loss:
            return None
        score, epoch, phase = self.passed
        return (
            f"The kept state is from epoch {r.best_epoch} (phase '{r.best_phase}', −ELBO {r.best_val_loss:.3f}). "
            f"Epoch {epoch} of the earlier phase '{phase}' scored better (−ELBO {score:.3f}) and was not kept: "
            "the training schedule delivers a state of its final phase."
        )

    def stale(self, patience: int | None) -> bool:
        """Whether ``patience`` epochs passed without improvement (never when None)."""
        return patience is not None and self.since >= patience

    def restore(self, model: PerturbationModel) -> None:
        if self.state is not None:
            model.load_state_dict(self.state)


def _finite(train_loss: float, epoch: int) -> None:
    """Stop a run whose training loss is no longer a number, with the fix in the message."""
    if not math.isfinite(train_loss):
        raise SamsError(
            f"Training diverged at epoch {epoch} (loss {train_loss}). Lower the learning rate "
            "or enable gradient clipping (grad_clip=10)."
        )


def fit(
    model: PerturbationModel,
    data: PerturbationData,
    split: np.ndarray,
    config: TrainConfig | None = None,
    progress: ProgressFn | None = None,
) -> TrainResult:
    """Train ``model`` on the "train" cells of ``split``, validating on the "val" cells.

    Keeps the state with the lowest validation loss (the last state when there are no
    validation cells) and stops after ``early_stopping`` epochs without improvement.

    Inside a ``torch.distributed`` process group (started by ``torchrun``) the model is wrapped in
    ``DistributedDataParallel``: every rank draws the same permutation (shared seed) and takes its
    shard of every mini-batch, each shard's mean loss is weighted by its share of the batch's
    cells (times the number of ranks, which DDP's gradient averaging divides out), so the
    gradient is that of the mean over all cells of the batch, whatever the number of ranks. The
    parameters, per-perturbation globals included, stay identical on all ranks; train and
    validation losses are summed over ranks; ``progress`` is called on rank 0 only. Every rank
    returns the same result.
    """
    cfg = config or TrainConfig()
    _check_config(cfg)
    pl = Placement.for_config(cfg)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    model.to(pl.device)
    tr, va = _sources(model, data, split, cfg, pl.device)
    # validation charges global terms with the validation split's N_t, not the training split's
    val_idx = np.flatnonzero(split == VAL)
    val_cells = (data.dosages[val_idx], condition_ids(model, data)[val_idx]) if va is not None else None
    step = TrainStep(model, tr, cfg, pl)
    epochs = _epochs(tr.n, cfg)
    gen = tr.generator(cfg.seed)
    result = TrainResult(data_bytes=int(getattr(tr, "nbytes", 0)))
    best = _BestState(result)
    t_start = time.perf_counter()
    model.train()
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        n_steps = _train_epoch(step, tr.order(gen), tr.n, cfg)
        if n_steps == 0:
            break
        train_loss, terms = step.epoch_means(n_steps)
        _finite(train_loss, epoch)
        t_val = time.perf_counter()
        with model.charged_to(*val_cells) if val_cells is not None else contextlib.nullcontext():
            val_loss = validate(model, va, cfg, pl, epoch - 1)
        t_val = time.perf_counter() - t_val
        hi, lo = mask_sparsity(model)
        phase = model.schedule_phase
        rec = EpochRecord(
            epoch=epoch, step=step.steps, train_loss=train_loss, val_loss=val_loss, terms=terms,
            mask_frac_high=hi, mask_frac_low=lo, seconds=time.perf_counter() - t0, total_epochs=epochs, val_seconds=t_val,
            phase=phase,
        )
        result.history.append(rec)
        best.offer(val_loss if val_loss is not None else terms.get("neg_elbo", train_loss), epoch, model)
        if progress is not None and pl.rank == 0:
            progress(rec)
        reexpressed = model.end_epoch(epoch, epochs)
        if reexpressed or model.schedule_phase != phase:
            # the model re-expressed its parameters (SAMS-VAE's alignment of the latent basis, the
            # same on every rank) or the schedule changed the objective (a prior weight of 30
            # dropping to 1): Adam's running moments belong to the old parameters or the old
            # gradients' scale, and would hold the steps of the next phase far below the rate
            step.restart_optimizer()
            # a new phase of the schedule: its state is the one to deliver, so keeping starts afresh
            # (the best state so far is recorded, and a note says so if it stays the better one)
            best.forget()
            continue
        if best.stale(cfg.early_stopping):
            result.stopped_early = True
            break
    step.close()
    if va is not None:
        best.restore(model)
    model.eval()
    result.seconds = time.perf_counter() - t_start
    result.compiled, result.cuda_graphs, result.notes = step.compiled, step.cuda_graphs, step.notes
    kept_note = best.note() if va is not None else None
    if kept_note:
        result.notes.append(kept_note)
    return result


def train(
    data: PerturbationData,
    family: str,
    split: np.ndarray,
    config: TrainConfig | None = None,
    progress: ProgressFn | None = None,
    **hparams: Any,
) -> tuple[PerturbationModel, TrainResult]:
    """Build a ``family`` model for ``data`` and train it on ``split`` (see :func:`fit`)."""
    cfg = config or TrainConfig()
    torch.manual_seed(cfg.seed)
    model = build_for_data(family, data, split, **hparams)
    return model, fit(model, data, split, cfg, progress)


def tqdm_progress(total_epochs: int, desc: str = "training") -> tuple[ProgressFn, Callable[[], None]]:
    """A progress callback that draws a tqdm bar, and a function that closes it."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total_epochs, desc=desc, unit="epoch")

    def update(rec: EpochRecord) -> None:
        bar.update(1)
        post = {"loss": f"{rec.train_loss:.2f}"}
        if rec.val_loss is not None:
            post["val"] = f"{rec.val_loss:.2f}"
        if rec.mask_frac_high is not None:
            post["mask≥.5"] = f"{rec.mask_frac_high:.2f}"
        bar.set_postfix(post)

    return update, bar.close
