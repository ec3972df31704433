"""Screens larger than memory: train from a backed ``.h5ad``, reading rows in chunks (DESIGN §7).

:func:`read_h5ad_backed` reads everything but the expression matrix (obs, var, perturbation
labels) like :func:`sams_core.data.screen.read_h5ad` and leaves the matrix on disk as a
:class:`BackedMatrix`: anndata's backed sparse dataset (CSR, read by row ranges) or an HDF5 dense
dataset. Library sizes and the data-contract checks (numeric, finite, integer counts, no empty
cells) come from one streaming pass over the file. The result is a
:class:`BackedPerturbationData`, accepted by :func:`sams_core.training.trainer.train` / ``fit`` and the rest of
the API (evaluation reads the cells it needs):

    data = read_h5ad_backed("screen.h5ad", chunk_size=4096)
    model, result = train(data, "sams_vae", make_split(data, "heldout-combos"), TrainConfig())

``fit`` then serves mini-batches through a :class:`ChunkedSource` instead of holding the cells on
the device: each epoch the chunks (``chunk_size`` consecutive training cells, one sequential read
each) are shuffled, taken ``chunks_per_buffer`` at a time, and the cells of those chunks are
shuffled together, so reads stay sequential while a mini-batch still mixes cells from several
places of the file (files are often sorted by perturbation). Every cell is visited once per epoch
and every chunk is read once per epoch.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import scipy.sparse as sp

from sams_core.data.screen import PerturbationData, from_anndata
from sams_core.errors import SamsError

DEFAULT_CHUNK_SIZE = 4096


INT32_MAX = np.iinfo(np.int32).max


def _read_elem(node: Any) -> Any:
    try:
        from anndata.io import read_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import read_elem
    return read_elem(node)


def _sparse_dataset(node: Any) -> Any:
    try:
        from anndata.io import sparse_dataset
    except ImportError:  # anndata < 0.11
        from anndata.experimental import sparse_dataset
    return sparse_dataset(node)


class BackedMatrix:
    """A cells × genes matrix that stays in its ``.h5ad`` file; rows are read on demand.

    ``key`` is ``"X"`` or ``"layers/NAME"``. CSR matrices are read through anndata's backed
    sparse dataset (one contiguous read per row range); dense ones through h5py. CSC matrices
    cannot be read by rows and are refused. ``m[rows]`` returns the rows (any order) in memory
    as float32 CSR (or a dense array); ``m[:, cols]`` a backed view of some genes.
    """

    ndim = 2
    dtype = np.dtype(np.float32)

    def __init__(self, path: str | Path, key: str = "X", chunk_size: int = DEFAULT_CHUNK_SIZE, columns: np.ndarray | None = None):
        import h5py

        if int(chunk_size) < 1:
            raise SamsError(f"chunk_size must be at least 1, got {chunk_size}.")
        self.path = str(path)
        self.key = key
        self.chunk_size = int(chunk_size)
        self.columns = None if columns is None else np.asarray(columns, dtype=np.int64)
        self._pid: int | None = None
        self._file: Any = None
        self._node: Any = None
        with h5py.File(self.path, "r") as f:
            if key not in f:
                raise SamsError(f"{key!r} is not in {Path(self.path).name}.")
            node = f[key]
            if isinstance(node, h5py.Group):
                enc = str(node.attrs.get("encoding-type", ""))
                if enc == "csc_matrix":
                    raise SamsError(
                        f"{key} of {Path(self.path).name} is stored column-wise (CSC), which cannot be read by "
                        "cells in chunks. Rewrite it row-wise: adata.X = scipy.sparse.csr_matrix(adata.X); "
                        "adata.write_h5ad(...)."
                    )
                if enc != "csr_matrix":
                    raise SamsError(f"{key} of {Path(self.path).name} is not a matrix (encoding {enc or 'unknown'}).")
                self.format = "csr"
                self._full_shape = tuple(int(v) for v in node.attrs["shape"])
                self._raw_dtype = node["data"].dtype
                self.nnz_stored = int(node["data"].shape[0])
            else:
                if node.ndim != 2:
                    raise SamsError(f"{key} of {Path(self.path).name} is not a 2-d matrix.")
                self.format = "dense"
                self._full_shape = tuple(int(v) for v in node.shape)
                self._raw_dtype = node.dtype
                self.nnz_stored = self._full_shape[0] * self._full_shape[1]

    # ---- shape and handles ----------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return (self._full_shape[0], self._full_shape[1] if self.columns is None else int(self.columns.size))

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"BackedMatrix({Path(self.path).name}:{self.key}, {self.shape[0]} × {self.shape[1]} {self.format})"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_pid=None, _file=None, _node=None)
        return state

    def _handle(self) -> Any:
        """The open dataset of this process (files are reopened after a fork or in a new process)."""
        import h5py

        if self._node is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            node = self._file[self.key]
            self._node = _sparse_dataset(node) if self.format == "csr" else node
            self._pid = os.getpid()
        return self._node

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = self._node = None

    # ---- reading ----------------------------------------------------------------------------
    def read_rows(self, lo: int, hi: int, raw: bool = False) -> sp.csr_matrix | np.ndarray:
        """Rows ``lo``..``hi`` (one contiguous read), float32 unless ``raw``; genes selected."""
        lo, hi = max(0, int(lo)), min(self._full_shape[0], int(hi))
        if hi <= lo:
            m = sp.csr_matrix((0, self._full_shape[1]), dtype=np.float32) if self.format == "csr" else np.zeros((0, self._full_shape[1]), np.float32)
        else:
            m = self._handle()[lo:hi]
        if self.format == "csr":
            m = sp.csr_matrix(m) if raw else sp.csr_matrix(m, dtype=np.float32)
        else:
            m = np.asarray(m) if raw else np.asarray(m, dtype=np.float32)
        if self.columns is not None:
            m = m[:, self.columns]
        return m

    def take(self, rows: np.ndarray) -> sp.csr_matrix | np.ndarray:
        """Rows ``rows`` (any order, repeats allowed) in that order; sorted runs read in chunks."""
        rows = np.asarray(rows, dtype=np.int64).ravel()
        n = self._full_shape[0]
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        if rows.size == 0:
            return self.read_rows(0, 0)
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        parts = []
        start = 0
        while start < srt.size:
            lo = int(srt[start])
            # all requested rows within chunk_size rows of lo: one sequential read
            stop = int(np.searchsorted(srt, lo + self.chunk_size, side="left"))
            block = self.read_rows(lo, int(srt[stop - 1]) + 1)
            parts.append(block[srt[start:stop] - lo])
            start = stop
        out = sp.vstack(parts, format="csr") if self.format == "csr" else np.concatenate(parts)
        if np.all(order[:-1] < order[1:]):
            return out
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        return out[inverse]

    def __getitem__(self, key: Any) -> Any:
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        if not (isinstance(cols, slice) and cols == slice(None)):
            all_cols = np.arange(self.shape[1])[cols]
            base = all_cols if self.columns is None else self.columns[all_cols]
            view = BackedMatrix.__new__(BackedMatrix)
            view.__dict__.update(self.__getstate__())
            view.columns = np.asarray(base, dtype=np.int64)
            return view if (isinstance(rows, slice) and rows == slice(None)) else view[rows]
        if isinstance(rows, slice):
            r = np.arange(self.shape[0])[rows]
        else:
            r = np.asarray(rows)
            if r.dtype == bool:
                r = np.flatnonzero(r)
            elif r.ndim == 0:
                r = r.reshape(1)
        return self.take(r.astype(np.int64))

    def iter_blocks(self, rows: np.ndarray | None = None, raw: bool = False) -> Iterator[tuple[np.ndarray, Any]]:
        """Blocks of at most ``chunk_size`` rows in file order: (row numbers, matrix rows)."""
        if rows is None:
            for lo in range(0, self._full_shape[0], self.chunk_size):
                hi = min(self._full_shape[0], lo + self.chunk_size)
                yield np.arange(lo, hi), self.read_rows(lo, hi, raw=raw)
            return
        rows = np.sort(np.asarray(rows, dtype=np.int64))
        for s in range(0, rows.size, self.chunk_size):
            part = rows[s : s + self.chunk_size]
            yield part, self.take(part)

    def to_memory(self) -> sp.csr_matrix | np.ndarray:
        """The whole matrix in memory (float32)."""
        parts = [b for _, b in self.iter_blocks()]
        if not parts:
            return self.read_rows(0, 0)
        return sp.vstack(parts, format="csr") if self.format == "csr" else np.concatenate(parts)


# ---- the screen --------------------------------------------------------------------------------
@dataclass
class BackedPerturbationData(PerturbationData):
    """A :class:`PerturbationData` whose ``X`` is a :class:`BackedMatrix` (rows stay on disk)."""

    _checksum: str | None = field(default=None, repr=False, compare=False)

    def subset(self, idx: np.ndarray) -> PerturbationData:
        """The cells at ``idx``, read into memory (a plain :class:`PerturbationData`)."""
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return PerturbationData(
            X=self.X[idx], is_counts=self.is_counts, library=self.library[idx], dosages=self.dosages[idx],
            labels=self.labels[idx], perturbations=list(self.perturbations), genes=list(self.genes),
            obs=self.obs.iloc[idx], settings={**self.settings, "backed": False},
        )

    def to_memory(self) -> PerturbationData:
        """The whole screen in memory."""
        return PerturbationData(**{
            **{f.name: getattr(self, f.name) for f in fields(PerturbationData)},
            "X": self.X.to_memory(), "settings": {**self.settings, "backed": False},
        })

    def dense(self, idx: np.ndarray | None = None) -> np.ndarray:
        m = self.X.to_memory() if idx is None else self.X[np.asarray(idx)]
        return m.toarray() if sp.issparse(m) else np.asarray(m, dtype=np.float32)

    def checksum(self) -> str:
        """The same content hash as the in-memory screen has (streamed; computed once)."""
        if self._checksum is None:
            self._checksum = _streamed_checksum(self)
        return self._checksum


def _streamed_checksum(data: BackedPerturbationData) -> str:
    """sha256 of (data, indices, indptr) or of the dense rows, then labels and genes, streamed.

    Byte-for-byte what :meth:`PerturbationData.checksum` hashes for the in-memory matrix: float32
    values and 32-bit indices when the matrix allows them (as scipy picks), else 64-bit.
    """
    X: BackedMatrix = data.X
    h = hashlib.sha256()
    if X.format == "csr":
        n, g = X.shape
        nnz_per_row: list[np.ndarray] = []
        for _, b in X.iter_blocks():
            h.update(np.ascontiguousarray(b.data, dtype=np.float32).tobytes())
            nnz_per_row.append(np.diff(b.indptr))
        nnz_rows = np.concatenate(nnz_per_row) if nnz_per_row else np.zeros(0, np.int64)
        total = int(nnz_rows.sum())
        idx_dtype = np.int32 if max(total, n, g) <= INT32_MAX else np.int64
        for _, b in X.iter_blocks():
            h.update(np.ascontiguousarray(b.indices, dtype=idx_dtype).tobytes())
        indptr = np.concatenate([[0], np.cumsum(nnz_rows)]).astype(idx_dtype)
        h.update(indptr.tobytes())
    else:
        for _, b in X.iter_blocks():
            h.update(np.ascontiguousarray(b, dtype=np.float32).tobytes())
    h.update("\n".join(map(str, data.labels)).encode())
    h.update("\n".join(data.genes).encode())
    return h.hexdigest()[:16]


def _scan(X: BackedMatrix, where: str) -> tuple[bool, np.ndarray, float]:
    """One pass over the file: (integer-valued, row sums, smallest value), with contract checks."""
    first: list[np.ndarray] = []
    n_first = 0
    sums = np.zeros(X.shape[0], dtype=np.float64)
    vmin = math.inf
    for rows, b in X.iter_blocks(raw=True):
        vals = b.data if sp.issparse(b) else np.asarray(b).ravel()
        if not np.issubdtype(vals.dtype, np.number):
            raise SamsError(f"{where} is not numeric (dtype {vals.dtype}). Store expression as numbers.")
        vals = vals.astype(np.float32, copy=False)
        if not np.isfinite(vals).all():
            raise SamsError(
                f"{where} contains NaN or infinite values. Remove or impute them before loading "
                "(e.g. adata = adata[:, np.isfinite(adata.X.sum(0))])."
            )
        if n_first < 200_000:
            first.append(vals[: 200_000 - n_first])
            n_first += first[-1].size
        if vals.size:
            vmin = min(vmin, float(vals.min()))
        sums[rows] = np.asarray(b.astype(np.float32).sum(axis=1)).ravel()
    sample = np.concatenate(first) if first else np.zeros(0, np.float32)
    is_int = bool(np.all(np.mod(sample, 1) == 0))
    return is_int, sums.astype(np.float32), (0.0 if vmin == math.inf else vmin)


def read_h5ad_backed(
    path: str | Path,
    perturbation_key: str | None = None,
    control_labels: Sequence[str] | None = None,
    separators: Sequence[str] = ("+",),
    counts_layer: str | None = None,
    n_top_genes: int | None = None,
    covariate_keys: Sequence[str] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> BackedPerturbationData:
    """Open an ``.h5ad`` screen without reading its expression matrix into memory.

    Same options and data contract as :func:`sams_core.data.screen.read_h5ad` (counts from
    ``layers[counts_layer or 'counts']`` or an integer ``X``, else log-normalised ``X``); the
    matrix must be CSR or dense. ``n_top_genes`` needs the whole matrix and is refused.
    ``chunk_size`` is the number of rows per read.
    """
    import anndata as ad
    import h5py

    p = Path(path)
    if not p.exists():
        raise SamsError(f"File not found: {p}. Check the path.")
    if p.suffix.lower() != ".h5ad":
        raise SamsError(f"{p.name} is not an .h5ad file. Convert it with anndata/scanpy (adata.write_h5ad('screen.h5ad')).")
    if n_top_genes is not None:
        raise SamsError(
            "Selecting highly variable genes (n_top_genes) needs the whole matrix in memory and is not "
            "available for backed data. Select the genes once and write a smaller file "
            "(adata[:, genes].write_h5ad(...)), or load the file in memory."
        )
    try:
        with h5py.File(p, "r") as f:
            obs = _read_elem(f["obs"])
            var = _read_elem(f["var"])
            layers = list(f["layers"].keys()) if "layers" in f else []
            has_x = "X" in f
    except Exception as exc:  # h5py / anndata raise many types for corrupt files
        raise SamsError(
            f"Could not read {p.name} as AnnData ({type(exc).__name__}: {exc}). "
            "The file is damaged or not an .h5ad; re-export it with adata.write_h5ad()."
        ) from exc
    if counts_layer is not None and counts_layer not in layers:
        raise SamsError(
            f"Layer {counts_layer!r} not found (layers: {', '.join(layers) or 'none'}). "
            "Name an existing counts layer or leave it empty to use X."
        )
    layer = counts_layer or ("counts" if "counts" in layers else None)
    if layer is None and not has_x:
        raise SamsError("The file has no expression matrix (X is empty). Store counts in X or layers['counts'].")
    key, where = (f"layers/{layer}", f"layers[{layer!r}]") if layer is not None else ("X", "X")
    X = BackedMatrix(p, key, chunk_size)
    n, g = X.shape
    if n != len(obs) or g != len(var):
        raise SamsError(f"{where} is {n} × {g} but obs/var describe {len(obs)} × {len(var)}. The file is inconsistent.")

    # labels → dosages with the in-memory reader's rules, on a stand-in matrix (one count per cell)
    stub = sp.csr_matrix((np.ones(n, np.float32), np.zeros(n, np.int32), np.arange(n + 1)), shape=(n, g))
    base = from_anndata(
        ad.AnnData(X=stub, obs=obs, var=var), perturbation_key=perturbation_key, control_labels=control_labels,
        separators=separators, covariate_keys=covariate_keys,
    )
    is_counts, sums, vmin = _scan(X, where)
    if layer is not None and not is_counts:
        raise SamsError(
            f"{where} holds non-integer values, so they are not raw counts. Store raw UMI counts there, "
            "or remove the layer to model X as log-normalised data."
        )
    if is_counts and vmin < 0:
        raise SamsError(f"{where} has negative counts (min {vmin:g}). Counts must be ≥ 0: load raw UMI counts.")
    if is_counts:
        library = sums
        if (library <= 0).any():
            k = int((library <= 0).sum())
            raise SamsError(f"{k} cells have zero total counts. Filter them first (sc.pp.filter_cells(adata, min_counts=1)).")
    else:
        library = np.ones(n, dtype=np.float32)
    settings = {
        **base.settings,
        "counts_source": where if is_counts else None,
        "likelihood": "nb" if is_counts else "gaussian",
        "n_top_genes": None,
        "source": str(p),
        "backed": True,
        "chunk_size": int(chunk_size),
    }
    return BackedPerturbationData(
        X=X, is_counts=is_counts, library=library, dosages=base.dosages, labels=base.labels,
        perturbations=base.perturbations, genes=base.genes, obs=base.obs, settings=settings,
    )
