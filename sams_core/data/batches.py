"""Cells on the compute device: mini-batches drawn by index, chunked sources, input statistics.

The expression matrix may be held in float16 on the device (``storage="float16"``), which halves
its memory; this is done only when every value is exact in float16 (integers up to 2048, as the
counts of most screens are), and batches are handed to the models in float32 either way.

Dosages (a screen's CSR matrix, or dense rows) are held densely when cells × perturbations
float32 takes at most :data:`DOSAGE_DENSE_LIMIT_BYTES`, else as each cell's members and doses in
a fixed-width table scattered into dense rows for each mini-batch (static shapes, no host
synchronisation): a screen of 2,000 perturbations and 124,000 cells keeps a few MB on the device
instead of 1 GB.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from sams_core.data.backed import DEFAULT_CHUNK_SIZE, BackedMatrix
from sams_core.data.screen import PerturbationData
from sams_core.errors import SamsError
from sams_core.models.base import Batch, PerturbationModel

DENSE_LIMIT_BYTES = 4 * 1024**3
#: Dosages are held densely on the device up to this size (cells × perturbations × 4 bytes),
#: else as CSR arrays densified per mini-batch (see :class:`DeviceData`).
DOSAGE_DENSE_LIMIT_BYTES = 64 * 1024**2
STORAGES: tuple[str, ...] = ("float32", "float16")
"""How the expression matrix may be held on the device (see :class:`DeviceData`)."""


def default_device() -> torch.device:
    """``cuda`` when a GPU is present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _take_rows(X: Any, idx: np.ndarray) -> Any:
    """Rows ``idx`` of a host matrix, or of a torch tensor (kept on its device, no copy for all rows)."""
    if isinstance(X, torch.Tensor):
        idx = np.asarray(idx)
        if idx.size == X.shape[0] and np.array_equal(idx, np.arange(X.shape[0])):
            return X
        return X[torch.as_tensor(idx, device=X.device)]
    return X[idx]


