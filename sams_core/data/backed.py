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

import dataclasses
import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from sams_core.data import contract
from sams_core.data.screen import PerturbationData, covariate_settings, read_covariates
from sams_core.errors import SamsError
from sams_core.labels import SEPARATORS

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

    def sum(self, axis: int) -> np.ndarray:
        """Row sums (``axis=1``, float32), streamed over the file."""
        if axis != 1:
            raise ValueError("a backed matrix sums rows only (axis=1)")
        out = np.zeros(self.shape[0], dtype=np.float32)
        for rows, b in self.iter_blocks():
            out[rows] = np.asarray(b.sum(axis=1)).ravel()
        return out

    def to_memory(self) -> sp.csr_matrix | np.ndarray:
        """The whole matrix in memory (float32)."""
        parts = [b for _, b in self.iter_blocks()]
        if not parts:
            return self.read_rows(0, 0)
        return sp.vstack(parts, format="csr") if self.format == "csr" else np.concatenate(parts)


# ---- the screen --------------------------------------------------------------------------------
@dataclass
class BackedPerturbationData(PerturbationData):
    """A :class:`PerturbationData` whose ``X`` is a :class:`BackedMatrix` (rows stay on disk).

    Derived screens keep the matrix on disk while it stays backed (a choice of genes is a
    column view of the file); a choice of cells reads them and gives a plain, in-memory
    :class:`PerturbationData`, as does :meth:`to_memory`.
    """

    _checksum: str | None = field(default=None, init=False, repr=False, compare=False)

    def replace(self, **changes: Any) -> PerturbationData:
        """This screen with some fields changed: backed while ``X`` is, else in memory."""
        changes.setdefault("settings", dict(self.settings))
        if isinstance(changes.get("X", self.X), BackedMatrix):
            return dataclasses.replace(self, **changes)
        plain = {f.name: getattr(self, f.name) for f in dataclasses.fields(PerturbationData)}
        return PerturbationData(**{**plain, **changes, "settings": {**changes["settings"], "backed": False}})

    def to_memory(self) -> PerturbationData:
        """The whole screen in memory."""
        return self.replace(X=self.X.to_memory())

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


def read_h5ad_backed(
    path: str | Path,
    perturbation_key: str | None = None,
    control_labels: Sequence[str] | None = None,
    separators: Sequence[str] = SEPARATORS,
    counts_layer: str | None = None,
    n_top_genes: int | None = None,
    covariate_keys: Sequence[str] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    covariate_levels: dict[str, Sequence[str]] | None = None,
) -> BackedPerturbationData:
    """Open an ``.h5ad`` screen without reading its expression matrix into memory.

    Same options, data contract and messages as :func:`sams_core.data.screen.read_h5ad` (the
    checks of :mod:`sams_core.data.contract`, run block by block over the matrix); the matrix
    must be CSR or dense. ``n_top_genes`` needs the whole matrix and is refused.
    ``chunk_size`` is the number of rows per read.
    """
    import h5py

    p = contract.check_path(path)
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
        raise contract.unreadable(p, exc) from exc
    contract.check_shape(len(obs), len(var))
    genes = contract.gene_names(var.index)
    conditions = contract.read_conditions(obs, perturbation_key, control_labels, separators)
    carried = contract.carried_obs(obs, conditions, covariate_keys)
    covariates, codes, notes = read_covariates(obs, covariate_keys, covariate_levels)
    layer, where = contract.expression_source(layers, has_x, counts_layer)
    X = BackedMatrix(p, "X" if layer is None else f"layers/{layer}", chunk_size)
    n, g = X.shape
    if n != len(obs) or g != len(var):
        raise SamsError(f"{where} is {n} × {g} but obs/var describe {len(obs)} × {len(var)}. The file is inconsistent.")
    scan = contract.ValueScan(n, where)
    for rows, block in X.iter_blocks(raw=True):
        scan.add(rows, block)
    is_counts, library = scan.counts_and_library(layer)
    settings = {
        **contract.contract_settings(conditions, where, is_counts),
        "source": str(p),
        "backed": True,
        "chunk_size": int(chunk_size),
        **covariate_settings(covariates, notes),
    }
    return BackedPerturbationData(
        X=X, is_counts=is_counts, library=library, dosages=conditions.dosages, labels=conditions.labels,
        perturbations=conditions.perturbations, genes=genes, obs=carried, settings=settings,
        covariates=covariates, covariate_codes=codes,
    )
