"""Training: the whole training split on the device, mini-batches drawn by index.

:func:`train` builds a model for a :class:`~sams_core.data.screen.PerturbationData` and a split, fits it
with Adam and returns it with its per-epoch history; :func:`fit` does the same for a model that
already exists. The state with the best validation loss is kept. Progress is reported through a
callback (tqdm on the command line, ``st.progress`` in the app).

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
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from sams_core.data.batches import (
    ChunkedSource,
    DeviceData,
    _is_backed,
    condition_ids,
    default_device,
)
from sams_core.data.screen import PerturbationData
from sams_core.data.splits import TRAIN, VAL
from sams_core.errors import SamsError
from sams_core.models.base import PerturbationModel
from sams_core.training import distributed
from sams_core.training.build import build_for_data

ProgressFn = Callable[["EpochRecord"], None]


PRECISIONS: tuple[str, ...] = ("float32", "bf16-mixed")


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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


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

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update({f"term_{k}": v for k, v in d.pop("terms").items()})
        return d


@dataclass
class TrainResult:
    """History of a run and where its kept (best-validation) state came from."""

    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = -1
    best_val_loss: float = math.inf
    seconds: float = 0.0
    stopped_early: bool = False

    def history_table(self) -> list[dict[str, Any]]:
        return [h.as_dict() for h in self.history]


def mask_sparsity(model: PerturbationModel) -> tuple[float | None, float | None]:
    """Fraction of mask probabilities ≥ 0.5 and ≤ 0.2 (None without masks)."""
    p = model.mask_probs()
    if p is None:
        return None, None
    p = p.detach()
    return float((p >= 0.5).float().mean()), float((p <= 0.2).float().mean())


@torch.no_grad()
def evaluate_loss(model: PerturbationModel, dd: DeviceData, n_particles: int, batch_size: int) -> float:
    """Mean negative ELBO per cell over all cells in ``dd``."""
    model.eval()
    total = torch.zeros((), device=dd.device)
    for b in dd.batches(batch_size):
        total += model.loss(b, n_particles).loss * b.size
    model.train()
    return float(total) / max(dd.n, 1)


@torch.no_grad()
def _sharded_val_loss(
    model: PerturbationModel, va: Any, cfg: TrainConfig, n_shards: int, rank: int, world: int, epoch: int, device: torch.device
) -> float:
    """Mean negative ELBO per validation cell, the cells cut into ``n_shards`` pieces over ranks.

    Each shard is evaluated with noise seeded from (seed, epoch, shard) and its sum kept in its
    own slot, so the total (summed over slots after the all-reduce) does not depend on how the
    shards are spread over processes.
    """
    model.eval()
    totals = torch.zeros(n_shards, dtype=torch.float64, device=device)
    for s, (lo, hi) in enumerate(distributed.shard_bounds(va.n, n_shards)):
        if s % world != rank or hi <= lo:
            continue
        distributed.seed_noise(device, distributed.noise_seed(cfg.seed, distributed.VAL_NOISE, epoch, s))
        for b in va.batches(cfg.val_batch_size, lo, hi):
            totals[s] += model.loss(b, cfg.n_particles).loss.double() * b.size
    distributed.all_reduce_sum(totals)
    model.train()
    return float(totals.sum()) / max(va.n, 1)


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
    if cfg.batch_size < 1 or cfg.n_particles < 1 or cfg.lr <= 0:
        raise SamsError("batch_size and n_particles must be ≥ 1 and lr > 0.")
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
    autocast_context(device, cfg.precision)  # validates the setting before any work
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    model.to(device)
    cond = condition_ids(model, data)
    train_idx = np.flatnonzero(split == TRAIN)
    val_idx = np.flatnonzero(split == VAL)
    chunked = _is_backed(data.X) if cfg.chunked is None else bool(cfg.chunked)
    if chunked:

        def source(idx: np.ndarray) -> Any:
            return ChunkedSource(data.X, idx, data.dosages, data.library, cond, device, cfg.chunk_size, cfg.chunks_per_buffer)
    else:
        def source(idx: np.ndarray) -> Any:
            return DeviceData(data, idx, device, cond)
    tr = source(train_idx)
    va = source(val_idx) if val_idx.size else None
    net: torch.nn.Module = model
    if use_ddp:
        # buffers (input statistics, counts) are fixed before training: synced once, not per step
        ddp_cls = torch.nn.parallel.DistributedDataParallel
        no_buffer_sync = (
            {"forward_sync_buffers": False}
            if "forward_sync_buffers" in inspect.signature(ddp_cls.__init__).parameters
            else {"broadcast_buffers": False}
        )
        net = ddp_cls(model, **no_buffer_sync)
    groups = [
        {**g, "params": [p for p in g["params"] if p.requires_grad]}
        for g in model.parameter_groups(cfg.lr, cfg.global_lr_scale)
    ]
    opt = torch.optim.Adam([g for g in groups if g["params"]])
    steps_per_epoch = max(1, math.ceil(tr.n / cfg.batch_size))
    epochs = cfg.epochs if cfg.max_steps is None else math.ceil(cfg.max_steps / steps_per_epoch)
    gen = tr.generator(cfg.seed)
    my_shards = list(range(rank, n_shards, world))

    result = TrainResult()
    best_state: dict[str, torch.Tensor] | None = None
    step = 0
    t_start = time.perf_counter()
    since_best = 0
    model.train()
    for epoch in range(epochs):
        t0 = time.perf_counter()
        perm = tr.order(gen)
        loss_acc = torch.zeros(n_shards, device=device)  # one slot per shard: sums do not depend on the rank layout
        term_acc: dict[str, torch.Tensor] = {}
        n_steps = 0
        for i in range(0, tr.n, cfg.batch_size):
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
            idx = perm[i : i + cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            if not sharded:
                with autocast_context(device, cfg.precision):
                    out = model.loss(tr.batch(idx), cfg.n_particles)
                out.loss.backward()
                loss_acc[0] += out.loss.detach()
                for k, v in out.terms.items():
                    term_acc.setdefault(k, torch.zeros(1, device=device))[0] += v
            else:
                nb = int(idx.numel())
                bounds = distributed.shard_bounds(nb, n_shards)
                for j, s in enumerate(my_shards):
                    lo, hi = bounds[s]
                    w = (hi - lo) / nb
                    # an empty shard (batch smaller than the shard count) still joins the
                    # gradient all-reduce, with one cell at weight 0
                    piece = idx[lo:hi] if hi > lo else idx[:1]
                    # noise that depends on (seed, step, shard) only: the same draws whatever
                    # the number of processes the shards are spread over
                    distributed.seed_noise(device, distributed.noise_seed(cfg.seed, distributed.TRAIN_NOISE, step, s))
                    last = j == len(my_shards) - 1
                    sync = net.no_sync() if (use_ddp and not last) else contextlib.nullcontext()
                    with sync:
                        with autocast_context(device, cfg.precision):
                            out = net(tr.batch(piece), cfg.n_particles)
                        (out.loss * (w * world)).backward()
                    loss_acc[s] += out.loss.detach() * w
                    for k, v in out.terms.items():
                        term_acc.setdefault(k, torch.zeros(n_shards, device=device))[s] += v * w
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            n_steps += 1
            step += 1
        if n_steps == 0:
            break
        if use_ddp:
            keys = list(term_acc)
            packed = distributed.all_reduce_sum(torch.stack([loss_acc, *(term_acc[k] for k in keys)]))
            loss_acc = packed[0]
            term_acc = {k: packed[1 + n] for n, k in enumerate(keys)}
        train_loss = float(loss_acc.sum()) / n_steps
        if not math.isfinite(train_loss):
            raise SamsError(
                f"Training diverged at epoch {epoch + 1} (loss {train_loss}). Lower the learning rate "
                "or enable gradient clipping (grad_clip=10)."
            )
        t_val = time.perf_counter()
        if va is None:
            val_loss = None
        elif sharded:
            val_loss = _sharded_val_loss(model, va, cfg, n_shards, rank, world, epoch, device)
        else:
            val_loss = evaluate_loss(model, va, cfg.n_particles, cfg.val_batch_size)
        t_val = time.perf_counter() - t_val
        hi, lo = mask_sparsity(model)
        rec = EpochRecord(
            epoch=epoch + 1,
            step=step,
            train_loss=train_loss,
            val_loss=val_loss,
            terms={k: float(v.sum()) / n_steps for k, v in term_acc.items()},
            mask_frac_high=hi,
            mask_frac_low=lo,
            seconds=time.perf_counter() - t0,
            total_epochs=epochs,
            val_seconds=t_val,
        )
        result.history.append(rec)
        score = val_loss if val_loss is not None else train_loss
        if score < result.best_val_loss:
            result.best_val_loss = score
            result.best_epoch = epoch + 1
            best_state = copy.deepcopy(model.state_dict())
            since_best = 0
        else:
            since_best += 1
        if progress is not None and rank == 0:
            progress(rec)
        if model.end_epoch(epoch + 1, epochs):
            # the model re-expressed its parameters (SAMS-VAE's alignment of the latent basis, the
            # same on every rank): Adam's running moments and the best state so far belong to the
            # old parameterisation, and the objective's prior weight may have changed
            opt = torch.optim.Adam([g for g in groups if g["params"]])
            result.best_val_loss = math.inf
            best_state = None
            since_best = 0
            continue
        if cfg.early_stopping is not None and since_best >= cfg.early_stopping:
            result.stopped_early = True
            break
    del net  # drops DDP's gradient hooks from the model's parameters
    if best_state is not None and va is not None:
        model.load_state_dict(best_state)
    model.eval()
    result.seconds = time.perf_counter() - t_start
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