def _csr_to_device(M: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A host matrix as CSR arrays on ``device``: row pointers, column indices (int64), values (float32)."""
    M = sp.csr_matrix(M)
    return (
        torch.as_tensor(M.indptr.astype(np.int64), device=device),
        torch.as_tensor(M.indices.astype(np.int64), device=device),
        torch.as_tensor(M.data.astype(np.float32), device=device),
    )


def _csr_rows(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, idx: torch.Tensor, width: int) -> torch.Tensor:
    """Rows ``idx`` (a tensor on the arrays' device) of a CSR matrix held as device arrays,
    densified to float32 [len(idx), width] (a sparse expression matrix's mini-batch rows)."""
    device = crow.device
    starts = crow[idx]
    lens = crow[idx + 1] - starts
    total = int(lens.sum())
    row_ids = torch.repeat_interleave(torch.arange(idx.numel(), device=device), lens, output_size=total)
    first = torch.repeat_interleave(starts - (torch.cumsum(lens, 0) - lens), lens, output_size=total)
    src = first + torch.arange(total, device=device)
    out = torch.zeros(idx.numel(), width, device=device)
    out[row_ids, col[src]] = val[src].float()
    return out


class _DeviceDosages:
    """Per-cell dosage rows on a device: a dense float32 tensor when cells × perturbations × 4
    bytes is at most :data:`DOSAGE_DENSE_LIMIT_BYTES` (or the rows come as a tensor), else each
    cell's members as a fixed-width table — column indices and doses [cells, most members],
    padded with dose 0 — scattered into dense rows for each mini-batch. Either way a batch is
    pure device indexing with static shapes (no host synchronisation; it can run inside a
    compiled, graph-captured step), and a screen of 2,000 perturbations holds a few bytes per cell."""

    def __init__(self, dosages: Any, device: torch.device):
        n, width = (int(v) for v in dosages.shape)
        self.width = width
        self.dense: torch.Tensor | None = None
        self.members: tuple[torch.Tensor, torch.Tensor] | None = None
        if isinstance(dosages, torch.Tensor):
            self.dense = dosages.to(device=device, dtype=torch.float32)
        elif n * width * 4 <= DOSAGE_DENSE_LIMIT_BYTES:
            rows = dosages.toarray() if sp.issparse(dosages) else dosages
            self.dense = torch.as_tensor(np.asarray(rows, dtype=np.float32), device=device)
        else:
            m = sp.csr_matrix(dosages, dtype=np.float32)
            lens = np.diff(m.indptr)
            most = max(1, int(lens.max()) if n else 1)
            cols = np.zeros((n, most), dtype=np.int64)
            vals = np.zeros((n, most), dtype=np.float32)
            within = np.arange(m.nnz) - np.repeat(m.indptr[:-1], lens)
            cells = np.repeat(np.arange(n), lens)
            cols[cells, within] = m.indices
            vals[cells, within] = m.data
            self.members = (torch.as_tensor(cols, device=device), torch.as_tensor(vals, device=device))

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Dense float32 dosage rows [len(idx), perturbations] of positions ``idx`` (on the device)."""
        if self.dense is not None:
            return self.dense[idx]
        cols, vals = self.members
        out = torch.zeros(idx.shape[0], self.width, device=vals.device, dtype=torch.float32)
        return out.scatter_add_(1, cols[idx], vals[idx])

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [self.dense] if self.dense is not None else list(self.members)


class DeviceData:
    """Expression, dosages, library sizes, condition ids and one-hot covariates of a set of cells,
    on one device.

    Dense matrices are held as they are; sparse ones as CSR arrays, densified row-wise only for
    the rows of each mini-batch. Dosages: dense up to :data:`DOSAGE_DENSE_LIMIT_BYTES`, else
    each cell's members in a fixed-width table (a screen's ``dosages`` stay sparse on the host
    either way); every batch holds dense float32 dosage rows. :meth:`batch` gathers rows by index without host copies.
    ``X`` may also be a torch tensor already on the device (e.g. data generated there).
    ``storage="float16"`` holds the expression values in half the memory when every value is
    exact in float16, else keeps float32 and says why in :attr:`notes` (and a warning).
    """

    def __init__(
        self, data: PerturbationData, idx: np.ndarray, device: torch.device, cond: np.ndarray,
        dense: bool | None = None, storage: str = "float32",
    ):
        self._load(
            _take_rows(data.X, idx), data.dosages[idx], data.library[idx], cond[idx], device, dense, storage,
            covariate_matrix(data, idx),
        )

    @classmethod
    def from_arrays(
        cls, X: Any, dosages: sp.csr_matrix | np.ndarray, library: np.ndarray, cond: np.ndarray, device: torch.device,
        dense: bool | None = None, storage: str = "float32", covariates: np.ndarray | None = None,
    ) -> DeviceData:
        """Cells given as arrays (rows of ``X`` with their dosages (CSR or dense [cells,
        perturbations]), library sizes, condition ids and one-hot covariates [cells, Σ levels];
        none when ``covariates`` is None)."""
        self = cls.__new__(cls)
        self._load(X, dosages, library, cond, device, dense, storage, covariates)
        return self

    def _load(
        self, X: Any, dosages: sp.csr_matrix | np.ndarray, library: np.ndarray, cond: np.ndarray, device: torch.device,
        dense: bool | None, storage: str, covariates: np.ndarray | None = None,
    ) -> None:
        if storage not in STORAGES:
            raise SamsError(f"Unknown storage {storage!r} for the expression matrix. Choose one of: {', '.join(STORAGES)}.")
        self.device = device
        self.notes: list[str] = []
        self.n = int(X.shape[0])
        self.n_genes = int(X.shape[1])
        if isinstance(X, torch.Tensor):
            # a float16 tensor kept as it is when float16 storage is asked for (no float32 copy)
            keep_half = storage == "float16" and X.dtype == torch.float16
            self.x = X.to(device=device, dtype=torch.float16 if keep_half else torch.float32)
        else:
            if dense is None:
                dense = (not sp.issparse(X)) or self.n * self.n_genes * 4 <= DENSE_LIMIT_BYTES
            if sp.issparse(X) and not dense:
                self.x = None
                self.crow, self.col, self.val = _csr_to_device(X, device)
            else:
                if sp.issparse(X):
                    X = X.toarray()
                self.x = torch.as_tensor(np.asarray(X, dtype=np.float32), device=device)
        if storage == "float16":
            self._store_half()
        self.dosages = _DeviceDosages(dosages, device)
        self.library = torch.as_tensor(np.asarray(library), device=device)
        self.cond = torch.as_tensor(np.asarray(cond).astype(np.int64), device=device)
        if covariates is None:
            covariates = np.zeros((self.n, 0), dtype=np.float32)
        self.c = torch.as_tensor(np.asarray(covariates, dtype=np.float32), device=device)

    def _store_half(self) -> None:
        """Hold the expression values in float16 if that loses nothing, else say why not."""
        values = self.x if self.x is not None else self.val
        half = values.to(torch.float16)
        if torch.equal(half.to(values.dtype), values):
            if self.x is not None:
                self.x = half
            else:
                self.val = half
            return
        note = (
            "float16 storage would round some expression values (float16 holds integers exactly only "
            "up to 2048, and few fractions); the matrix stays in float32. Use storage='float32' to "
            "silence this, or filter the extreme genes."
        )
        self.notes.append(note)
        warnings.warn(note, RuntimeWarning, stacklevel=4)

    @property
    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this object holds on its device (expression, dosages, library sizes,
        condition ids, covariates), dense or CSR arrays."""
        held = [self.x] if self.x is not None else [self.crow, self.col, self.val]
        return [*held, *self.dosages.tensors, self.library, self.cond, self.c]

    @property
    def nbytes(self) -> int:
        """Bytes this object holds on its device (expression, dosages, library sizes, condition ids, covariates)."""
        return sum(t.numel() * t.element_size() for t in self.tensors)

    @property
    def gathers_on_device(self) -> bool:
        """Whether :meth:`batch` is pure device indexing (dense expression; dosages always are):
        no host synchronisation, no data-dependent shapes, so it can run inside a compiled,
        graph-captured step."""
        return self.x is not None

    def _rows(self, idx: torch.Tensor) -> torch.Tensor:
        if self.x is not None:
            return self.x[idx].float()
        return _csr_rows(self.crow, self.col, self.val, idx, self.n_genes)

    def dosage_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Dense float32 dosage rows [len(idx), perturbations] of the cells at positions ``idx``."""
        return self.dosages.rows(idx)

    def batch(self, idx: torch.Tensor) -> Batch:
        """The cells at positions ``idx`` (a tensor on the device) as a model batch."""
        return Batch(self._rows(idx), self.dosages.rows(idx), self.library[idx], self.cond[idx], self.c[idx])

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


def covariate_matrix(data: PerturbationData, idx: np.ndarray | None = None) -> np.ndarray:
    """The one-hot covariates [cells, Σ levels] of the cells ``idx`` (all when None) of ``data``
    ([cells, 0] for a screen without covariates, or an object without them)."""
    onehot = getattr(data, "covariate_onehot", None)
    if onehot is None:
        n = data.n_cells if idx is None else int(np.asarray(idx).size)
        return np.zeros((n, 0), dtype=np.float32)
    return onehot(None if idx is None else np.asarray(idx))


def condition_ids(model: PerturbationModel, data: PerturbationData) -> np.ndarray:
    """Each cell's index in the model's condition vocabulary, -1 for controls/unknown (all -1 for
    a family without one; see :meth:`PerturbationModel.condition_ids`)."""
    return model.condition_ids(data.dosages)


def input_statistics(data: PerturbationData, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and std of the encoder input (log1p counts, or the values) over ``idx``.

    Backed matrices are read in chunks and tensors on a device are reduced there, in float64.
    """
    if _is_backed(data.X):

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


def chunked_input_statistics(X: BackedMatrix, idx: np.ndarray, is_counts: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and std of the encoder input over rows ``idx``, read in chunks (float64)."""
    g = X.shape[1]
    s1 = np.zeros(g)
    s2 = np.zeros(g)
    for _, b in X.iter_blocks(idx):
        if sp.issparse(b):
            v = b.astype(np.float64)
            if is_counts:
                v.data = np.log1p(v.data)
            s1 += np.asarray(v.sum(axis=0)).ravel()
            s2 += np.asarray(v.multiply(v).sum(axis=0)).ravel()
        else:
            v = np.asarray(b, dtype=np.float64)
            if is_counts:
                v = np.log1p(v)
            s1 += v.sum(0)
            s2 += (v * v).sum(0)
    n = max(int(np.asarray(idx).size), 1)
    mean = s1 / n
    var = np.maximum(s2 / n - mean**2, 0)
    return mean.astype(np.float32), np.sqrt(var).astype(np.float32)


# ---- what fit() reads from ---------------------------------------------------------------------
class ChunkedSource:
    """Cells of a matrix served to :func:`sams_core.training.trainer.fit` chunk by chunk.

    The interface of :class:`~sams_core.data.batches.DeviceData` (``n``, ``device``, ``batch``,
    ``batches``, ``generator``, ``order``) over rows ``idx`` of ``X`` (a :class:`BackedMatrix`, or
    an in-memory matrix too large for the device). Positions ``0..n-1`` index ``idx``; chunk c is
    positions ``c·chunk_size`` .. ``(c+1)·chunk_size``, read with one sequential read when ``idx``
    is sorted, densified and kept on the device while its shuffle buffer is in use. Dosages
    (held as :class:`DeviceData` holds them: dense when small, else a members table), library sizes and
    condition ids are held on the device.
    """

    def __init__(
        self,
        X: Any,
        idx: np.ndarray,
        dosages: sp.csr_matrix | np.ndarray,
        library: np.ndarray,
        cond: np.ndarray,
        device: torch.device,
        chunk_size: int | None = None,
        chunks_per_buffer: int = 8,
        dense: bool | None = None,
        storage: str = "float32",
        covariates: np.ndarray | None = None,
    ):
        self.X = X
        self.rows = np.asarray(idx, dtype=np.int64)
        self.n = int(self.rows.size)
        self.n_genes = int(X.shape[1])
        self.device = torch.device(device)
        self.chunk_size = int(chunk_size or getattr(X, "chunk_size", DEFAULT_CHUNK_SIZE))
        if self.chunk_size < 1 or chunks_per_buffer < 1:
            raise SamsError("chunk_size and chunks_per_buffer must be at least 1.")
        self.chunks_per_buffer = int(chunks_per_buffer)
        self.n_chunks = max(1, math.ceil(self.n / self.chunk_size))
        self.dense = dense
        self.storage = storage
        self.dosages = _DeviceDosages(dosages[self.rows], self.device)
        self.library = torch.as_tensor(np.asarray(library)[self.rows], device=self.device)
        self.cond = torch.as_tensor(np.asarray(cond)[self.rows].astype(np.int64), device=self.device)
        # one-hot covariates of all cells of X ([cells, Σ levels]); none when None
        cov = np.zeros((int(X.shape[0]), 0), dtype=np.float32) if covariates is None else np.asarray(covariates, dtype=np.float32)
        self.c = torch.as_tensor(cov[self.rows], device=self.device)
        self._cache: OrderedDict[int, DeviceData] = OrderedDict()
        self._capacity = 2 * self.chunks_per_buffer + 1
        self.chunk_reads = 0  # chunks read from X so far (diagnostics, tests)

    def _chunk(self, c: int) -> DeviceData:
        dd = self._cache.get(c)
        if dd is not None:
            self._cache.move_to_end(c)
            return dd
        lo, hi = c * self.chunk_size, min(self.n, (c + 1) * self.chunk_size)
        rows = self.rows[lo:hi]
        block = self.X.take(rows) if isinstance(self.X, BackedMatrix) else _take_rows(self.X, rows)
        empty = np.zeros(0, np.float32)
        no_dosages = np.zeros((0, 0), np.float32)  # the source holds them for all its cells
        dd = DeviceData.from_arrays(block, no_dosages, empty, empty, self.device, self.dense, self.storage)
        self.chunk_reads += 1
        self._cache[c] = dd
        while len(self._cache) > self._capacity:
            self._cache.popitem(last=False)
        return dd

    def _rows(self, pos: np.ndarray) -> torch.Tensor:
        chunk_of = pos // self.chunk_size
        first = int(chunk_of[0]) if pos.size else 0
        if pos.size == 0 or np.all(chunk_of == first):
            local = torch.as_tensor(pos - first * self.chunk_size, device=self.device)
            return self._chunk(first)._rows(local)
        out = torch.empty(pos.size, self.n_genes, device=self.device)
        for c in np.unique(chunk_of):
            sel = np.flatnonzero(chunk_of == c)
            local = torch.as_tensor(pos[sel] - int(c) * self.chunk_size, device=self.device)
            out[torch.as_tensor(sel, device=self.device)] = self._chunk(int(c))._rows(local)
        return out

    gathers_on_device = False  # batches are assembled on the host from chunks (see DeviceData.gathers_on_device)

    def batch(self, idx: torch.Tensor) -> Batch:
        """The cells at positions ``idx`` (a CPU tensor, as :meth:`order` gives) as a model batch."""
        pos = idx.detach().cpu().numpy().astype(np.int64)
        on_dev = torch.as_tensor(pos, device=self.device)
        return Batch(self._rows(pos), self.dosages.rows(on_dev), self.library[on_dev], self.cond[on_dev], self.c[on_dev])

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[Batch]:
        """Cells at positions ``start``..``stop`` (default all) in order, in batches (each chunk read once)."""
        stop = self.n if stop is None else stop
        for i in range(start, stop, batch_size):
            yield self.batch(torch.arange(i, min(i + batch_size, stop)))

    def generator(self, seed: int) -> torch.Generator:
        gen = torch.Generator()
        gen.manual_seed(seed)
        return gen

    def order(self, gen: torch.Generator) -> torch.Tensor:
        """One epoch's order: chunks shuffled, cells shuffled within each buffer of chunks."""
        chunks = torch.randperm(self.n_chunks, generator=gen).tolist()
        parts = []
        for b in range(0, len(chunks), self.chunks_per_buffer):
            pos = torch.cat([
                torch.arange(c * self.chunk_size, min(self.n, (c + 1) * self.chunk_size))
                for c in chunks[b : b + self.chunks_per_buffer]
            ])
            parts.append(pos[torch.randperm(pos.numel(), generator=gen)])
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
