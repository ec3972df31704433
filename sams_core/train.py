"""Training: the whole training split on the device, mini-batches drawn by index.

:func:`train` builds a model for a :class:`~sams_core.data.PerturbationData` and a split, fits it
with Adam and returns it with its per-epoch history; :func:`fit` does the same for a model that
already exists. The state with the best validation loss is kept. Progress is reported through a
callback (tqdm on the command line, ``st.progress`` in the app).

Scale (DESIGN §7):

- inside a ``torch.distributed`` process group (``torchrun``), :func:`fit` wraps the model in
  ``DistributedDataParallel``: all ranks draw the same permutation from the shared seed, each
  mini-batch is cut into one shard per rank, every rank computes the loss of its shard and DDP
  all-reduces the gradients; validation is reduced over ranks and only rank 0 reports progress.
  See :mod:`sams_core.distributed` and ``TrainConfig.shards``;
- when ``X`` is a backed ``.h5ad`` matrix (:func:`sams_core.backed.read_h5ad_backed`), or with
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
import scipy.sparse as sp
import torch

from sams_core import distributed
from sams_core.data import TEST, TRAIN, VAL, PerturbationData
from sams_core.errors import SamsError
from sams_core.models import FAMILIES, Batch, PerturbationModel, SVAEPlus, build_model

ProgressFn = Callable[["EpochRecord"], None]
DENSE_LIMIT_BYTES = 4 * 1024**3


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


def default_device() -> torch.device:
    """``cuda`` when a GPU is present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    # None: automatic, on when X is a backed .h5ad matrix (sams_core.backed).
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


def _take_rows(X: Any, idx: np.ndarray) -> Any:
    """Rows ``idx`` of a host matrix, or of a torch tensor (kept on its device, no copy for all rows)."""
    if isinstance(X, torch.Tensor):
        idx = np.asarray(idx)
        if idx.size == X.shape[0] and np.array_equal(idx, np.arange(X.shape[0])):
            return X
        return X[torch.as_tensor(idx, device=X.device)]
    return X[idx]


