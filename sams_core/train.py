"""Training: the whole training split on the device, mini-batches drawn by index.

:func:`train` builds a model for a :class:`~sams_core.data.PerturbationData` and a split, fits it
with Adam and returns it with its per-epoch history; :func:`fit` does the same for a model that
already exists. The state with the best validation loss is kept. Progress is reported through a
callback (tqdm on the command line, ``st.progress`` in the app).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import scipy.sparse as sp
import torch

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


class DeviceData:
    """Expression, dosages, library sizes and condition ids of a set of cells, on one device.

    Dense matrices are held as they are; sparse ones as CSR arrays, densified row-wise only for
    the rows of each mini-batch. :meth:`batch` gathers rows by index without host copies.
    """

    def __init__(self, data: PerturbationData, idx: np.ndarray, device: torch.device, cond: np.ndarray, dense: bool | None = None):
        self.device = device
        self.n = int(len(idx))
        self.n_genes = data.n_genes
        X = data.X[idx]
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
        self.d = torch.as_tensor(data.dosages[idx], device=device)
        self.library = torch.as_tensor(data.library[idx], device=device)
        self.cond = torch.as_tensor(cond[idx].astype(np.int64), device=device)

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

    def batches(self, batch_size: int) -> list[Batch]:
        """All cells in order, in batches of ``batch_size``."""
        ar = torch.arange(self.n, device=self.device)
        return [self.batch(ar[i : i + batch_size]) for i in range(0, self.n, batch_size)]


def condition_ids(model: PerturbationModel, data: PerturbationData) -> np.ndarray:
    """Each cell's index in the model's condition vocabulary (sVAE+), -1 for controls/unknown."""
    if not isinstance(model, SVAEPlus):
        return np.full(data.n_cells, -1, dtype=np.int64)
    cd = model.cond_dosages.detach().cpu().numpy()
    lookup = {row.tobytes(): i for i, row in enumerate(cd)}
    return np.array([lookup.get(row.tobytes(), -1) for row in data.dosages.astype(np.float32)], dtype=np.int64)


def input_statistics(data: PerturbationData, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and std of the encoder input (log1p counts, or the values) over ``idx``."""
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
    """
    cfg = config or TrainConfig()
    if cfg.batch_size < 1 or cfg.n_particles < 1 or cfg.lr <= 0:
        raise SamsError("batch_size and n_particles must be ≥ 1 and lr > 0.")
    device = torch.device(cfg.device) if cfg.device else default_device()
    autocast_context(device, cfg.precision)  # validates the setting before any work
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    model.to(device)
    cond = condition_ids(model, data)
    train_idx = np.flatnonzero(split == TRAIN)
    val_idx = np.flatnonzero(split == VAL)
    tr = DeviceData(data, train_idx, device, cond)
    va = DeviceData(data, val_idx, device, cond) if val_idx.size else None
    groups = [
        {**g, "params": [p for p in g["params"] if p.requires_grad]}
        for g in model.parameter_groups(cfg.lr, cfg.global_lr_scale)
    ]
    opt = torch.optim.Adam([g for g in groups if g["params"]])
    steps_per_epoch = max(1, math.ceil(tr.n / cfg.batch_size))
    epochs = cfg.epochs if cfg.max_steps is None else math.ceil(cfg.max_steps / steps_per_epoch)
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)

    result = TrainResult()
    best_state: dict[str, torch.Tensor] | None = None
    step = 0
    t_start = time.perf_counter()
    since_best = 0
    model.train()
    for epoch in range(epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(tr.n, device=device, generator=gen)
        loss_sum = torch.zeros((), device=device)
        term_sum: dict[str, torch.Tensor] = {}
        n_steps = 0
        for i in range(0, tr.n, cfg.batch_size):
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
            batch = tr.batch(perm[i : i + cfg.batch_size])
            with autocast_context(device, cfg.precision):
                out = model.loss(batch, cfg.n_particles)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            loss_sum += out.loss.detach()
            for k, v in out.terms.items():
                term_sum[k] = term_sum.get(k, 0.0) + v
            n_steps += 1
            step += 1
        if n_steps == 0:
            break
        train_loss = float(loss_sum) / n_steps
        if not math.isfinite(train_loss):
            raise SamsError(
                f"Training diverged at epoch {epoch + 1} (loss {train_loss}). Lower the learning rate "
                "or enable gradient clipping (grad_clip=10)."
            )
        t_val = time.perf_counter()
        val_loss = evaluate_loss(model, va, cfg.n_particles, cfg.val_batch_size) if va is not None else None
        t_val = time.perf_counter() - t_val
        hi, lo = mask_sparsity(model)
        rec = EpochRecord(
            epoch=epoch + 1,
            step=step,
            train_loss=train_loss,
            val_loss=val_loss,
            terms={k: float(v) / n_steps for k, v in term_sum.items()},
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
        if progress is not None:
            progress(rec)
        if cfg.early_stopping is not None and since_best >= cfg.early_stopping:
            result.stopped_early = True
            break
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