class DeviceData:
    """Expression, dosages, library sizes and condition ids of a set of cells, on one device.

    Dense matrices are held as they are; sparse ones as CSR arrays, densified row-wise only for
    the rows of each mini-batch. :meth:`batch` gathers rows by index without host copies.
    ``X`` may also be a torch tensor already on the device (e.g. data generated there).
    """

    def __init__(self, data: PerturbationData, idx: np.ndarray, device: torch.device, cond: np.ndarray, dense: bool | None = None):
        self._load(_take_rows(data.X, idx), data.dosages[idx], data.library[idx], cond[idx], device, dense)

    @classmethod
    def from_arrays(
        cls, X: Any, dosages: np.ndarray, library: np.ndarray, cond: np.ndarray, device: torch.device, dense: bool | None = None
    ) -> "DeviceData":
        """Cells given as arrays (rows of ``X`` with their dosages, library sizes, condition ids)."""
        self = cls.__new__(cls)
        self._load(X, dosages, library, cond, device, dense)
        return self

    def _load(self, X: Any, dosages: np.ndarray, library: np.ndarray, cond: np.ndarray, device: torch.device, dense: bool | None) -> None:
        self.device = device
        self.n = int(X.shape[0])
        self.n_genes = int(X.shape[1])
        if isinstance(X, torch.Tensor):
            self.x = X.to(device=device, dtype=torch.float32)
        else:
            if dense is None:
                dense = (not sp.issparse(X)) or self.n * self.n_genes * 4 <= DENSE_LIMIT_BYTES
            if sp.issparse(X) and not dense:
                X = sp.csr_matrix(X)
                self.x = None
                self.crow = torch.as_tensor(X.indptr.astype(np.int64), device=device)
                self.col = torch.as_tensor(X.indices.astype(np.int64), device=device)
                self.val = torch.as_tensor(X.data.astype(np.float32), device=device)
            else:
                if sp.issparse(X):
                    X = X.toarray()
                self.x = torch.as_tensor(np.asarray(X, dtype=np.float32), device=device)
        self.d = torch.as_tensor(np.asarray(dosages), device=device)
        self.library = torch.as_tensor(np.asarray(library), device=device)
        self.cond = torch.as_tensor(np.asarray(cond).astype(np.int64), device=device)

    def _rows(self, idx: torch.Tensor) -> torch.Tensor:
        if self.x is not None:
            return self.x[idx]
        starts = self.crow[idx]
        lens = self.crow[idx + 1] - starts
        total = int(lens.sum())
        row_ids = torch.repeat_interleave(torch.arange(idx.numel(), device=self.device), lens, output_size=total)
        first = torch.repeat_interleave(starts - (torch.cumsum(lens, 0) - lens), lens, output_size=total)
        src = first + torch.arange(total, device=self.device)
        out = torch.zeros(idx.numel(), self.n_genes, device=self.device)
        out[row_ids, self.col[src]] = self.val[src]
        return out

    def batch(self, idx: torch.Tensor) -> Batch:
        """The cells at positions ``idx`` (a tensor on the device) as a model batch."""
        return Batch(self._rows(idx), self.d[idx], self.library[idx], self.cond[idx])

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None) -> list[Batch]:
        """The cells at positions ``start``..``stop`` (default: all) in order, in batches of ``batch_size``."""
        stop = self.n if stop is None else stop
        ar = torch.arange(self.n, device=self.device)
        return [self.batch(ar[i : min(i + batch_size, stop)]) for i in range(start, stop, batch_size)]

    def generator(self, seed: int) -> torch.Generator:
        """The generator of :meth:`order` (on the data's device)."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        return gen

    def order(self, gen: torch.Generator) -> torch.Tensor:
        """A random order of all positions for one epoch."""
        return torch.randperm(self.n, device=self.device, generator=gen)


def condition_ids(model: PerturbationModel, data: PerturbationData) -> np.ndarray:
    """Each cell's index in the model's condition vocabulary (sVAE+), -1 for controls/unknown."""
    if not isinstance(model, SVAEPlus):
        return np.full(data.n_cells, -1, dtype=np.int64)
    cd = model.cond_dosages.detach().cpu().numpy()
    lookup = {row.tobytes(): i for i, row in enumerate(cd)}
    return np.array([lookup.get(row.tobytes(), -1) for row in data.dosages.astype(np.float32)], dtype=np.int64)


def input_statistics(data: PerturbationData, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and std of the encoder input (log1p counts, or the values) over ``idx``.

    Backed matrices are read in chunks and tensors on a device are reduced there, in float64.
    """
    if _is_backed(data.X):
        from sams_core.backed import chunked_input_statistics

        return chunked_input_statistics(data.X, np.asarray(idx), data.is_counts)
    if isinstance(data.X, torch.Tensor):
        return _tensor_input_statistics(data.X, np.asarray(idx), data.is_counts)
    X = data.X[idx]
    if sp.issparse(X):
        V = X.copy()
        if data.is_counts:
            V.data = np.log1p(V.data)
        mean = np.asarray(V.mean(axis=0)).ravel()
        sq = V.multiply(V)
        var = np.asarray(sq.mean(axis=0)).ravel() - mean**2
    else:
        V = np.log1p(X) if data.is_counts else np.asarray(X)
        mean = V.mean(0)
        var = V.var(0)
    return mean.astype(np.float32), np.sqrt(np.maximum(var, 0)).astype(np.float32)


def _is_backed(X: Any) -> bool:
    """Whether ``X`` is a backed on-disk matrix (read in row chunks) rather than in memory."""
    return hasattr(X, "read_rows") and not isinstance(X, (np.ndarray, torch.Tensor)) and not sp.issparse(X)


def _tensor_input_statistics(X: torch.Tensor, idx: np.ndarray, is_counts: bool, chunk: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    s1 = torch.zeros(X.shape[1], dtype=torch.float64, device=X.device)
    s2 = torch.zeros_like(s1)
    rows = torch.as_tensor(idx, device=X.device)
    for i in range(0, rows.numel(), chunk):
        v = X[rows[i : i + chunk]].to(torch.float64)
        if is_counts:
            v = torch.log1p(v)
        s1 += v.sum(0)
        s2 += (v * v).sum(0)
    n = max(int(rows.numel()), 1)
    mean = s1 / n
    var = (s2 / n - mean * mean).clamp_min(0)
    return mean.cpu().numpy().astype(np.float32), var.sqrt().cpu().numpy().astype(np.float32)


def build_for_data(family: str, data: PerturbationData, split: np.ndarray, **hparams: Any) -> PerturbationModel:
    """A model of ``family`` sized for ``data``, with encoder statistics from the training cells."""
    if family not in FAMILIES:
        raise SamsError(f"Unknown model family {family!r}. Choose one of: {', '.join(FAMILIES)}.")
    train_idx = np.flatnonzero(split == TRAIN)
    if train_idx.size == 0:
        raise SamsError("The split leaves no training cells. Lower the held-out fraction.")
    hp = dict(hparams)
    hp.setdefault("likelihood", data.likelihood)
    if hp["likelihood"] in ("nb", "poisson") and not data.is_counts:
        raise SamsError(
            f"The {hp['likelihood']} likelihood needs counts, but this data is log-normalised. "
            "Use likelihood='gaussian' or load raw counts."
        )
    conds: list[str] = []
    if family == SVAEPlus.family:
        labs = data.labels[train_idx]
        conds = sorted({str(lab) for lab in labs if lab != "control"})
        hp["n_conditions"] = max(1, len(conds))
    model = build_model(family, n_genes=data.n_genes, n_perturbations=data.n_perturbations, **hp)
    mean, std = input_statistics(data, train_idx)
    counts = (data.dosages[train_idx] != 0).sum(0).astype(np.float32)
    model.set_data_stats(torch.as_tensor(mean), torch.as_tensor(std), torch.as_tensor(counts))
    if isinstance(model, SVAEPlus) and conds:
        rows = np.stack([data.dosage_row(c) for c in conds])
        labs = data.labels[train_idx].astype(str)
        cnt = np.array([(labs == c).sum() for c in conds], dtype=np.float32)
        model.set_conditions(torch.as_tensor(rows), torch.as_tensor(cnt))
    return model


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
        from sams_core.backed import ChunkedSource

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


__all__ = [
    "TrainConfig", "TrainResult", "EpochRecord", "DeviceData", "fit", "train", "build_for_data",
    "default_device", "condition_ids", "input_statistics", "tqdm_progress", "fit_new_conditions", "TEST",
]


def fit_new_conditions(
    model: SVAEPlus,
    data: PerturbationData,
    cells: np.ndarray,
    config: TrainConfig | None = None,
) -> tuple[SVAEPlus, TrainResult]:
    """sVAE+'s out-of-domain protocol: learn only the shift and mask of unseen conditions.

    The conditions of ``cells`` that the model does not know are added to its vocabulary; the
    encoder, decoder and the known conditions stay frozen while the new conditions' shifts and
    mask probabilities are fitted on ``cells``. Returns the extended model and its history.
    """
    if not isinstance(model, SVAEPlus):
        raise SamsError("Only sVAE+ fits new conditions this way; SAMS-VAE composes them from their members.")
    cells = np.asarray(cells)
    known = {row.tobytes() for row in model.cond_dosages.detach().cpu().numpy().astype(np.float32)}
    labels = data.labels[cells].astype(str)
    new = sorted({lab for lab in labels if lab != "control" and data.dosage_row(lab).astype(np.float32).tobytes() not in known})
    if not new:
        raise SamsError("These cells hold no condition the model does not already know.")
    A = model.n_conditions
    hp = dict(model.hparams)
    hp["n_conditions"] = A + len(new)
    bigger = build_model(SVAEPlus.family, **hp)
    bigger.aligned = True  # the basis is the trained model's: it stays fixed with the networks
    state = model.state_dict()
    with torch.no_grad():
        for name, p in bigger.state_dict().items():
            old = state[name]
            if p.shape == old.shape:
                p.copy_(old)
            else:
                p[:A].copy_(old)
        rows = torch.as_tensor(np.stack([data.dosage_row(c) for c in new]))
        bigger.cond_dosages[A:].copy_(rows)
        bigger.cond_counts[A:].copy_(torch.as_tensor([(labels == c).sum() for c in new], dtype=torch.float32))
    for name, p in bigger.named_parameters():
        p.requires_grad_(name in ("shift", "pi_logits"))
    keep_old = torch.zeros(A + len(new), 1)
    keep_old[A:] = 1.0
    bigger.shift.register_hook(lambda g: g * keep_old.to(g.device))
    bigger.pi_logits.register_hook(lambda g: g * keep_old.to(g.device))
    split = np.full(data.n_cells, TEST, dtype=object)
    split[cells] = TRAIN
    cfg = config or TrainConfig(epochs=50, lr=1e-2, global_lr_scale=1.0)
    result = fit(bigger, data, split, cfg)
    for p in bigger.parameters():
        p.requires_grad_(True)
    return bigger, result
